"""fdlaunch-notify-wait: turn a program's sd_notify READY=1 into any supervisor's readiness.

Usage:
  fdlaunch-notify-wait [options] [--] PROG [ARGS...]
  fdlaunch-notify-wait (-h | --help | --version)

Without --fork, PROG keeps this pid and a detached watcher relays its
notifications; with --fork, PROG is started as a child and this exits 0 once
it is ready, printing its pid. See fdlaunch-notify-wait(1).

Options:
  --fd=N             Once ready, write a newline to fd N (3 or more) and
                     close it (s6).
  --forward          Relay every notification to the NOTIFY_SOCKET this was
                     started with, READY=1 with MAINPID.
  --touch=FILE       Once ready, create FILE (mode 0644); remove it when PROG
                     exits (for an orchestrator's probe: test -e FILE).
  --command=CMD      Once ready, run CMD with /bin/sh, its output to stderr.
  --command-timeout=SECS  With --command, stop a run that takes longer
                     [default: 60].
  --stop             Once ready, stop PROG with SIGSTOP, for an upstart
                     job's 'expect stop' above this.
  --timeout=SECONDS  Say so if PROG is not ready in time.
  --kill             With --timeout, then send PROG SIGTERM.
  --watchdog=SECS    Once ready, PROG must send WATCHDOG=1 at least this
                     often, or it gets SIGABRT, then SIGKILL.
  --fork             Start PROG as a child, wait until it is ready, print
                     its pid, exit.
  --check=CMD        PROG is also ready once CMD, run with /bin/sh, exits 0;
                     it is run until then (s6-notifyoncheck).
  --interval=SECS    With --check, the pause after a failed run [default: 1].
  --check-timeout=SECS  With --check, kill a run that takes longer
                     [default: 10].
  --tries=N          With --check, give up after N failed runs, 0 for no
                     limit [default: 0].
  --grace=SECS       How long PROG, or a --command run, may take to exit
                     once asked to stop, before SIGKILL [default: 5].
  --upstart[=NAME]   PROG is also ready once it stops itself with SIGSTOP
                     (upstart's 'expect stop'); it then gets SIGCONT. PROG
                     gets UPSTART_JOB=NAME (default: its basename).
  --ready-fd=N       PROG is also ready once it writes a newline to fd N, a
                     pipe it is given (s6's notification-fd).
  --ready-fd-var=NAME  With --ready-fd, also give PROG N in variable NAME.
  -v, --verbose      Say on stderr what is relayed where, and when PROG
                     got ready.
  -h, --help         Print this help.
  --version          Print the version.
"""

import functools
import os
import re

from fdlaunch import cli
from fdlaunch.cli import tool
from fdlaunch.errors import BadCall, UsageError, quoted, say_as, warn
from fdlaunch.kernel import chain, fds, readyfile, sdnotify
from fdlaunch.loops import readiness, watching
from fdlaunch.text import listenenv
from fdlaunch.text.numbers import is_decimal

PROG = "fdlaunch-notify-wait"
# What --ready-fd-var may not name: variables we set or read ourselves.
OURS = ("NOTIFY_SOCKET", "UPSTART_JOB", "WATCHDOG_USEC", "WATCHDOG_PID", *listenenv.VARIABLES)


@tool(PROG, parses=False)
def main(argv, environ):
    # Our own reader, not docopt's: docopt cannot read an option's optional value (--upstart[=NAME]); see cli.
    options = cli.read(__doc__, argv)
    if options["PROG"] is None:
        raise BadCall(cli.synopsis(__doc__))
    program = [options["PROG"], *options["ARGS"]]
    # Without --fork the watching is done by a process forked for it, and it says so (s6-notifyoncheck's "(child)").
    say = say_as(PROG if options["--fork"] else f"{PROG} (watcher)", options["--verbose"])
    settings = read_settings(options, environ, say, program)
    path = cli.find_program(program[0], environ)
    inbox = sdnotify.Inbox()
    relays = readiness.Relays(settings.fd, settings.upstream, settings.command, options["--stop"], environ, settings.touch)
    # PROG's; --command keeps the caller's
    environ = {**environ, **watchdog_environment(settings.watchdog), **inputs_environment(settings), "NOTIFY_SOCKET": inbox.path}
    if options["--fork"]:
        holder_say = say_as(f"{PROG} (watcher)")  # the process that removes --touch's FILE outlives us
        return watching.fork_and_wait(inbox, relays, settings, cli.program(program, environ), environ, holder_say)
    watching.start_watcher(inbox, relays, settings, functools.partial(cli.run_reporting, f"{PROG} (watcher)"))
    warn_if_pid_1(program)
    return chain.Exec(path, program, environ)


def read_settings(options, environ, say, program):
    """Every option checked before anything is created; say(kind, text) speaks for the watcher."""
    passed = listenenv.inherited(environ, os.getpid())
    fd = None if options["--fd"] is None else fds.notification_fd("--fd", options["--fd"], environ)
    upstream = environ.get("NOTIFY_SOCKET") if options["--forward"] else None
    if options["--forward"] and not upstream:
        raise UsageError("--forward needs a NOTIFY_SOCKET to relay to, and none is set")
    timeout = None if options["--timeout"] is None else cli.seconds("--timeout", options["--timeout"])
    if options["--kill"] and timeout is None:
        raise UsageError("--kill goes with --timeout")
    check = read_check(options, environ, say)
    watchdog = read_watchdog(options, environ, say)
    ready_fd, ready_fd_var = cli.ready_fd(options, passed, fd, OURS)
    upstart = cli.upstart_job(options["--upstart"], program)
    touch = None if options["--touch"] is None else readyfile.ReadyFile(options["--touch"])
    grace = cli.seconds("--grace", options["--grace"], zero=True)
    command = read_command(options, grace)
    kill = options["--kill"]
    return watching.Settings(fd, upstream, timeout, kill, say, check, command, watchdog, touch, upstart, ready_fd, ready_fd_var, grace)


def inputs_environment(settings):
    """What PROG reads to say it is ready our other ways: UPSTART_JOB, --ready-fd-var's name."""
    environ = {} if settings.upstart is None else {"UPSTART_JOB": settings.upstart}
    if settings.ready_fd_var is not None:
        environ[settings.ready_fd_var] = str(settings.ready_fd)
    return environ


def read_watchdog(options, environ, say):
    """--watchdog's seconds, or None: also when our own supervisor watches us (WATCHDOG_USEC), whose pings --forward relays."""
    watched = "WATCHDOG_USEC" in environ and environ.get("WATCHDOG_PID", str(os.getpid())) == str(os.getpid())
    if watched and not options["--forward"]:
        say("warning", "WATCHDOG_USEC is set: without --forward the program's WATCHDOG=1 never reaches the supervisor")
    if options["--watchdog"] is None:
        return None
    if options["--fork"]:
        raise UsageError("--watchdog needs a watcher that stays with PROG: not with --fork, which leaves once PROG is ready")
    seconds = cli.seconds("--watchdog", options["--watchdog"])
    if watched and options["--forward"]:
        say("info", "--watchdog: our supervisor's watchdog (WATCHDOG_USEC) is relayed instead; there is one watchdog")
        return None
    return seconds


def watchdog_environment(seconds):
    """What PROG reads to ping our watchdog (sd_watchdog_enabled(3)): it keeps our pid in chain mode."""
    if seconds is None:
        return {}
    return {"WATCHDOG_USEC": str(int(seconds * 1e6)), "WATCHDOG_PID": str(os.getpid())}


def read_command(options, grace):
    """--command, and how long a run of it may take."""
    if options["--command"] is None:
        if "--command-timeout" in options["GIVEN"]:
            raise UsageError("--command-timeout goes with --command")
        return None
    seconds = cli.seconds("--command-timeout", options["--command-timeout"])
    return readiness.Command(options["--command"], seconds, grace)


def read_check(options, environ, say):
    """--check and its settings; --interval, --check-timeout and --tries only with it."""
    if options["--check"] is None:
        for option in ("--interval", "--check-timeout", "--tries"):
            if option in options["GIVEN"]:
                raise UsageError(f"{option} goes with --check")
        return None
    if not options["--check"].strip():
        raise UsageError("--check needs a command, for instance --check='nc -z 127.0.0.1 80'")
    interval = cli.seconds("--interval", options["--interval"])
    timeout = cli.seconds("--check-timeout", options["--check-timeout"])
    text = options["--tries"]
    if not (is_decimal(text) and len(text) <= 9):
        raise UsageError(f"--tries={text!r} is not a number of runs (0 for no limit)")
    if options["--verbose"]:
        warn_if_check_connects(options["--check"], listenenv.inherited(environ, os.getpid()), say)
    return readiness.Check(options["--check"], interval, timeout, int(text), environ, say)


def warn_if_check_connects(command, passed, say):
    """-v: said once if the check names the port (or path) of a socket passed to PROG, bound and listening already.

    The kernel completes a connect to a listening socket into its backlog
    whether or not anyone accepts: a check that only connects (nc -z) passes
    at once, before the program serves. One with a URL in it asks the
    program something in its protocol, and is not warned about.
    """
    if "://" in command:
        return
    from fdlaunch.kernel import sock  # only for -v with --check: a start-up cost the others do not pay

    for p in passed:
        try:
            name = sock.facts(p.fd)[4]
        except OSError:
            continue  # not a socket: nothing is listening there
        named = name if isinstance(name, str) else str(name[1]) if isinstance(name, tuple) else None
        # A port as a word of its own (':80', ' 80', '/dev/tcp/host/80', not 8080 or 10.0.0.80); a path whole.
        apart = r"[0-9A-Za-z.]" if isinstance(name, tuple) else r"[0-9A-Za-z/._-]"
        if named and re.search(rf"(?<!{apart}){re.escape(named)}(?!{apart})", command):
            advice = "a connect succeeds there before the program serves; ask the program itself, with a request it must answer"
            what = quoted(named)
            if isinstance(name, tuple):
                what, advice = f"port {named}", f"{advice} (--check='curl -fsS -o /dev/null http://127.0.0.1:{named}/', say)"
            say("warning", f"the check {command!r} names {what} of the socket labelled {p.label!r}, bound and listening already: {advice}")
            return


def warn_if_pid_1(program):
    """Said once, as PROG is about to become PID 1: nothing will reap the watcher but PROG, unless fdlaunch-init runs later."""
    if os.getpid() == 1 and "fdlaunch-init" not in {os.path.basename(word) for word in program}:
        warn(
            PROG,
            "warning",
            f"this is pid 1, and so will be {program[0]!r}: the watcher is its child, a zombie once it exits unless"
            f" {program[0]!r} reaps it; start the chain with fdlaunch-init (fdlaunch-init -- {PROG} ...), which reaps every orphan",
        )
