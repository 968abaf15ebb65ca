"""fdlaunch-foreground: keep a daemon that forks into the background supervised.

Usage:
  fdlaunch-foreground [options] [--] PROG [ARGS...]
  fdlaunch-foreground (-h | --help | --version)

Runs PROG, a daemon that forks into the background (Type=forking), as a
child subreaper. When PROG's launching process exits 0 the daemon it left is
up: readiness is relayed, the supervisor's signals go to it, and this exits
with its status. See fdlaunch-foreground(1).

Options:
  --pidfile=PATH     The daemon is the pid PROG writes to PATH, accepted only
                     if it is a live process below this one.
  --fd=N             Once the daemon is up, write a newline to fd N (3 or
                     more) and close it (s6).
  --forward          Once the daemon is up, send READY=1 with MAINPID= its pid
                     to the NOTIFY_SOCKET this was started with.
  --timeout=SECONDS  How long PROG may take to leave a daemon [default: 60].
  --grace=SECONDS    How long the daemon may take to exit after a stop
                     signal, and what it left to stop after it exited,
                     before SIGKILL [default: 10].
  -v, --verbose      Say on stderr which pid is the daemon, and how it ended.
  -h, --help         Print this help.
  --version          Print the version.
"""

from fdlaunch import cli
from fdlaunch.cli import tool
from fdlaunch.errors import Fatal, UsageError, quoted, say_as, warn
from fdlaunch.kernel import chain, fds
from fdlaunch.loops import forking, readiness

PROG = "fdlaunch-foreground"


@tool(PROG)
def main(argv, environ):
    options = cli.parse(__doc__, argv)
    program = [options["PROG"], *options["ARGS"]]
    settings, relays = read_settings(options, environ)
    cli.find_program(program[0], environ)  # exit 126 or 127 now, before anything is started
    if relays.upstream is not None:
        del environ["NOTIFY_SOCKET"]  # we speak for the daemon upstream
    keeper = forking.Keeper(settings, say_as(PROG), say_as(f"{PROG} (guard)"))
    try:
        daemon = keeper.launch(cli.program(program, environ), environ)
        tell_ready(relays, daemon, options["--verbose"])
        status = keeper.supervise()
        while isinstance(status, forking.Successor):
            daemon = status.pid
            tell_successor(relays, status, options["--pidfile"], options["--verbose"])
            status = keeper.supervise()
    except BaseException:  # whatever went wrong, nothing we started is left running unsupervised
        keeper.stop_all()
        keeper.stop_guard()
        raise
    if status is None:
        warn(PROG, "warning", f"the daemon (pid {daemon}) was not our child when it exited: its status is unknown")
        return forking.NO_DAEMON
    if options["--verbose"]:
        warn(PROG, "info", f"the daemon (pid {daemon}) {chain.describe_exit(status)}")
    return chain.exit_status(status)


def tell_ready(relays, daemon, verbose):
    if verbose:
        where = relays.describe() if relays.fd is not None or relays.upstream else "nobody to tell (no --fd or --forward)"
        warn(PROG, "info", f"the daemon is pid {daemon}; it is ready: {where}")
    # Sent as ourselves: until it reads MAINPID=daemon, the supervisor knows our pid as the main one,
    # and systemd's NotifyAccess=main believes no other. Fatal if a relay fails: main's except stops the daemon.
    relays.ready(None, daemon, [("READY", "1")], None)


def tell_successor(relays, successor, pidfile, verbose):
    """The daemon handed over to the process its PID file names now: MAINPID= that one, upward.

    Sent as the old daemon, still unreaped: the supervisor knows it as the
    main pid until it reads this, and NotifyAccess=main believes no other.
    """
    if verbose:
        warn(
            PROG,
            "info",
            f"the daemon (pid {successor.previous}) exited; pid {successor.pid}, named by {quoted(pidfile)}, is the daemon now",
        )
    try:
        relays.relay([("MAINPID", str(successor.pid))], successor.pid, successor.previous)
    except Fatal as error:
        warn(PROG, "warning", str(error))


def read_settings(options, environ):
    """Every option checked before anything starts: the keeper's settings, and where readiness goes."""
    upstream = environ.get("NOTIFY_SOCKET") if options["--forward"] else None
    if options["--forward"] and not upstream:
        raise UsageError("--forward needs a NOTIFY_SOCKET to relay to, and none is set")
    if options["--pidfile"] is not None and not options["--pidfile"]:
        raise UsageError("--pidfile needs a path")
    fd = None
    if options["--fd"] is not None:
        fd = fds.notification_fd("--fd", options["--fd"], environ)
    timeout, grace = cli.seconds("--timeout", options["--timeout"]), cli.seconds("--grace", options["--grace"])
    return forking.Settings(options["--pidfile"], timeout, grace), readiness.Relays(fd, upstream)
