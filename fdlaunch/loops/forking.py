"""Keeping a daemon that forks into the background in the foreground, as fdlaunch-foreground does.

As a child subreaper (prctl(2), PR_SET_CHILD_SUBREAPER) we inherit every
process the daemon leaves when its launching process exits, so the daemon
stays our child: we can tell which process it is, pass it signals, reap it
and learn its status, and stop what it leaves behind.

One poll(2) waits on everything, as in overlap.Handoff: a signal (through a
wakeup pipe, SIGCHLD included), a pidfd, a deadline.
"""

import array
import os
import select
import signal
import socket
import stat
import time

from fdlaunch.errors import Fatal, warn
from fdlaunch.kernel import chain, fds, proc
from fdlaunch.loops import overlap
from fdlaunch.text.numbers import is_decimal

PR_SET_CHILD_SUBREAPER = 36
GUARD_ROUND = 1.0  # seconds between looks for processes newly below us
FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGQUIT,
    signal.SIGCONT,
    signal.SIGALRM,
)
STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
# Without --pidfile: how long the one process left below us must stay the
# only one before it is taken as the daemon. The middle process of a double
# fork exits microseconds after forking; this is that, with room to spare.
SETTLE_SECONDS = 0.05
PIDFILE_POLL_SECONDS = 0.02
# Exit statuses of fdlaunch-foreground itself, besides those of fdlaunch(7).
NO_DAEMON = 1
NOT_UP_IN_TIME = 2


def become_subreaper():
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise Fatal(f"unable to become a child subreaper: {os.strerror(ctypes.get_errno())}")


def exit_code(status):
    """A wait status as a shell reports it: the exit status, or 128 + the signal."""
    return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def descendants(root):
    """The live (not zombie) processes below root, as {pid: ppid}.

    Walked down through /proc/PID/task/TID/children (proc(5)), which costs
    a few reads per process below us rather than one per process on the
    system; where the kernel lacks those files, the whole of /proc is read.
    """
    if not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"):
        return descendants_by_scan(root)
    found, todo = {}, [root]
    while todo:
        parent = todo.pop()
        for pid in children_of(parent):
            if pid not in found:
                todo.append(pid)
                if state_of(pid) not in ("Z", None):
                    found[pid] = parent
    return found


def children_of(pid):
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found  # gone meanwhile
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as children:
                found.extend(int(child) for child in children.read().split())
        except OSError:
            continue
    return found


def state_of(pid):
    """The one-letter state in /proc/PID/stat (Z: a zombie), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def descendants_by_scan(root):
    table = {}
    for name in os.listdir("/proc"):
        if is_decimal(name):
            try:
                with open(f"/proc/{name}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # gone meanwhile
            table[int(name)] = (int(fields[1]), fields[0])
    children = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, [root]
    while todo:
        for pid in children.get(todo.pop(), ()):
            if pid not in found:
                todo.append(pid)
                if table[pid][1] != "Z":
                    found[pid] = table[pid][0]
    return found


def send(pid, number):
    """Signal pid through a pidfd: never a process that took over a number already reaped."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        signal.pidfd_send_signal(pidfd, number)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


def read_pidfile(path):
    """(pid, None) or (None, why not): a PID file is one decimal number, a newline allowed."""
    try:
        # O_NONBLOCK: a FIFO put there must not hold us past --timeout
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        return None, "was not written"
    except OSError as error:
        return None, f"cannot be read: {error.strerror}"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None, "is not a regular file"
        text = os.read(fd, 64)
    finally:
        os.close(fd)
    number = text.strip()
    if not is_decimal(number) or not 0 < int(number) < 2**22 + 1:
        return None, f"holds {text.decode(errors='replace')!r}, not a pid"
    return int(number), None


class Keeper:
    """Runs PROG, finds the daemon it leaves, keeps it: signals in, status out, nothing left behind."""

    def __init__(self, tool, settings):
        self.tool, self.settings = tool, settings
        self.statuses = {}  # wait statuses of the children reaped so far
        self.pending = []  # signals received while the daemon was not known yet
        self.main = None
        self.guard = None
        self.dispositions = overlap.received_dispositions(FORWARDED)
        self.wakeup_read, wakeup_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        signal.set_wakeup_fd(wakeup_write, warn_on_full_buffer=False)
        for number in (*FORWARDED, signal.SIGCHLD):
            signal.signal(number, lambda number, frame: None)  # the wakeup fd carries it

    def launch(self, path, argv, environ):
        """Run PROG until its launching process exits and the daemon is known; its pid, or Fatal."""
        deadline = time.monotonic() + self.settings["timeout"]
        self.guard = Guard(self.tool, self.settings["grace"])
        try:
            launcher = overlap.spawn(path, argv, environ, self.dispositions)
        except Fatal:
            self.stop_guard()
            raise
        while launcher.pid not in self.statuses:
            self.wait([launcher.pidfd], deadline)
            for number in self.signals():
                launcher.send(number)
            self.reap()
            if launcher.pid not in self.statuses and time.monotonic() >= deadline:
                self.fail(f"{argv[0]} (pid {launcher.pid}) was still starting after {self.settings['timeout']:g} seconds", NOT_UP_IN_TIME)
        os.close(launcher.pidfd)
        status = self.statuses[launcher.pid]
        if status != 0:
            self.fail(f"{argv[0]} (pid {launcher.pid}) {chain.describe_exit(status)}; no daemon started", exit_code(status))
        self.main = self.find_daemon(argv[0], deadline)
        try:
            self.main_pidfd = os.pidfd_open(self.main)
        except ProcessLookupError:
            self.main_pidfd = None
        # The pidfd pins the process; if it is still ours now, it is the one we found.
        if self.main_pidfd is None or os.getpid() not in proc.lineage(self.main, self.main_pidfd):
            self.fail(f"the daemon (pid {self.main}) exited as soon as it was found", NO_DAEMON)
        return self.main

    def find_daemon(self, name, deadline):
        """The daemon's pid: from the PID file if one was named, else the one process left below us."""
        candidate, since, why = None, None, None
        while True:
            self.reap()
            below = self.below()
            self.guard.hand(below)
            if not below:
                self.fail(f"{name} exited 0 and left no process running: no daemon to keep", NO_DAEMON)
            if self.settings["pidfile"] is not None:
                pid, why = self.from_pidfile(below)
                if pid is not None:
                    return pid
            else:
                direct = sorted(pid for pid, ppid in below.items() if ppid == os.getpid())
                if len(direct) == 1 and direct[0] == candidate and time.monotonic() - since >= SETTLE_SECONDS:
                    return candidate
                if len(direct) != 1 or direct[0] != candidate:
                    candidate, since = (direct[0], time.monotonic()) if len(direct) == 1 else (None, None)
                    pids = ", ".join(map(str, direct))
                    why = f"left {len(direct)} processes (pids {pids}), and without --pidfile cannot tell which is the daemon"
            if time.monotonic() >= deadline:
                where = f"the PID file {self.settings['pidfile']!r} " if self.settings["pidfile"] is not None else f"{name} "
                self.fail(f"{where}{why}", NO_DAEMON)
            wait = PIDFILE_POLL_SECONDS if self.settings["pidfile"] is not None else SETTLE_SECONDS
            self.wait([], min(deadline, time.monotonic() + wait))
            for number in self.signals():
                if number in STOPS:
                    self.fail(f"stopped by {signal.Signals(number).name} before the daemon was up", 128 + number)
                self.pending.append(number)

    def from_pidfile(self, below):
        """(pid, None) if the PID file names a live process below us, else (None, why not). Never signals it."""
        pid, why = read_pidfile(self.settings["pidfile"])
        if pid is None:
            return None, why
        if pid in below:
            return pid, None
        if not os.path.exists(f"/proc/{pid}"):
            return None, f"names pid {pid}, which is not running (a stale file?)"
        return None, f"names pid {pid}, which is not a process this daemon started: refused, and never signalled"

    def below(self):
        """descendants() of ours, our own guard left out: it is not the daemon's, and ignores stop signals."""
        found = descendants(os.getpid())
        if self.guard is not None:
            found.pop(self.guard.pid, None)
        return found

    def supervise(self):
        """Until the daemon exits: pass it the signals we get; then stop what is left. Its wait status."""
        for number in self.pending:
            self.send_main(number)
        while self.main not in self.statuses:
            # Wakes every GUARD_ROUND seconds too: a process the daemon double-forks later
            # is re-parented to us without a word, and the guard must hold it as well.
            events = self.wait([self.main_pidfd], time.monotonic() + GUARD_ROUND)
            for number in self.signals():
                self.send_main(number)
            self.reap()
            if self.main_pidfd in events and self.main not in self.statuses and self.reap_one(self.main) is None:
                break  # not our child when it died: its own parent had its status
            self.guard.hand(self.below())
        self.stop_all()
        self.stop_guard()
        return self.statuses.get(self.main)

    def send_main(self, number):
        send_pidfd(self.main_pidfd, number)

    def stop_guard(self):
        if self.guard is not None:
            self.guard.dismiss()
            self.reap_one(self.guard.pid)
            self.guard = None

    def fail(self, message, status):
        self.stop_all()
        self.stop_guard()
        raise Fatal(message, status)

    def stop_all(self):
        """SIGTERM to every process left below us, SIGKILL after the grace period; all reaped.

        The guard holds them all meanwhile: were we killed during the grace period, it finishes the job.
        """
        below = self.below()
        if self.guard is not None:
            self.guard.hand(below)
        for pid in below:
            send(pid, signal.SIGTERM)
            send(pid, signal.SIGCONT)  # a stopped process could not act on it
        deadline = time.monotonic() + self.settings["grace"]
        killed = False
        while below:
            self.wait([], min(deadline, time.monotonic() + 0.05))
            self.signals()  # the stop is under way; more signals change nothing
            self.reap()
            below = self.below()
            if below and time.monotonic() >= deadline:
                if killed:
                    warn(self.tool, "warning", f"pids {', '.join(map(str, below))} survived SIGKILL; leaving them")
                    return
                for pid in below:
                    send(pid, signal.SIGKILL)
                killed, deadline = True, time.monotonic() + 5

    def reap(self):
        """Collect every child that has exited."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.statuses[pid] = status

    def reap_one(self, pid):
        """Wait for one child; its wait status, or None if it is not our child."""
        if pid not in self.statuses:
            try:
                self.statuses[pid] = os.waitpid(pid, 0)[1]
            except ChildProcessError:
                return None
        return self.statuses[pid]

    def wait(self, fds, deadline):
        """Until a signal, one of fds readable, or deadline; the fds that were."""
        poller = select.poll()
        for fd in (self.wakeup_read, *fds):
            poller.register(fd, select.POLLIN)
        timeout = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000) + 1)
        return dict(poller.poll(timeout))

    def signals(self):
        """The forwardable signals received since last asked, in order."""
        try:
            numbers = os.read(self.wakeup_read, 1024)
        except BlockingIOError:
            return []
        return [n for n in numbers if n in FORWARDED]


class Guard:
    """A helper that stops the daemon if fdlaunch-foreground dies, even by SIGKILL.

    It forks because nothing the kernel keeps for us would do it: the
    daemon's parent death signal was cleared by its own forks (prctl(2),
    PR_SET_PDEATHSIG), and the orphans of a dead subreaper go to the next
    one up. It is handed a pidfd on each process found below us, over a
    socket pair whose other end only we hold: end of file there is our
    death; 'done' is a departure in good order.
    """

    def __init__(self, tool, grace):
        ours, its = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent = os.getpid()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                os.setpgid(0, 0)  # a signal to our whole group (kill -KILL -PGID) must not reach it
                ours.close()
                watch_over(its, tool, parent, grace)
            finally:
                os._exit(0)
        its.close()
        try:
            os.setpgid(self.pid, self.pid)  # also done in the child: whichever runs first
        except OSError:
            pass
        self.sock = ours
        self.handed = set()

    def hand(self, pids):
        """A pidfd on each of pids the guard does not hold yet, if the pid is still below us."""
        for pid in pids:
            if pid in self.handed:
                continue
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                if os.getpid() in proc.lineage(pid, pidfd):  # the pidfd pins it: ours, not a reused pid
                    self.sock.sendmsg([b"%d" % pid], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [pidfd]))])
                    self.handed.add(pid)
            finally:
                os.close(pidfd)

    def dismiss(self):
        try:
            self.sock.send(b"done")
        except BrokenPipeError:
            pass  # killed already: nothing to dismiss
        self.sock.close()


def watch_over(sock, tool, parent, grace):
    """The guard's life: hold the pidfds handed to it; if the other end closes unannounced, stop them."""
    signal.set_wakeup_fd(-1)
    # It shares our process group: a stop signal sent to the whole group
    # (systemd's KillMode, ^C, timeout(1)) is ours to pass on, not its end.
    for number in FORWARDED:
        signal.signal(number, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)
    fds.close_all(fds.open_fds() - {0, 1, 2, sock.fileno()})
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
    warn(f"{tool} (guard)", "warning", f"{tool} (pid {parent}) died; stopping the daemon (pids {', '.join(map(str, live))})")
    below = {pid for root in live for pid in descendants(root)} - set(live)
    for pidfd in live.values():
        send_pidfd(pidfd, signal.SIGTERM)
    for pid in below:
        send(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for pidfd in live.values():
        if not select.select([pidfd], [], [], max(0, deadline - time.monotonic()))[0]:
            send_pidfd(pidfd, signal.SIGKILL)
    for pid in below:
        send(pid, signal.SIGKILL)


def send_pidfd(pidfd, number):
    try:
        signal.pidfd_send_signal(pidfd, number)
    except ProcessLookupError:
        pass
