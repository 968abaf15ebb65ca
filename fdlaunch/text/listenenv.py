"""The two descriptor conventions, read and written. Pure: environ and pid are arguments.

systemd (sd_listen_fds(3)): LISTEN_FDS=<count> descriptors from fd 3, valid
only when LISTEN_PID is the reader's pid; LISTEN_FDNAMES=<label>:<label>...
map: LISTEN_FD_MAP=<label>=<fd>,<label>=<fd>,... with any fd numbers.
"""

import re
from collections import namedtuple

from fdlaunch.errors import UsageError, counted
from fdlaunch.text.numbers import is_decimal

SYSTEMD_FIRST_FD = 3
# Every variable of the two conventions (fdlaunch(7), DESCRIPTOR PASSING),
# with LISTEN_PIDFDID, which systemd sets beside LISTEN_PID: what a reader
# unsets, what no handler inherits, what var= may not take over.
VARIABLES = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "LISTEN_PIDFDID", "LISTEN_FD_MAP")
# Patterns are strings, compiled on first use by re's cache (see spec).
LABEL = r"[A-Za-z0-9._-]{1,255}"
UNNAMED = "unknown"  # what sd_listen_fds_with_names(3) reports for a socket without a name
# The most descriptors any Linux process can have (fs.nr_open's ceiling,
# proc(5)); callers pass their own, lower, RLIMIT_NOFILE.
FD_CEILING = 1073741816


Passed = namedtuple("Passed", "label fd")
Passed.__doc__ = "A descriptor handed to a program under a label."


def parse_map(text, fd_limit=FD_CEILING):
    """'udp=3,tcp=4' -> [Passed('udp', 3), Passed('tcp', 4)]; raise UsageError naming the fault.

    fd_limit is one past the highest fd this process may have (RLIMIT_NOFILE).
    """
    passed = []
    for item in text.split(",") if text else ():
        label, equals, fd = item.partition("=")
        if not equals or not re.fullmatch(LABEL, label) or not _is_fd(fd):
            raise UsageError(f"LISTEN_FD_MAP={text!r}: item {item!r} is not LABEL=FD (e.g. tcp=4)")
        if int(fd) < SYSTEMD_FIRST_FD:
            raise UsageError(f"LISTEN_FD_MAP={text!r}: item {item!r} names stdin, stdout or stderr; a passed socket is fd 3 or more")
        if int(fd) >= fd_limit:
            raise UsageError(f"LISTEN_FD_MAP={text!r}: item {item!r} is beyond the open files limit ({fd_limit})")
        passed.append(Passed(label, int(fd)))
    _refuse_repeated_fds("LISTEN_FD_MAP", text, passed)
    return passed


def format_map(passed):
    return ",".join(f"{p.label}={p.fd}" for p in passed)


def parse_systemd(environ, pid, fd_limit=FD_CEILING):
    """The sockets passed to pid by the systemd convention; [] when LISTEN_PID is not pid."""
    listen_pid = environ.get("LISTEN_PID")
    if listen_pid is None or "LISTEN_FDS" not in environ:
        return []
    if not _is_fd(listen_pid):
        raise UsageError(f"LISTEN_PID={listen_pid!r} is not a process id")
    if int(listen_pid) != pid:
        return []
    count_text = environ["LISTEN_FDS"]
    if not _is_fd(count_text):
        raise UsageError(f"LISTEN_FDS={count_text!r} is not a count of descriptors")
    count = int(count_text)
    if SYSTEMD_FIRST_FD + count > fd_limit:  # checked before a list of that length is made
        raise UsageError(f"LISTEN_FDS={count_text!r} is more descriptors than the open files limit ({fd_limit}) allows")
    names = environ.get("LISTEN_FDNAMES")
    if names is None:
        labels = [UNNAMED] * count
    else:
        labels = names.split(":") if names else []  # as systemd splits it: '' names no descriptor
    if len(labels) != count:
        raise UsageError(f"LISTEN_FDNAMES={names!r} has {counted(len(labels), 'name')} but LISTEN_FDS={count}")
    for label in labels:
        if not re.fullmatch(LABEL, label):
            raise UsageError(f"LISTEN_FDNAMES={names!r}: {label!r} is not a label (1 to 255 of A-Z a-z 0-9 . _ -)")
    return [Passed(label, SYSTEMD_FIRST_FD + index) for index, label in enumerate(labels)]


def inherited(environ, pid, fd_limit=FD_CEILING):
    """Every socket passed to pid, by either convention, each fd once.

    A descriptor named by both keeps its LISTEN_FD_MAP label, the one that
    can say more than 'unknown'. fd_limit is RLIMIT_NOFILE: a count or fd
    beyond it is refused before anything is allocated for it.
    """
    systemd = parse_systemd(environ, pid, fd_limit)
    mapped = parse_map(environ["LISTEN_FD_MAP"], fd_limit) if "LISTEN_FD_MAP" in environ else []
    label_of = {p.fd: p.label for p in mapped}
    merged = [Passed(label_of.get(p.fd, p.label), p.fd) for p in systemd]
    known = {p.fd for p in systemd}
    return merged + [p for p in mapped if p.fd not in known]


def environment(environ, passed, pid, systemd, variables):
    """The program's environment: the caller's, plus the documented variables.

    With systemd=True the descriptors must be at 3, 4, ... in order. A
    LISTEN_PIDFDID is kept only when the LISTEN_PID it came with was already
    this pid, the one case where it still names the program.
    """
    result = dict(environ)
    result["LISTEN_FD_MAP"] = format_map(passed)
    if systemd:
        if result.get("LISTEN_PID") != str(pid):
            result.pop("LISTEN_PIDFDID", None)
        result["LISTEN_FDS"] = str(len(passed))
        result["LISTEN_PID"] = str(pid)
        result["LISTEN_FDNAMES"] = ":".join(p.label for p in passed)
    for name, fd in variables.items():
        result[name] = str(fd)
    return result


def _is_fd(text):
    return is_decimal(text) and len(text) <= 10


def _refuse_repeated_fds(variable, text, passed):
    seen = set()
    for p in passed:
        if p.fd in seen:
            raise UsageError(f"{variable}={text!r} names fd {p.fd} twice")
        seen.add(p.fd)
