"""The last step of every tool: exec the rest of the command line, cleanly.

fdlaunch(7), CHAIN LOADING: the program gets the signal dispositions the
caller would have given it, and none of our buffered output is lost. A tool
ends by returning an Exec; the runtime (cli.tool) either runs that program
in this process, when it is a tool of this installation (fusion), or execs it.
"""

import contextlib
import errno
import fcntl
import functools
import os
import signal
import stat
import sys
from collections import namedtuple

from fdlaunch.errors import NOT_EXECUTABLE, NOT_FOUND, Fatal, flush_output, shown, unable
from fdlaunch.kernel import fds

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
# What execve(2) says when there is no such program: 127; every other errno is 126.
NOT_THERE = (errno.ENOENT, errno.ENOTDIR)


# A tool's last step: run path with argv and environ. undo, if not None, takes
# back what the tool left for the program (socket files) should a later link
# fused into this process fail before its exec.
Exec = namedtuple("Exec", "path argv environ undo", defaults=(None,))

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

    Found nowhere: 127. Found but not executable (no x bit, a directory), or
    out of reach (a directory on the way that may not be searched, EACCES):
    126, with what stood in the way, as execvp(3) reports the first EACCES
    once no later directory has the program. A script of this installation
    is found without a look at the file, which a user we became may no
    longer be allowed to read (see installation()).
    """
    if not name:
        candidates = []  # execvp(3) finds nothing for '' (os.path.join would make it each PATH directory)
    elif "/" in name:
        candidates = [name]
    else:
        candidates = [os.path.join(d or ".", name) for d in environ.get("PATH", os.defpath).split(os.pathsep)]
    ours = fusable_scripts(environ) if os.path.basename(name) in TOOLS else {}
    refusal = None
    for path in candidates:
        if ours and os.path.abspath(path) in ours:
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


def fusable_scripts(environ):
    """{path: module} of the tools a link may run in this process instead of exec'ing them."""
    if environ.get(FUSE_VARIABLE) == "0":
        return {}
    root, scripts = installation()
    if scripts and _root_identity() != root:
        return {}  # chrooted since: the same path now names another file
    return scripts


def fused_tool(path, environ):
    """The module (under fdlaunch.cmd) the runtime would run in this process instead of exec'ing path, or None."""
    if os.path.basename(path) not in TOOLS:
        return None
    return fusable_scripts(environ).get(os.path.abspath(path))


@functools.cache
def installation():
    """(identity of /, {path: module}) for the console scripts beside the one running.

    A script is ours if it sits in the directory of the script this process
    started from, runs this very interpreter, and imports its tool's module:
    the PATH lookup exec would do then lands on code we have already loaded.
    Computed once, at the start of the first link, while the files are still
    readable (a later link may run as a user who cannot read them): memoized
    facts about the installation, not state that changes.
    """
    home = os.path.dirname(os.path.abspath(sys.argv[0]))
    scripts = {}
    for name, module in TOOLS.items():
        path = os.path.join(home, name)
        try:
            with open(path, "rb") as script:
                head = script.read(1024)
        except OSError:
            continue
        shebang, _, body = head.partition(b"\n")
        interpreter = shebang[2:].split(None, 1)[0] if shebang.startswith(b"#!") and len(shebang) > 2 else b""
        if interpreter == os.fsencode(sys.executable) and f"fdlaunch.cmd.{module} import".encode() in body:
            scripts[path] = module
    return _root_identity(), scripts


def _root_identity():
    info = os.stat("/")
    return info.st_dev, info.st_ino


def spawn(path, argv, environ, setup=None, moves=(), become=None):
    """Fork, and run argv in the child: exec'd, or fused through become. Returns the child's pid.

    The one exec-failure path of a forked child: it reports errno over a
    close-on-exec pipe and the parent raises Fatal (127 not found, 126 not
    executable), so only the parent speaks. In the child, first: the report
    pipe goes above the fds of moves, moves (fd now, fd wanted) are made,
    setup() runs, and a LISTEN_PID or WATCHDOG_PID that named us names the child.
    """
    try:
        report_read, report_write = os.pipe2(os.O_CLOEXEC)
    except OSError as error:
        raise unable(f"start {shown(argv[0])}", error) from None
    parent = os.getpid()
    try:
        pid = os.fork()
    except OSError as error:
        os.close(report_read)
        os.close(report_write)
        raise unable(f"start {shown(argv[0])}", error) from None
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
            if become is not None and fused_tool(path, child_environ) is not None:
                # What the exec would close: our report pipe (the fused tool speaks
                # for itself) and every other close-on-exec descriptor of the parent's.
                fds.close_all(fds.close_on_exec())
                os._exit(become(Exec(path, argv, child_environ)))
            restore_signals()
            os.execve(path, argv, child_environ)
        except OSError as error:
            os.write(report_write, str(error.errno).encode())
        finally:
            os._exit(NOT_FOUND)
    os.close(report_write)
    with os.fdopen(report_read, "rb") as report:
        failure = report.read()
    if failure:
        os.waitpid(pid, 0)
        raise exec_failed(argv[0], int(failure))
    return pid


def restore_signals():
    for number in PYTHON_IGNORED:
        signal.signal(number, signal.SIG_DFL)


def signals_as_after_exec():
    """The handlers a fused link would have found had it been exec'd as a new interpreter.

    execve(2) resets caught signals to SIG_DFL and keeps ignored ones ignored;
    the new interpreter then catches SIGINT if it was at SIG_DFL.
    """
    signal.set_wakeup_fd(-1)
    for number in signal.valid_signals():
        try:
            handler = signal.getsignal(number)
        except ValueError:
            continue
        if callable(handler) and handler is not signal.default_int_handler:
            signal.signal(number, signal.SIG_DFL)
    if signal.getsignal(signal.SIGINT) is signal.SIG_DFL:
        signal.signal(signal.SIGINT, signal.default_int_handler)


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
    return Fatal(f"unable to exec {shown(name)}: {os.strerror(number)}", status)


@contextlib.contextmanager
def stopping_signals_raise(numbers=(signal.SIGTERM, signal.SIGHUP, signal.SIGINT)):
    """While waiting before an exec, turn a stop signal into Fatal so cleanup runs.

    The first stop ends the run: from then on these signals are ignored, so
    that a second one can neither cut the cleanup short nor kill the process
    before it has said why it stopped.
    """
    stopped = []

    def stop(number, frame):
        for each in numbers:
            signal.signal(each, signal.SIG_IGN)
        stopped.append(number)
        raise Fatal(f"stopped by {signal.Signals(number).name} before exec", 128 + number)

    # A signal the caller ignores (nohup) stays ignored: it was never a stop request.
    numbers = [n for n in numbers if signal.getsignal(n) is not signal.SIG_IGN]
    previous = {number: signal.signal(number, stop) for number in numbers}
    try:
        yield
    finally:
        if not stopped:
            for number, handler in previous.items():
                signal.signal(number, handler)


def describe_exit(status):
    """A wait status in words: 'exited with status 3', 'was killed by SIGTERM'."""
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.WEXITSTATUS(status)}"
