"""The spec grammar: tables of accepted and refused specs, and properties."""

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fdlaunch.errors import UsageError
from fdlaunch.text import spec, ucspi

ACCEPTED = [
    # text, proto, host, port, path, name
    ("-udp::53", "udp", "", "53", "", "udp"),
    ("-tcp::53", "tcp", "", "53", "", "tcp"),
    ("-tcp:label=tls:853", "tcp", "", "853", "", "tls"),
    ("-tcp:8080", "tcp", "", "8080", "", "tcp"),
    ("-tcp:127.0.0.1:8080", "tcp", "127.0.0.1", "8080", "", "tcp"),
    ("-tcp::127.0.0.1:8080", "tcp", "127.0.0.1", "8080", "", "tcp"),
    ("-tcp:[::1]:53", "tcp", "::1", "53", "", "tcp"),
    ("-tcp::[::1]:53", "tcp", "::1", "53", "", "tcp"),
    ("-tcp6:[fe80::1%lo]:53", "tcp6", "fe80::1%lo", "53", "", "tcp6"),
    ("-udp4:localhost:domain", "udp4", "localhost", "domain", "", "udp4"),
    ("-tcp:reuseport:80", "tcp", "", "80", "", "tcp"),
    ("-tcp:0", "tcp", "", "0", "", "tcp"),
    ("-unix:/run/x.sock", "unix", "", "", "/run/x.sock", "unix"),
    ("-unix::/run/x.sock", "unix", "", "", "/run/x.sock", "unix"),
    ("-unix:label=control,mode=0600:/run/dns/control", "unix", "", "", "/run/dns/control", "control"),
    ("-unix:owner=www:www,mode=0660:/run/x", "unix", "", "", "/run/x", "unix"),
    ("-unix:owner=www:sock", "unix", "", "", "sock", "unix"),
    ("-unix-dgram:@log", "unix-dgram", "", "", "@log", "unix-dgram"),
    ("-unix-seqpacket::relative/path", "unix-seqpacket", "", "", "relative/path", "unix-seqpacket"),
]


@pytest.mark.parametrize("text, proto, host, port, path, name", ACCEPTED)
def test_accepted(text, proto, host, port, path, name):
    parsed = spec.parse(text)
    assert (parsed.proto, parsed.host, parsed.port, parsed.path, parsed.name) == (proto, host, port, path, name)


def test_options_are_read():
    parsed = spec.parse("-tcp:label=web,fd=7,var=WEB,backlog=16,reuseport,freebind,rcvbuf=64K,sndbuf=1M,device=lo:80")
    assert (parsed.label, parsed.fd, parsed.var, parsed.backlog) == ("web", 7, "WEB", 16)
    assert parsed.reuseport and parsed.freebind and not parsed.transparent
    assert (parsed.rcvbuf, parsed.sndbuf, parsed.device) == (65536, 1 << 20, "lo")
    unix = spec.parse("-unix:mode=640,owner=0:0,mkdir:/run/a/b")
    assert (unix.mode, unix.owner, unix.mkdir, unix.shareddir) == (0o640, "0:0", True, False)
    assert spec.parse("-unix:shareddir:/run/a/b").shareddir


REFUSED = [
    # text, a fragment of the message
    ("-tpc::80", "unknown protocol 'tpc'"),
    ("-tcp", "a spec is -PROTO:OPTIONS:ADDRESS"),
    ("-tcp:lable=web:80", "unknown option 'lable'"),
    ("-tcp:label=web,label=x:80", "given twice"),
    ("-tcp:label=a b:80", "label"),
    ("-tcp:label=:80", "label"),
    ("-tcp:fd=2:80", "fd must be 3 or more"),
    ("-tcp:fd=x:80", "whole number"),
    ("-tcp:var=1X:80", "variable name"),
    ("-tcp:var=LISTEN_FDS:80", "set by fdlaunch-listen"),
    ("-tcp:backlog:80", "needs a value"),
    ("-tcp:reuseport=1:80", "takes no value"),
    ("-udp:backlog=5:53", "only for tcp, unix and unix-seqpacket"),
    ("-unix:reuseport:/x", "only for tcp and udp"),
    ("-tcp4:v6only:80", "only for tcp, tcp6, udp and udp6"),
    ("-tcp:mode=0600:80", "only for unix sockets with a path"),
    ("-unix:mode=0600:@abstract", "only for unix sockets with a path"),
    ("-unix:shareddir:@abstract", "only for unix sockets with a path"),
    ("-tcp:shareddir:80", "only for unix sockets with a path"),
    ("-unix:mode=0800:/x", "octal"),
    ("-unix:owner=a,:/x", "owner"),
    ("-tcp:rcvbuf=0:80", "buffer size"),
    ("-tcp:device=a/b:80", "interface name"),
    ("-tcp::99999", "out of range"),
    ("-tcp::http!", "service name"),
    ("-tcp:", "service name"),
    ("-tcp:::1:53", "brackets"),
    ("-tcp:fe80::1:53", "brackets"),
    (
        "-tcp:http:127.0.0.1:9300",
        "'http' is neither an option nor part of the address: a label is given as label=http, e.g. -tcp:label=http:127.0.0.1:9300",
    ),
    ("-udp:dns:[::1]:53", "a label is given as label=dns, e.g. -udp:label=dns:[::1]:53"),
    ("-tcp:reuseprot:127.0.0.1:80", "unknown option 'reuseprot', did you mean 'reuseport'?"),
    ("-tcp:[::1]53", "[IPV6]:PORT"),
    ("-tcp:[1.2.3.4]:53", "not an IPv6 address"),
    ("-tcp4:[::1]:53", "IPv4 only"),
    ("-tcp6:127.0.0.1:53", "IPv6 only"),
    ("-tcp:a..b:53", "not an IP address or a host name"),
    ("-tcp:300.1.1.1:53", "not an IP address or a host name"),
    ("-unix:", "needs a path"),
    ("-unix:@", "needs a path"),
    ("-unix:/" + "x" * 120, "the limit is 107"),
]


@pytest.mark.parametrize("text, fragment", REFUSED)
def test_refused_with_a_message_that_quotes_the_spec(text, fragment):
    with pytest.raises(UsageError) as caught:
        spec.parse(text)
    message = str(caught.value)
    assert message.startswith(f"bad socket spec {text!r}: ")
    assert fragment in message
    assert "\n" not in message
    assert caught.value.status == 100


@pytest.mark.parametrize(
    "word, is_spec",
    [
        ("-tcp::80", True),
        ("-unix:/x", True),
        ("-tpc:80", True),
        ("-v", False),
        ("--map", False),
        ("--fd=3", False),
        ("prog", False),
        ("-", False),
    ],
)
def test_specs_are_told_from_options_by_shape(word, is_spec):
    assert spec.looks_like_spec(word) is is_spec


def test_split_words():
    assert spec.split_words(["-v", "-udp::53", "--map", "-tcp::53", "prog", "-tcp::1", "--"]) == (
        ["-v", "--map"],
        ["-udp::53", "-tcp::53"],
        ["prog", "-tcp::1", "--"],
    )
    assert spec.split_words(["-udp::53", "--", "-prog"]) == ([], ["-udp::53"], ["-prog"])
    assert spec.split_words(["-udp::53"]) == ([], ["-udp::53"], [])


# Properties: the parser never fails except with a UsageError, and every
# spec it accepts prints in a canonical form that parses back to itself.

TEXT = st.text(alphabet=st.sampled_from("-:[]@,=./%tcpudunixlabefdvrs0123456789aAZ_ "), max_size=40)


@settings(max_examples=400, deadline=None)
@given(st.one_of(TEXT, st.text(max_size=40), st.builds(lambda p, r: f"-{p}:{r}", st.sampled_from(list(spec.PROTOCOLS)), TEXT)))
def test_parser_never_crashes(text):
    try:
        parsed = spec.parse(text)
    except UsageError as error:
        assert "\n" not in str(error) or "\n" in text
        return
    assert spec.parse(spec.format_spec(parsed)) == parsed


LABELS = st.text(alphabet=st.sampled_from("abcXYZ019._-"), min_size=1, max_size=12)
INET = st.builds(
    lambda proto, host, port, label, fd, reuse: (
        f"-{proto}:{','.join(o for o in (label and f'label={label}', fd and f'fd={fd}', reuse and 'reuseport') if o)}:{host}{port}"
    ),
    st.sampled_from(["tcp", "tcp4", "udp", "udp4"]),
    st.sampled_from(["", "127.0.0.1:", "localhost:", "10.1.2.3:"]),
    st.one_of(st.integers(0, 65535).map(str), st.sampled_from(["http", "domain"])),
    st.one_of(st.none(), LABELS),
    st.one_of(st.none(), st.integers(3, 10**6)),
    st.booleans(),
)
UNIX = st.builds(
    lambda proto, path, mode: f"-{proto}:{'' if mode is None else f'mode={mode:o}'}:{path}",
    st.sampled_from(["unix", "unix-dgram", "unix-seqpacket"]),
    st.text(alphabet=st.sampled_from("abc/._-:=@"), min_size=1, max_size=30).filter(lambda p: not p.startswith("@") and p != "@"),
    st.one_of(st.none(), st.integers(0, 0o777)),
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(INET, UNIX))
def test_well_formed_specs_round_trip(text):
    parsed = spec.parse(text)
    assert spec.parse(spec.format_spec(parsed)) == parsed
    assert spec.format_spec(spec.parse(spec.format_spec(parsed))) == spec.format_spec(parsed)


@pytest.mark.parametrize(
    "where, transport, printed",
    [
        (("127.0.0.1", 8080), "tcp", "127.0.0.1:8080/tcp"),
        (("::1", 53, 0, 0), "udp", "[::1]:53/udp"),
        (("", "http"), "tcp", ":http/tcp"),
        ("/run/x", "unix", "/run/x"),
        (b"\0abstract", "unix", "@abstract"),
        ("/run/a\nb", "unix", "'/run/a\\nb'"),
        ((ipaddress.ip_address("::1"), 4711), None, "[::1]:4711"),
    ],
)
def test_one_address_printer(where, transport, printed):
    """fdlaunch(7), DIAGNOSTICS: specs, bound sockets, endpoints and peers all print through format_address."""
    assert spec.format_address(where, transport) == printed


def test_specs_and_peers_print_alike():
    assert spec.parse("-udp6:[::1]:53").address() == "[::1]:53/udp"
    assert spec.parse("-unix-dgram:@ctl").address() == "@ctl"
    assert ucspi.describe(ucspi.inet_peer(("::ffff:127.0.0.1", 4711, 0, 0))) == "127.0.0.1:4711"
    assert ucspi.describe(ucspi.inet_peer(("::1", 4711, 0, 0))) == "[::1]:4711"
