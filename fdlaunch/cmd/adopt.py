"""fdlaunch-adopt: socket activation for a daemon that binds its own sockets.

Usage:
  fdlaunch-adopt [options] [--] PROG [ARGS...]
  fdlaunch-adopt (-h | --help | --version)

Takes the sockets passed in (LISTEN_FD_MAP, or LISTEN_FDS for this pid)
away from PROG and runs it with its bind(2) calls watched: a bind to the
address of a passed socket gets that socket, already bound, on the fd PROG
bound; any other bind goes on as usual. See fdlaunch-adopt(1).

Options:
  --strict       Refuse (EACCES) every bind that gets no passed socket.
  -v, --verbose  Say on stderr which sockets PROG may get, and each one
                 it got.
  -h, --help     Print this help.
  --version      Print the version.
"""

import os

from fdlaunch import cli
from fdlaunch.cli import tool
from fdlaunch.errors import UsageError, say_as, warn
from fdlaunch.kernel import chain, fds, seccomp, sock
from fdlaunch.loops import adopting
from fdlaunch.text import adoption, listenenv, sockaddr

PROG = "fdlaunch-adopt"


@tool(PROG)
def main(argv, environ):
    options = cli.parse(__doc__, argv)
    program = [options["PROG"], *options["ARGS"]]
    arch = seccomp.native()
    passed = listenenv.inherited(environ, os.getpid(), fds.limit())
    fds.check_inherited(passed, fds.open_fds())
    offers = [offer_of(p) for p in passed]
    path = cli.find_program(program[0], environ)
    supervisor = adopting.Supervisor(arch, offers, options["--strict"], say_as(f"{PROG} (supervisor)", options["--verbose"]))
    try:
        listener, no_new_privs = seccomp.install(arch)
        supervisor.hand_over(arch, listener)
    except BaseException:
        supervisor.abandon()
        raise
    if options["--verbose"]:
        tell(offers, supervisor.pid, no_new_privs, options["--strict"])
    fds.close_all(p.fd for p in passed)
    return chain.Exec(path, program, {name: value for name, value in environ.items() if name not in listenenv.VARIABLES})


def offer_of(passed):
    """A passed descriptor as the supervisor matches binds against it; a usage error unless it is a bound socket."""
    try:
        family, kind, protocol, v6only, name = sock.facts(passed.fd)
    except OSError as error:
        raise UsageError(f"LISTEN_FDS/LISTEN_FD_MAP: fd {passed.fd} ({passed.label}) is not a socket: {error.strerror}") from None
    if not sockaddr.is_bound(family, name):
        raise UsageError(f"LISTEN_FDS/LISTEN_FD_MAP: fd {passed.fd} ({passed.label}) is not a bound socket of the inet or unix family")
    address = sockaddr.of_socket(family, name)
    file = sock.file_of(address.name) if sockaddr.is_path(address) else None
    return adoption.Offer(passed.label, passed.fd, family, kind, protocol, address, v6only, file)


def tell(offers, supervisor, no_new_privs, strict):
    """-v: what a bind may get, and what the program runs under."""
    for offer in offers:
        transport = adopting.TRANSPORTS.get(offer.type)
        warn(PROG, "info", f"a bind to {sockaddr.printed(offer.address, transport)} gets fd {offer.fd} ({offer.label})")
    others = "fails with EACCES (--strict)" if strict else "goes on as usual"
    privileges = "; no_new_privs set" if no_new_privs else ""
    warn(PROG, "info", f"any other bind {others}; binds answered by pid {supervisor}{privileges}")
