"""A guard: a process that outlives its parent only to stop what the parent started."""

import _socket as socket  # not socket.py: tests/test_imports.py
import array
import os
import select
import signal

from fdlaunch.errors import counted, pids_listed
from fdlaunch.kernel import fds, proc

# What a supervisor or a terminal sends a whole process group.
GROUP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM)


class PidfdGuard:
    """A helper process that stops what it was handed if its parent dies, even by SIGKILL.

    It forks because nothing the kernel keeps for us would do it: a parent
    death signal is cleared in the child of every fork and by a change of
    user or group ids (prctl(2), PR_SET_PDEATHSIG), and the orphans of a dead
    subreaper go to the next one up. It is handed a pidfd on each process
    to stop, over a socket pair whose other end only the parent holds: end
    of file there is its death; 'done' is a departure in good order. Then
    it sends SIGTERM and SIGCONT to those still alive and to what they
    started since, and SIGKILL after grace seconds, each said under its own
    name through say; what: how the first line names what it stops.
    """

    def __init__(self, say, grace, what):
        ours, its = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent = os.getpid()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                os.setpgid(0, 0)  # a signal to our whole group (kill -KILL -PGID) must not reach it
                ours.close()
                watch_over(its, say, parent, grace, what)
            finally:
                os._exit(0)
        its.close()
        try:
            os.setpgid(self.pid, self.pid)  # also done in the child: whichever runs first
        except OSError:
            pass
        self.sock = ours
        self.handed = set()

    def hand(self, below):
        """A pidfd on each process of below ({pid: ppid}, from descendants() of ours) the guard does not hold yet."""
        new = [pid for pid in below if pid not in self.handed]
        wanted = set()  # the new ones and their ancestors below us, which pin_below checks them through
        for pid in new:
            while pid in below and pid not in wanted:
                wanted.add(pid)
                pid = below[pid]
        pinned = proc.pin_below(os.getpid(), None, {pid: parent for pid, parent in below.items() if pid in wanted})
        try:
            for pid, pidfd in pinned.items():
                if pid not in self.handed:
                    self.sock.sendmsg([b"%d" % pid], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [pidfd]))])
                    self.handed.add(pid)
        finally:
            for pidfd in pinned.values():
                os.close(pidfd)

    def dismiss(self):
        """A departure in good order: the guard leaves what it holds alone, and is reaped."""
        try:
            self.sock.send(b"done")
        except BrokenPipeError:
            pass  # killed already: nothing to dismiss
        self.sock.close()
        try:
            os.waitpid(self.pid, 0)  # it leaves at once on 'done'
        except ChildProcessError:
            pass  # reaped by a caller that waits for any child


def watch_over(sock, say, parent, grace, what):
    """The guard's life: hold the pidfds handed to it; if the other end closes unannounced, stop them."""
    signal.set_wakeup_fd(-1)
    # A stop signal sent to a whole group (systemd's KillMode, ^C, timeout(1))
    # before it moved to its own is its parent's to pass on, not its end.
    for number in GROUP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    fds.keep_only({sock.fileno()})
    held = {}
    while True:
        data, ancillary, _, _ = sock.recvmsg(32, socket.CMSG_SPACE(4))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                held[int(data)] = array.array("i", payload[: len(payload) - len(payload) % 4])[0]
        if data == b"done":
            return
        if not data:
            break
    live = {pid: pidfd for pid, pidfd in held.items() if not select.select([pidfd], [], [], 0)[0]}
    if not live:
        return
    say("warning", f"its parent (pid {parent}) died; stopping {what} ({pids_listed(live)})")
    # What they started since they were handed over: pinned now, so that the
    # SIGKILL after --grace reaches these processes, never others that took their pids.
    below = {}
    for root, pidfd in live.items():
        for pid, found in proc.pin_below(root, pidfd, proc.descendants(root)).items():
            if pid in live or pid in below:
                os.close(found)
            else:
                below[pid] = found
    stopping = {**live, **below}
    for pidfd in stopping.values():
        proc.send_pidfd(pidfd, signal.SIGTERM)
        proc.send_pidfd(pidfd, signal.SIGCONT)  # a stopped process could not act on SIGTERM
    killed = proc.end_within(stopping.values(), grace)
    if killed:
        pids = [pid for pid, pidfd in stopping.items() if pidfd in killed]
        say("warning", f"{pids_listed(pids)} still running {counted(grace, 'second')} after SIGTERM: sent SIGKILL")
