"""Seeing a process stop when we are not its parent: ptrace(2), as little of it as that takes.

Only a parent learns that its child stopped (waitid(2), WSTOPPED); a pidfd
says nothing until the process exits, and /proc/PID/stat shows a stop only
to whoever looks, not who sent it or when. A tracer is told of every
signal the tracee is about to take, with its sender (PTRACE_GETSIGINFO),
as it happens. PTRACE_SEIZE (Linux 3.4) attaches without stopping the
tracee and without the SIGTRAP an exec would give it; only the thread
seized is traced, not its other threads or its children.

While traced, every signal the tracee takes waits for the tracer
(signal-delivery-stop): Tracee.take passes each on as it was sent, and a
stop signal from someone else stops it as it would have untraced
(PTRACE_LISTEN keeps it stopped, a SIGCONT still wakes it). The exit of a
tracee that is not our child is seen by its parent only once we have
waited for it, so take() waits for it too.
"""

import os
import select
import signal
import struct
import time

from fdlaunch.kernel import proc

# <linux/ptrace.h>
PTRACE_CONT = 7
PTRACE_DETACH = 17
PTRACE_GETSIGINFO = 0x4202
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_EVENT_STOP = 128
# wait(2): wait for a traced thread whatever its exit signal (__WALL, <linux/wait.h>)
WALL = 0x40000000
STOP_SIGNALS = (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)
# siginfo_t: si_signo, si_errno, si_code, then (kill, tgkill) si_pid and si_uid after the union's alignment
SIGINFO_SIZE = 128
SIGINFO_HEAD = struct.Struct("iii")
SIGINFO_SENDER = struct.Struct("iI")
SIGINFO_SENDER_OFFSET = 16 if struct.calcsize("P") == 8 else 12
# prctl(2): whether our memory may be read by a process of our user (a tracer among them);
# which process Yama lets trace us besides our ancestors (Documentation/admin-guide/LSM/Yama.rst)
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PR_SET_PTRACER = 0x59616D61
YAMA_SCOPE = "/proc/sys/kernel/yama/ptrace_scope"
# What take() reports
STOPPED_ITSELF, EXITED = "stopped itself", "exited"


def ptrace(request, pid, data=0):
    """ptrace(2) through libc; OSError with the errno if the kernel refuses."""
    import ctypes  # costs start-up time: loaded on first use, as proc.libc() does

    libc = proc.libc()
    libc.ptrace.restype = ctypes.c_long
    libc.ptrace.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p)
    if libc.ptrace(request, pid, None, data) == -1:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))


def seize(pid):
    """Start tracing pid without stopping it (PTRACE_SEIZE); OSError (EPERM) if not allowed."""
    ptrace(PTRACE_SEIZE, pid)


def allow_tracer(pid):
    """Let pid, a process of ours that is not our ancestor, trace us: what is in our way, moved aside.

    Yama (ptrace_scope 1) lets only ancestors trace, unless we name the
    tracer (PR_SET_PTRACER; EINVAL without Yama, where nothing needs
    naming). A process that changed its user ids without an exec since
    (a fused fdlaunch-setuidgid) is not dumpable, and only a tracer with
    CAP_SYS_PTRACE may trace it; the exec that follows makes it dumpable
    again in any case (execve(2)), so it is made so a moment sooner.
    """
    import ctypes

    if proc.libc().prctl(ctypes.c_int(PR_GET_DUMPABLE), *[ctypes.c_ulong(0)] * 4) == 0:
        proc.prctl(PR_SET_DUMPABLE, 1)
    name_tracer(pid)


def name_tracer(pid):
    """PR_SET_PTRACER pid (0: none); nothing where there is no Yama."""
    try:
        proc.prctl(PR_SET_PTRACER, pid)
    except OSError:
        pass


def refusal_hint():
    """Why a seize may have been refused, when Yama forbids it outright ('' otherwise)."""
    try:
        with open(YAMA_SCOPE) as scope:
            level = scope.read().strip()
    except OSError:
        return ""
    if level == "2":
        return " (kernel.yama.ptrace_scope is 2: only a process with CAP_SYS_PTRACE may trace)"
    if level == "3":
        return " (kernel.yama.ptrace_scope is 3: no process may trace)"
    return ""


class Tracee:
    """A process we trace: its signals passed on, until it stops itself with SIGSTOP, exits, or is released."""

    def __init__(self, pid):
        self.pid = pid
        self.held = None  # once it waits in a ptrace stop of ours: the signal release() delivers (0: none)
        self.stop_passed = False  # a stop signal from someone else was passed on: its group stop follows
        self.gone = False

    def take(self):
        """Act on every stop and exit waiting to be seen: STOPPED_ITSELF (it is held so until release()), EXITED, or None."""
        while not self.gone and self.held is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG | WALL)
            except ChildProcessError:
                self.gone = True  # no longer ours to wait for
                return EXITED
            if pid == 0:
                return None
            if not os.WIFSTOPPED(status):
                self.gone = True
                return EXITED
            if self.stopped(os.WSTOPSIG(status), status >> 16):
                return STOPPED_ITSELF
        return None

    def stopped(self, number, event):
        """One ptrace stop: True if it is a SIGSTOP the tracee sent itself, held with the SIGSTOP dropped; else it goes on."""
        if event == PTRACE_EVENT_STOP:
            if number not in STOP_SIGNALS:
                self.resume(PTRACE_CONT)  # a stop of ours (PTRACE_INTERRUPT) or the wake-up after a SIGCONT
                return False
            if number == signal.SIGSTOP and not self.stop_passed:
                # A group stop that no signal delivered to this thread started: another thread
                # of the program took the SIGSTOP (raise(3) there); that is the program's own.
                self.held = 0
                return True
            self.stop_passed = False
            self.resume(PTRACE_LISTEN)  # stays stopped, as untraced; a SIGCONT wakes it
            return False
        if event != 0:
            self.resume(PTRACE_CONT)
            return False
        if number == signal.SIGSTOP and self.sender() == self.pid:
            self.held = 0
            return True
        self.stop_passed = number in STOP_SIGNALS
        self.resume(PTRACE_CONT, number)  # delivered as it was sent
        return False

    def sender(self):
        """The pid that sent the signal the tracee is stopped with (kill(2), tgkill(2)); None for the kernel's own."""
        import ctypes

        info = ctypes.create_string_buffer(SIGINFO_SIZE)
        try:
            ptrace(PTRACE_GETSIGINFO, self.pid, ctypes.addressof(info))
        except OSError:
            return None
        _, _, code = SIGINFO_HEAD.unpack_from(info.raw)
        if code > 0:
            return None  # SI_KERNEL and the like: no process sent it
        pid, _ = SIGINFO_SENDER.unpack_from(info.raw, SIGINFO_SENDER_OFFSET)
        return pid

    def resume(self, request, number=0):
        try:
            ptrace(request, self.pid, number)
        except ProcessLookupError:
            pass  # killed meanwhile (SIGKILL does not wait for us): its exit is reported next

    def release(self, wakeup, deadline):
        """Stop tracing: it goes on as if it had never been traced, a SIGSTOP it sent itself dropped (the caller
        sends SIGCONT). False if it would not stop for us by deadline: it is released when we exit.

        wakeup: a descriptor that becomes readable on SIGCHLD (proc.catch_signals), to wait on.
        """
        if self.held is None and not self.gone:
            try:
                ptrace(PTRACE_INTERRUPT, self.pid)
            except ProcessLookupError:
                pass  # exited, and not yet waited for: wait_for_stop does
            if not self.wait_for_stop(wakeup, deadline):
                return self.gone
        if not self.gone:
            try:
                ptrace(PTRACE_DETACH, self.pid, self.held)
            except ProcessLookupError:
                pass  # killed meanwhile
        self.held, self.gone = None, True
        return True

    def wait_for_stop(self, wakeup, deadline):
        """After PTRACE_INTERRUPT: True once it waits in a stop, held with the signal it was about to take (0: none);
        False if it exited, or deadline passed."""
        while True:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG | WALL)
            except ChildProcessError:
                self.gone = True
                return False
            if pid != 0 and not os.WIFSTOPPED(status):
                self.gone = True
                return False
            if pid != 0:
                self.held = os.WSTOPSIG(status) if status >> 16 == 0 else 0
                return True
            if time.monotonic() >= deadline:
                return False
            select.select([wakeup], [], [], max(0.0, deadline - time.monotonic()))
            proc.caught_signals(wakeup)
