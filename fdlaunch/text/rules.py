"""fdlaunch-accept's access rules: a text file in, a decision per client out. Pure.

One rule a line, the first that matches decides (as tcprules(1) and
s6-tcpserver-access(8) do), and a client no rule matches is denied:

    # comment
    allow 127.0.0.0/8 GREETING=hi "MOTD=hello there"
    deny  10.1.2.3
    allow uid:1000
    allow gid:staff ROLE=staff
    deny  all

Words are split as a POSIX shell splits them (quotes keep spaces in a
value); the variables after the address are added to the handler's
environment for a client the rule allows.
"""

import ipaddress
import re
import shlex
from collections import namedtuple

from fdlaunch.errors import UsageError
from fdlaunch.text.numbers import is_decimal

ACTIONS = ("allow", "deny")
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# kind: 'ip' (value an ip_network), 'uid', 'gid' (value a number) or 'all'.
Rule = namedtuple("Rule", "line action kind value variables")
Rule.__doc__ = "One line of a rules file: what it matches, allow or deny, the variables it adds."

# The client, as the rules see it: ip an ip_address (None on a unix socket),
# uid and gid numbers (None on TCP), link the name of the interface a
# link-local (fe80::/10) client came through (None for any other).
Client = namedtuple("Client", "ip uid gid link", defaults=(None,))

Decision = namedtuple("Decision", "allowed variables line")
Decision.__doc__ = "allowed or not; variables to add; the line that decided (None: no rule matched)."


def parse(text, where, lookups=None):
    """The rules in text, in order; UsageError naming where, the line number and the fault.

    lookups resolves uid:NAME and gid:NAME (getpwnam, getgrnam); without it
    only numbers are accepted.
    """
    rules = []
    # Lines end at newlines only: str.splitlines() would also break at form feeds and U+2028.
    for number, line in enumerate(text.removesuffix("\n").split("\n"), 1):
        try:
            words = shlex.split(line, comments=True)
        except ValueError as error:
            raise UsageError(f"{where} line {number}: {line!r}: {error}") from None
        if words:
            rules.append(_rule(words, number, lookups, _fault_in(where, number, line)))
    return rules


def _fault_in(where, number, line):
    return lambda fault: f"{where} line {number}: {line!r}: {fault}"


def _rule(words, number, lookups, fault):
    action, *rest = words
    if action not in ACTIONS:
        raise UsageError(fault(f"{action!r} is not allow or deny"))
    if not rest:
        raise UsageError(fault("an address, uid:ID, gid:ID or 'all' must follow the action"))
    kind, value = _match(rest[0], lookups, fault)
    variables = {}
    for word in rest[1:]:
        name, equals, text = word.partition("=")
        if not equals or not NAME.fullmatch(name) or "\0" in text:
            raise UsageError(fault(f"{word!r} is not NAME=VALUE"))
        variables[name] = text
    if variables and action == "deny":
        raise UsageError(fault("a deny rule cannot add variables"))
    return Rule(number, action, kind, value, variables)


def _match(word, lookups, fault):
    if word == "all":
        return "all", None
    kind, colon, ident = word.partition(":")
    if colon and kind in ("uid", "gid"):
        return kind, _id(kind, ident, lookups, fault)
    try:
        network = ipaddress.ip_network(word, strict=True)
    except ValueError as error:
        raise UsageError(fault(f"{word!r} is not an address, a network (10.0.0.0/8, fd00::/8), uid:ID, gid:ID or 'all': {error}")) from None
    if zone_of(network) is not None:
        _check_zone(word, network, fault)
    return "ip", plain_network(network)


def zone_of(network):
    """The interface named after '%' in an IPv6 rule (fe80::1%eth0), or None."""
    return getattr(network.network_address, "scope_id", None)


def _check_zone(word, network, fault):
    """A zone names the link of a link-local address (RFC 4007), by interface name, as clients are matched by it."""
    zone = zone_of(network)
    if not (network.prefixlen >= 10 and network.network_address.is_link_local):
        raise UsageError(fault(f"{word!r}: a zone (%{zone}) only goes with a link-local address or network, in fe80::/10"))
    if is_decimal(zone):
        raise UsageError(
            fault(f"{word!r}: %{zone} is an interface number; name the interface instead, as 'ip link' shows it (fe80::1%eth0)")
        )
    if len(zone) > 15 or zone in (".", "..") or any(c in "/:" or c.isspace() or not c.isprintable() for c in zone):
        raise UsageError(fault(f"{word!r}: {zone!r} is not an interface name"))


def plain_network(network):
    """An IPv4-mapped network (::ffff:10.0.0.0/104) as the IPv4 one it maps: clients are seen as IPv4 (ucspi.plain_ip)."""
    mapped = network.network_address.ipv4_mapped if network.version == 6 and network.prefixlen >= 96 else None
    if mapped is None:
        return network
    return ipaddress.ip_network((mapped, network.prefixlen - 96))


def _id(kind, ident, lookups, fault):
    if is_decimal(ident) and len(ident) <= 10 and int(ident) < 2**32 - 1:
        return int(ident)
    if lookups is not None and ident:
        find = lookups.getpwnam if kind == "uid" else lookups.getgrnam
        try:
            entry = find(ident)
        except KeyError:
            pass
        else:
            return entry.pw_uid if kind == "uid" else entry.gr_gid
    what = "user" if kind == "uid" else "group"
    raise UsageError(fault(f"{ident!r} is not a {what} name or number"))


def decide(rules, client):
    """The first rule that matches client decides; no match denies."""
    for rule in rules:
        if _matches(rule, client):
            return Decision(rule.action == "allow", rule.variables, rule.line)
    return Decision(False, {}, None)


def _matches(rule, client):
    if rule.kind == "all":
        return True
    if rule.kind == "ip":
        if client.ip is None or client.ip.version != rule.value.version or client.ip not in rule.value:
            return False
        # The same link-local address may be on every link: a zoned rule matches only its own.
        zone = zone_of(rule.value)
        return zone is None or zone == client.link
    return (client.uid if rule.kind == "uid" else client.gid) == rule.value
