"""fdlaunch-handoff: restart a daemon without dropping a request.

Usage:
  fdlaunch-handoff [options] [--] PROG [ARGS...]
  fdlaunch-handoff (-h | --help | --version)

Holds the sockets it was handed and runs PROG on them as a child. On the
reload signal it starts a new instance on the same sockets, waits for its
READY=1, and only then stops the old one. With --listen-from it also opens
the sockets listed in FILE, and re-reads FILE at each reload. See
fdlaunch-handoff(1).

Options:
  --listen-from=FILE    Open the sockets FILE lists (fdlaunch-listen specs,
                        one a line), after those handed in; re-read it at
                        each reload.
  --map                 With --listen-from: touch no open descriptor; put
                        sockets on free fds and write only LISTEN_FD_MAP.
  --signal=SIG          The reload signal [default: HUP].
  --stop-signal=SIG     What the old instance gets once the new one is
                        ready [default: TERM].
  --ready-timeout=SECS  How long a new instance may take to be ready
                        [default: 60].
  --grace=SECS          How long a stopped instance may finish its work
                        before SIGKILL [default: 10].
  --fd=N                Once the first instance is ready, write a newline
                        to fd N (3 or more) and close it (s6).
  --respawn             Replace a serving instance that exits unasked, on
                        the same sockets; give up after 5 exits in 10 s.
  --watchdog=SECS       Once ready, an instance that goes this long without
                        WATCHDOG=1 gets SIGABRT, then SIGKILL.
  --fdstore-max=N       Keep up to N descriptors that instances store with
                        FDSTORE=1, for the instances after them [default: 0].
  --main-pid=WHO        The MAINPID= told upward: 'self' or 'instance' (the
                        serving one) [default: self].
  --upstart[=NAME]      An instance is also ready once it stops itself with
                        SIGSTOP; it then gets SIGCONT. Instances get
                        UPSTART_JOB=NAME (default: PROG's basename).
  --ready-fd=N          An instance is also ready once it writes a newline
                        to fd N, a pipe it is given.
  --ready-fd-var=NAME   With --ready-fd, also give instances N in NAME.
  -v, --verbose         Say on stderr what happens.
  -h, --help            Print this help.
  --version             Print the version.
"""

import os
import signal

from fdlaunch import cli
from fdlaunch.cli import tool
from fdlaunch.errors import BadCall, UsageError, say_as, warn
from fdlaunch.kernel import chain, fds, sdnotify
from fdlaunch.loops import listenfrom, overlap
from fdlaunch.text import listenenv
from fdlaunch.text.numbers import is_decimal

PROG = "fdlaunch-handoff"
FDSTORE_CEILING = 4096
# What --ready-fd-var may not name: variables we set or read ourselves.
OURS = ("NOTIFY_SOCKET", "UPSTART_JOB", "WATCHDOG_USEC", "WATCHDOG_PID", *listenenv.VARIABLES)


@tool(PROG, parses=False)
def main(argv, environ):
    # Our own reader, not docopt's: docopt cannot read an option's optional value (--upstart[=NAME]); see cli.
    options = cli.read(__doc__, argv)
    if options["PROG"] is None:
        raise BadCall(cli.synopsis(__doc__))
    program = [options["PROG"], *options["ARGS"]]
    settings = read_settings(options, environ, program)
    say = say_as(PROG, options["--verbose"])
    passed = listenenv.inherited(environ, os.getpid(), fds.limit())
    fds.check_inherited(passed, fds.open_fds())
    if not passed and not options["--listen-from"]:
        say("info", "no sockets were passed in; instances still overlap, each with its own")
    upstream = environ.pop("NOTIFY_SOCKET", None)
    sockets = instance_sockets(options, settings, environ, passed)
    inbox = sdnotify.Inbox()
    try:
        guard_say = say_as(f"{PROG} (guard)")
        handoff = overlap.Handoff(cli.program(program, environ), settings, sockets, inbox, upstream, say, guard_say)
        status = handoff.run()
    finally:
        inbox.close()
        sockets.close()
    return chain.exit_as(status)


def instance_sockets(options, settings, environ, passed):
    """What each instance gets: what was handed in, and with --listen-from FILE's sockets too."""
    if not options["--listen-from"]:
        return listenfrom.Handed(environ)
    # --ready-fd's number counts as taken: no socket of FILE is put there.
    taken = fds.open_fds() | ({settings.instance_fd} if settings.instance_fd is not None else set())
    return listenfrom.FromFile(options["--listen-from"], environ, passed, taken, not options["--map"])


def read_settings(options, environ, program):
    """Every option checked before anything starts; the loop's settings."""
    reload = signal_number("--signal", options["--signal"])
    stop = signal_number("--stop-signal", options["--stop-signal"])
    ready_timeout = cli.seconds("--ready-timeout", options["--ready-timeout"], zero=True)
    grace = cli.seconds("--grace", options["--grace"], zero=True)
    if options["--map"] and not options["--listen-from"]:
        raise UsageError("--map places the sockets of --listen-from; without it the instances get what was handed in, where it is")
    if options["--main-pid"] not in ("instance", "self"):
        raise UsageError(f"--main-pid={options['--main-pid']!r} is not 'instance' or 'self'")
    if reload in overlap.STOPS + (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD):
        raise UsageError(f"--signal={options['--signal']}: that signal stops fdlaunch-handoff or cannot be caught; use HUP, USR1 or USR2")
    watchdog = None if options["--watchdog"] is None else cli.seconds("--watchdog", options["--watchdog"])
    relay = relayed_watchdog(environ)
    if relay is not None and watchdog is not None:
        warn(PROG, "info", "--watchdog: our supervisor's watchdog (WATCHDOG_USEC) is relayed instead; there is one watchdog")
        watchdog = None
    fdstore_max = options["--fdstore-max"]
    if not (is_decimal(fdstore_max) and int(fdstore_max) <= FDSTORE_CEILING):
        raise UsageError(f"--fdstore-max={fdstore_max!r} is not a number of descriptors from 0 to {FDSTORE_CEILING}")
    ready_fd = None
    passed = listenenv.inherited(environ, os.getpid())
    if options["--fd"] is not None:
        ready_fd = fds.notification_fd("--fd", options["--fd"], environ)
    instance_fd, instance_fd_var = cli.ready_fd(options, passed, ready_fd, OURS)
    upstart = cli.upstart_job(options["--upstart"], program)
    main_pid_self = options["--main-pid"] == "self"
    return overlap.Settings(
        reload,
        stop,
        ready_timeout,
        grace,
        ready_fd,
        main_pid_self,
        options["--respawn"],
        int(fdstore_max),
        watchdog,
        relay,
        upstart,
        instance_fd,
        instance_fd_var,
    )


def relayed_watchdog(environ):
    """Our supervisor's WATCHDOG_USEC when it watches us (WATCHDOG_PID ours, or unset), else None; 100 for a bad value."""
    usec = environ.get("WATCHDOG_USEC")
    if usec is None or environ.get("WATCHDOG_PID", str(os.getpid())) != str(os.getpid()):
        return None
    if not (is_decimal(usec) and len(usec) <= 16 and int(usec) > 0):
        raise UsageError(f"WATCHDOG_USEC={usec!r} is not a number of microseconds")
    return usec


def signal_number(option, text):
    name = text.upper() if text.upper().startswith("SIG") else "SIG" + text.upper()
    try:
        return signal.Signals(int(text)) if is_decimal(text) else signal.Signals[name]
    except (KeyError, ValueError):
        raise UsageError(f"{option}={text!r} is not a signal name or number, e.g. HUP") from None
