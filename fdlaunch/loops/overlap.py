"""Overlapped restarts: instances of one program on the same sockets, handed over on a signal.

The Handoff loop waits in one poll(2) on everything that can happen: a
signal (written to a wakeup pipe by Python's signal machinery, so none is
lost between a check and the wait), a notification, an instance's exit (a
pidfd), a deadline. Each turn it takes in what happened, then acts.
"""

import collections
import os
import select
import signal
import time

from fdlaunch.errors import Fatal, counted, quoted
from fdlaunch.kernel import chain, fds, proc
from fdlaunch.kernel.fdstore import FdStore
from fdlaunch.kernel.guard import PidfdGuard
from fdlaunch.loops import readiness
from fdlaunch.text import listenenv, notifyproto

STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
# What the serving instance says that goes on upward as it is (sd_notify(3)).
RELAYED = ("STATUS", "STOPPING", "ERRNO", "BUSERROR", "EXTEND_TIMEOUT_USEC")
# --respawn: this many exits nobody asked for within CRASH_WINDOW seconds is a
# crash loop (systemd's StartLimitBurst= and StartLimitIntervalSec= defaults).
CRASH_LIMIT = 5
CRASH_WINDOW = 10
FIRST_BACKOFF = 0.1  # seconds before the first respawn; doubled for each recent crash
# Once we are gone unannounced, how long the guard gives instances before SIGKILL (at most):
# the supervisor that restarts the service must find its sockets free.
ORPHAN_GRACE = 1.0

# reload: the signal that starts a handoff; stop: what a replaced instance
# gets; ready_timeout: seconds a new instance may take to be ready; grace:
# seconds a stopped one may take before SIGKILL; ready_fd: the s6
# notification fd, or None; main_pid_self: tell our own pid as MAINPID;
# respawn: replace a serving instance that exits unasked; fdstore_max: how
# many descriptors the fd store keeps (0: none); watchdog: seconds an instance
# may go without WATCHDOG=1 once ready (None: no watchdog of ours);
# relay_watchdog: our supervisor's WATCHDOG_USEC, whose pings the serving
# instance sends through us (None: not under a watchdog); upstart: the
# UPSTART_JOB an instance gets, which says it is ready by stopping itself
# with SIGSTOP (None: not so); instance_fd: the fd an instance writes its
# readiness newline to (None: none), instance_fd_var: the variable that
# tells it that number (None: none).
Settings = collections.namedtuple(
    "Settings",
    "reload stop ready_timeout grace ready_fd main_pid_self respawn fdstore_max watchdog relay_watchdog"
    " upstart instance_fd instance_fd_var",
    defaults=(None, None, None),
)


class Instance(proc.Child):
    """A child of ours running the program: what it said, what it was given, when it is due to be stopped."""

    def __init__(self, pid):
        super().__init__(pid)
        self.ready = False
        self.kill_at = None  # when it gets SIGKILL, once asked to stop
        self.asked = None  # (signal, when) it was first asked to stop with
        self.offer = None  # the sockets it was started with (listenfrom.Offer)
        self.watchdog = None  # seconds allowed between two WATCHDOG=1, once ready
        self.ping_due = None  # when its next WATCHDOG=1 is due
        self.replaced = None  # the pid of the serving instance it replaced, when it was respawned
        self.inputs = []  # how it says it is ready besides READY=1, until it has (readiness.ReadyPipe, ChildStops)

    def ask_to_stop(self, number, grace):
        """Send number; SIGKILL falls due grace seconds after the first request, and no later request moves it."""
        self.send(number)
        if self.asked is None:
            self.asked = (number, time.monotonic())
            self.kill_at = time.monotonic() + grace
            self.ping_due = None

    def pinged(self, seconds=None):
        """Ready, or a WATCHDOG=1 (with seconds, a new interval): once ready, the next ping is due an interval from now."""
        if seconds is not None:
            self.watchdog = seconds
        if self.watchdog is not None and self.ready and self.asked is None:
            self.ping_due = time.monotonic() + self.watchdog

    def reap(self, wait=False):
        """Collect the exit status if it has exited (with wait, once it has); True once it has."""
        if self.status is None and super().reap(wait):
            self.kill_at = self.ping_due = None
            self.close_inputs()
        return self.status is not None

    def close_inputs(self):
        """It is ready, or gone: its other ways of saying so are not read any more (its pipe closed)."""
        for source in self.inputs:
            source.close()
        self.inputs = []

    def input_fds(self):
        return [fd for source in self.inputs for fd in source.fds()]

    def said_ready(self):
        """True if it said it is ready one of its other ways since the last look (its newline, its SIGSTOP)."""
        return any(source.take() for source in self.inputs)


class Handoff:
    """The loop that runs instances, hands over on the reload signal, and tells the supervisor."""

    def __init__(self, program, settings, sockets, inbox, upstream, say, guard_say):
        """program: a chain.Program; sockets: a listenfrom.Handed or FromFile; upstream: our own supervisor's
        NOTIFY_SOCKET, or None; say(kind, text), guard_say for the guard."""
        self.program, self.settings, self.sockets, self.inbox, self.upstream = program, settings, sockets, inbox, upstream
        self.say, self.guard_say = say, guard_say
        self.guard = None
        self.known_main = os.getpid()  # the main pid the supervisor knows, as told (or not yet: it started us)
        self.current = None
        self.candidate = None
        self.candidate_deadline = None
        self.retiring = []
        self.releasing = []  # (instance, sockets to close once it is gone)
        self.reload_pending = False
        self.merged = 0  # reload signals taken into the handoff to come
        self.stopping = False
        self.respawn_at = None  # when the serving instance, gone unasked, is replaced
        self.crashes = collections.deque()  # when serving instances exited unasked, the last CRASH_WINDOW seconds
        self.ready_fd = settings.ready_fd  # None once told
        self.store = FdStore(settings.fdstore_max)
        self.dispositions = proc.received_dispositions((*STOPS, settings.reload))
        self.warned = set()  # warnings said once per run
        self.wakeup_read = None
        self.family = proc.Family(os.getpid())  # the instances are our children
        self.ignored = readiness.Ignored(say)

    def run(self):
        """Until the serving instance has exited and no other is left; returns the serving one's wait status."""
        # SIGCHLD: an instance that says it is ready by stopping itself (--upstart) is seen with waitid(2).
        wakes = (signal.SIGCHLD,) if self.settings.upstart is not None else ()
        self.wakeup_read = proc.catch_signals((*STOPS, self.settings.reload, *wakes))
        # Instances that dropped privileges lose their parent death signal: the guard stops them if we die.
        self.guard = PidfdGuard(self.guard_say, min(self.settings.grace, ORPHAN_GRACE), "its instances")
        try:
            self.current = self.start(self.sockets.first())
            while self.instances() or self.respawn_at is not None:
                self.wait()
                self.take_signals()
                self.take_notifications()
                self.take_inputs()
                self.take_exits()
                self.take_deadlines()
                self.release()
                if self.reload_pending and self.can_hand_over():
                    self.reload_pending = False
                    self.begin_handoff()
            return self.current.status
        finally:
            self.store.close()
            self.guard.dismiss()

    def can_hand_over(self):
        """A serving instance that is ready, no handoff under way, the sockets of the last one given back, no stop."""
        settled = self.candidate is None and not self.releasing
        return settled and self.current.status is None and self.current.ready and not self.stopping

    def start(self, offer):
        environ, moves = self.store.handed(offer.environ, offer.moves, os.getpid())
        environ = {**environ, **self.watchdog_environment(), **self.inputs_environment(), "NOTIFY_SOCKET": self.inbox.path}
        ready_pipe = self.ready_pipe(environ, moves)
        moves = moves if ready_pipe is None else [*moves, (ready_pipe[1], self.settings.instance_fd)]
        try:
            instance = proc.start_child(self.program, environ, self.dispositions, moves, kind=Instance)
        except Fatal:
            fds.close_all(ready_pipe or ())
            raise
        if ready_pipe is not None:
            os.close(ready_pipe[1])  # the instance's alone: its end of file is the instance's
        self.guard.hand({instance.pid: os.getpid()})
        instance.offer = offer
        instance.watchdog = self.settings.watchdog
        if ready_pipe is not None:
            instance.inputs.append(readiness.ReadyPipe(ready_pipe[0], self.settings.instance_fd))
        if self.settings.upstart is not None:
            instance.inputs.append(readiness.ChildStops(instance.pid, instance.pidfd))
        return instance

    def inputs_environment(self):
        """UPSTART_JOB and --ready-fd-var's variable, for an instance that says it is ready those ways."""
        environ = {} if self.settings.upstart is None else {"UPSTART_JOB": self.settings.upstart}
        if self.settings.instance_fd_var is not None:
            environ[self.settings.instance_fd_var] = str(self.settings.instance_fd)
        return environ

    def ready_pipe(self, environ, moves):
        """The pipe an instance writes its readiness newline to (--ready-fd), or None; Fatal if its fd is taken.

        Its fd must be free in the instance: not a socket or stored
        descriptor it is handed, where it is handed it.
        """
        number = self.settings.instance_fd
        if number is None:
            return None
        handed = {wanted for _, wanted in moves} | {p.fd for p in listenenv.inherited(environ, os.getpid())}
        if number in handed:
            raise Fatal(f"--ready-fd={number}: the new instance gets a socket or a stored descriptor on fd {number}; give a free one")
        try:
            return os.pipe2(os.O_CLOEXEC)
        except OSError as error:
            raise fds.syscall_error(f"make the readiness pipe of {quoted(self.program[0])}", error) from None

    def watchdog_environment(self):
        """WATCHDOG_USEC and WATCHDOG_PID for an instance (spawn makes the pid its own) when a watchdog watches it."""
        interval = self.settings.relay_watchdog
        if interval is None and self.settings.watchdog is not None:
            interval = str(int(self.settings.watchdog * 1e6))
        return {} if interval is None else {"WATCHDOG_USEC": interval, "WATCHDOG_PID": str(os.getpid())}

    def wait(self):
        poller = select.poll()
        for fd in (self.wakeup_read, self.inbox.fileno(), *(i.pidfd for i in self.instances())):
            poller.register(fd, select.POLLIN)
        for fd in (fd for instance in self.instances() for fd in instance.input_fds()):
            poller.register(fd, select.POLLIN)
        for fd in self.store.watched():
            poller.register(fd, 0)  # POLLHUP and POLLERR: a stored connection that hung up
        deadlines = [self.candidate_deadline, self.respawn_at, *(i.kill_at for i in self.instances())]
        poller.poll(proc.poll_timeout(*deadlines, *(i.ping_due for i in self.instances()), self.ignored.due()))

    def instances(self):
        return [i for i in (self.current, self.candidate, *self.retiring) if i is not None and i.status is None]

    def take_signals(self):
        for number in proc.caught_signals(self.wakeup_read):
            if number == self.settings.reload:
                if self.reload_pending or self.candidate is not None:
                    self.merged += 1
                    self.say("info", "reload signal during a handoff: one more handoff follows it")
                self.reload_pending = True
            elif number in STOPS:
                self.stop(number)

    def stop(self, number):
        """The service is stopping: every instance gets number, then SIGKILL once --grace has passed since the first stop."""
        self.stopping = True
        self.candidate_deadline = self.respawn_at = None  # a candidate is being stopped, not awaited; nothing is replaced
        for instance in self.instances():
            instance.ask_to_stop(number, self.settings.grace)

    def take_notifications(self):
        """A turn's worth of what waits in the inbox (sdnotify.Inbox.receive_some): a flood never holds the loop.

        A notification that cannot be checked for want of descriptors is
        dropped and said: the instances go on serving.
        """
        try:
            for message in self.inbox.receive_some(self.family):
                kept = []
                try:
                    kept = self.take(message)
                finally:
                    fds.close_all(fd for fd in message.fds if fd not in kept)
        except fds.OutOfDescriptors as error:
            self.ignored.add("out of descriptors", None, f"{error}; it was dropped")
        self.ignored.flush_due()
        for name in self.store.hung_up():
            self.say("info", f"dropped the stored descriptor {name!r}: it hung up")

    def take(self, message):
        """Act on one notification; the descriptors of it that the fd store kept."""
        if self.family.top not in message.lineage:
            self.ignored.stranger(message, "an instance or below one")
            return []
        if message.truncated:
            return []
        sender = self.sender_of(message)
        if sender is None or self.stopping:
            return []  # not an instance (None would pass for "no candidate" below), or nothing to hand over to
        notice = message.notice
        if notice.ready and not sender.ready:
            self.instance_ready(sender)
        self.take_watchdog(sender, notice.fields)
        extend = notifyproto.seconds(notice.fields, "EXTEND_TIMEOUT_USEC")
        if extend is not None and sender is self.candidate and self.candidate_deadline is not None:
            self.candidate_deadline = max(self.candidate_deadline, time.monotonic() + extend)
        # The serving instance's words go upward; of a new one's, only a longer start.
        relayed = notifyproto.only(notice.fields, RELAYED if sender is self.current else ("EXTEND_TIMEOUT_USEC",))
        if relayed and sender in (self.current, self.candidate):
            self.tell(notifyproto.message(relayed).decode(errors="replace"))
        return self.take_fdstore(sender, notice, message.fds)

    def take_inputs(self):
        """A new or serving instance not yet ready that says so its other ways (--ready-fd, --upstart)."""
        for instance in (self.candidate, self.current):
            # Looked at while stopping too: one that stopped itself is continued, so that it can act on its stop signal.
            if instance is not None and instance.status is None and not instance.ready and instance.said_ready() and not self.stopping:
                self.instance_ready(instance)

    def instance_ready(self, instance):
        """instance is ready (its READY=1, its newline, its SIGSTOP): the new one takes over, or the serving one is told upward."""
        instance.close_inputs()
        if instance is self.candidate:
            self.complete_handoff()
        elif instance is self.current:
            instance.ready = True
            instance.pinged()
            self.tell_ready(instance)

    def take_watchdog(self, sender, fields):
        """WATCHDOG=1 and WATCHDOG_USEC=: relayed upward from the serving instance, or kept to ourselves."""
        ping = notifyproto.value(fields, "WATCHDOG")
        interval = notifyproto.seconds(fields, "WATCHDOG_USEC")
        if self.settings.relay_watchdog is not None:
            relayed = notifyproto.only(fields, ("WATCHDOG", "WATCHDOG_USEC"))
            if relayed and sender is self.current:
                self.tell(notifyproto.message(relayed).decode(errors="replace"))
            return
        if ping == "trigger" and sender in (self.current, self.candidate):
            self.bark(sender, "asked for it with WATCHDOG=trigger")
        elif ping == "1" or interval is not None:
            sender.pinged(interval)

    def take_fdstore(self, sender, notice, received):
        """FDSTORE=1 (with FDNAME=, FDPOLL=) keeps the descriptors; FDSTOREREMOVE=1 drops those of FDNAME=. The fds kept."""
        name = notifyproto.value(notice.fields, "FDNAME")
        if notifyproto.value(notice.fields, "FDSTOREREMOVE") == "1" and name is not None:
            self.say("info", f"pid {sender.pid} removed {counted(self.store.remove(name), 'stored descriptor')} named {name!r}")
        if not (notice.fdstore and received):
            return []
        if self.settings.fdstore_max == 0:
            self.warn_once("fdstore", f"ignored FDSTORE=1 from pid {sender.pid}: the fd store is off (--fdstore-max=0)")
            return []
        refusal = self.store.add(name, list(received), notifyproto.value(notice.fields, "FDPOLL") != "0")
        if refusal is not None:
            self.say("warning", f"refused FDSTORE=1 from pid {sender.pid}: {refusal}; closed what it sent")
            return list(received)  # closed already
        self.say("info", f"pid {sender.pid} stored {counted(len(received), 'descriptor')} as {name or 'stored'!r}")
        return list(received)

    def sender_of(self, message):
        """The instance a notification came from, by the sender's lineage; None for anyone else.

        A sender gone before its datagram was read has no lineage and counts
        for nobody: the socket is abstract, anyone could have sent it. An
        instance's pid cannot be reused: it is our child, not yet reaped.
        """
        for instance in (self.candidate, self.current, *self.retiring):
            if instance is not None and instance.status is None and instance.pid in message.lineage:
                return instance
        return None

    def take_exits(self):
        """Reap what has exited. The serving instance gone unasked: replaced (--respawn), or the service ends."""
        if self.current.status is None and self.current.reap() and not self.stopping:
            self.serving_instance_exited()
        if self.candidate is not None and self.candidate.reap() and not self.stopping:
            self.fail_handoff(
                f"the new instance (pid {self.candidate.pid}) {chain.describe_exit(self.candidate.status)} before it was ready"
            )
        self.retiring = [old for old in self.retiring if not old.reap()]

    def serving_instance_exited(self):
        gone = self.current
        how = f"pid {gone.pid} {chain.describe_exit(gone.status)}"
        now = time.monotonic()
        self.crashes.append(now)
        while self.crashes[0] < now - CRASH_WINDOW:
            self.crashes.popleft()
        if not self.settings.respawn or len(self.crashes) >= CRASH_LIMIT:
            if self.settings.respawn:
                self.say("warning", f"{how}: {counted(len(self.crashes), 'exit')} within {CRASH_WINDOW} seconds; giving up")
            self.stop(self.settings.stop)
            return
        if self.candidate is not None:
            self.reload_pending = True  # handed over once the replacement is ready
            self.retire(self.candidate)
            self.fail_handoff("the serving instance exited")
        delay = FIRST_BACKOFF * 2 ** (len(self.crashes) - 1)
        self.respawn_at = now + delay
        self.say("warning", f"{how}; starting a new instance in {delay:g} seconds")
        self.tell(f"STATUS={how}; starting a new instance in {delay:g} seconds")

    def respawn(self):
        gone = self.current
        self.respawn_at = None
        try:
            self.current = self.start(gone.offer)
        except Fatal as error:
            self.say("warning", f"unable to replace pid {gone.pid}: {error}")
            self.current = gone  # its status stands as the service's
            self.stop(self.settings.stop)
            return
        self.current.replaced = gone.pid
        self.say("info", f"pid {self.current.pid} replaces pid {gone.pid}")

    def take_deadlines(self):
        now = time.monotonic()
        if self.respawn_at is not None and now >= self.respawn_at:
            self.respawn()
        if self.candidate is not None and self.candidate_deadline is not None and now >= self.candidate_deadline:
            self.retire(self.candidate)
            late = counted(self.settings.ready_timeout, "second")
            self.fail_handoff(f"the new instance (pid {self.candidate.pid}) was not ready after {late}")
        for instance in self.instances():
            if instance.ping_due is not None and now >= instance.ping_due:
                self.bark(instance, f"sent no WATCHDOG=1 for {counted(instance.watchdog, 'second')}")
            if instance.kill_at is not None and now >= instance.kill_at:
                instance.kill_at = None
                instance.send(signal.SIGKILL)
                number, asked = instance.asked
                self.say(
                    "warning",
                    f"pid {instance.pid} ({self.role(instance)}) was still running {now - asked:.1f} seconds after "
                    f"{signal.Signals(number).name}; sent it SIGKILL",
                )

    def bark(self, instance, why):
        """The watchdog: SIGABRT (a core for the admin), SIGKILL after --grace; its exit is then a crash like any other."""
        self.say("warning", f"pid {instance.pid} ({self.role(instance)}) {why}; sending it SIGABRT")
        instance.ask_to_stop(signal.SIGABRT, self.settings.grace)

    def role(self, instance):
        if instance is self.current:
            return "the serving instance"
        if instance is self.candidate:
            return "the new instance"
        return "an old instance" if instance.ready else "a new instance that failed"

    def begin_handoff(self):
        merged = f"; {counted(self.merged, 'reload signal')} that came meanwhile are merged into this one" if self.merged else ""
        self.merged = 0
        self.say("info", f"handing over from pid {self.current.pid}{merged}")
        self.tell(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}\nSTATUS=starting a new instance")
        try:
            offer = self.sockets.offer()
        except Fatal as error:
            self.fail_handoff(str(error))
            return
        if self.sockets.names_the_set:
            self.say("info", f"the new instance gets: {offer.status}")
        try:
            self.candidate = self.start(offer)
        except Fatal as error:
            self.sockets.drop(offer.added)
            self.candidate = None
            self.fail_handoff(str(error))
            return
        self.candidate_deadline = time.monotonic() + self.settings.ready_timeout

    def complete_handoff(self):
        old, new = self.current, self.candidate
        new.ready = True
        new.pinged()
        self.current, self.candidate, self.candidate_deadline = new, None, None
        self.sockets.commit(new.offer)
        main = self.main_pid(new)
        self.tell(f"READY=1\nMAINPID={main}\nSTATUS={new.offer.status} (pid {new.pid}, took over from pid {old.pid})", main)
        self.retire(old)
        self.releasing.append((old, new.offer.removed))
        self.say("info", f"pid {new.pid} is ready; pid {old.pid} is stopping")

    def fail_handoff(self, reason):
        if self.candidate is not None:
            self.releasing.append((self.candidate, self.candidate.offer.added))
            self.release()
        self.candidate, self.candidate_deadline = None, None
        if self.current.status is not None:
            return  # the serving instance is gone too: nothing goes on serving, said by whoever ends or replaces it
        self.say("warning", f"handoff failed: {reason}; pid {self.current.pid} goes on serving")
        main = self.main_pid(self.current)
        self.tell(f"READY=1\nMAINPID={main}\nSTATUS=handoff failed; pid {self.current.pid} still serving", main)

    def retire(self, instance):
        instance.ask_to_stop(self.settings.stop, self.settings.grace)
        self.retiring.append(instance)

    def release(self):
        """Close the sockets a reload removed (or a failed one added) once the instance that had them is gone."""
        waiting = []
        for instance, held in self.releasing:
            if instance.reap():
                self.sockets.drop(held)
            else:
                waiting.append((instance, held))
        self.releasing = waiting

    def tell_ready(self, instance):
        """The serving instance is ready: at start, or as the replacement of one that exited."""
        after = "" if instance.replaced is None else f", replacing pid {instance.replaced}"
        main = self.main_pid(instance)
        self.tell(f"READY=1\nMAINPID={main}\nSTATUS={instance.offer.status} (pid {instance.pid}{after})", main)
        if self.ready_fd is not None:
            fd, self.ready_fd = self.ready_fd, None
            readiness.tell_supervisor(fd, self.say)

    def warn_once(self, key, text):
        if key not in self.warned:
            self.warned.add(key)
            self.say("warning", text)

    def main_pid(self, instance):
        """The pid the supervisor should treat as the service's: us (--main-pid=self), or the serving instance."""
        return os.getpid() if self.settings.main_pid_self else instance.pid

    def tell(self, message, main_pid=None):
        """A notification upward, main_pid the MAINPID= it names, if any.

        It is sent with the credentials of the pid the supervisor knows as the
        main one until it reads it (at first us, who it started): its default
        NotifyAccess=main believes no other.
        """
        readiness.tell_upstream(self.upstream, message.encode(errors="surrogateescape"), self.say, self.known_main)
        if main_pid is not None:
            self.known_main = main_pid
