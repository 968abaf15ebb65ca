"""The examples, run the way their README and unit files say, under real supervisors."""

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import TIMEOUT, free_port, http_get, require, require_python_for_nobody, require_root, run, s6_supervised

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def answering_pid(body):
    match = re.match(r"hello from pid (\d+) on http, you asked for ", body)
    assert match, body
    return int(match[1])


def tree(top):
    """Every path under top with what it is: a file's bytes, a link's target, or 'dir'."""
    found = {}
    for path in sorted(top.rglob("*")):
        if path.is_symlink():
            found[str(path)] = ("link", os.readlink(path))
        elif path.is_dir():
            found[str(path)] = ("dir", oct(path.stat().st_mode))
        else:
            found[str(path)] = ("file", oct(path.stat().st_mode), path.read_bytes())
    return found


@pytest.fixture
def checkout_unchanged():
    """Running an example leaves nothing in the checkout: no supervise/, no event/, no state."""
    before = tree(EXAMPLES)
    yield
    assert tree(EXAMPLES) == before


@pytest.fixture
def public_tmp():
    """A temporary directory outside the checkout that nobody (the daemons' account) can enter."""
    top = Path(tempfile.mkdtemp(prefix="fdlaunch-example-", dir="/tmp"))
    os.chmod(top, 0o755)
    yield top
    shutil.rmtree(top, ignore_errors=True)


def commands_beside(run_script):
    """The commands a run script's comment gives, '#   command   # note' -> 'command'."""
    lines = [line[4:] for line in run_script.read_text().splitlines() if line.startswith("#   ")]
    return [re.sub(r"\s+# .*$", "", line).strip() for line in lines]


def copy_as_written(kind, name, public_tmp, port):
    """Run the example's own copy command (to a place of ours) from the checkout's top; the copy."""
    commands = commands_beside(EXAMPLES / kind / name / "run")
    written = f"/tmp/{name}"
    copy = commands[0]
    assert copy == f"cp -a examples/{kind}/{name} {written} && cd {written}", commands
    target = public_tmp / name
    assert run(["sh", "-c", copy.replace(written, str(target))], cwd=EXAMPLES.parent).returncode == 0
    assert not any(path.is_symlink() for path in target.rglob("*")), "a copy must not point back into the checkout"
    (target / "env").mkdir()
    (target / "env" / "PORT").write_text(f"{port}\n")
    return target, commands[1:]


class Started:
    """A shell running an example's start command in its copy, in a process group of its own.

    The supervisor it starts in the background stays in that group: the stop
    command ends it, and the group is killed if anything is left.
    """

    def __init__(self, command, cwd):
        # no pipe: the supervisor left in the background would hold it open
        self.shell = subprocess.Popen(["sh", "-c", command], cwd=cwd, start_new_session=True, stdout=subprocess.DEVNULL)
        self.cwd = cwd

    def wait(self):
        return self.shell.wait(TIMEOUT)

    def stop(self, command):
        try:
            run(["sh", "-c", command], cwd=self.cwd)
            deadline = time.monotonic() + TIMEOUT
            while self.group_alive() and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            if self.group_alive():
                os.killpg(self.shell.pid, signal.SIGKILL)
            self.shell.kill()
            self.shell.wait()

    def group_alive(self):
        try:
            os.killpg(self.shell.pid, 0)
        except ProcessLookupError:
            return False
        return True


def test_demo_daemon_answers_through_fdlaunch_listen():
    port = free_port()
    done = run(["sh", str(EXAMPLES / "demo.sh")], env={"PATH": os.environ["PATH"], "PORT": str(port), "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr
    assert f"fdlaunch-listen: info: fd 3: 127.0.0.1:{port}/tcp, label http" in done.stderr
    answer = re.search(r"hello from pid (\d+) on http, you asked for /demo\n\(fdlaunch-listen started as pid (\d+)", done.stdout)
    assert answer, done.stdout
    assert answer[1] == answer[2]


def test_demo_on_a_port_in_use_fails_at_once_with_the_bind_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()  # connections to it are queued and never answered
        port = taken.getsockname()[1]
        started = time.monotonic()
        done = run(["sh", str(EXAMPLES / "demo.sh")], env={"PATH": os.environ["PATH"], "PORT": str(port), "PYTHON": sys.executable})
        took = time.monotonic() - started
    assert done.returncode != 0
    assert done.stderr.startswith(f"fdlaunch-listen: fatal: unable to bind 127.0.0.1:{port}/tcp: Address already in use\n")
    assert "did not answer" not in done.stderr
    assert took < 3, f"the demo took {took:.1f} seconds to give up"


def test_demo_port_is_documented():
    readme = (EXAMPLES.parent / "README.md").read_text()
    assert "PORT=8081 make demo" in readme
    assert "PORT=8081 sh examples/demo.sh" in (EXAMPLES / "demo.sh").read_text()


def test_the_service_daemons_are_copies_of_the_demo_daemon():
    for kind in ("s6", "runit"):
        copy = EXAMPLES / kind / "hello" / "hello_httpd.py"
        assert not copy.is_symlink() and copy.read_bytes() == (EXAMPLES / "hello_httpd.py").read_bytes()


def test_s6_service(public_tmp, checkout_unchanged):
    require_root()
    require_python_for_nobody()
    for tool in ("s6-supervise", "s6-svwait", "s6-svstat", "s6-svc"):
        require(tool)
    port = free_port()
    service, (start, status_command, curl, stop) = copy_as_written("s6", "hello", public_tmp, port)
    assert status_command == "s6-svstat ." and curl == "curl http://127.0.0.1:8080/" and stop == "s6-svc -xd ."
    started = Started(start, service)
    try:
        assert started.wait() == 0, "s6-svwait -U did not see the service ready"
        status = run(["sh", "-c", status_command], cwd=service).stdout
        pid = answering_pid(http_get(port, "/s6"))
        assert re.match(rf"up \(pid {pid}\) .*ready", status), "s6 supervises the daemon itself: it kept the run script's pid"
        assert os.stat(f"/proc/{pid}").st_uid == 65534
    finally:
        started.stop(stop)
    assert (service / "supervise").is_dir() and (service / "event").is_dir(), "s6 wrote into the copy"


def test_s6_greet_service_as_written(public_tmp, checkout_unchanged):
    """The per-connection example, copied and started with the commands at the top of its run script."""
    require_root()
    require_python_for_nobody()
    for tool in ("s6-supervise", "s6-svstat", "s6-svwait", "s6-svc", "nc"):
        require(tool)
    port = free_port()
    service, (start, client, stop) = copy_as_written("s6", "greet", public_tmp, port)
    assert client == "nc 127.0.0.1 7979" and stop == "s6-svc -xd ."
    started = Started(start, service)
    try:
        assert started.wait() == 0, "s6-svwait -U did not see fdlaunch-accept ready"
        reply = run(["sh", "-c", client.replace("7979", str(port)) + " </dev/null"]).stdout
        assert reply == "hello 127.0.0.1, this is nobody\n"
    finally:
        started.stop(stop)
    assert (service / "supervise").is_dir() and (service / "event").is_dir(), "s6 wrote into the copy"


@pytest.mark.parametrize("name", sorted(path.name for path in (EXAMPLES / "s6").iterdir()))
def test_s6_headers_wait_until_s6_svwait_can_read_the_status(name, tmp_path):
    """s6-supervise locks supervise/ before it writes supervise/status: in between, s6-svwait fails
    ('unable to s6_svstatus_read'), so the header's wait loop must not end there. A running
    s6-supervise whose status file is removed is that moment, held still."""
    require_root()
    start = commands_beside(EXAMPLES / "s6" / name / "run")[1]
    waited = re.fullmatch(r"s6-supervise \. & until (.+); do sleep 0\.1; done; s6-svwait -U -t 10000 \.", start)
    assert waited, start
    service = tmp_path / "service"
    service.mkdir()
    (service / "run").write_text("#!/bin/sh\nexec sleep 60\n")
    (service / "run").chmod(0o755)
    with s6_supervised(service):
        assert run(["s6-svwait", "-u", "-t", "10000", str(service)]).returncode == 0  # then nothing rewrites the status
        (service / "supervise" / "status").unlink()
        done = run(["s6-svwait", "-u", "-t", "1000", str(service)])
        assert done.returncode == 111 and "unable to s6_svstatus_read" in done.stderr, "this is the moment s6-svwait fails"
        assert run(["sh", "-c", waited[1]], cwd=service).returncode != 0, "the header's wait would have ended here"


def test_runit_service(public_tmp, checkout_unchanged):
    require_root()
    require_python_for_nobody()
    require("runsv"), require("sv")
    port = free_port()
    service, (start, status_command, curl, stop) = copy_as_written("runit", "hello", public_tmp, port)
    assert status_command == "sv status ." and curl == "curl http://127.0.0.1:8080/" and stop == "sv -w 10 exit ."
    started = Started(start, service)
    try:
        assert started.wait() == 0
        pid = answering_pid(http_get(port, "/runit"))
        status = run(["sh", "-c", status_command], cwd=service).stdout
        assert re.match(rf"run: \.: \(pid {pid}\)", status), status
    finally:
        started.stop(stop)
    assert (service / "supervise").is_dir(), "runsv wrote into the copy"


@pytest.fixture
def units(public_tmp, checkout_unchanged):
    """A copy of examples/systemd, as a user takes it; its units' commands say where they go."""
    assert run(["cp", "-a", str(EXAMPLES / "systemd"), str(public_tmp / "systemd")]).returncode == 0
    copy = public_tmp / "systemd"
    for unit in copy.iterdir():
        assert f"cp {unit.name}" in unit.read_text() or f" {unit.name}" in unit.read_text(), f"{unit.name} says how to install it"
    return copy


def exec_start(units, unit, port):
    """The unit's ExecStart=, with this checkout's paths and a free port for the installed ones."""
    line = next(line for line in (units / unit).read_text().splitlines() if line.startswith("ExecStart="))
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


def test_systemd_unit_with_an_fdlaunch_chain(units):
    """Type=notify: READY=1 must come from the pid systemd started (NotifyAccess=main)."""
    require_root()
    require_python_for_nobody()
    port = free_port()
    public = Path(tempfile.mkdtemp(prefix="fdlaunch-systemd-", dir="/tmp"))
    os.chmod(public, 0o755)
    notify_path = public / "notify"
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    upstream.bind(str(notify_path))
    upstream.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    upstream.settimeout(TIMEOUT)
    os.chmod(notify_path, 0o777)  # as /run/systemd/notify: anyone may send, credentials say who
    main = subprocess.Popen(exec_start(units, "hello.service", port), env={"PATH": os.environ["PATH"], "NOTIFY_SOCKET": str(notify_path)})
    try:
        data, ancillary, _, _ = upstream.recvmsg(4096, socket.CMSG_SPACE(12))
        sender = int.from_bytes(ancillary[0][2][:4], "little")
        assert data.startswith(b"READY=1") and sender == main.pid
        assert answering_pid(http_get(port, "/unit")) == main.pid
    finally:
        main.kill()
        main.wait()
        upstream.close()
        shutil.rmtree(public)


def test_systemd_socket_unit_through_fdlaunch_fdmap(units):
    activate = require("systemd-socket-activate")
    port = free_port()
    socket_unit = (units / "hello-activated.socket").read_text()
    name = re.search(r"FileDescriptorName=(\S+)", socket_unit)[1]
    command = [activate, "-l", f"127.0.0.1:{port}", f"--fdname={name}", *exec_start(units, "hello-activated.service", port)]
    launcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        body = http_get(port, "/activated")
        assert answering_pid(body) == launcher.pid
        launcher.kill()
        launcher.wait()
        log = launcher.stderr.read()
        assert "'LISTEN_FD_MAP': 'http=3'" in log, log
    finally:
        launcher.kill()
        launcher.wait()


def test_container_entrypoint_under_unshare(public_tmp, checkout_unchanged):
    """examples/container: the commands its header gives, run as written (another port and directory), are its ENTRYPOINT as PID 1."""
    require_root()
    require("unshare")
    containerfile = (EXAMPLES / "container" / "Containerfile").read_text()
    commands = [line[4:].split("   # ")[0].strip() for line in containerfile.splitlines() if line.startswith("#   ") and line[4] != " "]
    assert len(commands) == 5, commands
    entrypoint = json.loads(next(line for line in containerfile.splitlines() if line.startswith("ENTRYPOINT "))[len("ENTRYPOINT ") :])
    start = commands[1].removesuffix(" & unshare=$!")
    assert entrypoint[-1] == "/usr/local/share/fdlaunch/examples/hello_httpd.py"
    assert shlex.split(start) == ["unshare", "--pid", "--fork", "--mount-proc", *entrypoint[:-1], "examples/hello_httpd.py"]
    assert commands[2] == "until test -e /var/lib/hello/ready; do sleep 0.1; done; curl http://127.0.0.1:8080/"
    port, directory = free_port(), public_tmp / "hello"
    ready = directory / "ready"

    def ours(command):
        command = command.replace("-tcp:label=http::8080", f"-tcp:label=http:127.0.0.1:{port}")
        return command.replace("/var/lib/hello", str(directory))

    assert run(["sh", "-c", ours(commands[0])]).returncode == 0
    container = subprocess.Popen(shlex.split(ours(start)), cwd=EXAMPLES.parent)  # its pid is $unshare's
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ready.exists():  # the header's until loop, bounded
            assert container.poll() is None and time.monotonic() < deadline, "the daemon never got ready"
            time.sleep(0.05)
        assert answering_pid(http_get(port, "/container")) == 2, "the daemon is PID 1's child"
        assert run(["sh", "-c", f"unshare={container.pid}; {commands[3]}"]).returncode == 0
        assert container.wait(TIMEOUT) == 0, "hello_httpd stops on SIGTERM and exits 0"
        assert run(["sh", "-c", ours(commands[4].removeprefix("wait $unshare; "))]).stdout == "removed\n"
    finally:
        for pid in reversed([container.pid, *children_of(container.pid)]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        container.wait()


def children_of(pid):
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
