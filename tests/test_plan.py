"""The pure layers behind fdlaunch-listen: reading the conventions and placing fds."""

import pytest

from fdlaunch.errors import Fatal, UsageError
from fdlaunch.text import fdplan, listenenv, spec, ucspi
from fdlaunch.text.listenenv import Passed

PID = 4242


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, []),
        ({"LISTEN_FDS": "2", "LISTEN_PID": str(PID)}, [Passed("unknown", 3), Passed("unknown", 4)]),
        ({"LISTEN_FDS": "2", "LISTEN_PID": str(PID), "LISTEN_FDNAMES": "a:b"}, [Passed("a", 3), Passed("b", 4)]),
        ({"LISTEN_FDS": "2", "LISTEN_PID": "1", "LISTEN_FDNAMES": "a:b"}, []),
        ({"LISTEN_FD_MAP": "udp=7,tcp=9"}, [Passed("udp", 7), Passed("tcp", 9)]),
        ({"LISTEN_FD_MAP": "dns=7,dns=9"}, [Passed("dns", 7), Passed("dns", 9)]),
        ({"LISTEN_FD_MAP": ""}, []),
        # both conventions describing the same fds, as fdlaunch-listen writes them
        ({"LISTEN_FDS": "1", "LISTEN_PID": str(PID), "LISTEN_FD_MAP": "web=3,extra=8"}, [Passed("web", 3), Passed("extra", 8)]),
    ],
)
def test_inherited(environ, expected):
    assert listenenv.inherited(environ, PID) == expected


@pytest.mark.parametrize(
    "environ, fragment",
    [
        ({"LISTEN_FDS": "x", "LISTEN_PID": str(PID)}, "LISTEN_FDS='x'"),
        ({"LISTEN_FDS": "1", "LISTEN_PID": "me"}, "LISTEN_PID='me'"),
        ({"LISTEN_FDS": "2", "LISTEN_PID": str(PID), "LISTEN_FDNAMES": "a"}, "has 1 name but LISTEN_FDS=2"),
        ({"LISTEN_FDS": "1", "LISTEN_PID": str(PID), "LISTEN_FDNAMES": "a b"}, "'a b' is not a label"),
        ({"LISTEN_FD_MAP": "udp"}, "'udp' is not LABEL=FD"),
        ({"LISTEN_FD_MAP": "udp=x"}, "'udp=x' is not LABEL=FD"),
        ({"LISTEN_FD_MAP": "a=3,b=3"}, "names fd 3 twice"),
        ({"LISTEN_FD_MAP": "a=3,b=2"}, "item 'b=2' names stdin, stdout or stderr"),
        ({"LISTEN_FD_MAP": "a=9999999999"}, "item 'a=9999999999' is beyond the open files limit"),
        ({"LISTEN_FDS": "9999999999", "LISTEN_PID": str(PID)}, "LISTEN_FDS='9999999999' is more descriptors than"),
        ({"LISTEN_FDS": "1", "LISTEN_PID": "9" * 5000}, "is not a process id"),
    ],
)
def test_malformed_environment_is_a_usage_error(environ, fragment):
    with pytest.raises(UsageError, match=None) as caught:
        listenenv.inherited(environ, PID)
    assert fragment in str(caught.value)


def test_environment_writes_both_conventions_and_keeps_the_rest():
    before = {"PATH": "/bin", "LISTEN_PID": "1", "LISTEN_PIDFDID": "99", "ODD": "a=b\tc"}
    after = listenenv.environment(before, [Passed("udp", 3), Passed("tcp", 4)], PID, True, {"DNS": 3})
    assert after == {
        "PATH": "/bin",
        "ODD": "a=b\tc",
        "LISTEN_FDS": "2",
        "LISTEN_PID": str(PID),
        "LISTEN_FDNAMES": "udp:tcp",
        "LISTEN_FD_MAP": "udp=3,tcp=4",
        "DNS": "3",
    }
    kept = listenenv.environment({"LISTEN_PID": str(PID), "LISTEN_PIDFDID": "99"}, [], PID, True, {})
    assert kept["LISTEN_PIDFDID"] == "99"
    mapped = listenenv.environment({"X": "1"}, [Passed("tcp", 9)], PID, False, {})
    assert mapped == {"X": "1", "LISTEN_FD_MAP": "tcp=9"}


def specs(*texts):
    return [spec.parse(t) for t in texts]


def test_systemd_plan_appends_after_inherited_and_honours_fd():
    layout = fdplan.plan([Passed("web", 3)], specs("-udp::53", "-tcp:fd=4:53"), {0, 1, 2, 3}, True, 1024)
    assert layout.new_fds == [5, 4]
    assert layout.passed == [Passed("web", 3), Passed("tcp", 4), Passed("udp", 5)]
    assert layout.inherited_moves == [(3, 3)]


def test_systemd_plan_moves_mapped_sockets_into_place():
    layout = fdplan.plan([Passed("a", 9), Passed("b", 7)], specs("-udp::53"), {0, 1, 2, 7, 9}, True, 1024)
    assert layout.inherited_moves == [(9, 3), (7, 4)]
    assert layout.passed == [Passed("a", 3), Passed("b", 4), Passed("udp", 5)]


def test_systemd_plan_refuses_an_open_slot():
    with pytest.raises(UsageError, match="fd 3 is already open .* use --map"):
        fdplan.plan([], specs("-udp::53"), {0, 1, 2, 3}, True, 1024)


def test_systemd_plan_refuses_fd_outside_its_range():
    with pytest.raises(UsageError, match="fd=9 .* outside 3..4"):
        fdplan.plan([], specs("-udp::53", "-tcp:fd=9:53"), {0, 1, 2}, True, 1024)


def test_map_plan_touches_nothing_open():
    layout = fdplan.plan([Passed("web", 5)], specs("-udp::53", "-tcp::53", "-tcp:fd=20:80"), {0, 1, 2, 3, 5}, False, 1024)
    assert layout.new_fds == [4, 6, 20]
    assert layout.inherited_moves == []
    assert layout.passed == [Passed("web", 5), Passed("udp", 4), Passed("tcp", 6), Passed("tcp", 20)]


def test_map_plan_refuses_an_open_fd():
    with pytest.raises(UsageError, match="fd=3 .* already open"):
        fdplan.plan([], specs("-udp:fd=3:53"), {0, 1, 2, 3}, False, 1024)


@pytest.mark.parametrize("option", ["fd=5", "var=X"])
def test_repeated_fd_or_var_is_refused(option):
    with pytest.raises(UsageError, match="given to both"):
        fdplan.plan([], specs(f"-udp:{option}:53", f"-tcp:{option}:53"), {0, 1, 2}, False, 1024)


def test_fd_beyond_the_limit_is_a_system_limit():
    with pytest.raises(Fatal, match="beyond the open files limit") as caught:
        fdplan.plan([], specs("-udp:fd=64:53"), {0, 1, 2}, False, 64)
    assert caught.value.status == 111


def test_variables():
    layout = fdplan.plan([], specs("-udp:var=DNS_UDP:53", "-tcp::53"), {0, 1, 2}, True, 1024)
    assert layout.variables == {"DNS_UDP": 3}


@pytest.mark.parametrize("name", listenenv.VARIABLES)
def test_every_convention_variable_is_kept_out_of_the_same_places(name):
    """One list (listenenv.VARIABLES): var= may not take it, --vars may not make it, no handler inherits it."""
    assert set(listenenv.VARIABLES) >= {"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "LISTEN_PIDFDID", "LISTEN_FD_MAP"}
    with pytest.raises(UsageError, match=f"{name} is set by fdlaunch-listen itself"):
        spec.parse(f"-tcp:var={name}:80")
    label = name.removeprefix("LISTEN_").lower()
    with pytest.raises(UsageError, match="which the program needs for itself"):
        fdplan.variables([Passed(label, 3)], "LISTEN_")
    assert ucspi.base_environment({name: "3", "PATH": "/bin"}) == {"PATH": "/bin"}


def test_plan_carries_one_record_per_new_socket():
    """fdlaunch-listen's plan: each new socket's spec and fd together, found by fd, never zipped by position."""
    udp, tcp = specs("-udp::53", "-tcp:fd=4:53")
    layout = fdplan.plan([Passed("web", 3)], [udp, tcp], {0, 1, 2, 3}, True, 1024)
    assert layout.new == [fdplan.Socket(udp, 5), fdplan.Socket(tcp, 4)]
    assert (layout.new_at(4).spec, layout.new_at(5).spec, layout.new_at(3)) == (tcp, udp, None)
    assert layout.new_at(4).endpoint is None and layout.new_at(4).opened is None
