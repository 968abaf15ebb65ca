"""fdlaunch-notify-wait's two ways of watching PROG until it is ready.

Chain mode (start_watcher, watch): a watcher is left behind, detached by a
double fork, and PROG is exec'd in our place, keeping the pid; the watcher
relays PROG's readiness and, with --upstart, traces it from before the exec
(kernel.trace). Fork mode (fork_and_wait): PROG is started as our child, and
we return once it is ready, printing its pid, or fail once it cannot be.
"""

import errno
import os
import select
import signal
import time
from collections import namedtuple

from fdlaunch.errors import Fatal, counted, quoted, syscall_error
from fdlaunch.kernel import chain, fds, proc
from fdlaunch.loops import readiness

# --fork exit statuses, besides 0 (ready) and those of fdlaunch(7), EXIT STATUS
EXITED_BEFORE_READY = 1
NOT_READY_IN_TIME = 2
# What a process holding --touch's FILE ignores: FILE must stay exactly as long
# as PROG runs, and a stop signal sent to PROG's whole process group is PROG's
# to act on; PROG's exit, seen through a pidfd, is what ends the holder.
HOLDER_IGNORES = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)

# How long the watcher may take to start tracing PROG (--upstart, chain mode): it does so at once.
TRACE_START_SECONDS = 5

# fd: the s6 notification fd, or None; upstream: the NOTIFY_SOCKET to
# forward to, or None; timeout: seconds, or None; kill: --kill; say: speaks
# for the watcher (in fork mode, for us); check: a readiness.Check, or None;
# command: a readiness.Command, or None; watchdog: seconds between PROG's
# WATCHDOG=1 that we enforce, or None; touch: a readyfile.ReadyFile, or None;
# upstart: UPSTART_JOB's value (--upstart), or None; ready_fd: the fd
# PROG writes its readiness newline to (--ready-fd), or None; ready_fd_var:
# the variable that tells PROG that number, or None; grace: seconds PROG or a
# --command run may take to exit once asked to stop, before SIGKILL.
Settings = namedtuple("Settings", "fd upstream timeout kill say check command watchdog touch upstart ready_fd ready_fd_var grace")


def start_watcher(inbox, relays, settings, reporting):
    """Leave a watcher behind (double fork: PROG never has to reap it), then get ready to exec.

    reporting(function, *args) runs the watcher and says how it failed, if
    it did, under the watcher's name: (exit status, whether it failed).

    With --upstart the watcher traces this process from before the exec
    (kernel.trace): it tells us its pid, we let it, it seizes us.
    """
    try:
        program = readiness.Program(os.getpid(), os.pidfd_open(os.getpid()))
        ready_pipe = None if settings.ready_fd is None else os.pipe2(os.O_CLOEXEC)
        tracing = None if settings.upstart is None else tracing_channel()
    except OSError as error:
        raise fds.syscall_error(f"watch pid {os.getpid()}", error) from None
    ready_read = None if ready_pipe is None else ready_pipe[0]
    tracer_end = None if tracing is None else tracing[1]
    keep = {inbox.fileno(), program.pidfd, 2, *([relays.fd] if relays.fd is not None else [])}
    keep |= {relays.touch.fileno()} if relays.touch is not None else set()
    keep |= {fd for fd in (ready_read, None if tracer_end is None else tracer_end.fileno()) if fd is not None}
    middle = os.fork()
    if middle == 0:
        try:
            if os.fork() == 0:
                # Nobody reads its status: what ends it is said on stderr, under its own name.
                status, _ = reporting(watch, inbox, relays, settings, program, keep, ready_read, tracer_end)
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
    if tracing is not None:
        tracer_end.close()
        with tracing[0]:
            let_watcher_trace(tracing[0])
    if ready_pipe is not None:
        os.close(ready_read)  # first: it may be on fd N itself, which the write end then takes
        fds.place([(ready_pipe[1], settings.ready_fd)])


def tracing_channel():
    """The socket pair over which the watcher and the program agree on the tracing of --upstart."""
    import socket  # only --upstart in chain mode traces (tests/test_imports.py)

    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def let_watcher_trace(channel):
    """Our side of the watcher's PTRACE_SEIZE: Fatal (111) if it could not trace us, or did not say within TRACE_START_SECONDS."""
    from fdlaunch.kernel import trace

    pid = answer_of(channel)
    trace.allow_tracer(int(pid))
    try:
        channel.send(b"go")
        answer = answer_of(channel)
    finally:
        trace.name_tracer(0)  # the watcher is attached, or will not be: Yama may forget it
    if answer != b"ok":
        number = int(answer) if answer.isdigit() else errno.EIO
        raise Fatal(f"unable to trace pid {os.getpid()} for --upstart: {os.strerror(number)}{trace.refusal_hint()}")


def answer_of(channel):
    """The watcher's next message; Fatal if it has none for us within TRACE_START_SECONDS, or is gone."""
    if not select.select([channel], [], [], TRACE_START_SECONDS)[0]:
        raise Fatal(f"unable to trace pid {os.getpid()} for --upstart: the watcher did not answer within {TRACE_START_SECONDS} seconds")
    answer = channel.recv(64)
    if not answer:
        raise Fatal(f"unable to trace pid {os.getpid()} for --upstart: the watcher exited")
    return answer


def trace_program(channel, program, wakeup):
    """The watcher's side: tell our pid, wait for leave, seize the program; a TracedStops, or None if that failed.

    A failure is the program's side to say: it does not exec the program then.
    """
    from fdlaunch.kernel import trace

    with channel:
        channel.send(str(os.getpid()).encode())
        if not select.select([channel], [], [], TRACE_START_SECONDS)[0] or channel.recv(64) != b"go":
            return None
        try:
            trace.seize(program.pid)
        except OSError as error:
            channel.send(str(error.errno).encode())
            return None
        channel.send(b"ok")
    return readiness.TracedStops(program.pid, program.pidfd, wakeup)


def watch(inbox, relays, settings, program, keep, ready_read, tracer_end):
    """The detached watcher: until PROG is ready (and gone, with --forward, --watchdog or --touch). Its exit status is unused."""
    isolate(keep)
    if relays.touch is not None:
        ignore_stops()
    say = settings.say
    inputs, wakeup = [], None
    if ready_read is not None:
        inputs.append(readiness.ReadyPipe(ready_read, settings.ready_fd))
    if tracer_end is not None:
        wakeup = proc.catch_signals((signal.SIGCHLD,))  # before the seize: no stop goes unseen
        traced = trace_program(tracer_end, program, wakeup)
        if traced is None:
            return 0  # the program's side says why, and does not exec it
        inputs.append(traced)
    watcher = readiness.Watcher(inbox, program, relays, relays.upstream is not None, say, settings.check, wakeup, settings.watchdog, inputs)
    try:
        outcome = watcher.run(settings.timeout)
        while outcome == readiness.NOT_READY:
            why = f"pid {program.pid} {watcher.why_not_ready}"
            if settings.kill:
                stop_watched(watcher, why, signal.SIGTERM, settings.grace)
                return 0
            say("warning", why)
            outcome = watcher.run()  # a READY=1 still counts
        if outcome == readiness.READY and not watcher.keep_relaying:
            watcher.linger()
        if outcome == readiness.WATCHDOG:
            stop_watched(watcher, f"pid {program.pid} {watcher.barked}", signal.SIGABRT, settings.grace)
    finally:
        watcher.close_inputs()
        stop_check(settings)
        inbox.close()
        if relays.touch is not None:
            hold_until_exit(relays.touch, program.pidfd, say)
    return 0


def stop_watched(watcher, why, number, grace):
    """Chain mode: PROG gets number, then SIGKILL after grace seconds (relaying meanwhile); each step said.

    SIGTERM for --kill; SIGABRT for the watchdog, for a core the admin can read.
    Its supervisor, PROG's parent, restarts it.
    """
    program, say = watcher.program, watcher.say
    name = signal.Signals(number).name
    say("warning", f"{why}; sending it {name}")
    watcher.close_inputs()  # a traced program is released first, to take the signal
    proc.send_pidfd(program.pidfd, number)
    if not watcher.until_exit(time.monotonic() + grace):
        say("warning", f"pid {program.pid} was still running {counted(grace, 'second')} after {name}; sent it SIGKILL")
        proc.send_pidfd(program.pidfd, signal.SIGKILL)
        watcher.until_exit(time.monotonic() + grace)  # SIGKILL is not ignored: the kernel's time to end it


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


def start_holder(touch, child, pidfd, grace, say):
    """Fork mode: leave a process that removes FILE when PROG exits (orphaned as we exit: init or a subreaper reaps it).

    If it cannot be started, FILE is removed and PROG stopped: a FILE that
    outlived PROG would tell a probe that PROG is still ready.
    """
    try:
        holder = os.fork()
    except OSError as error:
        touch.remove()
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        reap(child, pidfd, signal.SIGTERM, grace)
        raise syscall_error(f"start a process to remove {quoted(touch.path)} when pid {child} exits (so stopped it)", error) from None
    if holder == 0:
        try:
            # It outlives us: it names itself as the chain-mode watcher does.
            fds.keep_only({pidfd, touch.fileno()})
            ignore_stops()
            hold_until_exit(touch, pidfd, say)
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


def fork_and_wait(inbox, relays, settings, program, environ, holder_say):
    """Start program (a chain.Program) as our child; once it is ready print its pid and return 0, else Fatal.

    A process left to remove --touch's FILE at its exit speaks with holder_say.
    """
    child, pidfd, signals, ready_read = spawn_catching_stops(program, environ, settings)
    inputs = [] if ready_read is None else [readiness.ReadyPipe(ready_read, settings.ready_fd)]
    inputs += [] if settings.upstart is None else [readiness.ChildStops(child, pidfd)]
    watcher = readiness.Watcher(inbox, readiness.Program(child, pidfd), relays, False, settings.say, settings.check, signals, inputs=inputs)
    try:
        try:
            outcome = watcher.run(settings.timeout)
        except Fatal as error:
            # A program whose readiness nobody can learn is stopped, not left behind.
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
            status, killed = reap(child, pidfd, signal.SIGTERM, settings.grace)
            raise Fatal(f"{error}; stopped {program.argv[0]} (pid {child}): {chain.describe_exit(status)}{killed}", error.status) from None
        if outcome == readiness.READY:
            if relays.touch is not None and relays.touch.made is not None:
                start_holder(relays.touch, child, pidfd, settings.grace, holder_say)
            tell_pid(watcher.main_pid, child, pidfd, settings.grace)
            watcher.linger()
            pass_stops(watcher, pidfd)  # a stop that came after READY=1 is still PROG's
            return 0
    finally:
        watcher.close_inputs()
        stop_check(settings)
        inbox.close()
    name = f"{program.argv[0]} (pid {child})"
    if outcome == readiness.STOPPED:
        asked = pass_stops(watcher, pidfd)
        status, killed = reap(child, pidfd, asked, settings.grace)
        raise Fatal(f"{name} {chain.describe_exit(status)} before it was ready{killed}", EXITED_BEFORE_READY)
    if outcome == readiness.NOT_READY:
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        status, killed = reap(child, pidfd, signal.SIGTERM, settings.grace)
        raise Fatal(f"{name} {watcher.why_not_ready}; stopped it: {chain.describe_exit(status)}{killed}", NOT_READY_IN_TIME)
    status, _ = reap(child, pidfd, None, settings.grace)
    raise Fatal(f"{name} {chain.describe_exit(status)} before it was ready", EXITED_BEFORE_READY)


def spawn_catching_stops(program, environ, settings):
    """Start PROG as a child; SIGINT and SIGTERM (and SIGCHLD for --upstart), from the moment it exists, go to a wakeup
    pipe. Returns its pid, its pidfd, that pipe, and the read end of --ready-fd's pipe or None.

    They stay blocked until the pipe is in place: one that came while PROG
    was being exec'd would have killed us and left it.
    """
    stops = (signal.SIGINT, signal.SIGTERM)
    caught = [number for number in stops if signal.getsignal(number) is not signal.SIG_IGN]
    caught += [signal.SIGCHLD] if settings.upstart is not None else []  # what tells us PROG stopped
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, (*stops, signal.SIGCHLD))

    def setup():
        # PROG's stdout is our stderr: our stdout carries the one line a script reads
        # with $(...), which would wait forever while a daemon held it open.
        os.dup2(2, 1)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # PROG gets the mask we were given

    ready_pipe = None
    try:
        if settings.ready_fd is not None:
            ready_pipe = os.pipe2(os.O_CLOEXEC)
        moves = [] if ready_pipe is None else [(ready_pipe[1], settings.ready_fd)]
        child = chain.spawn(program, environ, setup=setup, moves=moves)
        pidfd = os.pidfd_open(child)
        wakeup = proc.catch_signals(caught)
    except OSError as error:
        raise fds.syscall_error(f"start {program.argv[0]!r}", error) from None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if ready_pipe is not None:
            os.close(ready_pipe[1])  # PROG's alone: its end of file is PROG's
    return child, pidfd, wakeup, None if ready_pipe is None else ready_pipe[0]


def pass_stops(watcher, pidfd):
    """Pass PROG the stop signals we caught; the first of them, or None."""
    caught = watcher.caught()
    for number in caught:
        proc.send_pidfd(pidfd, number)
    return caught[0] if caught else None


def tell_pid(pid, child, pidfd, grace):
    """The one line a script reads; a daemon whose pid nobody could learn is stopped, not left behind."""
    try:
        os.write(1, f"{pid}\n".encode())
    except OSError as error:
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        reap(child, pidfd, signal.SIGTERM, grace)
        raise syscall_error(f"write pid {pid} on stdout (so stopped it)", error) from None


def reap(child, pidfd, asked, grace):
    """Wait for the child, grace seconds once it was asked to stop with signal asked (else as long as it runs), then SIGKILL.

    Returns its wait status, and '' or the words that say it had to be SIGKILLed.
    """
    killed = ""
    if asked is not None and proc.end_within([pidfd], grace):
        killed = f" (still running {counted(grace, 'second')} after {signal.Signals(asked).name}, so sent it SIGKILL)"
    while True:
        try:
            return os.waitpid(child, 0)[1], killed
        except InterruptedError:
            continue
