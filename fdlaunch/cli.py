"""The tool runtime: reading argv against a tool's usage text, and the loop
that runs a chain's links.

A tool's module docstring is its interface as written: --help prints it, the
man page SYNOPSIS repeats its Usage section (tests/test_docs.py), and nothing
rewrites it. Reading argv takes two steps:

1. Our own small reader (text/usage.py, pure) takes the option names
   from the docstring's Options section and checks argv's leading options
   against them: an unknown option is named in one line, with the option it
   is near when there is one, as is a missing or unwanted value and an option
   given twice. docopt never tells a caller which option it did not know (it
   only fails to match), so this is how we can name it without reading its
   exception text.
2. docopt (docopt-ng, its public docopt() and DocoptExit only) then matches
   the usage forms as written, with options_first=True so the program's own
   options are never read as ours; its DocoptExit (its own exit 1) means only
   that no form fits, which is said as 'PROG: usage: FIRST FORM', exit 100.
   tests/test_cli.py pins the docopt-ng behaviour this relies on.

Two usages say what docopt's language cannot: fdlaunch-listen's
'SPEC... [--] PROG' (docopt's '...' is greedy and never gives a word back)
and fdlaunch-fdmap's optional value '--vars[=PREFIX]'. Rather than give
docopt a second, rewritten usage, those tools take their options from the
reader alone (read) and check the rest of their form themselves.

A tool's body takes its argv and the environment it was handed, and returns
an exit status or a chain.Exec. The runtime execs that program, unless it is
a tool of this installation: then it runs that tool's body in this process
(fusion, fdlaunch(7)), so a chain costs one interpreter start, not one per link.
"""

import errno
import functools
import os
import sys

from fdlaunch import __version__
from fdlaunch.errors import SYSTEM, BadCall, Fatal, Finished, UsageError, flush_output, report, unable
from fdlaunch.kernel import chain, fds
from fdlaunch.text import usage


def tool(name):
    """Make body(argv, environ) into the tool's main(argv=None) -> exit status, never a traceback."""

    def wrap(body):
        @functools.wraps(body)
        def main(argv=None):
            argv = sys.argv[1:] if argv is None else list(argv)
            fds.hold_closed_standard_fds()
            environ = chain.received_environment()
            load_chain(argv, environ)
            outcome, failed = attempt(name, body, argv, environ)
            if isinstance(outcome, chain.Exec):
                return become(name, outcome)
            return outcome

        main.body = body
        main.tool_name = name
        return main

    return wrap


def become(name, step):
    """Run step's program: fused if it is one of our tools, else by execve.

    Returns only if that failed, with the status to exit with; a link that
    failed has said why under its own name, and what earlier links left for
    the program is taken back.
    """
    undo = []
    while isinstance(step, chain.Exec):
        if step.undo is not None:
            undo.append(step.undo)
        module = fused_module(step)
        if module is None:
            outcome, failed = attempt(name, chain.exec_program, step.path, step.argv, step.environ)
        else:
            name, body = module.main.tool_name, module.main.body
            outcome, failed = attempt(name, body, step.argv[1:], step.environ)
        step = outcome
    if failed:
        for take_back in reversed(undo):
            take_back()
    return outcome


def fused_module(step):
    """The tool module to run in this process instead of exec'ing step.path, or None."""
    module = chain.fused_tool(step.path, step.environ)
    if module is None:
        return None
    # What exec would have done: flush what this link wrote, reset its signal handlers.
    flush_output()
    chain.signals_as_after_exec()
    return load(module)


def load_chain(argv, environ):
    """Import the tools this chain names while their files are still readable.

    A later link may run as a user who can no longer read the installation
    (fdlaunch-setuidgid nobody, with the interpreter under /root).
    """
    named = {os.path.basename(word) for word in argv} & chain.TOOLS.keys()
    if named:
        scripts = chain.fusable_scripts(environ)
        for module in set(scripts.values()) & {chain.TOOLS[n] for n in named}:
            load(module)


def load(module):
    """The tool module fdlaunch.cmd.<module> (plain __import__: importlib costs start-up time)."""
    name = f"fdlaunch.cmd.{module}"
    __import__(name)
    return sys.modules[name]


def attempt(name, function, *args):
    """(what function returned or the exit status it failed with, whether it failed), its error said in one line."""
    try:
        outcome = function(*args)
        return (0 if outcome is None else outcome), False
    except Finished as done:
        return done.status, False
    except Fatal as error:
        return report(name, error.kind, error, error.status), True
    except KeyboardInterrupt:
        return report(name, "fatal", "interrupted", 130), True
    except OSError as error:
        return report(name, "fatal", f"unexpected system error: {error}", SYSTEM), True
    except Exception as error:  # a bug of ours: still one line, never a traceback
        return report(name, "fatal", f"internal error, please report: {type(error).__name__}: {error}", SYSTEM), True


def parse(doc, argv):
    """Parse argv against doc's usage, as docopt reads it; doc is what --help prints."""
    # Imported here: fdlaunch-listen and fdlaunch-fdmap start without it. Safe
    # for fusion: fdlaunch-setuidgid, the one link that drops privileges, has
    # imported it before, so no later link needs to read it as the new user.
    from docopt import DocoptExit, docopt

    given, _ = checked(doc, argv)
    answer_help(doc, dict(given))  # --help among other options is still help, as read() answers it
    try:
        return docopt(doc, argv=argv, default_help=False, options_first=True)
    except DocoptExit:
        raise BadCall(synopsis(doc)) from None


def read(doc, argv):
    """Parse argv by doc's Options section alone, for a usage docopt cannot read.

    Returns the shape docopt returns: every option under its long name (else
    its short one), False or True for a flag, None, the value or its default
    for an option that takes one (a list if the usage repeats it); 'PROG' the
    first word after the options or None, 'ARGS' the words after that. An
    option with an optional value ('--vars[=PREFIX]') given bare is True.
    """
    table = usage.options_of(doc)
    given, rest = checked(doc, argv, table)
    options = {}
    for option in table.values():
        empty = [] if option.repeatable else None if option.value else False
        options[option.name] = empty if option.default is None else option.default
    for name, value in given:
        if isinstance(options[name], list):
            options[name].append(value)
        else:
            options[name] = value
    if rest[:1] == ["--"]:
        rest = rest[1:]
    options["PROG"], options["ARGS"] = (rest[0], rest[1:]) if rest else (None, [])
    return answer_help(doc, options)


def checked(doc, argv, table=None):
    """usage.read_options by doc's Options section, a refusal said with doc's first usage form."""
    try:
        return usage.read_options(table or usage.options_of(doc), argv)
    except UsageError as error:
        raise UsageError(f"{error} (usage: {synopsis(doc)})") from None


def answer_help(doc, options):
    """options, unless they ask for --help or --version: then that is printed and the tool is done."""
    if options.get("--help"):
        output([doc.strip()])
        raise Finished(0)
    if options.get("--version"):
        output([f"fdlaunch {__version__}"])
        raise Finished(0)
    return options


def output(lines):
    """lines on stdout, flushed; a write that fails (>&-, a full disk, a reader gone) is a system call that failed."""
    try:
        if sys.stdout is None:  # fd 1 was closed when Python started
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        sys.stdout.write("".join(line + "\n" for line in lines))
        sys.stdout.flush()
    except OSError as error:
        raise unable("write to standard output", error) from None


def seconds(option, text, zero=False):
    """A number of seconds given to option: above 0 (or 0 too, if zero), below 10**9, never nan.

    Written in ASCII as C's strtod reads it ('1.5', '2e3'): float() alone
    also takes '٥' (5 in Arabic-Indic digits), '1_0' and ' 1 '.
    """
    try:
        value = float(text) if set(text) <= set("0123456789.eE+-") else -1.0
    except ValueError:
        value = -1.0
    if not (0 <= value if zero else 0 < value) or not value < 10**9:
        raise UsageError(f"{option}={text!r} is not a number of seconds {'(0 or more)' if zero else 'above 0'}")
    return value


def synopsis(doc):
    """The first form of doc's usage, as one line."""
    return doc.split("Usage:", 1)[1].strip().splitlines()[0].strip()


def upstart_job(value, program):
    """UPSTART_JOB's value for --upstart[=NAME]: NAME, or PROG's basename when bare; None without it."""
    if value is None:
        return None
    if value is True:
        return os.path.basename(program[0]) or program[0]
    if not value:
        raise UsageError("--upstart= needs a job name, or no '=' at all for PROG's basename")
    return value


def ready_fd(options, passed, taken_from_program, reserved):
    """(--ready-fd's number, --ready-fd-var's name), each or None.

    N must be free in the program: not one of its descriptors (a passed
    socket, one its caller gave), which it would lose. taken_from_program
    (--fd's number, which the program does not inherit) is free. The
    variable may not be one of reserved, which the tool sets or reads.
    """
    text, variable = options["--ready-fd"], options["--ready-fd-var"]
    if text is None:
        if variable is not None:
            raise UsageError("--ready-fd-var goes with --ready-fd")
        return None, None
    number = fds.free_fd_option("--ready-fd", text, passed, taken_from_program)
    if variable is None:
        return number, None
    if not (variable and variable.isascii() and (variable[0].isalpha() or variable[0] == "_") and variable.replace("_", "a").isalnum()):
        raise UsageError(f"--ready-fd-var={variable!r} is not a variable name (a letter or _, then letters, digits or _)")
    if variable in reserved:
        raise UsageError(f"--ready-fd-var={variable!r}: {variable} is one of the variables this tool sets or reads itself")
    return number, variable
