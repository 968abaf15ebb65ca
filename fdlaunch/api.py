"""The daemon's side: the sockets passed to this process as Python objects, and notify() to tell readiness."""

import os
import socket

from fdlaunch.errors import UsageError
from fdlaunch.kernel import fds, sdnotify
from fdlaunch.text import listenenv


def listen_sockets(unset_environment: bool = True) -> dict[str, list[socket.socket]]:
    """The sockets passed to this process, by label: {'http': [<socket>], 'dns': [<udp>, <tcp>]}.

    Reads LISTEN_FD_MAP, or LISTEN_FDS/LISTEN_FDNAMES when LISTEN_PID is this
    process (another pid means nothing was passed to us: {}). Sockets the
    systemd convention passes without names come back under 'unknown', as
    sd_listen_fds_with_names(3) names them. Family and type are read from each
    descriptor. The descriptors are made close-on-exec, and the variables are
    removed from os.environ unless unset_environment is False.

    Raises ValueError naming the variable when one is malformed or names a
    descriptor that is not an open socket; then no descriptor is closed or
    changed and os.environ is left as it was.
    """
    passed = listenenv.inherited(os.environ, os.getpid(), fds.limit())
    made = []
    try:
        for p in passed:
            made.append(_socket_at(p.fd, p.label))
    except UsageError:
        for sock in made:
            sock.detach()  # the caller's descriptors: a socket object would close them when collected
        raise
    found: dict[str, list[socket.socket]] = {}
    for p, sock in zip(passed, made, strict=True):
        sock.set_inheritable(False)
        found.setdefault(p.label, []).append(sock)
    if unset_environment:
        for name in listenenv.VARIABLES:
            os.environ.pop(name, None)
    return found


def listen_fds(unset_environment: bool = True) -> dict[str, list[int]]:
    """Every descriptor passed to this process, by label, as numbers: {'http': [3], 'state': [5]}.

    What listen_sockets() reads, for a program that is also handed
    descriptors that are not sockets: those it stored with
    notify('FDSTORE=1', fds=...) come back under their FDNAME (a memfd, a
    pipe). The descriptors are made close-on-exec, and the variables are
    removed from os.environ unless unset_environment is False. Raises
    ValueError naming a malformed variable, or a descriptor that is not open;
    then nothing is changed.
    """
    passed = listenenv.inherited(os.environ, os.getpid(), fds.limit())
    for p in passed:
        try:
            os.fstat(p.fd)
        except OSError as error:
            raise UsageError(f"LISTEN_FDS/LISTEN_FD_MAP: fd {p.fd} ({p.label}) is not open: {error.strerror}") from None
    found: dict[str, list[int]] = {}
    for p in passed:
        os.set_inheritable(p.fd, False)
        found.setdefault(p.label, []).append(p.fd)
    if unset_environment:
        for name in listenenv.VARIABLES:
            os.environ.pop(name, None)
    return found


def _socket_at(fd, label):
    try:
        sock = socket.socket(fileno=fd)
    except OSError as error:
        raise UsageError(f"LISTEN_FDS/LISTEN_FD_MAP: fd {fd} ({label}) is not an open socket: {error.strerror}") from None
    return sock


def notify(*lines, pid=None, environ=None, wait=False, fds=()):
    """Send lines such as 'READY=1' or 'STATUS=loading' to $NOTIFY_SOCKET, as sd_notify(3).

    Returns False when NOTIFY_SOCKET is unset (nobody listens: not an error),
    True once sent; raises ValueError for a line that is not FIELD=VALUE,
    whether or not anyone listens (as fdlaunch-notify refuses it), and
    OSError if sending failed. pid sends on behalf of another process and
    adds MAINPID=pid; wait=True also waits (5 s at most) for the receiver to
    handle it, as systemd-notify does by default: a process that exits right
    after must, for a receiver that checks who sent it (fdlaunch-notify-wait)
    to find it still there. fds are descriptors sent along, as
    sd_pid_notify_with_fds(3) sends them: with 'FDSTORE=1' and 'FDNAME=NAME',
    for the supervisor to keep and hand to the next instance.
    """
    environ = os.environ if environ is None else environ
    _, confirmed = sdnotify.notify(lines, environ.get("NOTIFY_SOCKET"), pid, 5 if wait else 0, fds)
    return confirmed is not None
