"""Every stop ends: a process asked to stop gets a deadline, then SIGKILL, and the tool says so.

Each tool that waits on a child after asking it to stop is tried against a
child that catches the stop signal and never exits, and one that ignores
it: the stop ends within the grace period and a second, nothing of the
child is left, and one line names what had to be killed.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TIMEOUT, free_port, wait_for_line

# A daemon that says READY=1, logs every signal it gets to argv[1], and never
# exits of SIGTERM: 'catch' handles it, 'ignore' ignores it.
STUBBORN = r"""
import os, signal, sys, time
import fdlaunch
log, how = sys.argv[1], sys.argv[2]
def logged(number, frame):
    with open(log, "a") as out:
        out.write(f"{os.getpid()} got {signal.Signals(number).name}\n")
for number in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
    signal.signal(number, logged if how == "catch" else signal.SIG_IGN)
with open(log, "a") as out:
    out.write(f"{os.getpid()} up\n")
fdlaunch.notify("READY=1")
while True:
    time.sleep(60)
"""


def gone(pid):
    """True once pid has no process (or only a zombie nobody of ours will reap)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def up_pids(log):
    return [int(line.split()[0]) for line in Path(log).read_text().splitlines() if line.endswith(" up")]


def wait_up(log, count=1):
    deadline = time.monotonic() + TIMEOUT
    while not (Path(log).exists() and len(up_pids(log)) >= count):
        assert time.monotonic() < deadline, "the daemon never came up"
        time.sleep(0.02)
    return up_pids(log)


def wait_for(what, condition, seconds=TIMEOUT):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def stopped_within(process, seconds):
    """The process's status; a test failure if it is still running after seconds."""
    try:
        return process.wait(seconds)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {seconds} seconds after the stop")


def kill_all(process, log):
    if process.poll() is None:
        process.kill()
        process.wait()
    if Path(log).exists():
        for pid in up_pids(log):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def started(argv, tmp_path, **kwargs):
    stderr = (tmp_path / "stderr").open("w")
    return subprocess.Popen(argv, stderr=stderr, stdout=subprocess.DEVNULL, **kwargs)


# fdlaunch-handoff: the final stop


@pytest.mark.parametrize("how", ["catch", "ignore"])
def test_handoff_stop_ends_within_grace_for_an_instance_that_will_not_exit(how, tmp_path):
    log = tmp_path / "log"
    port = free_port()
    argv = ["fdlaunch-listen", f"-tcp:127.0.0.1:{port}", "--", "fdlaunch-handoff", "--grace=1", "--"]
    handoff = started([*argv, sys.executable, "-c", STUBBORN, str(log), how], tmp_path)
    try:
        (pid,) = wait_up(log)
        handoff.send_signal(signal.SIGTERM)
        assert stopped_within(handoff, 1 + 1) == -signal.SIGKILL, "it exits as its serving instance did: killed"
        assert gone(pid)
        stderr = (tmp_path / "stderr").read_text()
        assert (
            f"fdlaunch-handoff: warning: pid {pid} (the serving instance) was still running 1.0 seconds after SIGTERM; sent it SIGKILL\n"
            in stderr
        )
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()
    finally:
        kill_all(handoff, log)


def test_handoff_a_second_stop_signal_is_passed_on_and_keeps_the_deadline(tmp_path):
    log = tmp_path / "log"
    argv = ["fdlaunch-handoff", "--grace=3", "--", sys.executable, "-c", STUBBORN, str(log), "catch"]
    handoff = started(argv, tmp_path)
    try:
        (pid,) = wait_up(log)
        first = time.monotonic()
        handoff.send_signal(signal.SIGTERM)
        wait_for_line(log, f"{pid} got SIGTERM")
        time.sleep(2)  # not a synchronisation: the second signal must come late in the grace period
        handoff.send_signal(signal.SIGINT)
        wait_for_line(log, f"{pid} got SIGINT")  # passed on, not lost
        assert stopped_within(handoff, TIMEOUT) == -signal.SIGKILL
        took = time.monotonic() - first
        assert took < 3 + 1, f"the second signal started the grace period again: the stop took {took:.1f} seconds"
        line = (tmp_path / "stderr").read_text().splitlines()[-1]
        assert line.startswith(f"fdlaunch-handoff: warning: pid {pid} (the serving instance) was still running 3.")
        assert line.endswith(" seconds after SIGTERM; sent it SIGKILL")
    finally:
        kill_all(handoff, log)


def test_handoff_killed_during_its_stop_leaves_no_instance(tmp_path):
    log = tmp_path / "log"
    argv = ["fdlaunch-handoff", "--grace=30", "--", sys.executable, "-c", STUBBORN, str(log), "catch"]
    handoff = started(argv, tmp_path)
    try:
        (pid,) = wait_up(log)
        handoff.send_signal(signal.SIGTERM)
        wait_for_line(log, f"{pid} got SIGTERM")
        handoff.kill()
        handoff.wait()
        wait_for("the guard to stop the instance", lambda: gone(pid), seconds=1 + 1)
        wait_for_line(
            tmp_path / "stderr", f"fdlaunch-handoff (guard): warning: pid {pid} still running 1 second after SIGTERM: sent SIGKILL"
        )
    finally:
        kill_all(handoff, log)


def test_handoff_an_old_instance_that_will_not_stop_is_killed_and_named(tmp_path):
    log = tmp_path / "log"
    argv = ["fdlaunch-handoff", "--grace=0.5", "--", sys.executable, "-c", STUBBORN, str(log), "ignore"]
    handoff = started(argv, tmp_path)
    try:
        (old,) = wait_up(log)
        handoff.send_signal(signal.SIGHUP)
        wait_up(log, 2)
        wait_for("the old instance to be killed", lambda: gone(old))
        stderr = tmp_path / "stderr"
        wait_for_line(stderr, f"fdlaunch-handoff: warning: pid {old} (an old instance) was still running 0.")
        assert "seconds after SIGTERM; sent it SIGKILL" in stderr.read_text()
    finally:
        kill_all(handoff, log)


# fdlaunch-accept: handlers after the stop, and after the server's death


def accept_with_a_stubborn_handler(tmp_path, port, log):
    handler = ["sh", "-c", f'trap "echo $$ got TERM >> {log}" TERM; echo $$ up >> {log}; while :; do sleep 1; done']
    argv = ["fdlaunch-listen", f"-tcp:127.0.0.1:{port}", "--", "fdlaunch-accept", "--grace=1", "--", *handler]
    server = started(argv, tmp_path)
    client = socket.socket()
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            client.connect(("127.0.0.1", port))
            break
        except ConnectionRefusedError:
            assert time.monotonic() < deadline, "the server never accepted"
            time.sleep(0.02)
    (pid,) = wait_up(log)
    return server, client, pid


def test_accept_handlers_still_running_after_grace_are_killed_and_named(tmp_path):
    log, port = tmp_path / "log", free_port()
    server, client, pid = accept_with_a_stubborn_handler(tmp_path, port, log)
    try:
        server.send_signal(signal.SIGTERM)
        assert stopped_within(server, 1 + 1) == 0
        assert gone(pid)
        stderr = (tmp_path / "stderr").read_text()
        expected = f"fdlaunch-accept: warning: 1 handler still running 1 second after the stop signal; sent it SIGKILL (pid {pid})"
        assert expected in stderr.splitlines()
    finally:
        client.close()
        kill_all(server, log)


def test_accept_guard_stops_stubborn_handlers_of_a_killed_server_and_says_so(tmp_path):
    log, port = tmp_path / "log", free_port()
    server, client, pid = accept_with_a_stubborn_handler(tmp_path, port, log)
    try:
        server.kill()
        server.wait()
        wait_for_line(log, f"{pid} got TERM")  # the guard's SIGTERM, caught and ignored
        wait_for("the guard to kill the handler", lambda: gone(pid), seconds=1 + 1)
        stderr = tmp_path / "stderr"
        wait_for_line(stderr, "fdlaunch-accept (guard): warning: handlers still running 1 second after SIGTERM; sent them SIGKILL")
        assert f"fdlaunch-accept (guard): warning: its server (pid {server.pid}) died; stopping the handlers" in stderr.read_text()
    finally:
        client.close()
        kill_all(server, log)


# fdlaunch-foreground: the daemon after a stop signal


def test_foreground_kills_a_daemon_that_will_not_stop_after_grace(tmp_path):
    log = tmp_path / "log"
    # The launching process starts the daemon in the background and exits 0, as a forking daemon does.
    launcher = f'{sys.executable} -c "$0" {log} ignore </dev/null >/dev/null 2>&1 & exit 0'
    argv = ["fdlaunch-foreground", "-v", "--grace=1", "--", "sh", "-c", launcher, STUBBORN]
    keeper = started(argv, tmp_path)
    try:
        (pid,) = wait_up(log)
        wait_for_line(tmp_path / "stderr", f"the daemon is pid {pid}")
        keeper.send_signal(signal.SIGTERM)
        assert stopped_within(keeper, 1 + 1) == 128 + signal.SIGKILL
        assert gone(pid)
        expected = f"fdlaunch-foreground: warning: the daemon (pid {pid}) was still running 1 second after SIGTERM; sent it SIGKILL"
        assert expected in (tmp_path / "stderr").read_text().splitlines()
    finally:
        kill_all(keeper, log)


# fdlaunch-notify-wait: --fork after a stop or a timeout, --kill in chain mode, --command


def test_notify_wait_fork_kills_a_program_that_will_not_stop_after_sigterm(tmp_path):
    waiter = started(
        ["fdlaunch-notify-wait", "--fork", "--grace=1", "--", "sh", "-c", f'trap "" TERM; echo $$ up > {tmp_path}/log; exec sleep 60'],
        tmp_path,
    )
    log = tmp_path / "log"
    try:
        (pid,) = wait_up(log)
        waiter.send_signal(signal.SIGTERM)
        assert stopped_within(waiter, 1 + 1) == 1
        assert gone(pid)
        line = (tmp_path / "stderr").read_text().splitlines()[-1]
        assert line == (
            f"fdlaunch-notify-wait: fatal: sh (pid {pid}) was killed by SIGKILL before it was ready"
            " (still running 1 second after SIGTERM, so sent it SIGKILL)"
        )
    finally:
        kill_all(waiter, log)


def test_notify_wait_fork_timeout_kills_a_program_that_ignores_sigterm(tmp_path):
    log = tmp_path / "log"
    argv = [
        "fdlaunch-notify-wait",
        "--fork",
        "--timeout=0.3",
        "--grace=1",
        "--",
        "sh",
        "-c",
        f'trap "" TERM; echo $$ up > {log}; exec sleep 60',
    ]
    waiter = started(argv, tmp_path)
    try:
        assert stopped_within(waiter, 0.3 + 1 + 1) == 2
        (pid,) = up_pids(log)
        assert gone(pid)
        line = (tmp_path / "stderr").read_text().splitlines()[-1]
        assert line == (
            f"fdlaunch-notify-wait: fatal: sh (pid {pid}) was not ready after 0.3 seconds; stopped it: was killed by SIGKILL"
            " (still running 1 second after SIGTERM, so sent it SIGKILL)"
        )
    finally:
        kill_all(waiter, log)


def test_notify_wait_chain_kill_escalates_to_sigkill(tmp_path):
    argv = ["fdlaunch-notify-wait", "--timeout=0.3", "--kill", "--grace=1", "--", "sh", "-c", 'trap "" TERM; exec sleep 60']
    program = started(argv, tmp_path)
    try:
        assert stopped_within(program, 0.3 + 1 + 1) == -signal.SIGKILL
        stderr = tmp_path / "stderr"
        wait_for_line(
            stderr, f"fdlaunch-notify-wait (watcher): warning: pid {program.pid} was still running 1 second after SIGTERM; sent it SIGKILL"
        )
        assert f"pid {program.pid} was not ready after 0.3 seconds; sending it SIGTERM" in stderr.read_text()
    finally:
        program.kill()
        program.wait()


def test_notify_wait_command_that_hangs_is_stopped_and_said(tmp_path):
    log = tmp_path / "log"
    hang = f'trap "" TERM; echo $$ up > {log}; while :; do sleep 1; done'
    argv = ["fdlaunch-notify-wait", "--fork", f"--command={hang}", "--command-timeout=0.5", "--grace=1", "--", "fdlaunch-notify", "READY=1"]
    waiter = started(argv, tmp_path)
    try:
        assert stopped_within(waiter, 0.5 + 1 + 2) == 0, "readiness was told; the command's end is a warning"
        (pid,) = up_pids(log)
        assert gone(pid)
        stderr = (tmp_path / "stderr").read_text()
        assert f"warning: the command {hang!r} was still running after 0.5 seconds; sent it SIGTERM, then SIGKILL" in stderr
    finally:
        kill_all(waiter, log)
