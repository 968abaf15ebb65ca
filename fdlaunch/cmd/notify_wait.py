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
                     (default 60).
  --stop             Once ready, stop PROG with SIGSTOP (upstart).
  --timeout=SECONDS  Say so if PROG is not ready in time.
  --kill             With --timeout, then send PROG SIGTERM.
  --watchdog=SECS    Once ready, PROG must send WATCHDOG=1 at least this
                     often, or it gets SIGABRT, then SIGKILL.
  --fork             Start PROG as a child, wait until it is ready, print
                     its pid, exit.
  --check=CMD        PROG is also ready once CMD, run with /bin/sh, exits 0;
                     it is run until then (s6-notifyoncheck).
  --interval=SECS    With --check, the pause after a failed run (default 1).
  --check-timeout=SECS  With --check, kill a run that takes longer
                     (default 10).
  --tries=N          With --check, give up after N failed runs (default 0:
                     no limit).
  -v, --verbose      Say on stderr what is relayed where, and when PROG
                     got ready.
  -h, --help         Print this help.
  --version          Print the version.
"""

import os
import select
import signal
import time
from collections import namedtuple

from fdlaunch import cli
from fdlaunch.cli import tool
from fdlaunch.errors import Fatal, UsageError, say_as, shown, unable, warn
from fdlaunch.kernel import chain, fds, proc, readyfile, sdnotify
from fdlaunch.loops import readiness
from fdlaunch.text import listenenv
from fdlaunch.text.numbers import is_decimal

PROG = "fdlaunch-notify-wait"
# --fork exit statuses, besides 0 (ready) and those of fdlaunch(7), EXIT STATUS
EXITED_BEFORE_READY = 1
NOT_READY_IN_TIME = 2
# What a process holding --touch's FILE ignores: FILE must stay exactly as long
# as PROG runs, and a stop signal sent to PROG's whole process group is PROG's
# to act on; PROG's exit, seen through a pidfd, is what ends the holder.
HOLDER_IGNORES = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)

# fd: the s6 notification fd, or None; upstream: the NOTIFY_SOCKET to
# forward to, or None; timeout: seconds, or None; kill: --kill; say: speaks
# for the watcher; check: a readiness.Check, or None; command: a
# readiness.Command, or None; watchdog: seconds between PROG's WATCHDOG=1
# that we enforce, or None; touch: a readyfile.ReadyFile, or None.
Settings = namedtuple("Settings", "fd upstream timeout kill say check command watchdog touch")


@tool(PROG)
def main(argv, environ):
    options = cli.parse(__doc__, argv)
    program = [options["PROG"], *options["ARGS"]]
    # Without --fork the watching is done by a process forked for it, and it says so (s6-notifyoncheck's "(child)").
    say = say_as(PROG if options["--fork"] else f"{PROG} (watcher)", options["--verbose"])
    settings = read_settings(options, environ, say)
    path = cli.find_program(program[0], environ)
    inbox = sdnotify.Inbox()
    relays = readiness.Relays(settings.fd, settings.upstream, settings.command, options["--stop"], environ, settings.touch)
    # PROG's; --command keeps the caller's
    environ = {**environ, **watchdog_environment(settings.watchdog), "NOTIFY_SOCKET": inbox.path}
    if options["--fork"]:
        return fork_and_wait(inbox, relays, settings, program, environ)
    start_watcher(inbox, relays, settings)
    warn_if_pid_1(program)
    return chain.Exec(path, program, environ)


def read_settings(options, environ, say):
    """Every option checked before anything is created; say(kind, text) speaks for the watcher."""
    fd = None if options["--fd"] is None else fds.open_fd_option("--fd", options["--fd"], listenenv.inherited(environ, os.getpid()))
    upstream = environ.get("NOTIFY_SOCKET") if options["--forward"] else None
    if options["--forward"] and not upstream:
        raise UsageError("--forward needs a NOTIFY_SOCKET to relay to, and none is set")
    timeout = None if options["--timeout"] is None else cli.seconds("--timeout", options["--timeout"])
    if options["--kill"] and timeout is None:
        raise UsageError("--kill goes with --timeout")
    check = read_check(options, environ, say)
    watchdog = read_watchdog(options, environ, say)
    touch = None if options["--touch"] is None else readyfile.ReadyFile(options["--touch"])
    return Settings(fd, upstream, timeout, options["--kill"], say, check, read_command(options), watchdog, touch)


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


def read_command(options):
    """--command, and how long a run of it may take."""
    if options["--command"] is None:
        if options["--command-timeout"] is not None:
            raise UsageError("--command-timeout goes with --command")
        return None
    seconds = cli.seconds("--command-timeout", options["--command-timeout"] or str(readiness.COMMAND_SECONDS))
    return readiness.Command(options["--command"], seconds)


def read_check(options, environ, say):
    """--check and its settings; --interval, --check-timeout and --tries only with it."""
    if options["--check"] is None:
        for option in ("--interval", "--check-timeout", "--tries"):
            if options[option] is not None:
                raise UsageError(f"{option} goes with --check")
        return None
    if not options["--check"].strip():
        raise UsageError("--check needs a command, for instance --check='nc -z 127.0.0.1 80'")
    interval = cli.seconds("--interval", options["--interval"] or "1")
    timeout = cli.seconds("--check-timeout", options["--check-timeout"] or "10")
    text = options["--tries"] or "0"
    if not (is_decimal(text) and len(text) <= 9):
        raise UsageError(f"--tries={text!r} is not a number of runs (0 for no limit)")
    return readiness.Check(options["--check"], interval, timeout, int(text), environ, say)


def start_watcher(inbox, relays, settings):
    """Leave a watcher behind (double fork: PROG never has to reap it), then get ready to exec."""
    try:
        program = readiness.Program(os.getpid(), os.pidfd_open(os.getpid()))
    except OSError as error:
        raise fds.syscall_error(f"watch pid {os.getpid()}", error) from None
    keep = {inbox.fileno(), program.pidfd, 2, *([relays.fd] if relays.fd is not None else [])}
    keep |= {relays.touch.fileno()} if relays.touch is not None else set()
    middle = os.fork()
    if middle == 0:
        try:
            if os.fork() == 0:
                # Nobody reads its status: what ends it is said on stderr, under its own name.
                status, _ = cli.attempt(f"{PROG} (watcher)", watch, inbox, relays, settings, program, keep)
                os._exit(status)
        finally:
            os._exit(0)
    os.waitpid(middle, 0)
    os.close(program.pidfd)
    inbox.sock.close()  # the watcher's now
    if relays.fd is not None:
        os.close(relays.fd)  # PROG does not inherit the notification fd
    if relays.touch is not None:
        relays.touch.close()  # nor the directory of --touch's FILE


def warn_if_pid_1(program):
    """Said once, as PROG is about to become PID 1: nothing will reap the watcher but PROG, unless fdlaunch-init runs later."""
    if os.getpid() == 1 and "fdlaunch-init" not in {os.path.basename(word) for word in program}:
        warn(
            PROG,
            "warning",
            f"this is pid 1, and so will be {program[0]!r}: the watcher is its child, a zombie once it exits unless"
            f" {program[0]!r} reaps it; start the chain with fdlaunch-init (fdlaunch-init -- {PROG} ...), which reaps every orphan",
        )


def watch(inbox, relays, settings, program, keep):
    """The detached watcher: until PROG is ready (and gone, with --forward, --watchdog or --touch). Its exit status is unused."""
    isolate(keep)
    if relays.touch is not None:
        ignore_stops()
    say = settings.say
    watcher = readiness.Watcher(inbox, program, relays, relays.upstream is not None, say, settings.check, watchdog=settings.watchdog)
    try:
        deadline = None if settings.timeout is None else time.monotonic() + settings.timeout
        outcome = watcher.run(deadline)
        if outcome == readiness.GAVE_UP:
            watcher.check = None  # a READY=1 from PROG still counts
            if settings.kill:
                stop_watched(watcher, f"pid {program.pid} is not ready", signal.SIGTERM)
                return 0
            outcome = watcher.run(deadline)
        if outcome == readiness.LATE:
            late = f"pid {program.pid} was not ready after {waited(watcher, settings)}"
            if settings.kill:
                stop_watched(watcher, late, signal.SIGTERM)
                return 0
            say("warning", late)
            outcome = watcher.run()
        if outcome == readiness.READY and not watcher.keep_relaying:
            watcher.linger()
        if outcome == readiness.WATCHDOG:
            stop_watched(watcher, f"pid {program.pid} {watcher.barked}", signal.SIGABRT)
    finally:
        stop_check(settings)
        inbox.close()
        if relays.touch is not None:
            hold_until_exit(relays.touch, program.pidfd, say)
    return 0


def waited(watcher, settings):
    """How long PROG was given to be ready, in words."""
    if watcher.extended:
        return f"{time.monotonic() - watcher.started:.1f} seconds (its EXTEND_TIMEOUT_USEC included)"
    return f"{settings.timeout:g} seconds"


def stop_watched(watcher, why, number):
    """Chain mode: PROG gets number, then SIGKILL after GRACE_SECONDS (relaying meanwhile); each step said.

    SIGTERM for --kill; SIGABRT for the watchdog, for a core the admin can read.
    Its supervisor, PROG's parent, restarts it.
    """
    program, say = watcher.program, watcher.say
    name = signal.Signals(number).name
    say("warning", f"{why}; sending it {name}")
    proc.send_pidfd(program.pidfd, number)
    if not watcher.until_exit(time.monotonic() + readiness.GRACE_SECONDS):
        say("warning", f"pid {program.pid} was still running {readiness.GRACE_SECONDS} seconds after {name}; sent it SIGKILL")
        proc.send_pidfd(program.pidfd, signal.SIGKILL)
        watcher.until_exit(time.monotonic() + readiness.GRACE_SECONDS)


def ignore_stops():
    for number in HOLDER_IGNORES:
        signal.signal(number, signal.SIG_IGN)


def hold_until_exit(touch, pidfd, say):
    """Keep --touch's FILE, if it was made, until PROG (behind pidfd) exits; then remove it."""
    if touch.made is not None:
        select.select([pidfd], [], [])  # no deadline: FILE lasts as long as PROG
    try:
        touch.remove()
    except Fatal as error:
        say("warning", str(error))


def start_holder(touch, child, pidfd):
    """Fork mode: leave a process that removes FILE when PROG exits (orphaned as we exit: init or a subreaper reaps it).

    If it cannot be started, FILE is removed and PROG stopped: a FILE that
    outlived PROG would tell a probe that PROG is still ready.
    """
    try:
        holder = os.fork()
    except OSError as error:
        touch.remove()
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        reap(child, pidfd, signal.SIGTERM)
        raise unable(f"start a process to remove {shown(touch.path)} when pid {child} exits (so stopped it)", error) from None
    if holder == 0:
        try:
            # It outlives us: it names itself as the chain-mode watcher does.
            fds.keep_only({pidfd, touch.fileno()})
            ignore_stops()
            hold_until_exit(touch, pidfd, say_as(f"{PROG} (watcher)"))
        finally:
            os._exit(0)


def stop_check(settings):
    if settings.check is not None:
        settings.check.stop()


def isolate(keep):
    """The watcher holds nothing of PROG's: not its sockets, not its stdin or stdout."""
    try:
        fds.keep_only(keep)
    except OSError as error:
        raise fds.syscall_error("close the program's descriptors in the watcher", error) from None
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def fork_and_wait(inbox, relays, settings, program, environ):
    child, pidfd, stops = spawn_catching_stops(program, environ)
    watcher = readiness.Watcher(inbox, readiness.Program(child, pidfd), relays, False, settings.say, settings.check, stops)
    try:
        deadline = None if settings.timeout is None else time.monotonic() + settings.timeout
        try:
            outcome = watcher.run(deadline)
        except Fatal as error:
            # A program whose readiness nobody can learn is stopped, not left behind.
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
            status, killed = reap(child, pidfd, signal.SIGTERM)
            raise Fatal(f"{error}; stopped {program[0]} (pid {child}): {chain.describe_exit(status)}{killed}", error.status) from None
        if outcome == readiness.READY:
            if relays.touch is not None and relays.touch.made is not None:
                start_holder(relays.touch, child, pidfd)
            tell_pid(watcher.main_pid, child, pidfd)
            watcher.linger()
            pass_stops(stops, pidfd)  # a stop that came after READY=1 is still PROG's
            return 0
    finally:
        stop_check(settings)
        inbox.close()
    name = f"{program[0]} (pid {child})"
    if outcome == readiness.STOPPED:
        asked = pass_stops(stops, pidfd)
        status, killed = reap(child, pidfd, asked)
        raise Fatal(f"{name} {chain.describe_exit(status)} before it was ready{killed}", EXITED_BEFORE_READY)
    if outcome in (readiness.GAVE_UP, readiness.LATE):
        why = "not ready: its check gave up" if outcome == readiness.GAVE_UP else f"not ready after {waited(watcher, settings)}"
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        status, killed = reap(child, pidfd, signal.SIGTERM)
        raise Fatal(f"{name} was {why}; stopped it: {chain.describe_exit(status)}{killed}", NOT_READY_IN_TIME)
    status, _ = reap(child, pidfd, None)
    raise Fatal(f"{name} {chain.describe_exit(status)} before it was ready", EXITED_BEFORE_READY)


def spawn_catching_stops(program, environ):
    """Start PROG as a child; SIGINT and SIGTERM, from the moment it exists, go to a wakeup pipe. (pid, pidfd, pipe).

    They stay blocked until the pipe is in place: one that came while PROG
    was being exec'd would have killed us and left it.
    """
    stops = (signal.SIGINT, signal.SIGTERM)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, stops)

    def setup():
        # PROG's stdout is our stderr: our stdout carries the one line a script reads
        # with $(...), which would wait forever while a daemon held it open.
        os.dup2(2, 1)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # PROG gets the mask we were given

    try:
        child = chain.spawn(cli.program(program, environ), environ, setup=setup)
        pidfd = os.pidfd_open(child)
        caught = proc.catch_signals([number for number in stops if signal.getsignal(number) is not signal.SIG_IGN])
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return child, pidfd, caught


def pass_stops(stops, pidfd):
    """Pass PROG the stop signals we caught; the first of them, or None."""
    caught = proc.caught_signals(stops)
    for number in caught:
        proc.send_pidfd(pidfd, number)
    return caught[0] if caught else None


def tell_pid(pid, child, pidfd):
    """The one line a script reads; a daemon whose pid nobody could learn is stopped, not left behind."""
    try:
        os.write(1, f"{pid}\n".encode())
    except OSError as error:
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        reap(child, pidfd, signal.SIGTERM)
        raise unable(f"write pid {pid} on stdout (so stopped it)", error) from None


def reap(child, pidfd, asked):
    """Wait for the child, GRACE_SECONDS once it was asked to stop with signal asked (else as long as it runs), then SIGKILL.

    (its wait status, '' or the words that say it had to be SIGKILLed).
    """
    killed = ""
    if asked is not None and proc.end_within([pidfd], readiness.GRACE_SECONDS):
        killed = f" (still running {readiness.GRACE_SECONDS} seconds after {signal.Signals(asked).name}, so sent it SIGKILL)"
    while True:
        try:
            return os.waitpid(child, 0)[1], killed
        except InterruptedError:
            continue
