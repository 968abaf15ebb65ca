"""Start-up cost of a chain link, measured side by side in one run.

Every fdlaunch tool runs once per service start, in a chain of several, so
what matters is the time and memory one link adds before the exec. Prints
the median wall time and peak RSS of each command over N runs, and each
one's ratio to a bare Python interpreter start and to the C peers.

    python benchmarks/startup.py [RUNS]
"""

import os
import shutil
import statistics
import sys
import time

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 30
FOUR_SOCKETS = ["-udp:127.0.0.1:0", "-tcp:127.0.0.1:0", "-tcp:127.0.0.1:0", "-unix:@fdl-bench"]


def measure(argv):
    times, peaks = [], []
    for _ in range(RUNS):
        start = time.perf_counter()
        pid = os.posix_spawnp(argv[0], argv, os.environ)
        _, status, usage = os.wait4(pid, 0)
        times.append(time.perf_counter() - start)
        peaks.append(usage.ru_maxrss)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{argv} failed")
    return statistics.median(times), max(peaks)


def main():
    commands = {
        "true (no launcher)": ["true"],
        "python3 -S -c pass": [sys.executable, "-S", "-c", "pass"],
        "python3 -c pass (as a console script starts)": [sys.executable, "-c", "pass"],
        "fdlaunch-listen -tcp:127.0.0.1:0 true": ["fdlaunch-listen", "-tcp:127.0.0.1:0", "true"],
        "fdlaunch-listen 4 sockets true": [
            "fdlaunch-listen",
            "-udp:127.0.0.1:0",
            "-tcp:127.0.0.1:0",
            "-tcp:127.0.0.1:0",
            "-unix:@fdl-bench",
            "true",
        ],
    }
    for peer, argv in (("chpst", ["chpst", "-u", "root", "true"]), ("s6-setuidgid", ["s6-setuidgid", "root", "true"])):
        if shutil.which(peer):
            commands[" ".join(argv)] = argv
    results = {name: measure(argv) for name, argv in commands.items()}
    python_time = results["python3 -S -c pass"][0]
    print(f"{RUNS} runs each; median wall time, peak RSS")
    print(f"{'command':46} {'ms':>8} {'x python':>9} {'RSS MiB':>8}")
    for name, (seconds, peak_kib) in results.items():
        print(f"{name:46} {seconds * 1000:8.2f} {seconds / python_time:9.2f} {peak_kib / 1024:8.1f}")


if __name__ == "__main__":
    main()
