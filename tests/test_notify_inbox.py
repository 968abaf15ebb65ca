"""The private notify socket of fdlaunch-notify-wait and fdlaunch-handoff, flooded by a local user, and short of descriptors.

Its abstract name shows in /proc/net/unix, so anyone can send to it. The
attacker (a real unprivileged account, tests/conftest.py) forks a chain of
processes DEPTH deep and floods from the deepest (tests/notify_flooder.py).
Nothing a sender does may hold a deadline, a signal or an exit, nor make the
log or what is kept in memory grow with the number of senders; running out
of descriptors is said as such, never blamed on the sender.
"""

import array
import os
import re
import resource
import select
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import HERE, TIMEOUT

from fdlaunch.kernel import proc
from fdlaunch.loops import readiness

DEPTH = 800
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable  # one the attacker can run
FLOODER = HERE / "notify_flooder.py"

# The program: says READY=1 once the file go exists, having written down when (CLOCK_MONOTONIC is the system's).
SAYS_READY_ON_GO = """
import os, socket, sys, time
go, sent_at = sys.argv[1:]
while not os.path.exists(go):
    time.sleep(0.01)
with open(sent_at, "w") as out:
    out.write(repr(time.monotonic()))
socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"READY=1", "\\0" + os.environ["NOTIFY_SOCKET"][1:])
time.sleep(60)
"""


def wait_for_file(path, seconds=TIMEOUT):
    """The text of path, once it appears (the flooder writes its files whole, by rename)."""
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.01)
    return path.read_text()


def notify_socket_of(pid, seconds=TIMEOUT):
    """The private socket's name, as anyone can read it in /proc/net/unix."""
    prefix = f"@fdlaunch-notify.{pid}."
    deadline = time.monotonic() + seconds
    while True:
        with open("/proc/net/unix") as table:
            for line in table:
                if line.split()[-1].startswith(prefix):
                    return line.split()[-1]
        assert time.monotonic() < deadline, f"pid {pid} has no notify socket"
        time.sleep(0.01)


class Flood:
    """tests/notify_flooder.py, run as the attacker in a process group of its own, which stop() kills whole."""

    def __init__(self, attacker, name, depth=DEPTH, senders=1, datagrams=10**6, seconds=30):
        self.directory = attacker.directory(name)
        script = attacker.script("notify_flooder.py", FLOODER.read_text())
        argv = [PYTHON, "-S", script, str(self.directory), str(depth), str(senders), str(datagrams), str(seconds)]
        self.process = attacker.popen(argv, start_new_session=True)

    def chained(self):
        wait_for_file(self.directory / "chained", 3 * TIMEOUT)  # a deep chain is slow to fork on a busy machine

    def aim(self, notify_socket):
        """Tell the deepest process where to send, and wait until it does."""
        (self.directory / "name.new").write_text(notify_socket + "\n")
        (self.directory / "name.new").rename(self.directory / "name")
        wait_for_file(self.directory / "flooding")

    def sent(self):
        """The number of datagrams sent, once the flood is over."""
        return int(wait_for_file(self.directory / "sent", 3 * TIMEOUT))

    def stop(self):
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


@pytest.fixture
def flood(attacker, request):
    made = []

    def start(**kwargs):
        made.append(Flood(attacker, f"{request.node.name}-{len(made)}", **kwargs))
        return made[-1]

    yield start
    for each in made:
        each.stop()


def waiting_for_go(tmp_path, limit=None):
    """notify-wait --fork over SAYS_READY_ON_GO: the Popen (stdout: the pid, once ready) and the path of its stderr."""
    argv = ["fdlaunch-notify-wait", "--fork", "--timeout=120", "--", PYTHON, "-c", SAYS_READY_ON_GO]
    errors = tmp_path / "stderr"
    with errors.open("w") as stderr:
        process = subprocess.Popen(
            [*argv, str(tmp_path / "go"), str(tmp_path / "sent-at")],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            preexec_fn=None if limit is None else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)),
        )
    return process, errors


def readable(fd, seconds):
    return bool(select.select([fd], [], [], seconds)[0])


def stopped(process):
    if process.poll() is None:
        process.kill()
    process.wait()


def test_a_deep_flood_does_not_hold_the_timeout(flood, tmp_path):
    """notify-wait --fork --timeout=2 exits 2 (not ready in time) on time, though a sender 800 deep floods it."""
    flood = flood()
    flood.chained()
    errors = tmp_path / "stderr"
    with errors.open("w") as stderr:
        waiter = subprocess.Popen(["fdlaunch-notify-wait", "--fork", "--timeout=2", "--", "sleep", "30"], stderr=stderr)
    try:
        notify_socket = notify_socket_of(waiter.pid)
        started = time.monotonic()  # the socket is made just before the program starts, and its 2 seconds
        flood.aim(notify_socket)
        try:
            status = waiter.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"notify-wait --timeout=2 had not exited {time.monotonic() - started:.1f} seconds later")
        took = time.monotonic() - started
    finally:
        stopped(waiter)
    assert status == 2, errors.read_text()
    assert "was not ready after 2 seconds" in errors.read_text()
    assert took < 2 + 1, f"exited {took:.2f} seconds after it made its socket"


def test_readiness_comes_through_a_deep_flood(flood, tmp_path):
    """The program says READY=1 while a sender 800 deep floods: it is seen at once."""
    waiter, errors = waiting_for_go(tmp_path)
    try:
        flood = flood()  # forked after the program started: no start time stops the walk up its chain
        flood.chained()
        flood.aim(notify_socket_of(waiter.pid))
        (tmp_path / "go").touch()
        assert readable(waiter.stdout.fileno(), TIMEOUT), "never ready: " + errors.read_text()
        line = waiter.stdout.readline()
        took = time.monotonic() - float((tmp_path / "sent-at").read_text())
        os.kill(int(line), signal.SIGKILL)
        assert waiter.wait(TIMEOUT) == 0
    finally:
        stopped(waiter)
    assert took < 1, f"ready {took:.2f} seconds after READY=1 was sent"


def test_handoff_hears_sigterm_through_a_deep_flood(flood, tmp_path):
    """fdlaunch-handoff, flooded by a sender 800 deep, stops at once on SIGTERM, and as its instance did."""
    ready_read, ready_write = os.pipe()
    with (tmp_path / "stderr").open("w") as stderr:
        handoff = subprocess.Popen(
            ["fdlaunch-handoff", f"--fd={ready_write}", "--", "sh", "-c", "fdlaunch-notify READY=1; exec sleep 60"],
            pass_fds=(ready_write,),
            stderr=stderr,
        )
    os.close(ready_write)
    try:
        ready = readable(ready_read, TIMEOUT) and os.read(ready_read, 1) == b"\n"
        assert ready, "the instance was never ready: " + (tmp_path / "stderr").read_text()
        flood = flood()
        flood.chained()
        flood.aim(notify_socket_of(handoff.pid))
        asked = time.monotonic()
        handoff.send_signal(signal.SIGTERM)
        try:
            status = handoff.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"fdlaunch-handoff had not stopped {TIMEOUT} seconds after SIGTERM")
        took = time.monotonic() - asked
    finally:
        stopped(handoff)
        os.close(ready_read)
    assert status == -signal.SIGTERM
    assert took < 1, f"stopped {took:.2f} seconds after SIGTERM"


FULL = re.compile(
    r"fdlaunch-notify-wait: warning: ignored a notification from pid \d+, (not pid \d+ or below it|gone before it could be checked)"
)
SUMMARY = re.compile(r"fdlaunch-notify-wait: warning: ignored (\d+) more notifications? from \d+( or more)? senders? in [\d.]+ seconds")


def test_a_flood_from_many_senders_is_said_in_a_few_lines(flood, tmp_path):
    """20000 datagrams from 2000 processes, each gone soon after: a few lines, which count every datagram."""
    waiter, errors = waiting_for_go(tmp_path)
    try:
        many = flood(depth=0, senders=2000, datagrams=20000)
        many.chained()
        many.aim(notify_socket_of(waiter.pid))
        sent = many.sent()
        (tmp_path / "go").touch()  # READY=1 comes after every datagram of the flood
        assert readable(waiter.stdout.fileno(), TIMEOUT), "never ready: " + errors.read_text()
        os.kill(int(waiter.stdout.readline()), signal.SIGKILL)
        assert waiter.wait(TIMEOUT) == 0
    finally:
        stopped(waiter)
    lines = errors.read_text().splitlines()
    counts = [int(SUMMARY.fullmatch(line)[1]) for line in lines if SUMMARY.fullmatch(line)]
    full = [line for line in lines if FULL.fullmatch(line)]
    assert len(full) + len(counts) == len(lines), lines
    assert len(lines) <= 3 * 3, f"{len(lines)} lines for {sent} datagrams"  # two kinds and a count a period, 30 s at most
    assert len(full) + sum(counts) == sent  # none left unsaid, none said twice


def test_what_is_said_of_strangers_takes_a_few_lines_and_bytes_however_many_they_are():
    """readiness.Ignored: one line per kind and period, one count; the senders it keeps are bounded."""
    said, now = [], [0.0]
    ignored = readiness.Ignored(lambda kind, text: said.append(text), clock=lambda: now[0])
    for pid in range(1, 100_001):
        ignored.add("stranger", pid, f"from pid {pid}")
        assert len(ignored.senders) <= readiness.IGNORED_SENDERS_KEPT
    assert said == ["from pid 1"] and ignored.due() == readiness.IGNORED_PERIOD_SECONDS
    now[0] = readiness.IGNORED_PERIOD_SECONDS
    ignored.add("stranger", 7, "from pid 7")  # the period is over: its count first, then a new one begins
    assert said[1:] == [
        f"ignored 99999 more notifications from {readiness.IGNORED_SENDERS_KEPT} or more senders in 10.0 seconds",
        "from pid 7",
    ]
    ignored.add("gone", 8, "pid 8 is gone")
    ignored.add("gone", 8, "pid 8 is gone")
    ignored.flush()
    assert said[3:] == ["pid 8 is gone", "ignored 1 more notification from 1 sender in 0.0 seconds"]
    assert ignored.due() is None


@pytest.fixture
def chain(tmp_path):
    """chain(depth): (top, deepest): the pids of a chain of processes depth deep below top, started now; killed after."""
    made = []

    def make(depth):
        directory = tmp_path / f"chain-{len(made)}"
        directory.mkdir()
        argv = [PYTHON, "-S", str(FLOODER), str(directory), str(depth), "1", "1", str(3 * TIMEOUT)]  # it waits, sending nothing
        made.append(subprocess.Popen(argv, start_new_session=True))
        return made[-1].pid, int(wait_for_file(directory / "chained", 3 * TIMEOUT))

    yield make
    for process in made:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def counting_stat_reads(monkeypatch):
    """A list that grows by one at each /proc/PID/stat read proc makes (the reads still happen)."""
    reads, read_stat = [], proc.read_stat
    monkeypatch.setattr(proc, "read_stat", lambda pid: reads.append(pid) or read_stat(pid))
    return reads


def test_the_walk_up_from_a_sender_is_bounded_by_numbers_it_does_not_choose(chain, monkeypatch):
    """Below top: believed up to WALK_DEPTH_MAX levels. Not below: one read once known, however deep its chain."""
    reads = counting_stat_reads(monkeypatch)
    sibling = chain(1)[0]  # started before the chains below, and heads none of them
    top, shallow = chain(proc.WALK_DEPTH_MAX - 1)
    below = proc.Family(top)
    reads.clear()
    assert below.lineage(shallow, None)[-1] == top and len(reads) == proc.WALK_DEPTH_MAX - 1
    top, deep = chain(proc.WALK_DEPTH_MAX + 200)
    below = proc.Family(top)
    reads.clear()
    assert top not in below.lineage(deep, None) and len(reads) == proc.WALK_DEPTH_MAX  # below top, too deep to believe
    reads.clear()
    assert below.lineage(deep, None) == (deep,) and len(reads) == 1  # and known to be so from then on
    older = proc.Family(sibling)  # deep's chain is younger than sibling: no start time stops the walk, the bound does
    reads.clear()
    assert sibling not in older.lineage(deep, None) and len(reads) == proc.WALK_DEPTH_MAX
    time.sleep(2 / os.sysconf("SC_CLK_TCK"))  # start times count clock ticks: the next top starts in a later one
    younger = proc.Family(chain(1)[0])  # started after deep: deep cannot be below it
    reads.clear()
    assert younger.lineage(deep, None) == (deep,) and len(reads) == 1


def test_the_strangers_a_family_keeps_are_bounded(chain, monkeypatch):
    monkeypatch.setattr(proc, "STRANGERS_KEPT", 5)
    olders = [subprocess.Popen(["sleep", "30"]) for _ in range(12)]
    try:
        family = proc.Family(chain(1)[0])
        for older in olders:
            assert family.top not in family.lineage(older.pid, None)
            assert len(family.strangers) <= 5
    finally:
        for older in olders:
            older.kill()
            older.wait()


# The chain-mode watcher holds 0, 1, 2, the notify socket and a pidfd on the program: under
# this limit one descriptor is left, and a notification needs two (the sender's pidfd, one
# /proc file at a time). Fork mode holds two more, the wakeup pipe its stop signals go to.
ONE_SHORT = 6
FORK_ONE_SHORT = ONE_SHORT + 2
# The program itself says READY=1 and lives on: a sender gone before it is read could not be checked at all.
SAYS_READY_AND_STAYS = [sys.executable, "-c", "import fdlaunch, time; fdlaunch.notify('READY=1'); time.sleep(30)"]


def test_out_of_descriptors_is_said_as_such_in_fork_mode(tmp_path):
    """The program's own READY=1 cannot be checked: 111, the limit named, the program stopped; never 'gone'."""
    waiter, errors = waiting_for_go(tmp_path, limit=FORK_ONE_SHORT)
    (tmp_path / "go").touch()
    try:
        status = waiter.wait(TIMEOUT)
    finally:
        stopped(waiter)
    said = errors.read_text()
    assert status == 111, said
    assert re.fullmatch(
        rf"fdlaunch-notify-wait: fatal: unable to check who sent a notification: Too many open files \(ulimit -n is {FORK_ONE_SHORT}\);"
        rf" stopped {PYTHON} \(pid (\d+)\): was killed by SIGTERM\n",
        said,
    ), said


def test_out_of_descriptors_is_said_by_the_watcher_in_chain_mode(tmp_path):
    errors = tmp_path / "stderr"
    with errors.open("w") as stderr:
        program = subprocess.Popen(
            ["fdlaunch-notify-wait", "--", *SAYS_READY_AND_STAYS],
            stderr=stderr,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (ONE_SHORT, ONE_SHORT)),
        )
    try:
        line = (
            "fdlaunch-notify-wait (watcher): fatal: unable to check who sent a notification:"
            f" Too many open files (ulimit -n is {ONE_SHORT})\n"
        )
        deadline = time.monotonic() + TIMEOUT
        while errors.read_text() != line:
            assert time.monotonic() < deadline, f"the watcher said {errors.read_text()!r}"
            time.sleep(0.02)
    finally:
        stopped(program)


def test_a_stranger_whose_descriptors_take_the_last_of_ours_cannot_stop_the_watcher(tmp_path):
    """One descriptor more than fork mode needs; a stranger sends two: its datagram is unchecked, the watcher goes on."""
    waiter, errors = waiting_for_go(tmp_path, limit=FORK_ONE_SHORT + 1)
    try:
        read_end, write_end = os.pipe()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as stranger:
            fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [write_end, write_end]))]
            stranger.sendmsg([b"READY=1"], fds, 0, "\0" + notify_socket_of(waiter.pid)[1:])
        os.close(write_end)
        assert readable(read_end, TIMEOUT) and os.read(read_end, 1) == b"", "the stranger's descriptors were kept"
        os.close(read_end)
        (tmp_path / "go").touch()
        assert readable(waiter.stdout.fileno(), TIMEOUT), "never ready: " + errors.read_text()
        os.kill(int(waiter.stdout.readline()), signal.SIGKILL)
        assert waiter.wait(TIMEOUT) == 0
    finally:
        stopped(waiter)
    assert errors.read_text() == (
        f"fdlaunch-notify-wait: warning: ignored a notification from pid {os.getpid()}, its descriptors took the last of ours"
        f" (ulimit -n is {FORK_ONE_SHORT + 1}): who sent it cannot be checked\n"
    )


def test_out_of_descriptors_is_said_by_handoff_which_goes_on_serving(tmp_path):
    """fdlaunch-handoff holds three more (its wakeup pipe, its guard's socket): the notification is dropped and said, nothing stops."""
    limit = ONE_SHORT + 3
    errors = tmp_path / "stderr"
    with errors.open("w") as stderr:
        handoff = subprocess.Popen(
            ["fdlaunch-handoff", "--", *SAYS_READY_AND_STAYS],
            stderr=stderr,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)),
        )
    try:
        line = (
            "fdlaunch-handoff: warning: unable to check who sent a notification:"
            f" Too many open files (ulimit -n is {limit}); it was dropped\n"
        )
        deadline = time.monotonic() + TIMEOUT
        while errors.read_text() != line:
            assert time.monotonic() < deadline, f"fdlaunch-handoff said {errors.read_text()!r}"
            time.sleep(0.02)
        assert handoff.poll() is None, "fdlaunch-handoff stopped"
        handoff.send_signal(signal.SIGTERM)
        assert handoff.wait(TIMEOUT) == -signal.SIGTERM
    finally:
        stopped(handoff)
