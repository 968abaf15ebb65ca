"""fdlaunch-accept runs a handler chain's fdlaunch links in its forked child (fdlaunch(7), FUSION).

The handler at the end must not be able to tell: every server below runs
once fused and once with FDLAUNCH_FUSE=0 (each handler started by
posix_spawn, each link exec'd), and the probe at the end of the chain must
see the same descriptors and flags, environment, signals, credentials,
umask, limits and process group.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import PROBE, TIMEOUT, free_port, parse_probe, require_python_for_nobody, terminated

# The handler chain: two links of ours, the second after the drop to nobody, then the probe.
GLIBC_INTERNAL = (1 << 31) | (1 << 32)  # signals 32 and 33, below SIGRTMIN
CHAIN = ["fdlaunch-setuidgid", "--umask=027", "--limit=nofile=512", "nobody", "--", "fdlaunch-fdmap", "--map", "--"]


class Server:
    """fdlaunch-listen SPEC -- fdlaunch-accept -v OPTIONS -- HANDLER..., until stop(); stderr in a file."""

    def __init__(self, directory, spec, options, handler, fuse=True, env=None):
        self.stderr_path = Path(tempfile.mkstemp(prefix="stderr-", dir=directory)[1])
        environ = {**(env or {"PATH": os.environ["PATH"]}), **({} if fuse else {"FDLAUNCH_FUSE": "0"})}
        argv = ["fdlaunch-listen", spec, "--", "fdlaunch-accept", "-v", *options, "--", *handler]

        def caller_state():
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup leaves it: stays ignored for the handler
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})

        with open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(argv, env=environ, stdout=subprocess.DEVNULL, stderr=stderr, preexec_fn=caller_state)
        self.guard = int(self.wait_for(r"guard pid (\d+) leads")[0])

    def stderr(self):
        return self.stderr_path.read_text()

    def wait_for(self, pattern, count=1):
        deadline = time.monotonic() + TIMEOUT
        while len(found := re.findall(pattern, self.stderr())) < count:
            assert self.process.poll() is None or found, f"server exited: {self.stderr()}"
            assert time.monotonic() < deadline, f"no {count} x {pattern!r} in {self.stderr()!r}"
            time.sleep(0.02)
        return found

    def stop(self):
        return terminated(self.process)


def talk(family, address, timeout=TIMEOUT):
    """Connect, read to EOF: what came back."""
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(timeout)
        client.connect(address)
        client.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := client.recv(65536):
            reply += chunk
    return reply.decode()


def handler_view(directory, transport, fuse):
    """What the probe at the end of the handler chain saw, with what differs between two runs of a server named."""
    rules = Path(directory) / "rules"
    if transport == "tcp":
        port = free_port()
        spec, family, address = f"-tcp:127.0.0.1:{port}", socket.AF_INET, ("127.0.0.1", port)
        rules.write_text('allow 127.0.0.0/8 ROLE=tester GREETING="hello there"\n')
    else:
        path = Path(directory) / f"sock-{'fused' if fuse else 'exec'}"
        spec, family, address = f"-unix:mode=0666:{path}", socket.AF_UNIX, str(path)
        rules.write_text("allow uid:root ROLE=admin\n")
    server = Server(directory, spec, ["-C", "2", f"--rules={rules}"], [*CHAIN, sys.executable, PROBE, "-"], fuse)
    try:
        report = parse_probe(talk(family, address))
        server.wait_for("end pid")
    finally:
        assert server.stop() == 0, server.stderr()
    assert report["pgid"] == server.guard, "the handler leads no group of its own: it is in the guard's"
    for key in ("pid", "ppid", "pgid"):
        report.pop(key)
    # glibc's posix_spawn (2.36) sets its two internal signals to SIG_IGN in every child; a fork
    # keeps them as the server has them (fdlaunch-accept(1), the one difference it names).
    report["ignored"] &= ~GLIBC_INTERNAL
    if not fuse:
        assert report["env"].pop("FDLAUNCH_FUSE") == "0"
    for name in ("TCPLOCALPORT", "TCPREMOTEPORT", "IPCLOCALPATH"):
        if name in report["env"]:
            report["env"][name] = "<differs>"
    for fd in (0, 1):
        report["fds"][fd]["address"] = "<differs>"
    said = re.sub(r"pid \d+|127\.0\.0\.1:\d+|/sock-\w+", "<differs>", server.stderr())
    forked = "fdlaunch-accept: info: handlers start by fork(2), not posix_spawn(3): fdlaunch-setuidgid runs in the forked child itself\n"
    assert (forked in said) == fuse
    return report, said.replace(forked, "")


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_the_handler_cannot_tell_a_fused_handler_chain(transport, tmp_path):
    require_python_for_nobody()
    directory = Path(tempfile.mkdtemp(prefix="fdl-accept-fusion.", dir="/tmp"))
    directory.chmod(0o755)
    try:
        fused, fused_said = handler_view(directory, transport, fuse=True)
        execd, execd_said = handler_view(directory, transport, fuse=False)
    finally:
        subprocess.run(["rm", "-rf", str(directory)], check=True)
    assert fused == execd
    assert fused["uid"] == [65534] * 3 and fused["umask"] == 0o027 and fused["limits"]["RLIMIT_NOFILE"][0] == 512
    assert fused["env"]["ROLE"] == ("tester" if transport == "tcp" else "admin")
    assert sorted(fused["fds"]) == [0, 1, 2] and not fused["fds"][0]["cloexec"]
    assert fused["ignored"] & (1 << (signal.SIGHUP - 1)) and fused["blocked"] == 1 << (signal.SIGUSR2 - 1)
    assert fused_said == execd_said


def test_a_link_that_fails_fails_its_connection_alone(tmp_path):
    """One line under the failing link's name per connection, as when each link is exec'd; the server serves on."""
    said = {}
    for fuse in (True, False):
        port = free_port()
        server = Server(tmp_path, f"-tcp:127.0.0.1:{port}", ["-q"], ["fdlaunch-setuidgid", "nosuchuser-fdl", "--", "true"], fuse)
        try:
            for count in (1, 2):
                assert talk(socket.AF_INET, ("127.0.0.1", port)) == "", "the connection is closed, nothing served"
                server.wait_for("unknown user", count)
            assert server.process.poll() is None, "the server goes on"
        finally:
            assert server.stop() == 0, server.stderr()
        said[fuse] = [line for line in server.stderr().splitlines() if "info:" not in line]
    line = "fdlaunch-setuidgid: fatal: account 'nosuchuser-fdl': unknown user 'nosuchuser-fdl'"
    assert said[True] == said[False] == [line, line]


def test_a_fused_handler_chain_imports_nothing_per_connection(tmp_path):
    """What the child runs was loaded before the first connection, --lookup's threads or not: no import in a forked child."""
    port = free_port()
    env = {"PATH": os.environ["PATH"], "PYTHONPROFILEIMPORTTIME": "1"}
    handler = ["fdlaunch-setuidgid", "--env", "nobody", "--", "fdlaunch-fdmap", "--map", "--", "true"]
    server = Server(tmp_path, f"-tcp:127.0.0.1:{port}", ["--lookup"], handler, env=env)
    try:
        talk(socket.AF_INET, ("127.0.0.1", port))
        server.wait_for("end pid")
        before = server.stderr()
        for count in (2, 3):
            talk(socket.AF_INET, ("127.0.0.1", port))
            server.wait_for("end pid", count)
        later = server.stderr()[len(before) :]
    finally:
        assert server.stop() == 0, server.stderr()
    assert "exited with status 0" in later
    assert [line for line in later.splitlines() if line.startswith("import time:")] == []
