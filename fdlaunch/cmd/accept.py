"""fdlaunch-accept: run a program for each connection, UCSPI style.

Usage:
  fdlaunch-accept [options] [--] PROG [ARGS...]
  fdlaunch-accept (-h | --help | --version)

Accepts connections on the stream socket it was handed and runs PROG for
each one, the connection on its stdin and stdout and the client's address
in its environment. See fdlaunch-accept(1).

Options:
  --label=LABEL  Serve the socket with this label (needed when more than
                 one stream socket was passed).
  -c N           At most N handlers at once; further clients wait in the
                 listen backlog [default: 40].
  -C N           At most N handlers per remote address (per uid on a unix
                 socket); further clients are refused.
  --rules=FILE   Allow or deny clients, and add variables, by the rules in
                 FILE; SIGHUP reads it again.
  --inetd        Set REMOTE_ADDR and REMOTE_PORT, as systemd's Accept=yes,
                 instead of the UCSPI variables.
  -l NAME        Set TCPLOCALHOST=NAME for the handlers.
  --lookup       Set TCPREMOTEHOST (and TCPLOCALHOST, without -l) by
                 reverse DNS; none is done without it.
  --grace=SECS   After SIGTERM, how long running handlers may finish
                 before SIGKILL [default: 10].
  --fd=N         Once accepting, write a newline to fd N (3 or more) and
                 close it (s6).
  -q, --quiet    No line when a handler starts or ends.
  -v, --verbose  Also say which socket is served, stops and reloads.
  -h, --help     Print this help.
  --version      Print the version.
"""

import os
import socket

from fdlaunch import cli
from fdlaunch.cli import tool
from fdlaunch.errors import UsageError, say_as, warn
from fdlaunch.kernel import fds
from fdlaunch.loops import accepting
from fdlaunch.text import listenenv
from fdlaunch.text.numbers import is_decimal
from fdlaunch.text.spec import format_address

PROG = "fdlaunch-accept"
MAX_HANDLERS = 1_000_000
SPARE_FDS = 32  # besides one pidfd per handler: stdio, sockets passed, pipes, a connection being accepted


@tool(PROG)
def main(argv, environ):
    options = cli.parse(__doc__, argv)
    program = [options["PROG"], *options["ARGS"]]
    settings = read_settings(options, environ)
    say = speaker(options["--quiet"], options["--verbose"])
    passed = listenenv.inherited(environ, os.getpid())
    fds.check_inherited(passed, fds.open_fds())
    listener, served = choose(passed, options["--label"])
    say("info", f"serving {served}; the handlers get no other descriptor of ours")
    hide_descriptors()
    server = accepting.Server(listener, cli.program(program, environ), settings, say, say_as(f"{PROG} (guard)"))
    return server.run()


def read_settings(options, environ):
    """Every option checked, and the rules file read, before anything starts; the server's settings."""
    most = count("-c", options["-c"])
    most_per = None if options["-C"] is None else count("-C", options["-C"])
    grace = cli.seconds("--grace", options["--grace"], zero=True)
    needed = most + SPARE_FDS
    if needed > fds.limit():
        raise UsageError(f"-c {most} needs {needed} descriptors, but RLIMIT_NOFILE is {fds.limit()}: raise it (--limit=nofile=N)")
    path = options["--rules"]
    found = None if path is None else accepting.read_rules(path)
    ready_fd = None if options["--fd"] is None else fds.notification_fd("--fd", options["--fd"], environ)
    return accepting.Settings(
        environ=environ,
        notify_socket=environ.get("NOTIFY_SOCKET"),
        max=most,
        max_per=most_per,
        inetd=options["--inetd"],
        local_host=options["-l"],
        lookup=options["--lookup"],
        grace=grace,
        rules_path=path,
        rules=found,
        ready_fd=ready_fd,
    )


def speaker(quiet, verbose):
    """The server's say(kind, text): start and end lines unless -q; info only with -v; warnings always."""
    say_line = say_as(PROG, verbose)

    def say(kind, text):
        if kind not in ("start", "end"):
            say_line(kind, text)
        elif not quiet:
            warn(PROG, "info", f"{kind} {text}")

    return say


def count(option, text):
    if not (is_decimal(text) and 0 < int(text) <= MAX_HANDLERS):
        raise UsageError(f"{option} {text!r}: not a number of handlers from 1 to {MAX_HANDLERS}")
    return int(text)


def choose(passed, label):
    """The listening stream socket to serve, and how to name it; the others are left alone."""
    if not passed:
        raise UsageError("no socket was passed in (LISTEN_FD_MAP, or LISTEN_FDS for this pid): run it after fdlaunch-listen")
    candidates = []
    for p in passed:
        try:
            sock = socket.socket(fileno=p.fd)
        except OSError as error:
            raise UsageError(f"LISTEN_FDS/LISTEN_FD_MAP: fd {p.fd} ({p.label}) is not a socket: {error.strerror}") from None
        if sock.type == socket.SOCK_STREAM and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            if label is None or p.label == label:
                candidates.append((p, sock))
                continue
        sock.detach()
    if len(candidates) != 1:
        for _, sock in candidates:
            sock.detach()
        labels = ", ".join(p.label for p in passed)
        found = f"{len(candidates) or 'no'} listening stream socket{'s' if len(candidates) > 1 else ''}"
        labelled = f" labelled {label!r}" if label is not None else ""
        hint = "" if label is not None or not candidates else "; say which with --label"
        raise UsageError(f"{found}{labelled} among those passed ({labels}){hint}")
    p, sock = candidates[0]
    return sock, f"{p.label}={p.fd} ({describe(sock)})"


def describe(sock):
    transport = "unix" if sock.family == socket.AF_UNIX else "tcp"
    return format_address(sock.getsockname(), transport) or "an unnamed unix socket"


def hide_descriptors():
    """Every descriptor above stdio becomes close-on-exec: a handler gets its connection and stderr only."""
    for fd in fds.open_fds() - {0, 1, 2}:
        os.set_inheritable(fd, False)
    fds.hold_closed_standard_fds()  # so that a connection never lands on 0, 1 or 2 itself
