"""fdlaunch-notify-wait and fdlaunch-notify: real senders, real supervisors, real sockets."""

import array
import contextlib
import os
import select
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    PROBE,
    TIMEOUT,
    free_port,
    python_systemd,
    read_probe,
    require,
    require_root,
    run,
    s6_supervised,
    unread_fd3_started,
    wait_for_line,
    wait_queued,
)

import fdlaunch
from fdlaunch.kernel import proc


@pytest.fixture
def env(tmp_path):
    """A clean environment whose TMPDIR (where the private socket goes) the test can inspect."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    return {"PATH": os.environ["PATH"], "TMPDIR": str(tmp)}


def run_fork(argv, env, **kwargs):
    """Run fdlaunch-notify-wait --fork ...; its stderr (also the daemon's stdout) in a file, read back."""
    with open(Path(env["TMPDIR"]).parent / "stderr", "w+") as err:
        done = run(argv, env=env, stderr=err, **kwargs)
        err.seek(0)
        done.stderr = err.read()
    return done


def assert_nothing_left(env):
    assert os.listdir(env["TMPDIR"]) == [], "the private socket directory was left behind"


def kill_quietly(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def python_systemd_notify():
    return [python_systemd(), "-c", "import time; from systemd import daemon; daemon.notify('READY=1'); time.sleep(30)"]


SENDERS = {
    "systemd-notify": lambda: ["sh", "-c", 'systemd-notify --ready; echo "systemd-notify: $?" >&2; exec sleep 30'],
    "python-systemd": python_systemd_notify,
    "fdlaunch-notify": lambda: ["sh", "-c", 'fdlaunch-notify READY=1; echo "fdlaunch-notify: $?" >&2; exec sleep 30'],
}


@pytest.mark.parametrize("sender", SENDERS)
def test_fork_mode_with_real_senders(sender, env):
    if sender == "systemd-notify":
        require("systemd-notify")
    started = time.monotonic()
    done = run_fork(["fdlaunch-notify-wait", "--fork", "--timeout=20", "--", *SENDERS[sender]()], env=env)
    pid = int(done.stdout)
    try:
        assert done.returncode == 0, done.stderr
        assert Path(f"/proc/{pid}").exists(), "the program is left running"
        assert time.monotonic() - started < 10
        if sender != "python-systemd":  # the barrier was answered; sh says so once the sender has exited, after us
            wait_for_line(Path(env["TMPDIR"]).parent / "stderr", f"{sender}: 0")
    finally:
        kill_quietly(pid)
    assert_nothing_left(env)


def test_fork_mode_waits_for_readiness_not_for_start(env, tmp_path):
    marker = tmp_path / "ready-marker"
    script = f"sleep 1; touch {marker}; fdlaunch-notify READY=1; exec sleep 30"
    done = run_fork(["fdlaunch-notify-wait", "--fork", "--", "sh", "-c", script], env=env)
    try:
        assert done.returncode == 0 and marker.exists()
    finally:
        kill_quietly(int(done.stdout))


def test_fork_mode_prints_a_reported_mainpid(env):
    script = "sleep 30 & fdlaunch-notify READY=1 MAINPID=$!; wait"
    done = run_fork(["fdlaunch-notify-wait", "--fork", "--", "sh", "-c", script], env=env)
    try:
        assert done.returncode == 0
        reported = int(done.stdout)
        deadline = time.monotonic() + TIMEOUT  # $! is sh's child, which execs sleep a moment later
        while not Path(f"/proc/{reported}/cmdline").read_bytes().startswith(b"sleep"):
            assert time.monotonic() < deadline, "the reported pid never ran sleep"
            time.sleep(0.02)
    finally:
        kill_quietly(int(done.stdout))


def test_fork_mode_fails_fast_when_the_program_dies(env):
    started = time.monotonic()
    done = run(["fdlaunch-notify-wait", "--fork", "--timeout=60", "--", "sh", "-c", "sleep 0.2; exit 7"], env=env)
    assert time.monotonic() - started < 10
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("fdlaunch-notify-wait: fatal: sh (pid ")
    assert done.stderr.endswith(") exited with status 7 before it was ready\n")
    assert_nothing_left(env)


def test_fork_mode_reports_a_signal(env):
    done = run(["fdlaunch-notify-wait", "--fork", "--", "sh", "-c", "kill -KILL $$"], env=env)
    assert done.returncode == 1
    assert "was killed by SIGKILL before it was ready" in done.stderr


def test_fork_mode_timeout_stops_and_reaps(env, tmp_path):
    pidfile = tmp_path / "pid"
    done = run(["fdlaunch-notify-wait", "--fork", "--timeout=0.5", "--", "sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"], env=env)
    assert done.returncode == 2
    assert "was not ready after 0.5 seconds; stopped it: was killed by SIGTERM" in done.stderr
    assert not Path(f"/proc/{pidfile.read_text().strip()}").exists()


def test_fork_mode_passes_sigterm_to_the_program(env):
    waiter = subprocess.Popen(["fdlaunch-notify-wait", "--fork", "--", "sleep", "30"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_child(waiter.pid, "sleep")  # the program runs: the signal is its to get
        waiter.send_signal(signal.SIGTERM)
        assert waiter.wait(TIMEOUT) == 1
        assert "was killed by SIGTERM before it was ready" in waiter.stderr.read()
    finally:
        waiter.kill()
        waiter.wait()


def test_fork_mode_after_fdlaunch_listen_keeps_listen_pid_right(env):
    reader = [
        python_systemd(),
        "-c",
        "import os, sys, time; from systemd import daemon;"
        "print(daemon.listen_fds_with_names(), file=sys.stderr, flush=True); daemon.notify('READY=1'); time.sleep(30)",
    ]
    done = run_fork(["fdlaunch-listen", "-tcp:label=web:127.0.0.1:0", "--", "fdlaunch-notify-wait", "--fork", "--", *reader], env=env)
    try:
        assert done.returncode == 0, done.stderr
        assert "{3: 'web'}" in done.stderr
    finally:
        kill_quietly(int(done.stdout))


class Upstream:
    """A NOTIFY_SOCKET as a supervisor has it: receives datagrams with their credentials."""

    def __init__(self, directory):
        self.path = str(directory / "upstream.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(TIMEOUT)

    def receive(self):
        """The next datagram's text; the pid its credentials claim is left in self.sender."""
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12) + socket.CMSG_SPACE(64))
        for _level, kind, payload in ancillary:
            if kind == socket.SCM_RIGHTS:
                for fd in array.array("i", payload):
                    os.close(fd)
            elif kind == socket.SCM_CREDENTIALS:
                self.sender = struct.unpack("iII", payload[:12])[0]
        return data.decode()


def test_forward_relays_ready_with_mainpid_and_later_status(env, tmp_path):
    upstream = Upstream(tmp_path)
    script = (
        "sleep 0.2; fdlaunch-notify READY=1 STATUS=serving; fdlaunch-notify 'STATUS=still serving'; sleep 0.2; fdlaunch-notify STOPPING=1"
    )
    program = subprocess.Popen(["fdlaunch-notify-wait", "--forward", "--", "sh", "-c", script], env={**env, "NOTIFY_SOCKET": upstream.path})
    try:
        assert upstream.receive() == f"READY=1\nSTATUS=serving\nMAINPID={program.pid}"
        assert upstream.receive() == "STATUS=still serving"
        assert upstream.receive() == "STOPPING=1"
        assert program.wait(TIMEOUT) == 0
    finally:
        program.kill()
        program.wait()
    assert_nothing_left(env)


def test_s6_fd_relay_and_the_program_keeps_the_pid(env, tmp_path):
    read_end, write_end = os.pipe()
    script = "ls /proc/$$/fd > fds; echo $$ > pid; sleep 0.3; fdlaunch-notify READY=1; sleep 0.5"
    program = subprocess.Popen(
        ["fdlaunch-notify-wait", f"--fd={write_end}", "--", "sh", "-c", script], env=env, pass_fds=(write_end,), cwd=tmp_path
    )
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as notification:
            assert notification.read() == b"\n"  # a newline, then EOF: the fd was closed
        assert program.wait(TIMEOUT) == 0
    finally:
        program.kill()
        program.wait()
    assert int((tmp_path / "pid").read_text()) == program.pid
    assert str(write_end) not in (tmp_path / "fds").read_text().split()


def test_s6_supervise_sees_readiness_and_the_daemon_pid(env, tmp_path):
    script = (
        f"exec fdlaunch-notify-wait --fd=3 -- sh -c 'echo $$ > {tmp_path}/daemon-pid; sleep 1; "
        f'touch {tmp_path}/ready; exec {sys.executable} -c "import fdlaunch, time; fdlaunch.notify(\\"READY=1\\"); time.sleep(60)"\'\n'
    )
    with s6_service(tmp_path, script, env) as service:
        waited = run(["s6-svwait", "-U", "-t", "15000", str(service)], env=env)
        assert waited.returncode == 0, waited.stderr
        assert (tmp_path / "ready").exists(), "s6-svwait -U returned before the daemon was ready"
        status = run(["s6-svstat", str(service)], env=env).stdout
        assert status.startswith(f"up (pid {(tmp_path / 'daemon-pid').read_text().strip()})")
        assert "ready" in status


def notify_socket_of(program_stdout_file, seconds=5):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if program_stdout_file.exists() and program_stdout_file.read_text().endswith("\n"):
            return program_stdout_file.read_text().strip()
        time.sleep(0.02)
    pytest.fail("the program did not report its NOTIFY_SOCKET")


def sockaddr(notify_socket):
    return "\0" + notify_socket[1:] if notify_socket.startswith("@") else notify_socket


def send(path, data, fds=()):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        sock.sendmsg([data], ancillary, 0, sockaddr(path))


def test_a_stranger_is_not_believed_and_junk_does_not_stop_the_watcher(env, tmp_path):
    """The test process itself (not the program, not below it) says READY=1: ignored.

    Junk datagrams follow (invalid UTF-8, no '=', oversized, a pile of fds);
    then the program's own READY=1 still counts.
    """
    told = tmp_path / "notify-socket"
    go = tmp_path / "go"
    script = f'echo "$NOTIFY_SOCKET" > {told}; while [ ! -e {go} ]; do sleep 0.05; done; fdlaunch-notify READY=1; exec sleep 30'
    errors = tmp_path / "stderr"
    waiter = subprocess.Popen(
        ["fdlaunch-notify-wait", "--fork", "--timeout=20", "--", "sh", "-c", script],
        env=env,
        stdout=subprocess.PIPE,
        stderr=errors.open("w"),
        text=True,
    )
    try:
        path = notify_socket_of(told)
        send(path, b"READY=1")
        read_end, write_end = os.pipe()
        send(path, b"\xff\xfe\nREADY\n=1\n", fds=[write_end] * 100)
        os.close(write_end)
        send(path, b"STATUS=" + b"x" * 60000)
        assert readable(read_end, TIMEOUT) and os.read(read_end, 1) == b"", "every fd sent with the junk is closed once it is read"
        assert waiter.poll() is None, "a stranger or junk counted as readiness"
        go.touch()
        out = waiter.stdout.readline()
        assert waiter.wait(TIMEOUT) == 0
        err = errors.read_text()
        assert f"ignored a notification from pid {os.getpid()}, not pid" in err
        assert "longer than 4096 bytes" in err
        kill_quietly(int(out))
    finally:
        waiter.kill()
        waiter.wait()


def test_command_and_stop_relays(env, tmp_path):
    script = "fdlaunch-notify READY=1; sleep 30"
    program = subprocess.Popen(
        ["fdlaunch-notify-wait", "--stop", "--command=echo registered $MAINPID >&2", "--", "sh", "-c", script],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = program.stderr.readline()
        assert line == f"registered {program.pid}\n"
        deadline = time.monotonic() + 5
        while "T (stopped)" not in Path(f"/proc/{program.pid}/status").read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "T (stopped)" in Path(f"/proc/{program.pid}/status").read_text()
    finally:
        program.kill()
        program.wait()


def test_chain_timeout_with_kill(env):
    program = subprocess.Popen(
        ["fdlaunch-notify-wait", "--timeout=0.3", "--kill", "--", "sleep", "30"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        assert program.wait(TIMEOUT) == -signal.SIGTERM
        assert "was not ready after 0.3 seconds; sending it SIGTERM" in program.stderr.read()
    finally:
        program.kill()
        program.wait()


def test_the_watcher_never_outlives_the_program(env):
    marker = f"fdlaunch-marker-{os.getpid()}"
    done = run(["fdlaunch-notify-wait", "--", "sh", "-c", f"exit 0 # {marker}"], env=env)
    assert done.returncode == 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and marker in run(["ps", "-eo", "args"]).stdout:
        time.sleep(0.05)
    assert marker not in run(["ps", "-eo", "args"]).stdout
    assert_nothing_left(env)


def test_environment_and_descriptors_in_chain_mode(env, probe):
    done, report = probe(["fdlaunch-notify-wait", "--"], env={**env, "KEEP": "me"})
    assert done.returncode == 0
    assert report["env"]["KEEP"] == "me"
    assert report["env"]["NOTIFY_SOCKET"].startswith("@fdlaunch-notify.")
    assert sorted(report["fds"]) == [0, 1, 2]


@pytest.mark.parametrize(
    "argv, extra_env, status, message",
    [
        (["--forward", "true"], {}, 100, "--forward needs a NOTIFY_SOCKET"),
        (["--fd=9", "true"], {}, 100, "--fd='9': not an open descriptor"),
        (["--fd=x", "true"], {}, 100, "--fd='x': not an open descriptor"),
        (["--timeout=soon", "true"], {}, 100, "--timeout='soon' is not a number"),
        (["--kill", "true"], {}, 100, "--kill goes with --timeout"),
        (["--interval=1", "true"], {}, 100, "--interval goes with --check"),
        (["--check=true", "--check-timeout=0", "true"], {}, 100, "--check-timeout='0' is not a number of seconds"),
        (["--check=true", "--tries=1e3", "true"], {}, 100, "--tries='1e3' is not a number of runs"),
        (["--bogus", "true"], {}, 100, "unknown option '--bogus'"),
        (["no-such-program-fdl"], {}, 127, "unable to exec no-such-program-fdl"),
        (["--fork", "no-such-program-fdl"], {}, 127, "unable to exec no-such-program-fdl"),
    ],
)
def test_notify_wait_errors(argv, extra_env, status, message, env):
    done = run(["fdlaunch-notify-wait", *argv], env={**env, **extra_env})
    assert done.returncode == status
    assert done.stderr.startswith("fdlaunch-notify-wait: fatal: ") and message in done.stderr
    assert done.stderr.count("\n") == 1
    assert_nothing_left(env)


@pytest.mark.parametrize("fd", ["0", "1", "2"])
@pytest.mark.parametrize("tool", ["fdlaunch-notify-wait", "fdlaunch-handoff", "fdlaunch-accept", "fdlaunch-foreground"])
def test_a_standard_fd_is_not_a_notification_fd(tool, fd, env):
    """--fd=1 was taken, and the watcher's /dev/null got the newline: stdin, stdout and stderr stay the program's."""
    listening = socket.socket()
    with listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        passed = {"LISTEN_FD_MAP": f"tcp={listening.fileno()}"}
        done = run(
            [tool, f"--fd={fd}", "--", "sh", "-c", "fdlaunch-notify READY=1; echo ran"],
            env={**env, **passed},
            pass_fds=[listening.fileno()],
        )
    standard = {"0": "input", "1": "output", "2": "error"}[fd]
    assert (done.returncode, done.stdout) == (100, "")
    assert (
        done.stderr
        == f"{tool}: fatal: --fd={fd!r}: fd {fd} is standard {standard}, which the program keeps; a notification fd is 3 or more\n"
    )
    assert_nothing_left(env)


def test_fdlaunch_notify_exit_statuses(env, tmp_path):
    unset = run(["fdlaunch-notify", "READY=1"], env=env)
    assert unset.returncode == 1 and "NOTIFY_SOCKET is not set" in unset.stderr
    failing = run(["fdlaunch-notify", "READY=1"], env={**env, "NOTIFY_SOCKET": str(tmp_path / "nobody-here")})
    assert failing.returncode == 111
    assert failing.stderr == f"fdlaunch-notify: fatal: unable to send to {tmp_path / 'nobody-here'}: No such file or directory\n"
    bad = run(["fdlaunch-notify", "READY"], env={**env, "NOTIFY_SOCKET": "@x"})
    assert bad.returncode == 100 and "'READY' is not FIELD=VALUE" in bad.stderr


def sent_to_an_abstract_socket(argv, env):
    """Run fdlaunch-notify argv with NOTIFY_SOCKET an abstract socket of ours: the datagram it got."""
    name = f"fdlaunch-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(TIMEOUT)
        done = run(["fdlaunch-notify", *argv], env={**env, "NOTIFY_SOCKET": "@" + name})
        assert done.returncode == 0, done.stderr
        return sock.recv(4096)


def test_fdlaunch_notify_to_an_abstract_socket_with_pid(env):
    assert sent_to_an_abstract_socket(["--no-block", "--pid=4242", "STATUS=hi"], env) == b"STATUS=hi\nMAINPID=4242"


def test_fdlaunch_notify_takes_a_double_dash_before_the_fields(env):
    # As systemd-notify (getopt): '--' ends the options, so a script may always write it.
    assert sent_to_an_abstract_socket(["--no-block", "--", "STATUS=--pid=3"], env) == b"STATUS=--pid=3"


def test_fdlaunch_notify_sends_bytes_that_are_not_utf8_as_given(env):
    """Non-UTF-8 in a value or in NOTIFY_SOCKET was 'utf-8 codec can't encode', exit 100; systemd-notify sends the bytes."""
    name = f"fdlaunch-test-{os.getpid()}-".encode() + b"\xff"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name)
        sock.settimeout(TIMEOUT)
        environ = {**{k.encode(): v.encode() for k, v in env.items()}, b"NOTIFY_SOCKET": b"@" + name}
        done = subprocess.run(
            [b"fdlaunch-notify", b"-v", b"--no-block", b"STATUS=caf\xe9"], env=environ, capture_output=True, timeout=TIMEOUT
        )
        assert done.returncode == 0, done.stderr
        assert sock.recv(4096) == b"STATUS=caf\xe9"
        assert done.stderr.endswith(b"info: sent 'STATUS=caf\\udce9' to '@" + name[:-1] + b"\\udcff'\n")


def test_python_api(tmp_path):
    assert fdlaunch.notify("READY=1", environ={}) is False
    path = str(tmp_path / "api.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        assert fdlaunch.notify("READY=1", "STATUS=up", environ={"NOTIFY_SOCKET": path}) is True
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"
    with pytest.raises(ValueError, match="not FIELD=VALUE"):
        fdlaunch.notify("READY", environ={"NOTIFY_SOCKET": path})
    with pytest.raises(OSError):
        fdlaunch.notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "gone")})


def test_one_sender_refuses_a_bad_line_whether_or_not_anyone_listens(env):
    """fdlaunch.notify() and fdlaunch-notify send through sdnotify.notify: both refuse 'READY' before looking for a listener."""
    with pytest.raises(ValueError, match="'READY' is not FIELD=VALUE"):
        fdlaunch.notify("READY", environ={})
    with pytest.raises(ValueError, match="the protocol allows 4096"):
        fdlaunch.notify("STATUS=" + "x" * 4096, environ={})
    done = run(["fdlaunch-notify", "READY"], env={k: v for k, v in env.items() if k != "NOTIFY_SOCKET"})
    assert (done.returncode, done.stderr) == (
        100,
        "fdlaunch-notify: fatal: 'READY' is not FIELD=VALUE (e.g. READY=1, STATUS=loading zones)\n",
    )


@contextlib.contextmanager
def s6_service(tmp_path, run_script, env):
    """A service directory with notification-fd 3 whose run script is run_script, under a real s6-supervise."""
    service = tmp_path / "service"
    service.mkdir()
    (service / "notification-fd").write_text("3\n")
    (service / "run").write_text("#!/bin/sh\n" + run_script)
    (service / "run").chmod(0o755)
    with s6_supervised(service, env={**env, "PYTHONPATH": os.pathsep.join(sys.path)}):
        yield service


def test_check_makes_a_silent_daemon_ready_for_s6_svwait(env, tmp_path):
    """The daemon never says READY=1; s6 sees it ready only once the check passes."""
    go = tmp_path / "go"
    script = f"exec fdlaunch-notify-wait --fd=3 --check='test -e {go}' --interval=0.05 -- sh -c 'echo $$ > {tmp_path}/pid; exec sleep 60'\n"
    with s6_service(tmp_path, script, env) as service:
        early = run(["s6-svwait", "-U", "-t", "1000", str(service)], env=env)
        assert early.returncode == 99, "ready before the check passed"
        go.touch()
        waited = run(["s6-svwait", "-U", "-t", "15000", str(service)], env=env)
        assert waited.returncode == 0, waited.stderr
        status = run(["s6-svstat", str(service)], env=env).stdout
        assert status.startswith(f"up (pid {(tmp_path / 'pid').read_text().strip()})") and "ready" in status


def test_check_hanging_run_is_killed_and_retried(env, tmp_path):
    hung = tmp_path / "hung-pid"
    check = f"if [ -e {hung} ]; then exit 0; fi; echo $$ > {hung}; exec sleep 60"
    done = run_fork(
        ["fdlaunch-notify-wait", "--fork", f"--check={check}", "--check-timeout=0.5", "--interval=0.1", "--", "sleep", "30"], env=env
    )
    try:
        assert done.returncode == 0, done.stderr
        assert f"the check {check!r} ran longer than 0.5 seconds; killed it" in done.stderr
        assert not Path(f"/proc/{hung.read_text().strip()}").exists(), "the hung run was left behind"
    finally:
        kill_quietly(int(done.stdout))
    assert_nothing_left(env)


def test_check_fork_returns_when_the_check_passes(env, tmp_path):
    marker = tmp_path / "up"
    script = f"sleep 1; touch {marker}; exec sleep 30"
    started = time.monotonic()
    done = run_fork(["fdlaunch-notify-wait", "--fork", f"--check=test -e {marker}", "--interval=0.05", "--", "sh", "-c", script], env=env)
    try:
        assert done.returncode == 0, done.stderr
        assert marker.exists(), "returned before the check could pass"
        assert time.monotonic() - started < 10
        assert Path(f"/proc/{int(done.stdout)}").exists()
    finally:
        kill_quietly(int(done.stdout))


def test_check_gives_up_after_tries(env):
    done = run(["fdlaunch-notify-wait", "--fork", "--check=false", "--interval=0.05", "--tries=3", "--", "sleep", "30"], env=env)
    assert done.returncode == 2 and done.stdout == ""
    assert "the check 'false' failed 3 times; gave up" in done.stderr
    assert "was not ready: its check gave up; stopped it: was killed by SIGTERM" in done.stderr
    assert_nothing_left(env)


@pytest.mark.parametrize("mode", [[], ["--fork"]])
def test_check_inherits_neither_sockets_nor_the_notify_socket(mode, env, tmp_path):
    report = tmp_path / "check-report"
    check = f"{sys.executable} {PROBE} {report}"
    argv = ["fdlaunch-listen", "-tcp:127.0.0.1:0", "--", "fdlaunch-notify-wait", *mode, f"--check={check}", "--", "sleep", "30"]
    program = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not report.exists() or not report.read_text().endswith("}"):
            assert time.monotonic() < deadline, "the check never ran"
            time.sleep(0.05)
        seen = read_probe(report)
        assert sorted(seen["fds"]) == [0, 1, 2]
        assert not {"NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "LISTEN_FD_MAP"} & set(seen["env"])
        daemon = int(program.stdout.readline()) if mode else program.pid
        assert seen["env"]["MAINPID"] == str(daemon)
        kill_quietly(daemon)
    finally:
        program.kill()
        program.wait()


def test_check_that_cannot_run_as_the_user_names_the_link_order(env, tmp_path):
    require_root()
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "check").write_text("#!/bin/sh\nexit 0\n")
    (private / "check").chmod(0o755)
    done = run(
        ["fdlaunch-setuidgid", "nobody", "--", "fdlaunch-notify-wait", "--fork", f"--check={private / 'check'}", "--", "sleep", "30"],
        env={**env, "TMPDIR": "/tmp"},
    )
    assert done.returncode == 2
    assert "cannot run: /bin/sh says found but not executable (status 126) as uid" in done.stderr
    assert "goes before fdlaunch-setuidgid" in done.stderr


def test_check_readiness_is_relayed_with_mainpid_and_ready_1_still_counts(env, tmp_path):
    upstream = Upstream(tmp_path)
    program = subprocess.Popen(
        ["fdlaunch-notify-wait", "--forward", "--check=true", "--", "sleep", "30"], env={**env, "NOTIFY_SOCKET": upstream.path}
    )
    try:
        assert upstream.receive() == f"READY=1\nMAINPID={program.pid}"
    finally:
        program.kill()
        program.wait()
    check_pid = tmp_path / "check-pid"
    script = f"while [ ! -s {check_pid} ]; do sleep 0.02; done; fdlaunch-notify READY=1; exec sleep 30"
    done = run_fork(["fdlaunch-notify-wait", "--fork", f"--check=echo $$ > {check_pid}; exec sleep 60", "--", "sh", "-c", script], env=env)
    try:
        assert done.returncode == 0, done.stderr
    finally:
        kill_quietly(int(done.stdout))
    assert not Path(f"/proc/{check_pid.read_text().strip()}").exists(), "the check still running was not stopped"


CONNECTS = [
    ("nc -z 127.0.0.1 {port}", True),
    ("exec 3<>/dev/tcp/127.0.0.1/{port}", True),
    ("curl -fsS -o /dev/null http://127.0.0.1:{port}/", False),
    ("nc -z 127.0.0.1 1{port}", False),
]


@pytest.mark.parametrize(("check", "warned"), CONNECTS)
def test_verbose_warns_once_of_a_check_that_names_the_port_of_a_passed_socket(check, warned, env):
    """A connect to a socket fdlaunch-listen bound succeeds at once, into its backlog, before the program serves."""
    port = free_port()
    text = "true # " + check.format(port=port)  # what is said about the check goes by its text; this one passes
    listen = ["fdlaunch-listen", f"-tcp:label=http:127.0.0.1:{port}", f"-tcp:label=again:127.0.0.1:{free_port()}", "--"]
    done = run_fork([*listen, "fdlaunch-notify-wait", "-v", "--fork", f"--check={text}", "--", "sleep", "30"], env=env)
    try:
        assert done.returncode == 0, done.stderr
        warning = (
            f"fdlaunch-notify-wait: warning: the check {text!r} names port {port} of the socket labelled 'http', bound and listening"
            " already: a connect succeeds there before the program serves; ask the program itself, with a request it must answer"
            f" (--check='curl -fsS -o /dev/null http://127.0.0.1:{port}/', say)\n"
        )
        assert done.stderr.count(warning) == (1 if warned else 0), done.stderr
    finally:
        kill_quietly(int(done.stdout))
    quiet = run_fork([*listen, "fdlaunch-notify-wait", "--fork", f"--check={text}", "--", "true"], env=env)
    assert "warning" not in quiet.stderr, "said only with -v"


def send_and_exit_at_once(notify_socket, data=b"READY=1"):
    """A process that is not the program nor below it sends data, then is gone before it is read."""
    code = (
        "import socket, sys; target = sys.argv[1].replace('@', '\\0', 1) if sys.argv[1][0] == '@' else sys.argv[1];"
        "socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(sys.argv[2].encode(), target)"
    )
    done = run([sys.executable, "-c", code, notify_socket, data.decode()])
    assert done.returncode == 0, done.stderr


def watcher_of(program_pid, marker):
    """The detached watcher of chain mode: the other process still running notify-wait's argv."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != program_pid:
            try:
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    return int(entry)
            except OSError:
                continue
    pytest.fail("no watcher found")


def readable(fd, seconds):
    return bool(select.select([fd], [], [], seconds)[0])


class Waiting:
    """notify-wait (fork mode, or chain mode with an s6 fd) over a program that says READY=1 once told to.

    The program writes its NOTIFY_SOCKET to a file, waits for the file go,
    then runs sender (a shell command). self.watcher is the pid that reads
    the notifications, self.program the program's; self.is_ready(seconds)
    says whether readiness came out.
    """

    def __init__(self, mode, tmp_path, env, sender="fdlaunch-notify READY=1", options=()):
        self.told, self.go, pidfile = tmp_path / "notify-socket", tmp_path / "go", tmp_path / "program-pid"
        script = (
            f'echo $$ > {pidfile}; echo "$NOTIFY_SOCKET" > {self.told}; '
            f"while [ ! -e {self.go} ]; do sleep 0.02; done; {sender}; exec sleep 30"
        )
        self.errors = tmp_path / "stderr"
        argv = ["fdlaunch-notify-wait", *options, "--", "sh", "-c", script]
        # fork mode prints the pid once ready; chain mode writes a newline on the s6 fd
        self.ready_fd, write_end = os.pipe()
        option = "--fork" if mode == "fork" else f"--fd={write_end}"
        with self.errors.open("w") as errors:
            self.process = subprocess.Popen([argv[0], option, *argv[1:]], env=env, pass_fds=(write_end,), stdout=write_end, stderr=errors)
        os.close(write_end)
        self.watcher = self.process.pid
        self.notify_socket = notify_socket_of(self.told)
        self.program = int(pidfile.read_text())
        if mode == "chain":
            self.watcher = watcher_of(self.process.pid, str(self.told))

    def is_ready(self, seconds):
        return readable(self.ready_fd, seconds)

    def close(self):
        for pid in (self.program, self.watcher):
            kill_quietly(pid)
        self.process.wait()
        os.close(self.ready_fd)


@pytest.fixture
def waiting(tmp_path, env):
    made = []

    def make(*args, **kwargs):
        made.append(Waiting(*args, tmp_path, env, **kwargs))
        return made[-1]

    yield make
    for each in made:
        each.close()


@pytest.mark.parametrize("mode", ["fork", "chain"])
def test_a_sender_gone_before_it_was_read_is_not_believed(mode, waiting):
    """The watcher is stopped, a stranger says READY=1 and exits, the watcher goes on: a sender gone is nobody."""
    waiting = waiting(mode)
    os.kill(waiting.watcher, signal.SIGSTOP)
    try:
        send_and_exit_at_once(waiting.notify_socket)
    finally:
        os.kill(waiting.watcher, signal.SIGCONT)
    wait_for_line(waiting.errors, "ignored a notification from pid ")
    assert not waiting.is_ready(0), "a sender that was gone counted as the program"
    waiting.go.touch()
    assert waiting.is_ready(TIMEOUT), "the program's own READY=1 no longer counts"


SHORT_LIVED = {
    "systemd-notify": "systemd-notify --ready",
    "fdlaunch-notify": "fdlaunch-notify READY=1",
    "python-systemd": "exec {python} -c 'import time; from systemd import daemon; daemon.notify(\"READY=1\"); time.sleep(60)'",
}


@pytest.mark.parametrize("mode", ["fork", "chain"])
@pytest.mark.parametrize("sender", SHORT_LIVED)
def test_short_lived_senders_are_believed_though_the_watcher_is_slow(sender, mode, waiting):
    """A sender that waits on its BARRIER (or is the program) is still there when its READY=1 is read."""
    if sender == "python-systemd":
        command = SHORT_LIVED[sender].format(python=shlex.quote(python_systemd()))
    else:
        require(sender)
        command = SHORT_LIVED[sender]
    waiting = waiting(mode, sender=command)
    os.kill(waiting.watcher, signal.SIGSTOP)
    try:
        waiting.go.touch()
        wait_queued(waiting.notify_socket)  # READY=1 is sent and waits unread
    finally:
        os.kill(waiting.watcher, signal.SIGCONT)
    assert waiting.is_ready(TIMEOUT), waiting.errors.read_text()
    assert "ignored" not in waiting.errors.read_text()


@pytest.mark.parametrize("mainpid", ["1", "99999999999999999999", "2147483648", "0", "-5", "12x", "١٢"])
def test_fork_mode_does_not_believe_a_mainpid_outside_the_program(mainpid, env, tmp_path):
    """MAINPID=1 or a number that is no pid: the program's pid is printed, with one warning."""
    pidfile = tmp_path / "pid"
    script = f"echo $$ > {pidfile}; fdlaunch-notify READY=1 MAINPID={mainpid}; exec sleep 30"
    done = run_fork(["fdlaunch-notify-wait", "--fork", "--timeout=20", "--", "sh", "-c", script], env=env)
    try:
        assert done.returncode == 0, done.stderr
        assert done.stdout == pidfile.read_text()
        assert done.stderr == (
            f"fdlaunch-notify-wait: warning: ignored MAINPID={mainpid!r}: not pid {done.stdout.strip()} or a live process below it\n"
        )
    finally:
        kill_quietly(int(pidfile.read_text()))


@pytest.mark.parametrize("mainpid", ["2147483648", "1", "unrelated"])
def test_forward_drops_a_bad_mainpid_and_goes_on_relaying(mainpid, env, tmp_path):
    """A MAINPID= not believed: the message still counts, the credentials and MAINPID= sent up name the program."""
    upstream = Upstream(tmp_path)
    unrelated = subprocess.Popen(["sleep", "30"])
    claimed = str(unrelated.pid) if mainpid == "unrelated" else mainpid
    script = f"fdlaunch-notify READY=1 MAINPID={claimed} STATUS=up; fdlaunch-notify STATUS=later; fdlaunch-notify STOPPING=1"
    errors = tmp_path / "stderr"
    program = subprocess.Popen(
        ["fdlaunch-notify-wait", "--forward", "--", "sh", "-c", script],
        env={**env, "NOTIFY_SOCKET": upstream.path},
        stderr=errors.open("w"),
    )
    try:
        assert upstream.receive() == f"READY=1\nSTATUS=up\nMAINPID={program.pid}"
        assert upstream.sender == program.pid
        assert upstream.receive() == "STATUS=later"
        assert upstream.receive() == "STOPPING=1"
        assert program.wait(TIMEOUT) == 0
    finally:
        for process in (program, unrelated):
            process.kill()
            process.wait()
    assert errors.read_text().count("\n") == 1 and f"ignored MAINPID={claimed!r}" in errors.read_text()


def test_forward_believes_a_mainpid_below_the_program(env, tmp_path):
    """The daemon's own child as MAINPID: relayed, claiming the program's credentials, then the child's.

    systemd's NotifyAccess=main believes only the main pid it knows: the
    program until it reads MAINPID=child, the child after.
    """
    upstream = Upstream(tmp_path)
    childfile = tmp_path / "child"
    script = f"sleep 30 & echo $! > {childfile}; fdlaunch-notify READY=1 MAINPID=$!; fdlaunch-notify STATUS=later; wait"
    program = subprocess.Popen(["fdlaunch-notify-wait", "--forward", "--", "sh", "-c", script], env={**env, "NOTIFY_SOCKET": upstream.path})
    try:
        message = upstream.receive()
        child = int(childfile.read_text())
        assert message == f"READY=1\nMAINPID={child}"
        assert upstream.sender == program.pid
        assert upstream.receive() == "STATUS=later"
        assert upstream.sender == child
    finally:
        program.kill()
        program.wait()
        if childfile.exists():
            kill_quietly(int(childfile.read_text()))


def test_command_sees_the_callers_environment(env):
    """--command gets the caller's NOTIFY_SOCKET (and the rest), plus MAINPID; not the private socket."""
    command = 'echo "NOTIFY_SOCKET=${NOTIFY_SOCKET-unset} KEEP=$KEEP MAINPID=$MAINPID"'
    for caller in ({}, {"NOTIFY_SOCKET": "@the-callers-own"}):
        program = subprocess.Popen(
            ["fdlaunch-notify-wait", f"--command={command}", "--", "sh", "-c", "fdlaunch-notify READY=1; sleep 30"],
            env={**env, "KEEP": "me", **caller},
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            expected = caller.get("NOTIFY_SOCKET", "unset")
            assert program.stderr.readline() == f"NOTIFY_SOCKET={expected} KEEP=me MAINPID={program.pid}\n"
        finally:
            program.kill()
            program.wait()


def abstract_sockets():
    with open("/proc/net/unix", "rb") as table:  # another run's names need not be UTF-8
        names = (line.split()[-1].decode(errors="surrogateescape") for line in table if line.split())
        return {name for name in names if name.startswith("@")}


def wait_for_child(parent, name, seconds=TIMEOUT):
    """Until parent has a child whose command name is name."""
    deadline = time.monotonic() + seconds
    while name not in [proc.name_of(pid) for pid in proc.children_of(parent)]:
        assert time.monotonic() < deadline, f"pid {parent} never started {name}"
        time.sleep(0.02)


def wait_gone(pid, seconds=5):
    deadline = time.monotonic() + seconds
    while Path(f"/proc/{pid}").exists() and "Z (zombie)" not in Path(f"/proc/{pid}/status").read_text():
        assert time.monotonic() < deadline, f"pid {pid} is still there"
        time.sleep(0.02)


@pytest.mark.parametrize("mode", ["fork", "chain"])
@pytest.mark.parametrize("killed", ["program", "watcher"])
def test_nothing_is_left_when_killed(killed, mode, waiting, env, tmp_path):
    """SIGKILL of the program or of the watcher leaves no file and no socket behind."""
    waiting = waiting(mode)
    assert waiting.notify_socket in abstract_sockets() or Path(waiting.notify_socket).exists()
    victim = waiting.program if killed == "program" else waiting.watcher
    os.kill(victim, signal.SIGKILL)
    if victim == waiting.process.pid:
        waiting.process.wait(TIMEOUT)
    wait_gone(waiting.watcher)
    if mode == "fork":
        waiting.process.wait(TIMEOUT)
    assert_nothing_left(env)
    assert waiting.notify_socket not in abstract_sockets()


def test_lineage_is_known_only_while_the_process_is_there():
    """A pidfd on a process reaped since is never taken for whoever has its pid now."""
    ours = os.pidfd_open(os.getpid())
    try:
        family = proc.lineage(os.getpid(), ours)
        assert family[0] == os.getpid() and family[1] == os.getppid()
    finally:
        os.close(ours)
    child = subprocess.Popen(["sleep", "30"])
    pidfd = os.pidfd_open(child.pid)
    try:
        assert proc.lineage(child.pid, pidfd)[:2] == (child.pid, os.getpid())
        child.kill()
        child.wait()
        assert proc.lineage(child.pid, pidfd) == ()
    finally:
        os.close(pidfd)
    assert proc.lineage(os.getpid(), -3) == ()  # the kernel's errno instead of a pidfd: gone already


def test_fork_mode_says_once_that_a_program_cannot_be_executed(tmp_path):
    """One spawn path: the parent says it, 126 or 127 as for an exec, never a second line from the child."""
    script = tmp_path / "not-a-binary"
    script.write_text("not a program\n")
    script.chmod(0o755)
    done = run(["fdlaunch-notify-wait", "--fork", "--", str(script)])
    assert (done.returncode, done.stderr) == (126, f"fdlaunch-notify-wait: fatal: unable to exec {script}: Exec format error\n")
    done = run(["fdlaunch-notify-wait", "--fork", "--", str(tmp_path / "missing")])
    assert (done.returncode, done.stderr.count("\n")) == (127, 1)


def test_closed_stdin_at_start_takes_nothing_from_the_watcher():
    """fd 0 closed by the caller: our notify socket must not land there and be lost to the watcher's /dev/null."""
    done = run(["sh", "-c", "exec 5>&1 0<&-; exec fdlaunch-notify-wait --fd=5 --timeout=5 -- fdlaunch-notify READY=1"])
    assert (done.returncode, done.stdout, done.stderr) == (0, "\n", "")


def test_fork_mode_with_stdout_and_stderr_closed(tmp_path):
    pidfile = tmp_path / "pid"
    script = f"echo $$ > {pidfile}; fdlaunch-notify READY=1; exec sleep 30"
    done = run(["sh", "-c", 'exec fdlaunch-notify-wait --fork --timeout=5 -- sh -c "$0" >&- 2>&-', script])
    try:
        assert done.returncode == 0
        assert Path(f"/proc/{pidfile.read_text().strip()}").exists()
    finally:
        kill_quietly(int(pidfile.read_text()))


def test_fork_mode_that_cannot_tell_the_pid_stops_the_daemon(tmp_path):
    pidfile = tmp_path / "pid"
    script = f"echo $$ > {pidfile}; fdlaunch-notify READY=1; exec sleep 30"
    done = run(["sh", "-c", 'exec fdlaunch-notify-wait --fork --timeout=5 -- sh -c "$0" >/dev/full', script])
    pid = int(pidfile.read_text())
    try:
        # fdlaunch-notify, still waiting for its BARRIER to be answered when we exit, may say it was not.
        ours = [line for line in done.stderr.splitlines() if line.startswith("fdlaunch-notify-wait:")]
        assert done.returncode == 111 and ours == [
            f"fdlaunch-notify-wait: fatal: unable to write pid {pid} on stdout (so stopped it): No space left on device"
        ], done.stderr
        assert not Path(f"/proc/{pid}").exists(), "the daemon nobody knows of was left running"
    finally:
        kill_quietly(pid)


def test_fork_mode_ready_by_check_with_the_upstream_gone_is_still_ready(env, tmp_path):
    env = {**env, "NOTIFY_SOCKET": str(tmp_path / "gone.sock")}
    done = run_fork(["fdlaunch-notify-wait", "--fork", "--forward", "--check=true", "--", "sleep", "30"], env=env)
    try:
        assert done.returncode == 0, done.stderr
        assert done.stderr == f"fdlaunch-notify-wait: warning: unable to notify {env['NOTIFY_SOCKET']}: No such file or directory\n"
        assert Path(f"/proc/{int(done.stdout)}").exists()
    finally:
        if done.stdout.strip().isdigit():
            kill_quietly(int(done.stdout))
    assert_nothing_left(env)


@pytest.mark.parametrize("readiness", ["READY=1", "--check"])
def test_the_command_runs_though_the_upstream_is_gone(readiness, env, tmp_path):
    marker = tmp_path / "ran"
    env = {**env, "NOTIFY_SOCKET": str(tmp_path / "gone.sock")}
    check = ["--check=true"] if readiness == "--check" else []
    script = "fdlaunch-notify READY=1; exec sleep 2" if readiness == "READY=1" else "exec sleep 2"
    argv = ["fdlaunch-notify-wait", "--forward", f"--command=touch {marker}", *check, "--", "sh", "-c", script]
    done = run_fork(argv, env=env)
    assert done.returncode == 0
    deadline = time.monotonic() + TIMEOUT
    while not marker.exists():
        assert time.monotonic() < deadline, "--command never ran"
        time.sleep(0.02)
    # Said by the watcher after every relay, --command included: later than the program's exit, perhaps.
    warning = f"(watcher): warning: unable to notify {env['NOTIFY_SOCKET']}: No such file or directory"
    wait_for_line(Path(env["TMPDIR"]).parent / "stderr", warning)


def test_fork_mode_passes_a_sigterm_that_comes_while_the_program_is_being_started(tmp_path):
    """SIGTERM sent the moment the child exists, before its exec: passed on, never our death with PROG left running."""
    for _ in range(5):
        notify_wait = subprocess.Popen(
            ["fdlaunch-notify-wait", "--fork", "--", "sleep", "30"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        children, deadline = [], time.monotonic() + TIMEOUT
        while not children and time.monotonic() < deadline and notify_wait.poll() is None:
            children = Path(f"/proc/{notify_wait.pid}/task/{notify_wait.pid}/children").read_text().split()
        notify_wait.send_signal(signal.SIGTERM)
        try:
            assert notify_wait.wait(TIMEOUT) == 1, "died of the SIGTERM instead of passing it on"
            assert children and not Path(f"/proc/{children[0]}").exists(), "PROG was left running"
        finally:
            for pid in children:
                kill_quietly(int(pid))


def test_a_notification_fd_nobody_reads_stops_no_other_relay(tmp_path):
    marker, err = tmp_path / "ran", tmp_path / "stderr"
    argv = ["fdlaunch-notify-wait", "--fd=3", "--check=true", f"--command=touch {marker}", "--", "sleep", "1"]
    program = unread_fd3_started(argv, err)
    try:
        wait_for_line(err, "(watcher): warning: unable to write the readiness newline on fd 3: Broken pipe")
        deadline = time.monotonic() + TIMEOUT
        while not marker.exists():
            assert time.monotonic() < deadline, "--command never ran"
            time.sleep(0.02)
    finally:
        assert program.wait(TIMEOUT) == 0
