"""Start-up cost of fdlaunch links and chains, measured side by side in one run.

Every fdlaunch tool runs once per service start, in a chain of several, so
what matters is what a link adds before the exec. The commands run in turn,
round after round, so that a machine's drift touches them all alike; each
row prints the median wall time, its ratio to a bare start of the same
interpreter the console scripts use, and the peak RSS of the process over
all its execs, as GNU time reports it (a child of this Python process would
carry our own RSS in its ru_maxrss; one of /usr/bin/time does not).

Targets: fdlaunch-listen and fdlaunch-fdmap <= 2.0x the floor; a link that
reads its usage with docopt-ng (fdlaunch-setuidgid, fdlaunch-notify-wait)
<= 2.4x, beside the cost of importing docopt alone; the 3-link chain <= 3.5x
with fusion, beside the same chain with FDLAUNCH_FUSE=0 and its C peers.

    make bench, or: PATH=$PWD/.venv/bin:$PATH python3 benchmarks/startup.py [RUNS]
"""

import os
import pwd
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 30
GNU_TIME = "/usr/bin/time"


def console_interpreter():
    """The interpreter named on the #! line of the installed fdlaunch-listen."""
    script_path = shutil.which("fdlaunch-listen")
    if script_path is None:
        sys.exit("startup.py: fdlaunch-listen is not on PATH: run 'make bench', or put .venv/bin first in PATH after 'make test'")
    with open(script_path, "rb") as script:
        return script.readline()[2:].decode().split()[0]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def account_for(python):
    """Whom setuidgid drops to: nobody if it can run python (one under /root it cannot), else ourselves."""
    if os.geteuid() == 0:
        as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", python, "-c", "pass"]
        if subprocess.run(as_nobody, stderr=subprocess.DEVNULL).returncode == 0:
            return "nobody"
    return pwd.getpwuid(os.getuid()).pw_name


def commands(private):
    """The rows: name -> (argv, extra environment); private: a directory of ours for unix socket files."""
    python = console_interpreter()
    account = account_for(python)
    port = free_port()
    ready = shutil.which("systemd-notify")
    chain = ["fdlaunch-listen", "-tcp:127.0.0.1:0", "--", "fdlaunch-setuidgid", account, "--"]
    chain += ["fdlaunch-notify-wait", "--timeout=5", "--", ready or "true", "--ready"]
    rows = {
        "floor: python -c pass": ([python, "-c", "pass"], {}),
        "true (no interpreter)": (["true"], {}),
        "python -c 'import docopt'": ([python, "-c", "import docopt"], {}),
        "fdlaunch-listen -tcp:127.0.0.1:0 -- true": (["fdlaunch-listen", "-tcp:127.0.0.1:0", "--", "true"], {}),
        # The file each run leaves is stale for the next: walked, probed, removed, bound, checked, moded.
        "fdlaunch-listen -unix::DIR/x.sock -- true": (["fdlaunch-listen", f"-unix::{private}/x.sock", "--", "true"], {}),
        "fdlaunch-fdmap --map -- true": (["fdlaunch-fdmap", "--map", "--", "true"], {}),
        f"fdlaunch-setuidgid {account} -- true": (["fdlaunch-setuidgid", account, "--", "true"], {}),
        "fdlaunch-notify-wait -- true": (["fdlaunch-notify-wait", "--", "true"], {}),
        "listen, setuidgid -- true": (chain[:6] + ["true"], {}),
        "listen, setuidgid -- true  FDLAUNCH_FUSE=0": (chain[:6] + ["true"], {"FDLAUNCH_FUSE": "0"}),
    }
    if ready:
        rows["3 links -- systemd-notify --ready"] = (chain, {})
        rows["3 links  FDLAUNCH_FUSE=0"] = (chain, {"FDLAUNCH_FUSE": "0"})
    peers = {
        f"C: s6-envuidgid {account} s6-applyuidgid -U true": ["s6-envuidgid", account, "s6-applyuidgid", "-U", "true"],
        f"C: chpst -u {account} true": ["chpst", "-u", account, "true"],
    }
    for name, argv in peers.items():
        if shutil.which(argv[0]):
            rows[name] = (argv, {})
    # systemd-socket-activate execs only once a client connects: both sides get one.
    rows["--lazy listen, setuidgid -- true  (client connects)"] = (
        ["fdlaunch-listen", "--lazy", f"-tcp:127.0.0.1:{port}", "--", "fdlaunch-setuidgid", account, "--", "true"],
        {"connect": port},
    )
    if shutil.which("systemd-socket-activate") and shutil.which("s6-applyuidgid"):
        rows["C: socket-activate, s6-envuidgid, s6-applyuidgid  (client)"] = (
            ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "s6-envuidgid", account, "s6-applyuidgid", "-U", "true"],
            {"connect": port},
        )
    return rows


def connect(port):
    """Knock until the listener answers: the lazy launchers exec on the first client."""
    while True:
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            return
        except ConnectionRefusedError:
            time.sleep(0.0002)


def run_once(argv, extra):
    extra = dict(extra)
    port = extra.pop("connect", None)
    environ = {**os.environ, **extra}
    start = time.perf_counter()
    pid = os.posix_spawnp(argv[0], argv, environ)
    if port is not None:
        connect(port)
    _, status, _ = os.wait4(pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {os.waitstatus_to_exitcode(status)}")
    return elapsed


def peak_rss_kib(argv, extra):
    """The peak RSS of argv's process in KiB, by GNU time (on stderr: -o would open fd 3); None without it."""
    if not os.path.exists(GNU_TIME):
        return None
    extra = dict(extra)
    port = extra.pop("connect", None)
    child = subprocess.Popen([GNU_TIME, "-f", "peak %M", *argv], env={**os.environ, **extra}, stderr=subprocess.PIPE, text=True)
    if port is not None:
        connect(port)
    _, errors = child.communicate(timeout=60)
    return int(errors.splitlines()[-1].split()[-1])


def main():
    private = tempfile.mkdtemp(prefix="fdlaunch-bench-")
    try:
        measure(commands(private))
    finally:
        shutil.rmtree(private)


def measure(rows):
    times = {name: [] for name in rows}
    for _ in range(RUNS):
        for name, (argv, extra) in rows.items():
            times[name].append(run_once(argv, extra))
    peaks = {name: peak_rss_kib(argv, extra) for name, (argv, extra) in rows.items()}
    floor = statistics.median(times["floor: python -c pass"])
    print(f"{RUNS} rounds; median wall time, ratio to the floor, peak RSS of the process")
    print(f"{'command':58} {'ms':>8} {'x floor':>8} {'RSS MiB':>8}")
    for name, samples in times.items():
        median = statistics.median(samples)
        peak = "n/a" if peaks[name] is None else f"{peaks[name] / 1024:.1f}"
        print(f"{name:58} {median * 1000:8.2f} {median / floor:8.2f} {peak:>8}")


if __name__ == "__main__":
    main()
