"""A socket set read from a file, and what a reload changes in it. Pure: values in, values out.

fdlaunch-handoff --listen-from=FILE reads FILE (fdlaunch-listen's socket
specs, one a line) at start and at every reload. diff() compares the new
specs with the sockets the serving instance has and places the new set's
descriptors, keeping each socket that stays on the fd it had where it can.
"""

import re
from collections import namedtuple

from fdlaunch.errors import UsageError
from fdlaunch.text import fdplan, spec
from fdlaunch.text.listenenv import SYSTEMD_FIRST_FD

# A socket an instance gets: the spec it was opened for, the fd it is at in the instance.
Slot = namedtuple("Slot", "spec fd")

# kept: (old index, new index) pairs; added: new indexes; removed: old
# indexes; layout: the fdplan.Plan of the new set, new_fds in new-spec order.
Change = namedtuple("Change", "kept added removed layout")

# The options that only say how a socket is passed, not which socket it is.
PASSING = {"label": None, "fd": None, "var": None}


def parse_file(text, name):
    """FILE's text -> [Spec]: one spec a line; blank lines and comments skipped.

    A comment starts with '#' at the start of a line or after a blank, so
    '-unix:/run/a#b' keeps its '#'. A bad line raises UsageError naming it.
    """
    found = []
    for number, line in enumerate(text.split("\n"), 1):
        word = re.sub(r"(^|\s)#.*", "", line).strip()
        if not word:
            continue
        try:
            found.append(spec.parse(word))
        except UsageError as error:
            raise UsageError(f"{name!r}, line {number}: {error}") from None
    return found


def same_socket(old, new):
    """Whether two specs ask for the same socket: equal in everything but label=, fd= and var=."""
    return old._replace(**PASSING) == new._replace(**PASSING)


def diff(old, new, inherited, open_fds, systemd, fd_limit):
    """Old set (Slots) + new specs -> Change.

    A new spec that asks for the same socket as an old one keeps it (the
    first unmatched one, so repeated specs pair up in order), and its fd
    number too unless another spec claims it with fd= or, in the systemd
    convention, the number is past the end of the new, shorter set. Added
    sockets take the free numbers, lowest first. The plan refuses what
    fdlaunch-listen refuses (fd= outside the range, a slot held open).
    """
    unmatched = list(range(len(old)))
    kept, added = [], []
    for index, wanted in enumerate(new):
        match = next((j for j in unmatched if same_socket(old[j].spec, wanted)), None)
        if match is None:
            added.append(index)
        else:
            unmatched.remove(match)
            kept.append((match, index))
    claimed = {s.fd for s in new if s.fd is not None}
    lowest = SYSTEMD_FIRST_FD + len(inherited)
    highest = lowest + len(new) - 1
    pinned = list(new)
    for j, i in kept:
        fd = old[j].fd
        if new[i].fd is None and fd not in claimed and (not systemd or lowest <= fd <= highest):
            pinned[i] = new[i]._replace(fd=fd)
    layout = fdplan.plan(inherited, pinned, open_fds, systemd, fd_limit)
    return Change(kept, added, unmatched, layout)


def describe(count, added, removed):
    """The STATUS= text: 'serving 3 sockets; reloaded: +[::]:8443/tcp, -0.0.0.0:8080/tcp'."""
    text = f"serving {count} socket{'' if count == 1 else 's'}"
    changes = [f"+{address}" for address in added] + [f"-{address}" for address in removed]
    return f"{text}; reloaded: {', '.join(changes)}" if changes else text
