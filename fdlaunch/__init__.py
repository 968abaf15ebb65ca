"""fdlaunch: chain-loading tools for socket activation, credentials and readiness.

The library's public surface, for daemon authors:

    fdlaunch.listen_sockets()    the sockets passed to this process, by label
    fdlaunch.listen_fds()        the same as numbers, stored descriptors too
    fdlaunch.notify("READY=1")   an sd_notify message to $NOTIFY_SOCKET

Both are imported lazily: the tools import this package first and must
start fast.
"""

# typing and socket cost every tool milliseconds at start-up; the annotations,
# strings, need them only when a type checker reads this file (and so does
# __future__: tests/test_imports.py).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from collections.abc import Mapping, Sequence

__version__ = "0.1.0"


def listen_sockets(unset_environment: bool = True) -> "dict[str, list[socket.socket]]":
    """The sockets passed to this process, {label: [socket, ...]}.

    From LISTEN_FD_MAP, or LISTEN_FDS/LISTEN_FDNAMES when LISTEN_PID is this
    process; unnamed systemd sockets under 'unknown'; {} when nothing was
    passed. The descriptors become close-on-exec and, unless
    unset_environment is False, the variables are removed from os.environ.
    Raises ValueError naming a malformed variable. See fdlaunch.api.
    """
    from fdlaunch.api import listen_sockets as receive

    return receive(unset_environment)


def listen_fds(unset_environment: bool = True) -> "dict[str, list[int]]":
    """Every descriptor passed to this process, by label, as numbers: sockets and stored ones (FDSTORE=1).

    Read as listen_sockets() reads them; for a program handed descriptors
    that are not sockets (a memfd it stored). See fdlaunch.api.
    """
    from fdlaunch.api import listen_fds as receive

    return receive(unset_environment)


def notify(
    *lines: str, pid: "int | None" = None, environ: "Mapping[str, str] | None" = None, wait: bool = False, fds: "Sequence[int]" = ()
) -> bool:
    """Send lines such as 'READY=1', 'STATUS=loading' to $NOTIFY_SOCKET, as sd_notify(3).

    False when NOTIFY_SOCKET is unset (nobody listens), True once sent;
    ValueError for a line that is not FIELD=VALUE, OSError if sending
    failed. pid speaks for another process (MAINPID=pid); wait=True waits
    for the receiver to handle it; fds go along (FDSTORE=1). See fdlaunch.api.
    """
    from fdlaunch.api import notify as send

    return send(*lines, pid=pid, environ=environ, wait=wait, fds=fds)
