"""fdlaunch-init: the chain as PID 1 of a pid namespace of its own (unshare --pid --fork --mount-proc), as in a container.

The namespace is watched from outside, through the host's /proc: its PID 1
is unshare's child, and everything in it is below that process.
"""

import contextlib
import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import HERE, TIMEOUT, free_port, require, require_root, run, wait_for_line

ORPHANS = [sys.executable, str(HERE / "orphan_daemon.py")]
LABEL_DAEMON = [sys.executable, str(HERE / "label_daemon.py"), "fdlaunch"]
UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc"]


def state(pid):
    """The one-letter state of pid (Z: a zombie), or None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def children(pid):
    found = []
    for task in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else []:
        with contextlib.suppress(OSError):
            found += [int(child) for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return found


def tree(root):
    """{host pid: state} of root and every process below it."""
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        found[pid] = state(pid)
        todo += children(pid)
    return {pid: s for pid, s in found.items() if s is not None}


def wait_until(condition, what, seconds=TIMEOUT):
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


class Namespace:
    """argv run as PID 1 of a new pid namespace; stop() SIGKILLs its PID 1 (the kernel then ends everything in it)."""

    def __init__(self, argv, **popen):
        require_root()
        require("unshare")
        self.unshare = subprocess.Popen([*UNSHARE, *argv], **popen)
        self.init = wait_until(lambda: children(self.unshare.pid)[:1], "unshare to fork the namespace's PID 1")[0]

    def processes(self):
        return tree(self.init)

    def zombies(self):
        return [pid for pid, s in self.processes().items() if s == "Z"]

    def wait(self, seconds=TIMEOUT):
        return self.unshare.wait(seconds)

    def stop(self):
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.init, signal.SIGKILL)
        self.unshare.wait(TIMEOUT)


@contextlib.contextmanager
def namespace(argv, **popen):
    started = Namespace(argv, **popen)
    try:
        yield started
    finally:
        started.stop()


@pytest.mark.parametrize("init", [True, False], ids=["under fdlaunch-init", "without (the fixture leaves zombies)"])
def test_orphans_of_a_daemon_are_reaped(init):
    """50 helpers orphaned by the daemon: under fdlaunch-init none stays a zombie; as PID 1 itself the daemon leaves all 50."""
    argv = [*(["fdlaunch-init", "--"] if init else []), *ORPHANS, "50"]
    with namespace(argv, stdout=subprocess.PIPE, text=True) as ns:
        assert ns.unshare.stdout.readline() == "helpers done\n"
        if init:
            wait_until(lambda: len(ns.processes()) == 2 and not ns.zombies(), "PID 1 and the daemon alone, no zombie")
        else:
            # A helper closes the daemon's pipe as it exits, a moment before it is a zombie.
            wait_until(lambda: len(ns.zombies()) == 50, "50 zombies, which nothing reaps")


def test_sigterm_to_pid_1_stops_a_daemon_without_handlers(reachable):
    """docker stop: SIGTERM to PID 1 reaches the daemon (143), and what it left gets SIGTERM, not the kernel's SIGKILL."""
    lingerer = reachable / "lingerer"
    with namespace(["fdlaunch-init", "--grace=60", "--", *ORPHANS, "3", str(lingerer)], stdout=subprocess.PIPE, text=True) as ns:
        assert ns.unshare.stdout.readline() == "helpers done\n"
        wait_for_line(lingerer, "lingering as pid")
        # The last helper closes the daemon's pipe as it exits, a moment before it is reaped.
        wait_until(lambda: len(ns.processes()) == 3 and not ns.zombies(), "fdlaunch-init, the daemon and the lingerer alone")
        held = [os.pidfd_open(pid) for pid in ns.processes()]
        try:
            os.kill(ns.init, signal.SIGTERM)
            # --grace=60: a stop that had to wait out the grace period would not end in time.
            assert ns.wait(10) == 128 + signal.SIGTERM
            assert select.select(held, [], [], 0)[0] == held, "a process of the namespace is still there"
        finally:
            for pidfd in held:
                os.close(pidfd)
    assert lingerer.read_text().splitlines()[-1] == "stopped by SIGTERM"


def test_the_container_chain_serves_and_its_ready_file_lasts_as_long_as_the_daemon(reachable):
    """init, listen, setuidgid nobody, notify-wait --touch: ready file, no zombie, SIGTERM to PID 1 stops it all."""
    port = free_port()
    directory = reachable / "run"
    directory.mkdir()
    os.chown(directory, 65534, 65534)
    ready = directory / "ready"
    chain = ["fdlaunch-init", "--", "fdlaunch-listen", f"-tcp:127.0.0.1:{port}", "--", "fdlaunch-setuidgid", "nobody", "--"]
    chain += ["fdlaunch-notify-wait", f"--touch={ready}", "--", *LABEL_DAEMON]
    with namespace(chain, stderr=subprocess.PIPE, text=True) as ns:
        wait_until(ready.exists, "the ready file")
        assert ready.stat().st_mode & 0o777 == 0o644 and ready.stat().st_uid == 65534
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as client:
            answer = json.loads(client.makefile().readline())
        assert answer["label"] == "tcp"
        processes = ns.processes()
        assert not ns.zombies(), "a zombie while serving"
        assert len(processes) == 3, "PID 1, the daemon, and the watcher holding the ready file"
        os.kill(ns.init, signal.SIGTERM)
        assert ns.wait(10) == 128 + signal.SIGTERM
        assert ns.unshare.stderr.read() == ""
    assert not ready.exists()


@pytest.mark.parametrize("init", [True, False], ids=["under fdlaunch-init", "without (warned, and a zombie)"])
def test_the_watcher_of_notify_wait_leaves_no_zombie(init):
    """Chain mode's watcher exits once the program is ready: fdlaunch-init reaps it; a program that is PID 1 does not."""
    read_end, write_end = os.pipe()
    argv = [*(["fdlaunch-init", "--"] if init else []), "fdlaunch-notify-wait", f"--fd={write_end}", "--"]
    argv += [sys.executable, "-c", "import fdlaunch, time; fdlaunch.notify('READY=1'); time.sleep(60)"]  # it reaps nothing
    try:
        with namespace(argv, pass_fds=(write_end,), stderr=subprocess.PIPE, text=True) as ns:
            os.close(write_end)
            assert os.read(read_end, 1) == b"\n"
            if init:
                wait_until(lambda: sorted(ns.processes().values()) == ["S", "S"], "PID 1 and the program alone, the watcher reaped")
                os.kill(ns.init, signal.SIGTERM)
                assert ns.wait() == 128 + signal.SIGTERM
            else:
                wait_until(lambda: sorted(ns.processes().values()) == ["S", "Z"], "the program as PID 1 and the watcher, a zombie")
                ns.stop()  # SIGKILL: a PID 1 without a handler never gets SIGTERM
            said = [line for line in ns.unshare.stderr.read().splitlines() if not line.startswith("unshare: ")]
    finally:
        os.close(read_end)
    if init:
        assert said == []
    else:
        assert said == [
            f"fdlaunch-notify-wait: warning: this is pid 1, and so will be {sys.executable!r}: the watcher is its child, a zombie"
            f" once it exits unless {sys.executable!r} reaps it; start the chain with fdlaunch-init"
            " (fdlaunch-init -- fdlaunch-notify-wait ...), which reaps every orphan"
        ]


def test_group_sends_the_signals_to_the_whole_process_group(tmp_path):
    log = tmp_path / "log"
    log.touch()
    inner = f"trap 'echo grandchild got USR1 >> {log}' USR1; echo up >> {log}; while :; do sleep 0.05; done"
    # stderr to /dev/null: the shells' word on each sleep the signal killed
    outer = f"exec 2>/dev/null; trap 'echo child got USR1 >> {log}' USR1; sh -c \"{inner}\" & while :; do sleep 0.05; done"
    init = subprocess.Popen(["fdlaunch-init", "--group", "--", "sh", "-c", outer], stderr=subprocess.PIPE, text=True)
    try:
        wait_for_line(log, "up")
        init.send_signal(signal.SIGUSR1)
        wait_for_line(log, "child got USR1")
        wait_for_line(log, "grandchild got USR1")
        init.terminate()
        assert init.wait(TIMEOUT) == 128 + signal.SIGTERM
        assert init.stderr.read() == ""
    finally:
        init.kill()
        init.wait()


@pytest.mark.parametrize("fuse", ["1", "0"])
@pytest.mark.parametrize("script, status", [("exit 3", 3), ("kill -KILL $$", 128 + signal.SIGKILL)])
def test_the_childs_status_is_the_exit_status(script, status, fuse):
    """As a shell reports it: the exit status, or 128 plus the signal; the same when the program is a fused link."""
    env = {**os.environ, "FDLAUNCH_FUSE": fuse}
    assert run(["fdlaunch-init", "--", "sh", "-c", script], env=env).returncode == status
    done = run(["fdlaunch-init", "--", "fdlaunch-listen", "-tcp:127.0.0.1:0", "--", "sh", "-c", script], env=env)
    assert (done.returncode, done.stderr) == (status, "")


def test_what_is_left_gets_sigterm_then_sigkill_after_the_grace_period(tmp_path):
    """One process stops on SIGTERM, one ignores it: one line names what had to be SIGKILLed; both are gone."""
    stubborn, polite = tmp_path / "stubborn", tmp_path / "polite"
    script = (
        f"sh -c 'trap \"\" TERM; exec sleep 60' & echo $! > {stubborn}; "
        f"sh -c 'trap \"echo stopped > {polite}; exit 0\" TERM; while :; do sleep 0.05; done' 2>/dev/null & "
        f"while ! test -s {stubborn}; do sleep 0.01; done; sleep 0.2; exit 5"
    )
    done = run(["fdlaunch-init", "--grace=1", "--", "sh", "-c", script])
    pid = int(stubborn.read_text())
    assert done.returncode == 5
    assert done.stderr == f"fdlaunch-init: warning: sent SIGKILL to pid {pid} (sleep): still running 1 second after SIGTERM\n"
    assert polite.read_text() == "stopped\n"
    assert state(pid) is None


def test_verbose_says_what_ran_and_what_was_left(tmp_path):
    script = 'sleep 30 & until test "$(cat /proc/$!/comm)" = sleep; do :; done; exit 0'  # its exec done
    done = run(["fdlaunch-init", "-v", "--", "sh", "-c", script])
    lines = [line.split(": ", 2)[2] for line in done.stderr.splitlines()]
    assert done.returncode == 0
    child = int(lines[0].split()[4].rstrip(","))
    assert lines[:2] == [f"started sh as pid {child}, in our process group", f"sh (pid {child}) exited with status 0"]
    assert lines[2].startswith("sh left pid ") and lines[2].endswith(" (sleep) running; sent SIGTERM")
    assert len(lines) == 3


def test_descriptors_sockets_and_environment_go_through_to_the_child(probe):
    """LISTEN_PID follows the sockets to the child, as fork mode does; NOTIFY_SOCKET and the rest are untouched."""
    env = {"PATH": os.environ["PATH"], "NOTIFY_SOCKET": "/run/supervisor/notify", "KEEP": "a b"}
    done, report = probe(["fdlaunch-listen", "-tcp:127.0.0.1:0", "--", "fdlaunch-init", "--"], env=env)
    assert done.returncode == 0, done.stderr
    assert report["env"]["LISTEN_PID"] == str(report["pid"]) and report["env"]["LISTEN_FDS"] == "1"
    assert report["env"]["NOTIFY_SOCKET"] == "/run/supervisor/notify" and report["env"]["KEEP"] == "a b"
    assert report["fds"][3]["kind"] == "socket" and report["fds"][3]["listening"] and not report["fds"][3]["cloexec"]
    assert [fd for fd in report["fds"] if fd > 3] == [], "a descriptor of fdlaunch-init's own leaked"


def test_a_proc_of_another_pid_namespace_is_refused():
    """unshare --pid without --mount-proc: /proc's pids would name other processes; nothing is started."""
    require_root()
    require("unshare")
    done = run(["unshare", "--pid", "--fork", "fdlaunch-init", "--", "sh", "-c", "echo started"])
    assert (done.returncode, done.stdout) == (111, "")
    assert done.stderr == (
        "fdlaunch-init: fatal: unable to find the processes below this one: /proc is missing or shows another pid namespace"
        " (mount this one's: unshare --pid --fork --mount-proc, or mount -t proc proc /proc)\n"
    )


@pytest.mark.parametrize(
    "argv, status, message",
    [
        ([], 100, "fdlaunch-init: usage: fdlaunch-init [options] [--] PROG [ARGS...]"),
        (["--grace=soon", "true"], 100, "fdlaunch-init: fatal: --grace='soon' is not a number of seconds (0 or more)"),
        (["no-such-program-fdl"], 127, "fdlaunch-init: fatal: unable to exec no-such-program-fdl: No such file or directory"),
    ],
)
def test_bad_calls(argv, status, message):
    done = run(["fdlaunch-init", *argv])
    assert (done.returncode, done.stderr) == (status, message + "\n")


def test_without_group_the_child_may_start_a_session_of_its_own():
    """Not a group leader, the child can still call setsid(2), as fdlaunch-setuidgid --setsid does."""
    done = run(["fdlaunch-init", "--", "fdlaunch-setuidgid", "--setsid", f"{os.getuid()}:{os.getgid()}", "--", "sh", "-c", "exit 4"])
    assert (done.returncode, done.stderr) == (4, "")


def test_the_child_takes_the_terminal_it_was_in_the_foreground_of():
    """docker run -it: the child leads its own process group, in the terminal's foreground, so it can read it."""
    pid, terminal = pty.fork()
    if pid == 0:
        try:
            os.execvp("fdlaunch-init", ["fdlaunch-init", "--", "sh", "-c", 'read line; echo "got $line"'])
        finally:
            os._exit(127)
    try:
        os.write(terminal, b"hello\n")
        said = b""
        deadline = time.monotonic() + TIMEOUT
        while b"got hello" not in said:
            assert time.monotonic() < deadline, f"the child never read the terminal: {said!r}"
            if select.select([terminal], [], [], 0.1)[0]:
                said += os.read(terminal, 1024)
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(terminal)


def test_a_killed_init_that_is_not_pid_1_leaves_no_child_behind(tmp_path):
    """The child dropped to nobody and lost its parent death signal: the guard stops it."""
    require_root()
    script = "echo $$; trap '' TERM; exec sleep 60"  # a daemon deaf to SIGTERM: the guard's SIGKILL ends it
    argv = ["fdlaunch-init", "--grace=1", "--", "fdlaunch-setuidgid", "nobody", "--", "sh", "-c", script]
    errors = tmp_path / "stderr"
    with errors.open("w") as stderr:
        init = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        child = int(init.stdout.readline())
        assert "Uid:\t65534" in Path(f"/proc/{child}/status").read_text()
        init.kill()
        init.wait()
        deadline = time.monotonic() + 1 + 3  # --grace, then room for three processes to be scheduled on a busy machine
        while Path(f"/proc/{child}").exists() and "State:\tZ" not in Path(f"/proc/{child}/status").read_text():
            assert time.monotonic() < deadline, "the child outlived its killed fdlaunch-init"
            time.sleep(0.02)
        wait_for_line(errors, f"fdlaunch-init (guard): warning: its parent (pid {init.pid}) died; stopping its child (pid {child})")
    finally:
        init.kill()
        init.wait()
