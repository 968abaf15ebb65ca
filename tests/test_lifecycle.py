"""fdlaunch-handoff and fdlaunch-notify-wait through crashes, hangs and slow starts.

--respawn replaces a serving instance that dies while the sockets stay
open; the fd store carries descriptors across instances; --watchdog
notices a daemon that stopped serving; EXTEND_TIMEOUT_USEC= lengthens a
start; what the serving instance says goes upward.
"""

import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import TIMEOUT, free_port, http_get, require_root, run, s6_supervised, wait_for_line
from test_handoff import HELLO, HttpLoad, Upstream

from fdlaunch.kernel.fdstore import FdStore


def no_core_files():
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGABRT's core would land in the working directory


class Running:
    """argv started with NOTIFY_SOCKET an Upstream in tmp_path and stderr in a file; killed at the end."""

    def __init__(self, tmp_path, argv):
        directory = Path(tempfile.mkdtemp(dir=tmp_path))
        self.upstream = Upstream(directory)
        self.stderr = directory / "stderr"
        env = {**os.environ, "NOTIFY_SOCKET": self.upstream.path}
        with open(self.stderr, "w") as stderr:
            self.process = subprocess.Popen(argv, env=env, stderr=stderr, stdout=subprocess.DEVNULL, preexec_fn=no_core_files)

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.upstream.sock.close()

    def ready_pid(self):
        return int(self.upstream.wait_ready()["MAINPID"])


def handoff(tmp_path, port, options, program, label="http"):
    argv = ["fdlaunch-listen", f"-tcp:label={label}:127.0.0.1:{port}", "--"]
    return Running(tmp_path, [*argv, "fdlaunch-handoff", "-v", "--main-pid=instance", *options, "--", *program])


# --respawn


def test_respawn_replaces_killed_instances_and_refuses_no_connection(tmp_path):
    port = free_port()
    warmup = "0.5"  # a slow start: clients wait in the backlog meanwhile
    spacing = 2.6  # five kills then take more than the crash window (5 exits in 10 s): a loop this is not
    with handoff(tmp_path, port, ["--respawn"], [sys.executable, HELLO, warmup]) as running:
        pid = running.ready_pid()
        load = HttpLoad(port, timeout=TIMEOUT)  # a client waits in the backlog while no instance runs: slow, not refused
        try:
            killed = []
            last_kill = time.monotonic() - spacing
            for _ in range(5):
                wait_served_by(load, pid)  # each replacement serves before it is killed in turn
                time.sleep(max(0.0, last_kill + spacing - time.monotonic()))
                os.kill(pid, signal.SIGKILL)
                last_kill = time.monotonic()
                killed.append(pid)
                pid = running.ready_pid()
                assert pid not in killed
            wait_served_by(load, pid)
        finally:
            load.stop()
        refused = [failure for failure in load.failures if "ConnectionRefused" in failure]
        assert refused == [], "the sockets stayed open: clients waited in the backlog"
        assert len(load.failures) <= 5, f"only a request in the hands of a killed instance is lost: {load.failures}"
        assert len(set(load.pids)) == 6
        stderr = running.stderr.read_text()
        assert f"fdlaunch-handoff: warning: pid {killed[0]} was killed by SIGKILL; starting a new instance in 0.1 seconds" in stderr
        assert "giving up" not in stderr


def wait_served_by(load, pid):
    deadline = time.monotonic() + TIMEOUT
    while pid not in load.pids:
        assert time.monotonic() < deadline, f"pid {pid} answered nothing"
        time.sleep(0.02)


def test_a_crash_loop_ends_handoff_with_the_last_status(tmp_path):
    program = ["sh", "-c", "fdlaunch-notify READY=1; exit 3"]
    with handoff(tmp_path, free_port(), ["--respawn"], program) as running:
        assert running.process.wait(TIMEOUT) == 3
        stderr = running.stderr.read_text()
        assert stderr.count("exited with status 3; starting a new instance in") == 4
        assert "exited with status 3: 5 exits within 10 seconds; giving up" in stderr


def test_without_respawn_an_instance_that_dies_ends_handoff(tmp_path):
    with handoff(tmp_path, free_port(), [], ["sh", "-c", "fdlaunch-notify READY=1; exit 3"]) as running:
        assert running.process.wait(TIMEOUT) == 3
        assert "starting a new instance" not in running.stderr.read_text()


# The fd store

STATEFUL = r"""
import os, socket, sys, time
import fdlaunch
log = sys.argv[1]
passed = fdlaunch.listen_fds()
if "counter" in passed:
    counter = passed["counter"][0]
else:
    counter = os.memfd_create("counter")
    fdlaunch.notify("FDSTORE=1", "FDNAME=counter", fds=[counter], wait=True)
starts = int(os.pread(counter, 20, 0).strip() or b"0") + 1
os.pwrite(counter, str(starts).encode().ljust(20), 0)
if "conn" in passed:
    with socket.socket(fileno=passed["conn"][0]) as conn:
        conn.sendall(f"answered by {os.getpid()} at start {starts}\n".encode())
    fdlaunch.notify("FDSTOREREMOVE=1", "FDNAME=conn", wait=True)
listener = socket.socket(fileno=passed["http"][0])
fdlaunch.notify("READY=1")
with open(log, "a") as out:
    out.write(f"{os.getpid()} up at start {starts} with {sorted(passed)}\n")
conn, _ = listener.accept()
conn.recv(16)
fdlaunch.notify("FDSTORE=1", "FDNAME=conn", fds=[conn.fileno()], wait=True)
with open(log, "a") as out:
    out.write(f"{os.getpid()} stored\n")
time.sleep(60)
"""


def test_the_fd_store_keeps_a_connection_and_state_across_a_crash(tmp_path):
    log, port = tmp_path / "log", free_port()
    log.touch()
    options = ["--respawn", "--fdstore-max=4"]
    with handoff(tmp_path, port, options, [sys.executable, "-c", STATEFUL, str(log)]) as running:
        first = running.ready_pid()
        client = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        with client:
            client.sendall(b"hello\n")
            wait_for_line(log, f"{first} stored")
            os.kill(first, signal.SIGKILL)
            second = running.ready_pid()
            reply = client.makefile().readline()
        assert reply == f"answered by {second} at start 2\n", "the next instance had the connection, and the counter"
        wait_for_line(running.stderr, f"pid {second} removed 1 stored descriptor named 'conn'")
        wait_for_line(log, f"{second} up at start 2 with ['conn', 'counter', 'http']")  # logged just after its READY=1
        os.kill(second, signal.SIGKILL)
        third = running.ready_pid()
        wait_for_line(log, f"{third} up at start 3 with ['counter', 'http']")  # conn was removed: not handed again


def test_a_stored_connection_that_hangs_up_is_dropped(tmp_path):
    log, port = tmp_path / "log", free_port()
    log.touch()
    with handoff(tmp_path, port, ["--fdstore-max=4"], [sys.executable, "-c", STATEFUL, str(log)]) as running:
        first = running.ready_pid()
        client = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        client.sendall(b"hello\n")
        wait_for_line(log, f"{first} stored")
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # close with a reset
        client.close()
        wait_for_line(running.stderr, "fdlaunch-handoff: info: dropped the stored descriptor 'conn': it hung up")


def test_the_fd_store_is_off_by_default_and_bounded(tmp_path):
    log, port = tmp_path / "log", free_port()
    log.touch()
    with handoff(tmp_path, port, [], [sys.executable, "-c", STATEFUL, str(log)]) as running:
        pid = running.ready_pid()
        wait_for_line(running.stderr, f"ignored FDSTORE=1 from pid {pid}: the fd store is off (--fdstore-max=0)")
    with handoff(tmp_path, free_port(), ["--fdstore-max=0"], ["true"]):
        pass
    done = run(["fdlaunch-handoff", "--fdstore-max=99999", "true"])
    assert done.returncode == 100
    assert done.stderr == "fdlaunch-handoff: fatal: --fdstore-max='99999' is not a number of descriptors from 0 to 4096\n"


# --watchdog

PINGS_THEN_HANGS = r"""
import os, sys, time
import fdlaunch
fdlaunch.notify("READY=1")
for _ in range(int(sys.argv[1])):
    time.sleep(0.1)
    fdlaunch.notify("WATCHDOG=1")
if sys.argv[2:] == ["trigger"]:
    fdlaunch.notify("WATCHDOG=trigger")
time.sleep(60)
"""


def test_handoff_watchdog_replaces_an_instance_that_stops_pinging(tmp_path):
    program = [sys.executable, "-c", PINGS_THEN_HANGS, "5"]
    with handoff(tmp_path, free_port(), ["--respawn", "--watchdog=0.5", "--grace=1"], program) as running:
        hung = running.ready_pid()
        replacement = running.ready_pid()
        assert replacement != hung
        stderr = running.stderr.read_text()
        assert f"pid {hung} (the serving instance) sent no WATCHDOG=1 for 0.5 seconds; sending it SIGABRT" in stderr
        assert f"pid {hung} was killed by SIGABRT; starting a new instance" in stderr


def test_handoff_watchdog_trigger(tmp_path):
    program = [sys.executable, "-c", PINGS_THEN_HANGS, "1", "trigger"]
    with handoff(tmp_path, free_port(), ["--watchdog=30"], program) as running:
        pid = running.ready_pid()
        assert running.process.wait(TIMEOUT) == -signal.SIGABRT
        assert f"pid {pid} (the serving instance) asked for it with WATCHDOG=trigger; sending it SIGABRT" in running.stderr.read_text()


def test_handoff_tells_instances_the_watchdog_and_relays_a_supervisors(tmp_path):
    """Under a supervisor's watchdog (WATCHDOG_USEC, WATCHDOG_PID ours) the serving instance pings through us."""
    report = """
import os, time, fdlaunch
mine = os.environ["WATCHDOG_PID"] == str(os.getpid())
fdlaunch.notify("READY=1", f"STATUS={os.environ['WATCHDOG_USEC']} {mine}")
fdlaunch.notify("WATCHDOG=1")
time.sleep(60)
"""
    script = 'WATCHDOG_USEC=2000000 WATCHDOG_PID=$$ exec "$@"'
    argv = ["sh", "-c", script, "sh", "fdlaunch-handoff", "--watchdog=9", "--", sys.executable, "-c", report]
    with Running(tmp_path, argv) as running:
        fields = running.upstream.wait_for("WATCHDOG")
        assert set(fields) == {"WATCHDOG"}
        assert "--watchdog: our supervisor's watchdog (WATCHDOG_USEC) is relayed instead" in running.stderr.read_text()
    argv = ["fdlaunch-handoff", "--watchdog=9", "--", sys.executable, "-c", report]
    with Running(tmp_path, argv) as running:
        while "STATUS" not in (fields := running.upstream.next_message()) or "READY" in fields:
            pass
        assert fields["STATUS"] == "9000000 True", "its own interval, and WATCHDOG_PID its pid"


def test_notify_wait_watchdog_lets_the_program_die_and_says_why(tmp_path):
    argv = ["fdlaunch-notify-wait", "--watchdog=0.5", "--", sys.executable, "-c", PINGS_THEN_HANGS, "5"]
    program = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, preexec_fn=no_core_files)
    try:
        assert program.wait(TIMEOUT) == -signal.SIGABRT
        said = program.stderr.read()
        expected = f"fdlaunch-notify-wait (watcher): warning: pid {program.pid} sent no WATCHDOG=1 for 0.5 seconds; sending it SIGABRT"
        assert expected in said.splitlines()
    finally:
        program.kill()
        program.wait()


def test_notify_wait_watchdog_is_not_for_fork_mode():
    done = run(["fdlaunch-notify-wait", "--fork", "--watchdog=1", "true"])
    assert done.returncode == 100
    assert "--watchdog needs a watcher that stays with PROG" in done.stderr


# EXTEND_TIMEOUT_USEC

SLOW_START = r"""
import os, sys, time
import fdlaunch
marker, extend = sys.argv[1], sys.argv[2] == "extend"
if os.path.exists(marker):  # not the first instance: a slow start
    if extend:
        fdlaunch.notify("EXTEND_TIMEOUT_USEC=3000000")
    time.sleep(1.5)
open(marker, "w").close()
fdlaunch.notify("READY=1")
time.sleep(60)
"""


@pytest.mark.parametrize("extend", [True, False])
def test_extend_timeout_keeps_a_slow_new_instance(extend, tmp_path):
    program = [sys.executable, "-c", SLOW_START, str(tmp_path / "marker"), "extend" if extend else "plain"]
    with handoff(tmp_path, free_port(), ["--ready-timeout=1", "--grace=0.5"], program) as running:
        first = running.ready_pid()
        running.process.send_signal(signal.SIGHUP)
        after = int(running.upstream.wait_ready()["MAINPID"])
        if extend:
            assert after != first, "the slow instance took over"
        else:
            assert after == first
            assert "handoff failed: the new instance" in running.stderr.read_text()


@pytest.mark.parametrize("extend", [True, False])
def test_extend_timeout_keeps_a_slow_start_under_notify_wait(extend, tmp_path):
    (tmp_path / "marker").touch()
    program = [sys.executable, "-c", SLOW_START, str(tmp_path / "marker"), "extend" if extend else "plain"]
    with open(tmp_path / "stderr", "w") as stderr:  # the daemon's stdout and stderr, held open after we return
        done = run(["fdlaunch-notify-wait", "--fork", "--timeout=1", "--", *program], stderr=stderr)
    try:
        assert done.returncode == (0 if extend else 2), (tmp_path / "stderr").read_text()
    finally:
        if extend:
            os.kill(int(done.stdout), signal.SIGKILL)


# What the serving instance says goes upward

SAYS = r"""
import time
import fdlaunch
fdlaunch.notify("READY=1")
fdlaunch.notify("STATUS=answering 42 queries", "ERRNO=0")
time.sleep(60)
"""


def test_handoff_relays_what_the_serving_instance_says(tmp_path):
    with handoff(tmp_path, free_port(), [], [sys.executable, "-c", SAYS]) as running:
        pid = running.ready_pid()
        while "ERRNO" not in (fields := running.upstream.next_message()):
            pass
        assert fields == {"STATUS": "answering 42 queries", "ERRNO": "0"}
        assert pid


def test_handoff_says_how_many_reload_signals_it_merged(tmp_path):
    with handoff(tmp_path, free_port(), [], [sys.executable, HELLO, "1"]) as running:
        running.ready_pid()
        running.process.send_signal(signal.SIGHUP)
        wait_for_line(running.stderr, "handing over from pid")
        for count in (1, 2):  # each taken in before the next is sent: the kernel does not queue a signal already pending
            running.process.send_signal(signal.SIGHUP)
            wait_for_line(running.stderr, "reload signal during a handoff: one more handoff follows it", count)
        wait_for_line(running.stderr, "; 2 reload signals that came meanwhile are merged into this one")
        assert running.stderr.read_text().count("handing over from pid") == 2


def test_stored_descriptors_follow_the_sockets_in_both_conventions():
    store = FdStore(4)
    stored = [os.memfd_create("a"), os.memfd_create("b")]
    try:
        assert store.add("state", stored, poll=True) is None
        pid = os.getpid()
        systemd = {"LISTEN_PID": str(pid), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "web:dns", "LISTEN_FD_MAP": "web=3,dns=4", "X": "y"}
        environ, moves = store.handed(systemd, [(9, 3)], pid)
        assert environ == {
            **systemd,
            "LISTEN_FDS": "4",
            "LISTEN_FDNAMES": "web:dns:state:state",
            "LISTEN_FD_MAP": "web=3,dns=4,state=5,state=6",
        }
        assert moves == [(9, 3), (stored[0], 5), (stored[1], 6)]
        mapped = {"LISTEN_FD_MAP": "web=7"}
        environ, moves = store.handed(mapped, [(20, 7)], pid)
        assert environ == {"LISTEN_FD_MAP": "web=7,state=8,state=9"} and moves == [(20, 7), (stored[0], 8), (stored[1], 9)]
        assert store.add("more", [os.memfd_create("c"), os.memfd_create("d"), os.memfd_create("e")], poll=True).startswith("storing 3 more")
        assert store.remove("state") == 2
        assert store.handed(systemd, [], pid) == (systemd, [])
    finally:
        store.close()
    for fd in stored:
        with pytest.raises(OSError):
            os.fstat(fd)


# Instances never outlive fdlaunch-handoff


def alive(pid):
    """Whether pid runs (a zombie, its parent gone, is dead: it only waits for init to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_killed_handoff_leaves_no_instance_and_s6_restarts_the_service_at_once(tmp_path):
    """Instances that dropped privileges lost their parent death signal: the guard stops them."""
    require_root()
    port, service, log = free_port(), tmp_path / "service", tmp_path / "log"
    service.mkdir()
    (service / "run").write_text(
        f"#!/bin/sh\nexec 2>>{log}\nexec fdlaunch-listen -tcp:127.0.0.1:{port} -- "
        f"fdlaunch-handoff -- fdlaunch-setuidgid nobody -- {sys.executable} {HELLO} 0\n"
    )
    (service / "run").chmod(0o755)
    with s6_supervised(service, env={**os.environ}):
        instance = int(http_get(port).split("hello from pid ")[1].split()[0])
        assert "Uid:\t65534" in Path(f"/proc/{instance}/status").read_text()
        run(["s6-svc", "-k", str(service)])  # SIGKILL to fdlaunch-handoff, which s6 restarts at once
        killed = time.monotonic()
        while alive(instance):
            assert time.monotonic() - killed < 1, "the instance outlived its fdlaunch-handoff by a second"
            time.sleep(0.01)
        answered = int(http_get(port, seconds=2).split("hello from pid ")[1].split()[0])
        assert answered != instance
    said = log.read_text()
    assert "Address already in use" not in said
    assert "fdlaunch-handoff (guard): warning: its parent (pid " in said and f"died; stopping its instances (pid {instance})" in said
