"""Start-up of the scripts make install writes, beside a virtualenv's console scripts.

Runs each command from each bin directory in alternation (paired runs, so
that the load of a shared machine falls on both alike) and prints medians
and their ratio, with the interpreter's bare start as the floor.

    make install DESTDIR=/tmp/stage
    python3 benchmarks/installed.py /tmp/stage/usr/local/bin .venv/bin [RUNS]
"""

import os
import statistics
import sys
import time

COMMANDS = [["fdlaunch-notify", "--version"], ["fdlaunch-listen", "-tcp:127.0.0.1:0", "true"]]


def once(argv, bindir):
    environ = {**os.environ, "PATH": f"{bindir}:/usr/bin:/bin"}
    start = time.perf_counter()
    program = argv[0] if "/" in argv[0] else os.path.join(bindir, argv[0])
    pid = os.posix_spawn(program, argv, environ, file_actions=[(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)])
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv} from {bindir} failed")
    return time.perf_counter() - start


def main():
    first, second = (os.path.abspath(path) for path in sys.argv[1:3])
    runs = int(sys.argv[3]) if len(sys.argv) > 3 else 40
    floor = statistics.median(once([sys.executable, "-c", "pass"], first) for _ in range(runs))
    print(f"{runs} paired runs; median ms; floor {sys.executable} -c pass: {floor * 1000:.1f} ms")
    print(f"{'command':40} {'A ms':>7} {'B ms':>7} {'A/B':>6} {'A/floor':>8} {'B/floor':>8}")
    for argv in COMMANDS:
        times = {first: [], second: []}
        for _ in range(runs):
            for bindir in times:
                times[bindir].append(once(argv, bindir))
        a, b = statistics.median(times[first]), statistics.median(times[second])
        print(f"{' '.join(argv):40} {a * 1000:7.1f} {b * 1000:7.1f} {a / b:6.2f} {a / floor:8.2f} {b / floor:8.2f}")
    print(f"A = {first}\nB = {second}")


if __name__ == "__main__":
    main()
