"""fdlaunch-listen end to end: the installed script, real sockets, real exec."""

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PROBE, TIMEOUT, free_port, probe_argv, read_probe, require_python_for_nobody, require_root, run, sockets

FAMILY = {4: "AF_INET", 6: "AF_INET6", "unix": "AF_UNIX"}


@pytest.mark.parametrize(
    "spec_text, family, kind, listening, address",
    [
        ("-tcp:127.0.0.1:0", "AF_INET", "SOCK_STREAM", True, "127.0.0.1"),
        ("-tcp::127.0.0.1:0", "AF_INET", "SOCK_STREAM", True, "127.0.0.1"),
        ("-tcp4::0", "AF_INET", "SOCK_STREAM", True, "0.0.0.0"),
        ("-tcp6::0", "AF_INET6", "SOCK_STREAM", True, "::"),
        ("-tcp:[::1]:0", "AF_INET6", "SOCK_STREAM", True, "::1"),
        ("-tcp:localhost:0", None, "SOCK_STREAM", True, None),
        ("-udp:127.0.0.1:0", "AF_INET", "SOCK_DGRAM", False, "127.0.0.1"),
        ("-udp4::0", "AF_INET", "SOCK_DGRAM", False, "0.0.0.0"),
        ("-udp6::0", "AF_INET6", "SOCK_DGRAM", False, "::"),
        ("-unix-dgram:@fdlaunch-test-dgram", "AF_UNIX", "SOCK_DGRAM", False, "@fdlaunch-test-dgram"),
        ("-unix:@fdlaunch-test-stream", "AF_UNIX", "SOCK_STREAM", True, "@fdlaunch-test-stream"),
        ("-unix-seqpacket:@fdlaunch-test-seq", "AF_UNIX", "SOCK_SEQPACKET", True, "@fdlaunch-test-seq"),
    ],
)
def test_every_protocol(probe, spec_text, family, kind, listening, address):
    done, report = probe(["fdlaunch-listen", spec_text, "--"])
    assert done.returncode == 0, done.stderr
    passed = sockets(report)
    assert list(passed) == [3]
    socket3 = passed[3]
    assert socket3["type"] == kind
    assert socket3["listening"] is listening
    assert not socket3["cloexec"]
    if family:
        assert socket3["family"] == family
    if address:
        assert (socket3["address"] if family == "AF_UNIX" else socket3["address"][0]) == address


def test_unix_path_protocols(probe, tmp_path):
    paths = [tmp_path / name for name in ("s", "d", "q")]
    done, report = probe(["fdlaunch-listen", f"-unix:{paths[0]}", f"-unix-dgram::{paths[1]}", f"-unix-seqpacket:{paths[2]}"])
    assert done.returncode == 0, done.stderr
    found = sockets(report)
    assert [(found[fd]["type"], found[fd]["address"]) for fd in (3, 4, 5)] == [
        ("SOCK_STREAM", str(paths[0])),
        ("SOCK_DGRAM", str(paths[1])),
        ("SOCK_SEQPACKET", str(paths[2])),
    ]
    assert report["env"]["LISTEN_FDNAMES"] == "unix:unix-dgram:unix-seqpacket"


def test_wildcard_is_dual_stack_and_v6only_is_explicit(probe):
    done, report = probe(["fdlaunch-listen", "-tcp::0", "-udp:v6only:0", "-tcp6::0"])
    assert done.returncode == 0, done.stderr
    found = sockets(report)
    assert [(found[fd]["family"], found[fd]["v6only"]) for fd in (3, 4, 5)] == [("AF_INET6", 0), ("AF_INET6", 1), ("AF_INET6", 1)]


def test_both_conventions_by_default(probe):
    done, report = probe(["fdlaunch-listen", "-udp:127.0.0.1:0", "-tcp:127.0.0.1:0", "-tcp:label=tls:127.0.0.1:0", "--"])
    assert done.returncode == 0, done.stderr
    env = report["env"]
    assert env["LISTEN_FDS"] == "3"
    assert env["LISTEN_PID"] == str(report["pid"])
    assert env["LISTEN_FDNAMES"] == "udp:tcp:tls"
    assert env["LISTEN_FD_MAP"] == "udp=3,tcp=4,tls=5"
    assert sorted(sockets(report)) == [3, 4, 5]


def test_the_program_keeps_the_pid(tmp_path):
    out = tmp_path / "probe.json"
    child = subprocess.Popen(["fdlaunch-listen", "-tcp:127.0.0.1:0", *probe_argv(out)])
    assert child.wait(TIMEOUT) == 0
    assert read_probe(out)["pid"] == child.pid


def test_without_the_double_dash(probe):
    """The first word that is not a spec starts the program: its argv is its own, fd 3 is the one UDP socket."""
    port = free_port(socket.SOCK_DGRAM)
    done, report = probe(["fdlaunch-listen", f"-udp:127.0.0.1:{port}"])
    assert done.returncode == 0, done.stderr
    assert report["argv"] == [PROBE, "-"]
    assert sorted(report["fds"]) == [0, 1, 2, 3]
    udp = report["fds"][3]
    assert (udp["family"], udp["type"], udp["address"], udp["listening"], udp["cloexec"]) == (
        "AF_INET",
        "SOCK_DGRAM",
        ["127.0.0.1", port],
        False,
        False,
    )
    passing = {name: report["env"].get(name) for name in ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_FD_MAP", "LISTEN_PID")}
    assert passing == {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "udp", "LISTEN_FD_MAP": "udp=3", "LISTEN_PID": str(report["pid"])}


def test_program_options_are_not_ours(tmp_path):
    done = run(["fdlaunch-listen", "-tcp:127.0.0.1:0", "--", "sh", "-c", 'echo "$0 $1 $LISTEN_FDS"', "-v", "--map"])
    assert done.returncode == 0, done.stderr
    assert done.stdout == "-v --map 1\n"


class PipeAtFd3:
    """A pipe whose read end the child gets at fd 3, as s6 gives a notification fd.

    The pipe is put at fd 3 in the child only (preexec_fn), since this
    process's own fd 3 may belong to pytest.
    """

    def __enter__(self):
        self.ends = os.pipe()
        return {"preexec_fn": lambda: os.dup2(self.ends[0], 3), "pass_fds": (3,)}

    def __exit__(self, *exc):
        for fd in self.ends:
            os.close(fd)


def test_default_mode_refuses_an_open_fd_3(probe):
    with PipeAtFd3() as fd3:
        done, report = probe(["fdlaunch-listen", "-tcp:127.0.0.1:0"], **fd3)
    assert done.returncode == 100
    assert report is None
    assert done.stderr.startswith("fdlaunch-listen: fatal: fd 3 is already open")
    assert "--map" in done.stderr and done.stderr.count("\n") == 1


def test_map_mode_leaves_open_fds_alone(probe):
    with PipeAtFd3() as fd3:
        done, report = probe(["fdlaunch-listen", "--map", "-tcp:127.0.0.1:0", "-udp:fd=9:127.0.0.1:0"], **fd3)
    assert done.returncode == 0, done.stderr
    assert report["fds"][3]["kind"] == "fifo"
    assert report["env"]["LISTEN_FD_MAP"] == "tcp=4,udp=9"
    assert "LISTEN_FDS" not in report["env"] and "LISTEN_PID" not in report["env"]
    found = sockets(report)
    assert (found[4]["type"], found[9]["type"]) == ("SOCK_STREAM", "SOCK_DGRAM")


def test_fd_option_reorders_the_systemd_slots(probe):
    done, report = probe(["fdlaunch-listen", "-udp:127.0.0.1:0", "-tcp:fd=3:127.0.0.1:0"])
    assert done.returncode == 0, done.stderr
    assert report["env"]["LISTEN_FD_MAP"] == "tcp=3,udp=4"
    assert sockets(report)[3]["type"] == "SOCK_STREAM"


def test_var_exports_the_fd_number(probe):
    done, report = probe(["fdlaunch-listen", "--map", "-udp:var=DNS_UDP:127.0.0.1:0", "-tcp:var=DNS_TCP,fd=12:127.0.0.1:0"])
    assert done.returncode == 0, done.stderr
    assert (report["env"]["DNS_UDP"], report["env"]["DNS_TCP"]) == ("3", "12")


def test_stacking_two_fdlaunch_listens(probe):
    done, report = probe(["fdlaunch-listen", "-tcp:label=http:127.0.0.1:0", "--", "fdlaunch-listen", "-tcp:label=https:127.0.0.1:0", "--"])
    assert done.returncode == 0, done.stderr
    assert report["env"]["LISTEN_FDNAMES"] == "http:https"
    assert report["env"]["LISTEN_FD_MAP"] == "http=3,https=4"
    assert sorted(sockets(report)) == [3, 4]


def test_stacking_on_a_map(probe):
    done, report = probe(["fdlaunch-listen", "--map", "-tcp:label=a,fd=7:127.0.0.1:0", "--", "fdlaunch-listen", "-udp:127.0.0.1:0", "--"])
    assert done.returncode == 0, done.stderr
    # the default mode moves the mapped socket into the systemd slots
    assert report["env"]["LISTEN_FD_MAP"] == "a=3,udp=4"
    assert sorted(sockets(report)) == [3, 4]


def test_environment_is_passed_untouched_but_for_ours(probe):
    caller = {"PATH": os.environ["PATH"], "WEIRD": "a=b c\t\u00e9", "LISTEN_PID": "1", "LISTEN_PIDFDID": "77", "EMPTY": ""}
    done, report = probe(["fdlaunch-listen", "-tcp:127.0.0.1:0"], env=caller)
    assert done.returncode == 0, done.stderr
    env = report["env"]
    ours = {"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "LISTEN_FD_MAP"}
    assert {k: v for k, v in env.items() if k not in ours} == {"PATH": caller["PATH"], "WEIRD": caller["WEIRD"], "EMPTY": ""}


def test_no_descriptor_leaks(probe):
    done, report = probe(["fdlaunch-listen", "-tcp:127.0.0.1:0", "-udp:127.0.0.1:0", "-unix:@fdlaunch-leak"])
    assert done.returncode == 0, done.stderr
    assert sorted(report["fds"]) == [0, 1, 2, 3, 4, 5]


def status_of(done):
    fields = dict(line.split(":\t", 1) for line in done.stdout.splitlines() if ":\t" in line)
    return {key: int(fields[key].strip(), 16) for key in ("SigIgn", "SigBlk")}


def bit(number):
    return 1 << (number - 1)


def test_signal_dispositions_and_mask():
    """SIGPIPE and SIGXFSZ back to default; the caller's ignored set and mask kept."""

    def caller_state():
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})

    # cat, not the Python probe: Python ignores SIGPIPE itself at start-up
    done = run(["fdlaunch-listen", "-tcp:127.0.0.1:0", "cat", "/proc/self/status"], preexec_fn=caller_state)
    assert done.returncode == 0, done.stderr
    state = status_of(done)
    assert not state["SigIgn"] & bit(signal.SIGPIPE)
    assert not state["SigIgn"] & bit(signal.SIGXFSZ)
    assert state["SigIgn"] & bit(signal.SIGHUP)
    assert state["SigBlk"] == bit(signal.SIGUSR1)


def test_verbose_names_the_real_port(probe):
    done, report = probe(["fdlaunch-listen", "-v", "-tcp:label=web:127.0.0.1:0", "-unix:@fdlaunch-verbose"])
    assert done.returncode == 0
    port = sockets(report)[3]["address"][1]
    assert done.stderr.splitlines() == [
        f"fdlaunch-listen: info: fd 3: 127.0.0.1:{port}/tcp, label web",
        "fdlaunch-listen: info: fd 4: unix @fdlaunch-verbose, label unix",
    ]


def test_dry_run_binds_nothing(tmp_path):
    path = tmp_path / "dry.sock"
    port = free_port()
    done = run(["fdlaunch-listen", "--dry-run", f"-tcp:127.0.0.1:{port}", f"-unix:var=CTL:{path}", "--", "sh", "-x"])
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == [f"fd 3: 127.0.0.1:{port}/tcp, label tcp", f"fd 4: unix {path}, label unix"]
    assert "CTL=4" in lines and "LISTEN_FD_MAP=tcp=3,unix=4" in lines
    assert lines[-1] == "exec sh -x"
    assert not path.exists()
    with socket.create_server(("127.0.0.1", port)):
        pass  # the port was never taken
    bad = run(["fdlaunch-listen", "--dry-run", "-tcp:nope:80"])
    assert bad.returncode == 100


def blocked_in(pid, kernel_function):
    """Whether pid sleeps in the kernel in kernel_function (proc(5), wchan): 'poll', 'pipe_write'."""
    try:
        return kernel_function in Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return False


DRY_RUN_FAILURES = [
    (
        ["-unix:{tmp}/none/x.sock", "--", "true"],
        111,
        "unable to bind {tmp}/none/x.sock: directory {tmp}/none does not exist (the mkdir option makes it)",
    ),
    (["-unix:/etc/passwd/x.sock", "--", "true"], 111, "unable to open directory /etc/passwd: Not a directory"),
    (["-tcp:127.0.0.1:0", "--", "no-such-program-fdl"], 127, "unable to exec no-such-program-fdl: No such file or directory"),
    (["-tcp:web:8080", "--", "true"], 100, "web:8080/tcp: host 'web' not found; if 'web' is a label: -tcp:label=web:8080"),
]


@pytest.mark.parametrize(("argv", "status", "message"), DRY_RUN_FAILURES)
def test_dry_run_fails_as_the_real_run_would(argv, status, message, tmp_path):
    """What can be known without binding or running anything is checked: the same line, the same status."""
    argv = [word.format(tmp=tmp_path) for word in argv]
    dry = run(["fdlaunch-listen", "--dry-run", *argv])
    real = run(["fdlaunch-listen", *argv])
    assert (dry.returncode, dry.stdout) == (status, "")
    assert dry.stderr == real.stderr == f"fdlaunch-listen: fatal: {message.format(tmp=tmp_path)}\n"
    assert real.returncode == status


def test_a_privileged_port_refused_says_how_to_get_it(tmp_path):
    """As a user without CAP_NET_BIND_SERVICE: root binds and drops after, or the user keeps the capability; --dry-run knows too."""
    require_root()
    nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--inh-caps=-all", "--"]
    hint = (
        "fdlaunch-listen: fatal: unable to bind 127.0.0.1:443/tcp: Permission denied (ports below 1024 need root or"
        " CAP_NET_BIND_SERVICE: bind as root and drop privileges after, fdlaunch-listen -tcp::443 -- fdlaunch-setuidgid USER -- PROG,"
        " or give the user the capability before the bind, fdlaunch-setuidgid --keep-cap=net_bind_service USER -- fdlaunch-listen"
        " -tcp::443 -- PROG)\n"
    )
    for dry in ([], ["--dry-run"]):
        done = run([*nobody, "fdlaunch-listen", *dry, "-tcp:127.0.0.1:443", "--", "true"], cwd=tmp_path)
        assert (done.returncode, done.stderr) == (111, hint), dry
    kept = ["fdlaunch-setuidgid", "--keep-cap=net_bind_service", "nobody", "--", "fdlaunch-listen", "--dry-run", "-tcp:127.0.0.1:443"]
    done = run([*kept, "--", "true"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr


def wait_for(predicate, seconds=5.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("kind", ["tcp", "udp"])
def test_lazy_execs_on_first_client_and_leaves_it_queued(tmp_path, kind):
    port = free_port(socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
    out = tmp_path / "out"
    # The program reports what is waiting on fd 3 without blocking.
    script = (
        "import socket,sys;s=socket.socket(fileno=3);s.setblocking(False);"
        "c=s.accept()[0] if s.type==socket.SOCK_STREAM else None;"
        "open(sys.argv[1],'w').write('accepted' if c else s.recv(100).decode())"
    )
    child = subprocess.Popen(["fdlaunch-listen", "--lazy", f"-{kind}:127.0.0.1:{port}", sys.executable, "-c", script, str(out)])
    try:
        assert wait_for(lambda: blocked_in(child.pid, "poll"), TIMEOUT), "it never waited for a client"
        assert child.poll() is None and not out.exists(), "it ran the program before a client came"
        if kind == "tcp":
            client = socket.create_connection(("127.0.0.1", port))
        else:
            client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            client.sendto(b"first", ("127.0.0.1", port))
        assert child.wait(TIMEOUT) == 0
        assert out.read_text() == ("accepted" if kind == "tcp" else "first")
        client.close()
    finally:
        child.kill()
        child.wait()


def test_a_stop_between_bind_and_exec_removes_the_socket_file(tmp_path):
    # -v writes to a stderr pipe already full: listen blocks there, after the
    # bind and before the exec, until SIGTERM comes.
    path = tmp_path / "stopped.sock"
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    try:
        while True:
            os.write(write_end, b"x" * 4096)
    except BlockingIOError:
        os.set_blocking(write_end, True)
    child = subprocess.Popen(["fdlaunch-listen", "-v", f"-unix:{path}", "true"], stderr=write_end)
    os.close(write_end)
    try:
        assert wait_for(path.exists)
        assert wait_for(lambda: blocked_in(child.pid, "pipe_write"), TIMEOUT), "it never blocked in the write of its -v line"
        child.send_signal(signal.SIGTERM)
        with os.fdopen(read_end, "rb") as drained:
            said = drained.read()  # lets the stop be reported, up to EOF
        assert child.wait(TIMEOUT) == 128 + signal.SIGTERM
        assert said.endswith(b"fdlaunch-listen: fatal: stopped by SIGTERM before exec\n")
        assert not path.exists()
    finally:
        child.kill()
        child.wait()


def test_lazy_stopped_by_sigterm_cleans_up(tmp_path):
    path = tmp_path / "lazy.sock"
    child = subprocess.Popen(["fdlaunch-listen", "--lazy", f"-unix:{path}", "true"], stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(path.exists)
        child.send_signal(signal.SIGTERM)
        assert child.wait(TIMEOUT) == 128 + signal.SIGTERM
        assert "stopped by SIGTERM" in child.stderr.read()
        assert not path.exists()
    finally:
        child.kill()
        child.wait()


def test_a_second_stop_signal_never_cuts_the_cleanup_short(tmp_path):
    """--lazy with 200 unix sockets: SIGTERM, then SIGINT once the cleanup has begun; every file goes, and the first stop is the status."""
    count = 200
    for attempt in range(20):
        directory = tmp_path / str(attempt)
        directory.mkdir()
        paths = [directory / f"{i}.sock" for i in range(count)]
        argv = ["fdlaunch-listen", "-v", "--lazy", *(f"-unix:{p}" for p in paths), "true"]
        child = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
        try:
            said = [child.stderr.readline() for _ in range(count)]  # the last is said just before the wait
            assert said[-1].startswith(f"fdlaunch-listen: info: fd {count + 2}: unix "), said[-1]
            child.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + TIMEOUT
            while paths[0].exists():  # no sleep: the second stop must come while the cleanup runs
                assert time.monotonic() < deadline, "the cleanup never began"
            child.send_signal(signal.SIGINT)
            assert child.wait(TIMEOUT) == 128 + signal.SIGTERM
            assert child.stderr.read() == "fdlaunch-listen: fatal: stopped by SIGTERM before exec\n"
            assert sorted(directory.iterdir()) == [], f"attempt {attempt}: files left behind"
        finally:
            child.kill()
            child.wait()
            child.stderr.close()


def test_unix_mode_owner_and_mkdir(probe, tmp_path):
    require_root()
    path = tmp_path / "a" / "b" / "ctl.sock"
    done, report = probe(["fdlaunch-listen", f"-unix:mode=0660,owner=nobody:nogroup,mkdir:{path}"])
    assert done.returncode == 0, done.stderr
    info = os.stat(path)
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o660
    import grp
    import pwd

    assert (info.st_uid, info.st_gid) == (pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid)
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o755


def test_unix_default_mode_follows_the_umask(probe, tmp_path):
    path = tmp_path / "ctl.sock"
    done, _ = probe(["fdlaunch-listen", f"-unix:{path}"], preexec_fn=lambda: os.umask(0o027))
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_stale_socket_is_replaced(probe, tmp_path):
    path = tmp_path / "stale.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    done, report = probe(["fdlaunch-listen", f"-unix:{path}"])
    assert done.returncode == 0, done.stderr
    assert sockets(report)[3]["listening"]


def test_live_socket_is_refused_and_kept(probe, tmp_path):
    path = tmp_path / "live.sock"
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(path))
        live.listen()
        inode = os.stat(path).st_ino
        done, report = probe(["fdlaunch-listen", f"-unix:{path}"])
        assert done.returncode == 111 and report is None
        assert done.stderr == f"fdlaunch-listen: fatal: unable to bind {path}: a socket is already listening there\n"
        assert os.stat(path).st_ino == inode


def test_non_socket_file_is_refused_and_kept(probe, tmp_path):
    path = tmp_path / "file"
    path.write_text("precious")
    done, report = probe(["fdlaunch-listen", f"-unix:{path}"])
    assert done.returncode == 111 and report is None
    assert "exists and is not a socket" in done.stderr
    assert path.read_text() == "precious"


def test_missing_directory_without_mkdir(probe, tmp_path):
    path = tmp_path / "no" / "such.sock"
    done, _ = probe(["fdlaunch-listen", f"-unix:{path}"])
    assert done.returncode == 111
    expected = f"unable to bind {path}: directory {path.parent} does not exist (the mkdir option makes it)"
    assert done.stderr == f"fdlaunch-listen: fatal: {expected}\n"


def test_failure_leaves_nothing_behind(probe, tmp_path):
    """A later bind fails: the socket file and directory made before it are removed, the port freed."""
    port = free_port()
    path = tmp_path / "made" / "first.sock"
    with socket.create_server(("127.0.0.1", port)):
        done, report = probe(["fdlaunch-listen", f"-unix:mkdir:{path}", "-tcp:127.0.0.1:0", f"-tcp:127.0.0.1:{port}"])
    assert done.returncode == 111 and report is None
    assert done.stderr == f"fdlaunch-listen: fatal: unable to bind 127.0.0.1:{port}/tcp: Address already in use\n"
    assert not path.exists() and not path.parent.exists()


@pytest.mark.parametrize("proto, wildcard", [("tcp4", "0.0.0.0"), ("tcp6", "[::]"), ("tcp", "[::]")])
def test_bind_error_names_the_wildcard_it_tried(probe, proto, wildcard):
    """An empty HOST is printed as the address bound, as -v prints it, never as a bare ':PORT'."""
    if wildcard == "[::]" and not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    port = free_port()
    with socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True):
        done, report = probe(["fdlaunch-listen", f"-{proto}::{port}"])
    assert done.returncode == 111 and report is None
    assert done.stderr == f"fdlaunch-listen: fatal: unable to bind {wildcard}:{port}/tcp: Address already in use\n"


@pytest.mark.parametrize(
    "argv, status, message",
    [
        (["-tpc::80", "true"], 100, "bad socket spec '-tpc::80': unknown protocol 'tpc'"),
        (["-tcp:lable=x:80", "true"], 100, "bad socket spec '-tcp:lable=x:80': unknown option 'lable'"),
        (["-tcp:backlog=x:80", "true"], 100, "backlog must be a whole number"),
        (["-tcp:[::1:80", "true"], 100, "is not [IPV6]:PORT"),
        (["-tcp:127.0.0.1:http-nope", "true"], 100, "unknown service 'http-nope' for tcp"),
        (["-unix:/x" + "y" * 120, "true"], 100, "the limit is 107"),
        (["-tcp:fd=5:0", "-udp:fd=5:0", "true"], 100, "fd=5 is given to both"),
        (["-tcp:no-such-host.invalid:80", "true"], 100, "host 'no-such-host.invalid' not found"),
        (["-tcp:device=nosuchif0:80", "true"], 100, "no network interface named 'nosuchif0'"),
        (["-unix:owner=no-such-user:/tmp/x", "true"], 100, "unknown user 'no-such-user'"),
        (["--frobnicate", "-tcp::0", "true"], 100, "unknown option '--frobnicate'"),
        (["-tcp:127.0.0.1:0", "no-such-program-fdlaunch"], 127, "unable to exec no-such-program-fdlaunch: No such file or directory"),
        (["-tcp:127.0.0.1:0", "/etc/passwd"], 126, "unable to exec /etc/passwd: Permission denied"),
        (["-tcp:127.0.0.1:0", "/etc"], 126, "unable to exec /etc: Is a directory"),
    ],
)
def test_errors(argv, status, message, tmp_path):
    done = run(["fdlaunch-listen", *argv], cwd=tmp_path)
    assert done.returncode == status
    assert done.stderr.startswith("fdlaunch-listen: fatal: ")
    assert message in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_missing_program_leaves_no_socket_file(tmp_path):
    path = tmp_path / "x.sock"
    done = run(["fdlaunch-listen", f"-unix:{path}", "no-such-program-fdlaunch"])
    assert done.returncode == 127
    assert not path.exists()


def test_privileged_port_without_privilege():
    require_root()
    require_python_for_nobody()
    done = run(["fdlaunch-listen", "-udp:127.0.0.1:53", "true"], user="nobody")
    assert done.returncode == 111
    assert done.stderr.startswith("fdlaunch-listen: fatal: unable to bind 127.0.0.1:53/udp: Permission denied (ports below 1024 need root")


def test_privileged_port_as_root(probe):
    require_root()
    done, report = probe(["fdlaunch-listen", "-udp:127.0.0.53:53", "-tcp:127.0.0.53:53"])
    if done.returncode == 111 and "Address already in use" in done.stderr:
        pytest.skip("a resolver already holds port 53 on 127.0.0.53")
    assert done.returncode == 0, done.stderr
    assert [e["address"][1] for e in sockets(report).values()] == [53, 53]


def test_too_many_open_files():
    import resource

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (16, 16))

    done = run(["fdlaunch-listen", *(["-udp:127.0.0.1:0"] * 20), "true"], preexec_fn=low_limit)
    assert done.returncode == 111
    assert "beyond the open files limit (16)" in done.stderr


def test_python_m_fdlaunch(probe):
    done, report = probe([sys.executable, "-m", "fdlaunch", "listen", "-tcp:127.0.0.1:0"])
    assert done.returncode == 0, done.stderr
    assert report["env"]["LISTEN_FDNAMES"] == "tcp"


def unused_id(database):
    """An id above the usual ranges that the database (pwd.getpwuid or grp.getgrgid) has no entry for."""
    for candidate in range(4242420, 4242520):
        try:
            database(candidate)
        except KeyError:
            return candidate
    pytest.skip("no unused id found")


OWNER_CASES = ["name", "number with entry", "number without entry", "uid:gid without entries", "unknown name", "bad group"]


@pytest.mark.parametrize("case", OWNER_CASES)
def test_owner_follows_the_accounts_rule(probe, tmp_path, case):
    """fdlaunch(7), ACCOUNTS: the one USER[:GROUP] rule of owner= and fdlaunch-setuidgid."""
    import grp
    import pwd

    require_root()
    nobody = pwd.getpwnam("nobody")
    stranger, strange_group = unused_id(pwd.getpwuid), unused_id(grp.getgrgid)
    owner, expected = {
        "name": ("nobody", (nobody.pw_uid, nobody.pw_gid)),
        "number with entry": (str(nobody.pw_uid), (nobody.pw_uid, nobody.pw_gid)),
        "number without entry": (str(stranger), (stranger, os.getgid())),  # the group left as bound, as chown(1)
        "uid:gid without entries": (f"{stranger}:{strange_group}", (stranger, strange_group)),
        "unknown name": ("no-such-user-fdl", "owner='no-such-user-fdl': unknown user 'no-such-user-fdl'"),
        "bad group": ("nobody:no-such-group-fdl", "owner='nobody:no-such-group-fdl': unknown group 'no-such-group-fdl'"),
    }[case]
    path = tmp_path / "owned.sock"
    done, _ = probe(["fdlaunch-listen", f"-unix:owner={owner}:{path}"])
    if isinstance(expected, str):
        assert (done.returncode, done.stderr) == (100, f"fdlaunch-listen: fatal: {expected}\n")
        assert not path.exists()
    else:
        assert done.returncode == 0, done.stderr
        info = os.stat(path)
        assert (info.st_uid, info.st_gid) == expected


def test_a_spec_without_its_dash_is_named():
    # The usual slip: 'tcp::0' is taken for the program, and nothing was asked to listen.
    done = run(["fdlaunch-listen", "tcp::0", "true"])
    assert (done.returncode, done.stderr) == (
        100,
        "fdlaunch-listen: fatal: 'tcp::0' is not a socket spec: a spec starts with a dash, as '-tcp::0'\n",
    )
    done = run(["fdlaunch-listen", "true"])  # no spec and nothing like one: the usage line
    assert (done.returncode, done.stderr) == (100, "fdlaunch-listen: usage: fdlaunch-listen [options] SPEC... [--] PROG [ARGS...]\n")
