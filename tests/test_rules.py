"""fdlaunch-accept's rules file and UCSPI environment: pure functions, table and property tests."""

import ipaddress
import pwd

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fdlaunch.errors import UsageError
from fdlaunch.kernel.creds import Lookups
from fdlaunch.text import rules, spec, ucspi

TEXT = """
# comment line
deny 10.1.2.3            # trailing comment
allow 10.0.0.0/8 A=1 "B=two words"
allow fd00::/8 V6=yes
allow uid:0 ROLE=root
allow gid:100
deny all
"""


def client(ip=None, uid=None, gid=None, link=None):
    return rules.Client(ipaddress.ip_address(ip) if ip else None, uid, gid, link)


@pytest.mark.parametrize(
    "who, allowed, variables, line",
    [
        (client("10.1.2.3"), False, {}, 3),
        (client("10.9.9.9"), True, {"A": "1", "B": "two words"}, 4),
        (client("fd00::1"), True, {"V6": "yes"}, 5),
        (client("192.0.2.1"), False, {}, 8),
        (client(uid=0, gid=0), True, {"ROLE": "root"}, 6),
        (client(uid=1000, gid=100), True, {}, 7),
        (client(uid=1000, gid=1000), False, {}, 8),
    ],
)
def test_first_match_decides(who, allowed, variables, line):
    assert rules.decide(rules.parse(TEXT, "t"), who) == rules.Decision(allowed, variables, line)


def test_no_rule_matched_denies():
    assert rules.decide(rules.parse("allow 10.0.0.0/8\n", "t"), client("127.0.0.1")) == rules.Decision(False, {}, None)


def test_ipv4_rules_do_not_match_ipv6_clients():
    assert not rules.decide(rules.parse("allow 0.0.0.0/0\n", "t"), client("::1")).allowed


@pytest.mark.parametrize(
    "rule, ip, allowed",
    [
        ("allow ::ffff:127.0.0.1", "127.0.0.1", True),
        ("allow ::ffff:10.0.0.0/104", "10.9.9.9", True),
        ("allow ::ffff:10.0.0.0/104", "11.0.0.1", False),
        ("allow ::ffff:0:0/96", "192.0.2.1", True),
        ("allow ::/0", "192.0.2.1", False),  # not a mapped network: IPv6 clients only
    ],
)
def test_ipv4_mapped_rules_match_the_ipv4_clients_they_map(rule, ip, allowed):
    # An IPv4 client of a dual-stack socket reaches the rules as IPv4 (ucspi.plain_ip).
    assert rules.decide(rules.parse(rule + "\n", "t"), client(ip)).allowed is allowed


@pytest.mark.parametrize(
    "rule, link, allowed",
    [
        ("allow fe80::1%eth0", "eth0", True),
        ("allow fe80::1%eth0", "wlan0", False),  # the same address on another link is another host
        ("allow fe80::%eth0/64", "eth0", True),
        ("allow fe80::%eth0/64", "wlan0", False),
        ("allow fe80::1", "wlan0", True),  # no zone: that address on every link
        ("deny fe80::1%eth0\nallow all", "eth0", False),
        ("deny fe80::1%eth0\nallow all", "wlan0", True),
    ],
)
def test_a_zoned_rule_matches_only_clients_on_its_link(rule, link, allowed):
    assert rules.decide(rules.parse(rule + "\n", "t"), client("fe80::1", link=link)).allowed is allowed


@pytest.mark.parametrize(
    "word, fault",
    [
        ("2001:db8::1%eth0", "a zone (%eth0) only goes with a link-local address or network, in fe80::/10"),
        ("::ffff:10.0.0.1%eth0", "a zone (%eth0) only goes with a link-local address"),
        ("fe80::%eth0/9", "a zone (%eth0) only goes with a link-local address"),  # wider than fe80::/10
        ("fe80::1%2", "%2 is an interface number; name the interface instead"),
        ("fe80::1%a/b", "is not an address"),  # '/' starts the prefix length
        ("fe80::1%very-long-name-x", "'very-long-name-x' is not an interface name"),
        ("fe80::1%a:b", "'a:b' is not an interface name"),
    ],
)
def test_zones_that_could_never_match_are_refused(word, fault):
    with pytest.raises(UsageError) as caught:
        rules.parse(f"allow {word}\n", "t")
    assert fault in str(caught.value) and str(caught.value).startswith(f"t line 1: 'allow {word}': ")


def test_names_are_looked_up():
    root = pwd.getpwuid(0).pw_name
    parsed = rules.parse(f"allow uid:{root}\n", "t", Lookups())
    assert parsed[0].value == 0
    with pytest.raises(UsageError, match="not a user name or number"):
        rules.parse(f"allow uid:{root}\n", "t")  # without lookups, numbers only


@pytest.mark.parametrize(
    "text, fault",
    [
        ("allow\n", "t line 1: 'allow': an address, uid:ID, gid:ID or 'all' must follow the action"),
        ("allow 1.2.3.4/33\n", "t line 1: 'allow 1.2.3.4/33': '1.2.3.4/33' is not an address"),
        ("\nallow uid:-1\n", "t line 2: 'allow uid:-1': '-1' is not a user name or number"),
        ("allow gid:4294967295\n", "'4294967295' is not a group name or number"),
        ("allow all =x\n", "'=x' is not NAME=VALUE"),
        ('allow all "unclosed\n', "t line 1: 'allow all \"unclosed': No closing quotation"),
    ],
)
def test_faults_name_the_line(text, fault):
    with pytest.raises(UsageError) as caught:
        rules.parse(text, "t")
    assert fault in str(caught.value)


@given(st.text(max_size=200))
def test_any_text_parses_or_is_refused_with_its_line(text):
    try:
        parsed = rules.parse(text, "t")
    except UsageError as error:
        assert str(error).startswith("t line ") and "\n" not in str(error)
    else:
        for rule in parsed:
            assert rule.action in ("allow", "deny")


@pytest.mark.parametrize(
    "address, shown, key",
    [
        (("127.0.0.1", 4711), "127.0.0.1:4711", "127.0.0.1"),
        (("::ffff:192.0.2.7", 80, 0, 0), "192.0.2.7:80", "192.0.2.7"),
        (("2001:db8::1", 53, 0, 0), "[2001:db8::1]:53", "2001:db8::1"),
    ],
)
def test_inet_peers(address, shown, key):
    peer = ucspi.inet_peer(address)
    assert (ucspi.describe(peer), ucspi.key(peer)) == (shown, key)


def test_environments():
    peer = ucspi.inet_peer(("::ffff:192.0.2.7", 5000, 0, 0))
    assert ucspi.tcp_environment(("::ffff:192.0.2.1", 79, 0, 0), peer, 2) == {
        "PROTO": "TCP",
        "TCPLOCALIP": "192.0.2.1",
        "TCPLOCALPORT": "79",
        "TCPREMOTEIP": "192.0.2.7",
        "TCPREMOTEPORT": "5000",
        "TCPCONNNUM": "2",
    }
    assert ucspi.inetd_environment(peer) == {"REMOTE_ADDR": "192.0.2.7", "REMOTE_PORT": "5000"}
    unix = ucspi.unix_peer(42, 1000, 100)
    assert ucspi.ipc_environment("@ctl", unix, 1) == {
        "PROTO": "IPC",
        "IPCLOCALPATH": "@ctl",
        "IPCREMOTEEUID": "1000",
        "IPCREMOTEEGID": "100",
        "IPCREMOTEPID": "42",
        "IPCCONNNUM": "1",
    }
    assert ucspi.inetd_environment(unix) == {}
    assert ucspi.describe(unix) == "uid 1000 gid 100 pid 42"
    assert spec.unix_name(b"\0ctl") == "@ctl"


def test_base_environment_drops_what_no_handler_inherits():
    given_environ = {"PATH": "/bin", "LISTEN_FDS": "1", "LISTEN_PID": "1", "LISTEN_FD_MAP": "tcp=3", "NOTIFY_SOCKET": "/n"}
    given_environ.update({"TCPREMOTEHOST": "stale", "PROTO": "TCP", "REMOTE_ADDR": "x", "KEEP": ""})
    assert ucspi.base_environment(given_environ) == {"PATH": "/bin", "KEEP": ""}


def test_lines_end_at_newlines_only():
    """A form feed or U+2028 in a comment is no line break: line numbers are the file's own."""
    found = rules.parse("# page one\x0c still a comment\u2028 too\ndeny 127.0.0.1\nallow all\n", "r", Lookups())
    assert [rule.line for rule in found] == [2, 3]
