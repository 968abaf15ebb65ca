"""Readiness from daemons that never heard of sd_notify: upstart's SIGSTOP, s6's newline on a notification fd.

The daemon (legacy_daemon.py) is real: it stops itself with SIGSTOP when
UPSTART_JOB is set, or writes a newline to its fd; fdlaunch-notify-wait
turns that into every relay, in chain mode (where its watcher is not the
program's parent, and traces it) and in fork mode.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TIMEOUT, free_port, require_python_for_nobody, run
from test_handoff import Handoff, HttpLoad
from test_notify import Upstream, assert_nothing_left, kill_quietly, readable, run_fork, s6_service

HERE = Path(__file__).resolve().parent
DAEMON = str(HERE / "legacy_daemon.py")
JOB = os.path.basename(sys.executable)  # UPSTART_JOB by default: PROG's basename


@pytest.fixture
def env(tmp_path):
    """A clean environment whose TMPDIR (where the private socket goes) the test can inspect."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    return {"PATH": os.environ["PATH"], "TMPDIR": str(tmp)}


def daemon(log, *how):
    return [sys.executable, DAEMON, str(log), *how]


def status_field(pid, name):
    """A field of /proc/PID/status, as text."""
    return re.search(rf"^{name}:\s+(.*)$", Path(f"/proc/{pid}/status").read_text(), re.M)[1]


def wait_until(condition, what, seconds=TIMEOUT):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def wait_logged(log, line):
    """Until the daemon has logged line (its log may not exist yet)."""
    wait_until(lambda: log.exists() and line in log.read_text().splitlines(), f"{line!r} never logged")


def traced(pid):
    return status_field(pid, "TracerPid") != "0"


def stopped(pid):
    return status_field(pid, "State")[0] in "Tt"


class Chain:
    """fdlaunch-notify-wait OPTIONS --fd=W -- legacy_daemon.py LOG HOW..., in chain mode: is_ready() reads W's pipe."""

    def __init__(self, tmp_path, env, options, how, before=(), directory=None):
        directory = directory or tmp_path
        self.log, self.go = directory / "log", directory / "go"
        self.ready_fd, write_end = os.pipe()
        argv = [*before, "fdlaunch-notify-wait", f"--fd={write_end}", *options, "--", *daemon(self.log, *how, f"--go={self.go}")]
        self.stderr = tmp_path / "stderr"
        with self.stderr.open("w") as stderr:
            self.process = subprocess.Popen(argv, env=env, pass_fds=(write_end,), stderr=stderr)
        os.close(write_end)
        self.pid = self.process.pid

    def is_ready(self, seconds):
        """The newline on W within seconds (end of file, the watcher gone without one, is not)."""
        return readable(self.ready_fd, seconds) and os.read(self.ready_fd, 1) == b"\n"

    def close(self):
        kill_quietly(self.pid)
        self.process.wait()
        os.close(self.ready_fd)


@pytest.fixture
def chain(tmp_path, env):
    made = []

    def start(options, how, **kwargs):
        made.append(Chain(tmp_path, env, options, how, **kwargs))
        return made[-1]

    yield start
    for each in made:
        each.close()


# --upstart


@pytest.mark.parametrize("where", ["main thread", "another thread"])
def test_fork_mode_an_upstart_daemon_is_ready_once_it_stops_itself_and_then_runs_on(where, env, tmp_path):
    log = tmp_path / "log"
    how = ["upstart", *(["--threads"] if where == "another thread" else [])]
    done = run_fork(["fdlaunch-notify-wait", "--fork", "--timeout=20", "--upstart", "--", *daemon(log, *how)], env=env)
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout)
    try:
        wait_logged(log, "continued")
        assert log.read_text().splitlines() == ["started", f"job {JOB}", "stopping", "continued"]
        assert not stopped(pid), "it was sent SIGCONT"
    finally:
        kill_quietly(pid)
    assert_nothing_left(env)


@pytest.mark.parametrize("where", ["main thread", "another thread"])
def test_chain_mode_an_upstart_daemon_is_ready_once_it_stops_itself_and_is_let_go(where, chain):
    how = ["upstart", *(["--threads"] if where == "another thread" else [])]
    program = chain(["-v", "--upstart=web"], how)
    wait_until(lambda: traced(program.pid), "the watcher never traced the program")
    assert not program.is_ready(0.3), "ready before it stopped itself"
    program.go.touch()
    assert program.is_ready(TIMEOUT), program.stderr.read_text()
    wait_logged(program.log, "continued")
    assert program.log.read_text().splitlines() == ["started", "job web", "stopping", "continued"]
    wait_until(lambda: not traced(program.pid), "the watcher still traces the program once it is ready")
    assert not stopped(program.pid)
    # The watcher says how it was ready once it has done what readiness asks for, a moment after the test sees it.
    wait_until(lambda: len(program.stderr.read_text().splitlines()) >= 2, "the watcher never said the program was ready")
    said = program.stderr.read_text().splitlines()
    assert said[0].startswith(
        f"fdlaunch-notify-wait (watcher): info: watching pid {program.pid}; once it is ready (by READY=1, its SIGSTOP):"
    )
    assert re.fullmatch(
        rf"fdlaunch-notify-wait \(watcher\): info: pid {program.pid} ready by its SIGSTOP after [0-9.]+ seconds; did: .*", said[1]
    )


def test_a_traced_program_gets_its_signals_and_its_parent_its_exit(chain):
    """Until it is ready the program is traced: every signal reaches it as sent, and its exit reaches its parent."""
    program = chain(["--upstart"], ["upstart"])
    wait_until(lambda: traced(program.pid), "the watcher never traced the program")
    watcher = int(status_field(program.pid, "TracerPid"))
    wait_logged(program.log, "started")
    os.kill(program.pid, signal.SIGHUP)
    wait_logged(program.log, "SIGHUP")
    os.kill(program.pid, signal.SIGTERM)
    assert program.process.wait(TIMEOUT) == 0, "its parent did not get its exit status"
    assert program.log.read_text().splitlines() == ["started", "SIGHUP", "SIGTERM"]
    assert not program.is_ready(0), "an exit is not readiness"
    wait_until(lambda: not Path(f"/proc/{watcher}").exists(), "the watcher outlived the program")


def test_a_traced_program_killed_is_reaped_by_its_parent_and_leaves_nothing(chain):
    program = chain(["--upstart"], ["upstart"])
    wait_until(lambda: traced(program.pid), "the watcher never traced the program")
    watcher = int(status_field(program.pid, "TracerPid"))
    os.kill(program.pid, signal.SIGKILL)
    assert program.process.wait(TIMEOUT) == -signal.SIGKILL
    wait_until(lambda: not Path(f"/proc/{watcher}").exists(), "the watcher outlived the program")


def test_a_stop_by_someone_else_is_not_readiness_before_it_nor_after_it(chain):
    program = chain(["--upstart"], ["upstart"])
    wait_until(lambda: traced(program.pid), "the watcher never traced the program")
    os.kill(program.pid, signal.SIGSTOP)  # a user's kill -STOP, before it is ready
    wait_until(lambda: stopped(program.pid), "a SIGSTOP from someone else was not passed on")
    assert not program.is_ready(0.5), "a SIGSTOP from someone else counted as readiness"
    assert stopped(program.pid), "it was continued: someone else's stop is its own"
    program.go.touch()
    os.kill(program.pid, signal.SIGCONT)
    assert program.is_ready(TIMEOUT), "its own SIGSTOP, after it was continued, is not readiness"
    wait_until(lambda: not traced(program.pid), "still traced once ready")
    os.kill(program.pid, signal.SIGSTOP)  # and after it is ready
    wait_until(lambda: stopped(program.pid), "not stopped")
    assert not traced(program.pid) and status_field(program.pid, "State").startswith("T"), "left stopped, by nobody's doing but the user's"
    os.kill(program.pid, signal.SIGCONT)


def test_fork_mode_a_terminal_stop_is_not_readiness(env, tmp_path):
    log, go = tmp_path / "log", tmp_path / "go"
    argv = ["fdlaunch-notify-wait", "--fork", "--upstart", "--", *daemon(log, "upstart", f"--go={go}")]
    with (tmp_path / "stderr").open("w") as stderr:
        # A group of its own in our session: in an orphaned one (no parent in the session outside it),
        # the kernel discards SIGTSTP (signal(7)), and the test could start so.
        waiter = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True, process_group=0)
    children = Path(f"/proc/{waiter.pid}/task/{waiter.pid}/children")
    pid = None
    try:
        wait_until(lambda: children.read_text().strip(), "no child")
        pid = int(children.read_text().split()[0])
        os.kill(pid, signal.SIGTSTP)
        wait_until(lambda: stopped(pid), "SIGTSTP did not stop it")
        assert not readable(waiter.stdout.fileno(), 0.5), "a SIGTSTP stop counted as readiness"
        go.touch()
        os.kill(pid, signal.SIGCONT)
        assert waiter.stdout.readline() == f"{pid}\n"
        assert waiter.wait(TIMEOUT) == 0
        wait_logged(log, "continued")
    finally:
        waiter.kill()
        waiter.wait()
        if pid is not None:
            kill_quietly(pid)


def test_without_upstart_no_job_is_named_and_the_daemon_does_not_stop(env, tmp_path):
    log = tmp_path / "log"
    program = subprocess.Popen(["fdlaunch-notify-wait", "--", *daemon(log, "upstart")], env=env)
    try:
        wait_logged(log, "job -")
        assert "stopping" not in log.read_text()
    finally:
        program.kill()
        program.wait()


def test_an_upstart_daemon_under_s6_supervise(env, tmp_path):
    log, go, pidfile = tmp_path / "log", tmp_path / "go", tmp_path / "pid"
    script = f"echo $$ > {pidfile}; exec fdlaunch-notify-wait --fd=3 --upstart -- {' '.join(daemon(log, 'upstart', f'--go={go}'))}\n"
    with s6_service(tmp_path, script, env) as service:
        wait_until(pidfile.exists, "the service never started")
        early = run(["s6-svwait", "-U", "-t", "500", str(service)], env=env)
        assert early.returncode == 99, "ready before it stopped itself"
        go.touch()
        waited = run(["s6-svwait", "-U", "-t", "15000", str(service)], env=env)
        assert waited.returncode == 0, waited.stderr
        pid = int(pidfile.read_text())
        status = run(["s6-svstat", str(service)], env=env).stdout
        assert status.startswith(f"up (pid {pid})") and "ready" in status
        wait_logged(log, "continued")
        assert not stopped(pid)
        assert run(["s6-svc", "-d", str(service)]).returncode == 0
        assert run(["s6-svwait", "-D", "-t", "15000", str(service)], env=env).returncode == 0
        wait_logged(log, "SIGTERM")


def test_an_upstart_daemon_behind_a_user_change_in_the_same_process(chain, attacker):
    """fdlaunch-setuidgid fused before it: the user change left the process undumpable, which only a tracer with
    CAP_SYS_PTRACE may trace; its watcher, of the same user, has none."""
    require_python_for_nobody()
    program = chain(["--upstart"], ["upstart"], before=["fdlaunch-setuidgid", attacker.name, "--"], directory=attacker.directory("legacy"))
    program.go.touch()
    assert program.is_ready(TIMEOUT), program.stderr.read_text()
    wait_logged(program.log, "continued")
    assert status_field(program.pid, "Uid").split()[0] == str(attacker.uid)


# --ready-fd


@pytest.mark.parametrize("how", [["fd", "5"], ["fd-var", "NOTIFICATION_FD"]])
def test_fork_mode_a_newline_on_the_ready_fd_is_readiness(how, env, tmp_path):
    log = tmp_path / "log"
    options = ["--fork", "--timeout=20", "--ready-fd=5", "--ready-fd-var=NOTIFICATION_FD"]
    done = run_fork(["fdlaunch-notify-wait", *options, "--", *daemon(log, *how)], env=env)
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout)
    try:
        wait_logged(log, "ready")
        assert "5" not in os.listdir(f"/proc/{pid}/fd"), "it closed the fd, as told"
    finally:
        kill_quietly(pid)
    assert_nothing_left(env)


def test_chain_mode_a_newline_on_the_ready_fd_is_readiness(chain):
    program = chain(["--ready-fd=7", "--ready-fd-var=NOTIFICATION_FD"], ["fd-var", "NOTIFICATION_FD"])
    wait_logged(program.log, "started")
    assert os.readlink(f"/proc/{program.pid}/fd/7").startswith("pipe:"), "the program got a pipe on fd 7"
    assert not program.is_ready(0.3)
    program.go.touch()
    assert program.is_ready(TIMEOUT), program.stderr.read_text()


@pytest.mark.parametrize("mode", ["fork", "chain"])
def test_a_ready_fd_closed_without_a_newline_is_not_readiness(mode, env, tmp_path):
    log = tmp_path / "log"
    argv = ["fdlaunch-notify-wait", f"--{mode}" if mode == "fork" else "--kill", "--timeout=1", "--ready-fd=5", "--"]
    done = run_fork([*argv, *daemon(log, "fd", "5", "--close-only")], env=env)
    assert log.read_text().splitlines() == ["started", "ready", "SIGTERM"], "it closed its fd, and was stopped"
    if mode == "fork":
        assert done.returncode == 2 and done.stdout == ""
        assert re.search(r"\(pid \d+\) was not ready after 1 second; stopped it: exited with status 0\n", done.stderr), done.stderr
    else:
        assert done.returncode == 0, "the daemon's own status, after SIGTERM"
        assert "was not ready after 1 second; sending it SIGTERM" in done.stderr


def test_a_daemon_for_a_notification_fd_under_s6_supervise(env, tmp_path):
    """s6 gives fd 3; the daemon writes to the pipe it is given there, the watcher passes the newline on."""
    log, go, pidfile = tmp_path / "log", tmp_path / "go", tmp_path / "pid"
    script = f"echo $$ > {pidfile}; exec fdlaunch-notify-wait --fd=3 --ready-fd=3 -- {' '.join(daemon(log, 'fd', '3', f'--go={go}'))}\n"
    with s6_service(tmp_path, script, env) as service:
        wait_until(pidfile.exists, "the service never started")
        wait_logged(log, "started")
        assert run(["s6-svwait", "-U", "-t", "500", str(service)], env=env).returncode == 99, "ready before its newline"
        go.touch()
        waited = run(["s6-svwait", "-U", "-t", "15000", str(service)], env=env)
        assert waited.returncode == 0, waited.stderr
        status = run(["s6-svstat", str(service)], env=env).stdout
        assert status.startswith(f"up (pid {pidfile.read_text().strip()})") and "ready" in status


def test_forward_relays_readiness_from_either_input_with_the_mainpid(env, tmp_path):
    upstream = Upstream(tmp_path)
    for options, how in ((["--upstart"], ["upstart"]), (["--ready-fd=4"], ["fd", "4"])):
        argv = ["fdlaunch-notify-wait", "--forward", *options, "--", *daemon(tmp_path / "log", *how)]
        program = subprocess.Popen(argv, env={**env, "NOTIFY_SOCKET": upstream.path})
        try:
            assert upstream.receive() == f"READY=1\nMAINPID={program.pid}"
        finally:
            program.kill()
            program.wait()


ERRORS = [
    (["--ready-fd=2"], "--ready-fd='2': fd 2 is standard error, which the program keeps; give 3 or more"),
    (["--ready-fd=x"], "--ready-fd='x' is not a descriptor number from 3 to"),
    (["--ready-fd-var=FD"], "--ready-fd-var goes with --ready-fd"),
    (["--ready-fd=5", "--ready-fd-var=9FD"], "--ready-fd-var='9FD' is not a variable name"),
    (["--ready-fd=5", "--ready-fd-var=NOTIFY_SOCKET"], "--ready-fd-var='NOTIFY_SOCKET': NOTIFY_SOCKET is one of the variables this tool"),
    (["--upstart="], "--upstart= needs a job name"),
]


@pytest.mark.parametrize(("options", "message"), ERRORS)
def test_bad_inputs_are_refused_before_anything_runs(options, message, env):
    done = run(["fdlaunch-notify-wait", *options, "--", "true"], env=env)
    assert done.returncode == 100
    assert done.stderr.startswith(f"fdlaunch-notify-wait: fatal: {message}"), done.stderr


def test_a_ready_fd_that_is_a_passed_socket_is_refused(env):
    done = run(["fdlaunch-listen", "-tcp:label=web:127.0.0.1:0", "--", "fdlaunch-notify-wait", "--ready-fd=3", "--", "true"], env=env)
    assert (done.returncode, done.stderr) == (
        100,
        "fdlaunch-notify-wait: fatal: --ready-fd='3': fd 3 is the socket labelled 'web' passed in LISTEN_FDS/LISTEN_FD_MAP,"
        " and the program would lose it; give a free one, such as --ready-fd=4\n",
    )


# fdlaunch-handoff's instances


@pytest.mark.parametrize(("options", "how"), [(["--upstart"], ["upstart"]), (["--ready-fd=5"], ["fd", "5"])])
def test_handoff_overlaps_restarts_of_a_daemon_that_never_heard_of_sd_notify(options, how, tmp_path):
    port = free_port()
    handoff = Handoff(tmp_path, f"-tcp:label=http:127.0.0.1:{port}", daemon(tmp_path / "log", *how), options)
    try:
        serving = [int(handoff.upstream.wait_ready()["MAINPID"])]
        load = HttpLoad(port)
        try:
            for _ in range(3):
                time.sleep(0.2)
                handoff.reload()
                fields = handoff.upstream.wait_ready()
                assert "took over from pid" in fields["STATUS"], fields
                serving.append(int(fields["MAINPID"]))
            time.sleep(0.3)
        finally:
            load.stop()
        assert load.failures == []
        assert len(set(serving)) == 4, "every handoff brings a new pid"
        assert list(dict.fromkeys(load.pids)) == serving, "each new instance served once it said it was ready"
        assert all(not stopped(pid) for pid in serving[-1:]), "the serving instance was sent SIGCONT"
        assert handoff.stop() == 0
    finally:
        handoff.kill()


def test_handoff_refuses_a_ready_fd_that_is_a_passed_socket():
    argv = ["fdlaunch-listen", "-tcp:label=web:127.0.0.1:0", "--", "fdlaunch-handoff", "--ready-fd=3", "--", "true"]
    done = run(argv)
    assert done.returncode == 100
    assert done.stderr.startswith("fdlaunch-handoff: fatal: --ready-fd='3': fd 3 is the socket labelled 'web' passed in"), done.stderr
