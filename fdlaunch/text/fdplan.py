"""Where each passed descriptor ends up. Pure: open fds and limits are arguments.

Everything that can be refused is refused here, before any socket is opened.
"""

import re
from collections import namedtuple

from fdlaunch.errors import Fatal, UsageError
from fdlaunch.text.listenenv import LABEL, SYSTEMD_FIRST_FD, VARIABLES, Passed
from fdlaunch.text.spec import VARIABLE

# The chain for a daemon that reads only LISTEN_FDS under s6 with notification-fd 3: fd 3 is s6's, the sockets go above it.
S6_SYSTEMD_RECIPE = "fdlaunch-listen --map SPEC... -- fdlaunch-notify-wait --fd=3 -- fdlaunch-fdmap --systemd -- PROG"

# One socket this run opens: its spec, the fd it is passed at, and, as the
# run gets to them, its endpoint (the spec with its names looked up) and
# the descriptor it was opened on, before it moves to fd.
Socket = namedtuple("Socket", "spec fd endpoint opened", defaults=(None, None))


class Plan(namedtuple("Plan", "passed inherited_moves new variables")):
    """passed: Passed, in the order the environment lists them; inherited_moves:
    (fd now, fd wanted) for each inherited socket; new: a Socket per spec, in
    spec order; variables: var= name -> fd."""

    __slots__ = ()

    @property
    def new_fds(self):
        return [s.fd for s in self.new]

    def new_at(self, fd):
        """The Socket this run puts at fd, or None for an inherited one."""
        return next((s for s in self.new if s.fd == fd), None)


def plan(inherited, specs, open_fds, systemd, fd_limit):
    """Place inherited sockets and one new socket per spec.

    systemd=True: everything at 3, 4, ... (inherited first, then the specs;
    fd=N picks the slot), refusing any slot held by a descriptor that was not
    passed in. systemd=False (--map): nothing open is touched; fd=N must be
    free and the rest take the lowest free fds.
    """
    _refuse_repeats(specs, "fd")
    _refuse_repeats(specs, "var")
    if systemd:
        moves, new_fds = _systemd_slots(inherited, specs, open_fds)
    else:
        moves, new_fds = [], _free_slots(inherited, specs, open_fds)
    new = [Socket(spec, fd) for spec, fd in zip(specs, new_fds, strict=True)]
    for spec, fd, _, _ in new:
        if fd >= fd_limit:
            raise Fatal(f"unable to place {spec.address()} at fd {fd}: beyond the open files limit ({fd_limit}); raise it with ulimit -n")
    passed = [Passed(p.label, to) for p, (_, to) in zip(inherited, moves, strict=True)] if systemd else list(inherited)
    passed += [Passed(s.spec.name, s.fd) for s in new]
    if systemd:
        passed.sort(key=lambda p: p.fd)
    variables = {s.spec.var: s.fd for s in new if s.spec.var}
    return Plan(passed, moves, new, variables)


def _systemd_slots(inherited, specs, open_fds):
    first_new = SYSTEMD_FIRST_FD + len(inherited)
    last = SYSTEMD_FIRST_FD + len(inherited) + len(specs) - 1
    for spec in specs:
        if spec.fd is not None and not first_new <= spec.fd <= last:
            raise UsageError(
                f"fd={spec.fd} for {spec.address()} is outside {first_new}..{last}, where the systemd "
                f"convention puts this run's sockets; use --map to place sockets anywhere"
            )
    fixed = {spec.fd for spec in specs if spec.fd is not None}
    free = iter(fd for fd in range(first_new, last + 1) if fd not in fixed)
    new_fds = [spec.fd if spec.fd is not None else next(free) for spec in specs]
    moves = [(p.fd, SYSTEMD_FIRST_FD + index) for index, p in enumerate(inherited)]
    ours = {p.fd for p in inherited}
    for fd in range(SYSTEMD_FIRST_FD, last + 1):
        if fd in open_fds and fd not in ours:
            raise UsageError(
                f"fd {fd} is already open and is not a socket passed in; the systemd convention "
                f"needs fds {SYSTEMD_FIRST_FD}..{last}: use --map to leave open descriptors alone "
                f"(under s6, for a daemon that reads only LISTEN_FDS: {S6_SYSTEMD_RECIPE})"
            )
    return moves, new_fds


def _free_slots(inherited, specs, open_fds):
    taken = set(open_fds) | {p.fd for p in inherited}
    for spec in specs:
        if spec.fd in taken:
            raise UsageError(f"fd={spec.fd} for {spec.address()} is already open; --map never overwrites an open descriptor")
    taken |= {spec.fd for spec in specs if spec.fd is not None}
    new_fds = []
    candidate = SYSTEMD_FIRST_FD
    for spec in specs:
        if spec.fd is not None:
            new_fds.append(spec.fd)
            continue
        while candidate in taken:
            candidate += 1
        new_fds.append(candidate)
        taken.add(candidate)
    return new_fds


def _refuse_repeats(specs, option):
    owner = {}
    for spec in specs:
        value = getattr(spec, option)
        if value is None:
            continue
        if value in owner:
            raise UsageError(f"{option}={value} is given to both {owner[value].address()} and {spec.address()}")
        owner[value] = spec


def choose(passed, order):
    """The sockets named in order (all with each label, as received), or all of them without order."""
    if order is None:
        return list(passed)
    labels = order.split(",")
    for label in labels:
        if not re.fullmatch(LABEL, label):
            raise UsageError(f"--order={order!r}: {label!r} is not a label")
        if labels.count(label) > 1:
            raise UsageError(f"--order={order!r} names {label!r} twice")
        if not any(p.label == label for p in passed):
            raise UsageError(
                f"--order={order!r}: no socket labelled {label!r} was passed (passed: {', '.join(p.label for p in passed) or 'none'})"
            )
    return [p for label in labels for p in passed if p.label == label]


def systemd_moves(chosen, open_fds, handed):
    """Return the moves (fd now, fd wanted) that put chosen at 3, 4, ...; refuse a slot held by anything not handed over."""
    moves = [(p.fd, SYSTEMD_FIRST_FD + index) for index, p in enumerate(chosen)]
    for _, slot in moves:
        if slot in open_fds and slot not in handed:
            raise UsageError(
                f"fd {slot} is already open and was not passed in; not overwriting it to make room for the systemd convention "
                f"(under s6, fdlaunch-notify-wait --fd={slot} before fdlaunch-fdmap takes it out of the chain: {S6_SYSTEMD_RECIPE})"
            )
    return moves


def variables(passed, prefix):
    """One variable per label, PREFIX + LABEL upper-cased with other characters as '_', holding its fds."""
    found = {}
    source = {}
    for p in passed:
        name = prefix + re.sub(r"[^A-Za-z0-9]", "_", p.label).upper()
        if not re.fullmatch(VARIABLE, name):
            raise UsageError(f"label {p.label!r} with prefix {prefix!r} gives {name!r}, which is not a variable name")
        if name in VARIABLES or name == "NOTIFY_SOCKET":
            raise UsageError(f"label {p.label!r} with prefix {prefix!r} gives {name}, which the program needs for itself")
        if source.setdefault(name, p.label) != p.label:
            raise UsageError(f"labels {source[name]!r} and {p.label!r} both give the variable {name}")
        found[name] = f"{found[name]},{p.fd}" if name in found else str(p.fd)
    return found


# {{ and }} before {LABEL}: '{{x}' is a literal '{' then 'x}', as in str.format.
BRACES = r"\{\{|\}\}|\{([^{}]*)\}|[{}]"  # compiled on first use (re's cache): only --subst needs it


def substitute(words, passed):
    """Each {LABEL} in words replaced by the fd of the one socket with that label; {{ and }} are braces.

    A label with several sockets, one that was not passed, or a lone brace
    is refused, naming the word.
    """
    fds_of = {}
    for p in passed:
        fds_of.setdefault(p.label, []).append(p.fd)
    return [_substitute_word(word, fds_of) for word in words]


def _substitute_word(word, fds_of):
    return re.sub(BRACES, lambda match: _fd_for(match, word, fds_of), word)


def _fd_for(match, word, fds_of):
    token, label = match[0], match[1]
    if token in ("{{", "}}"):
        return token[0]
    if label is None:
        raise UsageError(f"--subst: {word!r} has a lone {token!r}; write {token * 2!r} for a literal brace")
    found = fds_of.get(label, [])
    if len(found) != 1:
        passed = ", ".join(f"{name} ({len(fds)})" if len(fds) > 1 else name for name, fds in fds_of.items()) or "none"
        why = f"{len(found)} sockets (fds {','.join(map(str, found))}) are" if found else "no socket is"
        where = repr(token) if token == word else f"{token!r} in {word!r}"
        raise UsageError(f"--subst: {where}: {why} labelled {label!r}; it needs exactly one (passed: {passed})")
    return str(found[0])
