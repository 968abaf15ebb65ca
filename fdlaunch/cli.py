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
(fusion, fdlaunch(7)), so a chain costs one interpreter start, not one per
link. This module is the one place that knows: it decides for the next step
of a chain (run_chain), and for a program a loop is to start as its child
(program(), a chain.Program that the child runs itself when it is one of
ours); loops and the kernel only fork and exec, or run what they were given.
"""

import errno
import functools
import os
import sys

from fdlaunch import __version__
from fdlaunch.errors import SYSTEM, BadCall, Fatal, Finished, UsageError, flush_output, report, syscall_error
from fdlaunch.kernel import chain, fds
from fdlaunch.text import usage

# The console scripts of this installation: name -> module under fdlaunch.cmd.
TOOLS = {
    "fdlaunch-listen": "listen",
    "fdlaunch-setuidgid": "setuidgid",
    "fdlaunch-notify-wait": "notify_wait",
    "fdlaunch-notify": "notify",
    "fdlaunch-fdmap": "fdmap",
    "fdlaunch-handoff": "handoff",
    "fdlaunch-foreground": "foreground",
    "fdlaunch-accept": "accept",
    "fdlaunch-init": "init",
    "fdlaunch-adopt": "adopt",
}
FUSE_VARIABLE = "FDLAUNCH_FUSE"
SCRIPT_BYTES_MAX = 65536  # a console script is a few hundred bytes; a larger file is not one of ours


def tool(name, parses=True, accounts=False):
    """Make body(argv, environ) into the tool's main(argv=None) -> exit status, never a traceback.

    What the body does on first use, for a server that runs it in its
    children to do once (program()): parses, it reads its options with
    parse (docopt; False: with read); accounts, it looks accounts up.
    """

    def wrap(body):
        @functools.wraps(body)
        def main(argv=None):
            argv = sys.argv[1:] if argv is None else list(argv)
            fds.hold_closed_standard_fds()
            environ = chain.received_environment()
            load_chain(name, argv, environ)
            outcome, failed = run_reporting(name, body, argv, environ)
            if isinstance(outcome, chain.Exec):
                return run_chain(name, outcome)
            return outcome

        main.body = body
        main.tool_name = name
        main.parses = parses
        main.accounts = accounts
        return main

    return wrap


def run_chain(name, step):
    """Run step's program: fused if it is one of our tools, else by execve; and so on down the chain.

    Returns only if that failed, with the status to exit with; a link that
    failed has said why under its own name, and what earlier links left for
    the program is taken back.
    """
    undo = []
    failed = False
    while isinstance(step, chain.Exec):
        if step.undo is not None:
            undo.append(step.undo)
        module = fused_module(step)
        if module is None:
            outcome, failed = run_reporting(name, chain.exec_program, step.path, step.argv, step.environ)
        else:
            name = module.main.tool_name
            outcome, failed = run_reporting(name, run_fused, module, step)
        step = outcome
    if failed:
        for take_back in reversed(undo):
            take_back()
    return step


def fused_module(step):
    """The tool module to run in this process instead of exec'ing step.path, or None."""
    if os.path.basename(step.path) not in TOOLS:
        return None
    module = fusable_scripts(step.environ).get(os.path.abspath(step.path))
    return None if module is None else load(module)


def run_fused(module, step):
    """What exec'ing step would have done to this process, then module's body on step's argv and environment.

    Our buffered output is flushed and the handlers the last link set are
    reset, as execve(2) resets them; the process takes the name and command
    line the exec would have given it (comm is the script's name cut to 15
    bytes; the command line is the interpreter, the script and the
    arguments), so that ps(1) and pgrep(1) see the link that runs now.
    """
    from fdlaunch.kernel import proc  # loaded by load_chain or program(), with what renaming needs

    flush_output()
    chain.signals_as_after_exec()
    proc.name_self(os.path.basename(step.path))
    proc.set_arguments([step.path, *step.argv[1:]])
    return module.main.body(step.argv[1:], step.environ)


def program(argv, environ):
    """argv as a loop is to start it as its child: a chain.Program, run by the child itself if it is one of our tools.

    Decided here, once, by the environment this tool was given, as for the
    next link of a chain. What that child runs is loaded now, before the
    loop starts any thread: a child forked from a threaded process imports
    nothing (fdlaunch(7), FUSION).
    """
    path = our_script(argv[0], environ)
    if path is None:
        return chain.Program(argv)
    module = load(fusable_scripts(environ)[os.path.abspath(path)])
    load_renaming()
    if module.main.parses:
        read_ahead(module, argv[1:])
    if module.main.accounts:
        from fdlaunch.kernel import creds  # the tool's own import: loaded with it

        creds.load_databases()
    return chain.Program(argv, functools.partial(run_in_child, module, path, argv))


def our_script(name, environ):
    """The path of the script of this installation that exec would run for name, or None."""
    scripts = fusable_scripts(environ) if os.path.basename(name) in TOOLS else {}
    if not scripts:
        return None
    try:
        path = chain.find_program(name, environ, scripts.keys())
    except Fatal:
        return None
    return path if os.path.abspath(path) in scripts else None


def run_in_child(module, path, argv, environ):
    """A forked child runs our tool module itself (chain.Program.run_here), as an exec of path would: its exit status.

    First what the exec would have closed: every close-on-exec descriptor
    of the parent's, the fork's report pipe among them.
    """
    fds.close_all(fds.close_on_exec())
    fds.hold_closed_standard_fds()
    name = module.main.tool_name
    outcome, _ = run_reporting(name, run_fused, module, chain.Exec(path, argv, environ))
    return run_chain(name, outcome) if isinstance(outcome, chain.Exec) else outcome


def find_program(name, environ):
    """chain.find_program, with the scripts of this installation found without a look at them.

    A link that dropped privileges may no longer see the file of the next
    one, which runs in this process all the same (fdlaunch(7), FUSION).
    """
    ours = fusable_scripts(environ) if os.path.basename(name) in TOOLS else {}
    return chain.find_program(name, environ, ours.keys())


def load_chain(name, argv, environ):
    """Import the tools this chain names, and what renaming a fused link takes, while their files are still readable.

    A later link may run as a user who can no longer read the installation
    (fdlaunch-setuidgid nobody, with the interpreter under /root). name is
    the tool that runs now, argv its arguments.
    """
    words = [name, *(os.path.basename(word) for word in argv)]
    named = {word for word in words[1:] if word in TOOLS}
    modules = set(fusable_scripts(environ).values()) & {TOOLS[word] for word in named} if named else set()
    for module in modules:
        load(module)
    if modules:
        load_renaming(follows_a_change_of_user(words))


def follows_a_change_of_user(words):
    """Whether a tool of ours comes after fdlaunch-setuidgid among a chain's words."""
    if "fdlaunch-setuidgid" not in words:
        return False
    return any(word in TOOLS for word in words[words.index("fdlaunch-setuidgid") + 1 :])


def load_renaming(after_a_change_of_user=True):
    """What run_fused needs to rename the process, loaded now: proc, where the command line is, and, for a link
    that will run after a change of user (it cannot write its own /proc files then: proc.name_self), ctypes and
    the C library."""
    from fdlaunch.kernel import proc

    proc.command_line_area()
    if after_a_change_of_user:
        proc.libc_prctl()


def fusable_scripts(environ):
    """{path: module} of the tools a link may run in this process instead of exec'ing them."""
    if environ.get(FUSE_VARIABLE) == "0":
        return {}
    root, scripts = installation()
    if scripts and root_identity() != root:
        return {}  # chrooted since: the same path now names another file
    return scripts


@functools.cache
def installation():
    """Return the identity of / and {path: module} for the console scripts of this installation.

    A script is ours if it sits beside the script this process started
    from and is, byte for byte, that script with the tool's module named in
    place of ours: exec'ing it would run this interpreter on code we have
    loaded already. Any other file, an edited script among them, is
    exec'd (fdlaunch(7), FUSION says why this reads the files). Found once,
    at the start of the first link, while the files are still readable (a
    later link may run as a user who cannot read them): memoized facts
    about the installation, not state that changes.
    """
    started = os.path.abspath(sys.argv[0])
    home, own = os.path.split(started)
    text = read_script(started) if own in TOOLS else None
    marker = f"fdlaunch.cmd.{TOOLS.get(own)} import".encode()
    interpreter = b"#!" + os.fsencode(sys.executable)
    scripts = {}
    if text is not None and text.count(marker) == 1 and text.partition(b"\n")[0].split()[:1] == [interpreter]:
        for name, module in TOOLS.items():
            path = os.path.join(home, name)
            if read_script(path) == text.replace(marker, f"fdlaunch.cmd.{module} import".encode()):
                scripts[path] = module
    return root_identity(), scripts


def read_script(path):
    """The text of the file at path, or None if it cannot be read or is too large to be a console script."""
    try:
        with open(path, "rb") as script:
            text = script.read(SCRIPT_BYTES_MAX + 1)
    except OSError:
        return None
    return text if len(text) <= SCRIPT_BYTES_MAX else None


def root_identity():
    info = os.stat("/")
    return info.st_dev, info.st_ino


def load(module):
    """The tool module fdlaunch.cmd.<module> (plain __import__: tests/test_imports.py says why)."""
    name = f"fdlaunch.cmd.{module}"
    __import__(name)
    return sys.modules[name]


def run_reporting(name, function, *args):
    """Run function; return what it returned (or the exit status it failed with) and whether it failed, its error said in one line."""
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
    given, _ = read_leading_options(doc, argv)
    answer_help(doc, dict(given))  # --help among other options is still help, as read() answers it
    from docopt import DocoptExit  # loaded by docopt_reading, which ran first or failed with it

    try:
        options = docopt_reading(doc, tuple(argv))
    except DocoptExit:
        raise BadCall(synopsis(doc)) from None
    return {name: list(value) if isinstance(value, list) else value for name, value in options.items()}


@functools.lru_cache(maxsize=16)
def docopt_reading(doc, argv):
    """docopt's reading of argv by doc's usage forms (DocoptExit if none fits), memoized: parse copies it.

    A pure function of its arguments, and docopt takes milliseconds over a
    usage of many options: a server whose children run a link of ours
    (program()) has it read once, and every child finds it read.
    """
    # Imported here: fdlaunch-listen and fdlaunch-fdmap start without it
    # (tests/test_imports.py). Safe for fusion: fdlaunch-setuidgid, the one link
    # that drops privileges, has imported it before, so no later link needs to
    # read it as the new user.
    from docopt import docopt

    return docopt(doc, argv=list(argv), default_help=False, options_first=True)


def read_ahead(module, argv):
    """Read argv by module's usage now, when its main reads it with parse, so that children forked to run it find it read.

    A refusal is left for each child to say, as the link would say it exec'd.
    """
    from docopt import DocoptExit

    try:
        read_leading_options(module.__doc__, argv)
        docopt_reading(module.__doc__, tuple(argv))
    except (UsageError, DocoptExit):
        pass


def read(doc, argv):
    """Parse argv by doc's Options section alone, for a usage docopt cannot read.

    Returns the shape docopt returns: every option under its long name (else
    its short one), False or True for a flag, None, the value or its default
    for an option that takes one (a list if the usage repeats it); 'PROG' the
    first word after the options or None, 'ARGS' the words after that;
    'GIVEN' the names of the options argv gave, where a default filled in
    would hide it. An option with an optional value ('--vars[=PREFIX]') given
    bare is True.
    """
    table = usage.options_of(doc)
    given, rest = read_leading_options(doc, argv, table)
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
    options["GIVEN"] = frozenset(name for name, _ in given)
    return answer_help(doc, options)


def read_leading_options(doc, argv, table=None):
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
        raise syscall_error("write to standard output", error) from None


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
    """Return --ready-fd's number and --ready-fd-var's name, each or None.

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
