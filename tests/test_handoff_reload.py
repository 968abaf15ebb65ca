"""fdlaunch-handoff --listen-from=FILE: reloads into a changed socket set, under load, as root and nobody."""

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TIMEOUT, free_port, require_python_for_nobody, require_root, run
from test_handoff import HELLO, HttpLoad, Upstream


class ListenFrom:
    """fdlaunch-handoff --listen-from=FILE -- PROG (after a chain head, if given), stopped around a test."""

    def __init__(self, directory, lines, program, head=(), options=()):
        self.file = directory / "sockets"
        self.write(lines)
        self.upstream = Upstream(directory)
        self.stderr = directory / "stderr"
        # The tests follow instances by the MAINPID each READY=1 names.
        argv = [*head, "fdlaunch-handoff", "--main-pid=instance", *options, f"--listen-from={self.file}", "--", *program]
        environ = {**os.environ, "NOTIFY_SOCKET": self.upstream.path}
        self.process = subprocess.Popen(argv, env=environ, stderr=self.stderr.open("w"))

    def write(self, lines):
        self.file.write_text("".join(line + "\n" for line in lines))

    def reload(self, lines):
        """Rewrite FILE, send the reload signal: the READY=1 that answers it."""
        self.write(lines)
        self.process.send_signal(signal.SIGHUP)
        return self.upstream.wait_ready()

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(TIMEOUT)

    def kill(self):
        """SIGTERM, and SIGKILL only if that fails: an instance that dropped privileges lost its parent-death signal."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(TIMEOUT)
        self.upstream.sock.close()


def tcp(label, port):
    return f"-tcp:label={label}:127.0.0.1:{port}"


def get(port):
    """One request: the reply's body."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(b"GET / HTTP/1.0\r\n\r\n")
        reply = b""
        while chunk := client.recv(4096):
            reply += chunk
    return reply.split(b"\r\n\r\n", 1)[1].decode()


def refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def gone(pid):
    deadline = time.monotonic() + TIMEOUT
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, f"pid {pid} is still there"
        time.sleep(0.02)


def environ_of(pid):
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode().split("=", 1) for e in entries if b"=" in e)


def socket_inode(pid, fd):
    return os.stat(f"/proc/{pid}/fd/{fd}").st_ino


def test_reload_adds_and_removes_sockets_without_failing_a_request_on_the_kept_ones(tmp_path):
    web, api, remove, add = free_port(), free_port(), free_port(), free_port()
    control = tmp_path / "control.sock"
    lines = [tcp("web", web), tcp("old", remove), f"-unix:label=ctl:{control}", tcp("api", api)]
    handoff = ListenFrom(tmp_path, lines, [sys.executable, HELLO, "1"])
    try:
        old = int(handoff.upstream.wait_ready()["MAINPID"])
        assert environ_of(old)["LISTEN_FD_MAP"] == "web=3,old=4,ctl=5,api=6"
        before = {fd: socket_inode(old, fd) for fd in (3, 6)}
        loads = [HttpLoad(web), HttpLoad(api)]
        for load in loads:
            load.wait_answered_by(old)
        fields = handoff.reload(["# the web", tcp("web", web), tcp("api", api), tcp("new", add)])
        new = int(fields["MAINPID"])
        assert new != old
        assert fields["STATUS"].startswith(f"serving 3 sockets; reloaded: +127.0.0.1:{add}/tcp, -127.0.0.1:{remove}/tcp, -{control} ")
        # web keeps fd 3; api's 6 is past the end of 3..5, so it takes the lowest hole
        assert environ_of(new)["LISTEN_FD_MAP"] == "web=3,api=4,new=5"
        assert socket_inode(new, 3) == before[3], "a kept socket is the same socket"
        assert socket_inode(new, 4) == before[6]
        assert get(add).startswith(f"hello from pid {new} on new")
        gone(old)
        deadline = time.monotonic() + 5
        while not refused(remove) and time.monotonic() < deadline:  # closed right after the old instance is reaped
            time.sleep(0.02)
        assert refused(remove)
        while control.exists() and time.monotonic() < deadline:  # removed after the sockets are closed
            time.sleep(0.02)
        assert not control.exists(), "the removed unix socket's file is gone"
        for load in loads:
            load.wait_answered_by(new)
            load.stop()
            assert load.failures == []
            assert set(load.pids) == {old, new}
        assert handoff.stop() == 0
    finally:
        handoff.kill()
    assert refused(web) and refused(add)


def test_inherited_sockets_come_first_and_keep_their_label(tmp_path):
    web, first, second = free_port(), free_port(), free_port()
    head = ["fdlaunch-listen", tcp("web", web), "--"]
    handoff = ListenFrom(tmp_path, [tcp("a", first)], [sys.executable, HELLO, "0"], head=head, options=["-v"])
    try:
        old = int(handoff.upstream.wait_ready()["MAINPID"])
        assert environ_of(old)["LISTEN_FD_MAP"] == "web=3,a=4"
        inherited = socket_inode(old, 3)
        new = int(handoff.reload([tcp("b", second)])["MAINPID"])
        assert "fdlaunch-handoff: info: the new instance gets: " in handoff.stderr.read_text()
        passed = environ_of(new)
        names = ("LISTEN_FD_MAP", "LISTEN_FDNAMES", "LISTEN_FDS", "LISTEN_PID")
        assert [passed[name] for name in names] == ["web=3,b=4", "web:b", "2", str(new)]
        assert socket_inode(new, 3) == inherited
        gone(old)
        assert get(web).startswith(f"hello from pid {new} on web")
        assert get(second).startswith(f"hello from pid {new} on b")
    finally:
        handoff.kill()


@pytest.mark.parametrize("fault", ["bad line", "address in use"])
def test_a_failed_reload_leaves_the_old_instance_and_the_old_set(tmp_path, fault):
    keep, other = free_port(), free_port()
    added = tmp_path / "added.sock"
    handoff = ListenFrom(tmp_path, [tcp("keep", keep)], [sys.executable, HELLO, "0"])
    squatter = socket.create_server(("127.0.0.1", other))
    try:
        old = int(handoff.upstream.wait_ready()["MAINPID"])
        load = HttpLoad(keep)
        bad = tcp("new", "80x") if fault == "bad line" else tcp("new", other)
        fields = handoff.reload([tcp("keep", keep), f"-unix:label=ctl:{added}", bad])
        load.wait_answered_by(old)
        load.stop()
        assert int(fields["MAINPID"]) == old and "handoff failed" in fields["STATUS"]
        assert load.failures == [] and set(load.pids) == {old}
        lines = [line for line in handoff.stderr.read_text().splitlines() if not line.startswith("hello_httpd: ")]
        if fault == "bad line":
            reason = f"{str(handoff.file)!r}, line 3: bad socket spec {bad!r}: port '80x' is not a number"
        else:
            reason = f"unable to bind 127.0.0.1:{other}/tcp: Address already in use"
        assert len(lines) == 1 and lines[0].startswith(f"fdlaunch-handoff: warning: handoff failed: {reason}")
        assert lines[0].endswith(f"; pid {old} goes on serving")
        assert not added.exists(), "what the failed reload bound is undone"
        assert environ_of(old)["LISTEN_FD_MAP"] == "keep=3"
        handoff.write([tcp("keep", keep), tcp("new", free_port())])  # the next good reload works
        handoff.process.send_signal(signal.SIGHUP)
        assert "reloaded: +127.0.0.1:" in handoff.upstream.wait_ready()["STATUS"]
    finally:
        squatter.close()
        handoff.kill()


def test_a_fifo_in_place_of_the_file_fails_that_reload_and_never_hangs_the_loop(tmp_path):
    keep = free_port()
    handoff = ListenFrom(tmp_path, [tcp("keep", keep)], [sys.executable, HELLO, "0"])
    try:
        old = int(handoff.upstream.wait_ready()["MAINPID"])
        handoff.file.unlink()
        os.mkfifo(handoff.file)  # opening it to read would wait for a writer, and SIGTERM with it
        handoff.process.send_signal(signal.SIGHUP)
        fields = handoff.upstream.wait_ready()
        assert int(fields["MAINPID"]) == old and "handoff failed" in fields["STATUS"]
        assert f"handoff failed: unable to read {str(handoff.file)!r}: not a regular file" in handoff.stderr.read_text()
        assert get(keep).startswith(f"hello from pid {old} on keep")
        assert handoff.stop() == 0
    finally:
        handoff.kill()


def test_a_fifo_at_start_is_one_line_and_leaves_nothing(tmp_path):
    file = tmp_path / "sockets"
    os.mkfifo(file)
    done = run(["fdlaunch-handoff", f"--listen-from={file}", "--", "true"], timeout=5)
    assert done.returncode == 111
    assert done.stderr == f"fdlaunch-handoff: fatal: unable to read {str(file)!r}: not a regular file\n"


def test_an_empty_file_passes_no_socket_in_a_form_our_own_tools_read(tmp_path):
    """LISTEN_FDS=0 and LISTEN_FDNAMES='' (as a file emptied by a reload leaves it) is no socket, not a bad call."""
    file = tmp_path / "sockets"
    file.write_text("")
    script = 'echo "$LISTEN_FDS:$LISTEN_FDNAMES:$LISTEN_FD_MAP" >&2'
    done = run(["fdlaunch-handoff", f"--listen-from={file}", "--", "fdlaunch-listen", "-tcp:127.0.0.1:0", "--", "sh", "-c", script])
    assert done.returncode == 0, done.stderr
    assert done.stderr == "1:tcp:tcp=3\n"


def privileged_port_free(port):
    try:
        socket.create_server(("127.0.0.1", port)).close()
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            return False
        raise
    return True


def uids(pid):
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Uid:"))
    return set(line.split()[1:])


def test_as_root_a_reload_binds_port_853_for_instances_that_run_as_nobody(tmp_path):
    require_root()
    require_python_for_nobody()
    if not privileged_port_free(853):
        pytest.skip("127.0.0.1:853 is in use")
    keep = free_port()
    program = ["fdlaunch-setuidgid", "nobody", "--", sys.executable, HELLO, "0"]
    handoff = ListenFrom(tmp_path, [tcp("web", keep)], program)
    try:
        old = int(handoff.upstream.wait_ready()["MAINPID"])
        assert uids(old) == {"65534"} and uids(handoff.process.pid) == {"0"}
        fields = handoff.reload([tcp("web", keep), tcp("dot", 853)])
        new = int(fields["MAINPID"])
        assert new != old and "+127.0.0.1:853/tcp" in fields["STATUS"]
        assert uids(new) == {"65534"}, "instances never run with the parent's privileges"
        gone(old)
        assert get(853).startswith(f"hello from pid {new} on dot")
        assert get(keep).startswith(f"hello from pid {new} on web")
        assert handoff.stop() == 0
    finally:
        handoff.kill()
    assert privileged_port_free(853), "closed once fdlaunch-handoff is gone"


@pytest.mark.parametrize(
    "lines, status, message",
    [
        (["-tcp::99999"], 100, "line 1: bad socket spec '-tcp::99999': port 99999 is out of range"),
        (["-unix:{tmp}/made.sock", "-tcp:label=x:127.0.0.1:{busy}"], 111, "unable to bind 127.0.0.1:{busy}/tcp: Address already in use"),
    ],
)
def test_a_bad_file_at_start_is_one_line_and_leaves_nothing(tmp_path, lines, status, message):
    with socket.create_server(("127.0.0.1", 0)) as squatter:
        busy = squatter.getsockname()[1]
        file = tmp_path / "sockets"
        file.write_text("\n".join(line.format(tmp=tmp_path, busy=busy) for line in lines))
        done = run(["fdlaunch-handoff", f"--listen-from={file}", "--", "true"])
    assert done.returncode == status
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("fdlaunch-handoff: fatal: ")
    assert message.format(busy=busy) in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sockets"]


def test_listen_from_usage_errors(tmp_path):
    done = run(["fdlaunch-handoff", "--map", "true"])
    assert done.returncode == 100 and "--map places the sockets of --listen-from" in done.stderr
    done = run(["fdlaunch-handoff", f"--listen-from={tmp_path}/none", "true"])
    assert done.returncode == 111
    assert done.stderr == f"fdlaunch-handoff: fatal: unable to read {str(tmp_path / 'none')!r}: No such file or directory\n"


AT_FD_3 = "import os, sys; os.dup2(int(sys.argv[1]), 3); os.close(int(sys.argv[1])); os.execvp(sys.argv[2], sys.argv[2:])"


def test_map_leaves_an_open_descriptor_alone(tmp_path):
    """s6's notification-fd at 3: --map puts the sockets around it."""
    port = free_port()
    file = tmp_path / "sockets"
    file.write_text(tcp("web", port) + "\n")
    read_end, write_end = os.pipe()
    argv = ["fdlaunch-handoff", "--map", "--fd=3", f"--listen-from={file}", "--", sys.executable, HELLO, "0"]
    process = subprocess.Popen([sys.executable, "-c", AT_FD_3, str(write_end), *argv], pass_fds=[write_end], stderr=subprocess.DEVNULL)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as ready:
            assert ready.read(1) == b"\n"  # s6 readiness
        instance = int(get(port).split("hello from pid ")[1].split()[0])
        assert environ_of(instance)["LISTEN_FD_MAP"] == "web=4"
    finally:
        process.kill()
        process.wait(TIMEOUT)


def test_an_instance_gets_its_sockets_and_nothing_of_ours(tmp_path):
    """fdlaunch(7), CHAIN LOADING, with --listen-from: no descriptor of handoff's own, only documented variables."""
    from test_hygiene import REPORT

    file = tmp_path / "sockets"
    file.write_text(f"-tcp:label=web:127.0.0.1:0\n-udp:label=dns:127.0.0.1:0\n-unix:label=ctl:{tmp_path}/ctl.sock\n")
    caller = {"PATH": os.environ["PATH"], "TMPDIR": str(tmp_path), "ODD": "a=b c"}
    done = run(["fdlaunch-handoff", f"--listen-from={file}", "--", "/bin/sh", "-c", REPORT], env=caller)
    assert done.returncode == 0, done.stderr
    environ = dict(entry.split("=", 1) for entry in (tmp_path / "environ").read_text().split("\0") if entry)
    assert set(environ) - set(caller) == {"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "LISTEN_FD_MAP", "NOTIFY_SOCKET"}
    assert (environ["LISTEN_FD_MAP"], environ["LISTEN_FDNAMES"]) == ("web=3,dns=4,ctl=5", "web:dns:ctl")
    assert sorted(int(fd) for fd in (tmp_path / "fds").read_text().split()) == [0, 1, 2, 3, 4, 5]
    assert not (tmp_path / "ctl.sock").exists(), "the socket file goes when fdlaunch-handoff does"
