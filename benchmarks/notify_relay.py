"""How long fdlaunch-notify-wait takes to relay readiness, per relay, side by side.

For each relay the program sends READY=1 (stamping CLOCK_MONOTONIC just
before sendto) and this script stamps the moment it sees the relay done:
the newline on the s6 fd, the datagram upstream, the command's write, the
SIGSTOP, the pid printed in fork mode. Prints the median and 90th percentile
of the difference and the median's ratio to the 2 ms target.

The other inputs are measured the same way, to the newline on the s6 fd
(chain mode) or the pid printed (fork mode): --upstart from just before the
program's SIGSTOP to itself (in chain mode the watcher traces it), and
--ready-fd from just before its newline on its fd.

fdlaunch-foreground is measured the same way from the moment its
launching process exits 0 (stamped just before _exit) to the newline on
the s6 fd.

    python benchmarks/notify_relay.py [RUNS]
"""

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 20
TARGET_MS = 2.0
# The program: wait for the watcher to be up, stamp, say READY=1, stay alive.
SENDER = """
import os, socket, sys, time
time.sleep(0.15)
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
target = os.environ["NOTIFY_SOCKET"]
target = "\\0" + target[1:] if target.startswith("@") else target  # abstract
stamp = time.monotonic()
s.sendto(b"READY=1", target)
open(sys.argv[1], "w").write(repr(stamp))
time.sleep(30)
"""


# The same, saying it is ready as an upstart daemon does (UPSTART_JOB set: SIGSTOP to itself).
UPSTART = """
import os, signal, sys, time
time.sleep(0.15)
stamp = time.monotonic()
os.kill(os.getpid(), signal.SIGSTOP)
open(sys.argv[1], "w").write(repr(stamp))
time.sleep(30)
"""

# And as an s6 daemon does: a newline on its notification fd, 5.
READY_FD = """
import os, sys, time
time.sleep(0.15)
stamp = time.monotonic()
os.write(5, b"\\n")
open(sys.argv[1], "w").write(repr(stamp))
time.sleep(30)
"""


# A daemon that forks into the background, for fdlaunch-foreground: the
# launching process waits for the daemon's PID file, stamps, and exits 0.
FORKING = """
import os, sys, time
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork():
        os._exit(0)
    open(sys.argv[2], "w").write(str(os.getpid()))
    os.write(w, b"x")
    time.sleep(30)
    os._exit(0)
os.read(r, 1)
time.sleep(0.1)
stamp = time.monotonic()
open(sys.argv[1], "w").write(repr(stamp))
os._exit(0)
"""


def program(stamp_file):
    return [sys.executable, "-c", SENDER, stamp_file]


def sent_at(stamp_file):
    for _ in range(500):
        try:
            return float(open(stamp_file).read())
        except (OSError, ValueError):
            time.sleep(0.002)
    raise SystemExit("the program never said READY=1")


def via_fd(work):
    read_end, write_end = os.pipe()
    child = subprocess.Popen(["fdlaunch-notify-wait", f"--fd={write_end}", "--", *program(work.stamp)], pass_fds=(write_end,))
    os.close(write_end)
    os.read(read_end, 1)
    seen = time.monotonic()
    os.close(read_end)
    return child, seen


def via_forward(work):
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    upstream.bind(work.path("upstream"))
    child = subprocess.Popen(
        ["fdlaunch-notify-wait", "--forward", "--", *program(work.stamp)], env={**os.environ, "NOTIFY_SOCKET": work.path("upstream")}
    )
    upstream.recv(4096)
    seen = time.monotonic()
    upstream.close()
    return child, seen


def via_command(work):
    fifo = work.path("fifo")
    os.mkfifo(fifo)
    child = subprocess.Popen(["fdlaunch-notify-wait", f"--command=echo >{fifo}", "--", *program(work.stamp)])
    with open(fifo) as done:
        done.readline()
    return child, time.monotonic()


def via_stop(work):
    child = subprocess.Popen(["fdlaunch-notify-wait", "--stop", "--", *program(work.stamp)])
    os.waitpid(child.pid, os.WUNTRACED)
    seen = time.monotonic()
    os.kill(child.pid, 18)  # SIGCONT, so that it can be killed and reaped normally
    return child, seen


def via_fork(work):
    child = subprocess.Popen(["fdlaunch-notify-wait", "--fork", "--", *program(work.stamp)], stdout=subprocess.PIPE, text=True)
    pid = int(child.stdout.readline())
    seen = time.monotonic()
    child.wait()
    os.kill(pid, 9)
    return None, seen


def via_input(option, code, fork=False):
    """Readiness from another input (--upstart, --ready-fd=5): to the s6 fd's newline, or with fork to the pid printed."""

    def relay(work):
        argv = [option, "--", sys.executable, "-c", code, work.stamp]
        if fork:
            child = subprocess.Popen(["fdlaunch-notify-wait", "--fork", *argv], stdout=subprocess.PIPE, text=True)
            pid = int(child.stdout.readline())
            seen = time.monotonic()
            child.wait()
            os.kill(pid, 9)
            return None, seen
        read_end, write_end = os.pipe()
        child = subprocess.Popen(["fdlaunch-notify-wait", f"--fd={write_end}", *argv], pass_fds=(write_end,))
        os.close(write_end)
        os.read(read_end, 1)
        seen = time.monotonic()
        os.close(read_end)
        return child, seen

    return relay


def via_foreground(options):
    """fdlaunch-foreground: the launching process's exit 0 -> the newline on the s6 fd."""

    def relay(work):
        read_end, write_end = os.pipe()
        pidfile = work.path("pid")
        argv = [*(option.replace("PIDFILE", pidfile) for option in options), "--", sys.executable, "-c", FORKING, work.stamp, pidfile]
        child = subprocess.Popen(["fdlaunch-foreground", f"--fd={write_end}", *argv], pass_fds=(write_end,))
        os.close(write_end)
        os.read(read_end, 1)
        seen = time.monotonic()
        os.close(read_end)
        return child, seen

    return relay


class Work:
    def __init__(self, directory):
        self.directory = directory
        self.stamp = self.path("stamp")

    def path(self, name):
        return os.path.join(self.directory, name)


def measure(relay):
    delays = []
    for _ in range(RUNS):
        with tempfile.TemporaryDirectory() as directory:
            work = Work(directory)
            child, seen = relay(work)
            delays.append((seen - sent_at(work.stamp)) * 1000)
            if child is not None:
                child.terminate()  # fdlaunch-foreground passes it on; a SIGKILL would leave its guard to clean up
                child.wait()
    return delays


def main():
    relays = {"--fd (s6)": via_fd, "--forward": via_forward, "--command": via_command, "--stop": via_stop, "--fork": via_fork}
    print(f"READY=1 sent -> relay done, {RUNS} runs each; target {TARGET_MS} ms")
    print(f"{'relay':30} {'median ms':>10} {'p90 ms':>8} {'median/target':>14}")
    for name, relay in relays.items():
        report(name, measure(relay))
    print("other inputs: the program's SIGSTOP to itself, its newline on its fd -> newline on the s6 fd, or the pid printed")
    inputs = {
        "--upstart (chain, traced)": via_input("--upstart", UPSTART),
        "--upstart --fork": via_input("--upstart", UPSTART, fork=True),
        "--ready-fd=5 (chain)": via_input("--ready-fd=5", READY_FD),
        "--ready-fd=5 --fork": via_input("--ready-fd=5", READY_FD, fork=True),
    }
    for name, relay in inputs.items():
        report(name, measure(relay))
    print("fdlaunch-foreground: the launching process's exit -> newline on the s6 fd")
    report("foreground --pidfile", measure(via_foreground(["--pidfile=PIDFILE"])))
    report("foreground (no PID file)", measure(via_foreground([])))


def report(name, delays):
    delays = sorted(delays)
    median = statistics.median(delays)
    p90 = delays[int(len(delays) * 0.9) - 1]
    print(f"{name:30} {median:10.3f} {p90:8.3f} {median / TARGET_MS:14.2f}")


if __name__ == "__main__":
    main()
