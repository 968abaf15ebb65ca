"""fdlaunch-adopt's pure parts: addresses as bind(2) reads them, and the matching rules of fdlaunch-adopt(1).

Table tests and properties (hypothesis); the same rules run for real in test_adopt.py.
"""

import errno
import socket
import struct
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fdlaunch.kernel import seccomp
from fdlaunch.text import adoption, sockaddr
from fdlaunch.text.adoption import ADOPT, CONTINUE, REFUSE, Decision, Offer, Target
from fdlaunch.text.sockaddr import Inet, Local, Other

INET, INET6, UNIX = socket.AF_INET, socket.AF_INET6, socket.AF_UNIX
STREAM, DGRAM = socket.SOCK_STREAM, socket.SOCK_DGRAM
TCP, UDP, MPTCP = 6, 17, 262
FAMILY = struct.Struct("=H")  # sa_family: native-endian, as the kernel lays it out


def inet4(host, port):
    return FAMILY.pack(INET) + port.to_bytes(2, "big") + socket.inet_pton(INET, host) + bytes(8)


def inet6(host, port, scope=0):
    return FAMILY.pack(INET6) + port.to_bytes(2, "big") + bytes(4) + socket.inet_pton(INET6, host) + scope.to_bytes(4, sys.byteorder)


def unix(name):
    return FAMILY.pack(UNIX) + name


def host(family, text):
    return socket.inet_pton(family, text)


LOOPBACK = Inet(INET, host(INET, "127.0.0.1"), 80, 0)
ANY4 = Inet(INET, bytes(4), 80, 0)
ANY6 = Inet(INET6, bytes(16), 80, 0)


@pytest.mark.parametrize(
    "data, length, parsed",
    [
        (inet4("127.0.0.1", 80), 16, LOOPBACK),
        (inet4("0.0.0.0", 80), 16, ANY4),
        (inet4("127.0.0.1", 80), 8, errno.EINVAL),  # shorter than sockaddr_in
        (inet4("127.0.0.1", 80), 15, errno.EINVAL),
        (inet4("127.0.0.1", 80) + bytes(120), 129, errno.EINVAL),  # longer than sockaddr_storage
        (inet4("127.0.0.1", 80), -1, errno.EINVAL),
        (None, 16, errno.EFAULT),  # memory the kernel could not read
        (inet4("127.0.0.1", 80)[:10], 16, errno.EFAULT),  # read only in part
        (inet6("::", 80)[:24], 24, ANY6),  # RFC 2133's sockaddr_in6, without a scope id
        (inet6("::", 80), 28, ANY6),
        (inet6("fe80::1", 53, 2), 28, Inet(INET6, host(INET6, "fe80::1"), 53, 2)),
        (inet6("::1", 53), 23, errno.EINVAL),
        (unix(b"/run/x.sock\0junk"), 18, Local(b"/run/x.sock")),  # a path ends at its NUL
        (unix(b"/run/x.sock"), 13, Local(b"/run/x.sock")),  # or at the length
        (unix(b"\0name\0x"), 9, Local(b"\0name\0x")),  # an abstract name is every byte
        (unix(b""), 2, Local(b"")),  # autobind
        (unix(b"x" * 109), 111, errno.EINVAL),  # longer than sockaddr_un
        (b"\x01", 1, Other(None)),
        (b"", 0, Other(None)),
        (FAMILY.pack(16) + bytes(10), 12, Other(16)),  # AF_NETLINK
    ],
)
def test_parse(data, length, parsed):
    assert sockaddr.parse(data, length) == parsed


@given(data=st.binary(max_size=140), length=st.integers(-(2**31), 2**31 - 1))
def test_parse_takes_any_bytes(data, length):
    parsed = sockaddr.parse(data, length)
    assert parsed in (errno.EINVAL, errno.EFAULT) or isinstance(parsed, (Inet, Local, Other))
    if isinstance(parsed, Inet):
        assert 0 <= parsed.port <= 65535 and len(parsed.host) == (4 if parsed.family == INET else 16)


@given(address=st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), port=st.integers(0, 65535))
def test_parse_reads_what_python_writes_and_getsockname_returns(address, port):
    if address.version == 4:
        data, name = inet4(str(address), port), (str(address), port)
    else:
        data, name = inet6(str(address), port), (str(address), port, 0, 0)
    family = INET if address.version == 4 else INET6
    assert sockaddr.parse(data, len(data)) == sockaddr.of_socket(family, name)
    assert sockaddr.is_wildcard(sockaddr.parse(data, len(data))) == address.is_unspecified


@pytest.mark.parametrize(
    "address, transport, printed",
    [
        (LOOPBACK, "tcp", "127.0.0.1:80/tcp"),
        (ANY6, "udp", "[::]:80/udp"),
        (Inet(INET6, host(INET6, "fe80::1"), 53, 2), None, "[fe80::1%2]:53"),
        (Local(b"/run/x"), None, "/run/x"),
        (Local(b"\0ctl"), None, "@ctl"),
        (Local(b"/run/a\nb"), None, "'/run/a\\nb'"),
        (Local(b""), None, "an unnamed unix address"),
    ],
)
def test_printed(address, transport, printed):
    assert sockaddr.printed(address, transport) == printed


def offer(label, fd, address, kind=STREAM, protocol=TCP, v6only=False, file=None):
    family = UNIX if isinstance(address, Local) else address.family
    return Offer(label, fd, family, kind, protocol if family != UNIX else 0, address, v6only, file)


WEB = offer("web", 3, LOOPBACK)
WEB_ANY = offer("any", 4, ANY4)
DUAL = offer("dual", 5, ANY6)
V6ONLY = offer("v6", 6, ANY6, v6only=True)
DNS = offer("dns", 7, Inet(INET, host(INET, "127.0.0.1"), 53, 0), DGRAM, UDP)
CONTROL = offer("ctl", 8, Local(b"\0ctl"))
SOCKET_FILE = offer("file", 9, Local(b"/run/x.sock"), file=(1, 2))
LINK = offer("link", 10, Inet(INET6, host(INET6, "fe80::1"), 80, 2))
OFFERS = [WEB, WEB_ANY, DUAL, V6ONLY, DNS, CONTROL, SOCKET_FILE, LINK]


def no_lookup(path):
    raise AssertionError(f"looked up {path!r}")


@pytest.mark.parametrize(
    "address, expected",
    [
        (LOOPBACK, [WEB]),  # a host address: only the socket bound to it, not the wildcard
        (ANY4, [WEB_ANY]),  # the wildcard: only the wildcard
        (Inet(INET, host(INET, "127.0.0.2"), 80, 0), []),
        (LOOPBACK._replace(port=81), []),
        (LOOPBACK._replace(port=0), []),  # port 0 asks for any free port
        (ANY4._replace(port=0), []),
        (ANY6, [DUAL, V6ONLY]),  # IPV6_V6ONLY is the socket's, seen by decide()
        (Inet(INET, host(INET, "127.0.0.1"), 53, 0), [DNS]),  # the type too is decide()'s
        (Local(b"\0ctl"), [CONTROL]),
        (Local(b"\0ctl\0"), []),  # an abstract name is every byte
        (Local(b""), []),  # autobind
        (Inet(INET6, host(INET6, "fe80::1"), 80, 2), [LINK]),
        (Inet(INET6, host(INET6, "fe80::1"), 80, 3), []),  # another interface's fe80::1
        (Other(16), []),
        (Other(None), []),
    ],
)
def test_candidates_by_address(address, expected):
    assert adoption.candidates(address, OFFERS, no_lookup) == expected


def test_a_path_matches_by_the_file_it_names():
    files = {b"/run/x.sock": (1, 2), b"x.sock": (1, 2), b"/run/other.sock": (1, 3)}
    assert adoption.candidates(Local(b"/run/x.sock"), OFFERS, files.get) == [SOCKET_FILE]
    assert adoption.candidates(Local(b"x.sock"), OFFERS, files.get) == [SOCKET_FILE]  # relative, from the daemon's cwd
    assert adoption.candidates(Local(b"/run/other.sock"), OFFERS, files.get) == []
    assert adoption.candidates(Local(b"/run/gone.sock"), OFFERS, files.get) == []  # removed before the bind
    # Without a passed socket that has a file, nothing is looked up.
    assert adoption.candidates(Local(b"/run/x.sock"), [WEB, CONTROL], no_lookup) == []


def target(family=INET, kind=STREAM, protocol=TCP, v6only=False, bound=False):
    return Target(family, kind, protocol, v6only, bound)


@pytest.mark.parametrize(
    "address, matching, their_socket, held, strict, expected",
    [
        (LOOPBACK, [WEB], target(), set(), False, Decision(ADOPT, WEB)),
        (LOOPBACK, [WEB], target(), set(), True, Decision(ADOPT, WEB)),
        (LOOPBACK, [WEB], target(INET6), set(), False, Decision(CONTINUE)),  # a sockaddr of another family
        (LOOPBACK, [WEB], target(INET6), set(), True, Decision(REFUSE, error=errno.EACCES)),
        (LOOPBACK, [WEB], target(bound=True), set(), False, Decision(CONTINUE)),  # the kernel says EINVAL
        (LOOPBACK, [WEB], target(bound=True), set(), True, Decision(REFUSE, error=errno.EINVAL)),
        (LOOPBACK, [WEB], target(kind=DGRAM, protocol=UDP), set(), False, Decision(CONTINUE)),
        (LOOPBACK, [WEB], target(protocol=MPTCP), set(), False, Decision(CONTINUE)),
        (LOOPBACK, [WEB], target(protocol=MPTCP), set(), True, Decision(REFUSE, error=errno.EACCES)),
        (ANY6, [DUAL, V6ONLY], target(INET6), set(), False, Decision(ADOPT, DUAL)),
        (ANY6, [DUAL, V6ONLY], target(INET6, v6only=True), set(), False, Decision(ADOPT, V6ONLY)),
        (ANY6, [DUAL], target(INET6, v6only=True), set(), False, Decision(CONTINUE)),  # IPV6_V6ONLY cannot change after bind
        (LOOPBACK, [WEB], target(), {WEB.fd}, False, Decision(REFUSE, error=errno.EADDRINUSE)),
        (LOOPBACK, [WEB], target(), {WEB.fd}, True, Decision(REFUSE, error=errno.EADDRINUSE)),
        (Local(b"\0ctl"), [CONTROL], target(UNIX, protocol=0), set(), False, Decision(ADOPT, CONTROL)),
    ],
)
def test_decide(address, matching, their_socket, held, strict, expected):
    assert adoption.decide(address, their_socket, matching, held, strict) == expected


def test_sockets_passed_with_the_same_address_go_out_in_order():
    second = WEB._replace(label="web2", fd=11)
    assert adoption.decide(LOOPBACK, target(), [WEB, second], set(), False) == Decision(ADOPT, WEB)
    assert adoption.decide(LOOPBACK, target(), [WEB, second], {WEB.fd}, False) == Decision(ADOPT, second)
    assert adoption.decide(LOOPBACK, target(), [WEB, second], {WEB.fd, second.fd}, False).error == errno.EADDRINUSE


@pytest.mark.parametrize(
    "address, strict, expected",
    [
        (LOOPBACK, False, Decision(CONTINUE)),
        (LOOPBACK, True, Decision(REFUSE, error=errno.EACCES)),
        (errno.EFAULT, False, Decision(CONTINUE)),  # the kernel then says EFAULT itself
        (errno.EFAULT, True, Decision(REFUSE, error=errno.EFAULT)),
        (errno.EINVAL, True, Decision(REFUSE, error=errno.EINVAL)),
        (Other(16), True, Decision(REFUSE, error=errno.EACCES)),
    ],
)
def test_passed_over(address, strict, expected):
    assert adoption.passed_over(address, strict) == expected


ADDRESSES = st.builds(
    Inet,
    st.just(INET),
    st.sampled_from([bytes(4), host(INET, "127.0.0.1"), host(INET, "10.0.0.1")]),
    st.sampled_from([0, 53, 80]),
    st.just(0),
)
OFFER_SETS = st.lists(
    st.builds(offer, st.just("x"), st.integers(3, 20), ADDRESSES, st.sampled_from([STREAM, DGRAM]), st.sampled_from([TCP, UDP])),
    max_size=5,
    unique_by=lambda o: o.fd,
)


@given(
    address=ADDRESSES,
    offers=OFFER_SETS,
    kind=st.sampled_from([STREAM, DGRAM]),
    protocol=st.sampled_from([TCP, UDP]),
    bound=st.booleans(),
    held=st.sets(st.integers(3, 20)),
    strict=st.booleans(),
)
def test_an_adopted_socket_is_always_exactly_what_was_asked(address, offers, kind, protocol, bound, held, strict):
    matching = adoption.candidates(address, offers, no_lookup)
    if not matching:
        return
    decision = adoption.decide(address, target(INET, kind, protocol, bound=bound), matching, held, strict)
    if decision.action == ADOPT:
        chosen = decision.offer
        assert chosen in offers and chosen.fd not in held and not bound and address.port != 0
        assert (chosen.address, chosen.type, chosen.protocol) == (address, kind, protocol)
    else:
        assert decision.offer is None and (decision.action == REFUSE) == (strict or decision.error == errno.EADDRINUSE)


@pytest.mark.parametrize("machine", sorted(seccomp.ARCHITECTURES))
def test_ioctl_numbers_are_those_of_the_kernel_headers(machine):
    """SECCOMP_IOCTL_NOTIF_*, as gcc computes them from linux/seccomp.h (x86-64; aarch64 uses the same asm-generic _IOC)."""
    numbers = seccomp.ioctls(seccomp.ARCHITECTURES[machine])
    assert numbers == {"recv": 0xC0502100, "send": 0xC0182101, "id_valid": 0x40082102, "addfd": 0x40182103}
