"""Helpers shared by the tests: run the installed tools, read the probe, find peers.

The tests run the console scripts found on PATH (make test installs them in
a virtualenv), exec real programs and bind real sockets.
"""

import configparser
import contextlib
import functools
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fdlaunch.cli import TOOLS

HERE = Path(__file__).resolve().parent
PROBE = str(HERE / "probe.py")
TIMEOUT = 20
# CI sets this so that a missing peer (s6, python-systemd, ...) fails instead of skipping.
REQUIRE_PEERS = os.environ.get("FDLAUNCH_REQUIRE_PEERS") == "1"


def pytest_configure(config):
    check_python_under_test()
    for tool in TOOLS:
        if shutil.which(tool) is None:
            raise pytest.UsageError(f"{tool} is not on PATH: install the package first (make test does)")


def console_scripts():
    """{script: module under fdlaunch.cmd} of setup.cfg's console_scripts, read as setuptools reads it."""
    config = configparser.ConfigParser()
    config.read(HERE.parent / "setup.cfg")
    entries = (line.split("=", 1) for line in config["options.entry_points"]["console_scripts"].split("\n") if line.strip())
    return {name.strip(): target.strip().removeprefix("fdlaunch.cmd.").removesuffix(":main") for name, target in entries}


def run(argv, timeout=TIMEOUT, **kwargs):
    """Run a command to completion, bounded in time, output as text."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    return subprocess.run(argv, timeout=timeout, text=True, **kwargs)


def probe_argv(path):
    return [sys.executable, PROBE, str(path)]


def read_probe(path):
    return parse_probe(Path(path).read_text())


def parse_probe(text):
    report = json.loads(text)
    report["fds"] = {int(fd): entry for fd, entry in report["fds"].items()}
    return report


def terminated(process):
    """process's exit status once SIGTERM (sent unless it has exited) has ended it; SIGKILL if it is still there at TIMEOUT."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@contextlib.contextmanager
def directory_in_tmp(name, mode):
    """A new directory under /tmp with mode, removed afterwards (tmp_path is root's, 0700, which nobody cannot enter)."""
    path = Path(tempfile.mkdtemp(prefix=f"fdlaunch-{name}."))
    path.chmod(mode)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture
def public():
    """A directory under /tmp that any user may read and write, for a chain that drops to nobody."""
    with directory_in_tmp("public", 0o777) as path:
        yield path


@pytest.fixture
def reachable():
    """A root-owned 0755 directory under /tmp: every user can enter it, only root writes in it."""
    with directory_in_tmp("reachable", 0o755) as path:
        yield path


@pytest.fixture
def probe():
    """Run argv + the probe, which reports on stdout (readable whatever user it runs as).

    Returns (completed process, probe report or None if the probe did not run).
    """

    def go(argv, **kwargs):
        done = run([*argv, sys.executable, PROBE, "-"], **kwargs)
        return done, (parse_probe(done.stdout) if done.stdout.startswith("{") else None)

    return go


def cannot_run(reason):
    """Skip a test this machine cannot run, saying why; in CI, where every test must run, fail it."""
    if REQUIRE_PEERS:
        pytest.fail(reason)
    pytest.skip(reason)


def missing(what):
    """Skip a test whose peer is not installed; in CI, where every peer must be, fail it."""
    cannot_run(f"{what} is not installed (.ci/run installs it)")


def require(program):
    """The path of a peer program."""
    path = shutil.which(program)
    if path is None:
        missing(program)
    return path


def interpreter(python):
    """(the path it gives itself, "X.Y") of the interpreter python, or None if it does not run."""
    try:
        done = run([python, "-c", "import sys; print(*sys.version_info[:2], sys.executable)"])
    except OSError:
        return None
    if done.returncode != 0:
        return None
    major, minor, path = done.stdout.rstrip("\n").split(" ", 2)
    return path, f"{major}.{minor}"


# The interpreter under test: the Makefile's PYTHON, which make test passes down
# (pytest run by hand: the one that made the virtualenv it runs in). Every test
# that runs a Python other than the virtualenv's own (sys.executable) runs this one.
PYTHON_ASKED = os.environ.get("FDLAUNCH_TEST_PYTHON", f"{sys.base_prefix}/bin/python{sys.version_info[0]}.{sys.version_info[1]}")
PYTHON, PYTHON_VERSION = interpreter(PYTHON_ASKED) or (PYTHON_ASKED, None)


def check_python_under_test():
    """The suite runs in a virtualenv made by the interpreter under test: a .venv of another version is refused."""
    ours = "{}.{}".format(*sys.version_info)
    if PYTHON_VERSION is None:
        raise pytest.UsageError(f"FDLAUNCH_TEST_PYTHON={PYTHON_ASKED!r} does not run: give make test a PYTHON that runs")
    if PYTHON_VERSION != ours:
        raise pytest.UsageError(
            f"the suite runs in a virtualenv of Python {ours} ({sys.prefix}), but {PYTHON} is Python {PYTHON_VERSION}:"
            " a virtualenv serves the Python that made it: set VENV to a new directory"
        )


@functools.cache
def nobody_can_run(python):
    drop = ["setpriv", "--reuid=nobody", f"--regid={pwd.getpwnam('nobody').pw_gid}", "--clear-groups", "--"]
    return run([*drop, python, "-c", "pass"]).returncode == 0


def require_python_for_nobody(python=sys.executable):
    """Skip a test that runs python (by default the virtualenv's, which the tools run under)
    as nobody, when nobody cannot: it lies under a directory other users cannot enter
    (a pyenv under /root)."""
    require_root()
    if not nobody_can_run(python):
        pytest.skip(f"nobody cannot run {python} ({os.path.realpath(python)}): it lies where other users cannot enter (README, Pythons)")


def python_systemd():
    """The interpreter under test, with python-systemd (package python3-systemd) importable."""
    if run([PYTHON, "-c", "import systemd.daemon"]).returncode == 0:
        return PYTHON
    debian = "/usr/bin/python3"
    if os.path.exists(debian) and run([debian, "-c", "import systemd.daemon"]).returncode == 0:
        pytest.skip(f"python-systemd is built for {debian} only, not for {PYTHON} (Python {PYTHON_VERSION})")
    missing("python3-systemd")


def require_root():
    if os.geteuid() != 0:
        pytest.skip("needs root: changes credentials or binds privileged ports")


def free_port(kind=socket.SOCK_STREAM, host="127.0.0.1"):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def sockets(report):
    """The probe's socket descriptors above stdio, by fd."""
    return {fd: e for fd, e in report["fds"].items() if e["kind"] == "socket" and fd > 2}


def http_get(port, path="/", seconds=15):
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


@contextlib.contextmanager
def s6_supervised(service, env=None):
    """A real s6-supervise on service, once it has written supervise/status; at the end s6-svc -xd, and it is waited for.

    s6-svok succeeds as soon as supervise/ is locked, before the status file
    exists, which s6-svwait needs ('unable to s6_svstatus_read'); s6-svstat
    succeeds only once both are there.
    """
    for tool in ("s6-supervise", "s6-svwait", "s6-svstat", "s6-svc"):
        require(tool)
    supervise = subprocess.Popen(["s6-supervise", str(service)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while run(["s6-svstat", str(service)]).returncode != 0:
            assert time.monotonic() < deadline, "s6-supervise did not start"
            time.sleep(0.05)
        yield supervise
    finally:
        run(["s6-svc", "-xd", str(service)])
        try:
            supervise.wait(TIMEOUT)
        finally:
            supervise.kill()
            supervise.wait()


def unread_fd3_started(argv, stderr_path):
    """argv started with fd 3 a pipe nobody reads any more (s6-supervise gone), stderr to a file; the Popen."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    on_fd3 = "import os, sys; fd = int(sys.argv[1]); fd == 3 or (os.dup2(fd, 3), os.close(fd)); os.execvp(sys.argv[2], sys.argv[2:])"
    try:
        with open(stderr_path, "w") as stderr:
            return subprocess.Popen([sys.executable, "-c", on_fd3, str(write_end), *argv], pass_fds=(write_end,), stderr=stderr)
    finally:
        os.close(write_end)


def wait_queued(abstract_name, timeout=TIMEOUT):
    """Until a datagram waits unread on the abstract unix socket ('@name'), as ss(8) shows its Recv-Q."""
    require("ss")
    deadline = time.monotonic() + timeout
    while True:
        listed = run(["ss", "-x", "-a", "-n"]).stdout.splitlines()
        if any(line.split()[4:5] == [abstract_name] and int(line.split()[2]) > 0 for line in listed if len(line.split()) > 4):
            return
        assert time.monotonic() < deadline, f"nothing waits unread on {abstract_name}"
        time.sleep(0.02)


def wait_for_line(path, text, count=1, timeout=TIMEOUT):
    """Until the file at path (made meanwhile, perhaps) holds text count times, or a failure at timeout."""
    deadline = time.monotonic() + timeout

    def held():
        return Path(path).read_text() if Path(path).exists() else ""

    while held().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} never said; said: {held()!r}"
        time.sleep(0.02)


class Attacker:
    """A local user with no privilege at all, as tests/attacks use it: a real uid, never root's."""

    def __init__(self, name, uid, gid, home):
        self.name, self.uid, self.gid, self.home = name, uid, gid, Path(home)

    def argv(self, argv):
        """argv run as this user: no supplementary group, no capability, no way back (setpriv(1))."""
        drop = [f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"]
        return ["setpriv", *drop, "--no-new-privs", "--", *argv]

    def script(self, name, text):
        """A Python script the user can read, in its home (a checkout may be 0700); its path."""
        path = self.home / name
        path.write_text(text)
        path.chmod(0o644)
        return str(path)

    def directory(self, name):
        """A fresh directory the user owns (mode 0755), in its home: where it may plant what it likes."""
        path = self.home / name
        path.mkdir()
        os.chown(path, self.uid, self.gid)
        return path

    def run(self, argv, **kwargs):
        return run(self.argv(argv), **kwargs)

    def popen(self, argv, **kwargs):
        return subprocess.Popen(self.argv(argv), **kwargs)


@pytest.fixture(scope="session")
def attacker():
    """A throwaway unprivileged account made for this test run, and removed with all its processes afterwards.

    Its home is a root-owned 0755 directory under /tmp (pytest's tmp_path is
    0700 root, out of its reach); every test takes a directory of its own there.
    """
    require_root()
    for program in ("setpriv", "useradd", "userdel", "pkill"):
        require(program)
    name = f"fdlatk{os.getpid()}"
    add = ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name]
    deadline = time.monotonic() + 10
    while (done := run(add)).returncode == 10:  # /etc/passwd locked by another run: try again
        assert time.monotonic() < deadline, done.stderr
        time.sleep(0.1)
    assert done.returncode == 0, done.stderr
    entry = pwd.getpwnam(name)
    home = tempfile.mkdtemp(prefix="fdlaunch-attacker-")
    try:
        os.chmod(home, 0o755)
        yield Attacker(name, entry.pw_uid, entry.pw_gid, home)
    finally:
        run(["pkill", "-KILL", "-U", str(entry.pw_uid)])
        shutil.rmtree(home, ignore_errors=True)
        run(["userdel", name])
