"""fdlaunch-accept's loop: one handler process per connection, spawned, counted, reaped.

One poll(2) waits on everything that can happen: a client on the listening
socket (registered only while below the -c limit, so that a client beyond
it waits in the kernel's backlog), a signal (Python's wakeup fd), a
handler's exit (its pidfd), and the guard's exit. Handlers are started
with posix_spawn(3) (glibc's uses CLONE_VFORK: no copy of the interpreter)
and, since glibc 2.24, that call itself fails with the exec's errno; a
program the child runs itself (chain.Program.run_here) by a fork set up as
posix_spawn would set it up (chain.spawn_like_posix_spawn).
"""

import collections
import errno
import os
import select
import signal
import socket
import stat
import time

from fdlaunch.errors import Fatal, UsageError, counted, pids_listed, quoted, syscall_error
from fdlaunch.kernel import chain, creds, fds, proc, sdnotify
from fdlaunch.loops import readiness
from fdlaunch.text import rules, spec, ucspi

STOPS = (signal.SIGTERM, signal.SIGINT)
RELOAD = signal.SIGHUP
ACCEPT_BATCH = 64  # accepts per turn, so signals and exits are heard under a flood
PAUSE_SECONDS = 1  # after EMFILE and the like: the backlog holds clients meanwhile
LOOKUP_THREADS = 4
DONE = b"d"  # the server tells its guard it leaves no handler behind

# environ: the server's own; notify_socket: where READY=1 and STOPPING=1 go,
# or None; max, max_per (or None): -c and -C; inetd, local_host, lookup:
# --inetd, -l, --lookup; grace: seconds before SIGKILL at the stop;
# rules_path and rules: --rules and what it read (or None), read again on
# SIGHUP; ready_fd: the s6 notification fd, or None.
Settings = collections.namedtuple("Settings", "environ notify_socket max max_per inetd local_host lookup grace rules_path rules ready_fd")


def read_rules(path):
    """The --rules file at path, read and parsed; UsageError for what it says, Fatal if it cannot be read."""
    try:
        # O_NONBLOCK: a FIFO in its place must not stop the server at SIGHUP
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        with open(fd, encoding="utf-8") as file:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UsageError(f"rules file {quoted(path)}: not a regular file")
            text = file.read()
    except UnicodeDecodeError:
        raise UsageError(f"rules file {path}: not UTF-8 text") from None
    except OSError as error:
        raise syscall_error(f"read the rules file {path}", error) from None
    return rules.parse(text, f"rules file {path}", creds.Lookups())


class GroupGuard:
    """A small process that leads the handlers' process group and ends it if the server dies.

    posix_spawn(3) cannot run prctl(PR_SET_PDEATHSIG) in each handler between
    fork and exec, so this one process stands in for it: it holds the read
    end of a pipe only the server can write to, and when that end reads EOF
    without the server's DONE (the server died, even by SIGKILL), it sends
    the group SIGTERM and SIGCONT, then SIGKILL after grace seconds.
    """

    def __init__(self, grace, say):
        alive_read, alive_write = os.pipe2(os.O_CLOEXEC)
        server = os.getpid()
        pid = os.fork()  # once per server, not per connection: see the class comment
        if pid == 0:
            try:
                os.close(alive_write)
                _guard(alive_read, grace, server, say)
            finally:
                os._exit(0)
        os.close(alive_read)
        try:
            os.setpgid(pid, pid)  # also done in the child: whichever runs first
        except OSError:
            pass
        self.pid, self.alive, self.pidfd = pid, alive_write, os.pidfd_open(pid)

    def release(self):
        """The server leaves cleanly: the guard kills what handlers left in the group, and exits."""
        try:
            os.write(self.alive, DONE)
        except OSError:
            pass
        os.close(self.alive)
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        os.close(self.pidfd)


def _guard(alive, grace, server, say):
    os.setpgid(0, 0)
    proc.name_self("accept (guard)")  # so that ps(1) and top(1) tell it from the server
    fds.close_all(fds.open_fds() - {2, alive})
    signal.set_wakeup_fd(-1)
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(number, signal.SIG_IGN)  # our own group's signal is not for us
    group = os.getpid()
    if os.read(alive, 1) == DONE:
        if proc.others_in_group(group):  # what handlers left behind still holds clients' connections
            os.killpg(group, signal.SIGKILL)
        return
    if not proc.others_in_group(group):
        return
    say("warning", f"its server (pid {server}) died; stopping the handlers (SIGTERM, then SIGKILL after {counted(grace, 'second')})")
    for number in (signal.SIGTERM, signal.SIGCONT):
        os.killpg(group, number)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and proc.others_in_group(group):
        time.sleep(0.05)
    if proc.others_in_group(group):
        say("warning", f"handlers still running {counted(grace, 'second')} after SIGTERM; sent them SIGKILL")
    os.killpg(group, signal.SIGKILL)  # and the guard with them


class Client:
    """An accepted connection on its way to a handler, then that handler."""

    def __init__(self, connection, peer, key, count, local, variables):
        self.connection, self.peer, self.key, self.count, self.local = connection, peer, key, count, local
        self.variables = variables  # from the rule that allowed it
        self.local_host = self.remote_host = None  # --lookup's findings
        self.pid = self.pidfd = None


class Resolver:
    """Reverse DNS for --lookup in worker threads: a slow answer holds up its own client, never the loop."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max_workers=LOOKUP_THREADS)
        self.wakeup, self.write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.answered = collections.deque()  # clients whose lookup is over; appends and pops are thread-safe

    def submit(self, client):
        def look_up():
            try:
                client.remote_host = host_name(client.peer.ip)
                client.local_host = host_name(ucspi.plain_ip(client.local[0]))  # ::ffff:a.b.c.d has no name
            finally:
                self.answered.append(client)
                try:
                    os.write(self.write_end, b".")
                except BlockingIOError:
                    pass  # the pipe is full, so the loop will look anyway

        self.pool.submit(look_up)

    def finished(self):
        try:
            os.read(self.wakeup, 65536)
        except BlockingIOError:
            pass
        while self.answered:
            yield self.answered.popleft()

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)
        os.close(self.wakeup)
        os.close(self.write_end)


def link_of(address):
    """The name of the interface a link-local IPv6 client came through (its scope id, RFC 4007); None for others.

    An interface gone since the connection came is named by its number,
    which no rule names, so a zoned rule cannot match it.
    """
    if not isinstance(address, tuple) or len(address) < 4 or not address[3]:
        return None
    try:
        return socket.if_indextoname(address[3])
    except OSError:
        return str(address[3])


def host_name(ip):
    """The name the address maps back to, lowercased as tcpserver does; None when there is none."""
    try:
        return socket.getnameinfo((str(ip), 0), socket.NI_NAMEREQD)[0].lower()
    except OSError:
        return None


class Server:
    """Serve the listening socket until SIGTERM or SIGINT; run() returns the exit status."""

    def __init__(self, listener, program, settings, say, guard_say):
        """program: a chain.Program; say(kind, text): kind start and end for each handler, info, warning; guard_say speaks
        for the guard."""
        self.listener, self.program, self.settings, self.say, self.guard_say = listener, program, settings, say, guard_say
        self.unix = listener.family == socket.AF_UNIX
        self.local_path = spec.unix_name(listener.getsockname()) if self.unix else None
        self.environ = ucspi.base_environment(settings.environ)
        self.rules = settings.rules
        self.ready_fd = settings.ready_fd  # None once told
        self.running = {}  # pidfd -> Client, once its handler runs
        self.looking_up = set()  # clients accepted and waiting for --lookup
        self.per_key = {}  # remote address or uid -> handlers running for it
        self.path = None  # the program, found in PATH on first use and after an exec failure
        self.stopping = False
        self.kill_at = None
        self.paused_until = None
        self.listening = False
        self.poller = select.poll()
        self.defaults = {signal.SIGPIPE, signal.SIGXFSZ}  # Python ignores them; handlers get SIG_DFL
        self.guard = self.wakeup = self.resolver = None

    def start_up(self):
        """The guard, the signals, the resolver's threads: made when the server runs, not when it is built."""
        self.guard = GroupGuard(self.settings.grace, self.guard_say)
        self.poller.register(self.guard.pidfd, select.POLLIN)
        # A signal the server was started with ignored stays ignored; the handlers get the others at SIG_DFL.
        caught = [number for number in (*STOPS, RELOAD) if signal.getsignal(number) != signal.SIG_IGN]
        self.defaults.update(caught)
        self.wakeup = proc.catch_signals(caught)
        self.poller.register(self.wakeup, select.POLLIN)
        if self.settings.lookup and not self.unix and not self.settings.inetd:
            self.resolver = Resolver()
            self.poller.register(self.resolver.wakeup, select.POLLIN)
        self.listener.setblocking(False)
        self.say("info", f"guard pid {self.guard.pid} leads the handlers' process group")
        if self.program.run_here is not None:
            self.say("info", f"handlers start by fork(2), not posix_spawn(3): {self.program.argv[0]} runs in the forked child itself")

    def run(self):
        try:
            self.start_up()
            self.listen(True)
            self.tell_ready()
            while self.running or self.looking_up or not self.stopping:
                self.turn()
            return 0
        finally:
            if self.guard is not None:
                self.guard.release()
            if self.resolver is not None:
                self.resolver.close()

    def turn(self):
        for fd, _ in self.poller.poll(self.timeout()):
            if fd == self.wakeup:
                self.take_signals()
            elif fd == self.guard.pidfd:
                self.lose_guard()
            elif fd in self.running:
                self.reap(self.running.pop(fd))
            elif self.resolver is not None and fd == self.resolver.wakeup:
                for client in self.resolver.finished():
                    if client in self.looking_up:  # else dropped at the end of --grace
                        self.looking_up.remove(client)
                        self.start(client)
            elif fd == self.listener.fileno() and self.listening:
                self.accept_some()
        now = time.monotonic()
        if self.kill_at is not None and now >= self.kill_at:
            self.kill_at = None
            self.kill_stragglers()
        if self.paused_until is not None and now >= self.paused_until:
            self.paused_until = None
        self.listen(not self.stopping and self.paused_until is None and self.busy() < self.settings.max)

    def kill_stragglers(self):
        """--grace is over: SIGKILL to every handler still running, said in one line; clients still waiting for --lookup are closed."""
        for client in self.looking_up:
            client.connection.close()
            self.release(client.key)
        grace = counted(self.settings.grace, "second")
        if self.looking_up:
            self.say("warning", f"closed {counted(len(self.looking_up), 'client')} still waiting for --lookup after {grace}")
            self.looking_up.clear()
        if not self.running:
            return
        for handler in self.running.values():
            proc.send_pidfd(handler.pidfd, signal.SIGKILL)
        them = "it" if len(self.running) == 1 else "them"
        pids = pids_listed(handler.pid for handler in self.running.values())
        self.say(
            "warning", f"{counted(len(self.running), 'handler')} still running {grace} after the stop signal; sent {them} SIGKILL ({pids})"
        )

    def busy(self):
        return len(self.running) + len(self.looking_up)

    def timeout(self):
        return proc.poll_timeout(self.kill_at, self.paused_until)

    def listen(self, wanted):
        if wanted != self.listening:
            if wanted:
                self.poller.register(self.listener.fileno(), select.POLLIN)
            else:
                self.poller.unregister(self.listener.fileno())
            self.listening = wanted

    def accept_some(self):
        for _ in range(ACCEPT_BATCH):
            if self.busy() >= self.settings.max:
                return
            try:
                connection, address = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as error:
                self.take_accept_error(error)
                return
            self.serve(connection, address)

    def take_accept_error(self, error):
        if error.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR):
            return  # that client is gone (or a firewall said no): the next one may come
        self.say("warning", f"unable to accept: {error.strerror}; trying again in {counted(PAUSE_SECONDS, 'second')}")
        self.paused_until = time.monotonic() + PAUSE_SECONDS

    def serve(self, connection, address):
        client = self.admit(connection, address)
        if client is None:
            connection.close()
        elif self.resolver is not None:
            self.looking_up.add(client)
            self.resolver.submit(client)
        else:
            self.start(client)

    def admit(self, connection, address):
        """The client, counted, if it may have a handler; None (said why) if not."""
        try:
            peer = self.peer_of(connection, address)
            local = None if self.unix else connection.getsockname()
        except OSError:
            return None  # gone before we could look at it
        client = ucspi.describe(peer)
        key = ucspi.key(peer)
        decision = self.decide(peer, link_of(address))
        if not decision.allowed:
            line = f"rules line {decision.line}" if decision.line else "no rule matched"
            self.say("warning", f"deny {client} ({line})")
            return None
        count = self.per_key.get(key, 0) + 1
        if self.settings.max_per is not None and count > self.settings.max_per:
            whose = f"uid {key}" if self.unix else key
            self.say("warning", f"refused {client}: {counted(count - 1, 'connection')} from {whose} already (-C {self.settings.max_per})")
            return None
        self.per_key[key] = count
        return Client(connection, peer, key, count, local, decision.variables)

    def start(self, client):
        with client.connection:
            environ = {**self.environ, **self.connection_environment(client), **client.variables}
            client.pid = self.spawn(client.connection.fileno(), environ, ucspi.describe(client.peer))
        if client.pid is None:
            self.release(client.key)
            return
        try:
            client.pidfd = os.pidfd_open(client.pid)
        except ProcessLookupError:  # started with SIGCHLD ignored: the kernel has reaped it already
            self.say("end", f"pid {client.pid} for {ucspi.describe(client.peer)} ended (status unknown: SIGCHLD is ignored)")
            self.release(client.key)
            return
        self.running[client.pidfd] = client
        self.poller.register(client.pidfd, select.POLLIN)
        self.say("start", f"pid {client.pid} for {ucspi.describe(client.peer)} ({self.busy()}/{self.settings.max})")

    def release(self, key):
        left = self.per_key[key] - 1
        if left:
            self.per_key[key] = left
        else:
            del self.per_key[key]

    def peer_of(self, connection, address):
        if self.unix:
            pid, uid, gid = sdnotify.UCRED.unpack(connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, sdnotify.UCRED.size))
            return ucspi.unix_peer(pid, uid, gid)
        return ucspi.inet_peer(address)

    def decide(self, peer, link):
        if self.rules is None:
            return rules.Decision(True, {}, None)
        return rules.decide(self.rules, rules.Client(peer.ip, peer.uid, peer.gid, link))

    def connection_environment(self, client):
        if self.settings.inetd:
            return ucspi.inetd_environment(client.peer)
        if self.unix:
            return ucspi.ipc_environment(self.local_path, client.peer, client.count)
        local_host = self.settings.local_host or client.local_host
        return ucspi.tcp_environment(client.local, client.peer, client.count, local_host, client.remote_host)

    def spawn(self, fd, environ, client):
        """The handler's pid; None, said in one line, if it could not be started.

        A program the child runs itself (chain.Program.run_here) is started
        by a fork set up as posix_spawn would have set it up; any other by
        posix_spawn.
        """
        name = self.program.argv[0]
        try:
            if self.program.run_here is not None:
                return chain.spawn_like_posix_spawn(self.program, environ, fd, self.guard.pid, self.defaults)
            if self.path is None:
                self.path = chain.find_program(name, self.environ)
            return os.posix_spawn(
                self.path,
                self.program.argv,
                environ,
                file_actions=[(os.POSIX_SPAWN_DUP2, fd, 0), (os.POSIX_SPAWN_DUP2, fd, 1)],
                setpgroup=self.guard.pid,
                setsigdef=self.defaults,
            )
        except Fatal as error:
            self.say("warning", f"{error} (client {client} dropped)")
        except OSError as error:
            self.path = None
            self.say("warning", f"{chain.exec_failed(name, error.errno)} (client {client} dropped)")
        return None

    def reap(self, handler):
        self.poller.unregister(handler.pidfd)
        try:
            _, status = os.waitpid(handler.pid, 0)  # its pidfd is readable: it has exited
            how = chain.describe_exit(status)
        except ChildProcessError:
            how = "ended"  # started with SIGCHLD ignored: the kernel reaped it
        os.close(handler.pidfd)
        self.release(handler.key)
        self.say("end", f"pid {handler.pid} for {ucspi.describe(handler.peer)} {how} ({self.busy()}/{self.settings.max})")

    def take_signals(self):
        for number in proc.caught_signals(self.wakeup):
            if number in STOPS and not self.stopping:
                self.stop(number)
            elif number == RELOAD:
                self.reload()

    def stop(self, number):
        self.stopping = True
        self.listen(False)
        self.listener.close()
        self.kill_at = time.monotonic() + self.settings.grace
        waiting = "no handler running"
        if self.running:
            waiting = f"waiting up to {counted(self.settings.grace, 'second')} for {counted(len(self.running), 'handler')}"
        self.say("info", f"{signal.Signals(number).name}: no new connections; {waiting}")
        self.notify(b"STOPPING=1")

    def reload(self):
        path = self.settings.rules_path
        if path is None:
            self.say("info", "SIGHUP: no --rules file to read again")
            return
        try:
            self.rules = read_rules(path)
        except Fatal as error:
            self.say("warning", f"kept the old rules: {error}")
            return
        self.say("info", f"SIGHUP: read {counted(len(self.rules), 'rule')} from {path}")

    def lose_guard(self):
        for handler in self.running.values():
            proc.send_pidfd(handler.pidfd, signal.SIGTERM)
        raise Fatal(f"the guard of the handlers (pid {self.guard.pid}) is gone; stopping, the handlers with it")

    def tell_ready(self):
        self.notify(b"READY=1")
        if self.ready_fd is not None:
            fd, self.ready_fd = self.ready_fd, None
            readiness.tell_supervisor(fd, self.say)

    def notify(self, message):
        readiness.tell_upstream(self.settings.notify_socket, message, self.say)
