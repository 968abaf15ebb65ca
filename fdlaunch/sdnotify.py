"""The sd_notify(3) protocol on sockets: sending, and the private socket a watcher reads.

fdlaunch.notify() is the public sender; Inbox is the receiving end that
fdlaunch-notify-wait creates for its program.
"""

import array
import errno
import os
import select
import socket
import struct
from collections import namedtuple

from fdlaunch import notifyproto
from fdlaunch.errors import unable

UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid
PIDFD = struct.Struct("i")
# <asm-generic/socket.h> (x86, arm, riscv, ...); Python 3.11 does not name them
SO_PASSPIDFD, SCM_PIDFD = 76, 0x04

# pid, uid and gid from SCM_CREDENTIALS; lineage, the sender's pid and its
# ancestors' (empty when the sender was gone: nobody knows whose it was);
# fields parsed; fds received (ours to close); truncated when the datagram
# was longer than the protocol allows.
Message = namedtuple("Message", "pid uid gid lineage fields fds truncated")


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
    for the receiver to handle it, as systemd-notify does by default: a
    process that exits right after must, for a receiver that checks who
    sent it (fdlaunch-notify-wait) to find it still there.
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
    """A private notification socket: abstract, so nothing is left behind however we die (issue 9).

    Anyone on the host can send to an abstract name, so a datagram comes
    with the sender's lineage (its pid and its ancestors'), and only that
    says who spoke.
    """

    def __init__(self):
        self.path = f"@fdlaunch-notify.{os.getpid()}.{os.urandom(8).hex()}"  # NOTIFY_SOCKET, '@' for abstract
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self.pidfds = passes_pidfds(self.sock)
            self.sock.bind(address(self.path))
        except OSError as error:
            self.close()
            raise unable(f"create the notify socket {self.path}", error) from None

    def fileno(self):
        return self.sock.fileno()

    def receive(self):
        """The next datagram as a Message, or None when none is waiting."""
        space = socket.CMSG_SPACE(UCRED.size) + socket.CMSG_SPACE(PIDFD.size) + socket.CMSG_SPACE(notifyproto.FDS_MAX * 4)
        try:
            data, ancillary, flags, _ = self.sock.recvmsg(notifyproto.DATAGRAM_MAX + 1, space, socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            return None
        pid = uid = gid = pidfd = -1
        fds = []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, uid, gid = UCRED.unpack(payload[: UCRED.size])
            elif level == socket.SOL_SOCKET and kind == SCM_PIDFD:
                (pidfd,) = PIDFD.unpack(payload[: PIDFD.size])  # below 0: an errno, the sender was gone
            elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
        try:
            family = lineage(pid, pidfd if self.pidfds else None)
        finally:
            if pidfd >= 0:
                os.close(pidfd)
        truncated = bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)) or len(data) > notifyproto.DATAGRAM_MAX
        return Message(pid, uid, gid, family, notifyproto.parse(data), fds, truncated)

    def close(self):
        self.sock.close()


def passes_pidfds(sock):
    """Ask for a pidfd of each sender (SO_PASSPIDFD, Linux 6.5); False where the kernel has none."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_PASSPIDFD, 1)
    except OSError as error:
        if error.errno != errno.ENOPROTOOPT:
            raise
        return False
    return True


def close_fds(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def lineage(pid, pidfd):
    """pid and its ancestors up to init, as /proc has them; () if that cannot be known for sure.

    pidfd is a descriptor on the process meant (below 0: it was gone
    already; None: no pidfd to check with). The walk counts only if that
    process still has the pid once it is done, so a pid freed and reused
    meanwhile is never taken for the sender.
    """
    if pidfd is not None and pidfd < 0:
        return ()
    chain = []
    while pid > 0 and len(chain) < 4096:
        chain.append(pid)
        if pid == 1:
            break
        try:
            pid = notifyproto.parent_of(read_proc(f"/proc/{pid}/stat"))
        except (OSError, ValueError, IndexError):
            return ()  # gone, or an ancestor went away under us
    if not chain or (pidfd is not None and pid_of(pidfd) != chain[0]):
        return ()
    return tuple(chain)


def lineage_of(pid):
    """lineage() of a pid read in a message (a MAINPID): () unless it is a process here now."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return ()
    try:
        return lineage(pid, pidfd)
    finally:
        os.close(pidfd)


def pid_of(pidfd):
    """The pid of the process behind a pidfd, or -1 once it has been reaped (pidfd_open(2), fdinfo)."""
    for line in read_proc(f"/proc/self/fdinfo/{pidfd}").splitlines():
        if line.startswith("Pid:"):
            return int(line.split()[1])
    return -1


def read_proc(path):
    """A small /proc file, read with two system calls: a watcher reads several per datagram."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 4096).decode(errors="replace")
    finally:
        os.close(fd)
