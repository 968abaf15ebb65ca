"""The README's commands, as written: the headline chains under a real s6-supervise, the set-up commands."""

import contextlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import HERE, TIMEOUT, python_systemd, require_python_for_nobody, require_root, run, s6_supervised

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
    service = tmp_path / "service"
    service.mkdir()
    (service / "notification-fd").write_text("3\n")
    (service / "run").write_text(f"#!/bin/sh\nexec 2>>{tmp_path / 'log'}\n{run_script}\n")
    (service / "run").chmod(0o755)
    with s6_supervised(service, env={"PATH": os.environ["PATH"]}):
        waited = run(["s6-svwait", "-U", "-t", "15000", str(service)])
        log = (tmp_path / "log").read_text() if (tmp_path / "log").exists() else ""
        assert waited.returncode == 0, f"s6-svwait -U: {waited.stderr}; the service said: {log}"
        up, ready, pid = run(["s6-svstat", "-o", "up,ready,pid", str(service)]).stdout.split()
        assert (up, ready) == ("true", "true"), log
        yield int(pid)


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
    require_python_for_nobody()
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


@pytest.mark.parametrize("tool", ["fdlaunch-notify-wait", "fdlaunch-handoff", "fdlaunch-accept", "fdlaunch-foreground"])
@pytest.mark.parametrize("convention", ["LISTEN_FDS", "LISTEN_FD_MAP"])
def test_fd_option_refuses_a_passed_socket(tool, convention, tmp_path):
    """Outside s6, fd 3 of the old headline chain is the UDP socket: not a notification fd."""
    listen = ["fdlaunch-listen", *(["--map"] if convention == "LISTEN_FD_MAP" else []), "-udp:127.0.0.1:0", "-tcp:127.0.0.1:0", "--"]
    done = run([*listen, tool, "--fd=3", "--", "true"], env={"PATH": os.environ["PATH"], "TMPDIR": str(tmp_path)})
    assert done.returncode == 100, done.stderr
    if convention == "LISTEN_FDS":  # put on fd 3 over what was there: --map would have left it alone
        assert done.stderr == (
            f"{tool}: fatal: --fd='3': fd 3 is the socket labelled 'udp' passed in LISTEN_FDS/LISTEN_FD_MAP, "
            "not a notification fd; under s6 start the chain with fdlaunch-listen --map, which leaves fd 3 alone\n"
        )
    else:  # --map put it there because fd 3 was free: nobody gave one (the chain was started by hand)
        assert done.stderr == (
            f"{tool}: fatal: --fd='3': fd 3 is the socket labelled 'udp' of LISTEN_FD_MAP, not a notification fd: fd 3 was"
            " not open when that socket was put on a free fd, so no supervisor gave one (s6-supervise opens it for a service"
            " whose notification-fd file says 3); started by hand, give it one: 3>&1\n"
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


def set_up_commands():
    """The README's first two code blocks: install and run the demo, install and run the tests."""
    demo, suite = indented_blocks(README.read_text())[:2]
    assert demo.endswith("&& make demo") and suite.endswith("&& make test")
    return demo, suite


def fake_bin(directory, sudo):
    """A PATH with apt-get and make that only write down how they were called, id, and sudo if asked."""
    directory.mkdir()
    os.chmod(directory, 0o755)
    log = directory.parent / "calls"
    for name in ("apt-get", "make"):
        (directory / name).write_text(f'#!/bin/sh\necho "$(id -u) {name} $*" >> {log}\n')
    if sudo:  # a sudo that can only say what it was asked: as nobody, it stays nobody
        (directory / "sudo").write_text(f'#!/bin/sh\necho "sudo $*" >> {log}\nexec "$@"\n')
    os.symlink(shutil.which("id"), directory / "id")
    for tool in directory.iterdir():
        if not tool.is_symlink():
            tool.chmod(0o755)
    return log


@pytest.mark.parametrize("shell", ["sh", "bash"])
@pytest.mark.parametrize("which", [0, 1])
def test_set_up_commands_work_as_root_without_sudo(which, shell, tmp_path):
    require_root()
    command = set_up_commands()[which]
    assert not command.startswith("sudo ")
    log = fake_bin(tmp_path / "bin", sudo=False)
    done = run([shutil.which(shell), "-c", command], env={"PATH": str(tmp_path / "bin")})
    assert done.returncode == 0, done.stderr
    packages = command.split("apt-get install -y ", 1)[1].split(" && ")[0]
    target = command.rsplit(" ", 1)[1]
    assert log.read_text() == f"0 apt-get install -y {packages}\n0 make {target}\n"


@pytest.mark.parametrize("which", [0, 1])
def test_set_up_commands_use_sudo_as_a_user(which):
    require_root()
    command = set_up_commands()[which]
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="fdlaunch-") as path:  # pytest's tmp_path is 0700
        os.chmod(path, 0o777)
        calls = run_as_nobody_with_sudo(command, Path(path))
    packages = command.split("apt-get install -y ", 1)[1].split(" && ")[0]
    target = command.rsplit(" ", 1)[1]
    assert calls == f"sudo apt-get install -y {packages}\n65534 apt-get install -y {packages}\n65534 make {target}\n"


def run_as_nobody_with_sudo(command, tmp_path):
    log = fake_bin(tmp_path / "bin", sudo=True)
    done = run(["fdlaunch-setuidgid", "nobody", "sh", "-c", command], env={"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr
    return log.read_text()


def test_ci_runs_the_readme_test_command():
    """.ci/run installs at least what the README's test command installs, then runs the same make test."""
    suite = set_up_commands()[1]
    ci = (README.parent / ".ci" / "run").read_text()
    readme_packages = set(suite.split("apt-get install -y ", 1)[1].split(" && ")[0].split())
    ci_install = re.search(r"apt-get install -y -qq --no-install-recommends \\\n\s+(.*?) >/dev/null", ci)[1]
    assert readme_packages <= set(ci_install.split())
    assert ci.rstrip().endswith("\nmake test") and suite.endswith(" && make test")


# The Debian package of every program the tests run that is not ours; those of
# priority required (util-linux, passwd, coreutils) are on every Debian system.
PACKAGE_OF = {
    "nc": "netcat-openbsd",
    "pkill": "procps",
    "ps": "procps",
    "kill": "procps",  # systemd units' ExecReload=/bin/kill
    "s6-supervise": "s6",
    "s6-svwait": "s6",
    "s6-svstat": "s6",
    "s6-svc": "s6",
    "s6-setuidgid": "s6",
    "runsv": "runit",
    "sv": "runit",
    "kresd": "knot-resolver",
    "dnsmasq": "dnsmasq-base",
    "systemd-socket-activate": "systemd",
    "systemd-notify": "systemd",
    "systemctl": "systemd",
    "mandoc": "mandoc",
    "ip": "iproute2",
    "ss": "iproute2",
    "setcap": "libcap2-bin",
    "capsh": "libcap2-bin",
    "nginx": "nginx",
    "busybox": "busybox-static",
    "setarch": "util-linux",
    "setpriv": "util-linux",
    "unshare": "util-linux",
    "nsenter": "util-linux",
    "useradd": "passwd",
    "userdel": "passwd",
}
ON_EVERY_DEBIAN = {"util-linux", "passwd", "coreutils"}


def programs_the_tests_require():
    """Every name a test hands to require(), or lists in a `for tool in (...)` it checks."""
    names = set()
    for path in HERE.glob("*.py"):
        text = path.read_text()
        names.update(re.findall(r'require\("([^"]+)"\)', text))
        for listed in re.findall(r"for (?:tool|program) in \(([^)]*)\):", text):
            names.update(re.findall(r'"([^"]+)"', listed))
    return {name for name in names if not name.startswith("fdlaunch-")}


def test_the_test_command_installs_every_program_the_tests_run():
    """A peer the README's command does not install makes its test skip, 'X is not installed (.ci/run installs it)'."""
    packages = set(set_up_commands()[1].split("apt-get install -y ", 1)[1].split(" && ")[0].split())
    assert programs_the_tests_require() <= set(PACKAGE_OF)
    assert {package for package in PACKAGE_OF.values() if package not in ON_EVERY_DEBIAN} <= packages
    if shutil.which("dpkg") is None:
        return
    paths = {}
    for program in PACKAGE_OF:
        path = shutil.which(program, path="/usr/sbin:/usr/bin:/sbin:/bin")
        if path is not None:
            found = {path, os.path.realpath(path)}  # through /etc/alternatives; dpkg may know either as /bin (merged /usr)
            paths[program] = found | {re.sub(r"^/usr/(s?bin)/", r"/\1/", candidate) for candidate in found}
    listed = run(["dpkg", "-S", *sorted(set().union(*paths.values()))]).stdout  # it says nothing of a path no package has
    owner = {path: package for package, path in re.findall(r"^(\S+): (\S+)$", listed, re.M)}
    for program, found in paths.items():
        assert PACKAGE_OF[program] in {owner.get(path) for path in found}, (program, found)
