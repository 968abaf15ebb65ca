"""Overlapped restarts: instances of one program on the same sockets, handed over on a signal.

The Handoff loop waits in one poll(2) on everything that can happen: a
signal (written to a wakeup pipe by Python's signal machinery, so none is
lost between a check and the wait), a notification, an instance's exit (a
pidfd), a deadline. Each turn it takes in what happened, then acts.
"""

import os
import select
import signal
import time
from collections import namedtuple

from fdlaunch.errors import NOT_EXECUTABLE, Fatal, shown, unable
from fdlaunch.kernel import chain, fds, proc
from fdlaunch.loops import readiness

STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)

# reload: the signal that starts a handoff; stop: what a replaced instance
# gets; ready_timeout: seconds a new instance may take to be ready; grace:
# seconds a stopped one may take before SIGKILL; ready_fd: the s6
# notification fd, or None; main_pid_self: tell our own pid as MAINPID.
Settings = namedtuple("Settings", "reload stop ready_timeout grace ready_fd main_pid_self")


class Instance:
    def __init__(self, pid):
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.ready = False
        self.status = None  # wait status, once reaped
        self.kill_at = None  # when it gets SIGKILL, once asked to stop
        self.offer = None  # the sockets it was started with (listenfrom.Offer)

    def send(self, number):
        proc.send_pidfd(self.pidfd, number)

    def reap(self, wait=False):
        """Collect the exit status if it has exited (with wait, once it has); True once it has."""
        if self.status is None:
            pid, status = os.waitpid(self.pid, 0 if wait else os.WNOHANG)
            if pid == self.pid:
                self.status = status
                os.close(self.pidfd)
        return self.status is not None


def received_dispositions(numbers):
    """Which of these signals this process was started with ignored: the instances get the same."""
    return {number: signal.SIG_IGN if signal.getsignal(number) == signal.SIG_IGN else signal.SIG_DFL for number in numbers}


def spawn(path, argv, environ, dispositions, moves=(), become=None):
    """Start one instance (chain.spawn): it dies with us, with the signal dispositions we received.

    Fatal (126/127) if the exec fails. become, if given, runs in the child a
    program that is one of our own tools in that process (fusion).
    """
    parent = os.getpid()

    def setup():
        signal.set_wakeup_fd(-1)
        for number, disposition in dispositions.items():
            signal.signal(number, disposition)
        if not proc.die_with(parent):  # an instance left behind would hold the sockets
            os._exit(NOT_EXECUTABLE)

    pid = chain.spawn(path, argv, environ, setup, moves, become)
    try:
        return Instance(pid)
    except OSError as error:  # no pidfd (out of descriptors): an instance we cannot watch is stopped
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise unable(f"watch {shown(argv[0])} (pid {pid})", error) from None


class Handoff:
    """The loop that runs instances, hands over on the reload signal, and tells the supervisor."""

    def __init__(self, program, settings, sockets, inbox, upward, say, become=None):
        """sockets: a listenfrom.Handed or FromFile; upward(message, pid) tells the supervisor; say(kind, text)."""
        self.program, self.settings, self.sockets, self.inbox, self.upward = program, settings, sockets, inbox, upward
        self.say, self.become = say, become
        self.current = None
        self.candidate = None
        self.candidate_deadline = None
        self.retiring = []
        self.releasing = []  # (instance, sockets to close once it is gone)
        self.reload_pending = False
        self.stopping = False
        self.ready_fd = settings.ready_fd  # None once told
        self.dispositions = received_dispositions((*STOPS, settings.reload))
        self.wakeup_read = None
        self.family = proc.Family(os.getpid())  # the instances are our children
        self.ignored = readiness.Ignored(say)

    def run(self):
        """Until the current instance exits; returns its wait status."""
        self.wakeup_read = proc.catch_signals((*STOPS, self.settings.reload))
        self.current = self.start(self.sockets.first())
        while True:
            self.wait()
            self.take_signals()
            self.take_notifications()
            if self.current.reap():
                return self.finish()
            self.take_candidate_exit()
            self.take_deadlines()
            self.retiring = [old for old in self.retiring if not old.reap()]
            self.release()
            settled = self.candidate is None and not self.releasing  # sockets of the last one given back
            if self.reload_pending and settled and self.current.ready and not self.stopping:
                self.reload_pending = False
                self.begin_handoff()

    def start(self, offer):
        path = chain.find_program(self.program[0], offer.environ)
        environ = {**offer.environ, "NOTIFY_SOCKET": self.inbox.path}
        instance = spawn(path, self.program, environ, self.dispositions, offer.moves, self.become)
        instance.offer = offer
        return instance

    def wait(self):
        poller = select.poll()
        for fd in (self.wakeup_read, self.inbox.fileno(), *(i.pidfd for i in self.instances())):
            poller.register(fd, select.POLLIN)
        poller.poll(proc.poll_timeout(self.candidate_deadline, self.ignored.due(), *(old.kill_at for old in self.retiring)))

    def instances(self):
        return [i for i in (self.current, self.candidate, *self.retiring) if i is not None and i.status is None]

    def take_signals(self):
        for number in proc.caught_signals(self.wakeup_read):
            if number == self.settings.reload:
                if self.reload_pending or self.candidate is not None:
                    self.say("info", "reload signal during a handoff: one more handoff follows it")
                self.reload_pending = True
            elif number in STOPS:
                self.stopping = True
                for instance in self.instances():
                    instance.send(number)

    def take_notifications(self):
        """A turn's worth of what waits in the inbox (sdnotify.Inbox.receive_some): a flood never holds the loop.

        A notification that cannot be checked for want of descriptors is
        dropped and said: the instances go on serving.
        """
        try:
            for message in self.inbox.receive_some(self.family):
                fds.close_all(message.fds)
                self.take_notification(message)
        except fds.OutOfDescriptors as error:
            self.ignored.add("out of descriptors", None, f"{error}; it was dropped")
        self.ignored.flush_due()

    def take_notification(self, message):
        if self.family.top not in message.lineage:
            self.ignored.stranger(message, "an instance or below one")
            return
        if message.truncated:
            return
        sender = self.sender_of(message)
        if sender is None:
            return  # a stopping instance, or below it; None would pass for "no candidate" below
        ready = message.notice.ready
        if sender is self.candidate and ready and not self.candidate.ready:
            self.complete_handoff()
        elif sender is self.current and ready and not self.current.ready:
            self.current.ready = True
            self.tell_ready_first()

    def sender_of(self, message):
        """The instance a notification came from, by the sender's lineage; None for anyone else.

        A sender gone before its datagram was read has no lineage and counts
        for nobody: the socket is abstract, anyone could have sent it. An
        instance's pid cannot be reused: it is our child, not yet reaped.
        """
        for instance in (self.candidate, self.current):
            if instance is not None and instance.pid in message.lineage:
                return instance
        return None

    def take_candidate_exit(self):
        if self.candidate is not None and self.candidate.reap():
            self.fail_handoff(
                f"the new instance (pid {self.candidate.pid}) {chain.describe_exit(self.candidate.status)} before it was ready"
            )

    def take_deadlines(self):
        now = time.monotonic()
        if self.candidate is not None and self.candidate_deadline is not None and now >= self.candidate_deadline:
            self.retire(self.candidate)
            self.fail_handoff(f"the new instance (pid {self.candidate.pid}) was not ready after {self.settings.ready_timeout:g} seconds")
        for old in self.retiring:
            if old.kill_at is not None and now >= old.kill_at:
                old.send(signal.SIGKILL)
                old.kill_at = None

    def begin_handoff(self):
        self.say("info", f"handing over from pid {self.current.pid}")
        self.tell(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}\nSTATUS=starting a new instance", self.current)
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
        self.current, self.candidate, self.candidate_deadline = new, None, None
        self.sockets.commit(new.offer)
        self.tell(f"READY=1\nMAINPID={self.main_pid(new)}\nSTATUS={new.offer.status} (pid {new.pid}, took over from pid {old.pid})", old)
        self.retire(old)
        self.releasing.append((old, new.offer.removed))
        self.say("info", f"pid {new.pid} is ready; pid {old.pid} is stopping")

    def fail_handoff(self, reason):
        if self.candidate is not None:
            self.releasing.append((self.candidate, self.candidate.offer.added))
            self.release()
        self.candidate, self.candidate_deadline = None, None
        self.say("warning", f"handoff failed: {reason}; pid {self.current.pid} goes on serving")
        self.tell(
            f"READY=1\nMAINPID={self.main_pid(self.current)}\nSTATUS=handoff failed; pid {self.current.pid} still serving", self.current
        )

    def retire(self, instance):
        instance.send(self.settings.stop)
        instance.kill_at = time.monotonic() + self.settings.grace
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

    def tell_ready_first(self):
        current = self.current
        self.tell(f"READY=1\nMAINPID={self.main_pid(current)}\nSTATUS={current.offer.status} (pid {current.pid})", current)
        if self.ready_fd is not None:
            fd, self.ready_fd = self.ready_fd, None
            readiness.tell_supervisor(fd, self.say)

    def finish(self):
        """The current instance is gone: stop the others (grace, then SIGKILL) and return its status."""
        for instance in self.instances():
            if instance not in self.retiring:
                self.retire(instance)
        left = self.instances()
        proc.end_within([instance.pidfd for instance in left], self.settings.grace)
        for instance in left:
            instance.reap(wait=True)
        return self.current.status

    def main_pid(self, instance):
        """The pid the supervisor should treat as the service's: the serving instance, or us (--main-pid=self)."""
        return os.getpid() if self.settings.main_pid_self else instance.pid

    def tell(self, message, speaker):
        """A notification upward, sent with the credentials of the pid the supervisor knows as main."""
        self.upward(message, os.getpid() if self.settings.main_pid_self else speaker.pid)
