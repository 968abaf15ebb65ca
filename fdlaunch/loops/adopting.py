"""fdlaunch-adopt's supervisor: it answers the program's bind(2) calls, handing over passed sockets.

The supervisor is forked before the filter is installed, so that its own
system calls are never filtered, and twice, so that it is not the program's
child: a program that waits for all its children (wait() until ECHILD)
never waits for it. It gets the listener over a socket pair, says it has
it, and then lives exactly as long as the program's process (a pidfd),
holding only the passed sockets, the listener, that pidfd and stderr.

Each bind is answered in a few steps, cheapest first (fdlaunch-adopt(1),
MATCHING): the address is read from the caller's memory and parsed; a bind
no passed socket could be for is continued at once, without another look.
Only a bind that could be adopted costs more: which process it is, a
check that the bind is still waiting (SECCOMP_IOCTL_NOTIF_ID_VALID, after
every read of the caller's memory, against pid reuse), the caller's socket
itself (pidfd_getfd), and then the passed socket goes in at its fd
(SECCOMP_IOCTL_NOTIF_ADDFD) and the bind returns 0.
"""

import _socket as socket  # not socket.py: tests/test_imports.py
import array
import errno
import os
import select
import signal

from fdlaunch.errors import Fatal, syscall_error
from fdlaunch.kernel import fds, proc, seccomp, sock
from fdlaunch.text import adoption, sockaddr

START_SECONDS = 10  # how long the supervisor may take to take the listener
GRACE_SECONDS = 5  # for a supervisor that is no longer needed, before SIGKILL
NAME = "adopt (binds)"  # what ps(1) and top(1) show for the supervisor (15 bytes at most)
TRANSPORTS = {socket.SOCK_STREAM: "tcp", socket.SOCK_DGRAM: "udp"}
# What the supervisor ignores: a signal meant for the program's whole process
# group (^C, a supervisor's kill of the group) must not end the binds' server.
IGNORED = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM)


class Supervisor:
    """The program's side: start the supervisor, hand it the listener, or take it all back."""

    def __init__(self, arch, offers, strict, say):
        """Start it; say(kind, text) speaks for the supervisor, in its own process."""
        self.pid = self.pidfd = None
        try:
            self.channel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            program = os.pidfd_open(os.getpid())
        except OSError as error:
            raise syscall_error("start the supervisor", error) from None
        try:
            middle = os.fork()  # twice: see the module's comment
            if middle == 0:
                try:
                    self.channel.close()
                    _leave_supervisor(theirs, program, arch, offers, strict, say)
                finally:
                    os._exit(0)
            os.waitpid(middle, 0)
        except OSError as error:
            self.channel.close()
            raise syscall_error("start the supervisor", error) from None
        finally:
            theirs.close()
            os.close(program)
        self._find_supervisor()

    def _find_supervisor(self):
        """Its pid, sent by the middle process, and a pidfd on it, taken while it surely still waits for us."""
        message = _receive(self.channel, START_SECONDS) or b""
        if not message.isdigit():
            raise Fatal(f"unable to start the supervisor: {message.decode(errors='replace') or 'it exited'}")
        self.pid = int(message)
        try:
            self.pidfd = os.pidfd_open(self.pid)
        except OSError as error:
            raise syscall_error(f"watch the supervisor (pid {self.pid})", error) from None
        # It holds the other end until it has the listener: if that end is not hung up now, the pidfd is on it.
        if _hung_up(self.channel):
            raise Fatal(f"unable to start the supervisor: it (pid {self.pid}) exited")

    def hand_over(self, arch, listener):
        """Give the supervisor the listener; once it says it has it, every bind is answered. Fatal if it does not."""
        try:
            seccomp.check_addfd(arch, listener)
            seccomp.allow_tracer(self.pid)
            try:
                self.channel.sendmsg([b"listener"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [listener]))])
            except OSError as error:
                raise syscall_error(f"hand the listener to the supervisor (pid {self.pid})", error) from None
            answer = _receive(self.channel, START_SECONDS)
        finally:
            os.close(listener)  # the supervisor's alone from now on, or nobody's
        if answer is None:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            raise Fatal(f"unable to start the supervisor: pid {self.pid} did not answer in {START_SECONDS} seconds; killed it")
        if answer != b"serving":
            raise Fatal(f"unable to start the supervisor: it (pid {self.pid}) exited")
        self.close()

    def abandon(self):
        """Something failed before the exec: the supervisor exits when its end of the channel reads EOF; SIGKILL after a grace."""
        self.channel.close()
        if self.pidfd is not None:
            proc.end_within([self.pidfd], GRACE_SECONDS)
        self.close()

    def close(self):
        self.channel.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def _receive(channel, seconds):
    """One message from the channel (b'' at EOF), or None if none came within seconds."""
    poller = select.poll()
    poller.register(channel, select.POLLIN)
    if not poller.poll(int(seconds * 1000)):
        return None
    try:
        return channel.recv(32)
    except OSError:
        return b""


def _hung_up(channel):
    poller = select.poll()
    poller.register(channel, select.POLLIN)
    return any(events & (select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))


def _leave_supervisor(channel, program, arch, offers, strict, say):
    """The middle process: fork the supervisor, send its pid (or why not), exit."""
    try:
        pid = os.fork()
    except OSError as error:
        channel.send(f"fork: {error.strerror}".encode())
        os._exit(0)
    if pid != 0:
        channel.send(b"%d" % pid)
        os._exit(0)
    try:
        supervise(channel, program, arch, offers, strict, say)
    except BaseException as error:  # never a traceback, and never back into the caller's code
        say("warning", f"exiting on an unexpected error: {type(error).__name__}: {error}; the program's binds now fail with ENOSYS")
    finally:
        os._exit(0)


def supervise(channel, program, arch, offers, strict, say):
    """The supervisor's life: wait for the listener, then answer binds until the program's process has exited."""
    proc.name_self(NAME)
    signal.set_wakeup_fd(-1)
    for number in IGNORED:
        signal.signal(number, signal.SIG_IGN)
    fds.keep_only({channel.fileno(), program, *(offer.fd for offer in offers)})
    os.chdir("/")  # holds no directory, so none stays busy
    listener = _receive_listener(channel)
    if listener is None:
        return  # the program failed before the exec, or is gone
    channel.send(b"serving")
    channel.close()
    Server(seccomp.Listener(arch, listener), arch, program, offers, strict, say).run()


def _receive_listener(channel):
    try:
        data, ancillary, _, _ = channel.recvmsg(16, socket.CMSG_SPACE(4))
    except OSError:
        return None
    for level, kind, payload in ancillary:
        if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS) and len(payload) >= 4:
            return array.array("i", payload[:4])[0]
    return None


class Server:
    """Answers each bind of the program and of the processes it starts, until the program has exited.

    Every bind received is answered, unless SECCOMP_IOCTL_NOTIF_ID_VALID
    says its caller no longer waits: one that cannot be looked at (its
    memory unreadable, its thread in another pid namespace) goes on, or
    with --strict fails, as a bind to an address that was not passed.
    """

    def __init__(self, listener, arch, program, offers, strict, say):
        self.listener, self.arch, self.program, self.offers, self.strict, self.say = listener, arch, program, offers, strict, say
        self.inodes = {offer.fd: os.fstat(offer.fd).st_ino for offer in offers}
        self.unreadable_said = False

    def run(self):
        poller = select.poll()
        poller.register(self.listener.fd, select.POLLIN)
        poller.register(self.program, select.POLLIN)
        while True:
            for fd, events in poller.poll():
                if fd == self.program:
                    return  # the program has exited: what it left behind gets ENOSYS from bind
                if events & select.POLLIN:
                    self.answer_next()
                elif events & (select.POLLHUP | select.POLLERR):
                    return  # nobody is left who could bind

    def answer_next(self):
        bind = self.listener.receive()
        if bind is None:
            return  # its caller is gone
        address = self.address_of(bind)
        matching = [] if isinstance(address, int) else adoption.candidates(address, self.offers, self.file_seen_by(bind.tid))
        if not matching:
            self.pass_over(bind, bind.tid, address)
            return
        pid = proc.tgid_of(bind.tid)
        try:
            pidfd = os.pidfd_open(pid) if pid is not None else None
        except OSError:
            pidfd = None
        try:
            if self.listener.valid(bind.id):  # after the memory read: it was the caller's, who still waits
                self.consider(bind, pid, pidfd, address, matching)
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def pass_over(self, bind, pid, address):
        """A bind no passed socket is for: the kernel does it, or --strict refuses it.

        A continued bind is not checked with ID_VALID: the kernel reads its
        address again itself, so nothing read here is acted on.
        """
        decision = adoption.passed_over(address, self.strict)
        if decision.action == adoption.CONTINUE:
            self.listener.answer(bind.id, proceed=True)
        elif self.listener.valid(bind.id):
            self.refuse(bind, pid, address, decision.error)

    @staticmethod
    def file_seen_by(tid):
        return lambda path: proc.file_seen_by(tid, path)

    def address_of(self, bind):
        """The address the bind names, as sockaddr.parse gives it; Other(None) for memory we may not read."""
        data = None
        if 0 <= bind.length <= sockaddr.STORAGE_SIZE:
            try:
                data = self.listener.read(bind.tid, bind.address, bind.length)
            except OSError as error:
                self.cannot_read(bind, error)
                return sockaddr.Other(None)  # unknown: adopted never, refused under --strict
        return sockaddr.parse(data, bind.length)

    def cannot_read(self, bind, error):
        if error.errno != errno.ESRCH and not self.unreadable_said:
            self.unreadable_said = True
            who = f"pid {bind.tid} ({proc.name_of(bind.tid)})"
            self.say("warning", f"unable to read the memory of {who}: {error.strerror}; binds it cannot read are not adopted")

    def consider(self, bind, pid, pidfd, address, matching):
        """A bind that may be adopted, still waiting: learn what its socket is, then decide and answer."""
        if pidfd is None:
            self.pass_over(bind, bind.tid, sockaddr.Other(None))  # a thread we cannot see from here
            return
        try:
            theirs = seccomp.take_fd(self.arch, pidfd, bind.fd)
        except OSError as error:
            if error.errno == errno.EPERM:
                self.cannot_read(bind, error)
            self.pass_over(bind, pid, error.errno if error.errno == errno.EBADF else address)
            return
        try:
            family, kind, protocol, v6only, name = sock.facts(theirs)
            flags = proc.fd_flags(bind.tid, bind.fd)
            held = proc.sockets_held(pid, self.inodes.values())
        except OSError as error:
            self.pass_over(bind, pid, error.errno if error.errno == errno.ENOTSOCK else address)
            return
        finally:
            os.close(theirs)
        target = adoption.Target(family, kind, protocol, v6only, sockaddr.is_bound(family, name))
        held_offers = {fd for fd, inode in self.inodes.items() if inode in held}
        decision = adoption.decide(address, target, matching, held_offers, self.strict)
        if decision.action == adoption.ADOPT:
            self.adopt(bind, pid, address, flags, decision.offer)
        elif decision.action == adoption.REFUSE:
            self.refuse(bind, pid, address, decision.error)
        else:
            self.listener.answer(bind.id, proceed=True)

    def adopt(self, bind, pid, address, flags, offer):
        """Our socket in at the caller's fd, close-on-exec as its was, and O_NONBLOCK as its was (a flag the socket shares)."""
        try:
            self.listener.place(bind.id, offer.fd, bind.fd, bool(flags & os.O_CLOEXEC))
        except OSError as error:
            if error.errno != errno.ENOENT:  # ENOENT: the caller is gone, and nothing was placed
                self.say("warning", f"unable to give pid {pid} fd {bind.fd}: {error.strerror}")
                self.listener.answer(bind.id, error.errno)
            return
        os.set_blocking(offer.fd, not flags & os.O_NONBLOCK)
        if self.listener.answer(bind.id):
            where = sockaddr.printed(address, TRANSPORTS.get(offer.type))
            self.say("info", f"pid {pid} ({proc.name_of(pid)}) bound fd {bind.fd} to {where}: gave it the socket passed as {offer.label!r}")

    def refuse(self, bind, pid, address, error):
        if self.listener.answer(bind.id, error):
            where = sockaddr.printed(address, None) if not isinstance(address, int) else "a bad address"
            why = "it holds the socket passed for that address already" if error == errno.EADDRINUSE else "--strict"
            self.say("info", f"pid {pid} ({proc.name_of(pid)}): bind of fd {bind.fd} to {where} refused ({os.strerror(error)}): {why}")
