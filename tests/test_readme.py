"""The README's commands, as written: the headline chains under a real s6-supervise, the set-up commands."""

import contextlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time

import pytest
from conftest import HERE, TIMEOUT, python_systemd, require, require_root, run

README = HERE.parent / "README.md"
DAEMON = str(HERE / "label_daemon.py")


def indented_blocks(text):
    """The README's code blocks (indented by four spaces), each with its continuation lines joined."""
    blocks = re.findall(r"(?:^    .+\n)+", text, re.M)
    return [re.sub(r"\\\n\s*", "", block).strip() for block in blocks]


def chain_with(*needles):
    """The one README code block that contains every needle."""
    found = [block for block in indented_blocks(README.read_text()) if all(n in block for n in needles)]
    assert len(found) == 1, f"README has {len(found)} blocks with {needles}"
    return found[0]


def replaced(text, replacements):
    """text with each (old, new) applied; each old must be there, so a README change is noticed."""
    for old, new in replacements:
        assert old in text, f"{old!r} is no longer in {text!r}"
        text = text.replace(old, new)
    return text


def free_port_both():
    """A port free for both TCP and UDP on 127.0.0.1."""
    for _ in range(50):
        with socket.socket() as tcp, socket.socket(type=socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.fail("no port free for both TCP and UDP")


@contextlib.contextmanager
def s6_service(tmp_path, run_script):
    """A service directory with notification-fd 3 running run_script under s6-supervise, up and ready."""
    for tool in ("s6-supervise", "s6-svok", "s6-svwait", "s6-svstat", "s6-svc"):
        require(tool)
    service = tmp_path / "service"
    service.mkdir()
    (service / "notification-fd").write_text("3\n")
    (service / "run").write_text(f"#!/bin/sh\nexec 2>>{tmp_path / 'log'}\n{run_script}\n")
    (service / "run").chmod(0o755)
    env = {"PATH": os.environ["PATH"]}
    supervise = subprocess.Popen(["s6-supervise", str(service)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while run(["s6-svok", str(service)]).returncode != 0:  # supervise/ is not made yet
            assert time.monotonic() < deadline, "s6-supervise did not start"
            time.sleep(0.05)
        waited = run(["s6-svwait", "-U", "-t", "15000", str(service)])
        log = (tmp_path / "log").read_text() if (tmp_path / "log").exists() else ""
        assert waited.returncode == 0, f"s6-svwait -U: {waited.stderr}; the service said: {log}"
        up, ready, pid = run(["s6-svstat", "-o", "up,ready,pid", str(service)]).stdout.split()
        assert (up, ready) == ("true", "true"), log
        yield int(pid)
    finally:
        run(["s6-svc", "-xd", str(service)])
        try:
            supervise.wait(TIMEOUT)
        finally:
            supervise.kill()
            supervise.wait()


def ask_stream(family, address):
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(TIMEOUT)
        client.connect(address)
        return json.loads(client.makefile().readline())


def ask_udp(port):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(TIMEOUT)
        client.sendto(b"?", ("127.0.0.1", port))
        return json.loads(client.recv(4096))


def test_headline_chain_under_s6_with_notification_fd_3(tmp_path):
    """The first chain of the README, ports and paths changed, as an s6 run script."""
    require_root()
    port, tls_port = free_port_both(), free_port_both()
    control = tmp_path / "control"
    os.chmod(tmp_path, 0o755)
    script = replaced(
        chain_with("exec fdlaunch-listen --map -udp::53", "mydaemon"),
        [
            ("-udp::53 ", f"-udp::127.0.0.1:{port} "),
            ("-tcp::53 ", f"-tcp::127.0.0.1:{port} "),
            ("-tcp:label=tls:853 ", f"-tcp:label=tls:127.0.0.1:{tls_port} "),
            ("/run/dns/control", str(control)),
            ("fdlaunch-setuidgid dns ", "fdlaunch-setuidgid nobody "),
            ("-- mydaemon", f"-- {shlex.quote(sys.executable)} {DAEMON} fdlaunch"),
        ],
    )
    with s6_service(tmp_path, script) as pid:
        answers = {
            "udp": ask_udp(port),
            "tcp": ask_stream(socket.AF_INET, ("127.0.0.1", port)),
            "tls": ask_stream(socket.AF_INET, ("127.0.0.1", tls_port)),
            "control": ask_stream(socket.AF_UNIX, str(control)),
        }
        for label, answer in answers.items():
            assert answer["label"] == label and answer["pid"] == pid, answers
        assert os.stat(f"/proc/{pid}").st_uid == 65534
        # s6's fd 3 was left alone and never reached the daemon; the sockets went above it
        assert sorted(a["fd"] for a in answers.values()) == [4, 5, 6, 7]
        assert 3 not in answers["udp"]["fds"]


def test_chain_for_a_daemon_that_reads_only_listen_fds_under_s6(tmp_path):
    """The README's gunicorn chain, with a daemon that reads LISTEN_FDS through python-systemd."""
    require_root()
    python = python_systemd()
    port = free_port_both()
    script = replaced(
        chain_with("fdlaunch-fdmap --systemd", "gunicorn"),
        [
            ("-tcp:label=http::80 ", f"-tcp:label=http:127.0.0.1:{port} "),
            ("fdlaunch-setuidgid www-data ", "fdlaunch-setuidgid nobody "),
            ("-- gunicorn myapp:app", f"-- {python} {DAEMON} systemd"),
        ],
    )
    with s6_service(tmp_path, script) as pid:
        answer = ask_stream(socket.AF_INET, ("127.0.0.1", port))
        assert answer == {"pid": pid, "label": "http", "fd": 3, "fds": answer["fds"]}
        assert os.stat(f"/proc/{pid}").st_uid == 65534


@pytest.mark.parametrize("tool", ["fdlaunch-notify-wait", "fdlaunch-handoff"])
@pytest.mark.parametrize("convention", ["LISTEN_FDS", "LISTEN_FD_MAP"])
def test_fd_option_refuses_a_passed_socket(tool, convention, tmp_path):
    """Outside s6, fd 3 of the old headline chain is the UDP socket: not a notification fd."""
    listen = ["fdlaunch-listen", *(["--map"] if convention == "LISTEN_FD_MAP" else []), "-udp:127.0.0.1:0", "-tcp:127.0.0.1:0", "--"]
    done = run([*listen, tool, "--fd=3", "--", "true"], env={"PATH": os.environ["PATH"], "TMPDIR": str(tmp_path)})
    assert done.returncode == 100, done.stderr
    assert done.stderr == (
        f"{tool}: fatal: --fd='3': fd 3 is the socket labelled 'udp' passed in LISTEN_FDS/LISTEN_FD_MAP, "
        "not a notification fd; under s6 start the chain with fdlaunch-listen --map, which leaves fd 3 alone\n"
    )
    assert os.listdir(tmp_path) == []


def test_fd_option_still_takes_an_fd_beside_the_passed_sockets(tmp_path):
    read_end, write_end = os.pipe()
    argv = ["fdlaunch-listen", "--map", "-udp:127.0.0.1:0", "--", "fdlaunch-notify-wait", f"--fd={write_end}", "--"]
    program = subprocess.Popen(
        [*argv, sys.executable, "-c", "import fdlaunch; fdlaunch.notify('READY=1')"],
        pass_fds=(write_end,),
        env={"PATH": os.environ["PATH"], "TMPDIR": str(tmp_path)},
    )
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as notification:
            assert notification.read() == b"\n"
        assert program.wait(TIMEOUT) == 0
    finally:
        program.kill()
        program.wait()


@pytest.mark.parametrize(
    "argv",
    [
        ["fdlaunch-listen", "-tcp:127.0.0.1:0", "--", "true"],
        ["fdlaunch-listen", "--map", "-tcp:fd=7:127.0.0.1:0", "--", "fdlaunch-fdmap", "--systemd", "--", "true"],
    ],
)
def test_fd_3_taken_names_the_s6_recipe(argv):
    """Under s6, fd 3 is the notification fd: the refusal says how to chain a LISTEN_FDS-only daemon."""
    read_end, write_end = os.pipe()
    try:
        done = run(argv, preexec_fn=lambda: os.dup2(write_end, 3), pass_fds=(3,))
    finally:
        os.close(read_end)
        os.close(write_end)
    assert done.returncode == 100
    assert "fdlaunch-notify-wait --fd=3 -- fdlaunch-fdmap --systemd -- PROG" in done.stderr
    assert done.stderr.count("\n") == 1
