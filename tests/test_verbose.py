"""-v: every tool says what it did, one line each, under its own name; silent without it."""

import os
import re
import socket
import subprocess
import sys
import time

import pytest
from conftest import TIMEOUT, require_root, run

READY = [sys.executable, "-c", "import time, fdlaunch; time.sleep(0.2); fdlaunch.notify('READY=1')"]


def info_lines(stderr, tool):
    lines = stderr.splitlines()
    assert all(line.startswith(f"{tool}: info: ") for line in lines), stderr
    return [line.removeprefix(f"{tool}: info: ") for line in lines]


@pytest.mark.parametrize("verbose", [True, False])
def test_setuidgid_says_what_it_became(verbose):
    require_root()
    flag = ["-v"] if verbose else []
    done = run(["fdlaunch-setuidgid", *flag, "--keep-cap=net_bind_service", "nobody", "--", "true"])
    assert done.returncode == 0
    said = "fdlaunch-setuidgid: info: now uid 65534, gid 65534, groups 65534, keeping cap_net_bind_service\n"
    assert done.stderr == (said if verbose else "")
    done = run(["fdlaunch-setuidgid", *flag, "--groups=", "1234:5678", "--", "true"])
    assert done.stderr == ("fdlaunch-setuidgid: info: now uid 1234, gid 5678, groups none\n" if verbose else "")


def test_setuidgid_export_says_what_it_set():
    done = run(["fdlaunch-setuidgid", "-v", "--export", "0:0", "--", "true"])
    assert done.returncode == 0
    assert done.stderr == "fdlaunch-setuidgid: info: set UID=0 GID=0 GIDLIST=; credentials unchanged\n"


def test_notify_wait_says_where_readiness_goes_and_when(tmp_path):
    read_end, write_end = os.pipe()
    argv = ["fdlaunch-notify-wait", "-v", f"--fd={write_end}", "--", *READY]
    with open(tmp_path / "stderr", "w+") as err:
        program = subprocess.Popen(argv, pass_fds=(write_end,), stderr=err, env={"PATH": os.environ["PATH"], "TMPDIR": str(tmp_path)})
        os.close(write_end)
        try:
            with os.fdopen(read_end, "rb") as notification:
                assert notification.read() == b"\n"
            assert program.wait(TIMEOUT) == 0
        finally:
            program.kill()
            program.wait()
        # the watcher's last line comes from another process: read until it is there, bounded
        for _ in range(100):
            err.seek(0)
            lines = info_lines(err.read(), "fdlaunch-notify-wait (watcher)")  # the forked watcher names itself
            if len(lines) == 2:
                break
            time.sleep(0.05)
    assert lines[0] == f"watching pid {program.pid}; once it is ready: a newline on fd {write_end}"
    match = re.fullmatch(rf"pid {program.pid} ready after (\d+\.\d{{3}}) seconds; did: a newline on fd {write_end}", lines[1])
    assert match and 0.2 <= float(match[1]) < TIMEOUT, lines


def test_notify_wait_fork_mode_verbose(tmp_path):
    done = run(["fdlaunch-notify-wait", "-v", "--fork", "--", *READY], env={"PATH": os.environ["PATH"], "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout)
    lines = info_lines(done.stderr, "fdlaunch-notify-wait")
    assert lines[0] == f"watching pid {pid}; once it is ready: no relay (no --fd, --forward, --touch, --command or --stop)"
    assert re.fullmatch(rf"pid {pid} ready after \d+\.\d{{3}} seconds; did: no relay .*", lines[1])
    assert len(lines) == 2


def test_notify_wait_is_quiet_without_v(tmp_path):
    done = run(["fdlaunch-notify-wait", "--fork", "--", *READY], env={"PATH": os.environ["PATH"], "TMPDIR": str(tmp_path)})
    assert done.returncode == 0 and done.stderr == ""


def test_notify_says_what_it_sent(tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(path)
        receiver.settimeout(TIMEOUT)
        done = run(
            ["fdlaunch-notify", "-v", "--no-block", "READY=1", "STATUS=up and running"],
            env={"PATH": os.environ["PATH"], "NOTIFY_SOCKET": path},
        )
        assert done.returncode == 0, done.stderr
        assert receiver.recv(4096) == b"READY=1\nSTATUS=up and running"
        assert done.stderr == f"fdlaunch-notify: info: sent 'READY=1\\nSTATUS=up and running' to {path!r}\n"
        done = run(["fdlaunch-notify", "--no-block", "READY=1"], env={"PATH": os.environ["PATH"], "NOTIFY_SOCKET": path})
        assert done.returncode == 0 and done.stderr == ""


LISTEN = ["fdlaunch-listen", "--map", "-udp:label=dns:127.0.0.1:0", "-tcp:label=web,fd=7:127.0.0.1:0", "--"]


@pytest.mark.parametrize(
    "mode, expected",
    [
        (["--systemd"], ["fd 3 (dns) stays at fd 3", "fd 7 (web) moved to fd 4"]),
        (["--systemd", "--order=web"], ["fd 3 (dns) closed: not in --order", "fd 7 (web) moved to fd 3"]),
        (["--map"], ["LISTEN_FD_MAP=dns=3,web=7"]),
        (["--vars=K_"], ["K_DNS=3", "K_WEB=7"]),
        (["--subst"], ["arguments now ['-S', '3']"]),
        (["--stdin=web"], ["fd 7 (web) on fd 0 and fd 1", "fd 3 (dns) closed"]),
    ],
)
def test_fdmap_says_what_it_moved(mode, expected):
    done = run([*LISTEN, "fdlaunch-fdmap", "-v", *mode, "--", "true", "-S", "{dns}"])
    assert done.returncode == 0, done.stderr
    assert info_lines(done.stderr, "fdlaunch-fdmap") == expected
    quiet = run([*LISTEN, "fdlaunch-fdmap", *mode, "--", "true", "-S", "{dns}"])
    assert quiet.returncode == 0 and quiet.stderr == ""
