"""The sockets fdlaunch-handoff gives its instances, as an Offer for each instance it starts.

Handed: what fdlaunch-handoff was passed, inherited as is. FromFile: those
too, plus the sockets of --listen-from=FILE, which it opens and holds
itself, re-reading FILE for every new instance. The decisions are
socketset's; this module reads the file, binds, and closes.
"""

import os
import stat
from collections import namedtuple

from fdlaunch.errors import Fatal, syscall_error
from fdlaunch.kernel import fds, sock
from fdlaunch.text import listenenv, socketset

# environ: the instance's environment (spawn adds NOTIFY_SOCKET, LISTEN_PID);
# moves: (our fd, the instance's fd) for every socket; held: the FILE's
# sockets, in FILE order; added: those opened for this offer; removed: those
# to close once the instance before it is gone; status: the STATUS= text.
Offer = namedtuple("Offer", "environ moves held added removed status")

# One socket opened from FILE: its spec, our fd, the fd an instance gets it
# on, the address bound (as printed), and the Opened that undoes it.
Held = namedtuple("Held", "spec fd slot address opened")


class Handed:
    """Without --listen-from: every instance inherits what we were handed, at the same fds."""

    names_the_set = False  # every offer is the same: nothing to say at each handoff

    def __init__(self, environ):
        self.environ = environ

    def offer(self):
        return Offer(self.environ, [], [], [], [], "serving")

    first = offer

    def commit(self, offer):
        pass

    def drop(self, held):
        pass

    def close(self):
        pass


class FromFile:
    """The handed sockets followed by FILE's, opened and held here; closed by close()."""

    names_the_set = True  # -v says what each new instance gets

    def __init__(self, path, environ, inherited, open_fds, systemd):
        self.path, self.environ, self.inherited, self.open_fds, self.systemd = path, environ, inherited, open_fds, systemd
        self.held = []  # what the serving instance has
        self.open = []  # every Opened not yet undone: held, offered, or waiting for an instance to go

    def first(self):
        offer = self.offer()
        self.commit(offer)
        return offer._replace(status=socketset.describe(len(self.inherited) + len(offer.held), [], []))

    def offer(self):
        """Read FILE, bind what it adds, and say what a new instance gets; Fatal with nothing left open."""
        wanted = socketset.parse_file(self.read(), self.path)
        old = [socketset.Slot(h.spec, h.slot) for h in self.held]
        change = socketset.diff(old, wanted, self.inherited, self.open_fds, self.systemd, fds.limit())
        ipv6 = sock.wildcard_is_dual_stack([wanted[i] for i in change.added])
        endpoints = {i: sock.resolve(wanted[i], ipv6) for i in change.added}  # every lookup before the first bind
        slots = change.layout.new_fds
        added = {}
        try:
            for i, endpoint in endpoints.items():
                added[i] = self.bind(endpoint, slots[i])
        except Fatal:
            self.drop(added.values())
            raise
        held = [added.get(i) for i in range(len(wanted))]
        for j, i in change.kept:
            held[i] = self.held[j]._replace(spec=wanted[i], slot=slots[i])
        layout = change.layout
        moves = layout.inherited_moves + [(h.fd, h.slot) for h in held]
        environ = listenenv.environment(self.environ, layout.passed, os.getpid(), self.systemd, layout.variables)
        removed = [self.held[j] for j in change.removed]
        status = socketset.describe(len(layout.passed), [added[i].address for i in change.added], [h.address for h in removed])
        return Offer(environ, moves, held, list(added.values()), removed, status)

    def read(self):
        try:
            # O_NONBLOCK: a FIFO in its place must not hang the loop (deaf to SIGTERM) at a reload
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
            with open(fd, encoding="utf-8", errors="surrogateescape") as file:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise Fatal(f"unable to read {self.path!r}: not a regular file")
                return file.read()
        except OSError as error:
            raise syscall_error(f"read {self.path!r}", error) from None

    def bind(self, endpoint, slot):
        opened = sock.Opened()
        self.open.append(opened)
        try:
            fd = opened.open(endpoint)
        except Fatal:
            self.drop_opened(opened)
            raise
        return Held(endpoint.spec, fd, slot, sock.describe(fd, endpoint.spec), opened)

    def commit(self, offer):
        """The instance given offer serves now."""
        self.held = offer.held

    def drop(self, held):
        """Close these sockets and remove the socket files we made for them."""
        for h in held:
            self.drop_opened(h.opened)

    def drop_opened(self, opened):
        if opened in self.open:
            self.open.remove(opened)
            opened.discard()

    def close(self):
        for opened in list(self.open):
            self.drop_opened(opened)
