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

import errno
import os
import stat

from fdlaunch import cli
from fdlaunch.cli import tool
from fdlaunch.errors import BadCall, Fatal, Finished, UsageError, quoted, warn
from fdlaunch.kernel import chain, fds, sock
from fdlaunch.text import fdplan, listenenv, spec

PROG = "fdlaunch-listen"


@tool(PROG, parses=False)
def main(argv, caller):
    option_words, spec_words, program = spec.split_words(argv)
    # docopt cannot read 'SPEC... [--] PROG' (see cli): the specs and the program are ours to check.
    options = cli.read(__doc__, option_words)
    wanted = [spec.parse(word) for word in spec_words]
    refuse_missing(wanted, program, options)
    systemd = not options["--map"]
    pid = os.getpid()
    layout = plan(caller, pid, wanted, systemd)
    environ = listenenv.environment(caller, layout.passed, pid, systemd, layout.variables)
    if options["--dry-run"]:
        refuse_what_would_fail(layout, program, environ)
        print_plan(layout, caller, environ, program)
        raise Finished(0)
    path = cli.find_program(program[0], environ)
    with chain.stopping_signals_raise(), sock.Opened() as opened:  # a stop from the first bind on removes what was bound
        layout = layout._replace(new=[s._replace(opened=opened.open(s.endpoint)) for s in layout.new])
        moves = layout.inherited_moves + [(s.opened, s.fd) for s in layout.new]
        fds.place(moves)
        opened.moved(moves)
        if options["--verbose"]:
            for line in describe(layout):
                warn(PROG, "info", line)
        if options["--lazy"]:
            sock.wait_for_activity([p.fd for p in layout.passed])
        return chain.Exec(path, program, environ, undo=opened.discard)


def refuse_missing(wanted, program, options):
    """Specs, and a program or --dry-run, with no stray word among the options: else the usage line."""
    if not wanted and program and spec.looks_like_spec(f"-{program[0]}"):
        raise UsageError(f"{program[0]!r} is not a socket spec: a spec starts with a dash, as {'-' + program[0]!r}")
    if not wanted or options["PROG"] or not (program or options["--dry-run"]):
        raise BadCall(cli.synopsis(__doc__))


def plan(caller, pid, wanted, systemd):
    """Where every socket goes, each new one with its names looked up: all that can be refused, before any bind."""
    inherited = listenenv.inherited(caller, pid, fds.limit())
    open_now = fds.open_fds()
    fds.check_inherited(inherited, open_now)
    layout = fdplan.plan(inherited, wanted, open_now, systemd, fds.limit())
    ipv6 = sock.wildcard_is_dual_stack(wanted)
    return layout._replace(new=[s._replace(endpoint=sock.resolve(s.spec, ipv6)) for s in layout.new])


def refuse_what_would_fail(layout, program, environ):
    """--dry-run: the failures of the real run that show without doing anything, with its message and status.

    The program not found on PATH (127, or 126); a unix socket's directory
    that does not exist, without mkdir; a port below
    ip_unprivileged_port_start without CAP_NET_BIND_SERVICE. An address
    in use shows only by binding.
    """
    if program:
        chain.find_program(program[0], environ)
    for s in layout.new:
        spec = s.spec
        if spec.is_unix and not spec.is_abstract and not spec.mkdir:
            directory = os.path.dirname(spec.path) or "."
            try:
                is_directory = stat.S_ISDIR(os.stat(directory).st_mode)
            except FileNotFoundError:
                raise Fatal(
                    f"unable to bind {spec.address()}: directory {quoted(directory)} does not exist (the mkdir option makes it)"
                ) from None
            except OSError:
                continue  # out of our reach, say: what the real run meets there, it says
            if not is_directory:
                raise Fatal(f"unable to open directory {quoted(directory)}: {os.strerror(errno.ENOTDIR)}")
        if not spec.is_unix and not sock.may_bind_privileged_ports():
            hint = sock.privileged_port_hint(s.endpoint)
            if hint:
                raise Fatal(f"unable to bind {sock.endpoint_address(s.endpoint)}: {os.strerror(errno.EACCES)}{hint}")


def describe(layout):
    """One line per passed socket: fd, address actually bound (with its protocol), label."""
    for passed in layout.passed:
        s = layout.new_at(passed.fd)
        where = "inherited" if s is None else socket_words(s.spec, sock.describe(passed.fd, s.spec))
        yield f"fd {passed.fd}: {where}, label {passed.label}"


def socket_words(spec, address):
    """'127.0.0.1:80/tcp', '[::]:53/udp (udp6)', 'unix-dgram /run/x': an inet address says its transport
    already, so only a protocol that says more (tcp4, udp6) is added; a unix socket's word comes first."""
    if spec.is_unix:
        return f"{spec.proto} {address}"
    return address if spec.proto == spec.protocol.transport else f"{address} ({spec.proto})"


def print_plan(layout, before, after, program):
    lines = []
    for passed in layout.passed:
        s = layout.new_at(passed.fd)
        where = "inherited" if s is None else socket_words(s.spec, sock.endpoint_address(s.endpoint))
        lines.append(f"fd {passed.fd}: {where}, label {passed.label}")
    lines += [f"{name}={after[name]}" for name in sorted(after) if before.get(name) != after[name]]
    lines += [f"unset {name}" for name in sorted(set(before) - set(after))]
    lines.append("exec " + " ".join(program) if program else "(no program)")
    cli.output(lines)
