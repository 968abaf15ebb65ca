"""Waiting for a program's READY=1 and relaying it, as fdlaunch-notify-wait does.

One loop serves both modes: it drains the private notify socket, believes
only the program and its descendants, hands readiness to the relays, and
returns when the program is ready, gone, or late.
"""

import os
import select
import signal
import time
from collections import namedtuple

from fdlaunch.errors import Fatal, counted
from fdlaunch.kernel import fds, proc, sdnotify
from fdlaunch.text import listenenv, notifyproto

# What Watcher.run() comes to: the program ready, gone, not ready in time (its --timeout, or its
# --check gave up: why_not_ready says which), we were stopped by a signal, or its watchdog bit.
READY, EXITED, NOT_READY, STOPPED, WATCHDOG = "ready", "exited", "not ready", "stopped", "watchdog"
# Where a Check ends: a run passed, it gave up, or it was stopped (the program ready by other means, or gone).
PASSED, GAVE_UP = "passed", "gave up"
LINGER_SECONDS = 0.1

# --command: what to run once ready, and how long a run may take before it is stopped.
Command = namedtuple("Command", "text seconds grace")
# Notifications ignored: in each period the first of each kind is said in
# full, the others counted and said in one line when it ends; the senders
# counted are kept up to a number, so a flood costs neither lines nor memory.
IGNORED_PERIOD_SECONDS = 10
IGNORED_SENDERS_KEPT = 1000
# What a check must not be handed: the program's notify socket and sockets are not its own.
NOT_FOR_CHECKS = ("NOTIFY_SOCKET", *listenenv.VARIABLES)
# How much of its ready fd a program's writes are read at a time.
PIPE_READ = 4096
# How long a traced program may take to stop for us to release it (it does at once, unless in the kernel's own wait).
RELEASE_SECONDS = 1.0
# /bin/sh's statuses for a command it could not run (POSIX 2.8.2): retrying cannot help.
CANNOT_RUN = {126: "found but not executable", 127: "not found"}


def tell_supervisor(fd, say):
    """The readiness newline on s6's notification fd; a reader gone is said, and stops nothing: serving goes on."""
    try:
        sdnotify.tell_s6(fd)
    except Fatal as error:
        say("warning", str(error))


def tell_upstream(notify_socket, message, say, pid=None):
    """A notification (bytes) to our own supervisor, if we have one (NOTIFY_SOCKET); one that fails is said, and stops nothing."""
    if notify_socket:
        try:
            sdnotify.tell(message, notify_socket, pid)
        except Fatal as error:
            say("warning", str(error))


class Relays:
    """Where readiness goes: an s6 notification fd, an upstream NOTIFY_SOCKET, a command, SIGSTOP, a file to create."""

    def __init__(self, fd=None, upstream=None, command=None, stop=False, environ=None, touch=None):
        """touch: a kernel.readyfile.ReadyFile, or None."""
        self.fd, self.upstream, self.command, self.stop, self.touch = fd, upstream, command, stop, touch
        self.environ = environ or {}

    def describe(self):
        where = [f"a newline on fd {self.fd}"] if self.fd is not None else []
        where += [f"READY=1 to {self.upstream!r}"] if self.upstream else []
        where += [f"create {self.touch.path!r}"] if self.touch is not None else []
        where += [f"run {self.command.text!r}"] if self.command else []
        where += ["SIGSTOP"] if self.stop else []
        return ", ".join(where) or "no relay (no --fd, --forward, --touch, --command or --stop)"

    def ready(self, program, main_pid, fields, sender):
        """Tell every relay; one that fails stops none of the others: the first failure (Fatal) once all were tried.

        main_pid is the main process from now on; sender the one the supervisor knew until now (see relay).
        """
        if self.stop:
            signal.pidfd_send_signal(program.pidfd, signal.SIGSTOP)  # upstart's 'expect stop'
        failed = []
        if self.fd is not None:
            fd, self.fd = self.fd, None
            failed += failure_of(sdnotify.tell_s6, fd)
        failed += failure_of(self.relay, fields, main_pid, sender)
        if self.touch is not None:
            failed += failure_of(self.touch.create)
        if self.command:
            failed += failure_of(self.run_command, main_pid)
        if failed:
            raise failed[0]

    def run_command(self, main_pid):
        """CMD under /bin/sh in a session of its own, waited for; one that runs too long is stopped, and Fatal says so."""
        command = self.command
        pid = shell(command.text, self.environ, main_pid, setsid=True)
        pidfd = os.pidfd_open(pid)
        try:
            if proc.running([pidfd], time.monotonic() + command.seconds):
                os.killpg(pid, signal.SIGTERM)  # the shell, still unreaped, pins its group id
                killed = ", then SIGKILL" if proc.end_within([pidfd], command.grace) else ""
                os.killpg(pid, signal.SIGKILL)  # and whatever it left in its session
                raise Fatal(
                    f"the command {command.text!r} was still running after {counted(command.seconds, 'second')}; sent it SIGTERM{killed}"
                )
        finally:
            os.waitpid(pid, 0)
            os.close(pidfd)

    def relay(self, fields, main_pid, sender, fds=()):
        """Pass fields upstream, with MAINPID=main_pid if they say READY=1 or RELOADING=1, sent as sender.

        Both are pids the watcher checked are the program or below it, or None.
        """
        if self.upstream is None:
            return
        message = notifyproto.relay_message(fields, main_pid)
        if message is not None:
            # systemd's NotifyAccess=main believes only the main pid it knows, the one before any
            # MAINPID= in this message: claiming it lets the message in. Without privilege the
            # sender is us and the unit needs NotifyAccess=all.
            sdnotify.tell(message, self.upstream, sender, fds)


class Program:
    """The process whose readiness is awaited: its pid, a pidfd on it, its family (who is below it)."""

    def __init__(self, pid, pidfd):
        self.pid, self.pidfd = pid, pidfd
        self.family = proc.Family(pid)  # read now, while pid is surely the program's

    def heads(self, lineage):
        """True if lineage (a process and its ancestors) runs through the program, not through a reuse of its pid."""
        if self.pid not in lineage:
            return False
        try:
            return proc.pid_of(self.pidfd) == self.pid
        except OSError as error:
            raise fds.syscall_error(f"check that pid {self.pid} is still the program", error) from None

    def heads_pid(self, pid):
        """True if pid (a MAINPID) is the program or a live process below it."""
        try:
            lineage = self.family.lineage_of(pid)
        except OSError as error:
            raise fds.syscall_error(f"check MAINPID={pid}", error) from None
        return self.heads(lineage)


class Watcher:
    """Reads the inbox for program's notifications and hands them to relays; say(kind, text) speaks for it."""

    def __init__(self, inbox, program, relays, keep_relaying, say, check=None, signals=None, watchdog=None, inputs=()):
        """signals: the read end of a wakeup pipe (proc.catch_signals): SIGINT or SIGTERM there ends run() with
        STOPPED (caught() has them); SIGCHLD only wakes it, for inputs that learn of a stop through it.

        watchdog: seconds the program may go without WATCHDOG=1 once ready
        (its WATCHDOG_USEC= changes it); a miss, or WATCHDOG=trigger, ends
        run() with WATCHDOG, barked saying why. inputs: the other ways the
        program says it is ready (ReadyPipe, ChildStops, TracedStops).
        """
        self.inbox, self.program, self.relays, self.say, self.signals = inbox, program, relays, say, signals
        self.keep_relaying = keep_relaying
        self.watchdog, self.ping_due, self.barked = watchdog, None, None
        self.timeout = self.deadline = None  # run()'s, in seconds and as a time.monotonic()
        self.extended = False  # whether EXTEND_TIMEOUT_USEC moved the deadline
        self.why_not_ready = None  # what NOT_READY means, in words: 'was not ready after 5 seconds'...
        self.ready = False
        self.main_pid = program.pid
        self.warn_once = say_once(say)
        self.ignored = Ignored(say)
        self.check = check  # a Check, polled alongside the inbox (--check); None once given up
        self.inputs = list(inputs)
        self.stop_signals = []  # SIGINT and SIGTERM read from signals, in order
        self.ready_sender = None
        self.started = time.monotonic()
        ways = "".join(f", {source.words}" for source in self.inputs)
        heard = f" (by READY=1{ways})" if ways else ""
        self.say("info", f"watching pid {program.pid}; once it is ready{heard}: {relays.describe()}")

    def run(self, timeout=None):
        """Until ready (and, with keep_relaying or a watchdog, until the program is gone), gone, stopped, or not ready.

        timeout: seconds from now after which a program not yet ready is
        NOT_READY, unless its EXTEND_TIMEOUT_USEC= moves the deadline; without
        it, a deadline set before still holds. Run again after NOT_READY, it
        goes on waiting: a READY=1 still counts.
        """
        if timeout is not None:
            self.timeout, self.deadline = timeout, time.monotonic() + timeout
        try:
            while (outcome := self.turn()) is None:
                pass
        finally:
            self.ignored.flush()
        return outcome

    def turn(self):
        """One wait and what came of it: an outcome, or None to go on."""
        poller = select.poll()
        for fd in (self.inbox.fileno(), self.program.pidfd, *self.check_fds(), *self.input_fds()):
            poller.register(fd, select.POLLIN)
        if self.signals is not None:
            poller.register(self.signals, select.POLLIN)
        events = dict(poller.poll(proc.poll_timeout(self.deadline, self.check_due(), self.ping_due, self.ignored.due())))
        if self.signals in events and self.take_signals():
            return STOPPED
        self.drain()  # before looking at an exit: a last datagram may be queued
        self.ignored.flush_due()
        self.take_check()
        self.take_inputs()
        if self.ping_due is not None and time.monotonic() >= self.ping_due:
            self.bark(f"sent no WATCHDOG=1 for {counted(self.watchdog, 'second')}")
        if self.barked is not None:
            return WATCHDOG
        if self.ready and not self.keep_relaying and self.watchdog is None:
            return READY
        if self.program.pidfd in events:
            return EXITED
        if self.check is not None and self.check.end_state == GAVE_UP and not self.ready:
            self.check = None  # given up: a READY=1 from the program still counts
            self.why_not_ready = "was not ready: its check gave up"
            return NOT_READY
        if self.deadline is not None and time.monotonic() >= self.deadline and not self.ready:
            self.deadline = None  # late once: a READY=1 from the program still counts
            self.why_not_ready = f"was not ready after {self.waited()}"
            return NOT_READY
        return None

    def waited(self):
        """How long the program was given to be ready, in words."""
        if self.extended:
            return f"{time.monotonic() - self.started:.1f} seconds (its EXTEND_TIMEOUT_USEC included)"
        return counted(self.timeout, "second")

    def take_signals(self):
        """Read the wakeup pipe: True if a stop signal (SIGINT, SIGTERM) came, kept in stop_signals."""
        stops = [number for number in proc.caught_signals(self.signals) if number in (signal.SIGINT, signal.SIGTERM)]
        self.stop_signals += stops
        return bool(stops)

    def caught(self):
        """Every stop signal received so far, those still in the pipe included, in order."""
        if self.signals is not None:
            self.take_signals()
        return list(self.stop_signals)

    def until_exit(self, deadline):
        """Relay what comes until the program exits (True) or deadline passes (False)."""
        self.close_inputs()  # a traced program must take the signals it is sent meanwhile
        poller = select.poll()
        for fd in (self.inbox.fileno(), self.program.pidfd):
            poller.register(fd, select.POLLIN)
        while True:
            events = dict(poller.poll(proc.poll_timeout(deadline)))
            self.drain()
            if self.program.pidfd in events:
                return True
            if time.monotonic() >= deadline:
                return False

    def bark(self, why):
        """The watchdog bites once: run() returns WATCHDOG, and no ping is awaited any more."""
        if self.barked is None:
            self.barked = why
        self.ping_due = None

    def pinged(self, fields):
        """WATCHDOG=1 or WATCHDOG_USEC= from the program: the next ping is due an interval from now, once it is ready."""
        interval = notifyproto.seconds(fields, "WATCHDOG_USEC")
        if interval is not None:
            self.watchdog = interval
        if notifyproto.value(fields, "WATCHDOG") == "trigger":
            self.bark("asked for it with WATCHDOG=trigger")
        elif self.ready and self.barked is None:
            self.ping_due = time.monotonic() + self.watchdog

    def check_fds(self):
        return [] if self.check is None or self.ready else self.check.fds()

    def check_due(self):
        return None if self.check is None or self.ready else self.check.due()

    def take_check(self):
        """A passing check is readiness, as a READY=1 from the program would be."""
        if self.check is not None and not self.ready and self.check.step(self.program.pid):
            self.ready_by("its check")

    def input_fds(self):
        return [] if self.ready else [fd for source in self.inputs for fd in source.fds()]

    def take_inputs(self):
        """A newline on its ready fd, a SIGSTOP it sent itself: readiness, as a READY=1 would be."""
        for source in self.inputs:
            if not self.ready and source.take():
                self.ready_by(source.words)

    def ready_by(self, how):
        """The program is ready by how ('its check'), not by a datagram: every relay as for READY=1."""
        self.ready = True
        self.close_inputs()
        if self.watchdog is not None:
            self.pinged([("READY", "1")])
        relays = self.relays.describe()
        self.tell_ready([("READY", "1")], self.speaker())
        self.say("info", f"pid {self.main_pid} ready by {how} after {time.monotonic() - self.started:.3f} seconds; did: {relays}")

    def close_inputs(self):
        """No more readiness to wait for (ready, or the watcher leaves): every input let go, a traced program released."""
        for source in self.inputs:
            try:
                source.close()
            except Fatal as error:
                self.warn_once(("input", source.words), str(error))
        self.inputs = []

    def tell_ready(self, fields, sender):
        """Hand readiness to the relays: one that fails is said, and stops neither the others nor the watcher."""
        try:
            self.relays.ready(self.program, self.main_pid, fields, sender)
        except Fatal as error:
            self.warn_once("relay", str(error))

    def linger(self):
        """Answer the BARRIER a sender like systemd-notify sends right after READY=1.

        A watcher that left at once would make its barrier fail. Called after
        the relays, on the way out; the wait ends early once that sender is
        gone, and lasts LINGER_SECONDS at most.
        """
        if self.ready_sender is None:
            return  # ready by --check: nobody waits on a barrier
        deadline = time.monotonic() + LINGER_SECONDS
        poller = select.poll()
        poller.register(self.inbox.fileno(), select.POLLIN)
        try:
            sender = os.pidfd_open(self.ready_sender)
            poller.register(sender, select.POLLIN)
        except OSError:
            sender = None  # gone already
        try:
            while (left := deadline - time.monotonic()) > 0:
                events = dict(poller.poll(int(left * 1000) + 1))
                self.drain()
                if sender is None or sender in events:
                    return
        except fds.OutOfDescriptors as error:
            self.say("warning", str(error))  # readiness is told already: only a barrier goes unanswered
        finally:
            self.ignored.flush()
            if sender is not None:
                os.close(sender)

    def drain(self):
        """What is waiting in the inbox, a turn's worth (sdnotify.Inbox.receive_some)."""
        for message in self.inbox.receive_some(self.program.family):
            try:
                self.handle(message)
            except fds.OutOfDescriptors:
                raise  # ours, not the datagram's: said as such, and the end
            except Exception as error:  # no datagram may stop the watcher
                self.warn_once(("error", type(error)), f"ignored a notification: {error}")
            finally:
                fds.close_all(message.fds)

    def handle(self, message):
        if message.truncated:
            text = f"ignored a notification from pid {message.pid}: longer than {notifyproto.DATAGRAM_MAX} bytes"
            self.ignored.add("truncated", message.pid, text)
            return
        if not self.program.heads(message.lineage):
            # A sender gone before its datagram is read has no lineage: it could have been anyone.
            self.ignored.stranger(message, f"pid {self.program.pid} or below it")
            return
        notice = message.notice
        fields, main_pid = self.checked_main_pid(notice)
        sender = self.speaker()  # the main pid the supervisor knows until it reads this message
        extend = notifyproto.seconds(fields, "EXTEND_TIMEOUT_USEC")
        if extend is not None and self.deadline is not None and not self.ready:
            self.deadline, self.extended = max(self.deadline, time.monotonic() + extend), True
        pings = []
        if self.watchdog is not None:
            # Ours to enforce, so not for upstream: systemd would take them for its own watchdog's.
            pings = notifyproto.only(fields, ("WATCHDOG", "WATCHDOG_USEC"))
            fields = [field for field in fields if field not in pings]
            if notice.ready and not self.ready:
                pings.append(("READY", "1"))  # the first interval starts at readiness
        if notice.ready and not self.ready:
            self.ready = True
            self.close_inputs()
            self.ready_sender = message.pid
            self.main_pid = main_pid or self.main_pid  # a MAINPID= sent before READY=1 still holds
            relays = self.relays.describe()
            self.tell_ready(fields, sender)
            self.say("info", f"pid {self.main_pid} ready after {time.monotonic() - self.started:.3f} seconds; did: {relays}")
        else:
            self.main_pid = main_pid or self.main_pid
            self.relays.relay(fields, self.speaker(), sender, fds=message.fds if notice.fdstore else ())
        if pings:
            self.pinged(pings)

    def checked_main_pid(self, notice):
        """Return the fields with one MAINPID and that pid, if it names the program or a live process below it; else the
        fields without it and None."""
        text = notice.main_pid_text
        if text is None:
            return notice.fields, None
        kept = [(name, value) for name, value in notice.fields if name != "MAINPID"]
        pid = notice.main_pid
        if pid is not None and self.program.heads_pid(pid):
            return [*kept, ("MAINPID", str(pid))], pid
        self.warn_once(("mainpid", text), f"ignored MAINPID={text[:40]!r}: not pid {self.program.pid} or a live process below it")
        return kept, None

    def speaker(self):
        """The main pid, to send as, while it is still the program or below it; else None: we speak as ourselves."""
        return self.main_pid if self.program.heads_pid(self.main_pid) else None


class Ignored:
    """Says which notifications were not believed: a few lines and a few bytes kept, however many there are.

    In each period of IGNORED_PERIOD_SECONDS the first notification ignored
    for each reason (its kind) is said in full; the others are counted, with
    their senders (up to IGNORED_SENDERS_KEPT of them), and said in one line
    when the period ends, or sooner when the loop ends (flush).
    """

    def __init__(self, say, clock=time.monotonic):
        self.say, self.clock = say, clock
        self.period_ends = None  # None: no period going on
        self.kinds_said = set()
        self.count, self.counted_since, self.senders = 0, None, set()

    def stranger(self, message, believed):
        """message is from no one believed (believed says who would be: 'pid 12 or below it')."""
        why = message.unchecked or f"not {believed}"
        self.add(message.unchecked or "stranger", message.pid, f"ignored a notification from pid {message.pid}, {why}")

    def add(self, kind, pid, text):
        """One more notification ignored, of this kind, from pid (None: unknown); text says it in full."""
        self.flush_due()
        if self.period_ends is None:
            self.period_ends = self.clock() + IGNORED_PERIOD_SECONDS
        if kind not in self.kinds_said:
            self.kinds_said.add(kind)
            self.say("warning", text)
            return
        if not self.count:
            self.counted_since = self.clock()
        self.count += 1
        if pid is not None and len(self.senders) < IGNORED_SENDERS_KEPT:
            self.senders.add(pid)

    def due(self):
        """When a count waits to be said (time.monotonic()), or None."""
        return self.period_ends if self.count else None

    def flush_due(self):
        """At the end of a period, say its count; the next notification ignored begins a new one."""
        if self.period_ends is not None and self.clock() >= self.period_ends:
            self.flush()
            self.period_ends, self.kinds_said = None, set()

    def flush(self):
        """Say the count so far, if there is one."""
        if self.count:
            senders = counted(len(self.senders), "sender", or_more=len(self.senders) >= IGNORED_SENDERS_KEPT)
            seconds = self.clock() - self.counted_since
            self.say("warning", f"ignored {counted(self.count, 'more notification')} from {senders} in {seconds:.1f} seconds")
            self.count, self.senders = 0, set()


class ReadyPipe:
    """s6's notification fd, read: a newline the program writes there is readiness (s6-supervise(8)).

    What comes before the newline is ignored, as s6-supervise ignores it;
    end of file without one (every writer closed it, or exited) is not
    readiness, only the end of this way of saying it.
    """

    def __init__(self, fd, number):
        """fd: the read end, ours; number: the fd the program writes to, for the words said."""
        self.fd, self.words = fd, f"a newline on fd {number}"
        os.set_blocking(fd, False)

    def fds(self):
        return [] if self.fd is None else [self.fd]

    def take(self):
        """True once a newline was read; the pipe is then closed, as it is at end of file."""
        if self.fd is None:
            return False
        try:
            data = os.read(self.fd, PIPE_READ)
        except BlockingIOError:
            return False
        if b"\n" in data or not data:
            self.close()
        return b"\n" in data

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class ChildStops:
    """upstart's 'expect stop' for a child of ours: it stops itself with SIGSTOP once ready, and gets SIGCONT.

    Its parent learns of the stop with waitid(2) (WSTOPPED), woken by
    SIGCHLD; a stop by another signal (SIGTSTP from a terminal) is not
    readiness, and is left alone.
    """

    words = "its SIGSTOP"

    def __init__(self, pid, pidfd):
        self.pid, self.pidfd = pid, pidfd

    def fds(self):
        return []  # SIGCHLD wakes the watcher

    def take(self):
        """True if it stopped with SIGSTOP since the last look; it has then been sent SIGCONT."""
        try:
            info = os.waitid(os.P_PID, self.pid, os.WSTOPPED | os.WNOHANG)
        except ChildProcessError:
            return False
        if info is None or info.si_code != os.CLD_STOPPED or info.si_status != signal.SIGSTOP:
            return False
        proc.send_pidfd(self.pidfd, signal.SIGCONT)
        return True

    def close(self):
        pass


class TracedStops:
    """upstart's 'expect stop' for a program that is not our child (chain mode): traced until it stops itself.

    Only its parent could see it stop with waitid(2), and we are not that;
    so it is traced (kernel.trace) from before its exec until it is ready,
    and a SIGSTOP counts only if it sent it to itself. Then the stop is
    dropped as it is delivered, it is released, and sent SIGCONT, as
    upstart resumes it: it runs on at once.
    """

    words = "its SIGSTOP"

    def __init__(self, pid, pidfd, wakeup):
        """wakeup: the read end of the pipe SIGCHLD is written to, which tells us of its stops."""
        from fdlaunch.kernel import trace  # only --upstart in chain mode traces (tests/test_imports.py)

        self.trace = trace
        self.tracee, self.pidfd, self.wakeup = trace.Tracee(pid), pidfd, wakeup

    def fds(self):
        return []  # SIGCHLD wakes the watcher

    def take(self):
        if self.tracee.gone or self.tracee.take() != self.trace.STOPPED_ITSELF:
            return False
        self.close()
        proc.send_pidfd(self.pidfd, signal.SIGCONT)
        return True

    def close(self):
        """Release it; Fatal if it would not stop to be released within RELEASE_SECONDS (our exit releases it then)."""
        if self.tracee.gone:
            return
        if not self.tracee.release(self.wakeup, time.monotonic() + RELEASE_SECONDS):
            within = counted(RELEASE_SECONDS, "second")
            raise Fatal(f"pid {self.tracee.pid} did not stop to be released within {within}: traced until we exit")


class Check:
    """CMD run with /bin/sh until it exits 0: readiness polled from outside (s6-notifyoncheck(8)).

    One run at a time, in a session of its own so that a hung run is killed
    whole; the first run starts at once, the next interval seconds after the
    previous one ended. tries (0: no limit) failing runs make it give up.
    """

    def __init__(self, command, interval, timeout, tries, environ, say):
        self.command, self.interval, self.timeout, self.tries, self.say = command, interval, timeout, tries, say
        self.environ = {name: text for name, text in environ.items() if name not in NOT_FOR_CHECKS}
        self.next_at = time.monotonic()
        self.pid = self.pidfd = self.kill_at = None
        self.failures = 0
        self.end_state = None  # PASSED, GAVE_UP or STOPPED, once no run is to come
        self.warn_once = say_once(say)

    def fds(self):
        return [] if self.pidfd is None else [self.pidfd]

    def due(self):
        """When step() has something to do without being woken by the run's exit."""
        if self.over():
            return None
        return self.kill_at if self.pid is not None else self.next_at

    def step(self, main_pid):
        """Reap a finished run, kill an overdue one, start a due one; True once a run exited 0."""
        if self.over():
            return False
        now = time.monotonic()
        if self.pid is not None and select.select([self.pidfd], [], [], 0)[0]:
            return self.finished(self.end())
        if self.pid is not None and self.kill_at is not None and now >= self.kill_at:
            self.warn_once("hung", f"the check {self.command!r} ran longer than {counted(self.timeout, 'second')}; killed it")
            self.end()
            self.failed()
        elif self.pid is None and now >= self.next_at:
            self.start(main_pid)
        return False

    def start(self, main_pid):
        # No descriptor of the program's (its sockets); a session of its own, so that a hung run is killed whole.
        closed = sorted(fd for fd in fds.inheritable() if fd > 2)
        try:
            self.pid = shell(self.command, self.environ, main_pid, closed, setsid=True)
            self.pidfd = os.pidfd_open(self.pid)
        except OSError as error:
            self.give_up(f"unable to run the check {self.command!r}: {error.strerror}{link_order_hint()}")
            return
        self.kill_at = None if self.timeout is None else time.monotonic() + self.timeout

    def end(self):
        """Kill what is left of the run's session (the shell, still unreaped, pins the group id), reap it."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except OSError:
            pass
        status = os.waitpid(self.pid, 0)[1]
        os.close(self.pidfd)
        self.pid = self.pidfd = self.kill_at = None
        return status

    def finished(self, status):
        code = os.waitstatus_to_exitcode(status)
        if code == 0:
            self.end_state = PASSED
            return True
        if code in CANNOT_RUN:
            self.give_up(f"the check {self.command!r} cannot run: /bin/sh says {CANNOT_RUN[code]} (status {code}){link_order_hint()}")
            return False
        self.failed()
        return False

    def failed(self):
        self.failures += 1
        self.next_at = time.monotonic() + self.interval
        if self.tries and self.failures >= self.tries:
            self.give_up(f"the check {self.command!r} failed {counted(self.failures, 'time')}; gave up")

    def give_up(self, text):
        self.end_state = GAVE_UP
        self.say("warning", text)

    def stop(self):
        """No more runs: the program is ready by other means, or gone."""
        if self.pid is not None:
            self.end()
        self.end_state = self.end_state or STOPPED

    def over(self):
        return self.end_state is not None


def shell(command, environ, main_pid, closed=(), setsid=False):
    """Start CMD with /bin/sh, MAINPID in its environment, stdin /dev/null and stdout on our stderr; its pid."""
    actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0), (os.POSIX_SPAWN_DUP2, 2, 1)]
    actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in closed]
    environ = {**environ, "MAINPID": str(main_pid)}
    return os.posix_spawn("/bin/sh", ["sh", "-c", command], environ, file_actions=actions, setsid=setsid)


def failure_of(function, *arguments):
    """[] if function(*arguments) did its work, else [the Fatal it raised]."""
    try:
        function(*arguments)
    except Fatal as error:
        return [error]
    return []


def say_once(say):
    """warn_once(key, text): text as a warning the first time key is given, then never again for that key."""
    keys_said = set()

    def warn_once(key, text):
        if key not in keys_said:
            keys_said.add(key)
            say("warning", text)

    return warn_once


def link_order_hint():
    """Said when a check fails to run as a user other than root: the usual cause is the chain's order."""
    if os.geteuid() == 0:
        return ""
    return (
        f" as uid {os.geteuid()}; a check that needs other credentials than the daemon's goes before"
        " fdlaunch-setuidgid: fdlaunch-notify-wait --check=CMD -- fdlaunch-setuidgid USER PROG"
    )
