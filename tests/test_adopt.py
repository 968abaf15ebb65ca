"""fdlaunch-adopt: unmodified daemons get the sockets fdlaunch-listen bound, by their own bind(2).

Real daemons (python3 -m http.server, a static busybox httpd, nginx) behind
real chains, and tests/binder.py for the odd and hostile binds; the
supervisor is found by the pid fdlaunch-adopt -v names.
"""

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import PROBE, TIMEOUT, free_port, http_get, read_probe, require, require_root, run, wait_for_line
from test_handoff import HttpLoad, Upstream

HERE = Path(__file__).resolve().parent
BINDER = str(HERE / "binder.py")
DEBIAN_PYTHON = "/usr/bin/python3"  # readable by nobody, unlike a virtualenv under /root
SUPERVISOR_NAME = "adopt (binds)"


def free_privileged_port():
    """A TCP port below 1024 that nothing on 127.0.0.1 holds now (only root can take one)."""
    require_root()
    for port in range(1023, 900, -1):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port below 1024")


def supervisor_of(stderr):
    """The supervisor's pid, from fdlaunch-adopt -v's 'binds answered by pid N'."""
    return int(re.search(r"binds answered by pid (\d+)", stderr).group(1))


def gone(pid, seconds=TIMEOUT):
    """Whether pid has exited within seconds (waited on through a pidfd)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([pidfd], [], [], seconds)[0])
    finally:
        os.close(pidfd)


def status_of(pid):
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return fields


def holders(inode):
    """The pids that hold socket inode on some descriptor."""
    return {int(pid) for pid in filter(str.isdigit, os.listdir("/proc")) if f"socket:[{inode}]" in links_of(pid)}


def links_of(pid):
    """What each descriptor of pid points to, as readlink shows it; none for a process gone."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return set()
    found = set()
    for fd in fds:
        try:
            found.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue  # closed meanwhile (listdir's own descriptor, in our own process)
    return found


def listening_socket(kind=socket.SOCK_STREAM, family=socket.AF_INET, host="127.0.0.1"):
    """A bound (and, for a stream, listening) socket of the test's own, to hand down; (socket, port)."""
    sock = socket.socket(family, kind)
    sock.bind((host, 0))
    if kind == socket.SOCK_STREAM:
        sock.listen()
    return sock, sock.getsockname()[1]


class Binder:
    """tests/binder.py run under fdlaunch-adopt -v with the given sockets handed down; reads its steps' reports."""

    def __init__(self, sockets, steps, options=()):
        fds = [s.fileno() for s in sockets]
        environ = {**os.environ, "LISTEN_FD_MAP": ",".join(f"s{i}={fd}" for i, fd in enumerate(fds))}
        self.stderr_path = Path(tempfile.mkstemp(prefix="fdl-adopt-stderr.")[1])
        with self.stderr_path.open("w") as stderr:
            self.process = subprocess.Popen(
                ["fdlaunch-adopt", "-v", *options, "--", sys.executable, BINDER, *steps],
                env=environ,
                pass_fds=fds,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        try:
            wait_for_line(self.stderr_path, "binds answered by pid")
        except BaseException:
            self.kill()
            raise
        self.supervisor = supervisor_of(self.stderr_path.read_text())

    def next(self):
        """The next step's report (each line waited for within the run's deadline by select)."""
        assert select.select([self.process.stdout], [], [], TIMEOUT)[0], f"no report; stderr: {self.stderr()}"
        line = self.process.stdout.readline()
        assert line, f"binder ended; stderr: {self.stderr()}"
        return json.loads(line)

    def go_on(self):
        self.process.stdin.write("\n")
        self.process.stdin.flush()

    def finish(self):
        self.process.stdin.close()
        assert self.process.wait(TIMEOUT) == 0, self.stderr()
        assert gone(self.supervisor), "the supervisor outlived the daemon"
        self.stderr_path.unlink()

    def stderr(self):
        return self.stderr_path.read_text()

    def kill(self):
        self.process.kill()
        self.process.wait()
        self.stderr_path.unlink(missing_ok=True)


def run_binder(sockets, steps, options=()):
    """Every step's report, once the binder has run them all and exited; the supervisor was gone with it."""
    binder = Binder(sockets, steps, options)
    try:
        reports = [binder.next() for _ in steps]
        binder.finish()
    finally:
        if binder.process.poll() is None:
            binder.kill()
    return reports


def inode(sock):
    return os.fstat(sock.fileno()).st_ino


# Real daemons


@pytest.mark.parametrize("fuse", ["1", "0"])
def test_python_http_server_as_nobody_serves_on_a_privileged_port(public, fuse):
    port = free_privileged_port()
    (public / "hello.txt").write_text("hello, adopted\n")
    argv = ["fdlaunch-listen", f"-tcp:127.0.0.1:{port}", "--", "fdlaunch-setuidgid", "nobody", "--", "fdlaunch-adopt", "--"]
    daemon = [DEBIAN_PYTHON, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(public)]
    server = subprocess.Popen([*argv, *daemon], env={**os.environ, "FDLAUNCH_FUSE": fuse}, stderr=subprocess.PIPE, text=True)
    try:
        assert http_get(port, "/hello.txt") == "hello, adopted\n"
        status = status_of(server.pid)
        assert status["Uid"] == ["65534"] * 4, "the server itself is nobody: it could never have bound the port"
        assert (status["NoNewPrivs"], status["Seccomp"]) == (["1"], ["2"])
    finally:
        server.terminate()
        server.wait(TIMEOUT)
    # Without the link, the same server as nobody cannot have the port.
    done = run([*argv[:-2], *daemon])
    assert done.returncode != 0 and ("Permission denied" in done.stderr or "Address already in use" in done.stderr)


def is_static(path):
    """True for an ELF executable without a program interpreter (PT_INTERP): no dynamic loader, so no LD_PRELOAD."""
    with open(path, "rb") as elf:
        header = elf.read(64)
        assert header[:5] == b"\x7fELF\x02", "a 64-bit ELF file"
        offset, size, count = (
            int.from_bytes(header[32:40], "little"),
            int.from_bytes(header[54:56], "little"),
            int.from_bytes(header[56:58], "little"),
        )
        elf.seek(offset)
        table = elf.read(size * count)
    return all(int.from_bytes(table[i * size : i * size + 4], "little") != 3 for i in range(count))


def test_static_busybox_httpd_serves_on_the_socket_fdlaunch_listen_bound(public):
    busybox = require("busybox")
    assert is_static(busybox), "busybox-static's busybox"
    port = free_privileged_port()
    (public / "index.html").write_text("static hello\n")
    # sh says which socket fdlaunch-listen passed on fd 3, then becomes the rest of the chain.
    show = 'readlink /proc/$$/fd/3; exec "$@"'
    argv = ["fdlaunch-listen", f"-tcp:127.0.0.1:{port}", "--", "sh", "-c", show, "sh"]
    argv += [
        "fdlaunch-setuidgid",
        "nobody",
        "--",
        "fdlaunch-adopt",
        "--",
        busybox,
        "httpd",
        "-f",
        "-p",
        f"127.0.0.1:{port}",
        "-h",
        str(public),
    ]
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        bound = server.stdout.readline().strip()
        assert re.fullmatch(r"socket:\[\d+\]", bound)
        assert http_get(port, "/") == "static hello\n"
        assert bound in links_of(server.pid), "busybox serves on the very socket fdlaunch-listen bound"
        assert status_of(server.pid)["Uid"] == ["65534"] * 4
    finally:
        server.terminate()
        server.wait(TIMEOUT)


NGINX_CONF = """daemon off;
pid {dir}/nginx.pid;
worker_processes 1;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy; fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
    server {{ listen 127.0.0.1:{port}; location / {{ return 200 "hello from pid $pid\\n"; }} }}
}}
"""


def nginx_argv(directory, port):
    nginx = require("nginx")
    (directory / "nginx.conf").write_text(NGINX_CONF.format(dir=directory, port=port))
    return [nginx, "-p", str(directory), "-c", str(directory / "nginx.conf"), "-e", "stderr"]


def test_nginx_as_nobody_serves_through_adoption(public):
    port = free_privileged_port()
    argv = ["fdlaunch-listen", f"-tcp:127.0.0.1:{port}", "--", "fdlaunch-setuidgid", "nobody", "--", "fdlaunch-adopt", "-v", "--"]
    server = subprocess.Popen([*argv, *nginx_argv(public, port)], stderr=(public / "stderr").open("w"))
    try:
        assert http_get(port, "/").startswith("hello from pid ")
        wait_for_line(public / "stderr", f"pid {server.pid} (nginx) bound fd")  # said once the bind is answered
        said = (public / "stderr").read_text()
        assert re.search(rf"pid {server.pid} \(nginx\) bound fd \d+ to 127\.0\.0\.1:{port}/tcp: gave it the socket passed as 'tcp'", said)
    finally:
        server.terminate()
        server.wait(TIMEOUT)
    assert gone(supervisor_of(said))


def test_nginx_under_handoff_five_reloads_under_load_fail_nothing(public, tmp_path):
    port = free_privileged_port()
    upstream = Upstream(tmp_path)
    # nginx sends no READY=1: an instance is ready once its master has started a worker.
    ready = ["fdlaunch-notify-wait", "--forward", "--check=grep -q . /proc/$MAINPID/task/$MAINPID/children", "--interval=0.05", "--"]
    overlapping = ["fdlaunch-handoff", "-v", "--main-pid=instance", "--stop-signal=QUIT", "--"]
    argv = ["fdlaunch-listen", f"-tcp:127.0.0.1:{port}", "--", *overlapping, *ready]
    argv += ["fdlaunch-setuidgid", "nobody", "--", "fdlaunch-adopt", "--", *nginx_argv(public, port)]
    handoff = subprocess.Popen(argv, env={**os.environ, "NOTIFY_SOCKET": upstream.path}, stderr=(public / "stderr").open("w"))
    try:
        masters = [int(upstream.wait_ready()["MAINPID"])]
        load = HttpLoad(port)
        try:
            for _ in range(5):
                time.sleep(0.3)
                handoff.send_signal(signal.SIGHUP)
                fields = upstream.wait_ready()
                assert "took over from pid" in fields["STATUS"], fields
                masters.append(int(fields["MAINPID"]))
            time.sleep(0.3)
        finally:
            load.stop()
        assert load.failures == []
        assert len(set(masters)) == 6, "each reload started a new nginx"
        assert len(set(load.pids)) == 6, "a worker of each of the six answered"
        handoff.send_signal(signal.SIGTERM)
        assert handoff.wait(TIMEOUT) == 0, "nginx's status on SIGTERM, passed on by handoff"
    finally:
        handoff.kill()
        handoff.wait()
    assert [pid for pid in masters if not gone(pid, 5)] == []


# Which binds get a passed socket


def test_binds_to_other_addresses_go_on_and_strict_refuses_them():
    passed, port = listening_socket()
    other = free_port()
    steps = [f"tcp=127.0.0.1:{other}", f"udp=127.0.0.1:{port}", "udp=127.0.0.1:0", f"tcp=0.0.0.0:{port}", f"tcp=127.0.0.1:{port}"]
    with passed:
        reports = run_binder([passed], steps)
        assert [r["errno"] for r in reports] == [None, None, None, "EADDRINUSE", None]
        assert [r["inode"] != inode(passed) for r in reports[:3]] == [True, True, True], "their own sockets"
        assert reports[4]["inode"] == inode(passed), "the passed address gets the passed socket"
        reports = run_binder([passed], steps, ["--strict"])
        assert [r["errno"] for r in reports] == ["EACCES", "EACCES", "EACCES", "EACCES", None]
        assert reports[4]["inode"] == inode(passed)


def test_udp_ipv6_and_abstract_sockets_are_adopted_by_family_type_and_address():
    udp, udp_port = listening_socket(socket.SOCK_DGRAM)
    ipv6, ipv6_port = listening_socket(family=socket.AF_INET6, host="::1")
    control = socket.socket(socket.AF_UNIX)
    name = f"fdl-adopt-{os.getpid()}"
    control.bind(b"\0" + name.encode())
    control.listen()
    steps = [f"udp=127.0.0.1:{udp_port}", f"tcp=[::1]:{ipv6_port}", f"abstract={name}", f"udp=[::1]:{ipv6_port}"]
    with udp, ipv6, control:
        reports = run_binder([udp, ipv6, control], steps)
        assert [r["inode"] for r in reports[:3]] == [inode(udp), inode(ipv6), inode(control)]
        assert reports[3]["errno"] is None and reports[3]["inode"] != inode(ipv6), "UDP on the TCP socket's address: its own"


def test_a_unix_path_is_adopted_by_the_file_it_names(public):
    path = public / "control.sock"
    control = socket.socket(socket.AF_UNIX)
    control.bind(str(path))
    control.listen()
    with control:
        reports = run_binder([control], [f"unix={path}", "close=1", f"unix={public}/./control.sock"])
        assert [r["inode"] for r in (reports[0], reports[2])] == [inode(control)] * 2
        path.unlink()  # as a daemon that clears a stale file before binding: the path no longer names the passed socket
        reports = run_binder([control], [f"unix={path}"])
        assert reports[0]["errno"] is None and reports[0]["inode"] != inode(control)
        path.unlink()


def test_a_process_gets_a_passed_socket_once_while_it_holds_it():
    passed, port = listening_socket()
    where = f"127.0.0.1:{port}"
    # child first (it holds nothing), then the parent, a child that inherited it, the parent again, then after a close.
    steps = [f"child=tcp={where}", f"tcp={where}", f"child=tcp={where}", f"tcp={where}", "close=2", f"tcp={where}"]
    with passed:
        binder = Binder([passed], steps)
        try:
            reports = [binder.next() for _ in range(6)]
            binder.finish()
        finally:
            if binder.process.poll() is None:
                binder.kill()
        assert [r["errno"] for r in reports] == [None, None, "EADDRINUSE", "EADDRINUSE", None, None]
        assert [reports[i]["inode"] for i in (0, 1, 5)] == [inode(passed)] * 3


def test_close_on_exec_and_o_nonblock_are_as_the_daemon_set_them():
    passed, port = listening_socket()
    with passed:
        reports = run_binder([passed], [f"tcpflags=127.0.0.1:{port}", "close=1", f"tcpinherit=127.0.0.1:{port}"])
        assert [(r["cloexec"], r["nonblock"]) for r in (reports[0], reports[2])] == [(True, True), (False, False)]
        assert os.get_blocking(passed.fileno()), "O_NONBLOCK is the socket's: the last adopter's choice"


@pytest.mark.parametrize("strict", [[], ["--strict"]])
def test_a_bad_pointer_or_length_gets_the_kernels_own_error(strict):
    passed, port = listening_socket()
    kinds = ["fault", "short", "long", "negative", "badfd", "notsock"]
    steps = [f"raw={kind}:127.0.0.1:{port}" for kind in kinds]  # the passed address, where it can be read
    with passed:
        plain = [json.loads(line)["errno"] for line in run([sys.executable, BINDER, *steps]).stdout.splitlines()]
        assert plain == ["EFAULT", "EINVAL", "EINVAL", "EINVAL", "EBADF", "ENOTSOCK"]
        assert [r["errno"] for r in run_binder([passed], steps, strict)] == plain


# The supervisor


def descriptors_of(pid):
    """What pid's descriptors are, as /proc/PID/fd's links say, sorted."""
    return sorted(os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))


def test_the_supervisor_exits_with_the_daemon_and_holds_only_what_it_needs():
    passed, port = listening_socket()
    with passed:
        binder = Binder([passed], ["wait"])
        try:
            held = sorted(
                [
                    "/dev/null",
                    "/dev/null",
                    str(binder.stderr_path),
                    "anon_inode:[pidfd]",
                    "anon_inode:seccomp notify",
                    f"socket:[{inode(passed)}]",
                ]
            )
            # Its end of the channel to the daemon is closed just after it said it serves.
            deadline = time.monotonic() + TIMEOUT
            while (links := descriptors_of(binder.supervisor)) != held:
                assert time.monotonic() < deadline, f"the supervisor holds {links}"
                time.sleep(0.02)
            assert os.readlink(f"/proc/{binder.supervisor}/cwd") == "/"
            assert status_of(binder.supervisor)["PPid"] != [str(binder.process.pid)], "not the daemon's child"
            binder.process.kill()
            binder.process.wait()
            assert gone(binder.supervisor, 5)
        finally:
            binder.kill()


def test_when_the_supervisor_dies_later_binds_fail_with_enosys_at_once():
    passed, port = listening_socket()
    with passed:
        binder = Binder([passed], ["wait", "udp=127.0.0.1:0", f"tcp=127.0.0.1:{port}"])
        try:
            os.kill(binder.supervisor, signal.SIGKILL)
            assert gone(binder.supervisor, 5)
            binder.go_on()
            reports = [binder.next() for _ in range(3)]
            assert [r["errno"] for r in reports] == [None, "ENOSYS", "ENOSYS"]
            assert binder.process.wait(TIMEOUT) == 0
        finally:
            binder.kill()


def resources(pid):
    fields = status_of(pid)
    return int(fields["VmRSS"][0]), len(os.listdir(f"/proc/{pid}/fd"))


def test_ten_thousand_continued_binds_leave_the_supervisor_flat():
    passed, port = listening_socket()
    with passed:
        binder = Binder([passed], ["many=1000", "wait", "many=10000", "wait"])
        try:
            assert binder.next()["failed"] == 0
            rss, count = resources(binder.supervisor)
            binder.go_on()
            binder.next()
            assert binder.next()["failed"] == 0
            rss_after, count_after = resources(binder.supervisor)
            assert count_after == count
            assert rss_after - rss < 512, f"RSS grew from {rss} kB to {rss_after} kB"
            binder.go_on()
            binder.next()
            binder.finish()
        finally:
            binder.kill()


def test_binds_racing_with_exit_leak_no_descriptor():
    passed, port = listening_socket()
    with passed:
        binder = Binder([passed], ["wait", f"race=300:127.0.0.1:{port}", "wait"])
        try:
            count = resources(binder.supervisor)[1]
            binder.go_on()
            binder.next()
            assert binder.next()["children"] == 300
            assert holders(inode(passed)) == {os.getpid(), binder.supervisor}, "only we and the supervisor hold it"
            deadline = time.monotonic() + TIMEOUT  # a child's last notification may still be in hand
            while (held := resources(binder.supervisor)[1]) != count:
                assert time.monotonic() < deadline, f"the supervisor holds {held} descriptors, not {count}"
                time.sleep(0.02)
            binder.go_on()
            binder.next()
            binder.finish()
        finally:
            binder.kill()


# The link itself


def test_the_program_gets_no_passed_socket_and_no_listen_variable(tmp_path):
    out = tmp_path / "report.json"
    env = {**os.environ, "LISTEN_PIDFDID": "12", "KEEP": "1"}
    argv = ["fdlaunch-listen", "-tcp:127.0.0.1:0", "-udp:127.0.0.1:0", "--", "fdlaunch-adopt", "--", sys.executable, PROBE, str(out)]
    done = run(argv, env=env)
    assert (done.returncode, done.stderr) == (0, "")
    report = read_probe(out)
    assert [fd for fd, e in report["fds"].items() if e["kind"] == "socket"] == []
    assert not [name for name in report["env"] if name.startswith("LISTEN_")]
    assert report["env"]["KEEP"] == "1"


@pytest.mark.parametrize(
    "handed, message",
    [
        ("file", "LISTEN_FDS/LISTEN_FD_MAP: fd 3 (x) is not a socket: Socket operation on non-socket"),
        ("unbound", "LISTEN_FDS/LISTEN_FD_MAP: fd 3 (x) is not a bound socket of the inet or unix family"),
    ],
)
def test_a_passed_descriptor_that_is_no_bound_socket_is_refused(handed, message):
    source = os.open(os.devnull, os.O_RDONLY) if handed == "file" else socket.socket().detach()
    try:
        script = f'exec 3<&{source} {source}<&-; exec "$@"'
        environ = {**os.environ, "LISTEN_FD_MAP": "x=3"}
        done = run(["bash", "-c", script, "bash", "fdlaunch-adopt", "--", "true"], env=environ, pass_fds=(source,))
    finally:
        os.close(source)
    assert (done.returncode, done.stderr) == (100, f"fdlaunch-adopt: fatal: {message}\n")


def supervisors():
    return {int(pid) for pid in filter(str.isdigit, os.listdir("/proc")) if read_comm(pid) == SUPERVISOR_NAME}


def read_comm(pid):
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def test_a_second_adopt_in_the_chain_fails_in_one_line_and_leaves_no_supervisor():
    before = supervisors()
    done = run(["fdlaunch-listen", "-tcp:127.0.0.1:0", "--", "fdlaunch-adopt", "--", "fdlaunch-adopt", "--", "true"])
    assert done.returncode == 111
    assert done.stderr == (
        "fdlaunch-adopt: fatal: unable to install the bind filter: a seccomp filter of this process already has a listener "
        "(an fdlaunch-adopt earlier in the chain, or a container manager's)\n"
    )
    deadline = time.monotonic() + TIMEOUT
    while supervisors() - before:
        assert time.monotonic() < deadline, "a supervisor was left running"
        time.sleep(0.02)


def test_another_architecture_is_refused_naming_it():
    setarch = require("setarch")
    done = run([setarch, "i686", "fdlaunch-adopt", "--", "true"])
    assert (done.returncode, done.stderr) == (
        111,
        "fdlaunch-adopt: fatal: unable to adopt sockets on i686: fdlaunch-adopt knows the system calls of x86-64 and aarch64 only\n",
    )


def test_missing_program_starts_nothing():
    before = supervisors()
    done = run(["fdlaunch-listen", "-tcp:127.0.0.1:0", "--", "fdlaunch-adopt", "--", "no-such-program-fdl"])
    assert (done.returncode, done.stderr) == (127, "fdlaunch-adopt: fatal: unable to exec no-such-program-fdl: No such file or directory\n")
    assert supervisors() - before == set()
