"""Keeping a daemon that forks into the background in the foreground, as fdlaunch-foreground does.

As a child subreaper (prctl(2), PR_SET_CHILD_SUBREAPER) we inherit every
process the daemon leaves when its launching process exits, so the daemon
stays our child: we can tell which process it is, pass it signals, reap it
and learn its status, and stop what it leaves behind.

One poll(2) waits on everything, as in overlap.Handoff: a signal (through a
wakeup pipe, SIGCHLD included), a pidfd, a deadline.
"""

import math
import os
import select
import signal
import time
from collections import namedtuple

from fdlaunch.errors import Fatal, counted, pids_listed
from fdlaunch.kernel import chain, proc
from fdlaunch.kernel.guard import PidfdGuard

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
# Without --pidfile: how long the one process left below us must have run
# before it is taken as the daemon. The middle process of a double fork
# exits microseconds after it was forked; this is that, with room to spare.
SETTLE_SECONDS = 0.05
PIDFILE_POLL_SECONDS = 0.02
# Exit statuses of fdlaunch-foreground itself, besides those of fdlaunch(7).
NO_DAEMON = 1
NOT_UP_IN_TIME = 2

# A daemon that exited and the process that is the daemon from now on (the
# PID file names it): pid the new one's, previous the old one's, a zombie
# until the next supervise() reaps it.
Successor = namedtuple("Successor", "pid previous")

# pidfile: where PROG writes the daemon's pid, or None; timeout: seconds PROG
# may take to leave a daemon; grace: seconds what is left may take to stop.
Settings = namedtuple("Settings", "pidfile timeout grace")


class Keeper:
    """Runs PROG, finds the daemon it leaves, keeps it: signals in, status out, nothing left behind."""

    def __init__(self, settings, say, guard_say):
        """say(kind, text) speaks for us; guard_say for the guard, a process of its own."""
        self.settings, self.say, self.guard_say = settings, say, guard_say
        self.statuses = {}  # wait statuses of the children reaped so far
        self.pending = []  # signals received while the daemon was not known yet
        self.main = None
        self.guard = None
        self.dispositions = None  # what PROG gets: the dispositions we were started with
        self.wakeup_read = None

    def start_up(self):
        """Become the subreaper, and have every signal to pass on, SIGCHLD too, written to a wakeup pipe."""
        proc.become_subreaper()
        self.dispositions = proc.received_dispositions(FORWARDED)
        self.wakeup_read = proc.catch_signals((*FORWARDED, signal.SIGCHLD))

    def launch(self, program, environ):
        """Run PROG (a chain.Program) until its launching process exits and the daemon is known; its pid, or Fatal."""
        argv = program.argv
        deadline = time.monotonic() + self.settings.timeout
        self.start_up()
        self.guard = PidfdGuard(self.guard_say, self.settings.grace, "the daemon")
        try:
            launcher = proc.start_child(program, environ, self.dispositions)
        except Fatal:
            self.stop_guard()
            raise
        while launcher.pid not in self.statuses:
            self.wait([launcher.pidfd], deadline)
            for number in self.signals():
                launcher.send(number)
            self.reap()
            if launcher.pid not in self.statuses and time.monotonic() >= deadline:
                self.fail(
                    f"{argv[0]} (pid {launcher.pid}) was still starting after {counted(self.settings.timeout, 'second')}", NOT_UP_IN_TIME
                )
        os.close(launcher.pidfd)
        status = self.statuses[launcher.pid]
        if status != 0:
            self.fail(f"{argv[0]} (pid {launcher.pid}) {chain.describe_exit(status)}; no daemon started", chain.exit_status(status))
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
        while True:
            self.reap()
            below = self.below()
            self.guard.hand(below)
            if not below:
                self.fail(f"{name} exited 0 and left no process running: no daemon to keep", NO_DAEMON)
            if self.settings.pidfile is not None:
                pid, why = self.from_pidfile(below)
                if pid is not None:
                    return pid
                wake = time.monotonic() + PIDFILE_POLL_SECONDS
            else:
                pid, why, wake = self.only_one_left(below)
                if pid is not None:
                    return pid
            if time.monotonic() >= deadline:
                where = f"the PID file {self.settings.pidfile!r} " if self.settings.pidfile is not None else f"{name} "
                self.fail(f"{where}{why}", NO_DAEMON)
            self.wait([], min(deadline, wake or deadline))
            for number in self.signals():
                if number in STOPS:
                    self.fail(f"stopped by {signal.Signals(number).name} before the daemon was up", 128 + number)
                self.pending.append(number)

    def only_one_left(self, below):
        """Return (pid, None, None) if one process is left directly below us and has run SETTLE_SECONDS, else (None, why not,
        when to look again: None for at the next signal).

        A process leaves that set only by exiting, which SIGCHLD tells us; so
        with several there, the next look is due at the next signal, and with
        one, at the next signal or once it has run long enough.
        """
        direct = sorted(pid for pid, ppid in below.items() if ppid == os.getpid())
        if len(direct) != 1:
            left = f"left {counted(len(direct), 'process', 'processes')} directly below us"
            listed = f" ({pids_listed(direct)})" if direct else ""
            return None, f"{left}{listed}, and without --pidfile cannot tell which is the daemon", None
        age = proc.age_of(direct[0])
        if age is None:
            return None, f"left pid {direct[0]}, which exited at once", time.monotonic()  # reaped at the next look
        if age >= SETTLE_SECONDS:
            return direct[0], None, None
        return None, f"left pid {direct[0]}, which might be the middle of a double fork", time.monotonic() + SETTLE_SECONDS - age

    def from_pidfile(self, below):
        """Return (pid, None) if the PID file names a live process below us, else (None, why not). Never signals it.

        The file must be root's or the user's of the process it names: one
        that neither wrote is not this daemon's PID file.
        """
        pid, owner, why = proc.read_pidfile(self.settings.pidfile)
        if pid is None:
            return None, why
        if pid in below:
            if owner != 0 and owner not in proc.uids_of(pid):
                return None, f"is owned by uid {owner}, neither root nor a user pid {pid} runs as: refused, and never signalled"
            return pid, None
        if not os.path.exists(f"/proc/{pid}"):
            return None, f"names pid {pid}, which is not running (a stale file?)"
        return None, f"names pid {pid}, which is not a process this daemon started: refused, and never signalled"

    def below(self):
        """descendants() of ours, our own guard left out: it is not the daemon's, and ignores stop signals."""
        found = proc.descendants(os.getpid())
        if self.guard is not None:
            found.pop(self.guard.pid, None)
        return found

    def supervise(self):
        """Until the daemon exits: pass it the signals we get; then stop what is left. Its wait status, or a Successor.

        A stop signal passed on gives it --grace seconds, then SIGKILL: a
        supervisor that never escalates (s6, runit) must still see the stop end.
        A daemon that exits while the PID file names another process below
        us has handed over to it (nginx's binary upgrade): supervise() then
        returns that Successor, with the old daemon not yet reaped (its pid
        still speaks for it upward), and is called again to supervise it.
        """
        for number in self.pending:
            self.send_main(number)
        self.pending = []
        asked = kill_at = None
        while self.main not in self.statuses:
            # Wakes every GUARD_ROUND seconds too: a process the daemon double-forks later
            # is re-parented to us without a word, and the guard must hold it as well.
            events = self.wait([self.main_pidfd], min(time.monotonic() + GUARD_ROUND, kill_at or math.inf))
            for number in self.signals():
                self.send_main(number)
                if number in STOPS and asked is None:
                    asked, kill_at = number, time.monotonic() + self.settings.grace
            if asked in (None, signal.SIGQUIT) and proc.exited(self.main_pidfd):
                successor = self.successor()  # before the reap: until then its pid is not free
                if successor is not None:
                    return successor
            self.reap()
            if self.main_pidfd in events and self.main not in self.statuses and self.reap_one(self.main) is None:
                break  # not our child when it died: its own parent had its status
            if kill_at is not None and time.monotonic() >= kill_at and self.main not in self.statuses:
                kill_at = None
                self.send_main(signal.SIGKILL)
                name = signal.Signals(asked).name
                self.say(
                    "warning",
                    f"the daemon (pid {self.main}) was still running {counted(self.settings.grace, 'second')} after {name};"
                    " sent it SIGKILL",
                )
            self.guard.hand(self.below())
        self.stop_all()
        self.stop_guard()
        return self.statuses.get(self.main)

    def successor(self):
        """The daemon has exited: a Successor if the PID file now names another live process below us, else None.

        Not after a stop signal other than SIGQUIT, which is what stops the
        old master in nginx's upgrade: after SIGTERM or SIGINT the service is
        stopping, and nothing takes over.
        """
        if self.settings.pidfile is None:
            return None
        below = self.below()
        pid, _ = self.from_pidfile(below)
        if pid is None or pid == self.main:
            return None
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        if os.getpid() not in proc.lineage(pid, pidfd):
            os.close(pidfd)  # gone, and its pid taken, between the two looks
            return None
        old, old_pidfd = self.main, self.main_pidfd
        self.main, self.main_pidfd = pid, pidfd
        os.close(old_pidfd)
        self.guard.hand(below)
        return Successor(pid, old)

    def send_main(self, number):
        proc.send_pidfd(self.main_pidfd, number)

    def stop_guard(self):
        if self.guard is not None:
            self.guard.dismiss()
            self.guard = None

    def fail(self, message, status):
        self.stop_all()
        self.stop_guard()
        raise Fatal(message, status)

    def stop_all(self):
        """SIGTERM to every process left below us, SIGKILL after the grace period; all reaped.

        The guard holds them all meanwhile: were we killed during the grace period, it finishes the job.
        """
        if self.wakeup_read is None:
            return  # not launched: nothing of ours runs yet
        below = self.below()
        if self.guard is not None:
            self.guard.hand(below)
        signal_below(below, signal.SIGTERM, signal.SIGCONT)  # SIGCONT: a stopped process could not act on SIGTERM
        deadline = time.monotonic() + self.settings.grace
        killed = False
        while below:
            self.wait([], min(deadline, time.monotonic() + 0.05))
            self.signals()  # the stop is under way; more signals change nothing
            self.reap()
            below = self.below()
            if below and time.monotonic() >= deadline:
                if killed:
                    self.say("warning", f"{pids_listed(below)} survived SIGKILL; leaving {'it' if len(below) == 1 else 'them'}")
                    return
                them = "it" if len(below) == 1 else "them"
                grace = counted(self.settings.grace, "second")
                self.say("warning", f"{pids_listed(below)} still running {grace} after SIGTERM; sent {them} SIGKILL")
                signal_below(below, signal.SIGKILL)
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
        return dict(poller.poll(proc.poll_timeout(deadline)))

    def signals(self):
        """The forwardable signals received since last asked, in order."""
        return [n for n in proc.caught_signals(self.wakeup_read) if n in FORWARDED]


def signal_below(below, *numbers):
    """Send numbers to the processes of below ({pid: ppid}, from descendants() of ours) through pidfds, each checked once pinned."""
    for pidfd in proc.pin_below(os.getpid(), None, below).values():
        for number in numbers:
            proc.send_pidfd(pidfd, number)
        os.close(pidfd)
