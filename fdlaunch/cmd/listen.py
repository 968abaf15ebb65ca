"""fdlaunch-listen: open listening sockets, pass them on, exec the program.

Usage:
  fdlaunch-listen [options] SPEC... [--] PROG [ARGS...]
  fdlaunch-listen (-h | --help | --version)

Each SPEC is -PROTO:OPTIONS:ADDRESS, such as -udp::53, -tcp:label=tls:853
or -unix:mode=0600:/run/x.sock, where PROTO is tcp, tcp4, tcp6, udp, udp4,
udp6, unix, unix-dgram or unix-seqpacket. See fdlaunch-listen(1).

Options:
  --map          Touch no open descriptor: put the sockets on free fds and
                 write only LISTEN_FD_MAP.
  --lazy         Exec only once a client connects or a datagram arrives.
  --dry-run      Print the plan on stdout; bind nothing, run nothing.
  -v, --verbose  Say on stderr which socket is on which fd.
  -h, --help     Print this help.
  --version      Print the version.
"""

import os
import sys

from fdlaunch import cli
from fdlaunch.cli import tool
from fdlaunch.errors import BadCall, Finished, warn
from fdlaunch.kernel import chain, fds, sock
from fdlaunch.text import fdplan, listenenv, spec

PROG = "fdlaunch-listen"


@tool(PROG)
def main(argv, caller):
    option_words, spec_words, program = spec.split_words(argv)
    # docopt cannot read 'SPEC... [--] PROG' (see cli): the specs and the program are ours to check.
    options = cli.read(__doc__, option_words)
    wanted = [spec.parse(word) for word in spec_words]
    if not wanted or options["PROG"] or not (program or options["--dry-run"]):
        raise BadCall(cli.synopsis(__doc__))
    systemd = not options["--map"]
    pid = os.getpid()
    inherited = listenenv.inherited(caller, pid, fds.limit())
    open_now = fds.open_fds()
    fds.check_inherited(inherited, open_now)
    layout = fdplan.plan(inherited, wanted, open_now, systemd, fds.limit())
    ipv6 = any(not s.host and s.protocol.family == "any" for s in wanted) and sock.ipv6_available()
    endpoints = [sock.resolve(s, ipv6) for s in wanted]
    environ = listenenv.environment(caller, layout.passed, pid, systemd, layout.variables)
    if options["--dry-run"]:
        print_plan(layout, endpoints, caller, environ, program)
        raise Finished(0)
    path = chain.find_program(program[0], environ)
    with sock.Opened() as opened:
        new = [opened.open(endpoint) for endpoint in endpoints]
        moves = layout.inherited_moves + list(zip(new, layout.new_fds, strict=True))
        fds.place(moves)
        opened.moved(moves)
        if options["--verbose"]:
            for line in describe(layout, wanted):
                warn(PROG, "info", line)
        if options["--lazy"]:
            with chain.stopping_signals_raise():
                sock.wait_for_activity([p.fd for p in layout.passed])
        return chain.Exec(path, program, environ, undo=opened.discard)


def describe(layout, wanted):
    """One line per passed socket: fd, protocol, address actually bound, label."""
    by_fd = {fd: s for s, fd in zip(wanted, layout.new_fds, strict=True)}
    for passed in layout.passed:
        s = by_fd.get(passed.fd)
        if s is None:
            yield f"fd {passed.fd}: inherited, label {passed.label}"
        else:
            yield f"fd {passed.fd}: {s.proto} {sock.describe(passed.fd, s)}, label {passed.label}"


def print_plan(layout, endpoints, before, after, program):
    by_fd = {fd: e for e, fd in zip(endpoints, layout.new_fds, strict=True)}
    for passed in layout.passed:
        e = by_fd.get(passed.fd)
        where = "inherited" if e is None else f"{e.spec.proto} {sock.endpoint_address(e)}"
        print(f"fd {passed.fd}: {where}, label {passed.label}")
    for name in sorted(after):
        if before.get(name) != after[name]:
            print(f"{name}={after[name]}")
    for name in sorted(set(before) - set(after)):
        print(f"unset {name}")
    print("exec " + " ".join(program) if program else "(no program)")
    sys.stdout.flush()
