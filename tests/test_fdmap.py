"""fdlaunch-fdmap and fdlaunch.listen_sockets(): every launcher with every kind of daemon."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import TIMEOUT, free_port, python_systemd, require, run, sockets

import fdlaunch

# What python-systemd and fdlaunch.listen_sockets() each see, as {fd: label}.
BOTH_READERS = """
import json, os, socket
from systemd import daemon
theirs = {str(fd): name for fd, name in daemon.listen_fds_with_names(unset_environment=False).items()}
import fdlaunch
found = fdlaunch.listen_sockets(unset_environment=False)
ours = {str(s.fileno()): label for label, group in found.items() for s in group}
kinds = {str(s.fileno()): [s.family.name, s.type.name, s.get_inheritable()] for group in found.values() for s in group}
print(json.dumps({"theirs": theirs, "ours": ours, "kinds": kinds}))
"""


def readers_env():
    """Debian's python (with python-systemd) must import this checkout's fdlaunch too."""
    return {"PATH": os.environ["PATH"], "PYTHONPATH": os.path.dirname(os.path.dirname(fdlaunch.__file__))}


def both_readers(launcher, **kwargs):
    done = run([*launcher, python_systemd(), "-c", BOTH_READERS], env=readers_env(), **kwargs)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


LAYOUTS = {
    "one socket": ["fdlaunch-listen", "-tcp:127.0.0.1:0", "--"],
    "labels, repeated": ["fdlaunch-listen", "-udp:label=dns:127.0.0.1:0", "-tcp:label=dns:127.0.0.1:0", "-unix:label=ctl:@fdl-agree", "--"],
    "stacked": ["fdlaunch-listen", "-tcp:label=a:127.0.0.1:0", "--", "fdlaunch-listen", "-udp:label=b:127.0.0.1:0", "--"],
    "map then systemd": [
        "fdlaunch-listen",
        "--map",
        "-tcp:fd=9,label=x:127.0.0.1:0",
        "-udp:label=y:127.0.0.1:0",
        "--",
        "fdlaunch-fdmap",
        "--systemd",
        "--",
    ],
    "reordered": [
        "fdlaunch-listen",
        "-udp:label=one:127.0.0.1:0",
        "-tcp:label=two:127.0.0.1:0",
        "--",
        "fdlaunch-fdmap",
        "--systemd",
        "--order=two,one",
        "--",
    ],
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_listen_sockets_agrees_with_python_systemd(layout):
    seen = both_readers(LAYOUTS[layout])
    assert seen["ours"] == seen["theirs"] and seen["ours"]
    assert all(not inheritable for _, _, inheritable in seen["kinds"].values())


def test_python_systemd_sees_the_chosen_order_after_map_mode_with_fd_3_taken():
    """fd 3 is s6's notification pipe: fdlaunch-listen --map leaves it alone,
    fdlaunch-notify-wait --fd=3 takes it out of the chain, and fdlaunch-fdmap
    --systemd can then use fds 3.. in the order asked for."""
    read_end, write_end = os.pipe()
    launcher = [
        "fdlaunch-listen",
        "--map",
        "-udp:label=dns:127.0.0.1:0",
        "-tcp:label=web:127.0.0.1:0",
        "-tcp:label=dns:127.0.0.1:0",
        "--",
        "fdlaunch-notify-wait",
        "--fd=3",
        "--",
        "fdlaunch-fdmap",
        "--systemd",
        "--order=web,dns",
        "--",
    ]
    try:
        seen = both_readers(launcher, preexec_fn=lambda: os.dup2(write_end, 3), pass_fds=(3,))
    finally:
        os.close(read_end)
        os.close(write_end)
    assert seen["theirs"] == {"3": "web", "4": "dns", "5": "dns"}
    assert [seen["kinds"][fd][1] for fd in ("3", "4", "5")] == ["SOCK_STREAM", "SOCK_DGRAM", "SOCK_STREAM"]


def test_order_drops_what_it_does_not_name(probe):
    done, report = probe(
        ["fdlaunch-listen", "-udp:label=a:127.0.0.1:0", "-tcp:label=b:127.0.0.1:0", "--", "fdlaunch-fdmap", "--systemd", "--order=b", "--"]
    )
    assert done.returncode == 0, done.stderr
    assert list(sockets(report)) == [3] and sockets(report)[3]["type"] == "SOCK_STREAM"
    env = report["env"]
    assert (env["LISTEN_FDS"], env["LISTEN_FDNAMES"], env["LISTEN_FD_MAP"], env["LISTEN_PID"]) == ("1", "b", "b=3", str(report["pid"]))


def test_systemd_socket_activate_then_fdmap_map(probe):
    activate = require("systemd-socket-activate")
    port = free_port()
    launcher = subprocess.Popen(
        [activate, "-l", f"127.0.0.1:{port}", "--fdname=http", "fdlaunch-fdmap", "--map", "--", sys.executable, "-c", SERVE_ONE],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        client = connect(port)
        client.sendall(b"hello")
        assert client.recv(100) == b"LISTEN_FD_MAP=http=3 got hello"
        assert launcher.wait(TIMEOUT) == 0
    finally:
        launcher.kill()
        launcher.wait()


# A map-reading daemon: finds its socket by LISTEN_FD_MAP alone, answers one client.
SERVE_ONE = """
import os, socket
label, fd = os.environ["LISTEN_FD_MAP"].split("=")
listener = socket.socket(fileno=int(fd))
client, _ = listener.accept()
client.sendall(f"LISTEN_FD_MAP={os.environ['LISTEN_FD_MAP']} got ".encode() + client.recv(100))
"""


def connect(port, seconds=10):
    deadline = time.monotonic() + seconds
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def test_vars(probe):
    done, report = probe(
        [
            "fdlaunch-listen",
            "-udp:label=dns:127.0.0.1:0",
            "-tcp:label=dns:127.0.0.1:0",
            "-tcp:label=my-web.1:127.0.0.1:0",
            "--",
            "fdlaunch-fdmap",
            "--vars",
            "--",
        ]
    )
    assert done.returncode == 0, done.stderr
    assert (report["env"]["FD_DNS"], report["env"]["FD_MY_WEB_1"]) == ("3,4", "5")
    done, report = probe(["fdlaunch-listen", "-udp:label=dns:127.0.0.1:0", "--", "fdlaunch-fdmap", "--vars=KRESD_", "--"])
    assert report["env"]["KRESD_DNS"] == "3" and "FD_DNS" not in report["env"]


def test_stdin_gives_inetd_style_stdio():
    port = free_port()
    serve = (
        "import socket; s = socket.socket(fileno=0); c, _ = s.accept(); c.sendall(str(socket.socket(fileno=1).getsockname()[1]).encode())"
    )
    child = subprocess.Popen(
        [
            "fdlaunch-listen",
            f"-tcp:label=web:127.0.0.1:{port}",
            "-udp:label=other:127.0.0.1:0",
            "--",
            "fdlaunch-fdmap",
            "--stdin=web",
            "--",
            sys.executable,
            "-c",
            serve,
        ]
    )
    try:
        assert connect(port).recv(100) == str(port).encode()
        assert child.wait(TIMEOUT) == 0
    finally:
        child.kill()
        child.wait()


def test_stdin_leaves_no_other_socket_and_no_variables():
    report = (
        "import os, socket, sys; fds = sorted(int(f) for f in os.listdir('/proc/self/fd'))[:-1];"
        "kinds = [socket.socket(fileno=f).type.name for f in (0, 1)];"
        "print(fds, kinds, sorted(k for k in os.environ if k.startswith('LISTEN')), file=sys.stderr)"
    )
    launcher = ["fdlaunch-listen", "-tcp:label=web:127.0.0.1:0", "-udp:label=x:127.0.0.1:0", "--", "fdlaunch-fdmap", "--stdin=web", "--"]
    done = run([*launcher, sys.executable, "-c", report])
    assert done.returncode == 0, done.stderr
    assert done.stderr == "[0, 1, 2] ['SOCK_STREAM', 'SOCK_STREAM'] []\n"


@pytest.mark.parametrize(
    "argv, extra_env, message",
    [
        (["--systemd", "true"], {"LISTEN_FD_MAP": "web"}, "LISTEN_FD_MAP='web': item 'web' is not LABEL=FD"),
        (["--systemd", "true"], {"LISTEN_FD_MAP": "web=77"}, "names fd 77 (web), which is not open"),
        (
            ["--map", "true"],
            {"LISTEN_FDS": "2", "LISTEN_PID": "PID", "LISTEN_FDNAMES": "a"},
            "LISTEN_FDNAMES='a' has 1 name but LISTEN_FDS=2",
        ),
        (["--map", "true"], {"LISTEN_FDS": "x", "LISTEN_PID": "PID"}, "LISTEN_FDS='x' is not a count"),
        (["--vars=9", "true"], {"LISTEN_FD_MAP": "a=7"}, "gives '9A', which is not a variable name"),
        (["--systemd", "--order=ghost", "true"], {"LISTEN_FD_MAP": "a=7"}, "no socket labelled 'ghost' was passed"),
        (["--stdin=ghost", "true"], {"LISTEN_FD_MAP": "a=7"}, "--stdin='ghost': no socket is labelled 'ghost'"),
        (["--map", "--systemd", "true"], {}, "fdlaunch-fdmap: usage: fdlaunch-fdmap [-v] --systemd [--order=LABELS] [--] PROG [ARGS...]\n"),
        (["--map", "no-such-program-fdl"], {}, "unable to exec no-such-program-fdl"),
    ],
)
def test_fdmap_errors(argv, extra_env, message):
    # fd 7, open on /dev/null, stands in for an open descriptor where the map needs one
    script = f"exec 7</dev/null; exec fdlaunch-fdmap {' '.join(argv)}"
    environ = {"PATH": os.environ["PATH"], **{k: v.replace("PID", "$$") for k, v in extra_env.items()}}
    exports = " ".join(f'{k}="{v}"' for k, v in environ.items() if k != "PATH")
    done = run(["sh", "-c", f"{'export ' + exports + ';' if exports else ''} {script}"], env={"PATH": os.environ["PATH"]})
    assert done.returncode == (127 if "exec" in message else 100), done.stderr
    assert done.stderr.startswith(("fdlaunch-fdmap: fatal: ", "fdlaunch-fdmap: usage: ")) and message in done.stderr
    assert done.stderr.count("\n") == 1


def test_fdmap_refuses_to_overwrite_a_descriptor_it_was_not_handed():
    """A socket mapped at fd 7 must go to fd 3, but fd 3 holds something else."""
    read_end, write_end = os.pipe()
    try:
        done = run(
            ["fdlaunch-listen", "--map", "-tcp:fd=7:127.0.0.1:0", "--", "fdlaunch-fdmap", "--systemd", "--", "true"],
            preexec_fn=lambda: os.dup2(write_end, 3),
            pass_fds=(3,),
        )
    finally:
        os.close(read_end)
        os.close(write_end)
    assert done.returncode == 100
    assert "fd 3 is already open and was not passed in" in done.stderr


# fdlaunch.listen_sockets() in this process: real sockets on real fds, os.environ
# patched, as python-systemd's own tests do; the test after these runs it in a
# program that fdlaunch-listen execs.

PASSING = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "LISTEN_FD_MAP")


@pytest.fixture
def passing(monkeypatch):
    """Set the passing variables in os.environ (any left from the caller removed); the pid is this one."""
    for name in PASSING:
        monkeypatch.delenv(name, raising=False)

    def set_variables(**variables):
        for name, value in variables.items():
            monkeypatch.setenv(name, value.replace("PID", str(os.getpid())))

    return set_variables


@pytest.fixture
def on_fd_3():
    """Put a socket on fd 3 for the systemd convention; whatever fd 3 was is put back after."""
    saved = os.dup(3) if fd_is_open(3) else None

    def place(sock):
        os.dup2(sock.fileno(), 3)
        sock.close()

    yield place
    if saved is None:
        if fd_is_open(3):
            os.close(3)
    else:
        os.dup2(saved, 3)
        os.close(saved)


def fd_is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_listen_sockets_by_the_map_in_process(passing):
    with socket.create_server(("127.0.0.1", 0)) as web, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dns:
        passing(LISTEN_FD_MAP=f"web={web.fileno()},dns={dns.fileno()}", LISTEN_FDS="9", LISTEN_PID="1")
        os.set_inheritable(web.fileno(), True)
        found = fdlaunch.listen_sockets()
        assert {label: [(s.fileno(), s.type) for s in group] for label, group in found.items()} == {
            "web": [(web.fileno(), socket.SOCK_STREAM)],
            "dns": [(dns.fileno(), socket.SOCK_DGRAM)],
        }
        assert not found["web"][0].get_inheritable()
        assert found["web"][0].getsockname() == web.getsockname()
        assert [name for name in PASSING if name in os.environ] == []
        for group in found.values():
            group[0].detach()  # web and dns close their own fds


def test_listen_sockets_keeps_the_variables_when_asked(passing):
    with socket.create_server(("127.0.0.1", 0)) as web:
        passing(LISTEN_FD_MAP=f"web={web.fileno()}")
        found = fdlaunch.listen_sockets(unset_environment=False)
        found["web"][0].detach()
        assert os.environ["LISTEN_FD_MAP"] == f"web={web.fileno()}"


def test_listen_sockets_by_the_systemd_convention_in_process(passing, on_fd_3):
    server = socket.create_server(("127.0.0.1", 0))
    address = server.getsockname()
    on_fd_3(server)
    passing(LISTEN_FDS="1", LISTEN_PID="PID", LISTEN_FDNAMES="http")
    found = fdlaunch.listen_sockets()
    assert [(label, s.fileno(), s.getsockname()) for label, (s,) in found.items()] == [("http", 3, address)]
    found["http"][0].detach()  # on_fd_3 puts fd 3 back


def test_listen_sockets_of_another_pid_are_not_ours(passing):
    passing(LISTEN_FDS="1", LISTEN_PID="1")
    assert fdlaunch.listen_sockets() == {}


@pytest.mark.parametrize(
    "fd_map, reason",
    [
        ("x=0", "item 'x=0' names stdin, stdout or stderr"),
        ("x=y", "item 'x=y' is not LABEL=FD"),
        ("web=SOCKET,pipe=PIPE", "fd PIPE (pipe) is not an open socket"),
    ],
)
def test_listen_sockets_refuses_and_touches_nothing(fd_map, reason, passing):
    read_end, write_end = os.pipe()
    with socket.create_server(("127.0.0.1", 0)) as web:
        numbers = {"SOCKET": str(web.fileno()), "PIPE": str(read_end)}
        for word, number in numbers.items():
            fd_map, reason = fd_map.replace(word, number), reason.replace(word, number)
        passing(LISTEN_FD_MAP=fd_map)
        os.set_inheritable(web.fileno(), True)
        with pytest.raises(ValueError) as refused:
            fdlaunch.listen_sockets()
        assert reason in str(refused.value)
        assert os.environ["LISTEN_FD_MAP"] == fd_map
        # Not closed, not made close-on-exec: the socket read before the pipe was given back untouched.
        assert os.get_inheritable(web.fileno()) and web.getsockname()
        os.fstat(read_end)
    os.close(read_end)
    os.close(write_end)


def test_listen_sockets_unsets_the_variables(probe):
    code = "import os, fdlaunch; found = fdlaunch.listen_sockets(); print(sorted(found), [k for k in os.environ if k.startswith('LISTEN')])"
    done = run(["fdlaunch-listen", "-tcp:label=web:127.0.0.1:0", "--", sys.executable, "-c", code])
    assert done.stdout == "['web'] []\n"


@pytest.mark.parametrize("label, prefix", [("FDS", "LISTEN_"), ("FD_MAP", "LISTEN_"), ("SOCKET", "NOTIFY_")])
def test_vars_never_overwrite_what_the_program_needs(label, prefix):
    done = run(["fdlaunch-listen", f"-tcp:label={label}:127.0.0.1:0", "--", "fdlaunch-fdmap", f"--vars={prefix}", "--", "env"])
    assert done.returncode == 100 and done.stderr.count("\n") == 1
    assert "which the program needs for itself" in done.stderr
