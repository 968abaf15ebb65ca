"""Waiting for a program's READY=1 and relaying it, as fdlaunch-notify-wait does.

One loop serves both modes: it drains the private notify socket, believes
only the program and its descendants, hands readiness to the relays, and
returns when the program is ready, gone, or late.
"""

import os
import select
import signal
import time

from fdlaunch import notifyproto, sdnotify
from fdlaunch.errors import warn

READY, EXITED, LATE = "ready", "exited", "late"
LINGER_SECONDS = 0.1


def tell_s6(fd):
    """s6 readiness: a newline on the notification fd, then close it (s6-supervise(8))."""
    try:
        os.write(fd, b"\n")
    finally:
        os.close(fd)


class Relays:
    """Where readiness goes: an s6 notification fd, an upstream NOTIFY_SOCKET, a command, SIGSTOP."""

    def __init__(self, fd=None, upstream=None, command=None, stop=False, environ=None):
        self.fd, self.upstream, self.command, self.stop = fd, upstream, command, stop
        self.environ = environ or {}

    def ready(self, program, main_pid, fields):
        if self.stop:
            signal.pidfd_send_signal(program.pidfd, signal.SIGSTOP)  # upstart's 'expect stop'
        if self.fd is not None:
            tell_s6(self.fd)
            self.fd = None
        self.relay(fields, main_pid)
        if self.command:
            self.run_command(main_pid)

    def run_command(self, main_pid):
        """CMD under /bin/sh, its stdout on our stderr, waited for."""
        actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0), (os.POSIX_SPAWN_DUP2, 2, 1)]
        environ = {**self.environ, "MAINPID": str(main_pid)}
        pid = os.posix_spawn("/bin/sh", ["sh", "-c", self.command], environ, file_actions=actions)
        os.waitpid(pid, 0)

    def relay(self, fields, main_pid, fds=()):
        """Pass fields upstream, sent as main_pid: one the watcher checked is the program or below it, or None."""
        if self.upstream is None:
            return
        message = notifyproto.relay_message(fields, main_pid)
        if message is not None:
            # Claiming the program's pid lets NotifyAccess=main accept it; without privilege the
            # sender is us and the unit needs NotifyAccess=all.
            sdnotify.send(message, self.upstream, pid=main_pid, fds=fds)


class Program:
    """The process whose readiness is awaited: its pid, a pidfd on it."""

    def __init__(self, pid, pidfd):
        self.pid, self.pidfd = pid, pidfd

    def heads(self, lineage):
        """True if lineage (a process and its ancestors) runs through the program, not through a reuse of its pid."""
        return self.pid in lineage and sdnotify.pid_of(self.pidfd) == self.pid


class Watcher:
    def __init__(self, tool, inbox, program, relays, keep_relaying):
        self.tool, self.inbox, self.program, self.relays = tool, inbox, program, relays
        self.keep_relaying = keep_relaying
        self.ready = False
        self.main_pid = program.pid
        self.warned = set()

    def run(self, deadline=None):
        """Until ready (and, with keep_relaying, until the program is gone), gone, or deadline passes."""
        poller = select.poll()
        poller.register(self.inbox.fileno(), select.POLLIN)
        poller.register(self.program.pidfd, select.POLLIN)
        while True:
            wait_ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            events = dict(poller.poll(wait_ms))
            self.drain()  # before looking at an exit: a last datagram may be queued
            if self.ready and not self.keep_relaying:
                return READY
            if self.program.pidfd in events:
                return EXITED
            if deadline is not None and time.monotonic() >= deadline and not self.ready:
                return LATE

    def linger(self):
        """Answer the BARRIER a sender like systemd-notify sends right after READY=1.

        A watcher that left at once would make its barrier fail. Called after
        the relays, on the way out; the wait ends early once that sender is
        gone, and lasts LINGER_SECONDS at most.
        """
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
        finally:
            if sender is not None:
                os.close(sender)

    def drain(self):
        while (message := self.inbox.receive()) is not None:
            try:
                self.handle(message)
            except Exception as error:  # no datagram may stop the watcher
                self.warn_once(("error", type(error)), f"ignored a notification: {error}")
            finally:
                sdnotify.close_fds(message.fds)

    def handle(self, message):
        if message.truncated:
            self.warn_once(
                ("truncated", message.pid), f"ignored a notification from pid {message.pid}: longer than {notifyproto.DATAGRAM_MAX} bytes"
            )
            return
        if not self.program.heads(message.lineage):
            # A sender gone before its datagram is read has no lineage: it could have been anyone (issue 10).
            why = f"not pid {self.program.pid} or below it" if message.lineage else "gone before it could be checked"
            self.warn_once(("stranger", message.pid), f"ignored a notification from pid {message.pid}, {why}")
            return
        fields = self.checked_main_pid(message.fields)
        if notifyproto.is_ready(fields) and not self.ready:
            self.ready = True
            self.ready_sender = message.pid
            self.main_pid = notifyproto.main_pid(fields, self.program.pid)
            self.relays.ready(self.program, self.main_pid, fields)
        else:
            self.main_pid = notifyproto.main_pid(fields, self.main_pid)
            self.relays.relay(fields, self.speaker(), fds=self.fds_to_store(message))

    def fds_to_store(self, message):
        return message.fds if notifyproto.value(message.fields, "FDSTORE") == "1" else ()

    def checked_main_pid(self, fields):
        """fields with one MAINPID, if it names the program or a live process below it; else none (issue 10)."""
        text = notifyproto.value(fields, "MAINPID")
        if text is None:
            return fields
        kept = [(name, value) for name, value in fields if name != "MAINPID"]
        pid = notifyproto.pid_number(text)
        if pid is not None and self.program.heads(sdnotify.lineage_of(pid)):
            return [*kept, ("MAINPID", str(pid))]
        self.warn_once(("mainpid", text), f"ignored MAINPID={text[:40]!r}: not pid {self.program.pid} or a live process below it")
        return kept

    def speaker(self):
        """The main pid, to send as, while it is still the program or below it; else None: we speak as ourselves."""
        return self.main_pid if self.program.heads(sdnotify.lineage_of(self.main_pid)) else None

    def warn_once(self, key, text):
        if key not in self.warned:
            self.warned.add(key)
            warn(self.tool, "warning", text)
