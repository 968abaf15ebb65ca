"""fdlaunch-foreground: a daemon that forks into the background, kept under a real supervisor."""

import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import HERE, TIMEOUT, free_port, http_get, require, require_python_for_nobody, require_root, run, unread_fd3_started
from test_notify import Upstream, s6_service

DAEMON = [sys.executable, str(HERE / "selfdaemon.py")]
NO_DAEMON = 1  # fdlaunch-foreground(1), EXIT STATUS: the launching process exited 0 but no daemon was found


@pytest.fixture
def env():
    return {"PATH": os.environ["PATH"]}


def wait_for(condition, what, seconds=TIMEOUT):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def daemon_pid(log):
    """The pid the test daemon logged once up."""
    wait_for(lambda: log.exists() and "up " in log.read_text(), "the daemon to start")
    return int(log.read_text().split("up ", 1)[1].split()[0])


def pidfds_held_by(pid):
    """The pids of the processes pid holds a pidfd on (proc(5), fdinfo's Pid: line)."""
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        held.update(int(line.split()[1]) for line in info.splitlines() if line.startswith("Pid:"))
    return held


def kill_quietly(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextlib.contextmanager
def keeper_running(argv, env, log=None, **popen):
    """argv (fdlaunch-foreground, or a chain that ends in it) running; at the end it is
    killed and reaped, and every daemon that log says came up is killed too."""
    keeper = subprocess.Popen(argv, env=env, **popen)
    try:
        yield keeper
    finally:
        keeper.kill()
        keeper.wait()
        for pid in re.findall(r"^up (\d+)$", log.read_text() if log is not None and log.exists() else "", re.M):
            kill_quietly(int(pid))


def test_under_s6_supervise_signals_and_status(env, tmp_path):
    log, pidfile = tmp_path / "log", tmp_path / "daemon.pid"
    script = f"exec fdlaunch-foreground --fd=3 --pidfile={pidfile} -- {' '.join(DAEMON)} {log} --pidfile={pidfile} --status=7\n"
    try:
        with s6_service(tmp_path, script, env) as service:
            waited = run(["s6-svwait", "-U", "-t", "15000", str(service)], env=env)
            assert waited.returncode == 0, waited.stderr
            daemon = daemon_pid(log)
            status = run(["s6-svstat", "-o", "up,ready,pid", str(service)], env=env).stdout.split()
            assert status[:2] == ["true", "true"]
            keeper = int(status[2])
            assert keeper != daemon and Path(f"/proc/{daemon}/stat").read_text().split(") ")[1].split()[1] == str(keeper)
            assert run(["s6-svc", "-h", str(service)], env=env).returncode == 0
            wait_for(lambda: "SIGHUP" in log.read_text(), "SIGHUP to reach the daemon")
            assert alive(daemon)
            assert run(["s6-svc", "-t", str(service)], env=env).returncode == 0
            wait_for(lambda: not alive(daemon), "the daemon to stop")
            assert "SIGTERM" in log.read_text()
            wait_for(lambda: "exitcode 7" in run(["s6-svdt", str(service)], env=env).stdout, "s6 to record exit code 7")
    finally:
        started = log.read_text().split() if log.exists() else []
        wait_for(lambda: not any(alive(int(p)) for p in started if p.isdigit()), "every daemon to stop", 10)


def test_forward_tells_the_daemon_pid_as_mainpid(env, tmp_path):
    upstream = Upstream(tmp_path)
    log, pidfile = tmp_path / "log", tmp_path / "daemon.pid"
    with keeper_running(
        ["fdlaunch-foreground", "--forward", f"--pidfile={pidfile}", "--", *DAEMON, str(log), f"--pidfile={pidfile}"],
        {**env, "NOTIFY_SOCKET": upstream.path},
        log,
    ) as keeper:
        message = upstream.receive()
        daemon = int(pidfile.read_text())
        assert message == f"READY=1\nMAINPID={daemon}"
        assert daemon != keeper.pid and alive(daemon)
        keeper.send_signal(signal.SIGTERM)
        assert keeper.wait(TIMEOUT) == 0
        assert not alive(daemon)


def test_a_pid_file_naming_a_stranger_is_refused_and_it_is_never_signalled(env, tmp_path):
    log, pidfile = tmp_path / "log", tmp_path / "daemon.pid"
    received = []
    numbers = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGCONT)
    previous = {n: signal.signal(n, lambda number, frame: received.append(number)) for n in numbers}
    argv = ["fdlaunch-foreground", "--timeout=1.5", f"--pidfile={pidfile}", "--", *DAEMON, str(log), f"--pidfile={pidfile}"]
    try:
        with keeper_running([*argv, f"--pidfile-pid={os.getpid()}"], env, log, stderr=subprocess.PIPE, text=True) as keeper:
            daemon = daemon_pid(log)
            children = Path(f"/proc/{keeper.pid}/task/{keeper.pid}/children")
            # the daemon and the guard, and no longer the launching process
            wait_for(lambda: len(children.read_text().split()) == 2 and str(daemon) in children.read_text().split(), "the launcher to exit")
            for number in (signal.SIGHUP, signal.SIGUSR1, signal.SIGCONT):
                keeper.send_signal(number)  # held for a daemon that is never found
            assert keeper.wait(TIMEOUT) == 1
            error = keeper.stderr.read()
            assert error == (
                f"fdlaunch-foreground: fatal: the PID file {str(pidfile)!r} names pid {os.getpid()}, "
                "which is not a process this daemon started: refused, and never signalled\n"
            )
            assert not alive(daemon), "the real daemon was left running"
            assert received == [], "a signal it held reached the pid the PID file named"  # delivered as it was sent, before its exit
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def test_main_process_exits_leaving_a_worker(env, tmp_path):
    log, worker = tmp_path / "log", tmp_path / "worker"
    done = run(
        ["fdlaunch-foreground", "--grace=2", "--", *DAEMON, str(log), f"--worker={worker}", "--exit-after=0.5", "--status=4"], env=env
    )
    assert done.returncode == 4, done.stderr
    assert not alive(int(worker.read_text())), "the worker was left running"


def test_sigkill_to_the_keeper_stops_the_daemon(env, tmp_path):
    log = tmp_path / "log"
    upstream = Upstream(tmp_path)
    with keeper_running(
        ["fdlaunch-foreground", "--forward", "--grace=2", "--", *DAEMON, str(log)],
        {**env, "NOTIFY_SOCKET": upstream.path},
        log,
        stderr=subprocess.PIPE,
        text=True,
    ) as keeper:
        daemon = daemon_pid(log)
        assert upstream.receive() == f"READY=1\nMAINPID={daemon}"  # the guard is in place once it is up
        keeper.kill()
        keeper.wait()
        wait_for(lambda: not alive(daemon), "the daemon to stop after its keeper's SIGKILL", 10)
        said = f"fdlaunch-foreground (guard): warning: its parent (pid {keeper.pid}) died; stopping the daemon (pid {daemon})\n"
        assert keeper.stderr.read() == said  # the guard, a process of its own, names itself


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_to_the_whole_process_group(number, env, tmp_path):
    """As systemd's KillMode=control-group, ^C or timeout(1) send it: the guard is not killed by it."""
    log = tmp_path / "log"
    upstream = Upstream(tmp_path)
    with keeper_running(
        ["fdlaunch-foreground", "--forward", "--grace=10", "--", *DAEMON, str(log)],
        {**env, "NOTIFY_SOCKET": upstream.path},
        log,
        stderr=subprocess.PIPE,
        text=True,
        process_group=0,
    ) as keeper:
        daemon = daemon_pid(log)
        assert upstream.receive() == f"READY=1\nMAINPID={daemon}"
        os.killpg(keeper.pid, number)
        # the daemon's own status: it exits 0 on SIGTERM, Python's KeyboardInterrupt is 128 + SIGINT
        assert keeper.wait(TIMEOUT) == (0 if number == signal.SIGTERM else 128 + number)
        assert "fdlaunch-foreground" not in keeper.stderr.read()
        wait_for(lambda: not alive(daemon), "the daemon to stop")


def test_an_error_of_ours_after_the_launch_leaves_nothing_running(env, tmp_path):
    """The relay upward fails once the daemon is up: one line, and the daemon is stopped, not orphaned."""
    log = tmp_path / "log"
    done = run(
        ["fdlaunch-foreground", "--forward", "--grace=2", "--", *DAEMON, str(log)], env={**env, "NOTIFY_SOCKET": str(tmp_path / "none")}
    )
    assert done.returncode == 111
    assert done.stderr.count("\n") == 1 and "fdlaunch-foreground: fatal:" in done.stderr
    assert not alive(daemon_pid(log)), "the daemon was left running"


def test_after_fdlaunch_listen_the_daemon_serves_the_socket(env, tmp_path):
    log, port = tmp_path / "log", free_port()
    upstream = Upstream(tmp_path)
    with keeper_running(
        ["fdlaunch-listen", f"-tcp:127.0.0.1:{port}", "--", "fdlaunch-foreground", "--forward", "--", *DAEMON, str(log)],
        {**env, "NOTIFY_SOCKET": upstream.path},
        log,
    ) as keeper:
        daemon = daemon_pid(log)
        assert upstream.receive() == f"READY=1\nMAINPID={daemon}"
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as connection:
            assert connection.makefile().readline() == f"served by {daemon}\n"
        keeper.send_signal(signal.SIGTERM)
        assert keeper.wait(TIMEOUT) == 0


def dns_query(port, name):
    """The first A record dnsmasq answers for name, as text."""
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.split("."))
    query = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(query, ("127.0.0.1", port))
        answer = sock.recv(512)
    assert struct.unpack(">H", answer[6:8])[0] == 1, "no answer record"
    return socket.inet_ntoa(answer[-4:])


def free_udp_and_tcp_port():
    """A port free for both, as dnsmasq listens on both."""
    for _ in range(50):
        port = free_port(socket.SOCK_DGRAM)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    pytest.fail("no port free for both UDP and TCP")


@pytest.mark.parametrize("pidfile", [True, False])
def test_dnsmasq_in_its_default_forking_mode(pidfile, env, tmp_path):
    dnsmasq = require("dnsmasq")
    port, path = free_udp_and_tcp_port(), tmp_path / "dnsmasq.pid"
    argv = [dnsmasq, f"--port={port}", "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts"]
    argv += [f"--pid-file={path}", "--conf-file=/dev/null", "--address=/fdlaunch.test/127.0.0.9"]
    upstream = Upstream(tmp_path)
    options = ["--forward", *([f"--pidfile={path}"] if pidfile else [])]
    with keeper_running(["fdlaunch-foreground", *options, "--", *argv], {**env, "NOTIFY_SOCKET": upstream.path}) as keeper:
        message = upstream.receive()
        daemon = int(path.read_text())
        assert message == f"READY=1\nMAINPID={daemon}"
        assert dns_query(port, "host.fdlaunch.test") == "127.0.0.9"
        keeper.send_signal(signal.SIGTERM)
        assert keeper.wait(TIMEOUT) == 0
        assert not alive(daemon)


# nginx started as nobody, forking into the background as it does by default, answering with its worker's pid.
NGINX_CONF = """pid {dir}/nginx.pid;
worker_processes 1;
error_log {dir}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy; fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
    server {{ listen 127.0.0.1:{port}; location / {{ return 200 "hello from pid $pid\\n"; }} }}
}}
"""


def parent_of(pid):
    return int(re.search(r"^PPid:\s+(\d+)$", Path(f"/proc/{pid}/status").read_text(), re.M)[1])


def test_nginx_binary_upgrade_under_s6_keeps_the_service_up(env, tmp_path, public):
    """s6-svc -2 (USR2: the old master starts a new one), then -q (the old one quits): the new master is the daemon."""
    require_python_for_nobody()
    nginx = require("nginx")  # by absolute path: nginx re-executes its argv[0] on USR2
    port, pidfile = free_port(), public / "nginx.pid"
    (public / "nginx.conf").write_text(NGINX_CONF.format(dir=public, port=port))
    upstream = Upstream(tmp_path)
    keep = f"fdlaunch-foreground -v --fd=3 --forward --pidfile={pidfile}"
    script = f"exec {keep} -- fdlaunch-setuidgid nobody -- {nginx} -p {public} -c {public}/nginx.conf 2>{tmp_path}/stderr\n"
    with s6_service(tmp_path, script, {**env, "NOTIFY_SOCKET": upstream.path}) as service:
        assert run(["s6-svwait", "-U", "-t", "15000", str(service)], env=env).returncode == 0
        old = int(pidfile.read_text())
        assert upstream.receive() == f"READY=1\nMAINPID={old}"
        keeper = run(["s6-svstat", "-o", "pid", str(service)], env=env).stdout.strip()
        assert parent_of(int(http_get(port).split()[-1])) == old
        assert run(["s6-svc", "-2", str(service)], env=env).returncode == 0

        def new_master_written():  # empty: the new master made the file and has not written it yet
            return pidfile.exists() and pidfile.read_text().strip() not in ("", str(old))

        wait_for(lambda: (public / "nginx.pid.oldbin").exists() and new_master_written(), "a new master")
        new = int(pidfile.read_text())
        assert run(["s6-svc", "-q", str(service)], env=env).returncode == 0
        assert upstream.receive() == f"MAINPID={new}", "the new master told upward"
        assert upstream.sender == old, "as the old one, the main pid the supervisor knew"
        wait_for(lambda: not alive(old), "the old master to quit")
        assert parent_of(int(http_get(port).split()[-1])) == new, "the new master's worker answers"
        status = run(["s6-svstat", "-o", "up,ready,pid", str(service)], env=env).stdout.split()
        assert status == ["true", "true", keeper], "the service was neither restarted nor stopped"
        said = (tmp_path / "stderr").read_text()
        assert f"fdlaunch-foreground: info: the daemon (pid {old}) exited; pid {new}, named by {pidfile}, is the daemon now" in said
        assert run(["s6-svc", "-d", str(service)], env=env).returncode == 0
        wait_for(lambda: not alive(new), "the new master to stop with the service")


@pytest.mark.parametrize(
    "argv, status, message",
    [
        (["--", *DAEMON, "LOG", "--launch-status=3"], 3, "exited with status 3; no daemon started"),
        (["--", "true"], 1, "true exited 0 and left no process running: no daemon to keep"),
        (["--timeout=0.5", "--", "sleep", "30"], 2, "sleep (pid "),
        (["--pidfile=PIDFILE", "--timeout=0.5", "--", *DAEMON, "LOG"], 1, "'PIDFILE' was not written"),
        (["--forward", "true"], 100, "--forward needs a NOTIFY_SOCKET"),
        (["--timeout=0", "true"], 100, "--timeout='0' is not a number of seconds above 0"),
        (["--fd=x", "true"], 100, "--fd='x': not an open descriptor"),
        (["no-such-program-fdl"], 127, "unable to exec no-such-program-fdl"),
    ],
)
def test_failures(argv, status, message, env, tmp_path):
    log, pidfile = tmp_path / "log", tmp_path / "pid"
    argv = [str(log) if a == "LOG" else a.replace("PIDFILE", str(pidfile)) for a in argv]
    message = message.replace("PIDFILE", str(pidfile))
    done = run(["fdlaunch-foreground", *argv], env=env)
    assert done.returncode == status
    assert done.stderr.startswith("fdlaunch-foreground: fatal: ") and message in done.stderr
    assert done.stderr.count("\n") == 1
    if log.exists():
        assert not alive(daemon_pid(log)), "the daemon was left running"


def test_sigkill_to_the_keeper_while_it_looks_for_the_daemon(env, tmp_path):
    """The launching process has exited; the PID file does not name the daemon yet: the guard already holds it."""
    log, pidfile = tmp_path / "log", tmp_path / "daemon.pid"
    with keeper_running(
        ["fdlaunch-foreground", "--timeout=30", f"--pidfile={pidfile}", "--", *DAEMON, str(log), f"--pidfile={pidfile}", "--pidfile-pid=1"],
        env,
        log,
        stderr=subprocess.PIPE,
        text=True,
    ) as keeper:
        daemon = daemon_pid(log)
        children = Path(f"/proc/{keeper.pid}/task/{keeper.pid}/children")
        wait_for(lambda: len(children.read_text().split()) == 2 and str(daemon) in children.read_text().split(), "the launcher to exit")
        guard = next(int(pid) for pid in children.read_text().split() if int(pid) != daemon)
        wait_for(lambda: daemon in pidfds_held_by(guard), "the guard to hold the daemon")
        keeper.kill()
        keeper.wait()
        wait_for(lambda: not alive(daemon), "the daemon to stop after its keeper's SIGKILL", 10)
        assert "died; stopping the daemon" in keeper.stderr.read()


def test_what_the_launching_process_is_handed(env, tmp_path):
    """fdlaunch(7), CHAIN LOADING: the caller's environment and descriptors, signal state kept, SIGPIPE at its default."""
    caller = {**env, "TMPDIR": str(tmp_path), "ODD": "a=b c"}
    report = (
        'find /proc/$$/fd -mindepth 1 -maxdepth 1 -fprintf "$TMPDIR/fds" "%f\\n";'
        ' cp /proc/$$/environ "$TMPDIR/e"; mv "$TMPDIR/e" "$TMPDIR/environ"; sleep 30 &'  # whole once it has its name
    )
    with keeper_running(["fdlaunch-foreground", "--timeout=20", "--", "/bin/sh", "-c", report], caller) as keeper:
        wait_for(
            lambda: (
                (tmp_path / "environ").exists() and len(Path(f"/proc/{keeper.pid}/task/{keeper.pid}/children").read_text().split()) == 2
            ),
            "a daemon",
        )
        environ = dict(entry.split("=", 1) for entry in (tmp_path / "environ").read_text().split("\0") if entry)
        assert environ == caller
        assert sorted(int(fd) for fd in (tmp_path / "fds").read_text().split()) == [0, 1, 2]
        keeper.send_signal(signal.SIGTERM)
        assert keeper.wait(TIMEOUT) == 128 + signal.SIGTERM  # sleep was killed by it, as a shell reports

    def caller_state():
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})

    done = run(["fdlaunch-foreground", "--", "cp", "/proc/self/status", str(tmp_path / "status")], env=env, preexec_fn=caller_state)
    assert done.returncode == 1  # cp leaves no daemon
    status = dict(line.split(":\t", 1) for line in (tmp_path / "status").read_text().splitlines() if ":\t" in line)
    ignored, blocked = int(status["SigIgn"], 16), int(status["SigBlk"], 16)
    assert ignored & (1 << (signal.SIGHUP - 1))
    assert not ignored & ((1 << (signal.SIGPIPE - 1)) | (1 << (signal.SIGXFSZ - 1)))
    assert blocked == 1 << (signal.SIGUSR2 - 1)


def test_sigkill_to_the_whole_process_group_still_stops_the_daemon(env, tmp_path):
    """kill -KILL -PGID (timeout -s KILL, a supervisor's last resort): the guard has a group of its own."""
    log = tmp_path / "log"
    upstream = Upstream(tmp_path)
    with keeper_running(
        ["fdlaunch-foreground", "--forward", "--grace=2", "--", *DAEMON, str(log)],
        {**env, "NOTIFY_SOCKET": upstream.path},
        log,
        stderr=subprocess.DEVNULL,
        process_group=0,
    ) as keeper:
        daemon = daemon_pid(log)
        assert upstream.receive() == f"READY=1\nMAINPID={daemon}"
        os.killpg(keeper.pid, signal.SIGKILL)
        keeper.wait()
        wait_for(lambda: not alive(daemon), "the daemon to stop after its keeper's group was SIGKILLed", 10)


def test_a_fifo_as_pid_file_is_refused_in_time(env, tmp_path):
    """A FIFO at the PID file's path never holds fdlaunch-foreground past --timeout."""
    fifo, log = tmp_path / "daemon.pid", tmp_path / "log"
    os.mkfifo(fifo)
    started = time.monotonic()
    done = run(["fdlaunch-foreground", "--timeout=2", "--grace=1", f"--pidfile={fifo}", "--", *DAEMON, str(log)], env=env)
    assert time.monotonic() - started < 10
    assert done.returncode != 0 and "not a regular file" in done.stderr, done.stderr
    assert not alive(daemon_pid(log)), "the daemon was left running"


def test_a_stop_waits_no_longer_than_what_is_left_takes(env, tmp_path):
    """--grace is a bound, not a pause: with nothing left but our own guard, the stop is at once."""
    log = tmp_path / "log"
    with keeper_running(
        ["fdlaunch-foreground", "-v", "--grace=10", "--", *DAEMON, str(log)], env, log, stderr=(tmp_path / "stderr").open("w")
    ) as keeper:
        daemon = daemon_pid(log)
        wait_for(lambda: "the daemon is pid" in (tmp_path / "stderr").read_text(), "the daemon to be kept")
        started = time.monotonic()
        keeper.terminate()
        assert keeper.wait(TIMEOUT) == 0
        assert time.monotonic() - started < 5, "waited out --grace with nothing left to stop"
        lines = (tmp_path / "stderr").read_text().splitlines()
        assert lines[0] == f"fdlaunch-foreground: info: the daemon is pid {daemon}; it is ready: nobody to tell (no --fd or --forward)"
        assert lines[-1] == f"fdlaunch-foreground: info: the daemon (pid {daemon}) exited with status 0"


def test_a_notification_fd_nobody_reads_is_one_line_and_stops_the_daemon(tmp_path):
    err, log = tmp_path / "stderr", tmp_path / "log"
    keeper = unread_fd3_started(["fdlaunch-foreground", "--fd=3", "--grace=2", "--", *DAEMON, str(log)], err)
    assert keeper.wait(TIMEOUT) == 111
    assert err.read_text() == "fdlaunch-foreground: fatal: unable to write the readiness newline on fd 3: Broken pipe\n"
    assert not alive(daemon_pid(log)), "the daemon was left running"


# A daemon that, instead of its PID file, leaves at that path whatever argv[2] says:
# "symlink:TARGET", "fifo", or "owner:UID:PID-TEXT" (a regular file of that owner and
# content, put in place whole). It tells the launching process once it has, and stays.
PLANTING_DAEMON = """
import os, signal, sys
pidfile, plant = sys.argv[1], sys.argv[2]
tell, told = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() != 0:
        os._exit(0)
    kind, _, rest = plant.partition(":")
    if kind == "symlink":
        os.symlink(rest, pidfile)
    elif kind == "fifo":
        os.mkfifo(pidfile)
    else:
        owner, _, text = rest.partition(":")
        with open(pidfile + ".new", "w") as new:
            new.write(text.replace("PID", str(os.getpid())))
            os.fchown(new.fileno(), int(owner), -1)
        os.rename(pidfile + ".new", pidfile)
    os.write(told, b"x")
    signal.pause()
os.read(tell, 1)
"""


def planted(plant, tmp_path, run_as=None, pidfile=None):
    """fdlaunch-foreground --pidfile on a daemon that plants plant at that path; the finished run."""
    pidfile = pidfile or tmp_path / "daemon.pid"
    daemon = [sys.executable, "-c", PLANTING_DAEMON, str(pidfile), plant]
    argv = ["fdlaunch-foreground", "--timeout=1", "--grace=1", f"--pidfile={pidfile}", "--", *(run_as(daemon) if run_as else daemon)]
    return run(argv, env={"PATH": os.environ["PATH"]})


def test_a_pid_file_made_a_symlink_is_never_followed(attacker, tmp_path):
    """The daemon's user points its PID file at a root-only file: it is not read, and nothing of it is said."""
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$not-for-the-daemon$:19000:0:99999:7:::\n")
    secret.chmod(0o600)
    pidfile = attacker.directory("run") / "daemon.pid"
    done = planted(f"symlink:{secret}", tmp_path, attacker.argv, pidfile)
    assert done.returncode == NO_DAEMON
    assert done.stderr == f"fdlaunch-foreground: fatal: the PID file {str(pidfile)!r} is a symbolic link: refused, never followed\n"


@pytest.mark.parametrize(
    "plant, why",
    [
        ("fifo", "is a FIFO, not a regular file"),
        ("owner:0:root:$6$x$:19000::::::\n", "does not hold a pid (one decimal number)"),
        ("owner:0:", "is empty"),
        ("owner:4343:PID\n", "is owned by uid 4343, neither root nor a user pid "),
    ],
)
def test_a_pid_file_that_is_not_the_daemons_is_refused_without_quoting_it(plant, why, tmp_path):
    done = planted(plant, tmp_path)
    pidfile = tmp_path / "daemon.pid"
    assert done.returncode == NO_DAEMON
    assert done.stderr.startswith(f"fdlaunch-foreground: fatal: the PID file {str(pidfile)!r} {why}") and done.stderr.count("\n") == 1
    assert "$6$" not in done.stderr


def test_a_pid_file_of_the_daemons_own_user_is_taken(attacker, tmp_path):
    pidfile = attacker.directory("own") / "daemon.pid"
    daemon = [sys.executable, "-c", PLANTING_DAEMON, str(pidfile), f"owner:{attacker.uid}:PID"]
    argv = ["fdlaunch-foreground", "-v", "--grace=1", f"--pidfile={pidfile}", "--", *attacker.argv(daemon)]
    with keeper_running(argv, {"PATH": os.environ["PATH"]}, stderr=subprocess.PIPE, text=True) as keeper:
        said = keeper.stderr.readline()
        assert said.startswith("fdlaunch-foreground: info: the daemon is pid "), said
        daemon_pid = int(said.split("pid ", 1)[1].split(";")[0])
        assert pidfile.read_text() == str(daemon_pid) and os.stat(pidfile).st_uid == attacker.uid
        keeper.terminate()
        assert keeper.wait(TIMEOUT) == 128 + signal.SIGTERM


# A forking daemon that ignores SIGTERM and reaps its workers at once (SIGCHLD ignored);
# on SIGUSR1 it starts a worker, which SIGTERM ends. Its pid, then each worker's, go to
# the file in argv[1], a line each.
STUBBORN_DAEMON = """
import os, signal, sys, time
report = sys.argv[1]
tell, told = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() != 0:
        os._exit(0)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    def start_worker(number, frame):
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            with open(report, "a") as out:
                out.write(f"worker {os.getpid()}\\n")
            while True:
                time.sleep(60)
    signal.signal(signal.SIGUSR1, start_worker)
    with open(report, "a") as out:
        out.write(f"daemon {os.getpid()}\\n")
    os.write(told, b"x")
    while True:
        time.sleep(60)
os.read(tell, 1)
"""

# Run as the init of a pid namespace of its own (unshare --pid), where pids are few and
# ns_last_pid (proc(5)) chooses the next one. fdlaunch-foreground keeps STUBBORN_DAEMON;
# once the daemon has a worker, the keeper is SIGKILLed, so its guard stops them: the
# worker exits at its SIGTERM, and while the guard waits out the daemon's --grace, an
# unrelated process is given the worker's pid. Once the guard is done, that process is sent
# SIGTERM; prints as JSON which signal ended it. argv: STUBBORN_DAEMON, a directory for its files.
REUSED_PID = """
import json, os, select, signal, subprocess, sys, time
report, stderr = sys.argv[2] + "/report", sys.argv[2] + "/stderr"
def wait_for(condition, what, seconds=20):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.01)
def said(kind):
    lines = open(report).read().split()
    return [int(lines[i + 1]) for i in range(0, len(lines), 2) if lines[i] == kind]
keeper = subprocess.Popen(["fdlaunch-foreground", "-v", "--grace=3", "--", sys.executable, "-c", sys.argv[1], report],
                          stderr=open(stderr, "w"))
# Once it says so, the daemon is found and the keeper looks below it only every second.
wait_for(lambda: "info: the daemon is pid" in open(stderr).read(), "the daemon to be found")
daemon = said("daemon")[0]
children = open(f"/proc/{keeper.pid}/task/{keeper.pid}/children").read().split()
guard = next(pid for pid in map(int, children) if pid != daemon)
guard_pidfd = os.pidfd_open(guard)
os.kill(daemon, signal.SIGUSR1)
wait_for(lambda: said("worker"), "the worker")
worker = said("worker")[0]
keeper.kill()
keeper.wait()
wait_for(lambda: not os.path.exists(f"/proc/{worker}"), "the worker to end at the guard's SIGTERM")
for attempt in range(20):
    with open("/proc/sys/kernel/ns_last_pid", "w") as last:
        last.write(str(worker - 1))
    victim = subprocess.Popen(["sleep", "60"])
    if victim.pid == worker:
        break
    victim.kill()
    victim.wait()
assert victim.pid == worker, "could not give the worker's pid to another process"
assert select.select([guard_pidfd], [], [], 20)[0], "the guard never finished"
# A signal the guard sent has been sent by now: it is what ended the process, not this SIGTERM.
victim.terminate()
ended_by = -victim.wait(20)
print(json.dumps({"victim": victim.pid, "ended by": signal.Signals(ended_by).name, "said": open(stderr).read()}))
"""


def test_the_guard_never_signals_a_process_that_took_over_a_pid(tmp_path):
    """The guard holds pidfds, not numbers: a pid freed and given to another process during --grace is not its to kill."""
    require_root()
    unshare = require("unshare")
    argv = [unshare, "--pid", "--fork", "--mount-proc", "--", sys.executable, "-c", REUSED_PID, STUBBORN_DAEMON, str(tmp_path)]
    done = run(argv, env={"PATH": os.environ["PATH"]}, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["ended by"] == "SIGTERM", f"the process given pid {seen['victim']} was killed; the guard said: {seen['said']}"


# Run in a pid namespace of its own, where ns_last_pid (proc(5)) chooses the next pid: two
# children of ours are found below us; one ends and is reaped, and its pid is given to a
# process that is not below us. The keeper's stop (forking.signal_below) then sends SIGKILL
# to what was found: the child still there gets it, the process that took the pid must not;
# a SIGTERM afterwards tells which one it reached. Prints what happened as JSON.
STOP_AFTER_REUSE = """
import json, os, signal, subprocess
from fdlaunch.kernel import proc
from fdlaunch.loops import forking
ended, kept = subprocess.Popen(["sleep", "60"]), subprocess.Popen(["sleep", "60"])
found = proc.descendants(os.getpid())
ended.kill()
ended.wait()
report, reporting = os.pipe()
middle = os.fork()
if middle == 0:  # its child outlives it, so is not below us
    os.close(report)
    with open("/proc/sys/kernel/ns_last_pid", "w") as last:
        last.write(str(ended.pid - 1))
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, lambda number, frame: (os.write(reporting, b" survived"), os._exit(0)))
        os.write(reporting, b"%d" % os.getpid())
        signal.pause()
    os._exit(0)
os.close(reporting)
os.waitpid(middle, 0)
stranger = int(os.read(report, 20))
parent = proc.stat_fields(stranger)[1]
forking.signal_below(found, signal.SIGKILL)
for pid in (kept.pid, stranger):
    os.kill(pid, signal.SIGTERM)  # what ends it if the SIGKILL did not reach it
kept_ended_by = signal.Signals(-kept.wait(20)).name
said = b""
while chunk := os.read(report, 20):  # until the stranger is gone
    said += chunk
print(json.dumps({"ended": ended.pid, "stranger": stranger, "its parent": parent, "kept": kept_ended_by, "stranger said": said.decode()}))
"""


def test_the_keepers_stop_never_signals_a_process_that_took_over_a_pid():
    require_root()
    unshare = require("unshare")
    wrapper = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"  # so that the test is not the namespace's init
    argv = [unshare, "--pid", "--fork", "--mount-proc", "--", sys.executable, "-c", wrapper, sys.executable, "-c", STOP_AFTER_REUSE]
    done = run(argv, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["stranger"] == seen["ended"] and seen["its parent"] != "2", f"the pid was not taken over: {seen}"
    assert seen["kept"] == "SIGKILL"  # found, and still ours: stopped
    assert seen["stranger said"] == " survived", "SIGKILL reached a process that took over a pid found below us"
