"""credspec: accounts, limits, capabilities and the verification rule, as tables."""

from collections import namedtuple
from types import SimpleNamespace

import pytest

from fdlaunch.errors import UsageError
from fdlaunch.text import credspec, spec
from fdlaunch.text.credspec import Credentials

Pw = namedtuple("Pw", "pw_name pw_uid pw_gid pw_dir pw_shell")
Gr = namedtuple("Gr", "gr_name gr_gid")
USERS = {"www": Pw("www", 33, 33, "/var/www", "/usr/sbin/nologin"), "dns": Pw("dns", 53, 530, "/var/lib/dns", "")}
GROUPS = {"www": Gr("www", 33), "ssl": Gr("ssl", 110), "dns": Gr("dns", 530)}
MEMBERS = {"www": [110], "dns": []}


def table_lookup(table, key):
    return table[key]  # KeyError for a missing entry, as pwd and grp raise


LOOKUPS = SimpleNamespace(
    getpwnam=lambda name: table_lookup(USERS, name),
    getpwuid=lambda uid: table_lookup({p.pw_uid: p for p in USERS.values()}, uid),
    getgrnam=lambda name: table_lookup(GROUPS, name),
    getgrouplist=lambda name, gid: [gid, *MEMBERS[name]],
)


@pytest.mark.parametrize(
    "text, credentials",
    [
        ("www", Credentials(33, 33, (33, 110))),
        ("www:ssl", Credentials(33, 110, (110,))),
        ("dns", Credentials(53, 530, (530,))),
        ("33", Credentials(33, 33, ())),
        ("4242:4343", Credentials(4242, 4343, ())),
        ("4242:www", Credentials(4242, 33, ())),
    ],
)
def test_resolve_account(text, credentials):
    assert credspec.resolve_account(text, LOOKUPS).credentials == credentials


@pytest.mark.parametrize(
    "text, message",
    [
        ("nobody-here", "unknown user 'nobody-here'"),
        ("www:nogroup", "unknown group 'nogroup'"),
        ("4242", "uid 4242 has no passwd entry"),
        (":33", "account ':33': not USER, USER:GROUP, UID or UID:GID"),
        ("www:", "account 'www:': not USER"),
        ("a:b:c", "account 'a:b:c': not USER"),
        ("", "account '': not USER"),
    ],
)
def test_bad_accounts(text, message):
    with pytest.raises(UsageError, match=None) as caught:
        credspec.resolve_account(text, LOOKUPS)
    assert message in str(caught.value)


def test_environment_round_trip():
    for credentials in (Credentials(33, 33, (33, 110)), Credentials(1, 2, ())):
        assert credspec.from_environment(credspec.to_environment(credentials)) == credentials
    assert credspec.to_environment(Credentials(33, 33, (33, 110))) == {"UID": "33", "GID": "33", "GIDLIST": "33,110"}


def test_account_environment():
    account = credspec.resolve_account("dns", LOOKUPS)
    assert credspec.account_environment(account) == {"HOME": "/var/lib/dns", "USER": "dns", "LOGNAME": "dns", "SHELL": "/bin/sh"}
    with pytest.raises(UsageError, match="no passwd entry"):
        credspec.account_environment(credspec.resolve_account("1:1", LOOKUPS))


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("nofile=1024", ("nofile", 1024, None)),
        ("nofile=1024:4096", ("nofile", 1024, 4096)),
        ("core=unlimited", ("core", -1, None)),
        ("as=0:unlimited", ("as", 0, -1)),
    ],
)
def test_limits(text, parsed):
    assert credspec.parse_limit(text) == parsed


@pytest.mark.parametrize("text", ["nofile", "nofile=", "nofile=1:", "nofile=x", "nofiles=1", "nofile=5:1", "nofile=unlimited:5"])
def test_bad_limits(text):
    with pytest.raises(UsageError):
        credspec.parse_limit(text)


def test_capabilities():
    assert credspec.parse_capabilities("net_bind_service,CAP_SYS_NICE,cap_chown") == (0, 10, 23)
    assert credspec.capability_names((10,)) == "cap_net_bind_service"
    with pytest.raises(UsageError, match="unknown capability 'cap_fly'"):
        credspec.parse_capabilities("cap_fly")


def observed(uid=(33,) * 4, gid=(33,) * 4, groups=(33, 110), eff=0, prm=0, inh=0, amb=0):
    return {"uid": uid, "gid": gid, "groups": groups, "cap_eff": eff, "cap_prm": prm, "cap_inh": inh, "cap_amb": amb}


WANTED = Credentials(33, 33, (33, 110))


@pytest.mark.parametrize(
    "kernel, capabilities, complaint",
    [
        (observed(), (), None),
        (observed(groups=(110, 33)), (), None),
        (observed(eff=1 << 10, prm=1 << 10, inh=1 << 10, amb=1 << 10), (10,), None),
        (observed(uid=(33, 33, 0, 33)), (), "uids are 33/33/0/33, not 33"),
        (observed(gid=(0, 33, 33, 33)), (), "gids are 0/33/33/33, not 33"),
        (observed(groups=(33, 110, 0)), (), "groups are [33, 110, 0], not [33, 110]"),
        (observed(prm=1 << 10), (), "prm capabilities are 0x400, not 0x0"),
        (observed(eff=1 << 10, prm=1 << 10, inh=1 << 10, amb=0), (10,), "amb capabilities are 0x0, not 0x400"),
        # inheritable capabilities left over would be gained back by any file with them (cap_net_raw+ei)
        (observed(inh=0x202002), (), "inh capabilities are 0x202002, not 0x0"),
        (observed(eff=1 << 10, prm=1 << 10, inh=(1 << 10) | (1 << 13), amb=1 << 10), (10,), "inh capabilities are 0x2400, not 0x400"),
    ],
)
def test_mismatches(kernel, capabilities, complaint):
    found = credspec.mismatches(WANTED, capabilities, kernel)
    assert found == ([] if complaint is None else [complaint])


@pytest.mark.parametrize("text, value", [("0", 0), ("7", 7), ("027", 0o27), ("0660", 0o660), ("0777", 0o777), ("777", 0o777)])
def test_octal_modes_accepted(text, value):
    assert credspec.parse_octal("--umask", text) == value
    assert spec.parse(f"-unix:mode={text}:/run/x").mode == value


@pytest.mark.parametrize("text", ["", "8", "0800", "1777", "00777", "-1", "+7", " 7", "\u0667", "0x1f", "99999999999"])
def test_octal_modes_refused_with_one_message_by_umask_and_mode(text):
    """One parser (numbers.octal_mode) and one rule for --umask= and mode=: 1 to 4 octal digits, at most 0777."""
    reason = "an octal mode is 1 to 4 digits 0-7, from 0000 to 0777, e.g. 0660"
    with pytest.raises(UsageError) as umask:
        credspec.parse_octal("--umask", text)
    assert str(umask.value) == f"--umask={text!r}: {reason}"
    with pytest.raises(UsageError) as mode:
        spec.parse(f"-unix:mode={text}:/run/x")
    assert str(mode.value).endswith(f"mode={text!r}: {reason}")
