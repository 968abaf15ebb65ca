"""The examples, run the way their README and unit files say, under real supervisors."""

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import TIMEOUT, free_port, require, require_root, run

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def get(port, path="/", seconds=15):
    """One HTTP/1.0 request, retried until the daemon answers; the body."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as client:
                client.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
                reply = b""
                while chunk := client.recv(4096):
                    reply += chunk
            return reply.decode().split("\r\n\r\n", 1)[1]
        except (ConnectionRefusedError, IndexError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def answering_pid(body):
    match = re.match(r"hello from pid (\d+) on http, you asked for ", body)
    assert match, body
    return int(match[1])


@pytest.fixture
def service_copy():
    """A copy of an example service directory that nobody (the daemon's account) can read."""
    made = []

    def copy(kind, port):
        top = tempfile.mkdtemp(prefix="fdlaunch-example-", dir="/tmp")
        os.chmod(top, 0o755)
        made.append(top)
        target = Path(top) / "hello"
        shutil.copytree(EXAMPLES / kind / "hello", target)  # the symlinked daemon is copied as a file
        (target / "env").mkdir()
        (target / "env" / "PORT").write_text(f"{port}\n")
        return target

    yield copy
    for top in made:
        shutil.rmtree(top, ignore_errors=True)


def test_demo_daemon_answers_through_fdlaunch_listen():
    port = free_port()
    done = run(["sh", str(EXAMPLES / "demo.sh")], env={"PATH": os.environ["PATH"], "PORT": str(port), "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr
    assert f"fdlaunch-listen: info: fd 3: tcp 127.0.0.1:{port}/tcp, label http" in done.stderr
    answer = re.search(r"hello from pid (\d+) on http, you asked for /demo\n\(fdlaunch-listen started as pid (\d+)", done.stdout)
    assert answer, done.stdout
    assert answer[1] == answer[2]


def test_s6_service(service_copy):
    require_root()
    for tool in ("s6-supervise", "s6-svok", "s6-svwait", "s6-svstat", "s6-svc"):
        require(tool)
    port = free_port()
    service = service_copy("s6", port)
    supervise = subprocess.Popen(["s6-supervise", str(service)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while run(["s6-svok", str(service)]).returncode != 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert run(["s6-svwait", "-U", "-t", "15000", str(service)]).returncode == 0
        status = run(["s6-svstat", "-o", "up,ready,pid", str(service)]).stdout.split()
        assert status[:2] == ["true", "true"]
        pid = answering_pid(get(port, "/s6"))
        assert pid == int(status[2]), "s6 supervises the daemon itself: it kept the run script's pid"
        assert os.stat(f"/proc/{pid}").st_uid == 65534
    finally:
        run(["s6-svc", "-xd", str(service)])
        try:
            supervise.wait(TIMEOUT)
        finally:
            supervise.kill()
            supervise.wait()


def test_runit_service(service_copy):
    require_root()
    runsv, sv = require("runsv"), require("sv")
    port = free_port()
    service = service_copy("runit", port)
    supervisor = subprocess.Popen([runsv, str(service)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        pid = answering_pid(get(port, "/runit"))
        status = run([sv, "status", str(service)]).stdout
        assert re.match(rf"run: {re.escape(str(service))}: \(pid {pid}\)", status), status
    finally:
        run([sv, "-w", "5", "exit", str(service)])
        try:
            supervisor.wait(TIMEOUT)
        finally:
            supervisor.kill()
            supervisor.wait()


def exec_start(unit, port):
    """The unit's ExecStart=, with this checkout's paths and a free port for the installed ones."""
    line = next(line for line in (EXAMPLES / "systemd" / unit).read_text().splitlines() if line.startswith("ExecStart="))
    words = shlex.split(line.removeprefix("ExecStart="))
    replaced = []
    for word in words:
        if word.startswith("/usr/local/bin/"):
            word = shutil.which(os.path.basename(word))
        elif word == "/usr/bin/python3":
            word = sys.executable
        elif word.endswith("/examples/hello_httpd.py"):
            word = str(EXAMPLES / "hello_httpd.py")
        replaced.append(word.replace("-tcp:label=http::80", f"-tcp:label=http:127.0.0.1:{port}"))
    return replaced


def test_systemd_unit_with_an_fdlaunch_chain():
    """Type=notify: READY=1 must come from the pid systemd started (NotifyAccess=main)."""
    require_root()
    port = free_port()
    public = Path(tempfile.mkdtemp(prefix="fdlaunch-systemd-", dir="/tmp"))
    os.chmod(public, 0o755)
    notify_path = public / "notify"
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    upstream.bind(str(notify_path))
    upstream.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    upstream.settimeout(TIMEOUT)
    os.chmod(notify_path, 0o777)  # as /run/systemd/notify: anyone may send, credentials say who
    main = subprocess.Popen(exec_start("hello.service", port), env={"PATH": os.environ["PATH"], "NOTIFY_SOCKET": str(notify_path)})
    try:
        data, ancillary, _, _ = upstream.recvmsg(4096, socket.CMSG_SPACE(12))
        sender = int.from_bytes(ancillary[0][2][:4], "little")
        assert data.startswith(b"READY=1") and sender == main.pid
        assert answering_pid(get(port, "/unit")) == main.pid
    finally:
        main.kill()
        main.wait()
        upstream.close()
        shutil.rmtree(public)


def test_systemd_socket_unit_through_fdlaunch_fdmap():
    activate = require("systemd-socket-activate")
    port = free_port()
    socket_unit = (EXAMPLES / "systemd" / "hello-activated.socket").read_text()
    name = re.search(r"FileDescriptorName=(\S+)", socket_unit)[1]
    command = [activate, "-l", f"127.0.0.1:{port}", f"--fdname={name}", *exec_start("hello-activated.service", port)]
    launcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        body = get(port, "/activated")
        assert answering_pid(body) == launcher.pid
        launcher.kill()
        launcher.wait()
        log = launcher.stderr.read()
        assert "'LISTEN_FD_MAP': 'http=3'" in log, log
    finally:
        launcher.kill()
        launcher.wait()
