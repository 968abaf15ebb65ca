"""Hostile input, generated: the installed tools and the Python API never misbehave.

For every generated command line, environment and set of descriptors handed
down, a tool either runs the program or fails with one of fdlaunch(7)'s
statuses and exactly one line on stderr, never a traceback; it leaves no
file or socket behind in its private directory when it fails, and the
program (the probe) gets no descriptor the caller did not have, besides the
sockets the tool says it passed. listen_sockets() raises ValueError or
returns, and touches no descriptor when it raises.

Bounded: a few hundred cases in all, so the file runs in well under a
minute; each test's max_examples is its share.
"""

import contextlib
import fcntl
import io
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile

import pytest
from conftest import PROBE, parse_probe
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

import fdlaunch
import fdlaunch.errors
from fdlaunch import cli
from fdlaunch.errors import BadCall, Finished, UsageError
from fdlaunch.loops import watching
from fdlaunch.text import usage

STATUSES = {0, 100, 111, 126, 127}
# No explain phase: after a failure it reruns the slow case hundreds of times.
FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), database=None, phases=[Phase.generate, Phase.shrink])
TIMEOUT = 20

# Values chosen to sit on every edge the parsers have, plus arbitrary text.
NUMBERS = ["0", "1", "2", "3", "7", "65535", "65536", "2147483647", "2147483648", "4294967294", "4294967295", "99999999999", "9" * 30]
JUNK = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=12)
TEXT = st.one_of(st.sampled_from(NUMBERS + ["", "-1", "+3", "0x10", "1e3", "nan", "a\nb", "é", "unlimited", "x=3"]), JUNK)


def private_dir():
    return tempfile.mkdtemp(prefix="fdl-fuzz.")


def snapshot(directory):
    """Every path under directory, with whether it is a socket."""
    found = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, directory)] = stat.S_ISSOCK(os.lstat(path).st_mode)
    return found


def launch(argv, environ, caller_fds, directory, self_pid=False):
    """Run argv in directory with the fds {fd: source fd} handed down, and nothing else above stderr.

    bash (dash takes single-digit fds only) moves the sources into place,
    closes them, and execs the tool, which keeps bash's pid: so self_pid can
    set LISTEN_PID to the tool's own pid.
    """
    moves = " ".join(f"{target}<&{source}" for target, source in caller_fds.items())
    closes = " ".join(f"{source}<&-" for source in set(caller_fds.values()))
    script = f"exec {moves} {closes}; " if caller_fds else ""
    script += 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"' if self_pid else 'exec "$@"'
    environ = {"PATH": os.environ["PATH"], "TMPDIR": directory, **environ}
    return subprocess.run(
        ["bash", "-c", script, "bash", *argv],
        env=environ,
        cwd=directory,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        pass_fds=tuple(set(caller_fds.values())),
        timeout=TIMEOUT,
        text=True,
        errors="replace",
    )


def check(done, tool, caller_fds, before, directory, statuses=STATUSES, probe=True, leaves_nothing=True):
    """The invariants every run keeps; returns the probe's report when the program ran.

    probe: a status of 0 means the probe ran and printed its report;
    leaves_nothing: not even a successful run leaves a file (unix socket
    files a successful fdlaunch-listen bound stay for the program).
    """
    assert done.returncode in statuses, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr, done.stderr
    if done.returncode != 0:
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and done.stderr.endswith("\n"), done.stderr
        assert lines[0].startswith((f"{tool}: fatal: ", f"{tool}: usage: {tool} ")), done.stderr
    if done.returncode != 0 or leaves_nothing:
        after = snapshot(directory)
        assert after == before, f"left behind: {set(after) - set(before)}"
    if done.returncode != 0 or not probe:
        return None
    report = parse_probe(done.stdout)
    passed = passed_fds(report["env"])
    allowed = {0, 1, 2} | set(caller_fds) | passed
    assert set(report["fds"]) <= allowed, (report["fds"], allowed)
    return report


def passed_fds(environ):
    """The fds the environment says were passed, by either convention, as far as it parses."""
    found = set()
    for item in environ.get("LISTEN_FD_MAP", "").split(","):
        fd = item.rpartition("=")[2]
        if fd.isdigit() and len(fd) < 10:
            found.add(int(fd))
    count = environ.get("LISTEN_FDS", "")
    if count.isdigit() and len(count) < 6:
        found |= set(range(3, 3 + int(count)))
    return found


@pytest.fixture(scope="module")
def sources():
    """Descriptors the caller may hand down: two sockets, a regular file and a listening TCP socket, at fds above pytest's own."""
    left, right = socket.socketpair()
    listening = socket.create_server(("127.0.0.1", 0))
    made = {}
    handed = (
        ("socket", left.detach()),
        ("socket2", right.detach()),
        ("file", os.open(os.devnull, os.O_RDONLY)),
        ("listening", listening.detach()),
    )
    for name, fd in handed:
        made[name] = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100)  # above every fd a case hands down
        os.close(fd)
    yield made
    for fd in made.values():
        os.close(fd)


CALLER_FDS = st.dictionaries(st.sampled_from([3, 4, 5, 7, 9]), st.sampled_from(["socket", "socket2", "file"]), max_size=3)


def environment(fd_words=("3", "4", "5", "7", "9")):
    """LISTEN_* values: mostly near-valid, sometimes junk; 'self' asks for the tool's own pid."""
    fd = st.one_of(st.sampled_from(list(fd_words) + ["0", "1", "2", "1023", "2147483648", "99999999999"]), TEXT)
    label = st.one_of(st.sampled_from(["web", "dns", "unknown", "a.b-c_d", "x" * 256]), JUNK)
    item = st.one_of(st.builds(lambda lab, f: f"{lab}={f}", label, fd), JUNK)
    return st.fixed_dictionaries(
        {},
        optional={
            "LISTEN_FDS": st.one_of(st.sampled_from(["0", "1", "2", "3", "9999999999", "50000000"]), TEXT),
            "LISTEN_PID": st.one_of(st.just("self"), st.sampled_from(["1", "0", "99999999999", "9" * 5000]), TEXT),
            "LISTEN_FDNAMES": st.one_of(st.lists(label, max_size=3).map(":".join), TEXT),
            "LISTEN_FD_MAP": st.one_of(st.lists(item, max_size=3).map(",".join), TEXT),
        },
    )


@st.composite
def handed_down(draw):
    """(layout, environment): {fd: source name} handed down, and LISTEN_* describing them, or not quite."""
    layout = draw(CALLER_FDS)
    kind = draw(st.sampled_from(["nothing", "nothing", "map", "systemd", "edges"]))
    if kind == "nothing":
        return draw(st.sampled_from([{}, layout])), {}
    if kind == "edges":
        return layout, draw(environment())
    labels = st.sampled_from(["web", "dns", "ctl"])
    if kind == "map":
        named = draw(st.lists(st.sampled_from(sorted(fd for fd, name in layout.items() if name != "file") or [3]), unique=True))
        return layout, {"LISTEN_FD_MAP": ",".join(f"{draw(labels)}={fd}" for fd in named)}
    count = draw(st.integers(0, 3))
    layout = {fd: name for fd, name in layout.items() if fd > 2 + count} | {3 + i: f"socket{'2' if i % 2 else ''}" for i in range(count)}
    environ = {"LISTEN_FDS": str(count), "LISTEN_PID": "self"}
    if draw(st.booleans()):
        environ["LISTEN_FDNAMES"] = ":".join(draw(labels) for _ in range(count))
    return layout, environ


def split_self(environ):
    environ = dict(environ)
    self_pid = environ.get("LISTEN_PID") == "self"
    if self_pid:
        del environ["LISTEN_PID"]
    return environ, self_pid


def run_case(argv, tool, environ, layout, sources, **expect):
    environ, self_pid = split_self(environ)
    caller_fds = {target: sources[name] for target, name in layout.items()}
    directory = private_dir()
    try:
        before = snapshot(directory)
        done = launch(argv, environ, caller_fds, directory, self_pid)
        event(f"exit {done.returncode}")
        return check(done, tool, caller_fds, before, directory, **expect)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


PROBE_ARGV = [sys.executable, PROBE, "-"]
PROGRAMS = st.sampled_from([PROBE_ARGV] * 6 + [["/nonexistent-fdl-fuzz"], ["/"], ["a\nb"]])


# fdlaunch-listen: socket specs


def mostly(good, edge):
    """Mostly good values, so that runs get past parsing; now and then one from the edges."""
    return st.integers(0, 4).flatmap(lambda pick: edge if pick == 0 else good)


def spec_text():
    option_value = {
        "label": mostly(st.sampled_from(["web", "dns", "a.b-c_d"]), st.one_of(st.sampled_from(["x" * 256, ""]), JUNK)),
        "fd": mostly(st.sampled_from(["3", "4", "5", "6", "12"]), st.sampled_from(["0", "2", "1023", "1024", "2147483648", "9" * 30])),
        "var": mostly(st.sampled_from(["WEB", "DNS_FD"]), st.sampled_from(["LISTEN_FDS", "9x", "a b"])),
        "backlog": mostly(st.sampled_from(["0", "1", "128"]), st.sampled_from(NUMBERS)),
        "rcvbuf": mostly(st.sampled_from(["4096", "64K", "1M"]), st.sampled_from(["3G", "0", "9" * 30 + "K"])),
        "sndbuf": st.sampled_from(["8K", "2G", "1M", "2048M"]),
        "device": mostly(st.just("lo"), st.sampled_from(["nosuchdev0", "a/b", "x" * 20])),
        "mode": mostly(st.sampled_from(["0600", "0660", "0777"]), st.sampled_from(["1777", "8", "99999999999"])),
        "owner": mostly(
            st.sampled_from(["nobody", "65534:65534", "root:root", "0"]),
            st.sampled_from(["99999999999", "0:4294967295", "nosuchuser", "a\x01b", "nobody:nosuchgroup"]),
        ),
    }
    flags = ["reuseport", "v6only", "freebind", "mkdir", "shareddir", "transparent", "bogus"]
    item = st.one_of(
        st.sampled_from(flags),
        st.sampled_from(sorted(option_value)).flatmap(lambda name: option_value[name].map(lambda value: f"{name}={value}")),
    )
    options = st.lists(item, max_size=2, unique_by=lambda text: text.partition("=")[0]).map(",".join)
    # Never a fixed port: 0, or one no bind can take. Unix paths stay inside the private directory.
    inet = mostly(
        st.sampled_from(["0", "127.0.0.1:0", "[::1]:0", ":0", "localhost:0"]),
        st.sampled_from(["65536", "99999999999", "nosuchservice", "[::1]", "1.2.3:0", "[1.2.3.4]:0", "nosuchhost.invalid:0"]),
    )
    unix = mostly(
        st.one_of(
            st.sampled_from(["s.sock", "t.sock", "sub/dir/s.sock", "a\nb.sock"]),
            st.builds(lambda name: f"@fdl-fuzz-{name}", st.text(alphabet="abcdef0123456789", min_size=8, max_size=8)),
        ),
        st.one_of(st.sampled_from(["@", "", "x" * 120, "missing/s.sock"]), JUNK.filter(lambda text: "/" not in text)),
    )
    inet_spec = st.tuples(st.sampled_from(["tcp", "tcp4", "tcp6", "udp", "udp4", "udp6"]), inet)
    unix_spec = st.tuples(st.sampled_from(["unix", "unix-dgram", "unix-seqpacket"]), unix)
    mixed = st.tuples(mostly(st.sampled_from(["tcp", "udp", "unix"]), JUNK), st.one_of(inet, unix))
    structured = st.builds(
        lambda pair, o, short: f"-{pair[0]}:{pair[1]}" if short else f"-{pair[0]}:{o}:{pair[1]}",
        mostly(st.one_of(inet_spec, unix_spec), mixed),
        options,
        st.booleans(),
    )
    return st.integers(0, 9).flatmap(lambda pick: JUNK.map(lambda text: "-" + text) if pick == 0 else structured)


@settings(FUZZ, max_examples=50)
@given(
    specs=st.lists(spec_text(), min_size=1, max_size=2),
    flags=st.lists(st.sampled_from(["--map", "--dry-run", "-v"]), max_size=2, unique=True),
    handed=handed_down(),
    program=PROGRAMS,
)
def test_listen(sources, specs, flags, handed, program):
    layout, environ = handed
    argv = ["fdlaunch-listen", *flags, *specs, "--", *program]
    report = run_case(argv, "fdlaunch-listen", environ, layout, sources, probe="--dry-run" not in flags, leaves_nothing=False)
    if report is not None:
        assert report["argv"][1:] == ["-"]


# fdlaunch-fdmap: modes and the environment it reads


@settings(FUZZ, max_examples=30)
@given(
    mode=st.one_of(
        st.sampled_from([["--systemd"], ["--map"], ["--vars"], ["--vars=FD_"], ["--vars=9"], ["--stdin=web"], ["--stdin=a\nb"], []]),
        st.builds(lambda order: ["--systemd", f"--order={order}"], mostly(st.sampled_from(["web", "web,dns", "dns"]), JUNK)),
    ),
    handed=handed_down(),
    program=PROGRAMS,
)
def test_fdmap(sources, mode, handed, program):
    layout, environ = handed
    # --stdin puts the socket on fds 0 and 1: the probe reports into the socket, not to us.
    inetd = any(word.startswith("--stdin=") for word in mode)
    run_case(["fdlaunch-fdmap", *mode, "--", *program], "fdlaunch-fdmap", environ, layout, sources, probe=not inetd)


# fdlaunch-setuidgid: accounts, options and UID/GID/GIDLIST


def account():
    part = st.sampled_from(["nobody", "root", "nogroup", "65534", "0", "4294967294", "4294967295", "99999999999", "nosuch", "00"])
    good = st.sampled_from(["nobody", "65534", "nobody:nogroup", "65534:0", "nobody:root", "65534:65534", "daemon"])
    return mostly(good, st.one_of(part, st.builds(lambda u, g: f"{u}:{g}", part, part), JUNK))


SETUIDGID_OPTIONS = st.lists(
    st.one_of(
        st.sampled_from(["--env", "--setsid", "--no-new-privs", "--export", "--from-env", "--bogus"]),
        st.builds(
            lambda v: f"--groups={v}",
            mostly(st.sampled_from(["", "0", "nogroup,100"]), st.one_of(st.sampled_from(["99999999999", "a,,b"]), JUNK)),
        ),
        st.builds(lambda v: f"--umask={v}", mostly(st.sampled_from(["022", "0077", "7"]), TEXT)),
        st.builds(
            lambda v: f"--nice={v}",
            mostly(st.sampled_from(["5", "-3", "0"]), st.one_of(st.sampled_from(["-40", "41", "99999999999"]), JUNK)),
        ),
        st.builds(lambda v: f"--keep-cap={v}", st.sampled_from(["net_bind_service", "cap_chown,kill", "setuid", "setgid", "nosuch", ""])),
        # only resources whose limit cannot stop the probe itself from starting
        st.builds(
            lambda r, v: f"--limit={r}={v}",
            st.sampled_from(["core", "nice", "rtprio", "msgqueue", "locks", "sigpending", "nosuch"]),
            mostly(
                st.sampled_from(["0", "unlimited", "5:10", "1:unlimited"]),
                st.one_of(st.sampled_from(["10:5", "9" * 25, "9223372036854775807"]), TEXT),
            ),
        ),
        st.builds(lambda v: f"--chdir={v}", st.sampled_from(["/", "/tmp", "/nonexistent", "/root", "a\nb"])),
    ),
    max_size=3,
)
ID_ENVIRONMENT = st.fixed_dictionaries({}, optional={"UID": TEXT, "GID": TEXT, "GIDLIST": st.one_of(TEXT, st.just("0,65534"))})


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: changes credentials for real")
@settings(FUZZ, max_examples=30)
@given(options=SETUIDGID_OPTIONS, who=account(), environ=ID_ENVIRONMENT, program=PROGRAMS)
def test_setuidgid(sources, options, who, environ, program):
    words = [*options] if "--from-env" in options else [*options, who]
    report = run_case(["fdlaunch-setuidgid", *words, "--", *program], "fdlaunch-setuidgid", environ, {}, sources)
    user = who.partition(":")[0]
    if report is not None and "--export" not in options and "--from-env" not in options:
        assert 0 not in report["uid"] or user == "root" or (user.isdigit() and int(user) == 0)


# fdlaunch-notify-wait: its options and NOTIFY_SOCKET (the watcher's trust is tested elsewhere)

NOTIFY_OPTIONS = st.lists(
    st.one_of(
        st.sampled_from(["--forward", "--stop", "--kill", "--fork", "--bogus"]),
        st.builds(
            lambda v: f"--fd={v}", mostly(st.sampled_from(["3", "5"]), st.one_of(st.sampled_from(["0", "99999999999", "9" * 30]), JUNK))
        ),
        st.builds(
            lambda v: f"--timeout={v}",
            mostly(st.sampled_from(["0.5", "3", "1_0"]), st.one_of(st.sampled_from(["0", "-1", "nan", "inf", "1e999"]), JUNK)),
        ),
        st.builds(lambda v: f"--command={v}", st.sampled_from(["true", "exit 3"])),
    ),
    max_size=3,
    unique_by=lambda text: text.partition("=")[0],
)
NOTIFY_SOCKET = st.fixed_dictionaries(
    {},
    optional={
        "NOTIFY_SOCKET": mostly(
            st.sampled_from(["/nonexistent/notify", "@fdl-fuzz-nobody"]), st.one_of(st.sampled_from(["@", "", "relative", "a\nb"]), JUNK)
        )
    },
)


@settings(FUZZ, max_examples=30)
@given(options=NOTIFY_OPTIONS, environ=NOTIFY_SOCKET, layout=CALLER_FDS, program=PROGRAMS)
def test_notify_wait(sources, options, environ, layout, program):
    # --fork's own statuses (fdlaunch-notify-wait(1)): the program exited before it was ready, or
    # was not ready in time. Its program writes to our stderr, so it is one that prints nothing.
    forked = "--fork" in options
    statuses = STATUSES | ({watching.EXITED_BEFORE_READY, watching.NOT_READY_IN_TIME} if forked else set())
    if forked and program == PROBE_ARGV:
        program = ["true"]
    # --fd=1 makes stdout the notification fd, which the program does not inherit: no report to read.
    argv = ["fdlaunch-notify-wait", *options, "--", *program]
    run_case(argv, "fdlaunch-notify-wait", environ, layout, sources, statuses=statuses, probe=not forked and "--fd=1" not in options)


# fdlaunch-adopt: what it is handed (the bind filter itself is test_adopt.py's)


@settings(FUZZ, max_examples=30)
@given(
    handed=st.one_of(
        handed_down(), st.builds(lambda labels: ({3: "listening"}, {"LISTEN_FD_MAP": f"{labels}=3"}), st.sampled_from(["web", "dns"]))
    ),
    options=st.lists(st.sampled_from(["--strict", "-v", "--bogus"]), max_size=2, unique=True),
    program=PROGRAMS,
)
def test_adopt(sources, handed, options, program):
    layout, environ = handed
    report = run_case(["fdlaunch-adopt", *options, "--", *program], "fdlaunch-adopt", environ, layout, sources)
    if report is not None:
        assert not [name for name in report["env"] if name.startswith("LISTEN_")]
        mapped = passed_fds({"LISTEN_FD_MAP": environ.get("LISTEN_FD_MAP", "")})  # a map that a run which went on has read
        assert not set(report["fds"]) & mapped, "the passed sockets are not the program's"


# The Python API, in-process, on real descriptors.


def fd_table():
    """Every open fd with what it is and whether it is inheritable."""
    table = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            info = os.fstat(fd)
        except OSError:
            continue
        table[fd] = (info.st_dev, info.st_ino, os.get_inheritable(fd))
    return table


@pytest.fixture(scope="module")
def api_fds():
    """Sockets, a regular file and a closed fd at high numbers, for LISTEN_FD_MAP to name."""
    made = {}
    for name in ("a", "b", "c"):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        made[name] = os.dup2(sock.detach(), 300 + len(made))
    made["file"] = os.dup2(os.open(os.devnull, os.O_RDONLY), 310)
    made["closed"] = 311
    yield made
    for name, fd in made.items():
        if name != "closed":
            os.close(fd)


def api_environment():
    """Maps that mostly name the sockets at 300 to 302, now and then something else; or any environment."""
    fd = mostly(st.sampled_from(["300", "301", "302"]), st.sampled_from(["310", "311", "0", "2", "1023", "2147483648", "9" * 30]))
    item = st.builds(lambda label, number: f"{label}={number}", st.sampled_from(["web", "dns"]), fd)
    maps = st.lists(item, min_size=1, max_size=3, unique_by=lambda text: text.partition("=")[2]).map(
        lambda items: {"LISTEN_FD_MAP": ",".join(items)}
    )
    return mostly(maps, environment(fd_words=("300", "301", "302", "310", "311")))


@settings(FUZZ, max_examples=250)
@given(environ=api_environment(), unset=st.booleans())
def test_listen_sockets_api(api_fds, environ, unset):
    environ = dict(environ)
    if environ.get("LISTEN_PID") == "self":
        environ["LISTEN_PID"] = str(os.getpid())
    saved = {name: os.environ.pop(name) for name in list(os.environ) if name.startswith("LISTEN_")}
    os.environ.update(environ)
    before = fd_table()
    try:
        try:
            found = fdlaunch.listen_sockets(unset_environment=unset)
        except ValueError:
            found = None
        if found is None:
            # Whatever the call made is freed by now (reference counting): had it
            # wrapped the caller's fds in sockets, they would be closed.
            assert fd_table() == before
            assert {k: v for k, v in os.environ.items() if k.startswith("LISTEN_")} == environ
            event("ValueError")
            return
        event(f"{sum(map(len, found.values()))} sockets")
        returned = [sock for group in found.values() for sock in group]
        flags = {sock.fileno(): os.get_inheritable(sock.fileno()) for sock in returned}
        for sock in returned:
            fd = sock.fileno()
            os.set_inheritable(fd, before[fd][2])  # give the caller's fds back as they were
            sock.detach()
        assert fd_table() == before
        assert not any(flags.values())
        if unset:
            assert not [name for name in os.environ if name.startswith("LISTEN_")]
    finally:
        for name in [name for name in os.environ if name.startswith("LISTEN_")]:
            del os.environ[name]
        os.environ.update(saved)


# Every tool's own options, read in-process: the reader in front of docopt
# (and the only reader for fdlaunch-listen and fdlaunch-fdmap) answers any
# argv with options, a one-line usage error, or --help/--version.

TOOL_DOCS = {
    name: __import__(f"fdlaunch.cmd.{name}", fromlist=["main"]).__doc__ for name in ("listen", "fdmap", "notify_wait", "setuidgid", "adopt")
}


@st.composite
def option_words(draw, doc):
    spellings = sorted(usage.options_of(doc))
    word = st.one_of(
        st.sampled_from(spellings),
        st.sampled_from(spellings).flatmap(lambda s: st.sampled_from([s[:3], s[:-1], s + "x", s[1:]])),
        st.builds(lambda s, v: f"{s}={v}", st.sampled_from(spellings), TEXT),
        st.sampled_from(["--", "-", "--=", "--=x", "---", "-vv", "-vh", "-hv", "-1", "--\udcff", "-\udcff", "prog"]),
        TEXT,
    )
    return draw(st.lists(word, max_size=6))


@settings(FUZZ, max_examples=300)
@given(st.sampled_from(sorted(TOOL_DOCS)).flatmap(lambda name: st.tuples(st.just(TOOL_DOCS[name]), option_words(TOOL_DOCS[name]))))
def test_option_reader(case):
    doc, argv = case
    read = cli.read if doc.startswith(("fdlaunch-listen", "fdlaunch-fdmap")) else cli.parse  # as each tool reads
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            options = read(doc, argv)
    except UsageError as error:
        event("refused")
        assert "\n" not in fdlaunch.errors.one_line(str(error))
        assert isinstance(error, BadCall) or "(usage: " in str(error)
    except Finished as done:
        event("help or version")
        assert done.status == 0
    else:
        event("read")
        assert isinstance(options, dict)
