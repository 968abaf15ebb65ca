"""The last step of every tool: exec the rest of the command line, cleanly; and starting a program as a child.

fdlaunch(7), CHAIN LOADING: the program gets the signal dispositions the
caller would have given it, and none of our buffered output is lost. A tool
ends by returning an Exec, which the runtime (cli) carries out. A loop that
starts a program as its child is handed a Program, which says how: exec'd
in the child, or run by the child itself (the runtime's choice, made before
the loop gets it; nothing here knows why).
"""

import _signal  # not signal, which makes enums of its numbers at import and in each call: tests/test_imports.py
import errno
import fcntl
import os
import stat
from collections import namedtuple

from fdlaunch.errors import NOT_EXECUTABLE, NOT_FOUND, SYSTEM, Fatal, flush_output, quoted, syscall_error
from fdlaunch.kernel import fds

# What execve(2) says when there is no such program: 127; every other errno is 126.
NOT_THERE = (errno.ENOENT, errno.ENOTDIR)


# A tool's last step: run path with argv and environ. undo, if not None, takes
# back what the tool left for the program (socket files) should a later link
# fused into this process fail before its exec.
Exec = namedtuple("Exec", "path argv environ undo", defaults=(None,))

# A program a loop starts as its child: argv, exec'd from where PATH finds
# argv[0]; or, when run_here is not None, run by the forked child itself:
# run_here(environ) returns the status the child exits with, and ends in an
# exec of its own unless it failed (then it has said why).
Program = namedtuple("Program", "argv run_here", defaults=(None,))

# Python sets these to SIG_IGN at start-up, and an ignored signal stays
# ignored across execve(2) (signal(7)), so a daemon would never die of EPIPE.
PYTHON_IGNORED = (_signal.SIGPIPE, _signal.SIGXFSZ)


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


def find_program(name, environ, known=frozenset()):
    """The path execve will run for name, searched in environ's PATH as execvp does.

    Found nowhere: 127. Found but not executable (no x bit, a directory), or
    out of reach (a directory on the way that may not be searched, EACCES):
    126, with what stood in the way, as execvp(3) reports the first EACCES
    once no later directory has the program. A candidate whose absolute
    path is in known is found without a look at the file: the caller knows
    it is there (a user we became may no longer be allowed to see it).
    """
    if not name:
        candidates = []  # execvp(3) finds nothing for '' (os.path.join would make it each PATH directory)
    elif "/" in name:
        candidates = [name]
    else:
        candidates = [os.path.join(d or ".", name) for d in environ.get("PATH", os.defpath).split(os.pathsep)]
    refusal = None
    for path in candidates:
        if known and os.path.abspath(path) in known:
            return path
        try:
            mode = os.stat(path).st_mode
        except OSError as error:
            reason = error.errno  # ENOENT, ENOTDIR: not here; anything else (EACCES, ELOOP) stands in the way
        else:
            if stat.S_ISREG(mode) and os.access(path, os.X_OK):
                return path
            reason = errno.EISDIR if stat.S_ISDIR(mode) else errno.EACCES
        if refusal is None and reason not in NOT_THERE:
            refusal = exec_failed(name, reason)
    raise refusal or exec_failed(name, errno.ENOENT)


def spawn(program, environ, setup=None, moves=()):
    """Fork, and start program in the child: exec'd, or run there (program.run_here). Returns the child's pid.

    The one exec-failure path of a forked child: it reports errno over a
    close-on-exec pipe and the parent raises Fatal (127 not found, 126 not
    executable), so only the parent speaks. A program to exec is found in
    environ's PATH first (Fatal 126 or 127 before any fork); one run in the
    child closes the pipe with every other close-on-exec descriptor, as the
    exec would, and says for itself why it failed. In the child, first: the
    report pipe goes above the fds of moves, moves (fd now, fd wanted) are
    made, setup() runs, and a LISTEN_PID or WATCHDOG_PID that named us
    names the child.
    """
    name = program.argv[0]
    path = None if program.run_here is not None else find_program(name, environ)
    try:
        report_read, report_write = os.pipe2(os.O_CLOEXEC)
    except OSError as error:
        raise syscall_error(f"start {quoted(name)}", error) from None
    parent = os.getpid()
    flush_output()  # else what is still buffered here would be written twice, once by the child
    try:
        pid = os.fork()
    except OSError as error:
        os.close(report_read)
        os.close(report_write)
        raise syscall_error(f"start {quoted(name)}", error) from None
    if pid == 0:
        try:
            os.close(report_read)
            if moves:
                floor = max(fd for move in moves for fd in move) + 1
                report_write = fcntl.fcntl(report_write, fcntl.F_DUPFD_CLOEXEC, floor)
                fds.place(moves)
            if setup is not None:
                setup()
            child_environ = dict(environ)
            if environ.get("LISTEN_PID") == str(parent):
                child_environ["LISTEN_PID"] = str(os.getpid())
                child_environ.pop("LISTEN_PIDFDID", None)
            if environ.get("WATCHDOG_PID") == str(parent):
                child_environ["WATCHDOG_PID"] = str(os.getpid())
            if program.run_here is not None:
                os._exit(program.run_here(child_environ))
            restore_signals()
            os.execve(path, program.argv, child_environ)
        except OSError as error:
            os.write(report_write, str(error.errno).encode())
        finally:
            os._exit(NOT_FOUND)
    os.close(report_write)
    with os.fdopen(report_read, "rb") as report:
        failure = report.read()
    if failure:
        os.waitpid(pid, 0)
        raise exec_failed(name, int(failure))
    return pid


def spawn_like_posix_spawn(program, environ, stdio, group, defaults):
    """Start program in a child as posix_spawn(3) would have, with a fork; the child's pid at once.

    For a program run in the child itself (program.run_here), which
    posix_spawn cannot do: the child gets environ as it is, stdio (a
    connection) on fds 0 and 1 (POSIX_SPAWN_DUP2), the process group group
    (setpgroup), the signals of defaults at SIG_DFL (setsigdef) and every
    other disposition and the signal mask as this process has them, and
    not one of its close-on-exec descriptors, as after the exec. Every
    signal is blocked from before the fork until the child has reset its
    handlers, as glibc's posix_spawn does: one that came meanwhile would run
    a handler of ours in the child (and write to our wakeup pipe).

    Unlike spawn, nothing waits for the child to get that far: a server
    goes back to its clients at once. What fails in the child before the
    program runs (setpgid, when the group's leader is gone) ends it with
    status 111, which whoever reaps it reports; the program itself says
    why it failed, under its own name.
    """
    # Listed here, where /proc/self/fd's entries stay cached: a child's own are dropped when it is reaped, at a cost.
    closing = fds.close_on_exec()
    mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, _signal.valid_signals())
    flush_output()  # else what is still buffered here would be written twice, once by the child
    try:
        pid = os.fork()
    except OSError as error:
        _signal.pthread_sigmask(_signal.SIG_SETMASK, mask)
        raise syscall_error(f"start {quoted(program.argv[0])}", error) from None
    if pid != 0:
        _signal.pthread_sigmask(_signal.SIG_SETMASK, mask)
        try:
            os.setpgid(pid, group)  # also done in the child, whichever runs first: a guard that kills the group finds it
        except OSError:
            pass  # it has done so and exec'd (EACCES), or is gone already
        return pid
    try:
        _signal.set_wakeup_fd(-1)
        for number in defaults:
            _signal.signal(number, _signal.SIG_DFL)
        _signal.pthread_sigmask(_signal.SIG_SETMASK, mask)
        for fd in (0, 1):
            os.dup2(stdio, fd)
        os.setpgid(0, group)
        fds.close_all(closing)  # what the exec would close: the program does not run before it
        os._exit(program.run_here(environ))
    finally:
        os._exit(SYSTEM)


def restore_signals():
    for number in PYTHON_IGNORED:
        _signal.signal(number, _signal.SIG_DFL)


def signals_as_after_exec():
    """The handlers a fused link would have found had it been exec'd as a new interpreter.

    execve(2) resets caught signals to SIG_DFL and keeps ignored ones ignored;
    the new interpreter then ignores SIGPIPE and SIGXFSZ (a server's child
    had them reset to SIG_DFL for its program) and catches SIGINT if it was
    at SIG_DFL.
    """
    _signal.set_wakeup_fd(-1)
    for number in _signal.valid_signals():
        handler = _signal.getsignal(number)
        if callable(handler) and handler is not _signal.default_int_handler:
            _signal.signal(number, _signal.SIG_DFL)
    for number in PYTHON_IGNORED:
        _signal.signal(number, _signal.SIG_IGN)
    if _signal.getsignal(_signal.SIGINT) == _signal.SIG_DFL:
        _signal.signal(_signal.SIGINT, _signal.default_int_handler)


def exec_program(path, argv, environ):
    """Replace this process with the program; only returns by raising Fatal."""
    flush_output()
    restore_signals()
    try:
        os.execve(path, argv, environ)
    except OSError as error:
        raise exec_failed(argv[0], error.errno) from None


def exec_failed(name, number):
    """The one message and status for an exec that failed with errno number: 127 not found, else 126."""
    status = NOT_FOUND if number in NOT_THERE else NOT_EXECUTABLE
    return Fatal(f"unable to exec {quoted(name)}: {os.strerror(number)}", status)


class stopping_signals_raise:  # lower case, as contextlib.suppress: what it is called like
    """While waiting before an exec, turn a stop signal into Fatal so cleanup runs.

    The first stop ends the run: from then on these signals are ignored, so
    that a second one can neither cut the cleanup short nor kill the process
    before it has said why it stopped. A class, not contextlib's decorator:
    tests/test_imports.py.
    """

    def __init__(self, numbers=(_signal.SIGTERM, _signal.SIGHUP, _signal.SIGINT)):
        # A signal the caller ignores (nohup) stays ignored: it was never a stop request.
        self.numbers = [n for n in numbers if _signal.getsignal(n) != _signal.SIG_IGN]
        self.stopped = False
        self.previous = {}

    def stop(self, number, frame):
        for each in self.numbers:
            _signal.signal(each, _signal.SIG_IGN)
        self.stopped = True
        raise Fatal(f"stopped by {signal_name(number)} before exec", 128 + number)

    def __enter__(self):
        self.previous = {number: _signal.signal(number, self.stop) for number in self.numbers}
        return self

    def __exit__(self, *raised):
        if not self.stopped:
            for number, handler in self.previous.items():
                _signal.signal(number, handler)
        return False


def describe_exit(status):
    """A wait status in words: 'exited with status 3', 'was killed by SIGTERM'."""
    if os.WIFSIGNALED(status):
        return f"was killed by {signal_name(os.WTERMSIG(status))}"
    return f"exited with status {os.WEXITSTATUS(status)}"


def exit_status(status):
    """A wait status as a shell reports it: the exit status, or 128 plus the signal that killed it."""
    return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def exit_as(status):
    """End as the process whose wait status this is did: by its signal, or with its status.

    Returns the status a shell would report, for a signal that does not kill by default.
    """
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        _signal.set_wakeup_fd(-1)
        if number not in (_signal.SIGKILL, _signal.SIGSTOP):  # these two cannot be caught anyway
            _signal.signal(number, _signal.SIG_DFL)
        os.kill(os.getpid(), number)
    return exit_status(status)


def signal_name(number):
    """'SIGTERM' for 15, 'signal 40' for one without a name: signal's enum, imported when a name is wanted, not at every start."""
    import signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
