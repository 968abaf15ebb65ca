"""fdlaunch-notify-wait --touch=FILE: readiness for an orchestrator's probe, a file that exists while the program is ready."""

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TIMEOUT, require_root, run

# The program: says 'started', READY=1 when told 'ready' on stdin, exits with N when told 'exit N'.
PROGRAM = [
    sys.executable,
    "-c",
    "import sys, fdlaunch\n"
    "print('started', flush=True)\n"
    "for line in sys.stdin:\n"
    "    if line == 'ready\\n': fdlaunch.notify('READY=1')\n"
    "    if line.startswith('exit'): sys.exit(int(line.split()[1]))\n",
]


def wait_until(condition, what, seconds=TIMEOUT):
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def children(pid):
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def ignored(pid):
    """The signals pid ignores, from /proc/PID/status."""
    mask = int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigIgn:")).split()[1], 16)
    return {number for number in signal.Signals if mask & (1 << (number - 1))}


def test_chain_mode_the_file_exists_from_readiness_to_the_programs_exit(reachable):
    """Under fdlaunch-init (a subreaper, so the watcher is its child and can be found): the watcher keeps the
    file while the program runs, even when sent SIGTERM, and removes it when the program exits."""
    ready = reachable / "ready"
    argv = ["fdlaunch-init", "--", "fdlaunch-notify-wait", f"--touch={ready}", "--", *PROGRAM]
    init = subprocess.Popen(argv, stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # fdlaunch-init's children: the program, the watcher, and init's guard, which leads a process group of its own
        chain = lambda: [pid for pid in children(init.pid) if os.getpgid(pid) != pid]  # noqa: E731
        program, watcher = wait_until(lambda: chain() if len(chain()) == 2 else None, "the watcher")
        assert not ready.exists(), "the file before READY=1"
        init.stdin.write("ready\n")
        init.stdin.flush()
        info = wait_until(lambda: ready.exists() and ready.stat(), "the file")
        assert (stat.S_IMODE(info.st_mode), info.st_size, stat.S_ISREG(info.st_mode)) == (0o644, 0, True)
        assert not [name for name in os.listdir(reachable) if name != "ready"], "a temporary file was left"
        os.kill(watcher, signal.SIGTERM)  # meant for the program's group: the file stays
        assert {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT} <= ignored(watcher) and ready.exists()
        init.stdin.write("exit 7\n")
        init.stdin.close()
        assert init.wait(TIMEOUT) == 7
        assert not ready.exists()
        assert init.stderr.read() == ""
    finally:
        init.kill()
        init.wait()


def test_fork_mode_leaves_a_process_that_removes_the_file_at_the_programs_exit(reachable):
    ready = reachable / "ready"
    script = f"import fdlaunch, time; fdlaunch.notify('READY=1'); time.sleep({TIMEOUT})"
    # The program's stdout is our stderr, held as long as it runs: only stdout is read here, as $(...) reads it.
    done = run(["fdlaunch-notify-wait", "--fork", f"--touch={ready}", "--", sys.executable, "-c", script], stderr=subprocess.DEVNULL)
    assert done.returncode == 0  # returned: nothing left behind holds its stdout
    pid = int(done.stdout)
    try:
        assert ready.exists(), "the file once the pid is printed"
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not ready.exists(), "the file to be removed once the program is gone")


def test_a_file_that_is_not_ours_any_more_is_left_alone(reachable):
    """Replaced while the program ran: at its exit the name holds someone else's file, which is not removed."""
    ready, theirs = reachable / "ready", reachable / "theirs"
    argv = ["fdlaunch-init", "--", "fdlaunch-notify-wait", f"--touch={ready}", "--", *PROGRAM]
    init = subprocess.Popen(argv, stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        init.stdin.write("ready\n")
        init.stdin.flush()
        wait_until(ready.exists, "the file")
        theirs.write_text("theirs")
        theirs.replace(ready)
        init.stdin.write("exit 0\n")
        init.stdin.close()
        assert init.wait(TIMEOUT) == 0  # fdlaunch-init waits for the watcher too
        assert (ready.read_text(), init.stderr.read()) == ("theirs", "")
    finally:
        init.kill()
        init.wait()


def test_a_file_that_cannot_be_made_is_a_warning_and_the_other_relays_run(reachable):
    directory = reachable / "gone"
    directory.mkdir()
    read_end, write_end = os.pipe()
    argv = ["fdlaunch-notify-wait", f"--fd={write_end}", f"--touch={directory}/ready", "--", *PROGRAM]
    waiter = subprocess.Popen(argv, pass_fds=(write_end,), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        os.close(write_end)
        assert waiter.stdout.readline() == "started\n"
        directory.rmdir()  # opened before the program started: the file cannot be made there any more
        waiter.stdin.write("ready\n")
        waiter.stdin.flush()
        assert os.read(read_end, 1) == b"\n", "the s6 newline still comes"
        waiter.stdin.write("exit 0\n")
        waiter.stdin.close()
        assert waiter.wait(TIMEOUT) == 0
        line = waiter.stderr.readline()
        assert line == f"fdlaunch-notify-wait (watcher): warning: unable to create {directory}/ready: No such file or directory\n"
    finally:
        os.close(read_end)
        waiter.kill()
        waiter.wait()


def test_a_symbolic_link_out_of_a_directory_only_root_can_write_is_followed(reachable):
    (reachable / "real").mkdir()
    (reachable / "current").symlink_to("real")
    done = run(
        [
            "fdlaunch-notify-wait",
            f"--touch={reachable}/current/ready",
            "--",
            "sh",
            "-c",
            f"fdlaunch-notify READY=1; until test -e {reachable}/real/ready; do :; done",
        ]
    )
    assert (done.returncode, done.stderr) == (0, "")


@pytest.mark.parametrize(
    "where, status, why",
    [
        (
            "/tmp/ready",
            100,
            "--touch='/tmp/ready' refused: its directory is writable by other users, who could make the file appear or remove it",
        ),
        ("{own}/ready", 100, "--touch='{own}/ready' refused: the directory '{own.name}' on its path belongs to another user"),
        (
            "{sticky}/link/ready",
            100,
            "--touch='{sticky}/link/ready' refused: the symbolic link 'link' is in a directory other users can write,"
            " who could point it anywhere",
        ),
        ("{reachable}/missing/ready", 111, "unable to open the directory of --touch={reachable}/missing/ready: No such file or directory"),
        ("{reachable}/", 100, "--touch='{reachable}/' names a directory; it needs a file name, for instance /run/app/ready"),
    ],
)
def test_a_directory_others_could_change_is_refused_before_anything_runs(where, status, why, reachable, attacker):
    """As root, with a local user who owns a directory on the way or planted a link: one line, and the program never runs."""
    own = attacker.directory(f"own-{os.urandom(4).hex()}")
    sticky = reachable / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    target = reachable / "root-only"
    target.mkdir()
    assert attacker.run(["ln", "-s", str(target), str(sticky / "link")]).returncode == 0
    places = {"own": own, "sticky": sticky, "reachable": reachable}
    marker = reachable / "ran"
    done = run(["fdlaunch-notify-wait", f"--touch={where.format(**places)}", "--", "touch", str(marker)])
    advice = "; use a directory that only root or this user can write, such as /run/NAME" if "refused" in why else ""
    assert (done.returncode, done.stderr) == (status, f"fdlaunch-notify-wait: fatal: {why.format(**places)}{advice}\n")
    assert not marker.exists() and not (target / "ready").exists()


def test_a_directory_this_user_cannot_write_is_refused_before_anything_runs(reachable):
    require_root()
    marker = reachable / "ran"
    done = run(["fdlaunch-setuidgid", "nobody", "--", "fdlaunch-notify-wait", f"--touch={reachable}/ready", "--", "touch", str(marker)])
    assert (done.returncode, done.stderr) == (
        111,
        f"fdlaunch-notify-wait: fatal: unable to open the directory of --touch={reachable}/ready: Permission denied\n",
    )
    assert not marker.exists()
