"""fdlaunch-listen with real peers: python-systemd reads what we pass, systemd-socket-activate stacks under us."""

import json
import socket
import subprocess
import time

import pytest
from conftest import TIMEOUT, free_port, probe_argv, python_systemd, read_probe, require, run

# The daemon side as python-systemd (Debian's python3-systemd) sees it.
SYSTEMD_READER = """
import json, socket
from systemd import daemon
found = daemon.listen_fds_with_names(unset_environment=False)
kinds = {fd: socket.socket(fileno=fd).type.name for fd in found}
print(json.dumps({"names": found, "kinds": kinds}))
"""


def test_python_systemd_sees_our_sockets_and_names():
    python = python_systemd()
    done = run(
        [
            "fdlaunch-listen",
            "-udp:label=dns:127.0.0.1:0",
            "-tcp:label=dns:127.0.0.1:0",
            "-unix:label=control:@fdlaunch-peer",
            python,
            "-c",
            SYSTEMD_READER,
        ]
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["names"] == {"3": "dns", "4": "dns", "5": "control"}
    assert seen["kinds"] == {"3": "SOCK_DGRAM", "4": "SOCK_STREAM", "5": "SOCK_STREAM"}


def test_python_systemd_after_map_mode_sees_nothing():
    """--map writes only LISTEN_FD_MAP, so a systemd reader is told nothing (and is not misled)."""
    python = python_systemd()
    done = run(["fdlaunch-listen", "--map", "-tcp:127.0.0.1:0", python, "-c", SYSTEMD_READER])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["names"] == {}


def test_systemd_socket_activate_then_fdlaunch_listen(tmp_path):
    """Its socket (named web) is kept at fd 3 and ours is appended at fd 4."""
    activate = require("systemd-socket-activate")
    port = free_port()
    out = tmp_path / "probe.json"
    chain = [activate, "-l", f"127.0.0.1:{port}", "--fdname=web", "fdlaunch-listen", "-tcp:label=api:127.0.0.1:0", "--", *probe_argv(out)]
    launcher = subprocess.Popen(chain, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # systemd-socket-activate execs the program on the first connection
        client = connect_when_listening(port)
        assert launcher.wait(TIMEOUT) == 0, launcher.stderr.read()
        client.close()
    finally:
        launcher.kill()
        launcher.wait()
    report = read_probe(out)
    env = report["env"]
    assert (env["LISTEN_FDS"], env["LISTEN_FDNAMES"], env["LISTEN_FD_MAP"]) == ("2", "web:api", "web=3,api=4")
    assert env["LISTEN_PID"] == str(report["pid"])
    assert report["fds"][3]["address"] == ["127.0.0.1", port]
    assert report["fds"][4]["listening"] and not report["fds"][4]["cloexec"]


def connect_when_listening(port, attempts=200):
    for _ in range(attempts):
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=1)
        except ConnectionRefusedError:
            time.sleep(0.02)
    pytest.fail(f"nothing listened on 127.0.0.1:{port}")
