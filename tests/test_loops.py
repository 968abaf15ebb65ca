"""The loops and the process layer under them, in-process.

Building a loop object changes nothing process-wide; a loop's settings are
one immutable value; a notify datagram is decoded once; kernel/proc.py is
the one home of prctl(2) and of the grace-then-SIGKILL wait.
"""

import ctypes
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest
from conftest import TIMEOUT

from fdlaunch import errors
from fdlaunch.kernel import proc, sdnotify
from fdlaunch.loops import accepting, forking, listenfrom, overlap, readiness
from fdlaunch.text import notifyproto

PR_GET_CHILD_SUBREAPER = 37
CATCHABLE = sorted(set(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP})


def process_wide():
    """What a loop may change only once it runs: dispositions, the wakeup fd, subreaper, children, threads."""
    wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup)
    flag = ctypes.c_int(-1)
    assert ctypes.CDLL(None).prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) == 0
    children = sorted(proc.children_of(os.getpid()))
    threads = sorted(os.listdir("/proc/self/task"))
    return {number: signal.getsignal(number) for number in CATCHABLE}, wakeup, flag.value, children, threads


def test_building_a_loop_changes_nothing_process_wide(tmp_path):
    said = []

    def say(kind, text):
        said.append((kind, text))

    before = process_wide()
    inbox = sdnotify.Inbox()
    pidfd = os.pidfd_open(os.getpid())
    listener = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        program = readiness.Program(os.getpid(), pidfd)
        relays = readiness.Relays()
        readiness.Watcher(inbox, program, relays, False, say)
        readiness.Check("true", 1, 1, 0, {}, say)
        handoff = overlap.Settings(signal.SIGHUP, signal.SIGTERM, 1, 1, None, False, False, 0, None, None)
        overlap.Handoff(["true"], handoff, listenfrom.Handed({}), inbox, None, say, say)
        listenfrom.FromFile(str(tmp_path / "sockets"), {}, [], set(), True)
        server = accepting.Settings({}, None, 1, None, False, None, True, 1, None, None, None)
        accepting.Server(listener, ["true"], server, say, say)
        forking.Keeper(forking.Settings(None, 1, 1), say, say)
        assert process_wide() == before
        assert listener.getblocking()  # the server makes it non-blocking when it runs
        assert said == [
            ("info", f"watching pid {os.getpid()}; once it is ready: no relay (no --fd, --forward, --touch, --command or --stop)")
        ]
    finally:
        listener.close()
        os.close(pidfd)
        inbox.close()


def test_the_process_wide_check_sees_a_change():
    before = process_wide()
    old = signal.signal(signal.SIGUSR2, lambda number, frame: None)
    try:
        assert process_wide() != before
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert process_wide() == before


def test_handoff_settings_stay_as_built(tmp_path):
    """Telling s6 once is the loop's state: the settings it was handed stay as the tool built them."""
    read_end, write_end = os.pipe()
    child = subprocess.Popen(["sleep", str(TIMEOUT)])
    instance = overlap.Instance(child.pid)
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    upstream.bind(str(tmp_path / "upstream"))
    upstream.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    try:
        settings = overlap.Settings(signal.SIGHUP, signal.SIGTERM, 1, 1, write_end, False, False, 0, None, None)
        with pytest.raises(AttributeError):
            settings.ready_fd = None
        say = errors.say_as("test")
        handoff = overlap.Handoff(["sleep"], settings, listenfrom.Handed({}), None, str(tmp_path / "upstream"), say, say)
        handoff.current = instance
        instance.offer = listenfrom.Handed({}).offer()
        handoff.tell_ready(instance)
        handoff.tell_ready(instance)  # a second READY=1 writes nothing more to the closed fd
        assert os.read(read_end, 16) == b"\n"
        assert handoff.settings == settings and settings.ready_fd == write_end
        told = [upstream.recvmsg(4096, socket.CMSG_SPACE(12)) for _ in range(2)]
        # the first READY=1 names the instance, but comes from the main pid the supervisor knows: ours;
        # the next comes from the instance it named (root may send as another process)
        assert [struct.unpack("iII", ancillary[0][2])[0] for _, ancillary, _, _ in told] == [os.getpid(), child.pid]
        assert all(f"MAINPID={child.pid}\n".encode() in data for data, _, _, _ in told)
    finally:
        upstream.close()
        child.kill()
        child.wait()
        os.close(instance.pidfd)
        os.close(read_end)


@pytest.mark.parametrize(
    "data, ready, main_pid, text, fdstore",
    [
        (b"READY=1", True, None, None, False),
        (b"READY=1\n", True, None, None, False),
        (b"STATUS=x\nMAINPID=42\nREADY=1", True, 42, "42", False),
        (b"MAINPID=42\nMAINPID=43", False, 43, "43", False),  # the last one counts
        (b"MAINPID=abc", False, None, "abc", False),
        (b"MAINPID=0", False, None, "0", False),
        (b"MAINPID=\xd9\xa5", False, None, "\u0665", False),  # Arabic-Indic five: no pid
        (b"READY=0\nFDSTORE=1", False, None, None, True),
        (b"READY=1\nREADY=0", False, None, None, False),
    ],
)
def test_a_datagram_decoded_once(data, ready, main_pid, text, fdstore):
    notice = notifyproto.decode(data)
    assert (notice.ready, notice.main_pid, notice.main_pid_text, notice.fdstore) == (ready, main_pid, text, fdstore)
    assert notice.fields == notifyproto.parse(data)


def test_the_inbox_hands_out_the_decoded_datagram():
    inbox = sdnotify.Inbox()
    try:
        sdnotify.send(b"READY=1\nSTATUS=up\nMAINPID=7", inbox.path)
        message = inbox.receive(proc.Family(os.getpid()))
        assert message.notice == notifyproto.decode(b"READY=1\nSTATUS=up\nMAINPID=7")
        assert message.lineage == (os.getpid(),) and message.unchecked is None
    finally:
        inbox.close()


@pytest.mark.parametrize("changed_user", [False, True], ids=["its own /proc/self/comm", "prctl, after a change of user"])
def test_name_self_names_a_process(changed_user):
    """proc.name_self: what ps(1) shows, cut to the kernel's 15 bytes, whether the process may write its /proc files or not."""
    if changed_user and os.geteuid() != 0:
        pytest.skip("needs root to change user")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            if changed_user:  # not dumpable from here on: /proc/self/comm is root's
                os.setgroups([])
                os.setresgid(65534, 65534, 65534)
                os.setresuid(65534, 65534, 65534)
            proc.name_self("fdlaunch-test (guard)")
            with open("/proc/self/comm", "rb") as comm:
                os.write(write_end, comm.read())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        assert os.read(read_end, 64) == b"fdlaunch-test (\n"
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)


def test_prctl_reports_the_kernels_refusal():
    with pytest.raises(OSError) as refused:
        proc.prctl(-1)
    assert refused.value.errno == 22  # EINVAL


def test_end_within_kills_only_what_outlives_the_grace():
    quick = subprocess.Popen(["sleep", str(TIMEOUT)])
    stubborn = subprocess.Popen(
        [sys.executable, "-c", f"import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(); time.sleep({TIMEOUT})"],
        stdout=subprocess.PIPE,
    )
    pidfds = [os.pidfd_open(quick.pid), os.pidfd_open(stubborn.pid)]
    try:
        stubborn.stdout.readline()  # it ignores SIGTERM by now
        for pidfd in pidfds:
            proc.send_pidfd(pidfd, signal.SIGTERM)
        started = time.monotonic()
        assert proc.end_within(pidfds, 0.5) == [pidfds[1]]
        assert 0.5 <= time.monotonic() - started < TIMEOUT
        assert quick.wait(TIMEOUT) == -signal.SIGTERM
        assert stubborn.wait(TIMEOUT) == -signal.SIGKILL
        assert proc.end_within(pidfds, 10) == []  # both gone: no wait at all
    finally:
        for child in (quick, stubborn):
            child.kill()
            child.wait()
        stubborn.stdout.close()
        for pidfd in pidfds:
            os.close(pidfd)
