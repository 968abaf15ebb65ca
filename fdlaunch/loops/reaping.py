"""Running the rest of a chain as a child and reaping everything below it, as fdlaunch-init does.

As PID 1 of a pid namespace we are given every orphan of the namespace, and
the kernel delivers us only the signals we catch; anywhere else we ask for
the orphans below us (prctl(2), PR_SET_CHILD_SUBREAPER). One poll(2) waits
on the wakeup pipe every caught signal is written to, SIGCHLD included, so
no signal is lost between a look and the wait.
"""

import os
import select
import signal
import time
from collections import namedtuple

from fdlaunch.errors import Fatal
from fdlaunch.kernel import chain, fds, proc
from fdlaunch.kernel.guard import PidfdGuard

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH)
# A write to a terminal we no longer lead (the child took it) must not stop us.
TERMINAL_STOPS = (signal.SIGTTIN, signal.SIGTTOU)
# After SIGKILL, how long the kernel may take to end what got it before we say it survived.
KILL_SECONDS = 5

# group: forward to the child's process group, not the child alone; grace:
# seconds what is left once the child has exited may take after SIGTERM.
Settings = namedtuple("Settings", "group grace")


class Init:
    """Runs PROG as its child: passes it signals, reaps every process that ends below us, stops what PROG leaves."""

    def __init__(self, settings, say, guard_say):
        """say(kind, text) speaks for us; guard_say for the guard, a process of its own."""
        self.settings, self.say, self.guard_say = settings, say, guard_say
        self.guard = None
        self.wakeup_read = None
        self.child = None  # a proc.Child: pid and pidfd

    def run(self, program, environ):
        """Run program (a chain.Program) until it exits, then stop what it left; its wait status."""
        dispositions = self.start_up()
        if os.getpid() != 1:
            # Killed, even by SIGKILL, we leave the child to a guard: as PID 1 our end ends the namespace
            # and all in it, but elsewhere a child that changed its user ids no longer gets its parent death signal.
            self.guard = PidfdGuard(self.guard_say, self.settings.grace, "its child")
        # A group of its own for --group (a group to signal), and for the terminal we lead, which it then takes;
        # else it stays in ours, where it can still start a session of its own (fdlaunch-setuidgid --setsid).
        terminal = proc.terminal_we_lead()
        grouped = self.settings.group or terminal is not None
        setup = own_group(terminal) if grouped else None
        self.child = proc.start_child(program, environ, dispositions, more_setup=setup)
        if self.guard is not None:
            self.guard.hand({self.child.pid: os.getpid()})
        # What the child was handed is its own: a socket still open here would outlive it, answering nobody.
        fds.close_all(sorted(fd for fd in fds.inheritable() if fd > 2))
        group = "the leader of its own process group" if grouped else "in our process group"
        name = program.argv[0]
        self.say("info", f"started {name} as pid {self.child.pid}, {group}")
        status = self.serve()
        self.say("info", f"{name} (pid {self.child.pid}) {chain.describe_exit(status)}")
        self.stop_left(name)
        if self.guard is not None:
            self.guard.dismiss()
        return status

    def start_up(self):
        """Check /proc, become the subreaper, catch the signals; the dispositions the child gets (those we were given)."""
        if not proc.procfs_is_ours():
            raise Fatal(
                "unable to find the processes below this one: /proc is missing or shows another pid namespace"
                " (mount this one's: unshare --pid --fork --mount-proc, or mount -t proc proc /proc)"
            )
        if os.getpid() != 1:
            proc.become_subreaper()
        dispositions = proc.received_dispositions((*FORWARDED, signal.SIGCHLD, *TERMINAL_STOPS))
        self.wakeup_read = proc.catch_signals((*FORWARDED, signal.SIGCHLD))
        for number in TERMINAL_STOPS:
            signal.signal(number, signal.SIG_IGN)
        return dispositions

    def serve(self):
        """Until the child exits: pass on the signals we get, reap whatever exits; the child's wait status."""
        status = None
        while status is None:
            poller = select.poll()
            for fd in (self.wakeup_read, self.child.pidfd):
                poller.register(fd, select.POLLIN)
            poller.poll()  # no deadline: this is the child's life, which it ends, or its supervisor through us
            for number in proc.caught_signals(self.wakeup_read):
                if number != signal.SIGCHLD:
                    self.forward(number)
            status = self.reap().get(self.child.pid)
        os.close(self.child.pidfd)
        return status

    def forward(self, number):
        """Send number to the child, or its process group: while it is unreaped its pid, the group's id, is never reused."""
        if not self.settings.group:
            self.child.send(number)
            return
        try:
            os.killpg(self.child.pid, number)
        except ProcessLookupError:
            pass  # the whole group is gone

    def reap(self):
        """Collect every child that has exited: {pid: wait status}."""
        statuses = {}
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return statuses
            if pid == 0:
                return statuses
            statuses[pid] = status

    def stop_left(self, name):
        """SIGTERM (and SIGCONT) to every process still below us; SIGKILL to those running after the grace period, and
        to any started meanwhile; one warning line names what had to be SIGKILLed; everything reaped."""
        held = self.below({})
        try:
            if not held:
                return
            named = {pid: proc.name_of(pid) for pid in held}  # read while they still run
            self.say("info", f"{name} left {described(held, named)} running; sent SIGTERM")
            for pidfd in held.values():
                proc.send_pidfd(pidfd, signal.SIGTERM)
                proc.send_pidfd(pidfd, signal.SIGCONT)  # a stopped process could not act on it
            late = set(proc.end_within(held.values(), self.settings.grace))
            killed = [pid for pid, pidfd in held.items() if pidfd in late]
            deadline = time.monotonic() + KILL_SECONDS
            while time.monotonic() < deadline and (newcomers := self.below(held)):
                # Started during the grace period, by what was stopping: the grace is over for them too.
                named.update((pid, proc.name_of(pid)) for pid in newcomers)
                for pidfd in newcomers.values():
                    proc.send_pidfd(pidfd, signal.SIGKILL)
                held.update(newcomers)
                killed += list(newcomers)
            if killed:
                whom = described({pid: held[pid] for pid in killed}, named)
                self.say("warning", f"sent SIGKILL to {whom}: still running {seconds(self.settings.grace)} after SIGTERM")
                survivors = proc.running([held[pid] for pid in killed], deadline)
                if survivors:
                    alive = described({pid: fd for pid, fd in held.items() if fd in survivors}, named)
                    self.say("warning", f"{alive} survived SIGKILL for {seconds(KILL_SECONDS)}; leaving them")
        finally:
            fds.close_all(held.values())
            self.reap()

    def below(self, held):
        """{pid: pidfd} for the live processes below us that held does not have yet."""
        found = proc.descendants(os.getpid())
        if self.guard is not None:
            found.pop(self.guard.pid, None)  # ours, not the child's: it leaves when dismissed
        pinned = proc.pin_below(os.getpid(), None, found)  # all: each is checked through its parent
        fds.close_all(pidfd for pid, pidfd in pinned.items() if pid in held)
        return {pid: pidfd for pid, pidfd in pinned.items() if pid not in held}


def own_group(terminal):
    """What the child does before its exec: lead a process group of its own (and take the terminal we lead, if any)."""
    return lambda: proc.lead_own_group(terminal)


def described(pids, names):
    """'pids 14 (sleep), 17 (sh)' or 'pid 14 (sleep)', names from {pid: name}."""
    listed = ", ".join(f"{pid} ({names.get(pid, '?')})" for pid in sorted(pids))
    return f"pid{'s' if len(pids) > 1 else ''} {listed}"


def seconds(number):
    return f"{number:g} second{'' if number == 1 else 's'}"
