"""fdlaunch-handoff: overlapped restarts under load, failures that keep the old instance, signals."""

import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import TIMEOUT, free_port, python_systemd, require, run, unread_fd3_started, wait_for_line, wait_queued
from test_notify import abstract_sockets, send, send_and_exit_at_once

HERE = Path(__file__).resolve().parent
HELLO = str(HERE.parent / "examples" / "hello_httpd.py")
UDP_ECHO = str(HERE / "udp_echo.py")
WARMUP = "0.3"  # the daemon takes a while to become ready


class Upstream:
    """Our stand-in for systemd: the NOTIFY_SOCKET fdlaunch-handoff reports to."""

    def __init__(self, directory):
        self.path = str(directory / "upstream")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(TIMEOUT)

    def next_message(self):
        return dict(line.split("=", 1) for line in self.sock.recv(4096).decode().splitlines())

    def wait_ready(self):
        """The next READY=1, skipping RELOADING and STATUS-only messages; its fields."""
        return self.wait_for("READY")

    def wait_for(self, field):
        """The next message with field=1, skipping the others (a STATUS= the serving instance relays); its fields."""
        while True:
            fields = self.next_message()
            if fields.get(field) == "1":
                return fields


class Handoff:
    """fdlaunch-listen ... -- fdlaunch-handoff -- PROG, started and stopped around a test."""

    def __init__(self, tmp_path, spec, program, options=(), env=()):
        self.upstream = Upstream(tmp_path)
        # The tests follow instances by the MAINPID each READY=1 names.
        main_pid = [] if any(o.startswith("--main-pid") for o in options) else ["--main-pid=instance"]
        argv = ["fdlaunch-listen", spec, "--", "fdlaunch-handoff", "-v", *main_pid, *options, "--", *program]
        self.process = subprocess.Popen(
            argv, env={**os.environ, "NOTIFY_SOCKET": self.upstream.path, **dict(env)}, stderr=(tmp_path / "stderr").open("w"), text=True
        )
        self.stderr = tmp_path / "stderr"

    def reload(self):
        self.process.send_signal(signal.SIGHUP)

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(TIMEOUT)

    def kill(self):
        """SIGKILL: the instances must follow (they get SIGTERM when fdlaunch-handoff dies)."""
        self.process.kill()
        self.process.wait()


class HttpLoad:
    """Requests in a loop, each on a new connection, until stopped: the pids that answered, the failures."""

    def __init__(self, port, timeout=5):
        self.port, self.timeout, self.pids, self.failures, self.running = port, timeout, [], [], True
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        while self.running:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout) as client:
                    client.sendall(b"GET /load HTTP/1.0\r\n\r\n")
                    reply = b""
                    while chunk := client.recv(4096):
                        reply += chunk
                self.pids.append(int(reply.split(b"hello from pid ")[1].split()[0]))
            except (OSError, IndexError, ValueError) as error:
                self.failures.append(repr(error))

    def stop(self):
        self.running = False
        self.thread.join(TIMEOUT)

    def wait_answered_by(self, pid):
        """Until a request made from now on is answered by pid: the load has reached it."""
        start = len(self.pids)
        deadline = time.monotonic() + TIMEOUT
        while pid not in self.pids[start:]:
            assert time.monotonic() < deadline, f"pid {pid} answered nothing; failures: {self.failures[-3:]}"
            time.sleep(0.02)


@pytest.fixture
def http(tmp_path):
    port = free_port()
    handoff = Handoff(tmp_path, f"-tcp:label=http:127.0.0.1:{port}", [sys.executable, HELLO, WARMUP])
    yield handoff, port
    handoff.kill()


def notify_socket_of_pid(pid):
    """The NOTIFY_SOCKET a process was started with."""
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next(entry.split(b"=", 1)[1].decode() for entry in entries if entry.startswith(b"NOTIFY_SOCKET="))


def test_ten_handoffs_under_load_fail_nothing(http):
    handoff, port = http
    first = handoff.upstream.wait_ready()
    assert int(first["MAINPID"]) != handoff.process.pid
    load = HttpLoad(port)
    serving = [int(first["MAINPID"])]
    try:
        for _ in range(10):
            load.wait_answered_by(serving[-1])
            handoff.reload()
            fields = handoff.upstream.wait_ready()
            serving.append(int(fields["MAINPID"]))
            assert "took over from pid" in fields["STATUS"]
        load.wait_answered_by(serving[-1])
    finally:
        load.stop()
    assert load.failures == []
    assert len(set(serving)) == 11, "every handoff brings a new pid"
    answered = list(dict.fromkeys(load.pids))  # distinct, in the order seen
    assert answered == serving, "the responses show the serving pid changing each time"
    assert handoff.stop() == 0


def test_reload_messages_go_upward(http):
    handoff, _ = http
    handoff.upstream.wait_ready()
    handoff.reload()
    reloading = handoff.upstream.wait_for("RELOADING")
    assert int(reloading["MONOTONIC_USEC"]) > 0
    assert handoff.upstream.wait_ready()["READY"] == "1"
    said = handoff.stderr.read_text()  # -v, without --listen-from: every instance gets the same sockets
    assert "fdlaunch-handoff: info: handing over from pid" in said and "the new instance gets" not in said


def test_a_new_instance_that_fails_leaves_the_old_one_serving(tmp_path):
    port = free_port()
    fail = tmp_path / "fail"
    program = ["sh", "-c", f"[ -e {fail} ] && exit 3; exec {sys.executable} {HELLO} {WARMUP}"]
    handoff = Handoff(tmp_path, f"-tcp:label=http:127.0.0.1:{port}", program)
    try:
        old = int(handoff.upstream.wait_ready()["MAINPID"])
        load = HttpLoad(port)
        fail.touch()
        handoff.reload()
        after = handoff.upstream.wait_ready()
        load.wait_answered_by(old)
        load.stop()
        assert int(after["MAINPID"]) == old and "handoff failed" in after["STATUS"]
        assert load.failures == [] and set(load.pids) == {old}
        assert "exited with status 3 before it was ready; pid" in handoff.stderr.read_text()
    finally:
        handoff.kill()


def test_a_new_instance_that_is_never_ready_is_stopped(tmp_path):
    port = free_port()
    slow = tmp_path / "slow"
    program = ["sh", "-c", f"[ -e {slow} ] && exec sleep 60; exec {sys.executable} {HELLO} 0"]
    handoff = Handoff(tmp_path, f"-tcp:label=http:127.0.0.1:{port}", program, ["--ready-timeout=0.5", "--grace=0.5"])
    try:
        old = int(handoff.upstream.wait_ready()["MAINPID"])
        slow.touch()
        handoff.reload()
        assert int(handoff.upstream.wait_ready()["MAINPID"]) == old
        assert "was not ready after 0.5 seconds" in handoff.stderr.read_text()
        # its own pid, not every "sleep 60" on the machine: other tests run at the same time
        failed = int(handoff.stderr.read_text().split("the new instance (pid ")[1].split(")")[0])
        deadline = time.monotonic() + TIMEOUT
        while Path(f"/proc/{failed}").exists():
            assert time.monotonic() < deadline, "the failed instance was not killed after its grace"
            time.sleep(0.02)
    finally:
        handoff.kill()


def test_a_program_gone_at_reload_leaves_the_old_one_serving(tmp_path):
    port = free_port()
    script = tmp_path / "daemon"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} {HELLO} 0\n")
    script.chmod(0o755)
    handoff = Handoff(tmp_path, f"-tcp:label=http:127.0.0.1:{port}", [str(script)])
    try:
        old = int(handoff.upstream.wait_ready()["MAINPID"])
        script.unlink()
        handoff.reload()
        assert int(handoff.upstream.wait_ready()["MAINPID"]) == old
        assert f"unable to exec {script}: No such file or directory" in handoff.stderr.read_text()
    finally:
        handoff.kill()


def test_reload_signals_during_a_handoff_are_neither_lost_nor_multiplied(http):
    handoff, _ = http
    first = handoff.upstream.wait_ready()["MAINPID"]
    for _ in range(3):
        handoff.reload()
        time.sleep(0.05)
    second = handoff.upstream.wait_ready()["MAINPID"]
    third = handoff.upstream.wait_ready()["MAINPID"]
    assert len({first, second, third}) == 3
    handoff.upstream.sock.settimeout(2.5)
    with pytest.raises(TimeoutError):
        handoff.upstream.wait_ready()  # no third handoff


def test_sigterm_goes_to_the_instance_and_its_status_comes_back(http):
    handoff, _ = http
    handoff.upstream.wait_ready()
    assert handoff.stop() == 0  # hello_httpd exits 0 on SIGTERM


def test_an_instance_that_dies_ends_handoff_with_its_status(http):
    handoff, _ = http
    pid = int(handoff.upstream.wait_ready()["MAINPID"])
    os.kill(pid, signal.SIGKILL)
    assert handoff.process.wait(TIMEOUT) == -signal.SIGKILL


def test_udp_datagrams_during_handoffs_are_all_answered(tmp_path):
    port = free_port(socket.SOCK_DGRAM)
    handoff = Handoff(tmp_path, f"-udp:label=dns:127.0.0.1:{port}", [sys.executable, UDP_ECHO, WARMUP])
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(5)
    unanswered, pids = [], set()
    try:
        handoff.upstream.wait_ready()
        done = threading.Event()

        def reloads():
            for _ in range(3):
                handoff.reload()
                handoff.upstream.wait_ready()
            done.set()

        reloader = threading.Thread(target=reloads, daemon=True)
        reloader.start()
        number = 0
        while not done.is_set():
            number += 1
            client.sendto(str(number).encode(), ("127.0.0.1", port))
            try:
                pid, echoed = client.recv(2048).decode().split()
                assert echoed == str(number)
                pids.add(pid)
            except TimeoutError:
                unanswered.append(number)
        reloader.join(TIMEOUT)
    finally:
        client.close()
        handoff.kill()
    assert unanswered == [] and number > 10
    assert len(pids) >= 3


def test_instances_do_not_outlive_a_killed_handoff(http):
    handoff, _ = http
    pid = int(handoff.upstream.wait_ready()["MAINPID"])
    handoff.kill()
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists() or "Z (zombie)" in Path(f"/proc/{pid}/status").read_text()


@pytest.mark.parametrize(
    "options, message",
    [
        (["--signal=TERM"], "that signal stops fdlaunch-handoff"),
        (["--signal=BOGUS"], "--signal='BOGUS' is not a signal"),
        (["--grace=-1"], "--grace='-1' is not a number of seconds"),
        (["--fd=77"], "--fd='77': not an open descriptor"),
        (["--main-pid=parent"], "--main-pid='parent' is not 'instance' or 'self'"),
    ],
)
def test_handoff_usage_errors(options, message):
    done = run(["fdlaunch-handoff", *options, "true"])
    assert done.returncode == 100
    assert done.stderr.startswith("fdlaunch-handoff: fatal: ") and message in done.stderr


def test_missing_program_at_start():
    done = run(["fdlaunch-handoff", "no-such-program-fdl"])
    assert done.returncode == 127
    assert done.stderr == "fdlaunch-handoff: fatal: unable to exec no-such-program-fdl: No such file or directory\n"


def test_main_pid_self_lets_execreload_signal_the_reported_pid(tmp_path):
    """As systemd's ExecReload=kill -HUP $MAINPID would, with the MAINPID we reported."""
    port = free_port()
    handoff = Handoff(tmp_path, f"-tcp:label=http:127.0.0.1:{port}", [sys.executable, HELLO, "0"], ["--main-pid=self"])
    try:
        reported = int(handoff.upstream.wait_ready()["MAINPID"])
        assert reported == handoff.process.pid
        os.kill(reported, signal.SIGHUP)
        fields = handoff.upstream.wait_ready()
        assert int(fields["MAINPID"]) == reported and "took over from pid" in fields["STATUS"]
    finally:
        handoff.kill()


def told_notify_socket(path, seconds=10):
    deadline = time.monotonic() + seconds
    while not (path.exists() and path.read_text().endswith("\n")):
        assert time.monotonic() < deadline, "the instance did not report its NOTIFY_SOCKET"
        time.sleep(0.02)
    return path.read_text().strip()


def test_a_sender_gone_before_it_was_read_does_not_complete_a_handoff(tmp_path):
    """With fdlaunch-handoff stopped, a stranger says READY=1 and exits; the candidate never takes over."""
    port = free_port()
    slow, told = tmp_path / "slow", tmp_path / "told"
    program = ["sh", "-c", f'[ -e {slow} ] && {{ echo "$NOTIFY_SOCKET" > {told}; exec sleep 60; }}; exec {sys.executable} {HELLO} 0']
    handoff = Handoff(tmp_path, f"-tcp:label=http:127.0.0.1:{port}", program, ["--ready-timeout=2", "--grace=0.5"])
    try:
        old = int(handoff.upstream.wait_ready()["MAINPID"])
        slow.touch()
        handoff.reload()
        notify_socket = told_notify_socket(told)
        os.kill(handoff.process.pid, signal.SIGSTOP)
        try:
            send_and_exit_at_once(notify_socket)
        finally:
            os.kill(handoff.process.pid, signal.SIGCONT)
        after = handoff.upstream.wait_ready()
        assert int(after["MAINPID"]) == old and "handoff failed" in after["STATUS"]
        assert "was not ready after 2 seconds" in handoff.stderr.read_text()
    finally:
        handoff.kill()


SHORT_LIVED = {
    "systemd-notify": "systemd-notify --ready",
    "fdlaunch-notify": "fdlaunch-notify READY=1",
    "python-systemd": "exec {python} -c 'import time; from systemd import daemon; daemon.notify(\"READY=1\"); time.sleep(60)'",
}


@pytest.mark.parametrize("sender", SHORT_LIVED)
def test_short_lived_senders_make_an_instance_ready_though_handoff_is_slow(sender, tmp_path):
    """A sender that waits on its BARRIER (systemd-notify, fdlaunch-notify) is still there when read."""
    if sender == "python-systemd":
        command = SHORT_LIVED[sender].format(python=shlex.quote(python_systemd()))
    else:
        require(sender)
        command = SHORT_LIVED[sender]
    go, pidfile = tmp_path / "go", tmp_path / "pid"
    program = ["sh", "-c", f"echo $$ > {pidfile}; while [ ! -e {go} ]; do sleep 0.02; done; {command}; exec sleep 60"]
    handoff = Handoff(tmp_path, f"-tcp:label=http:127.0.0.1:{free_port()}", program)
    try:
        wait_for_line(pidfile, "\n")  # the instance is started and waits for go
        os.kill(handoff.process.pid, signal.SIGSTOP)
        try:
            go.touch()
            wait_queued(notify_socket_of_pid(int(pidfile.read_text())))  # READY=1 is sent and waits unread
        finally:
            os.kill(handoff.process.pid, signal.SIGCONT)
        assert handoff.upstream.wait_ready()["MAINPID"] == pidfile.read_text().strip()
    finally:
        handoff.kill()


def test_nothing_is_left_when_handoff_is_killed(tmp_path):
    """SIGKILL of fdlaunch-handoff leaves no file in TMPDIR and no socket."""
    tmpdir, told = tmp_path / "tmpdir", tmp_path / "told"
    tmpdir.mkdir()
    program = ["sh", "-c", f'echo "$NOTIFY_SOCKET" > {told}; exec sleep 60']
    handoff = Handoff(tmp_path, f"-tcp:label=http:127.0.0.1:{free_port()}", program, env={"TMPDIR": str(tmpdir)})
    try:
        notify_socket = told_notify_socket(told)
    finally:
        handoff.kill()
    assert os.listdir(tmpdir) == []
    assert notify_socket not in abstract_sockets()


def test_a_live_strangers_ready_is_ignored(tmp_path):
    """A READY=1 from outside the instances (here, this test) while no handoff is under way: ignored, handoff goes on."""
    go, told, pidfile = tmp_path / "go", tmp_path / "told", tmp_path / "pid"
    script = (
        f'echo $$ > {pidfile}; echo "$NOTIFY_SOCKET" > {told}; '
        f"while [ ! -e {go} ]; do sleep 0.02; done; fdlaunch-notify READY=1; exec sleep 60"
    )
    handoff = Handoff(tmp_path, f"-tcp:label=http:127.0.0.1:{free_port()}", ["sh", "-c", script])
    try:
        send(told_notify_socket(told), b"READY=1")
        handoff.upstream.sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            handoff.upstream.wait_ready()
        assert handoff.process.poll() is None, handoff.stderr.read_text()
        go.touch()
        handoff.upstream.sock.settimeout(TIMEOUT)
        assert handoff.upstream.wait_ready()["MAINPID"] == pidfile.read_text().strip()
    finally:
        handoff.kill()


def test_a_notification_fd_nobody_reads_is_a_warning_and_the_instance_serves_on(tmp_path):
    err = tmp_path / "stderr"
    handoff = unread_fd3_started(["fdlaunch-handoff", "--fd=3", "--", "sh", "-c", "fdlaunch-notify READY=1; exec sleep 30"], err)
    try:
        wait_for_line(err, "fdlaunch-handoff: warning: unable to write the readiness newline on fd 3: Broken pipe")
        handoff.terminate()
        assert handoff.wait(TIMEOUT) == -signal.SIGTERM, "it served on, until its stop: " + err.read_text()
    finally:
        handoff.kill()
        handoff.wait()
