"""The tool runtime: docopt with the settings every chain loader needs, and the
loop that runs a chain's links.

options_first=True keeps the program's own options away from docopt, and a
DocoptExit (docopt's own exit 1) becomes a one-line UsageError (exit 100).

A tool's body takes its argv and the environment it was handed, and returns
an exit status or a chain.Exec. The runtime execs that program, unless it is
a tool of this installation: then it runs that tool's body in this process
(fusion, fdlaunch(7)), so a chain costs one interpreter start, not one per link.
"""

import functools
import os
import re
import sys

from docopt import DocoptExit, docopt

from fdlaunch import __version__
from fdlaunch.errors import SYSTEM, BadCall, Fatal, Finished, UsageError, flush_output, report
from fdlaunch.kernel import chain, fds


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


def parse(doc, argv, match=None):
    """Parse argv against doc's usage; doc is what --help prints.

    match, when given, is a docstring with the same Options section and a
    usage docopt can match; fdlaunch-listen needs one, since docopt cannot
    match 'SPEC... PROG' (its '...' is greedy and never backtracks).
    """
    try:
        options = docopt(match or doc, argv=argv, default_help=False, options_first=True)
    except DocoptExit as error:
        reason = explain(error)
        if reason is None:
            raise BadCall(synopsis(doc)) from None
        raise UsageError(f"{reason} (usage: {synopsis(doc)})") from None
    if options.get("--help"):
        sys.stdout.write(doc.strip() + "\n")
        raise Finished(0)
    if options.get("--version"):
        sys.stdout.write(f"fdlaunch {__version__}\n")
        raise Finished(0)
    return options


def seconds(option, text, zero=False):
    """A number of seconds given to option: above 0 (or 0 too, if zero), below 10**9, never nan."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (0 <= value if zero else 0 < value) or not value < 10**9:
        raise UsageError(f"{option}={text!r} is not a number of seconds {'(0 or more)' if zero else 'above 0'}")
    return value


def synopsis(doc):
    """The first form of doc's usage, as one line."""
    return doc.split("Usage:", 1)[1].strip().splitlines()[0].strip()


def explain(error):
    """Say what docopt disliked in one phrase, or None when it is only that no form matched."""
    first = str(error).splitlines()[0] if str(error) else ""
    # docopt-ng accepts an unknown option while reading argv and only
    # reports it as left unmatched; its repr is the one place that names it.
    unmatched = re.findall(r"Option\((?:'([^']*)'|None), (?:'([^']*)'|None)", first)
    if unmatched:
        short, long = unmatched[0]
        return f"unknown or repeated option {long or short!r}"
    if first and not first.startswith("Usage:") and "unmatched" not in first:
        return first.rstrip(".")
    return None
