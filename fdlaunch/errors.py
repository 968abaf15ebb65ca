"""Exit statuses and the one message grammar every tool uses.

Library code raises Fatal (or a subclass); only the tool runtime (cli.tool)
turns it into a line on stderr and an exit status, so every function can be
called and tested in-process.
"""

import sys

USAGE = 100
SYSTEM = 111
NOT_EXECUTABLE = 126
NOT_FOUND = 127


class Fatal(Exception):
    """An error that ends a tool: its message and the status it exits with."""

    status = SYSTEM
    kind = "fatal"  # the word after the tool's name on stderr

    def __init__(self, message, status=None):
        super().__init__(message)
        if status is not None:
            self.status = status


class Finished(Exception):
    """The tool's job ended without an exec (--help, --version, --dry-run)."""

    def __init__(self, status=0):
        super().__init__(status)
        self.status = status


class UsageError(Fatal, ValueError):
    """The caller asked for something wrong: bad option, spec, account, environment.

    A ValueError too, so that library callers (fdlaunch.listen_sockets) get
    the ordinary Python error for a bad value.
    """

    status = USAGE


class BadCall(UsageError):
    """Arguments that match no form of the usage: said as 'PROG: usage: FORM', the first form."""

    kind = "usage"


def quoted(text):
    """A name or path as given when it prints on one line, else quoted with %r (so is '', which would print as nothing)."""
    return text if text and text.isprintable() else repr(text)


def one_line(text):
    """text with every unprintable character (newline, tab, ...) escaped as repr escapes it."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def counted(number, noun, plural=None, or_more=False):
    """'1 handler', '3 handlers', '0.5 seconds', '2 processes', '1000 or more senders': a count and its noun,
    in the plural (noun + 's', unless plural is given) when it is not one."""
    text = f"{number:g}" if isinstance(number, float) else str(number)
    word = noun if number == 1 and not or_more else plural or f"{noun}s"
    return f"{text}{' or more' if or_more else ''} {word}"


def pids_listed(pids):
    """'pid 815', 'pids 815, 816': process ids in the order given, under the word that fits."""
    pids = list(pids)
    return f"pid{'' if len(pids) == 1 else 's'} {', '.join(map(str, pids))}"


def syscall_error(verb_object, error):
    """The s6 grammar for a failed system call: 'unable to bind X: strerror'."""
    reason = error.strerror or str(error)
    return Fatal(f"unable to {verb_object}: {reason}")


def report(name, kind, message, status):
    warn(name, kind, message)
    return status


def warn(name, kind, message):
    """One line on stderr: 'NAME: KIND: MESSAGE' (kind: fatal, warning, info).

    Messages quote what they echo; escaping here too keeps any that did not
    to one line.
    """
    try:
        sys.stderr.write(f"{name}: {kind}: {one_line(str(message))}\n")
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):
        pass  # stderr closed (2>&-) or its reader gone: nobody to tell, and no reason to stop


def say_as(name, verbose=False):
    """The say(kind, text) a loop is handed: one line on stderr under name; info lines only if verbose."""

    def say(kind, text):
        if kind != "info" or verbose:
            warn(name, kind, text)

    return say


def flush_output():
    """Flush stdout and stderr before an exec or a fused link, whatever state they are in."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass  # closed (>&-) or a reader gone: what could not be written is lost either way
