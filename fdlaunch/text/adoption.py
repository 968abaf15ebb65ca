"""Which passed socket a daemon's bind(2) gets: fdlaunch-adopt(1), MATCHING. Pure: values in, a decision out.

A bind is looked at in two steps, so that the common case costs little:
candidates() needs only the address the daemon asked for, and most binds
(an ephemeral port, an address nobody passed) stop there; decide() then
needs what the daemon's own socket is, which takes system calls to learn.
"""

import _socket as socket  # not socket.py: tests/test_imports.py
import errno
from collections import namedtuple

from fdlaunch.text.sockaddr import Inet, Local, is_path, is_wildcard

ADOPT, CONTINUE, REFUSE = "adopt", "continue", "refuse"

# A socket passed in, as the supervisor holds it: its label and fd there,
# family, type and protocol (SO_DOMAIN, SO_TYPE, SO_PROTOCOL), the address it
# is bound to (sockaddr.Inet or Local), IPV6_V6ONLY (False but for IPv6),
# and for a unix socket bound to a path, (st_dev, st_ino) of its file as
# found when fdlaunch-adopt started (None if there was none).
Offer = namedtuple("Offer", "label fd family type protocol address v6only file")
# The daemon's socket the bind is for: family, type, protocol, IPV6_V6ONLY,
# and whether it is bound already.
Target = namedtuple("Target", "family type protocol v6only bound")
# action: ADOPT (offer goes in at the daemon's fd), CONTINUE (the kernel does
# the bind), REFUSE (bind fails with error, an errno).
Decision = namedtuple("Decision", "action offer error", defaults=(None, 0))

LINK_LOCAL_PREFIX = b"\xfe\x80"  # fe80::/10, whose addresses mean something only with a scope


def candidates(address, offers, file_of):
    """The offers a bind to address may get, by the address alone (MATCHING, rules 1 to 4).

    file_of(path) is (st_dev, st_ino) of the file a unix path names as the
    daemon sees it, or None; it is called only when a passed unix socket has
    a file to compare with.
    """
    if isinstance(address, Inet):
        if address.port == 0:
            return []  # any free port: never one of ours
        return [o for o in offers if isinstance(o.address, Inet) and same_inet(o.address, address)]
    if isinstance(address, Local) and address.name:
        if not is_path(address):
            return [o for o in offers if o.address == address]
        with_files = [o for o in offers if o.file is not None]
        found = file_of(address.name) if with_files else None
        return [o for o in with_files if o.file == found] if found is not None else []
    return []


def same_inet(ours, asked):
    """The same family, host and port; the scope too for a link-local IPv6 host. A wildcard is only ever the same wildcard."""
    if (ours.family, ours.host, ours.port) != (asked.family, asked.host, asked.port):
        return False
    return ours.scope == asked.scope or not asked.host.startswith(LINK_LOCAL_PREFIX)


def decide(address, target, matching, held, strict):
    """What the bind gets, once its socket is known (MATCHING, rules 5 to 8).

    matching: candidates() of the address, not empty; held: the fds (ours)
    of the offers the daemon's process holds already, adopted or inherited.
    """
    family = socket.AF_UNIX if isinstance(address, Local) else address.family
    if target.family != family:
        return passed_over(address, strict)  # the kernel refuses a sockaddr of another family
    if target.bound:
        return Decision(REFUSE, error=errno.EINVAL) if strict else Decision(CONTINUE)  # bind(2): EINVAL, already bound
    dual = family == socket.AF_INET6 and is_wildcard(address)
    fitting = [o for o in matching if (o.type, o.protocol) == (target.type, target.protocol) and (not dual or o.v6only == target.v6only)]
    if not fitting:
        return passed_over(address, strict)
    free = [o for o in fitting if o.fd not in held]
    if not free:
        return Decision(REFUSE, error=errno.EADDRINUSE)  # its own socket holds the address: what the kernel would say
    return Decision(ADOPT, free[0])


def passed_over(address, strict):
    """A bind that gets no passed socket: it goes on, or with --strict fails (EACCES, or the kernel's errno for a bad address)."""
    if not strict:
        return Decision(CONTINUE)
    return Decision(REFUSE, error=address if isinstance(address, int) else errno.EACCES)
