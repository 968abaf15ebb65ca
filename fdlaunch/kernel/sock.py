"""Opening listening sockets: name lookups, socket options, bind, listen.

Everything one run creates is recorded in an Opened, which undoes it all
(closes the sockets, removes the socket files and directories it made) unless
the run gets as far as exec.
"""

import _socket as socket  # not socket.py: tests/test_imports.py
import os
import select
import stat
from collections import namedtuple

from fdlaunch.errors import Fatal, UsageError, quoted, syscall_error
from fdlaunch.kernel import fds
from fdlaunch.text import credspec
from fdlaunch.text import spec as specs
from fdlaunch.text.numbers import is_decimal

TYPES = {"stream": socket.SOCK_STREAM, "dgram": socket.SOCK_DGRAM, "seqpacket": socket.SOCK_SEQPACKET}
# Linux values (in.h, in6.h, socket.h); not every Python build names them.
IP_FREEBIND = 15
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
IPV6_FREEBIND = 78
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
DEFAULT_SOCKET_MODE = 0o666  # as systemd's SocketMode=, before the umask
CAP_NET_BIND_SERVICE = 10  # <linux/capability.h>


# A spec with its names looked up: everything bind needs. owner is
# (uid, gid) for a unix socket file.
Endpoint = namedtuple("Endpoint", "spec family type sockaddr v6only owner", defaults=(False, None))


def ipv6_available():
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()
    except OSError:
        return False
    return True


def wildcard_is_dual_stack(specs):
    """Whether an empty HOST among specs means '::' (this host has IPv6) rather than 0.0.0.0: resolve's ipv6."""
    return any(not s.host and s.protocol.family == "any" for s in specs) and ipv6_available()


def resolve(spec, ipv6):
    """Look up the spec's host, service, interface and owner; a missing name is a usage error."""
    kind = TYPES[spec.protocol.type]
    if spec.is_unix:
        address = b"\0" + os.fsencode(spec.path[1:]) if spec.is_abstract else spec.path
        return Endpoint(spec, socket.AF_UNIX, kind, address, owner=_owner(spec.owner) if spec.owner else None)
    if spec.device:
        try:
            socket.if_nametoindex(spec.device)
        except OSError:
            raise UsageError(f"{spec.address()}: no network interface named {spec.device!r}") from None
    port = _port(spec)
    family = spec.protocol.family
    v6only = family == "6" or spec.v6only
    if not spec.host:
        if family == "4" or (family == "any" and not ipv6):
            return Endpoint(spec, socket.AF_INET, kind, ("0.0.0.0", port))
        return Endpoint(spec, socket.AF_INET6, kind, ("::", port, 0, 0), v6only)
    wanted = {"4": socket.AF_INET, "6": socket.AF_INET6}.get(family, socket.AF_UNSPEC)
    try:
        # An ASCII name as bytes, so that no codec is loaded for it: tests/test_imports.py.
        host = spec.host.encode() if spec.host.isascii() else spec.host
        found = socket.getaddrinfo(host, port, wanted, kind)
    except socket.gaierror as error:
        if error.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None), getattr(socket, "EAI_ADDRFAMILY", None)):
            # '-tcp:web:8080' reads as host web: a label without its 'label=' is the likely mistake.
            meant = "" if "." in spec.host else f"; if {spec.host!r} is a label: -{spec.proto}:label={spec.host}:{spec.port}"
            raise UsageError(f"{spec.address()}: host {spec.host!r} not found{meant}") from None
        raise Fatal(f"unable to look up host {spec.host!r}: {error.strerror}") from None
    address_family, _, _, _, sockaddr = found[0]
    return Endpoint(spec, address_family, kind, sockaddr, v6only and address_family == socket.AF_INET6)


def _port(spec):
    if is_decimal(spec.port):
        return int(spec.port)
    try:
        return socket.getservbyname(spec.port, spec.protocol.transport)
    except OSError:
        raise UsageError(f"{spec.address()}: unknown service {spec.port!r} for {spec.protocol.transport}") from None


def _owner(text):
    """(uid, gid) for chown; gid -1 (left as bound) for a bare uid without a passwd entry, as chown(1)."""
    from fdlaunch.kernel.creds import Lookups  # the user databases, only when a spec has owner=

    found = credspec.resolve_user(text, Lookups(), f"owner={text!r}")
    return found.uid, -1 if found.gid is None else found.gid


class Opened:
    """What this run has created so far, undone by discard() unless the run execs."""

    def __init__(self):
        self.fds = []
        self.files = []  # (path, (st_dev, st_ino)) of socket files we bound
        self.directories = []  # (path, (st_dev, st_ino)) made by mkdir, outermost first

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is not None:
            self.discard()

    def moved(self, moves):
        where = dict(moves)
        self.fds = [where.get(fd, fd) for fd in self.fds]

    def discard(self):
        """Close our sockets, remove our files and directories: each only if its name still holds our inode."""
        fds.close_all(self.fds)
        made = [*self.files, *reversed(self.directories)]
        self.fds, self.files, self.directories = [], [], []
        if made:
            from fdlaunch.kernel import sockfile  # imported already by the bind that made them

            with sockfile.stops_held():  # a second stop signal must not cut the cleanup short
                for path, inode in made:
                    sockfile.remove(path, inode)

    def open(self, endpoint):
        """Create, configure, bind and (for streams) listen; return the raw fd."""
        spec = endpoint.spec
        try:
            sock = socket.socket(endpoint.family, endpoint.type)
        except OSError as error:
            raise syscall_error(f"create a socket for {endpoint_address(endpoint)}", error) from None
        self.fds.append(sock.fileno())
        try:
            _set_options(sock, endpoint)
            if spec.is_unix and not spec.is_abstract:
                self._bind_unix_path(sock, endpoint)
            else:
                _bind(sock, endpoint)
            if endpoint.type != socket.SOCK_DGRAM:
                sock.listen(spec.backlog if spec.backlog is not None else socket.SOMAXCONN)
        except OSError as error:
            raise syscall_error(f"listen on {endpoint_address(endpoint)}", error) from None
        finally:
            fd = sock.detach()  # closed by discard(), or passed to the program
        return fd

    def _bind_unix_path(self, sock, endpoint):
        """Bind in the directory walked, then give exactly the file bound its owner and mode (fdlaunch-listen(1))."""
        from fdlaunch.kernel import sockfile  # only a run with a unix socket path pays for its import

        spec = endpoint.spec
        made = self.directories if spec.mkdir else None
        # Held: a stop between a file made and its record would leave a file nobody removes.
        with sockfile.stops_held(), sockfile.directory_of(spec.path, spec.shareddir, made) as directory:
            sockfile.remove_stale(directory, endpoint.type)
            # Bound under umask 0777 the file starts with no permissions at all,
            # so it is never reachable more widely than asked while chown and
            # chmod are still to come.
            previous = os.umask(0o777)
            try:
                _bind(sock, endpoint)
            finally:
                os.umask(previous)
            bound, inode = sockfile.bound_file(sock, directory)
            self.files.append((spec.path, inode))
        try:
            if endpoint.owner:
                _call(os.chown, f"change the owner of {quoted(spec.path)}", sockfile.through(bound), *endpoint.owner)
            mode = spec.mode if spec.mode is not None else DEFAULT_SOCKET_MODE & ~previous
            _call(os.chmod, f"change the mode of {quoted(spec.path)}", sockfile.through(bound), mode)
        finally:
            os.close(bound)


def _call(function, what, *args):
    try:
        function(*args)
    except OSError as error:
        raise syscall_error(what, error) from None


def _bind(sock, endpoint):
    try:
        sock.bind(endpoint.sockaddr)
    except FileNotFoundError:
        directory = os.path.dirname(endpoint.spec.path)
        raise Fatal(
            f"unable to bind {endpoint.spec.address()}: directory {quoted(directory)} does not exist (the mkdir option makes it)"
        ) from None
    except PermissionError as error:
        raise Fatal(f"unable to bind {endpoint_address(endpoint)}: {error.strerror}{privileged_port_hint(endpoint)}") from None
    except OSError as error:
        raise syscall_error(f"bind {endpoint_address(endpoint)}", error) from None


def privileged_port_hint(endpoint):
    """Why a bind to a port below net.ipv4.ip_unprivileged_port_start was refused, and the two ways round it ('' otherwise)."""
    if endpoint.family == socket.AF_UNIX:
        return ""
    port, floor = endpoint.sockaddr[1], unprivileged_port_start()
    if not 0 < port < floor:
        return ""
    spec = f"-{endpoint.spec.proto}::{port}"
    return (
        f" (ports below {floor} need root or CAP_NET_BIND_SERVICE: bind as root and drop privileges after,"
        f" fdlaunch-listen {spec} -- fdlaunch-setuidgid USER -- PROG, or give the user the capability before the bind,"
        f" fdlaunch-setuidgid --keep-cap=net_bind_service USER -- fdlaunch-listen {spec} -- PROG)"
    )


def unprivileged_port_start():
    """The lowest port a process without CAP_NET_BIND_SERVICE may bind (ip(7), ip_unprivileged_port_start); 1024 by default."""
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as setting:
            return int(setting.read())
    except (OSError, ValueError):
        return 1024


def may_bind_privileged_ports():
    """Whether this process has CAP_NET_BIND_SERVICE in its effective set (proc(5), CapEff)."""
    try:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("CapEff:"))
    except (OSError, StopIteration):
        return True  # nothing to go by: the bind will tell
    return bool(int(line.split()[1], 16) >> CAP_NET_BIND_SERVICE & 1)


def _set_options(sock, endpoint):
    spec = endpoint.spec
    ipv6 = endpoint.family == socket.AF_INET6
    if ipv6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(endpoint.v6only))
    if endpoint.family != socket.AF_UNIX and endpoint.type == socket.SOCK_STREAM:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if spec.reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if spec.freebind:
        sock.setsockopt(*((socket.IPPROTO_IPV6, IPV6_FREEBIND) if ipv6 else (socket.IPPROTO_IP, IP_FREEBIND)), 1)
    if spec.transparent:
        sock.setsockopt(*((socket.IPPROTO_IPV6, IPV6_TRANSPARENT) if ipv6 else (socket.IPPROTO_IP, IP_TRANSPARENT)), 1)
    if spec.rcvbuf:
        _set_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, spec.rcvbuf)
    if spec.sndbuf:
        _set_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, spec.sndbuf)
    if spec.device:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, os.fsencode(spec.device))


def _set_buffer(sock, forced, plain, size):
    # The FORCE variant (root only) passes net.core.[rw]mem_max, as systemd does.
    try:
        sock.setsockopt(socket.SOL_SOCKET, forced, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, plain, size)


def describe(fd, spec):
    """The address fd is bound to, printed by spec.format_address (the real port when 0 was asked)."""
    sock = socket.socket(fileno=fd)
    try:
        name = sock.getsockname()
    finally:
        sock.detach()
    return specs.format_address(name, spec.protocol.transport)


def wait_for_activity(fds):
    """Block until a connection or a datagram is waiting on any fd; accept and read nothing."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    while not poller.poll():
        pass


def endpoint_address(endpoint):
    """The address an endpoint will bind, its names looked up, printed by spec.format_address."""
    return specs.format_address(endpoint.sockaddr, endpoint.spec.protocol.transport)


def facts(fd):
    """(family, type, protocol, IPV6_V6ONLY, getsockname()) of the socket at fd, as the kernel says.

    OSError (ENOTSOCK) if fd is not a socket. The name is None for a family
    whose addresses Python cannot show.
    """
    sock = socket.socket(fileno=fd)  # its family, type and protocol read with SO_DOMAIN, SO_TYPE, SO_PROTOCOL
    try:
        v6only = sock.family == socket.AF_INET6 and bool(sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
        try:
            name = sock.getsockname()
        except OSError:
            name = None
        return sock.family, sock.type, sock.proto, v6only, name
    finally:
        sock.detach()


def file_of(path):
    """(st_dev, st_ino) of the socket file at path (str or bytes), or None if there is none."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino) if stat.S_ISSOCK(info.st_mode) else None
