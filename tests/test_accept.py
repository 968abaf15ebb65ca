"""fdlaunch-accept: real clients over TCP v4, v6 and unix sockets, limits, rules, signals, supervisors."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import (
    PROBE,
    TIMEOUT,
    free_port,
    parse_probe,
    require,
    require_python_for_nobody,
    require_root,
    run,
    s6_supervised,
    terminated,
    unread_fd3_started,
    wait_for_line,
)

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "examples"
ECHO_TCP = 'echo "$PROTO $TCPREMOTEIP $TCPREMOTEPORT $TCPLOCALIP $TCPLOCALPORT $TCPCONNNUM"'
UCSPI = {"PROTO", "TCPLOCALIP", "TCPLOCALPORT", "TCPREMOTEIP", "TCPREMOTEPORT", "TCPCONNNUM"}


def bit(number):
    return 1 << (number - 1)


GLIBC_INTERNAL = bit(32) | bit(33)  # SIGCANCEL and SIGSETXID, below SIGRTMIN


class Server:
    """fdlaunch-listen SPEC -- [PREFIX] fdlaunch-accept OPTIONS -- PROGRAM, ready once it said READY=1."""

    def __init__(self, directory, spec, options, program, prefix=(), env=None, preexec_fn=None):
        self.marker = f"accept-test-{uuid.uuid4()}"
        directory = Path(tempfile.mkdtemp(prefix="server-", dir=directory))
        os.chmod(directory, 0o755)
        self.upstream = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.upstream.bind(str(directory / "upstream"))
        self.upstream.settimeout(TIMEOUT)
        os.chmod(directory / "upstream", 0o777)  # a server that dropped to nobody still reports
        self.stderr_path = directory / "stderr"
        environ = {**(env or os.environ), "NOTIFY_SOCKET": str(directory / "upstream"), "ACCEPT_TEST_MARKER": self.marker}
        specs = [spec] if isinstance(spec, str) else spec
        argv = ["fdlaunch-listen", *specs, "--", *prefix, "fdlaunch-accept", *options, "--", *program]
        with open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(argv, env=environ, stdout=subprocess.DEVNULL, stderr=stderr, preexec_fn=preexec_fn)

    def wait_ready(self):
        try:
            message = self.upstream.recv(4096)
        except TimeoutError:
            raise AssertionError(f"no READY=1; stderr: {self.stderr()}") from None
        assert message == b"READY=1", message

    def stderr(self):
        return self.stderr_path.read_text()

    def wait_for_line(self, text, count=1):
        deadline = time.monotonic() + TIMEOUT
        while self.stderr().count(text) < count:
            assert time.monotonic() < deadline, f"no {count} x {text!r} in {self.stderr()!r}"
            time.sleep(0.02)

    def signal(self, number):
        self.process.send_signal(number)

    def stop(self):
        try:
            return terminated(self.process)
        finally:
            self.upstream.close()
            assert not wait_gone(self.marker), f"left behind: {processes_with(self.marker)}"
            assert not wait_gone(self.marker), f"left behind: {processes_with(self.marker)}"


def processes_with(marker):
    """Processes whose environment holds marker: the server, its guard, its handlers."""
    found = []
    needle = f"ACCEPT_TEST_MARKER={marker}".encode()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/environ", "rb") as environ:
                    if needle in environ.read().split(b"\0"):
                        with open(f"/proc/{name}/stat") as stat:
                            if stat.read().rsplit(")", 1)[1].split()[0] != "Z":
                                found.append(int(name))
            except OSError:
                continue
    return found


def wait_gone(marker, seconds=TIMEOUT):
    deadline = time.monotonic() + seconds
    while (left := processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture
def server(tmp_path):
    started = []

    def start(spec, options, program, ready=True, directory=tmp_path, **kwargs):
        one = Server(directory, spec, options, program, **kwargs)
        started.append(one)
        if ready:
            one.wait_ready()
        return one

    yield start
    for one in started:
        one.stop()


@pytest.fixture
def public_dir():
    """A directory every user can reach, for unix sockets and files handlers of nobody read."""
    top = Path(tempfile.mkdtemp(prefix="fdlaunch-accept-", dir="/tmp"))
    os.chmod(top, 0o755)
    yield top
    shutil.rmtree(top, ignore_errors=True)


def talk(address, family=socket.AF_INET, source=None, send=b"", timeout=TIMEOUT):
    """Connect (from source, if given), send, read to EOF: (what came back, our own address)."""
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(timeout)
        if source is not None:
            client.bind((source, 0))
        client.connect(address)
        mine = client.getsockname()
        if send:
            client.sendall(send)
        client.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := client.recv(65536):
            reply += chunk
    return reply.decode(), mine


def has_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


# A real client sees its own address


def test_tcp_v4_client_sees_its_own_address(server):
    port = free_port()
    server(f"-tcp:127.0.0.1:{port}", [], ["sh", "-c", ECHO_TCP])
    for source in ("127.0.0.1", "127.0.0.2"):
        reply, (ip, client_port) = talk(("127.0.0.1", port), source=source)
        assert reply.split() == ["TCP", ip, str(client_port), "127.0.0.1", str(port), "1"]


def test_tcp_v6_client_sees_its_own_address(server):
    if not has_ipv6_loopback():
        pytest.skip("no ::1 on this host")
    port = free_port(host="127.0.0.1")
    server(f"-tcp6:[::1]:{port}", [], ["sh", "-c", ECHO_TCP])
    reply, (ip, client_port, *_) = talk(("::1", port), family=socket.AF_INET6)
    assert reply.split() == ["TCP", "::1", str(client_port), "::1", str(port), "1"]
    assert ip == "::1"


def test_a_dual_stack_socket_shows_ipv4_clients_as_ipv4(server):
    if not has_ipv6_loopback():
        pytest.skip("no IPv6 on this host")
    port = free_port()
    server(f"-tcp:[::]:{port}", [], ["sh", "-c", ECHO_TCP])
    reply, (ip, client_port) = talk(("127.0.0.1", port))
    assert reply.split()[:3] == ["TCP", "127.0.0.1", str(client_port)]


def unix_client(path, user=None):
    """A client in its own process (as user): what it read, and its pid."""
    if user is not None:
        require_python_for_nobody()
    code = (
        "import socket,sys,os; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.shutdown(socket.SHUT_WR);"
        "r=b''\nwhile (c:=s.recv(4096)): r+=c\nprint(os.getpid()); print(r.decode(), end='')"
    )
    done = run([sys.executable, "-c", code, str(path)], user=user)
    assert done.returncode == 0, done.stderr
    pid, _, reply = done.stdout.partition("\n")
    return reply, int(pid)


def test_unix_client_sees_its_uid_gid_pid(server, public_dir):
    path = public_dir / "sock"
    script = 'echo "$PROTO $IPCLOCALPATH $IPCREMOTEEUID $IPCREMOTEEGID $IPCREMOTEPID $IPCCONNNUM"'
    server(f"-unix:mode=0666:{path}", [], ["sh", "-c", script])
    reply, pid = unix_client(path)
    assert reply.split() == ["IPC", str(path), str(os.geteuid()), str(os.getegid()), str(pid), "1"]
    if os.geteuid() == 0:
        reply, pid = unix_client(path, user=65534)
        assert reply.split()[2] == "65534"
        assert reply.split()[4] == str(pid)


def test_inetd_gives_what_systemd_accept_gives(server):
    port = free_port()
    server(f"-tcp:127.0.0.1:{port}", ["--inetd"], [sys.executable, PROBE, "-"])
    reply, (ip, client_port) = talk(("127.0.0.1", port))
    environ = parse_probe(reply)["env"]
    assert environ["REMOTE_ADDR"] == ip and environ["REMOTE_PORT"] == str(client_port)
    assert not (UCSPI | {"LISTEN_FDS", "LISTEN_PID", "LISTEN_FD_MAP", "LISTEN_FDNAMES"}) & set(environ)


# What the handler is handed: descriptors, environment, signals


def test_handler_gets_the_connection_stderr_and_nothing_else(server, tmp_path):
    port = free_port()
    caller = {"PATH": os.environ["PATH"], "ODD": "a=b c", "EMPTY": "", "TCPREMOTEHOST": "stale", "PROTO": "stale"}
    one = server(f"-tcp:127.0.0.1:{port}", ["-l", "example.org"], [sys.executable, PROBE, "-"], env=caller)
    reply, (ip, client_port) = talk(("127.0.0.1", port))
    report = parse_probe(reply)
    assert sorted(report["fds"]) == [0, 1, 2]
    for fd in (0, 1):
        entry = report["fds"][fd]
        assert entry["kind"] == "socket" and not entry["listening"] and not entry["cloexec"]
        assert entry["address"] == ["127.0.0.1", port]
    expected = {
        "PATH": caller["PATH"],
        "ODD": "a=b c",
        "EMPTY": "",
        "ACCEPT_TEST_MARKER": one.marker,
        "PROTO": "TCP",
        "TCPLOCALIP": "127.0.0.1",
        "TCPLOCALPORT": str(port),
        "TCPLOCALHOST": "example.org",
        "TCPREMOTEIP": ip,
        "TCPREMOTEPORT": str(client_port),
        "TCPCONNNUM": "1",
    }
    assert report["env"] == expected  # no LISTEN_*, no NOTIFY_SOCKET, no stale TCPREMOTEHOST


def test_host_names_only_when_asked(server):
    if socket.getnameinfo(("127.0.0.1", 0), socket.NI_NAMEREQD)[0] != "localhost":
        pytest.skip("127.0.0.1 is not localhost in this host's resolver")
    port = free_port()
    script = 'echo "${TCPREMOTEHOST-unset} ${TCPLOCALHOST-unset}"'
    server(f"-tcp:127.0.0.1:{port}", ["--lookup"], ["sh", "-c", script])
    assert talk(("127.0.0.1", port))[0] == "localhost localhost\n"
    other = free_port()
    server(f"-tcp:127.0.0.1:{other}", ["--lookup", "-l", "example.org", "-c", "1"], ["sh", "-c", script])
    assert talk(("127.0.0.1", other))[0] == "localhost example.org\n"
    third = free_port()
    server(f"-tcp:127.0.0.1:{third}", [], ["sh", "-c", script])
    assert talk(("127.0.0.1", third))[0] == "unset unset\n"
    if socket.has_ipv6 and os.path.exists("/proc/net/if_inet6"):
        # An IPv4 client of a dual-stack wildcard: its addresses arrive as ::ffff:127.0.0.1.
        dual = free_port()
        server(f"-tcp::{dual}", ["--lookup"], ["sh", "-c", script])
        assert talk(("127.0.0.1", dual))[0] == "localhost localhost\n"


def test_handler_stderr_is_the_servers(server):
    port = free_port()
    one = server(f"-tcp:127.0.0.1:{port}", ["-q"], ["sh", "-c", "echo to-stderr-$TCPREMOTEPORT >&2"])
    _, (_, client_port) = talk(("127.0.0.1", port))
    one.wait_for_line(f"to-stderr-{client_port}")
    assert "start" not in one.stderr(), "-q: no line per handler"


def test_handler_gets_the_signal_state_the_server_was_started_with(server):
    def caller_state():
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup leaves it
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})

    port = free_port()
    server(f"-tcp:127.0.0.1:{port}", [], ["cat", "/proc/self/status"], preexec_fn=caller_state)
    reply, _ = talk(("127.0.0.1", port))
    status = dict(line.split(":\t", 1) for line in reply.splitlines() if ":\t" in line)
    # Not SIGPIPE or SIGXFSZ, which Python ignores; glibc's posix_spawn (2.36) leaves its own
    # two internal signals ignored, as fdlaunch-accept(1) says.
    assert int(status["SigIgn"], 16) & ~GLIBC_INTERNAL == bit(signal.SIGHUP)
    assert int(status["SigBlk"], 16) == bit(signal.SIGUSR2)
    assert int(status["SigCgt"], 16) == 0


def test_handler_connection_is_blocking(server):
    port = free_port()
    check = "import fcntl,os; print(*(bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK) for fd in (0, 1)))"
    server(f"-tcp:127.0.0.1:{port}", [], [sys.executable, "-c", check])
    assert talk(("127.0.0.1", port))[0].split() == ["False", "False"]


def test_other_passed_sockets_are_not_handed_on(server, tmp_path):
    port, other = free_port(), free_port()
    specs = [f"-udp:127.0.0.1:{other}", f"-tcp:label=web:127.0.0.1:{port}", f"-tcp:label=admin:127.0.0.1:{free_port()}"]
    one = server(specs, ["-v", "--label=web"], [sys.executable, PROBE, "-"])
    report = parse_probe(talk(("127.0.0.1", port))[0])
    assert sorted(report["fds"]) == [0, 1, 2]
    assert "serving web=" in one.stderr() and f"127.0.0.1:{port}/tcp" in one.stderr()


# Limits


def concurrency_handler(directory):
    """A handler that notes how many handlers run at the same time as it does, in directory/counts."""
    running = directory / "running"
    running.mkdir()
    script = f"mkdir {running}/$$; ls {running} | wc -l >> {directory}/counts; sleep 0.2; rmdir {running}/$$; echo served"
    return ["sh", "-c", script]


def many_clients(port, count, source="127.0.0.1"):
    replies, errors = [], []

    def one():
        try:
            replies.append(talk(("127.0.0.1", port), source=source)[0])
        except OSError as error:
            errors.append(error)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 2)
    return replies, errors


def zombies_of(pid):
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] == "Z" and int(fields[1]) == pid:
                found.append(int(name))
    return found


def test_c_limits_handlers_and_keeps_clients_waiting(server, tmp_path):
    port = free_port()
    one = server(f"-tcp:127.0.0.1:{port}", ["-c", "3"], concurrency_handler(tmp_path))
    replies, errors = many_clients(port, 24)
    assert not errors and replies == ["served\n"] * 24, "nobody refused: the backlog held them"
    counts = [int(n) for n in (tmp_path / "counts").read_text().split()]
    assert max(counts) == 3, counts
    one.wait_for_line("end pid", 24)
    assert not zombies_of(one.process.pid)


def test_C_limits_handlers_per_address(server, tmp_path):
    port = free_port()
    one = server(f"-tcp:127.0.0.1:{port}", ["-C", "2"], ["sh", "-c", "echo served; sleep 2"])
    replies, errors = many_clients(port, 6, source="127.0.0.5")
    assert not errors
    assert sorted(replies) == ["", "", "", "", "served\n", "served\n"]
    assert one.stderr().count("refused 127.0.0.5:") == 4
    assert "2 connections from 127.0.0.5 already (-C 2)" in one.stderr()
    other, _ = talk(("127.0.0.1", port), source="127.0.0.6")
    assert other == "served\n"


def test_C_counts_by_uid_on_a_unix_socket(server, public_dir):
    require_root()
    path = public_dir / "sock"
    one = server(f"-unix:mode=0666:{path}", ["-C", "1"], ["sh", "-c", "echo served; sleep 3"])
    holder = threading.Thread(target=unix_client, args=(path,))
    holder.start()
    one.wait_for_line("start pid")
    assert unix_client(path)[0] == ""
    assert unix_client(path, user=65534)[0] == "served\n"
    holder.join(TIMEOUT)
    assert "1 connection from uid 0 already (-C 1)" in one.stderr()


# Rules


def test_rules_allow_deny_and_add_variables(server, tmp_path):
    rules = tmp_path / "rules"
    rules.write_text('# who may come\ndeny 127.0.0.3\nallow 127.0.0.0/8 GREETING="hello there" ROLE=local\n')
    port = free_port()
    one = server(f"-tcp:127.0.0.1:{port}", [f"--rules={rules}"], ["sh", "-c", 'echo "$GREETING/$ROLE"'])
    assert talk(("127.0.0.1", port), source="127.0.0.2")[0] == "hello there/local\n"
    denied, (_, denied_port) = talk(("127.0.0.1", port), source="127.0.0.3")
    assert denied == ""
    one.wait_for_line(f"warning: deny 127.0.0.3:{denied_port} (rules line 2)")


def test_rules_by_uid_on_a_unix_socket(server, public_dir):
    require_root()
    rules = public_dir / "rules"
    rules.write_text("allow uid:root ROLE=admin\ndeny all\n")
    path = public_dir / "sock"
    server(f"-unix:mode=0666:{path}", [f"--rules={rules}"], ["sh", "-c", 'echo "role $ROLE"'])
    assert unix_client(path)[0] == "role admin\n"
    assert unix_client(path, user=65534)[0] == ""


def test_no_matching_rule_denies(server, tmp_path):
    rules = tmp_path / "rules"
    rules.write_text("allow 10.0.0.0/8\n")
    port = free_port()
    one = server(f"-tcp:127.0.0.1:{port}", [f"--rules={rules}"], ["echo", "in"])
    assert talk(("127.0.0.1", port))[0] == ""
    one.wait_for_line("(no rule matched)")


def test_sighup_reads_the_rules_again_and_keeps_them_when_bad(server, tmp_path):
    rules = tmp_path / "rules"
    rules.write_text("deny all\n")
    port = free_port()
    one = server(f"-tcp:127.0.0.1:{port}", [f"--rules={rules}"], ["sh", "-c", 'echo "in $X"'])
    assert talk(("127.0.0.1", port))[0] == ""
    rules.write_text("allow 127.0.0.1 X=2\n")
    one.signal(signal.SIGHUP)
    deadline = time.monotonic() + TIMEOUT
    while (reply := talk(("127.0.0.1", port))[0]) != "in 2\n":
        assert time.monotonic() < deadline, reply
        time.sleep(0.05)
    rules.write_text("allow 127.0.0.1 X=3\nallow 300.1.2.3\n")
    one.signal(signal.SIGHUP)
    one.wait_for_line("kept the old rules")
    lines = [line for line in one.stderr().splitlines() if "kept the old rules" in line]
    assert len(lines) == 1 and "line 2" in lines[0] and "'allow 300.1.2.3'" in lines[0], lines
    assert talk(("127.0.0.1", port))[0] == "in 2\n"


# Run in a network namespace of its own: two links that both have fe80::1, as two
# hosts on two links may; fdlaunch-accept serves [::]:PORT with the rules in argv[1]
# and says who each client is; a client from each link connects; what each one read,
# and what fdlaunch-accept said, are printed as JSON.
TWO_LINKS = """
import json, socket, subprocess, sys, time
for command in ("link set lo up", "link add fdl0 type veth peer name fdl1", "link set fdl0 up", "link set fdl1 up",
                "-6 addr add fe80::1/64 dev fdl0 nodad", "-6 addr add fe80::1/64 dev fdl1 nodad"):
    subprocess.run(["ip", *command.split()], check=True)
argv = ["fdlaunch-listen", "-tcp6::7", "--", "fdlaunch-accept", "--rules=" + sys.argv[1], "--", "sh", "-c", 'echo "in $ROLE"']
server = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
replies = {}
try:
    for link in ("fdl1", "fdl0"):
        deadline = time.monotonic() + 10
        while True:
            client = socket.socket(socket.AF_INET6)
            client.settimeout(10)
            client.bind(("fe80::1", 0, 0, socket.if_nametoindex(link)))
            try:
                client.connect(("fe80::1", 7, 0, socket.if_nametoindex(link)))
                break
            except ConnectionRefusedError:  # not bound yet
                client.close()
                assert time.monotonic() < deadline, "fdlaunch-listen never bound [::]:7"
                time.sleep(0.02)
        with client:
            replies[link] = client.makefile().read()
finally:
    server.terminate()
    said = server.communicate(timeout=10)[1]
print(json.dumps({"replies": replies, "said": said}))
"""


def test_a_zoned_rule_admits_its_address_on_its_own_link_only(tmp_path):
    """fe80::1 on another link is another host: 'allow fe80::1%fdl0' never lets in the fe80::1 of fdl1."""
    require_root()
    unshare, _ = require("unshare"), require("ip")
    rules = tmp_path / "rules"
    rules.write_text("allow fe80::1%fdl0 ROLE=trusted\ndeny all\n")
    done = run([unshare, "--net", "--", sys.executable, "-c", TWO_LINKS, str(rules)])
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["replies"] == {"fdl1": "", "fdl0": "in trusted\n"}, seen["said"]
    assert "fdlaunch-accept: warning: deny [fe80::1]:" in seen["said"] and "(rules line 2)" in seen["said"]


@pytest.mark.parametrize(
    "text, fault",
    [
        ("allow 127.0.0.1\npermit all\n", "line 2: 'permit all': 'permit' is not allow or deny"),
        ("allow 10.0.0.1/8\n", "line 1: 'allow 10.0.0.1/8': '10.0.0.1/8' is not an address"),
        ("\n\nallow uid:no-such-user-here\n", "line 3"),
        ("allow all NOT-A-NAME=1\n", "'NOT-A-NAME=1' is not NAME=VALUE"),
        ("deny all X=1\n", "a deny rule cannot add variables"),
        ("allow all 'X=unclosed\n", "line 1"),
    ],
)
def test_a_bad_rules_file_is_refused_at_start(tmp_path, text, fault):
    rules = tmp_path / "rules"
    rules.write_text(text)
    port = free_port()
    done = run(["fdlaunch-listen", f"-tcp:127.0.0.1:{port}", "--", "fdlaunch-accept", f"--rules={rules}", "--", "true"])
    assert done.returncode == 100
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("fdlaunch-accept: fatal: rules file "), done.stderr
    assert fault in done.stderr


# Lifecycle


def test_sigterm_stops_accepting_and_waits_for_handlers(server):
    port = free_port()
    one = server(f"-tcp:127.0.0.1:{port}", ["-v", "--grace=15"], ["sh", "-c", "sleep 1; echo finished"])
    replies = []
    client = threading.Thread(target=lambda: replies.append(talk(("127.0.0.1", port))[0]))
    client.start()
    one.wait_for_line("start pid")
    started = time.monotonic()
    one.signal(signal.SIGTERM)
    one.wait_for_line("no new connections")  # -v: the listening socket is closed
    with pytest.raises(ConnectionRefusedError):
        talk(("127.0.0.1", port))
    assert one.process.wait(TIMEOUT) == 0
    assert time.monotonic() - started < 10, "it waited for the handler, not for --grace=15"
    client.join(TIMEOUT)
    assert replies == ["finished\n"]
    assert "exited with status 0 (0/40)" in one.stderr(), "the handler ended before the server did"


def test_sigterm_kills_handlers_still_running_after_grace(server):
    port = free_port()
    one = server(f"-tcp:127.0.0.1:{port}", ["--grace=0.5"], ["sleep", "60"])
    replies = []
    client = threading.Thread(target=lambda: replies.append(talk(("127.0.0.1", port))[0]))
    client.start()
    one.wait_for_line("start pid")
    started = time.monotonic()
    one.signal(signal.SIGTERM)
    assert one.process.wait(TIMEOUT) == 0
    assert time.monotonic() - started < 5
    client.join(TIMEOUT)
    assert replies == [""]
    assert "was killed by SIGKILL" in one.stderr()


@pytest.mark.parametrize("handler", [["sleep", "60"], ["fdlaunch-fdmap", "--map", "--", "sleep", "60"]], ids=["spawned", "fused"])
def test_handlers_never_outlive_a_killed_server(server, handler):
    port = free_port()
    one = server(f"-tcp:127.0.0.1:{port}", [], handler)
    client = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    one.wait_for_line("start pid")
    one.process.kill()
    one.process.wait(TIMEOUT)
    assert not wait_gone(one.marker, 5), "handlers and guard end when the server dies by SIGKILL"
    assert client.recv(10) == b""
    client.close()


def test_losing_the_guard_stops_the_server_and_its_handlers(server):
    port = free_port()
    one = server(f"-tcp:127.0.0.1:{port}", [], ["sleep", "60"])
    client = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    one.wait_for_line("start pid")
    pid = one.process.pid
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        kids = [int(word) for word in children.read().split()]
    guard = next(kid for kid in kids if os.getpgid(kid) == kid)
    os.kill(guard, signal.SIGKILL)
    assert one.process.wait(TIMEOUT) == 111
    assert f"fatal: the guard of the handlers (pid {guard}) is gone" in one.stderr()
    assert client.recv(10) == b""
    client.close()


def test_a_missing_handler_is_one_line_per_connection_and_the_server_goes_on(server, tmp_path):
    port = free_port()
    handler = tmp_path / "handler"
    one = server(f"-tcp:127.0.0.1:{port}", [], [str(handler)])
    assert talk(("127.0.0.1", port))[0] == ""
    assert talk(("127.0.0.1", port))[0] == ""
    one.wait_for_line("No such file or directory", 2)
    lines = one.stderr().splitlines()
    assert len([line for line in lines if "unable to exec" in line]) == 2
    assert f"fdlaunch-accept: warning: unable to exec {handler}: No such file or directory (client 127.0.0.1:" in lines[0]
    handler.write_text("#!/bin/sh\necho now here\n")
    handler.chmod(0o755)
    assert talk(("127.0.0.1", port))[0] == "now here\n"


def test_readiness_on_an_s6_notification_fd(tmp_path):
    port = free_port()
    read_end, write_end = os.pipe()
    process = subprocess.Popen(
        ["fdlaunch-listen", "--map", f"-tcp:127.0.0.1:{port}", "--", "fdlaunch-accept", f"--fd={write_end}", "--", "echo", "hi"],
        pass_fds=[write_end],
        stderr=subprocess.PIPE,
    )
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as notification:
            assert notification.readline() == b"\n"
            assert notification.read() == b"", "closed after the newline"
        assert talk(("127.0.0.1", port))[0] == "hi\n"
    finally:
        process.terminate()
        assert process.wait(TIMEOUT) == 0


# Chains and supervisors


def test_after_setuidgid_nobody(server, public_dir):
    require_root()
    require_python_for_nobody()
    port = free_port()
    chain = ["fdlaunch-setuidgid", "nobody", "--"]
    one = server(f"-tcp:127.0.0.1:{port}", [], ["sh", "-c", "id -u"], prefix=chain, directory=public_dir)
    assert talk(("127.0.0.1", port))[0] == "65534\n"
    assert os.stat(f"/proc/{one.process.pid}").st_uid == 65534


def test_s6_example_under_s6_supervise(public_dir):
    require_root()
    require_python_for_nobody()
    port = free_port()
    service = public_dir / "greet"
    shutil.copytree(EXAMPLES / "s6" / "greet", service)
    (service / "env").mkdir()
    (service / "env" / "PORT").write_text(f"{port}\n")
    with s6_supervised(service):
        assert run(["s6-svwait", "-U", "-t", "15000", str(service)]).returncode == 0
        for source in ("127.0.0.1", "127.0.0.7"):
            assert talk(("127.0.0.1", port), source=source)[0] == f"hello {source}, this is nobody\n"
        assert run(["s6-svc", "-wD", "-T", "15000", "-d", str(service)]).returncode == 0
        with pytest.raises(ConnectionRefusedError):
            talk(("127.0.0.1", port))


def test_under_systemd_socket_activate_without_accept():
    """The systemd convention: LISTEN_FDS for this pid, the socket at fd 3."""
    activate = require("systemd-socket-activate")
    port = free_port()
    process = subprocess.Popen(
        [activate, "-l", f"127.0.0.1:{port}", "fdlaunch-accept", "-q", "--", "sh", "-c", ECHO_TCP], stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                reply, (ip, client_port) = talk(("127.0.0.1", port))
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.05)
        assert reply.split() == ["TCP", ip, str(client_port), "127.0.0.1", str(port), "1"]
    finally:
        process.terminate()
        assert process.wait(TIMEOUT) == 0, process.stderr.read()
        process.stderr.close()


# Usage


@pytest.mark.parametrize(
    "options, fault",
    [
        (["-c", "0"], "-c '0': not a number of handlers"),
        (["-c", "99999999999999999999999"], "-c '99999999999999999999999'"),
        (["-C", "x"], "-C 'x'"),
        (["--grace=-1"], "--grace='-1' is not a number of seconds"),
        (["--grace=1e400"], "--grace='1e400'"),
        (["--fd=999"], "--fd='999': not an open descriptor"),
        (["-c", "1000000"], "-c 1000000 needs 1000032 descriptors, but RLIMIT_NOFILE is"),
        (["--label=nope"], "no listening stream socket labelled 'nope' among those passed (tcp)"),
    ],
)
def test_bad_usage_is_one_line_and_100(options, fault):
    done = run(["fdlaunch-listen", f"-tcp:127.0.0.1:{free_port()}", "--", "fdlaunch-accept", *options, "--", "true"])
    assert (done.returncode, done.stderr.count("\n")) == (100, 1), done.stderr
    assert fault in done.stderr


def test_nothing_passed_or_too_many_sockets(tmp_path):
    done = run(["fdlaunch-accept", "true"], env={k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")})
    assert done.returncode == 100 and "no socket was passed in" in done.stderr
    two = ["fdlaunch-listen", f"-tcp:127.0.0.1:{free_port()}", f"-unix:{tmp_path / 's'}", "--", "fdlaunch-accept", "true"]
    done = run(two)
    assert done.returncode == 100 and "2 listening stream sockets among those passed (tcp, unix); say which with --label" in done.stderr
    same = ["fdlaunch-listen", f"-tcp:label=x:127.0.0.1:{free_port()}", f"-tcp:label=x:127.0.0.1:{free_port()}", "--"]
    done = run([*same, "fdlaunch-accept", "--label=x", "true"])
    assert done.returncode == 100 and "2 listening stream sockets labelled 'x' among those passed (x, x)" in done.stderr
    udp_only = run(["fdlaunch-listen", f"-udp:127.0.0.1:{free_port()}", "--", "fdlaunch-accept", "true"])
    assert udp_only.returncode == 100 and "no listening stream socket among those passed (udp)" in udp_only.stderr


def test_a_passed_descriptor_that_is_not_a_socket(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("")
    fd = os.open(plain, os.O_RDONLY)
    try:
        env = {**os.environ, "LISTEN_FD_MAP": f"web={fd}"}
        done = run(["fdlaunch-accept", "true"], env=env, stdin=subprocess.DEVNULL, pass_fds=[fd])
    finally:
        os.close(fd)
    assert (done.returncode, done.stderr.count("\n")) == (100, 1)
    assert f"fd {fd} (web) is not a socket" in done.stderr


def test_help_is_the_usage():
    done = run(["fdlaunch-accept", "--help"])
    assert done.returncode == 0 and "fdlaunch-accept [options] [--] PROG [ARGS...]" in done.stdout


def test_a_clean_stop_leaves_nothing_a_handler_started(server):
    """After SIGTERM and --grace, what a handler left in its group is killed too, as a SIGKILLed server's guard does."""
    port = free_port()
    one = server(f"-tcp:127.0.0.1:{port}", ["--grace=0.5"], ["sh", "-c", "sleep 300 & echo started; wait"])
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as client:
        assert client.makefile().readline() == "started\n"
        assert one.stop() == 0  # and Server.stop checks that nothing of the server's is left


def test_serving_goes_on_with_sigchld_ignored(server):
    """Started with SIGCHLD ignored, the kernel reaps fast handlers before we look: still served, one after another."""
    port = free_port()
    server(f"-tcp:127.0.0.1:{port}", [], ["echo", "hi"], preexec_fn=lambda: signal.signal(signal.SIGCHLD, signal.SIG_IGN))
    for _ in range(5):
        assert talk(("127.0.0.1", port))[0] == "hi\n"


def test_a_closed_stderr_stops_nothing(tmp_path):
    """The log's reader goes away: the server keeps serving, and no handler outlives it."""
    port = free_port()
    argv = ["fdlaunch-listen", f"-tcp:127.0.0.1:{port}", "--", "fdlaunch-accept", "--", "echo", "hi"]
    process = subprocess.Popen(argv, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                assert talk(("127.0.0.1", port))[0] == "hi\n"
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        process.stderr.close()  # the next log line meets EPIPE
        for _ in range(3):
            assert talk(("127.0.0.1", port))[0] == "hi\n"
        assert process.poll() is None
        process.terminate()
        assert process.wait(TIMEOUT) == 0
    finally:
        process.kill()
        process.wait()


def test_a_unix_path_with_a_newline_is_logged_on_one_line(server, public_dir):
    """The serving line prints its address through spec.format_address: quoted, never two lines."""
    path = public_dir / "a\nb"
    one = server(f"-unix:{path}", ["-v"], ["true"])
    one.wait_for_line("serving unix=")
    line = next(line for line in one.stderr().splitlines() if "serving unix=" in line)
    assert repr(str(path)) in line, one.stderr()


def test_a_notification_fd_nobody_reads_is_a_warning_and_the_server_serves_on(tmp_path):
    path, err = tmp_path / "s", tmp_path / "stderr"
    server = unread_fd3_started(["fdlaunch-listen", "--map", f"-unix::{path}", "--", "fdlaunch-accept", "--fd=3", "--", "echo", "hi"], err)
    try:
        wait_for_line(err, "fdlaunch-accept: warning: unable to write the readiness newline on fd 3: Broken pipe")
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(TIMEOUT)
            client.connect(str(path))
            assert client.makefile("rb").read() == b"hi\n"
    finally:
        server.terminate()
        assert server.wait(TIMEOUT) == 0


def test_a_stop_with_no_handler_running_says_so(server):
    """Not 'waiting up to 10 seconds for 0 handlers'."""
    one = server("-tcp:127.0.0.1:0", ["-v"], ["true"])
    one.signal(signal.SIGTERM)
    one.wait_for_line("fdlaunch-accept: info: SIGTERM: no new connections; no handler running\n")
