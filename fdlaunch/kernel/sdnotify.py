"""The sd_notify(3) protocol on sockets: sending, and the private socket a watcher reads.

notify() is what fdlaunch.notify() and fdlaunch-notify use; Inbox
is the receiving end that fdlaunch-notify-wait and fdlaunch-handoff create;
tell_s6() is the other readiness protocol, s6's newline on a notification fd.
"""

import _socket as socket  # not socket.py: tests/test_imports.py
import array
import errno
import os
import select
import struct
import time
from collections import namedtuple

from fdlaunch.errors import Fatal, quoted, syscall_error
from fdlaunch.kernel import fds
from fdlaunch.text import notifyproto

UCRED = struct.Struct("iII")  # struct ucred (unix(7)): a sender's (SCM_CREDENTIALS) or a peer's (SO_PEERCRED) pid, uid, gid
PIDFD = struct.Struct("i")
# <asm-generic/socket.h> (x86, arm, riscv, ...); Python 3.11 does not name them
SO_PASSPIDFD, SCM_PIDFD = 76, 0x04

# pid, uid and gid from SCM_CREDENTIALS; lineage, the sender's pid and its
# ancestors' as proc.Family.lineage gives them; unchecked, why lineage is
# empty (nobody knows whose it was), else None; notice, the datagram decoded
# (notifyproto.Notice); fds received (ours to close); truncated when the
# datagram was longer than the protocol allows.
Message = namedtuple("Message", "pid uid gid lineage unchecked notice fds truncated")
GONE = "gone before it could be checked"
# A poll turn reads no more datagrams than this, and no longer: what comes
# after them (a deadline, a signal, an exit) is never held up by a flood.
TURN_DATAGRAMS = 64
TURN_SECONDS = 0.002


def address(notify_socket):
    """NOTIFY_SOCKET's value as a sockaddr: a path, or '@name' in the abstract namespace."""
    if notify_socket.startswith("@"):
        return b"\0" + os.fsencode(notify_socket[1:])  # the bytes the environment held, UTF-8 or not
    return notify_socket


def tell_s6(fd):
    """s6 readiness: a newline on the notification fd, then close it (s6-supervise(8)); Fatal if nobody reads it."""
    try:
        os.write(fd, b"\n")
    except OSError as error:
        raise syscall_error(f"write the readiness newline on fd {fd}", error) from None
    finally:
        os.close(fd)


def send(data, notify_socket, pid=None, fds=()):
    """Send one datagram; with pid, claim to be that process (permitted to root), else ourselves."""
    ancillary = []
    if fds:
        ancillary.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds)))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        target = address(notify_socket)
        if pid is not None and pid != os.getpid():
            credentials = (socket.SOL_SOCKET, socket.SCM_CREDENTIALS, UCRED.pack(pid, os.getuid(), os.getgid()))
            try:
                sock.sendmsg([data], [*ancillary, credentials], 0, target)
                return
            except (PermissionError, ProcessLookupError):
                pass  # as sd_pid_notify(3): not allowed to speak for pid (or it is gone), so speak for ourselves
        sock.sendmsg([data], ancillary, 0, target)
    finally:
        sock.close()


def tell(message, notify_socket, pid=None, fds=()):
    """One notification to a supervisor's NOTIFY_SOCKET (bytes), as pid where we may (send); Fatal naming the socket if it fails."""
    try:
        send(message, notify_socket, pid=pid, fds=fds)
    except OSError as error:
        raise syscall_error(f"notify {quoted(notify_socket)}", error) from None


def notify(lines, notify_socket, pid=None, wait=0, fds=()):
    """The one sender of sd_notify(3) messages, for fdlaunch.notify() and fdlaunch-notify.

    lines: 'FIELD=VALUE' texts; with pid, also MAINPID=pid, sent on pid's
    behalf; fds go with them (SCM_RIGHTS), for FDSTORE=1. They are checked first, even when nobody listens, so a bad line
    shows without a supervisor too (ValueError). Returns the bytes sent and
    whether the receiver confirmed them within wait seconds (BARRIER=1; no
    wait: True), or (data, None) when notify_socket is empty: nobody to tell.
    Raises OSError when sending fails.
    """
    data = notifyproto.check_fields([*lines, *([f"MAINPID={pid}"] if pid is not None else [])])
    if not notify_socket:
        return data, None
    send(data, notify_socket, pid=pid, fds=fds)
    return data, barrier(notify_socket, wait) if wait else True


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


class Inbox:
    """A private notification socket: abstract, so nothing is left behind however we die.

    Anyone on the host can send to an abstract name (it shows in
    /proc/net/unix), so a datagram comes with the sender's lineage (its pid
    and its ancestors'), and only that says who spoke; and a reader takes a
    turn's worth at a time (receive_some), so that no flood holds it.
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
            raise syscall_error(f"create the notify socket {self.path}", error) from None

    def fileno(self):
        return self.sock.fileno()

    def receive(self, family):
        """The next datagram as a Message, its sender placed by family (a proc.Family), or None when none is waiting.

        Raises fds.OutOfDescriptors when we have none left to check the
        sender with: a datagram whose own descriptors took the last ones is
        unchecked instead, since a sender must not be able to stop us.
        """
        space = socket.CMSG_SPACE(UCRED.size) + socket.CMSG_SPACE(PIDFD.size) + socket.CMSG_SPACE(notifyproto.FDS_MAX * 4)
        try:
            data, ancillary, flags, _ = self.sock.recvmsg(notifyproto.DATAGRAM_MAX + 1, space, socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            return None
        pid = uid = gid = -1
        pidfd = None
        fds_received = []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, uid, gid = UCRED.unpack(payload[: UCRED.size])
            elif level == socket.SOL_SOCKET and kind == SCM_PIDFD:
                (pidfd,) = PIDFD.unpack(payload[: PIDFD.size])  # below 0: the errno pidfd_open(2) would give
            elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds_received.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
        truncated = bool(flags & socket.MSG_TRUNC) or len(data) > notifyproto.DATAGRAM_MAX
        try:
            lineage, unchecked = self.place(family, pid, pidfd, fds_received or flags & socket.MSG_CTRUNC)
        except Fatal:
            fds.close_all(fds_received)
            raise
        finally:
            if pidfd is not None and pidfd >= 0:
                os.close(pidfd)
        return Message(pid, uid, gid, lineage, unchecked, notifyproto.decode(data), fds_received, truncated)

    def place(self, family, pid, pidfd, came_with_fds):
        """Return the sender's lineage and None, or () and why it could not be known."""
        if not self.pidfds:
            pidfd = None  # the kernel has none to give (before Linux 6.5)
        elif pidfd is None:
            return (), GONE
        elif pidfd < 0:
            # The kernel installs a datagram's own descriptors (SCM_RIGHTS) before the pidfd.
            if -pidfd not in (errno.EMFILE, errno.ENFILE):
                return (), GONE
            if came_with_fds:
                return (), f"its descriptors took the last of ours (ulimit -n is {fds.limit()}): who sent it cannot be checked"
            raise fds.syscall_error("check who sent a notification", OSError(-pidfd, os.strerror(-pidfd)))
        try:
            lineage = family.lineage(pid, pidfd)
        except OSError as error:
            raise fds.syscall_error("check who sent a notification", error) from None
        return lineage, None if lineage else GONE

    def receive_some(self, family):
        """The datagrams waiting, as Messages, up to TURN_DATAGRAMS of them or TURN_SECONDS, whichever ends first."""
        turn_ends = time.monotonic() + TURN_SECONDS
        for _ in range(TURN_DATAGRAMS):
            message = self.receive(family)
            if message is None:
                return
            yield message
            if time.monotonic() >= turn_ends:
                return

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
