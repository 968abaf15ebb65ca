"""The fd store: descriptors a program hands over (FDSTORE=1) to be given to the programs after it.

As systemd keeps them for a service (sd_pid_notify_with_fds(3)): each
under a name (FDNAME=, 'stored' by default), passed behind the sockets to
every later instance, in both conventions of fdlaunch(7), and dropped on
FDSTOREREMOVE=1, or once it hangs up (POLLHUP or POLLERR) unless it was
stored with FDPOLL=0.
"""

import re
import select
from collections import namedtuple

from fdlaunch.kernel import fds as descriptors
from fdlaunch.text import listenenv

DEFAULT_NAME = "stored"  # systemd's name for a descriptor stored without FDNAME=

# One stored descriptor: its name, our fd (close-on-exec), whether a hang-up drops it.
Stored = namedtuple("Stored", "name fd poll")


class FdStore:
    """At most limit descriptors, kept in the order they came."""

    def __init__(self, limit):
        self.limit = limit
        self.entries = []

    def add(self, name, fds, poll):
        """Keep fds under name; the words of a refusal (every fd then closed), or None."""
        name = DEFAULT_NAME if name is None else name
        if not re.fullmatch(listenenv.LABEL, name):
            descriptors.close_all(fds)
            return f"FDNAME={name[:40]!r} is not a name (1 to 255 of A-Z a-z 0-9 . _ -)"
        if len(self.entries) + len(fds) > self.limit:
            descriptors.close_all(fds)
            return f"storing {len(fds)} more would pass --fdstore-max={self.limit} ({len(self.entries)} stored)"
        self.entries += [Stored(name, fd, poll) for fd in fds]
        return None

    def remove(self, name):
        """Drop and close every descriptor stored under name; how many there were."""
        gone = [entry for entry in self.entries if entry.name == name]
        self.drop(gone)
        return len(gone)

    def watched(self):
        """The fds whose hang-up drops them: a poll(2) for no event still reports POLLHUP and POLLERR."""
        return [entry.fd for entry in self.entries if entry.poll]

    def hung_up(self):
        """Drop the watched descriptors that hung up; their names, in order."""
        poller = select.poll()
        for fd in self.watched():
            poller.register(fd, 0)
        dead = {fd for fd, _ in poller.poll(0)}
        gone = [entry for entry in self.entries if entry.fd in dead]
        self.drop(gone)
        return [entry.name for entry in gone]

    def drop(self, gone):
        descriptors.close_all(entry.fd for entry in gone)
        self.entries = [entry for entry in self.entries if entry not in gone]

    def close(self):
        self.drop(list(self.entries))

    def handed(self, environ, moves, pid):
        """Return environ and moves for an instance that also gets every stored descriptor, behind its sockets.

        With the systemd convention (LISTEN_PID is pid) they follow the
        sockets at 3 + LISTEN_FDS, ...; otherwise they go above every fd the
        instance is handed. LISTEN_FD_MAP names them either way.
        """
        if not self.entries:
            return environ, moves
        result = dict(environ)
        systemd = listenenv.parse_systemd(environ, pid)
        if systemd or (environ.get("LISTEN_PID") == str(pid) and "LISTEN_FDS" in environ):
            first = listenenv.SYSTEMD_FIRST_FD + len(systemd)
        else:
            systemd = None
            passed = listenenv.inherited(environ, pid)
            first = max([2, *(p.fd for p in passed), *(wanted for _, wanted in moves)]) + 1
        stored = [listenenv.Passed(entry.name, first + index) for index, entry in enumerate(self.entries)]
        if systemd is not None:
            result["LISTEN_FDS"] = str(len(systemd) + len(stored))
            result["LISTEN_FDNAMES"] = ":".join(p.label for p in systemd + stored)
        result["LISTEN_FD_MAP"] = listenenv.format_map(listenenv.inherited(environ, pid) + stored)
        return result, [*moves, *((entry.fd, slot.fd) for entry, slot in zip(self.entries, stored, strict=True))]
