"""The pure side of fdlaunch-handoff --listen-from: reading FILE, and what a reload keeps, adds and removes."""

import pytest

from fdlaunch.errors import UsageError
from fdlaunch.text import socketset, spec
from fdlaunch.text.listenenv import Passed
from fdlaunch.text.socketset import Slot

STDIO = {0, 1, 2}


def specs(*texts):
    return [spec.parse(t) for t in texts]


def slots(*pairs):
    return [Slot(spec.parse(text), fd) for text, fd in pairs]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", []),
        ("# only a comment\n\n   \n", []),
        ("-tcp::80\n-udp::53\n", ["-tcp::80", "-udp::53"]),
        ("  -tcp::80   # the web\n\t-udp::53\t#dns", ["-tcp::80", "-udp::53"]),
        ("-unix:/run/a#b\n", ["-unix:/run/a#b"]),  # '#' inside a word is not a comment
        ("-tcp::80\r\n-tcp::81\r\n", ["-tcp::80", "-tcp::81"]),
    ],
)
def test_parse_file(text, expected):
    assert socketset.parse_file(text, "F") == specs(*expected)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("-tcp::80\n\n-tcp::99999\n", "'F', line 3: bad socket spec '-tcp::99999': port 99999 is out of range"),
        ("tcp::80\n", "'F', line 1: bad socket spec 'tcp::80': a spec is -PROTO:OPTIONS:ADDRESS"),
        ("-tcp::80 -tcp::81\n", "'F', line 1: bad socket spec '-tcp::80 -tcp::81'"),
    ],
)
def test_parse_file_names_the_bad_line(text, fragment):
    with pytest.raises(UsageError) as caught:
        socketset.parse_file(text, "F")
    assert str(caught.value).startswith(fragment)
    assert "\n" not in str(caught.value)


A, B, C = "-tcp:label=a:127.0.0.1:81", "-tcp:label=b:127.0.0.1:82", "-tcp:label=c:127.0.0.1:83"


@pytest.mark.parametrize(
    "old, new, kept, added, removed, new_fds",
    [
        # the first read: everything is added, in FILE order
        ([], [A, B], [], [0, 1], [], [3, 4]),
        # nothing changed: same sockets, same fds
        ([(A, 3), (B, 4)], [A, B], [(0, 0), (1, 1)], [], [], [3, 4]),
        # order changed in FILE: the fds follow the sockets, not the lines
        ([(A, 3), (B, 4)], [B, A], [(1, 0), (0, 1)], [], [], [4, 3]),
        # remove a, add c: b stays on 4, c fills the hole
        ([(A, 3), (B, 4)], [B, C], [(1, 0)], [1], [0], [4, 3]),
        # the set shrinks: b stays, c is past the end of 3..4 and moves down
        ([(A, 3), (B, 4), (C, 5)], [B, C], [(1, 0), (2, 1)], [], [0], [4, 3]),
        # a new label keeps the socket
        ([(A, 3)], ["-tcp:label=web:127.0.0.1:81"], [(0, 0)], [], [], [3]),
        # any other option makes another socket
        ([(A, 3)], ["-tcp:label=a,backlog=5:127.0.0.1:81"], [], [0], [0], [3]),
        # fd= taken by another spec: the kept one gives its number up
        ([(A, 3), (B, 4)], [A, "-tcp:label=b,fd=3:127.0.0.1:82"], [(0, 0), (1, 1)], [], [], [4, 3]),
        # the same spec twice (reuseport) pairs up in order
        (
            [("-tcp:reuseport:127.0.0.1:80", 3), ("-tcp:reuseport:127.0.0.1:80", 4)],
            ["-tcp:reuseport:127.0.0.1:80"],
            [(0, 0)],
            [],
            [1],
            [3],
        ),
    ],
)
def test_diff_systemd(old, new, kept, added, removed, new_fds):
    change = socketset.diff(slots(*old), specs(*new), [], STDIO, True, 1024)
    assert (change.kept, change.added, change.removed, change.layout.new_fds) == (kept, added, removed, new_fds)


def test_diff_after_inherited_sockets_keeps_the_label_map_in_order():
    inherited = [Passed("web", 3)]
    change = socketset.diff(slots((A, 4), (B, 5)), specs(B, C), inherited, STDIO | {3}, True, 1024)
    assert change.layout.new_fds == [5, 4]
    assert change.layout.passed == [Passed("web", 3), Passed("c", 4), Passed("b", 5)]
    assert change.layout.inherited_moves == [(3, 3)]


def test_diff_map_keeps_every_fd_and_touches_nothing_open():
    # fd 3 is open (s6's notification fd, say): never used
    change = socketset.diff(slots((A, 4), (B, 6), (C, 7)), specs(C, "-udp:127.0.0.1:53", A), [], STDIO | {3}, False, 1024)
    assert change.layout.new_fds == [7, 5, 4]
    assert change.removed == [1]
    assert change.layout.inherited_moves == []


def test_diff_refuses_what_fdlaunch_listen_refuses():
    with pytest.raises(UsageError, match="fd=9 .* outside 3..4"):
        socketset.diff([], specs(A, "-tcp:fd=9:127.0.0.1:82"), [], STDIO, True, 1024)
    with pytest.raises(UsageError, match="fd 3 is already open"):
        socketset.diff([], specs(A), [], STDIO | {3}, True, 1024)


def test_var_follows_the_socket():
    change = socketset.diff(slots((A, 3), (B, 4)), specs("-tcp:label=b,var=WEB:127.0.0.1:82"), [], STDIO, True, 1024)
    assert change.layout.variables == {"WEB": 3}


@pytest.mark.parametrize(
    "count, added, removed, text",
    [
        (1, [], [], "serving 1 socket"),
        (3, [], [], "serving 3 sockets"),
        (3, ["[::]:8443/tcp"], ["0.0.0.0:8080/tcp"], "serving 3 sockets; reloaded: +[::]:8443/tcp, -0.0.0.0:8080/tcp"),
        (0, [], ["/run/x.sock"], "serving 0 sockets; reloaded: -/run/x.sock"),
    ],
)
def test_describe(count, added, removed, text):
    assert socketset.describe(count, added, removed) == text
