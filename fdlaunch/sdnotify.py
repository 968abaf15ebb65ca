"""The sd_notify(3) protocol on sockets: sending, and the private socket a watcher reads.

fdlaunch.notify() is the public sender; Inbox is the receiving end that
fdlaunch-notify-wait creates for its program.
"""

import array
import os
import select
import socket
import struct
import tempfile
from collections import namedtuple

from fdlaunch import notifyproto
from fdlaunch.errors import unable

UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid

# pid, uid and gid from SCM_CREDENTIALS; fields parsed; fds received (ours to
# close); truncated when the datagram was longer than the protocol allows.
Message = namedtuple("Message", "pid uid gid fields fds truncated")


def address(notify_socket):
    """NOTIFY_SOCKET's value as a sockaddr: a path, or '@name' in the abstract namespace."""
    if notify_socket.startswith("@"):
        return b"\0" + notify_socket[1:].encode()
    return notify_socket


def send(data, notify_socket, pid=None, fds=()):
    """Send one datagram; with pid, claim to be that process (permitted to root), else ourselves."""
    ancillary = []
    if fds:
        ancillary.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds)))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        target = address(notify_socket)
        if pid is not None and pid != os.getpid():
            credentials = (socket.SOL_SOCKET, socket.SCM_CREDENTIALS, UCRED.pack(pid, os.getuid(), os.getgid()))
            try:
                sock.sendmsg([data], [*ancillary, credentials], 0, target)
                return
            except (PermissionError, ProcessLookupError):
                pass  # as sd_pid_notify(3): not allowed to speak for pid (or it is gone), so speak for ourselves
        sock.sendmsg([data], ancillary, 0, target)


def barrier(notify_socket, timeout):
    """BARRIER=1: return once the receiver has handled everything sent before (True), or at timeout."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        send(b"BARRIER=1", notify_socket, fds=[write_end])
        os.close(write_end)
        write_end = None
        waiter = select.poll()
        waiter.register(read_end, select.POLLHUP)
        return bool(waiter.poll(timeout * 1000))
    finally:
        os.close(read_end)
        if write_end is not None:
            os.close(write_end)


def notify(*lines, pid=None, environ=None, wait=False):
    """Send lines such as 'READY=1' or 'STATUS=loading' to $NOTIFY_SOCKET, as sd_notify(3).

    Returns False when NOTIFY_SOCKET is unset (nobody listens: not an error),
    True once sent; raises OSError if sending failed. pid sends on behalf of
    another process and adds MAINPID=pid; wait=True also waits (5 s at most)
    for the receiver to handle it, as systemd-notify does by default.
    """
    environ = os.environ if environ is None else environ
    target = environ.get("NOTIFY_SOCKET")
    if not target:
        return False
    texts = [*lines, *([f"MAINPID={pid}"] if pid is not None else [])]
    try:
        data = notifyproto.check_fields(texts)
    except ValueError as error:
        raise ValueError(str(error)) from None
    send(data, target, pid=pid)
    if wait:
        barrier(target, 5)
    return True


class Inbox:
    """A private notification socket: in a fresh 0700 directory, credentials passed with every datagram."""

    def __init__(self, parent=None):
        try:
            self.directory = tempfile.mkdtemp(prefix="fdlaunch-notify.", dir=parent)
        except OSError as error:
            raise unable("create the notify socket's directory", error) from None
        self.path = os.path.join(self.directory, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self.sock.bind(self.path)
        except OSError as error:
            self.close()
            raise unable(f"create the notify socket {self.path}", error) from None

    def fileno(self):
        return self.sock.fileno()

    def receive(self):
        """The next datagram as a Message, or None when none is waiting."""
        space = socket.CMSG_SPACE(UCRED.size) + socket.CMSG_SPACE(notifyproto.FDS_MAX * 4)
        try:
            data, ancillary, flags, _ = self.sock.recvmsg(notifyproto.DATAGRAM_MAX + 1, space, socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            return None
        pid = uid = gid = -1
        fds = []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, uid, gid = UCRED.unpack(payload[: UCRED.size])
            elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
        truncated = bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)) or len(data) > notifyproto.DATAGRAM_MAX
        return Message(pid, uid, gid, notifyproto.parse(data), fds, truncated)

    def close(self):
        self.sock.close()
        for remove, path in ((os.unlink, self.path), (os.rmdir, self.directory)):
            try:
                remove(path)
            except OSError:
                pass


def close_fds(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def descends_from(pid, ancestor):
    """True if pid is ancestor or below it, False if not, None if pid is gone from /proc."""
    seen = 0
    while pid > 1 and seen < 4096:
        if pid == ancestor:
            return True
        try:
            with open(f"/proc/{pid}/stat") as stat:
                pid = notifyproto.parent_of(stat.read())
        except (OSError, ValueError, IndexError):
            return None if seen == 0 else False
        seen += 1
    return pid == ancestor
