"""fdlaunch-notify: send one sd_notify message, for shell-script daemons.

Usage:
  fdlaunch-notify [options] [--] FIELD=VALUE...
  fdlaunch-notify (-h | --help | --version)

Sends FIELD=VALUE lines (READY=1, STATUS=..., RELOADING=1, STOPPING=1, ...)
as one datagram to $NOTIFY_SOCKET, a path or @abstract. See fdlaunch-notify(1).

Options:
  --pid=PID      Speak for PID (a number, or 'parent'), and send MAINPID=PID.
  --no-block     Do not wait for the receiver to handle the message.
  -v, --verbose  Say on stderr what was sent, and where.
  -h, --help     Print this help.
  --version      Print the version.
"""

import os

from fdlaunch import cli
from fdlaunch.cli import tool
from fdlaunch.errors import UsageError, quoted, syscall_error, warn
from fdlaunch.kernel import sdnotify
from fdlaunch.text.numbers import PID_MAX_LIMIT, is_decimal

PROG = "fdlaunch-notify"
NOT_LISTENING = 1  # NOTIFY_SOCKET unset: nobody to tell, as sd_notify(3) returns 0
BARRIER_SECONDS = 5  # as systemd-notify waits


@tool(PROG)
def main(argv, environ):
    options = cli.parse(__doc__, argv)
    pid = read_pid(options["--pid"])
    target = environ.get("NOTIFY_SOCKET")
    wait = 0 if options["--no-block"] else BARRIER_SECONDS
    try:
        data, confirmed = sdnotify.notify(options["FIELD=VALUE"], target, pid, wait)
    except ValueError as error:
        raise UsageError(str(error)) from None
    except OSError as error:
        raise syscall_error(f"send to {quoted(target)}", error) from None
    if confirmed is None:
        warn(PROG, "warning", "NOTIFY_SOCKET is not set; nobody to tell")
        return NOT_LISTENING
    if not confirmed:
        warn(PROG, "warning", f"{quoted(target)} did not confirm the message within {BARRIER_SECONDS} seconds")
    if options["--verbose"]:
        warn(PROG, "info", f"sent {data.decode(errors='surrogateescape')!r} to {target!r}" + (f" for pid {pid}" if pid is not None else ""))
    return 0


def read_pid(text):
    if text is None:
        return None
    if text == "parent":
        return os.getppid()
    if not is_decimal(text) or len(text) > 10 or not 1 <= int(text) <= PID_MAX_LIMIT:
        raise UsageError(f"--pid={text!r} is not a process id or 'parent'")
    return int(text)
