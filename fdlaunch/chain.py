"""The last step of every tool: exec the rest of the command line, cleanly.

CONVENTIONS.md section 1: the program gets the signal dispositions the
caller would have given it, and none of our buffered output is lost.
"""

import contextlib
import errno
import os
import signal
import sys

from fdlaunch.errors import NOT_EXECUTABLE, NOT_FOUND, Fatal, shown

# Python sets these to SIG_IGN at start-up, and an ignored signal stays
# ignored across execve(2) (signal(7)), so a daemon would never die of EPIPE.
PYTHON_IGNORED = (signal.SIGPIPE, signal.SIGXFSZ)


def received_environment():
    """The environment this process was started with, as execve(2) gave it.

    Not os.environ: under the C locale Python adds LC_CTYPE=C.UTF-8 to it at
    start-up (PEP 538), and the program must get exactly what we received.
    /proc/self/environ still shows the original block.
    """
    try:
        with open("/proc/self/environ", "rb") as block:
            entries = block.read().split(b"\0")
    except OSError:
        return dict(os.environ)
    environ = {}
    for entry in entries:
        name, equals, value = entry.partition(b"=")
        if equals:
            environ.setdefault(os.fsdecode(name), os.fsdecode(value))
    return environ


def find_program(name, environ):
    """The path execve will run for name, searched in environ's PATH as execvp does.

    Found nowhere: 127. Found but not executable (no x bit, a directory): 126.
    """
    if "/" in name:
        candidates = [name]
    else:
        candidates = [os.path.join(d or ".", name) for d in environ.get("PATH", os.defpath).split(os.pathsep)]
    refusal = None
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
        if os.path.exists(path) and refusal is None:
            reason = "Is a directory" if os.path.isdir(path) else os.strerror(errno.EACCES)
            refusal = Fatal(f"unable to exec {shown(name)}: {reason}", NOT_EXECUTABLE)
    raise refusal or Fatal(f"unable to exec {shown(name)}: {os.strerror(errno.ENOENT)}", NOT_FOUND)


def restore_signals():
    for number in PYTHON_IGNORED:
        signal.signal(number, signal.SIG_DFL)


def exec_program(path, argv, environ):
    """Replace this process with the program; only returns by raising Fatal."""
    sys.stdout.flush()
    sys.stderr.flush()
    restore_signals()
    try:
        os.execve(path, argv, environ)
    except OSError as error:
        status = NOT_FOUND if error.errno in (errno.ENOENT, errno.ENOTDIR) else NOT_EXECUTABLE
        raise Fatal(f"unable to exec {shown(argv[0])}: {error.strerror}", status) from None


@contextlib.contextmanager
def stopping_signals_raise(numbers=(signal.SIGTERM, signal.SIGHUP, signal.SIGINT)):
    """While waiting before an exec, turn a stop signal into Fatal so cleanup runs."""

    def stop(number, frame):
        raise Fatal(f"stopped by {signal.Signals(number).name} before exec", 128 + number)

    # A signal the caller ignores (nohup) stays ignored: it was never a stop request.
    numbers = [n for n in numbers if signal.getsignal(n) is not signal.SIG_IGN]
    previous = {number: signal.signal(number, stop) for number in numbers}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def describe_exit(status):
    """A wait status in words: 'exited with status 3', 'was killed by SIGTERM'."""
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.WEXITSTATUS(status)}"
