"""Socket addresses as bind(2) reads them from a process's memory. Pure: bytes in, values out.

The layouts are Linux's (in.h, in6.h, un.h), the same on every 64-bit
architecture: sa_family is a native-endian 16-bit number at offset 0, a
port is big-endian at offset 2. The errors given are those the kernel
itself gives for the same bytes (net/socket.c, move_addr_to_kernel;
af_inet.c, af_inet6.c and af_unix.c, the bind of each family).
"""

import _socket as socket  # not socket.py: tests/test_imports.py
import errno
import sys
from collections import namedtuple

from fdlaunch.text.spec import format_address

# struct sockaddr_storage: the longest address bind(2) copies in.
STORAGE_SIZE = 128
INET_SIZE = 16  # struct sockaddr_in
INET6_MIN_SIZE = 24  # SIN6_LEN_RFC2133: sockaddr_in6 without sin6_scope_id, which the kernel accepts
INET6_SIZE = 28
UNIX_PATH_OFFSET = 2  # offsetof(struct sockaddr_un, sun_path)
UNIX_SIZE = 110  # struct sockaddr_un

# host: the address's 4 or 16 bytes as they are on the wire; port: a number;
# scope: sin6_scope_id (0 for IPv4 and for an IPv6 address without one).
Inet = namedtuple("Inet", "family host port scope")
# name: sun_path as bind reads it: b'' asks for an autobound abstract name,
# a leading NUL an abstract name (every byte counts), else a path up to its first NUL.
Local = namedtuple("Local", "name")
# An address of any other family, which is never adopted.
Other = namedtuple("Other", "family")

WILDCARDS = {socket.AF_INET: bytes(4), socket.AF_INET6: bytes(16)}


def parse(data, length):
    """The address bind(2) was given: length as the caller passed it, data the bytes read at the pointer.

    data is None when the memory could not be read. Returns Inet, Local or
    Other, or the errno the kernel gives before it looks at the socket:
    EINVAL for a length below 0 or above sockaddr_storage, EFAULT for memory
    it cannot read. A length too short for the family's address is EINVAL too
    (the kernel checks it against the socket's own family; see fits()).
    """
    if not 0 <= length <= STORAGE_SIZE:
        return errno.EINVAL
    if data is None or len(data) < length:
        return errno.EFAULT
    if length < UNIX_PATH_OFFSET:
        return Other(None)  # no family at all: an AF_UNIX socket autobinds with it, other families refuse
    family = int.from_bytes(data[:2], sys.byteorder)
    if family == socket.AF_INET:
        if length < INET_SIZE:
            return errno.EINVAL
        return Inet(family, bytes(data[4:8]), int.from_bytes(data[2:4], "big"), 0)
    if family == socket.AF_INET6:
        if length < INET6_MIN_SIZE:
            return errno.EINVAL
        scope = int.from_bytes(data[24:28], sys.byteorder) if length >= INET6_SIZE else 0
        return Inet(family, bytes(data[8:24]), int.from_bytes(data[2:4], "big"), scope)
    if family == socket.AF_UNIX:
        if length > UNIX_SIZE:
            return errno.EINVAL
        name = bytes(data[UNIX_PATH_OFFSET:length])
        if name[:1] != b"\0":
            name = name.partition(b"\0")[0]
        return Local(name)
    return Other(family)


def of_socket(family, name):
    """The address value of a bound socket, from its family and what Python's getsockname() returned."""
    if family == socket.AF_UNIX:
        return Local(name if isinstance(name, bytes) else name.encode(errors="surrogateescape"))
    host = socket.inet_pton(family, name[0].partition("%")[0])
    return Inet(family, host, name[1], name[3] if family == socket.AF_INET6 else 0)


def is_bound(family, name):
    """Whether a socket whose getsockname() is name has an address already (bind(2) on it: EINVAL)."""
    if family == socket.AF_UNIX:
        return bool(name)
    if family in (socket.AF_INET, socket.AF_INET6):
        return name is not None and name[1] != 0
    return False


def is_wildcard(address):
    """True for 0.0.0.0 and ::, the addresses that mean every address of the host."""
    return isinstance(address, Inet) and address.host == WILDCARDS[address.family]


def is_path(address):
    """True for a unix socket bound to a name in the file system."""
    return isinstance(address, Local) and address.name[:1] not in (b"", b"\0")


def printed(address, transport):
    """The address as fdlaunch(7) prints addresses: '127.0.0.1:80/tcp', '[::1]:53/udp', '/run/x', '@name'."""
    if isinstance(address, Local):
        return format_address(address.name, None) if address.name else "an unnamed unix address"
    if isinstance(address, Inet):
        host = socket.inet_ntop(address.family, address.host)
        if address.scope:
            host += f"%{address.scope}"
        return format_address((host, address.port), transport)
    return f"an address of family {address.family}" if address.family is not None else "no address"
