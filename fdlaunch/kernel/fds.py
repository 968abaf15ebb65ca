"""Descriptor mechanics: what is open, and moving descriptors into place."""

import errno
import fcntl
import os

from fdlaunch import errors
from fdlaunch.errors import Fatal, UsageError
from fdlaunch.text.numbers import is_decimal


def open_fds():
    """The descriptors open in this process now."""
    listing = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
    found = set()
    for name in os.listdir(listing):
        fd = int(name)
        try:
            os.fstat(fd)
        except OSError:
            continue  # the descriptor listdir itself had open
        found.add(fd)
    return found


def limit():
    """One past the highest descriptor number this process may use: RLIMIT_NOFILE's soft limit.

    Read by sysconf(3), which glibc answers with getrlimit(2): the resource
    module is a shared library to load (tests/test_imports.py).
    """
    return os.sysconf("SC_OPEN_MAX")


class OutOfDescriptors(Fatal):
    """No descriptor to be had: this process is at its limit (RLIMIT_NOFILE), or the system at its own."""


def syscall_error(verb_object, error):
    """errors.syscall_error's Fatal for a failed call; for EMFILE or ENFILE an OutOfDescriptors, naming our limit.

    Running out of descriptors is ours to say as such: never the fault of
    what we were handling when it happened.
    """
    if error.errno == errno.EMFILE:
        return OutOfDescriptors(f"unable to {verb_object}: {os.strerror(error.errno)} (ulimit -n is {limit()})")
    if error.errno == errno.ENFILE:
        return OutOfDescriptors(f"unable to {verb_object}: {os.strerror(error.errno)}")
    return errors.syscall_error(verb_object, error)


def check_inherited(passed, open_now, variable="LISTEN_FDS/LISTEN_FD_MAP"):
    for p in passed:
        if p.fd not in open_now:
            raise UsageError(f"{variable} names fd {p.fd} ({p.label}), which is not open")


def place(moves):
    """Move descriptors: each (fd now, fd wanted), the result inherited by exec.

    A target held by another descriptor still waiting to move is done after
    it; a cycle (inherited sockets swapping places) goes through a spare fd
    above every target. dup2(fd, fd) is a no-op that would leave fd
    close-on-exec, so an fd already in place is made inheritable instead
    (the fd_move trap skalibs documents).
    """
    pending = dict(moves)
    spare_floor = max([0, *pending.values(), *pending]) + 1
    while pending:
        progressed = False
        for now, wanted in list(pending.items()):
            if now == wanted:
                os.set_inheritable(now, True)
            elif wanted not in pending:
                _dup2(now, wanted)
                os.close(now)
            else:
                continue
            del pending[now]
            progressed = True
        if not progressed:
            now, wanted = next(iter(pending.items()))
            spare = fcntl.fcntl(now, fcntl.F_DUPFD_CLOEXEC, spare_floor)
            os.close(now)
            pending[spare] = pending.pop(now)


def _dup2(now, wanted):
    try:
        os.dup2(now, wanted, inheritable=True)
    except OSError as error:
        raise syscall_error(f"move fd {now} to fd {wanted}", error) from None


def hold_closed_standard_fds():
    """Put /dev/null, close-on-exec, on whichever of fds 0, 1, 2 the caller left closed.

    Otherwise our own descriptors (a notify socket, a pipe) would land there
    and be overwritten by the first dup2 onto stdin or stdout; the program
    still finds them closed, since the exec closes these.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            held = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)  # the lowest free number: fd itself
            if held != fd:
                os.close(held)


def close_on_exec():
    """The open descriptors that an exec would close."""
    listing = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
    found = set()
    for name in os.listdir(listing):
        try:
            flags = fcntl.fcntl(int(name), fcntl.F_GETFD)
        except OSError:
            continue  # the descriptor listdir itself had open
        if flags & fcntl.FD_CLOEXEC:
            found.add(int(name))
    return found


def inheritable():
    """The open descriptors that an exec would pass on."""
    return open_fds() - close_on_exec()


def close_all(fds):
    """Close each fd, ignoring one already closed: used on the way out, where nothing else can be done."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def keep_only(keep):
    """For a helper process that must hold nothing of the program's: stdin and
    stdout on /dev/null, every descriptor closed but stderr and those in keep."""
    close_all(open_fds() - set(keep) - {0, 1, 2})  # first: under a tight limit, that makes room for /dev/null
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)


def make_inheritable(fds):
    for fd in fds:
        os.set_inheritable(fd, True)


STANDARD = {0: "input", 1: "output", 2: "error"}


def notification_fd(option, text, environ):
    """--fd=N, s6's notification fd: N as a number, an open descriptor, not 0, 1 or 2, made close-on-exec.

    Close-on-exec: it is the tool's to write, and no program it runs (the
    program, an instance, a daemon, a handler) inherits it.

    Not one of the sockets passed to this process either (environ's
    LISTEN_FDS or LISTEN_FD_MAP): the program would lose it and the
    readiness newline would go into the socket. Where it is, says why:
    the systemd convention puts sockets on 3, 4, ... over what was there;
    LISTEN_FD_MAP alone names a socket put on a free fd, so fd N was not
    open then, and no supervisor gave it.
    """
    fd = int(text) if is_decimal(text) and len(text) <= 10 else -1
    if fd in STANDARD:
        # The program keeps its stdin, stdout and stderr: a newline for the
        # supervisor there would be lost, or any line it prints would say 'ready'.
        raise UsageError(f"{option}={text!r}: fd {fd} is standard {STANDARD[fd]}, which the program keeps; a notification fd is 3 or more")
    from fdlaunch.text import listenenv  # only the tools that take --fd (tests/test_imports.py)

    systemd = {p.fd for p in listenenv.parse_systemd(environ, os.getpid())}
    for p in listenenv.inherited(environ, os.getpid()):
        if p.fd != fd:
            continue
        if fd in systemd:
            raise UsageError(
                f"{option}={text!r}: fd {fd} is the socket labelled {p.label!r} passed in LISTEN_FDS/LISTEN_FD_MAP, "
                f"not a notification fd; under s6 start the chain with fdlaunch-listen --map, which leaves fd {fd} alone"
            )
        raise UsageError(
            f"{option}={text!r}: fd {fd} is the socket labelled {p.label!r} of LISTEN_FD_MAP, not a notification fd: fd {fd} was"
            f" not open when that socket was put on a free fd, so no supervisor gave one (s6-supervise opens it for a service"
            f" whose notification-fd file says {fd}); started by hand, give it one: {fd}>&1"
        )
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except (OSError, ValueError, OverflowError):  # not a number at all, or beyond a C int
        raise UsageError(f"{option}={text!r}: not an open descriptor (s6 opens it when the service has a notification-fd file)") from None
    os.set_inheritable(fd, False)
    return fd


def free_fd_option(option, text, passed=(), taken_from_program=None):
    """--ready-fd=N: N as a number, 3 or more and below our limit, that the program does not hold.

    An open descriptor (a passed socket, one the caller gave) would be lost
    to the program once N is put there; taken_from_program, a descriptor
    the program will not get (--fd's), is free.
    """
    fd = int(text) if is_decimal(text) and len(text) <= 10 else -1
    if fd in STANDARD:
        raise UsageError(f"{option}={text!r}: fd {fd} is standard {STANDARD[fd]}, which the program keeps; give 3 or more")
    if not 3 <= fd < limit():
        raise UsageError(f"{option}={text!r} is not a descriptor number from 3 to {limit() - 1} (ulimit -n)")
    open_now = open_fds() - {taken_from_program}
    if fd in open_now:
        label = next((p.label for p in passed if p.fd == fd), None)
        what = f"the socket labelled {label!r} passed in LISTEN_FDS/LISTEN_FD_MAP" if label is not None else "open already"
        free = next(n for n in range(3, limit() + 1) if n not in open_now)
        raise UsageError(f"{option}={text!r}: fd {fd} is {what}, and the program would lose it; give a free one, such as {option}={free}")
    return fd
