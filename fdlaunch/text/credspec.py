"""Credentials as text: accounts, group lists, UID/GID/GIDLIST, limits, capabilities.

Pure: user and group databases come in as lookup functions, the
environment as a dict, and what the kernel reports as a dict.
"""

import re
from collections import namedtuple

from fdlaunch.errors import UsageError
from fdlaunch.text.numbers import is_decimal, octal_mode

# groups is the complete supplementary list, sorted, without repeats.
Credentials = namedtuple("Credentials", "uid gid groups")
# passwd is the pwd entry (for --env), or None for a uid without one.
Account = namedtuple("Account", "credentials passwd")
# USER[:GROUP] looked up: gid is None for a bare uid without a passwd entry.
User = namedtuple("User", "uid gid passwd")

# A user or group name, by useradd(8)'s rule, loosely: [A-Za-z0-9._][A-Za-z0-9._-]*\$?
NAME_FIRST = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._")
NAME_REST = NAME_FIRST | {"-"}

# capabilities(7), numbered as in linux/capability.h
CAPABILITIES = (
    "chown dac_override dac_read_search fowner fsetid kill setgid setuid setpcap linux_immutable "
    "net_bind_service net_broadcast net_admin net_raw ipc_lock ipc_owner sys_module sys_rawio "
    "sys_chroot sys_ptrace sys_pacct sys_admin sys_boot sys_nice sys_resource sys_time "
    "sys_tty_config mknod lease audit_write audit_control setfcap mac_override mac_admin syslog "
    "wake_alarm block_suspend audit_read perfmon bpf checkpoint_restore"
).split()

# getrlimit(2) resources by the names prlimit(1) and ulimit use
LIMITS = ("as core cpu data fsize locks memlock msgqueue nice nofile nproc rss rtprio rttime sigpending stack").split()
UNLIMITED = -1  # resource.RLIM_INFINITY
ID_MAX = 2**32 - 2  # (uid_t)-1 is not an id: setresuid(2) reads it as "leave unchanged"
LIMIT_MAX = 2**63 - 1  # the largest rlim_t Python's resource module passes


def is_name(text):
    """Whether text is a user or group name by the rule of NAME_FIRST and NAME_REST, an ending '$' allowed (Samba's machine accounts).

    Checked character by character: a regular expression would be compiled
    in every process that checks one, each child of a server among them.
    """
    body = text[:-1] if text.endswith("$") else text
    return bool(body) and body[0] in NAME_FIRST and all(c in NAME_REST for c in body[1:])


def split_user(text):
    """'www:ssl' -> ('www', 'ssl'), '4242' -> ('4242', ''): the shape of USER[:GROUP], ids in range.

    Raises ValueError saying what is wrong; the caller names the option.
    """
    user, colon, group = text.partition(":")
    if not user or (colon and not group) or not all(is_name(part) for part in (user, group) if part):
        raise ValueError("not USER, USER:GROUP, UID or UID:GID")
    for kind, part in (("uid", user), ("gid", group)):
        if is_decimal(part) and not _is_id(part):
            raise ValueError(f"{kind} {part} is out of range; ids are 0 to {ID_MAX}")
    return user, group


def resolve_user(text, lookups, quoted):
    """USER[:GROUP] -> User, by the one rule of fdlaunch(7), ACCOUNTS, for owner= and fdlaunch-setuidgid.

    A name must be in its database; a number is the id itself, with or
    without an entry, as chown(1) and chpst -u :UID:GID take it. Without
    GROUP the gid is the user's primary one, None for a uid without a
    passwd entry. quoted names the input in messages: "owner='x'".
    """
    try:
        user, group = split_user(text)
    except ValueError as error:
        raise UsageError(f"{quoted}: {error}") from None
    if is_decimal(user):
        uid, passwd = int(user), _lookup(lookups.getpwuid, int(user))
    else:
        passwd = _lookup(lookups.getpwnam, user)
        if passwd is None:
            raise UsageError(f"{quoted}: unknown user {user!r}")
        uid = passwd.pw_uid
    try:
        gid = _group_id(group, lookups) if group else (passwd.pw_gid if passwd else None)
    except UsageError as error:
        raise UsageError(f"{quoted}: {error}") from None
    return User(uid, gid, passwd)


def resolve_account(text, lookups):
    """ACCOUNT -> Account. lookups has getpwnam, getpwuid, getgrnam, getgrouplist.

    user: its uid, primary gid and group database memberships (initgroups);
    user:group: the same with that group as gid; uid:gid: exactly those,
    no supplementary groups; uid alone: its passwd entry's gid.
    """
    found = resolve_user(text, lookups, f"account {text!r}")
    if found.gid is None:
        raise UsageError(f"account {text!r}: uid {found.uid} has no passwd entry to take a group from; write {found.uid}:GID")
    user = text.partition(":")[0]
    groups = () if is_decimal(user) else tuple(sorted(set(lookups.getgrouplist(user, found.gid))))
    return Account(Credentials(found.uid, found.gid, groups), found.passwd)


def parse_group_list(text, lookups):
    """'--groups=wheel,100' -> (10, 100); '' is no supplementary groups."""
    items = text.split(",") if text else []
    if not all(items):
        raise UsageError(f"--groups={text!r} has an empty item; separate groups with one comma")
    return tuple(sorted({_group_id(item, lookups) for item in items}))


def _group_id(text, lookups):
    if is_decimal(text):
        if not _is_id(text):
            raise UsageError(f"gid {text} is out of range; ids are 0 to {ID_MAX}")
        return int(text)
    if not is_name(text):
        raise UsageError(f"{text!r} is not a group name or number")
    entry = _lookup(lookups.getgrnam, text)
    if entry is None:
        raise UsageError(f"unknown group {text!r}")
    return entry.gr_gid


def _lookup(function, key):
    try:
        return function(key)
    except KeyError:
        return None


def to_environment(credentials):
    """The s6-envuidgid variables; GIDLIST is the whole supplementary list."""
    return {
        "UID": str(credentials.uid),
        "GID": str(credentials.gid),
        "GIDLIST": ",".join(str(g) for g in credentials.groups),
    }


def from_environment(environ):
    """UID, GID and GIDLIST -> Credentials; a missing or malformed one is a UsageError naming it."""
    values = {}
    for name in ("UID", "GID"):
        text = environ.get(name)
        if text is None:
            raise UsageError(f"--from-env: {name} is not set (fdlaunch-setuidgid --export sets it)")
        if not _is_id(text):
            raise UsageError(f"--from-env: {name}={text!r} is not a number")
        values[name] = int(text)
    gidlist = environ.get("GIDLIST")
    if gidlist is None:
        raise UsageError("--from-env: GIDLIST is not set (it may be empty)")
    items = gidlist.split(",") if gidlist else []
    if not all(_is_id(item) for item in items):
        raise UsageError(f"--from-env: GIDLIST={gidlist!r} is not a comma-separated list of numbers")
    return Credentials(values["UID"], values["GID"], tuple(sorted({int(i) for i in items})))


def describe(credentials, capabilities=()):
    """'uid 65534, gid 65534, groups 65534', and the capabilities kept, for -v."""
    groups = ",".join(map(str, credentials.groups)) or "none"
    kept = f", keeping {capability_names(capabilities)}" if capabilities else ""
    return f"uid {credentials.uid}, gid {credentials.gid}, groups {groups}{kept}"


def _is_id(text):
    return is_decimal(text) and text.isascii() and len(text) <= 10 and int(text) <= ID_MAX


def account_environment(account):
    """HOME, USER, LOGNAME and SHELL from the account's passwd entry, for --env."""
    entry = account.passwd
    if entry is None:
        raise UsageError(f"--env: uid {account.credentials.uid} has no passwd entry to take HOME and SHELL from")
    return {"HOME": entry.pw_dir, "USER": entry.pw_name, "LOGNAME": entry.pw_name, "SHELL": entry.pw_shell or "/bin/sh"}


def parse_limit(text):
    """'nofile=1024:4096' -> ('nofile', 1024, 4096); the hard limit may be left out (None)."""
    name, equals, values = text.partition("=")
    if name not in LIMITS:
        raise UsageError(f"--limit={text!r}: unknown resource {name!r}; known: {', '.join(LIMITS)}")
    soft_text, colon, hard_text = values.partition(":")
    if not equals or not soft_text or (colon and not hard_text):
        raise UsageError(f"--limit={text!r} is not RESOURCE=SOFT[:HARD], e.g. nofile=4096:8192")
    soft = _limit_value(text, soft_text)
    hard = _limit_value(text, hard_text) if colon else None
    if hard is not None and hard != UNLIMITED and (soft == UNLIMITED or soft > hard):
        raise UsageError(f"--limit={text!r}: the soft limit is above the hard limit")
    return name, soft, hard


def _limit_value(text, value):
    if value == "unlimited":
        return UNLIMITED
    if not is_decimal(value):
        raise UsageError(f"--limit={text!r}: {value!r} is not a number or 'unlimited'")
    if len(value) > len(str(LIMIT_MAX)) or int(value) > LIMIT_MAX:
        raise UsageError(f"--limit={text!r}: {value} is out of range; the most is {LIMIT_MAX}, or 'unlimited'")
    return int(value)


def parse_capabilities(text):
    """'net_bind_service,CAP_SYS_NICE' -> (10, 23), as capabilities(7) names them."""
    numbers = set()
    for item in text.split(","):
        name = item.lower().removeprefix("cap_")
        if name not in CAPABILITIES:
            raise UsageError(f"--keep-cap={text!r}: unknown capability {item!r} (see capabilities(7))")
        numbers.add(CAPABILITIES.index(name))
    return tuple(sorted(numbers))


def capability_names(numbers):
    return ",".join("cap_" + CAPABILITIES[n] for n in numbers)


def parse_octal(option, text):
    try:
        return octal_mode(text)
    except ValueError as error:
        raise UsageError(f"{option}={text!r}: {error}") from None


def parse_nice(text):
    if not re.fullmatch(r"[+-]?[0-9]{1,2}", text) or not -40 <= int(text) <= 40:
        raise UsageError(f"--nice={text!r} is not an increment from -40 to 40 (as nice(1) takes)")
    return int(text)


def mismatches(wanted, capabilities, observed):
    """What the kernel reports that differs from what was asked; [] when all is as asked.

    observed: 'uid' and 'gid' (real, effective, saved, filesystem), 'groups',
    'cap_eff', 'cap_prm', 'cap_inh', 'cap_amb' (bit masks), as /proc/self/status has them.
    """
    found = []
    for name, want in (("uid", wanted.uid), ("gid", wanted.gid)):
        if any(value != want for value in observed[name]):
            found.append(f"{name}s are {'/'.join(map(str, observed[name]))}, not {want}")
    if tuple(sorted(set(observed["groups"]))) != wanted.groups:
        found.append(f"groups are {list(observed['groups'])}, not {list(wanted.groups)}")
    if wanted.uid != 0:
        mask = sum(1 << n for n in capabilities)
        for name in ("cap_eff", "cap_prm", "cap_inh", "cap_amb"):
            if observed[name] != mask:
                found.append(f"{name[4:]} capabilities are {observed[name]:#x}, not {mask:#x}")
    return found
