"""The sd_notify(3) protocol as text: datagrams in, fields out, messages to relay. Pure.

A datagram is newline-separated FIELD=VALUE assignments; READY=1 may come
with or without a trailing newline, several fields per datagram, unknown
fields are ignored.
"""

from collections import namedtuple

from fdlaunch.text.numbers import PID_MAX_LIMIT, is_decimal

# systemd reads at most this much of a notification (NOTIFY_BUFFER_MAX in
# src/core/manager.c); a longer datagram is refused as truncated.
DATAGRAM_MAX = 4096
# SCM_MAX_FD in the kernel: the most descriptors one message can carry
FDS_MAX = 253
# BARRIER is answered here by closing its fd; MAINPID the relay sets itself.
NOT_RELAYED = ("BARRIER",)


def parse(data):
    """bytes -> [(field, value)], in order; lines that are not FIELD=VALUE are dropped."""
    text = data.decode("utf-8", errors="replace")
    fields = []
    for line in text.split("\n"):
        name, equals, value = line.partition("=")
        if equals and name and name.isascii() and all(c.isalnum() or c == "_" for c in name):
            fields.append((name, value))
    return fields


def value(fields, name):
    """The last value given to name, or None."""
    found = None
    for field, text in fields:
        if field == name:
            found = text
    return found


def is_ready(fields):
    return value(fields, "READY") == "1"


def main_pid(fields, default):
    """The MAINPID= a daemon reported (it may have forked), or default."""
    return pid_number(value(fields, "MAINPID") or "") or default


def pid_number(text):
    """A process id written in decimal, or None: nothing above PID_MAX_LIMIT (2^22) is one."""
    if not (is_decimal(text) and len(text) <= 7):
        return None
    number = int(text)
    return number if 0 < number <= PID_MAX_LIMIT else None


def seconds(fields, name):
    """The last NAME= of fields as seconds (its value is microseconds, as EXTEND_TIMEOUT_USEC's), or None.

    None too for a value that is not a decimal number of at most 10**15
    microseconds (31 years): nothing longer is a deadline anyone means.
    """
    text = value(fields, name)
    if text is None or not is_decimal(text) or len(text) > 16 or int(text) > 10**15:
        return None
    return int(text) / 1e6


def only(fields, names):
    """The fields whose name is one of names, in order."""
    return [(name, text) for name, text in fields if name in names]


def message(fields):
    """Fields as one datagram's bytes."""
    return "\n".join(f"{name}={text}" for name, text in fields).encode()


def relay_message(fields, pid):
    """The datagram to send upstream for these fields, or None if nothing is left to say.

    Everything but BARRIER is passed on; READY=1 and RELOADING=1 carry
    MAINPID=pid (unless pid is None) so that the supervisor knows the real
    main process.
    """
    kept = [(name, text) for name, text in fields if name not in NOT_RELAYED]
    if not kept:
        return None
    if (is_ready(kept) or value(kept, "RELOADING") == "1") and value(kept, "MAINPID") is None and pid is not None:
        kept.append(("MAINPID", str(pid)))
    return message(kept)


def check_fields(texts):
    """Command-line FIELD=VALUE words -> message bytes; raise ValueError saying which is wrong."""
    for text in texts:
        name, equals, _ = text.partition("=")
        if not equals or not name or "\n" in text or not all(c.isalnum() or c == "_" for c in name):
            raise ValueError(f"{text!r} is not FIELD=VALUE (e.g. READY=1, STATUS=loading zones)")
    data = "\n".join(texts).encode(errors="surrogateescape")  # argv's bytes as given, as systemd-notify sends them
    if len(data) > DATAGRAM_MAX:
        raise ValueError(f"the message is {len(data)} bytes; the protocol allows {DATAGRAM_MAX}")
    return data


# One datagram, questioned once: its fields in order, READY=1 or not, the
# last MAINPID= as given (main_pid_text) and as a pid (main_pid, None unless
# it is one), FDSTORE=1 or not.
Notice = namedtuple("Notice", "fields ready main_pid main_pid_text fdstore")


def decode(data):
    """bytes -> Notice."""
    fields = parse(data)
    text = value(fields, "MAINPID")
    return Notice(fields, is_ready(fields), None if text is None else pid_number(text), text, value(fields, "FDSTORE") == "1")
