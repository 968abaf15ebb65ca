"""Keeping a daemon that forks into the background in the foreground, as fdlaunch-foreground does.

As a child subreaper (prctl(2), PR_SET_CHILD_SUBREAPER) we inherit every
process the daemon leaves when its launching process exits, so the daemon
stays our child: we can tell which process it is, pass it signals, reap it
and learn its status, and stop what it leaves behind.

One poll(2) waits on everything, as in overlap.Handoff: a signal (through a
wakeup pipe, SIGCHLD included), a pidfd, a deadline.
"""

import os
import select
import signal
import time

from fdlaunch import chain, overlap, sdnotify
from fdlaunch.errors import Fatal, warn

PR_SET_CHILD_SUBREAPER = 36
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


def process_table():
    """{pid: (ppid, state)} for every process in /proc now."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        table[int(name)] = (int(fields[1]), fields[0])
    return table


def descendants(root, table=None):
    """The live (not zombie) processes below root, as {pid: ppid}."""
    table = process_table() if table is None else table
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
        with open(path, "rb") as pidfile:
            text = pidfile.read(64)
    except FileNotFoundError:
        return None, "was not written"
    except OSError as error:
        return None, f"cannot be read: {error.strerror}"
    number = text.strip()
    if not number.isdigit() or not 0 < int(number) < 2**22 + 1:
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
        sockets = environ.get("LISTEN_PID") == str(os.getpid())
        launcher = overlap.spawn(path, argv, environ, None, sockets, self.dispositions)
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
        if self.main_pidfd is None or not sdnotify.descends_from(self.main, os.getpid()):
            self.fail(f"the daemon (pid {self.main}) exited as soon as it was found", NO_DAEMON)
        self.start_guard()  # before anyone hears that it is up
        return self.main

    def find_daemon(self, name, deadline):
        """The daemon's pid: from the PID file if one was named, else the one process left below us."""
        candidate, since, why = None, None, None
        while True:
            self.reap()
            below = descendants(os.getpid())
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

    def supervise(self):
        """Until the daemon exits: pass it the signals we get; then stop what is left. Its wait status."""
        for number in self.pending:
            self.send_main(number)
        while self.main not in self.statuses:
            events = self.wait([self.main_pidfd], None)
            for number in self.signals():
                self.send_main(number)
            self.reap()
            if self.main_pidfd in events and self.main not in self.statuses and self.reap_one(self.main) is None:
                break  # not our child when it died: its own parent had its status
        self.stop_guard()
        self.stop_all()
        return self.statuses.get(self.main)

    def send_main(self, number):
        try:
            signal.pidfd_send_signal(self.main_pidfd, number)
        except ProcessLookupError:
            pass

    def start_guard(self):
        """A helper that stops the daemon if we die, even by SIGKILL.

        It forks because nothing the kernel keeps for us would do it: the
        daemon's parent death signal was cleared by its own forks (prctl(2),
        PR_SET_PDEATHSIG). Our death closes the only write end of a pipe it
        reads; a byte on it instead means we are leaving in good order.
        """
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(write_end)
                self.become_guard(read_end, parent)
            finally:
                os._exit(0)
        os.close(read_end)
        self.guard = (pid, write_end)

    def become_guard(self, read_end, parent):
        signal.set_wakeup_fd(-1)
        for number in (*FORWARDED, signal.SIGCHLD):
            signal.signal(number, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1):
            os.dup2(devnull, fd)
        from fdlaunch import fds

        fds.close_all(fds.open_fds() - {0, 1, 2, read_end, self.main_pidfd})
        if os.read(read_end, 1):
            return
        warn(f"{self.tool} (guard)", "warning", f"{self.tool} (pid {parent}) died; stopping the daemon (pid {self.main})")
        below = descendants(self.main)
        self.send_main(signal.SIGTERM)
        for pid in below:
            send(pid, signal.SIGTERM)
        if not select.select([self.main_pidfd], [], [], self.settings["grace"])[0]:
            self.send_main(signal.SIGKILL)
        for pid in below:
            send(pid, signal.SIGKILL)

    def stop_guard(self):
        if self.guard is not None:
            pid, write_end = self.guard
            os.write(write_end, b"x")
            os.close(write_end)
            self.reap_one(pid)
            self.guard = None

    def fail(self, message, status):
        self.stop_all()
        raise Fatal(message, status)

    def stop_all(self):
        """SIGTERM to every process left below us, SIGKILL after the grace period; all reaped."""
        below = descendants(os.getpid())
        for pid in below:
            send(pid, signal.SIGTERM)
            send(pid, signal.SIGCONT)  # a stopped process could not act on it
        deadline = time.monotonic() + self.settings["grace"]
        killed = False
        while below:
            self.wait([], min(deadline, time.monotonic() + 0.05))
            self.signals()  # the stop is under way; more signals change nothing
            self.reap()
            below = descendants(os.getpid())
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
