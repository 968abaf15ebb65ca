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
  --command=CMD      Once ready, run CMD with /bin/sh, its output to stderr.
  --stop             Once ready, stop PROG with SIGSTOP (upstart).
  --timeout=SECONDS  Say so if PROG is not ready in time.
  --kill             With --timeout, then send PROG SIGTERM.
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
import signal
import time
from collections import namedtuple

from fdlaunch import cli
from fdlaunch.cli import tool
from fdlaunch.errors import Fatal, UsageError, say_as, unable
from fdlaunch.kernel import chain, fds, proc, sdnotify
from fdlaunch.loops import readiness
from fdlaunch.text import listenenv
from fdlaunch.text.numbers import is_decimal

PROG = "fdlaunch-notify-wait"
# --fork exit statuses, besides 0 (ready) and those of fdlaunch(7), EXIT STATUS
EXITED_BEFORE_READY = 1
NOT_READY_IN_TIME = 2
GRACE_SECONDS = 5  # after SIGTERM at --timeout in --fork mode, before SIGKILL

# fd: the s6 notification fd, or None; upstream: the NOTIFY_SOCKET to
# forward to, or None; timeout: seconds, or None; kill: --kill; say: speaks
# for the watcher; check: a readiness.Check, or None.
Settings = namedtuple("Settings", "fd upstream timeout kill say check")


@tool(PROG)
def main(argv, environ):
    options = cli.parse(__doc__, argv)
    program = [options["PROG"], *options["ARGS"]]
    # Without --fork the watching is done by a process forked for it, and it says so (s6-notifyoncheck's "(child)").
    say = say_as(PROG if options["--fork"] else f"{PROG} (watcher)", options["--verbose"])
    settings = read_settings(options, environ, say)
    path = chain.find_program(program[0], environ)
    inbox = sdnotify.Inbox()
    relays = readiness.Relays(settings.fd, settings.upstream, options["--command"], options["--stop"], environ)
    environ = {**environ, "NOTIFY_SOCKET": inbox.path}  # PROG's; --command keeps the caller's (issue 9)
    if options["--fork"]:
        return fork_and_wait(inbox, relays, settings, path, program, environ)
    start_watcher(inbox, relays, settings)
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
    return Settings(fd, upstream, timeout, options["--kill"], say, check)


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


def watch(inbox, relays, settings, program, keep):
    """The detached watcher: until PROG is ready (and gone, with --forward). Its exit status is unused."""
    isolate(keep)
    say = settings.say
    watcher = readiness.Watcher(inbox, program, relays, relays.upstream is not None, say, settings.check)
    try:
        deadline = None if settings.timeout is None else time.monotonic() + settings.timeout
        outcome = watcher.run(deadline)
        if outcome == readiness.GAVE_UP:
            watcher.check = None  # a READY=1 from PROG still counts
            if settings.kill:
                say("warning", f"pid {program.pid} is not ready; sending it SIGTERM")
                signal.pidfd_send_signal(program.pidfd, signal.SIGTERM)
            outcome = watcher.run(deadline)
        if outcome == readiness.READY and not watcher.keep_relaying:
            watcher.linger()
        if outcome == readiness.LATE:
            kill = "; sending it SIGTERM" if settings.kill else ""
            say("warning", f"pid {program.pid} was not ready after {settings.timeout:g} seconds{kill}")
            if settings.kill:
                signal.pidfd_send_signal(program.pidfd, signal.SIGTERM)
            watcher.run()
    finally:
        stop_check(settings)
        inbox.close()
    return 0


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


def fork_and_wait(inbox, relays, settings, path, program, environ):
    child, pidfd = spawn_passing_stops(path, program, environ)
    watcher = readiness.Watcher(inbox, readiness.Program(child, pidfd), relays, False, settings.say, settings.check)
    try:
        deadline = None if settings.timeout is None else time.monotonic() + settings.timeout
        try:
            outcome = watcher.run(deadline)
        except Fatal as error:
            # A program whose readiness nobody can learn is stopped, not left behind.
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
            status = reap(child, pidfd, GRACE_SECONDS)
            raise Fatal(f"{error}; stopped {program[0]} (pid {child}): {chain.describe_exit(status)}", error.status) from None
        if outcome == readiness.READY:
            tell_pid(watcher.main_pid, child, pidfd)
            watcher.linger()
            return 0
    finally:
        stop_check(settings)
        inbox.close()
    if outcome == readiness.GAVE_UP:
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        status = reap(child, pidfd, GRACE_SECONDS)
        raise Fatal(
            f"{program[0]} (pid {child}) was not ready: its check gave up; stopped it: {chain.describe_exit(status)}", NOT_READY_IN_TIME
        )
    if outcome == readiness.LATE:
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        status = reap(child, pidfd, GRACE_SECONDS)
        raise Fatal(
            f"{program[0]} (pid {child}) was not ready after {settings.timeout:g} seconds; stopped it: {chain.describe_exit(status)}",
            NOT_READY_IN_TIME,
        )
    status = reap(child, pidfd, None)
    raise Fatal(f"{program[0]} (pid {child}) {chain.describe_exit(status)} before it was ready", EXITED_BEFORE_READY)


def spawn_passing_stops(path, program, environ):
    """Start PROG as a child, SIGINT and SIGTERM passed to it from the moment it exists; (pid, pidfd).

    They stay blocked until the handler that passes them is in place: one
    that came while PROG was being exec'd would have killed us and left it.
    """
    stops = (signal.SIGINT, signal.SIGTERM)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, stops)

    def setup():
        # PROG's stdout is our stderr: our stdout carries the one line a script reads
        # with $(...), which would wait forever while a daemon held it open.
        os.dup2(2, 1)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # PROG gets the mask we were given

    try:
        child = chain.spawn(path, program, environ, setup=setup, become=lambda step: cli.become(PROG, step))
        pidfd = os.pidfd_open(child)
        for number in stops:
            signal.signal(number, lambda number, frame: signal.pidfd_send_signal(pidfd, number))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return child, pidfd


def tell_pid(pid, child, pidfd):
    """The one line a script reads; a daemon whose pid nobody could learn is stopped, not left behind."""
    try:
        os.write(1, f"{pid}\n".encode())
    except OSError as error:
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        reap(child, pidfd, GRACE_SECONDS)
        raise unable(f"write pid {pid} on stdout (so stopped it)", error) from None


def reap(child, pidfd, grace):
    """Wait for the child; after grace seconds, SIGKILL it. Returns its wait status."""
    if grace is not None:
        proc.end_within([pidfd], grace)
    while True:
        try:
            return os.waitpid(child, 0)[1]
        except InterruptedError:
            continue
