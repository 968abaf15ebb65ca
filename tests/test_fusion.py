"""Fusion (fdlaunch(7), FUSION): a chain of fdlaunch links runs in one interpreter.

The final program must not be able to tell: every chain below runs once
fused and once with FDLAUNCH_FUSE=0 (each link exec'd), and the probe at its
end must see the same descriptors, flags, environment, signals, credentials,
umask, cwd and limits.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PROBE, PYTHON, TIMEOUT, free_port, read_probe, require_python_for_nobody, run

ROOT_ONLY = os.geteuid() != 0
ME = f"{os.getuid()}:{os.getgid()}"

# Each chain of two links that can be chained, in front of the probe.
CHAINS = {
    "listen, setuidgid": ["fdlaunch-listen", "-tcp:127.0.0.1:0", "-unix:@{tag}", "--", "fdlaunch-setuidgid", "nobody", "--"],
    "listen, notify-wait": ["fdlaunch-listen", "-udp:127.0.0.1:0", "--", "fdlaunch-notify-wait", "--"],
    "listen, notify-wait --fork": ["fdlaunch-listen", "-tcp:127.0.0.1:0", "--", "fdlaunch-notify-wait", "--fork", "--"],
    "listen --map, fdmap --systemd": ["fdlaunch-listen", "--map", "-tcp:label=a:127.0.0.1:0", "-udp:label=b:127.0.0.1:0", "--"]
    + ["fdlaunch-fdmap", "--systemd", "--order=b,a", "--"],
    "listen, listen": ["fdlaunch-listen", "-tcp:127.0.0.1:0", "--", "fdlaunch-listen", "-udp:label=dns:127.0.0.1:0", "--"],
    "listen, handoff": ["fdlaunch-listen", "-tcp:127.0.0.1:0", "--", "fdlaunch-handoff", "--"],
    "setuidgid, listen": ["fdlaunch-setuidgid", "--umask=027", "--limit=nofile=512", ME, "--", "fdlaunch-listen", "-tcp:127.0.0.1:0", "--"],
    "setuidgid, notify-wait": ["fdlaunch-setuidgid", "--chdir=/", "nobody", "--", "fdlaunch-notify-wait", "--"],
    "setuidgid, fdmap": ["fdlaunch-setuidgid", ME, "--", "fdlaunch-fdmap", "--map", "--"],
    "notify-wait, setuidgid": ["fdlaunch-notify-wait", "--", "fdlaunch-setuidgid", "nobody", "--"],
    "fdmap, listen": ["fdlaunch-fdmap", "--vars", "--", "fdlaunch-listen", "-tcp:127.0.0.1:0", "--"],
    "handoff, setuidgid": ["fdlaunch-handoff", "--", "fdlaunch-setuidgid", "nobody", "--"],
    "handoff, listen": ["fdlaunch-handoff", "--", "fdlaunch-listen", "-tcp:127.0.0.1:0", "--"],
    "notify-wait --fork, listen": ["fdlaunch-notify-wait", "--fork", "--", "fdlaunch-listen", "-udp:127.0.0.1:0", "--"],
    "listen, setuidgid, notify-wait": ["fdlaunch-listen", "-tcp:127.0.0.1:0", "--", "fdlaunch-setuidgid", "nobody", "--"]
    + ["fdlaunch-notify-wait", "--"],
    "init, listen": ["fdlaunch-init", "--", "fdlaunch-listen", "-tcp:127.0.0.1:0", "-unix:@{tag}", "--"],
    "listen, setuidgid, init": ["fdlaunch-listen", "-tcp:127.0.0.1:0", "--", "fdlaunch-setuidgid", "nobody", "--", "fdlaunch-init", "--"],
    "listen, adopt": ["fdlaunch-listen", "-tcp:127.0.0.1:0", "-udp:127.0.0.1:0", "--", "fdlaunch-adopt", "--"],
    "listen, setuidgid, adopt": ["fdlaunch-listen", "-tcp:127.0.0.1:0", "--", "fdlaunch-setuidgid", "nobody", "--", "fdlaunch-adopt", "--"],
    "handoff, adopt": ["fdlaunch-handoff", "--", "fdlaunch-adopt", "--"],
}


def normalized(report):
    """What may differ between two runs of the same chain: pids and port numbers."""
    pid = report.pop("pid")
    report.pop("ppid")
    env = report["env"]
    if env.get("LISTEN_PID") == str(pid):
        env["LISTEN_PID"] = "<pid>"
    if "NOTIFY_SOCKET" in env:
        env["NOTIFY_SOCKET"] = "<private>"
    for entry in report["fds"].values():
        address = entry.get("address")
        if isinstance(address, list):
            entry["address"] = [address[0], "<port>", *address[2:]]
    return report


def run_chain(argv, tmp_path, name, fuse):
    out = tmp_path / "report.json"
    env = {"PATH": os.environ["PATH"], "TMPDIR": str(tmp_path), "KEEP": "a=b c"}
    if not fuse:
        env["FDLAUNCH_FUSE"] = "0"

    def caller_state():
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})

    done = run([*argv, sys.executable, PROBE, str(out)], env=env, preexec_fn=caller_state, timeout=20)
    report = read_probe(out) if out.exists() else None
    out.unlink(missing_ok=True)
    if report is not None and not fuse:
        assert report["env"].pop("FDLAUNCH_FUSE") == "0"
    return done, report


@pytest.mark.parametrize("chain", CHAINS)
def test_the_program_cannot_tell_a_fused_chain(chain, public):
    argv = [word.replace("{tag}", f"fdl-fusion-{os.getpid()}") for word in CHAINS[chain]]
    if ROOT_ONLY and "fdlaunch-setuidgid" in argv:
        pytest.skip("needs root to change credentials")
    if "nobody" in argv:
        require_python_for_nobody()
    fused, report = run_chain(argv, public, "fused", fuse=True)
    exec_d, expected = run_chain(argv, public, "exec", fuse=False)
    assert (fused.returncode, re.sub(r"pid \d+", "pid N", fused.stderr)) == (exec_d.returncode, re.sub(r"pid \d+", "pid N", exec_d.stderr))
    assert report is not None, fused.stderr
    assert "FDLAUNCH_FUSE" not in report["env"], "fusion is never announced to the program"
    assert normalized(report) == normalized(expected)


def test_a_failing_later_link_speaks_under_its_own_name_and_leaves_nothing(tmp_path):
    path = tmp_path / "app.sock"
    for fuse in (True, False):
        env = {**os.environ, **({} if fuse else {"FDLAUNCH_FUSE": "0"})}
        argv = ["fdlaunch-listen", "-v", f"-unix:{path}", "--", "fdlaunch-fdmap", "--stdin=nosuch", "--", "true"]
        done = run(argv, env=env)
        assert done.returncode == 100
        lines = done.stderr.splitlines()
        assert lines[0].startswith("fdlaunch-listen: info: fd 3: unix")
        assert lines[1:] == ["fdlaunch-fdmap: fatal: --stdin='nosuch': no socket is labelled 'nosuch'; it needs exactly one"]
        if fuse:
            assert not path.exists(), "the fused chain takes back the socket file its first link made"
        path.unlink(missing_ok=True)


def test_the_programs_status_and_exec_errors_are_the_same(tmp_path):
    for fuse in ("1", "0"):
        env = {**os.environ, "FDLAUNCH_FUSE": fuse}
        done = run(["fdlaunch-listen", "-tcp:127.0.0.1:0", "--", "fdlaunch-fdmap", "--map", "--", "sh", "-c", "exit 7"], env=env)
        assert (done.returncode, done.stderr) == (7, "")
        done = run(["fdlaunch-listen", "-tcp:127.0.0.1:0", "--", "fdlaunch-fdmap", "--map", "--", "no-such-program-x"], env=env)
        assert done.returncode == 127
        assert done.stderr == "fdlaunch-fdmap: fatal: unable to exec no-such-program-x: No such file or directory\n"


def test_a_script_named_like_a_tool_elsewhere_is_execd(tmp_path):
    impostor = tmp_path / "bin" / "fdlaunch-fdmap"
    impostor.parent.mkdir()
    marker = tmp_path / "impostor-ran"
    impostor.write_text(f'#!/bin/sh\necho "$@" > {marker}\n')
    impostor.chmod(0o755)
    # A byte-for-byte copy of our own console script, outside the installation, is not ours either.
    copy = tmp_path / "copy" / "fdlaunch-notify"
    copy.parent.mkdir()
    shutil.copy(shutil.which("fdlaunch-notify"), copy)
    env = {**os.environ, "PATH": f"{impostor.parent}:{os.environ['PATH']}"}
    done = run(["fdlaunch-listen", "-tcp:127.0.0.1:0", "--", "fdlaunch-fdmap", "--map", "--", "true"], env=env)
    assert done.returncode == 0, done.stderr
    assert marker.read_text() == "--map -- true\n"
    done = run(["fdlaunch-fdmap", "--map", "--", str(copy), "--help"])
    assert done.returncode == 0 and done.stdout.startswith("fdlaunch-notify: send one sd_notify message")


def private_installation(base):
    """This installation copied into a venv of the interpreter under test inside a 0700 directory."""
    import docopt

    import fdlaunch

    private = base / "private"
    subprocess.run([PYTHON, "-m", "venv", "--without-pip", str(private / "venv")], check=True, timeout=60)
    site = next((private / "venv" / "lib").glob("python3*/site-packages"))
    for package in (fdlaunch, docopt):
        source = os.path.dirname(package.__file__)
        shutil.copytree(source, site / os.path.basename(source), ignore=shutil.ignore_patterns("__pycache__"))
    bindir = private / "venv" / "bin"
    for tool in ("fdlaunch-listen", "fdlaunch-setuidgid", "fdlaunch-notify-wait", "fdlaunch-fdmap"):
        text = Path(shutil.which(tool)).read_text().split("\n", 1)[1]
        (bindir / tool).write_text(f"#!{bindir / 'python'}\n{text}")
        (bindir / tool).chmod(0o755)
    private.chmod(0o700)
    return bindir


def test_a_chain_goes_on_after_dropping_to_a_user_who_cannot_read_the_interpreter(public):
    require_python_for_nobody(PYTHON)  # the program at the end is run by nobody
    bindir = private_installation(public)
    out = public
    argv = [
        str(bindir / "fdlaunch-listen"), "-tcp:127.0.0.1:0", "--",
        "fdlaunch-setuidgid", "--no-new-privs", "nobody", "--",  # prctl after the drop: nothing left to import
        "fdlaunch-notify-wait", "--",
        "fdlaunch-fdmap", "--map", "--",
        PYTHON, PROBE, str(out / "report.json"),
    ]  # fmt: skip
    env = {"PATH": f"{bindir}:/usr/bin:/bin"}
    done = run(argv, env=env)
    assert done.returncode == 0, done.stderr
    report = read_probe(out / "report.json")
    assert report["uid"] == [65534] * 3
    assert [e["type"] for fd, e in report["fds"].items() if fd > 2] == ["SOCK_STREAM"]
    assert report["env"]["LISTEN_FD_MAP"] == "tcp=3"
    # Each link exec'd, nobody may not even reach the next one: 126, as execvp(3) reports EACCES on the way.
    done = run(argv, env={**env, "FDLAUNCH_FUSE": "0"})
    assert done.returncode == 126
    assert done.stderr == "fdlaunch-setuidgid: fatal: unable to exec fdlaunch-notify-wait: Permission denied\n"


def http_get_or_eof(port, seconds=TIMEOUT):
    """Connect until the server accepts, and read to end of file."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=seconds) as client:
                while client.recv(4096):
                    pass
            return
        except ConnectionRefusedError:
            assert time.monotonic() < deadline, f"nothing accepts on {port}"
            time.sleep(0.02)


def test_handoff_stops_an_instance_that_is_a_fused_long_running_tool(public):
    """The instance is fdlaunch-accept run in handoff's child: handoff still acts on SIGTERM at once."""
    port = free_port()
    argv = ["fdlaunch-listen", f"-tcp:127.0.0.1:{port}", "--", "fdlaunch-handoff", "--", "fdlaunch-accept", "-q", "--", "true"]
    handoff = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        http_get_or_eof(port)  # started, and its instance accepting: a connection is served (and closed by true)
        handoff.terminate()
        assert handoff.wait(10) == 0, "accept's status (0 after SIGTERM) is handoff's: " + handoff.stderr.read()
    finally:
        handoff.kill()
        handoff.wait()


def session_processes(sid):
    """{pid: (comm, args)} of each live process of session sid, as ps -o comm,args shows them (ps drops trailing NULs too)."""
    found = {}
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and os.getsid(int(name)) == sid:
                comm = Path(f"/proc/{name}/comm").read_text().rstrip("\n")
                args = Path(f"/proc/{name}/cmdline").read_bytes().rstrip(b"\0").replace(b"\0", b" ").decode()
                if Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    found[int(name)] = (comm, args)
        except OSError:
            continue  # gone meanwhile
    return found


def pgrep(*words):
    return sorted(int(pid) for pid in run(["pgrep", *words]).stdout.split())


def running_chain(port, fuse, drop):
    """listen, setuidgid (if drop), handoff; its instance accept, whose handler chain is fdmap, notify-wait --fork, sleep;
    a client connected. ((comm, args) of the session's processes, with pgrep's answers for each fused tool's name).

    A link after the drop renames itself by prctl(2), one before it through /proc/self (proc.name_self).
    """
    handler = ["fdlaunch-fdmap", "--map", "--", "fdlaunch-notify-wait", "--fork", "--", "sh", "-c", "exec sleep 60"]
    argv = ["fdlaunch-listen", f"-tcp:127.0.0.1:{port}", "--", *(["fdlaunch-setuidgid", "nobody", "--"] if drop else [])]
    argv += ["fdlaunch-handoff", "--", "fdlaunch-accept", "-q", "--grace=1", "--", *handler]
    env = {"PATH": os.environ["PATH"], **({} if fuse else {"FDLAUNCH_FUSE": "0"})}
    chain = subprocess.Popen(argv, env=env, start_new_session=True, stderr=subprocess.PIPE, text=True)
    try:
        client = None
        deadline = time.monotonic() + 20
        while not any(comm == "sleep" for comm, _ in session_processes(chain.pid).values()):
            ended = chain.poll() is not None
            assert time.monotonic() < deadline and not ended, f"the handler never ran: {chain.stderr.read() if ended else ''}"
            if client is None:
                try:
                    client = socket.create_connection(("127.0.0.1", port), timeout=5)
                except ConnectionRefusedError:
                    time.sleep(0.05)
                    continue
            time.sleep(0.05)
        session = str(chain.pid)
        found = {name: pgrep("-s", session, "-x", name[:15]) for name in ("fdlaunch-handoff", "fdlaunch-accept", "fdlaunch-notify-wait")}
        found.update({f"-f {name}": pgrep("-s", session, "-f", f"/{name} ") for name in ("fdlaunch-handoff", "fdlaunch-accept")})
        return sorted(session_processes(chain.pid).values()), found
    finally:
        if client is not None:
            client.close()
        chain.terminate()
        try:
            assert chain.wait(20) == 128 + signal.SIGTERM or chain.returncode == 0, chain.stderr.read()
        finally:
            deadline = time.monotonic() + 5
            while (left := session_processes(chain.pid)) and time.monotonic() < deadline:
                time.sleep(0.05)  # what the stop ended may take a moment to be gone
            for pid in left:
                os.kill(pid, signal.SIGKILL)
            chain.wait()
            assert not left, f"left running: {left}"


@pytest.mark.parametrize("drop", [True, False], ids=["after setuidgid", "as root"])
def test_ps_and_pgrep_see_each_fused_link_as_its_own_tool(drop):
    """comm (what pgrep -x matches, 15 bytes) and the command line (ps -o args, pgrep -f) are what an exec would give."""
    if drop:
        require_python_for_nobody()
    fused, fused_found = running_chain(free_port(), fuse=True, drop=drop)
    execd, execd_found = running_chain(free_port(), fuse=False, drop=drop)
    assert [(comm, re.sub(r"127\.0\.0\.1:\d+", "PORT", args)) for comm, args in fused] == [
        (comm, re.sub(r"127\.0\.0\.1:\d+", "PORT", args)) for comm, args in execd
    ]
    names = [comm for comm, _ in fused]
    assert sorted(names) == sorted(["fdlaunch-handof", "fdlaunch-handof", "fdlaunch-accept", "accept (guard)", "fdlaunch-notify", "sleep"])
    handoff_args = next(args for comm, args in fused if comm == "fdlaunch-handof")
    assert handoff_args.split()[1:4] == [shutil.which("fdlaunch-handoff"), "--", "fdlaunch-accept"]
    assert len(fused_found["fdlaunch-handoff"]) == 2, "handoff and its guard"
    assert len(fused_found["fdlaunch-accept"]) == 1 and len(fused_found["fdlaunch-notify-wait"]) == 1
    assert fused_found["-f fdlaunch-handoff"] == fused_found["fdlaunch-handoff"]
    assert len(fused_found["-f fdlaunch-accept"]) == 2, "accept and its guard"
    assert {key: len(pids) for key, pids in fused_found.items()} == {key: len(pids) for key, pids in execd_found.items()}
