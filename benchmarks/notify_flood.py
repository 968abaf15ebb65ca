"""What a local user's flood of the private notify socket costs fdlaunch-notify-wait, side by side.

For each bin directory given (an older install and this one, say), runs
fdlaunch-notify-wait --fork over a program that never gets ready, and
floods its socket as an unprivileged uid with tests/notify_flooder.py:

  deep:  from a sender DEPTH processes deep, forked after the program
         started, for SECONDS: datagrams handled per second (the queue is
         short, so the sender goes as fast as the watcher reads);
  many:  SENDERS processes, two datagrams each, twice: stderr lines and
         growth of the watcher's resident memory during the second flood
         (the first fills what is kept up to its bounds), per 1000 senders.

Prints each figure and the ratio of the last directory's to the first's.
Run as root (the flood runs as --uid, 65534 unless given).

    python3 benchmarks/notify_flood.py [--uid=N] OLD_BIN NEW_BIN [DEPTH SECONDS SENDERS]
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLOODER = Path(__file__).resolve().parent.parent / "tests" / "notify_flooder.py"


def notify_socket_of(pid):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open("/proc/net/unix") as table:
            for line in table:
                if line.split()[-1].startswith(f"@fdlaunch-notify.{pid}."):
                    return line.split()[-1]
        time.sleep(0.01)
    raise SystemExit(f"pid {pid} made no notify socket")


def wait_for(path, seconds):
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} never appeared")
        time.sleep(0.01)
    return path.read_text()


def resident_kib(pid):
    return int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS:")).split()[1])


def flooding(bindir, uid, work, floods):
    """Run fdlaunch-notify-wait --fork from bindir and flood it with each (depth, senders, datagrams, seconds) in turn.

    Returns, for each flood: (datagrams sent, seconds it took, stderr lines
    it added, growth of the watcher's resident memory in KiB).
    """
    errors = work / "stderr"
    environ = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    with errors.open("w") as stderr:
        waiter = subprocess.Popen(["fdlaunch-notify-wait", "--fork", "--", "sleep", "600"], env=environ, stderr=stderr)
    results = []
    try:
        name = notify_socket_of(waiter.pid)
        for depth, senders, datagrams, seconds in floods:
            directory = Path(tempfile.mkdtemp(dir=work))
            os.chmod(directory, 0o755)
            os.chown(directory, uid, uid)
            flooder = subprocess.Popen(
                ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", "/usr/bin/python3", "-S",
                 str(work / "flooder.py"), str(directory), str(depth), str(senders), str(datagrams), str(seconds)],
                start_new_session=True,
            )  # fmt: skip
            try:
                wait_for(directory / "chained", 120)
                lines, before, started = len(errors.read_text().splitlines()), resident_kib(waiter.pid), time.monotonic()
                (directory / "name").write_text(name + "\n")
                sent = int(wait_for(directory / "sent", 3 * seconds + 10))
                took = time.monotonic() - started
                time.sleep(0.5)  # what is still queued is read, and said
                results.append((sent, took, len(errors.read_text().splitlines()) - lines, resident_kib(waiter.pid) - before))
            finally:
                os.killpg(flooder.pid, signal.SIGKILL)
                flooder.wait()
    finally:
        waiter.send_signal(signal.SIGTERM)
        waiter.wait()
    return results


def main(argv):
    uid = 65534
    if argv and argv[0].startswith("--uid="):
        uid = int(argv.pop(0).split("=", 1)[1])
    bindirs, numbers = argv[:2], [int(word) for word in argv[2:]]
    depth, seconds, senders = numbers + [800, 10, 4000][len(numbers) :]
    work = Path(tempfile.mkdtemp(prefix="fdlaunch-flood-"))
    os.chmod(work, 0o755)
    shutil.copy(FLOODER, work / "flooder.py")
    os.chmod(work / "flooder.py", 0o644)
    try:
        rows = []
        for bindir in bindirs:
            [(sent, took, _, _)] = flooding(bindir, uid, work, [(depth, 1, 10**7, seconds)])
            many = (0, senders, 2 * senders, 4 * seconds)
            _, (_, _, lines, grown) = flooding(bindir, uid, work, [many, many])  # the first fills what is kept up to its bounds
            rows.append((bindir, sent / took, 1000 * lines / senders, 1000 * grown / senders))
            _, handled, lines, grown = rows[-1]
            print(f"{bindir}: {handled:.0f} datagrams/s from {depth} deep; per 1000 senders {lines:.1f} lines, {grown:.0f} KiB")
        if len(rows) == 2:
            (_, *first), (_, *last) = rows
            print("ratio last/first: " + ", ".join(f"{b / a:.3g}" if a else "-" for a, b in zip(first, last, strict=True)))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
