"""The notify fuzzer: hostile datagrams at a running notify-wait watcher and a running handoff.

Every datagram comes from a process outside the program's tree (this test,
or a pid it forges as root), so none may count as readiness, whatever it
says. After each one a BARRIER from us (answered by closing its pipe, as
every message's descriptors are) shows the watcher has handled it; then the
watcher must still run, hold exactly the descriptors it held before, and
have reported nothing. At the end the program's own READY=1 still counts.
"""

import array
import os
import select
import signal
import socket
import subprocess
from collections import Counter

import pytest
from conftest import TIMEOUT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_handoff import told_notify_socket
from test_notify import Waiting, sockaddr

EXAMPLES = 25  # per class and target: a few seconds in all
LINES = st.sampled_from(["READY=1", "READY=1\n", "MAINPID=1", "MAINPID=99999999999999999999", "BARRIER=1", "FDSTORE=1", "STATUS=x"])
MESSAGES = st.lists(LINES, min_size=1, max_size=8).map(lambda lines: "\n".join(lines).encode())
CLASSES = {
    "malformed": st.one_of(st.binary(max_size=4096), MESSAGES),
    "oversized": st.integers(4097, 60000).map(lambda n: (b"READY=1\n" + b"x" * n)[:n]),
    "fd-carrying": st.tuples(st.integers(1, 253), MESSAGES),
    "forged sender": st.tuples(st.sampled_from(["init", "us", "unrelated", "watcher"]), st.sampled_from([0, 65534]), MESSAGES),
    "gone sender": MESSAGES,
}


def send(notify_socket, data, ancillary=()):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendmsg([data], list(ancillary), 0, sockaddr(notify_socket))


def handled(notify_socket):
    """BARRIER=1 with a pipe: True once the watcher has closed it, so has handled all sent before."""
    read_end, write_end = os.pipe()
    try:
        send(notify_socket, b"BARRIER=1", [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [write_end]))])
        os.close(write_end)
        write_end = None
        waiter = select.poll()
        waiter.register(read_end, select.POLLHUP)
        return bool(waiter.poll(5000))
    finally:
        os.close(read_end)
        if write_end is not None:
            os.close(write_end)


def open_fds(pid):
    return sorted(os.listdir(f"/proc/{pid}/fd"))


class Target:
    """What the fuzzer attacks: a notify socket, the watcher's pid, and how to tell it reported readiness."""

    def __init__(self, notify_socket, watcher, reported):
        self.notify_socket, self.watcher, self.reported = notify_socket, watcher, reported


def fuzz(target, pids):
    """Run each class of datagrams at target; the number tried per class."""
    counts = Counter()
    assert handled(target.notify_socket)
    before = open_fds(target.watcher)
    for kind, strategy in CLASSES.items():
        attack(kind, strategy, target, pids, lambda: open_fds(target.watcher) == before, counts)
    return counts


def attack(kind, strategy, target, pids, fds_unchanged, counts):
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def one(case):
        counts[kind] += 1
        carried = deliver(kind, case, target, pids)
        assert handled(target.notify_socket), "the watcher stopped answering"
        if carried is not None:
            try:
                assert os.read(carried, 1) == b""
            except BlockingIOError:
                pytest.fail("a descriptor sent along is still open in the watcher")
            finally:
                os.close(carried)
        assert not target.reported(), f"a {kind} datagram counted as readiness: {case!r:.200}"
        assert fds_unchanged(), "the watcher's descriptors changed"

    one()


def deliver(kind, case, target, pids):
    """Send one case; for fd-carrying, the read end of the pipe whose write end went along."""
    if kind in ("malformed", "oversized"):
        send(target.notify_socket, case)
    elif kind == "fd-carrying":
        number, data = case
        carried, write_end = os.pipe2(os.O_NONBLOCK)
        try:
            send(target.notify_socket, data, [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [write_end] * number))])
        finally:
            os.close(write_end)
        return carried
    elif kind == "forged sender":
        who, uid, data = case
        send(target.notify_socket, data, [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, array.array("i", [pids[who], uid, uid]))])
    else:  # sent by a process that exits before the stopped watcher reads it: it could have been anyone
        os.kill(target.watcher, signal.SIGSTOP)
        try:
            child = os.fork()
            if child == 0:
                try:
                    send(target.notify_socket, case)
                finally:
                    os._exit(0)
            os.waitpid(child, 0)
        finally:
            os.kill(target.watcher, signal.SIGCONT)
    return None


@pytest.fixture
def unrelated():
    process = subprocess.Popen(["sleep", "60"])
    yield process.pid
    process.kill()
    process.wait()


def require_forging():
    if os.geteuid() != 0:
        pytest.skip("forging another pid's credentials needs root")


@pytest.mark.parametrize("mode", ["fork", "chain"])
def test_notify_wait_watcher_survives_hostile_datagrams(mode, tmp_path, unrelated):
    require_forging()
    env = {"PATH": os.environ["PATH"], "TMPDIR": str(tmp_path)}
    waiting = Waiting(mode, tmp_path, env)
    try:
        pids = {"init": 1, "us": os.getpid(), "unrelated": unrelated, "watcher": waiting.watcher}
        counts = fuzz(Target(waiting.notify_socket, waiting.watcher, lambda: waiting.is_ready(0)), pids)
        print(f"notify-wait ({mode} mode): {sum(counts.values())} datagrams: {dict(counts)}")
        assert waiting.process.poll() is None
        waiting.go.touch()
        assert waiting.is_ready(TIMEOUT), "the program's own READY=1 no longer counts"
        errors = waiting.errors.read_text()
        assert "ignored a notification:" not in errors, errors  # what an exception while handling would say
        assert "Traceback" not in errors and "fdlaunch-notify-wait: fatal" not in errors
    finally:
        waiting.close()


def test_handoff_survives_hostile_datagrams(tmp_path, unrelated):
    require_forging()
    upstream_path = str(tmp_path / "upstream")
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    upstream.bind(upstream_path)
    told, go = tmp_path / "told", tmp_path / "go"
    script = f'echo "$NOTIFY_SOCKET" > {told}; while [ ! -e {go} ]; do sleep 0.02; done; fdlaunch-notify READY=1; exec sleep 60'
    errors = tmp_path / "stderr"
    with errors.open("w") as stderr:
        handoff = subprocess.Popen(
            ["fdlaunch-handoff", "--", "sh", "-c", script],
            env={"PATH": os.environ["PATH"], "TMPDIR": str(tmp_path), "NOTIFY_SOCKET": upstream_path},
            stderr=stderr,
        )
    try:
        notify_socket = told_notify_socket(told)

        def reported():
            return bool(select.select([upstream], [], [], 0)[0])

        pids = {"init": 1, "us": os.getpid(), "unrelated": unrelated, "watcher": handoff.pid}
        counts = fuzz(Target(notify_socket, handoff.pid, reported), pids)
        print(f"fdlaunch-handoff: {sum(counts.values())} datagrams: {dict(counts)}")
        assert handoff.poll() is None
        go.touch()
        upstream.settimeout(TIMEOUT)
        assert b"READY=1" in upstream.recv(4096)
        handoff.send_signal(signal.SIGTERM)
        assert handoff.wait(TIMEOUT) == -signal.SIGTERM  # as its instance ended
        assert "Traceback" not in errors.read_text() and "fdlaunch-handoff: fatal" not in errors.read_text()
    finally:
        handoff.kill()
        handoff.wait()
        upstream.close()
