"""fdlaunch-fdmap --subst: fd numbers on a command line without a shell, down to a real kresd."""

import os
import pwd
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest
from conftest import TIMEOUT, require, require_root, run, s6_supervised
from hypothesis import given
from hypothesis import strategies as st

from fdlaunch.errors import UsageError
from fdlaunch.text.fdplan import substitute
from fdlaunch.text.listenenv import Passed

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PASSED = [Passed("udp", 3), Passed("tcp", 4), Passed("dns", 5), Passed("dns", 6), Passed("my-web.1", 9)]


@pytest.mark.parametrize(
    "words, expected",
    [
        (["-S", "{udp}", "-S", "{tcp}"], ["-S", "3", "-S", "4"]),
        (["--fd={my-web.1}", "{udp}:{tcp}"], ["--fd=9", "3:4"]),
        (["{{udp}}", "{{", "}}", "a{{b}}c"], ["{udp}", "{", "}", "a{b}c"]),
        (["{{{udp}}}"], ["{3}"]),
        (["plain", "", "$U"], ["plain", "", "$U"]),
        ([], []),
    ],
)
def test_substitute(words, expected):
    assert substitute(words, PASSED) == expected


@pytest.mark.parametrize(
    "word, message",
    [
        ("{dns}", "--subst: '{dns}': 2 sockets (fds 5,6) are labelled 'dns'; it needs exactly one"),
        ("-S{nope}", "--subst: '{nope}' in '-S{nope}': no socket is labelled 'nope'; it needs exactly one"),
        ("{}", "no socket is labelled ''"),
        ("{udp", "--subst: '{udp' has a lone '{'; write '{{' for a literal brace"),
        ("udp}", "--subst: 'udp}' has a lone '}'; write '}}' for a literal brace"),
        ("{{udp}", "has a lone '}'"),
        ("{a{udp}", "has a lone '{'"),
        ("{ud\np}", "'{ud\\np}'"),
    ],
)
def test_substitute_refuses(word, message):
    with pytest.raises(UsageError) as refused:
        substitute(["ok", word], PASSED)
    assert message in str(refused.value)
    assert "\n" not in str(refused.value)


def escape(text):
    return text.replace("{", "{{").replace("}", "}}")


@given(st.lists(st.text()))
def test_escaped_words_come_back_unchanged(words):
    assert substitute([escape(w) for w in words], PASSED) == words


LABELS = st.sampled_from(["udp", "tcp", "my-web.1"])
PIECES = st.lists(st.one_of(st.tuples(st.just("text"), st.text()), st.tuples(st.just("label"), LABELS)))


@given(st.lists(PIECES))
def test_each_label_becomes_its_fd_and_the_rest_is_kept(words):
    fd = {p.label: str(p.fd) for p in PASSED}
    template = ["".join(escape(v) if kind == "text" else "{" + v + "}" for kind, v in pieces) for pieces in words]
    expected = ["".join(v if kind == "text" else fd[v] for kind, v in pieces) for pieces in words]
    assert substitute(template, PASSED) == expected


def test_subst_through_the_tools():
    argv = ["fdlaunch-listen", "-udp:127.0.0.1:0", "-tcp:label=web:127.0.0.1:0", "--", "fdlaunch-fdmap", "-v", "--subst", "--"]
    script = 'echo "$0 $1 $2"; cat /proc/self/environ'
    done = run([*argv, "sh", "-c", script, "-S{udp}", "{web}", "{{x}}"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("-S3 4 {x}\n")
    assert "LISTEN_FD_MAP=udp=3,web=4\0" in done.stdout  # the environment is left as it came
    assert done.stderr.endswith(f"fdlaunch-fdmap: info: arguments now {['-c', script, '-S3', '4', '{x}']!r}\n")


@pytest.mark.parametrize(
    "specs, argument, message",
    [
        (["-udp:label=dns:127.0.0.1:0", "-tcp:label=dns:127.0.0.1:0"], "{dns}", "2 sockets (fds 3,4) are labelled 'dns'"),
        (["-udp:127.0.0.1:0"], "{tcp}", "no socket is labelled 'tcp'; it needs exactly one (passed: udp)"),
        ([], "{tcp}", "(passed: none)"),
        (["-udp:127.0.0.1:0"], "{", "lone '{'"),
    ],
)
def test_subst_refusals_through_the_tools(specs, argument, message):
    argv = ["fdlaunch-listen", *specs, "--", "fdlaunch-fdmap", "--subst", "--", "echo", argument]
    done = run(argv if specs else argv[2:])
    assert done.returncode == 100
    assert done.stderr.startswith("fdlaunch-fdmap: fatal: --subst: ") and message in done.stderr
    assert done.stderr.count("\n") == 1 and done.stdout == ""


def dns_query(name, ident):
    header = struct.pack(">HHHHHH", ident, 0x0100, 1, 0, 0, 0)  # RD, one question
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.split("."))
    return header + labels + b"\0" + struct.pack(">HH", 1, 1)  # A, IN


def a_record(reply, ident):
    """The address of the one A record answering our question (RFC 1035 4.1)."""
    got_ident, flags, _, answers = struct.unpack(">HHHH", reply[:8])
    assert got_ident == ident and flags & 0x8000 and flags & 0xF == 0 and answers == 1, reply
    assert reply[-6:-4] == b"\x00\x04", "an A record's RDLENGTH is 4"
    return socket.inet_ntoa(reply[-4:])


def ask_udp(port, name, seconds=15):
    deadline = time.monotonic() + seconds
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(0.5)
        while True:
            client.sendto(dns_query(name, 0x5555), ("127.0.0.1", port))
            try:
                return a_record(client.recv(4096), 0x5555)
            except (TimeoutError, ConnectionRefusedError):
                assert time.monotonic() < deadline, "kresd did not answer over UDP"


def ask_tcp(port, name):
    query = dns_query(name, 0x7777)
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as client:
        client.sendall(struct.pack(">H", len(query)) + query)
        stream = client.makefile("rb")
        (length,) = struct.unpack(">H", stream.read(2))
        return a_record(stream.read(length), 0x7777)


def free_port_both():
    for _ in range(50):
        with socket.socket() as tcp, socket.socket(type=socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            try:
                udp.bind(("127.0.0.1", tcp.getsockname()[1]))
            except OSError:
                continue
            return tcp.getsockname()[1]
    pytest.fail("no port free for both TCP and UDP")


def stop(process):
    process.terminate()
    try:
        process.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def test_kresd_answers_over_udp_and_tcp_with_no_shell_in_the_chain(tmp_path):
    kresd = require("kresd")
    port = free_port_both()
    shutil.copy(EXAMPLES / "s6" / "kresd" / "kresd.conf", tmp_path / "kresd.conf")  # its cache goes in tmp_path
    argv = [
        "fdlaunch-listen",
        f"-udp:127.0.0.1:{port}",
        f"-tcp:127.0.0.1:{port}",
        "--",
        "fdlaunch-fdmap",
        "--subst",
        "--",
        kresd,
        "-n",
        "-S",
        "{udp}",
        "-S",
        "{tcp}",
        "-c",
        str(tmp_path / "kresd.conf"),
        str(tmp_path),
    ]
    with open(tmp_path / "log", "w") as log:
        daemon = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        assert ask_udp(port, "hello.fdlaunch.net") == "192.0.2.53", (tmp_path / "log").read_text()
        assert ask_tcp(port, "hello.fdlaunch.net") == "192.0.2.53"
        # the chain execs all the way: the pid started is kresd, with the sockets at 3 and 4
        assert os.readlink(f"/proc/{daemon.pid}/exe") == os.path.realpath(kresd)
        assert Path(f"/proc/{daemon.pid}/cmdline").read_bytes().split(b"\0")[1:6] == [b"-n", b"-S", b"3", b"-S", b"4"]
    finally:
        stop(daemon)


def test_the_kresd_example_under_s6_from_a_copy(tmp_path):
    """examples/s6/kresd copied out of the checkout, started as its run script says: ready, then answering."""
    require_root()
    require("kresd")
    os.chmod(tmp_path, 0o755)
    service = tmp_path / "kresd"
    assert run(["cp", "-a", str(EXAMPLES / "s6" / "kresd"), str(service)]).returncode == 0
    port = free_port_both()
    (service / "env").mkdir()
    (service / "env" / "PORT").write_text(f"{port}\n")
    with s6_supervised(service):
        assert run(["s6-svwait", "-U", "-t", "15000", str(service)]).returncode == 0
        pid = int(run(["s6-svstat", "-o", "pid", str(service)]).stdout)
        assert ask_udp(port, "hello.fdlaunch.net", seconds=2) == ask_tcp(port, "hello.fdlaunch.net") == "192.0.2.53"
        assert os.readlink(f"/proc/{pid}/exe") == os.path.realpath(shutil.which("kresd"))
        assert os.stat(f"/proc/{pid}").st_uid == pwd.getpwnam("knot-resolver").pw_uid
