"""One program per connection: fdlaunch-accept against tcpserver and systemd-socket-activate, side by side.

Every server runs a handler that echoes the client's address, on
127.0.0.1, and one run prints, each figure the median of ROUNDS rounds in
which the servers take turns (SECONDS of clients each):
- connections per second, one client at a time and 64 at once, for
  fdlaunch-accept -q (and with its default log lines), tcpserver -H -R -l0
  (ucspi-tcp) and systemd-socket-activate --accept, with the ratio of
  fdlaunch-accept to each;
- the UCSPI idiom, a handler that drops privileges first: fdlaunch-accept --
  fdlaunch-setuidgid nobody -- h.sh (its link run in the server's forked
  child, fdlaunch(7), FUSION), the same with FDLAUNCH_FUSE=0 (a new
  interpreter per connection), and tcpserver -HR -l0 -b 128 setuidgid
  nobody h.sh, at 1, 8 and 64 clients, with the ratios to tcpserver
  (target: fused >= 0.5x at each);
- failed connections with 200 concurrent clients against fdlaunch-accept -c 40
  (the others wait in the listen backlog);
- fdlaunch-accept's peak resident memory (VmHWM) after 5,000 connections,
  with the plain handler and with the fused handler chain (target: within
  1 MiB of each other).

    PATH=$PWD/.venv/bin:$PATH python benchmarks/accept.py [ROUNDS] [SECONDS]
"""

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

LISTEN = ["fdlaunch-listen", "-tcp:127.0.0.1:PORT", "--"]
HANDLER = ["sh", "-c", 'echo "$TCPREMOTEIP"']
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
SECONDS = float(sys.argv[2]) if len(sys.argv) > 2 else 2.0
CLIENTS = 64
BURST = 200
RSS_CONNECTIONS = 5_000
REPLY = b"127.0.0.1\n"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_connection(port, timeout=60):
    """Connect, read to EOF; the reply, or None if the connection failed."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as client:
            client.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := client.recv(4096):
                reply += chunk
            return reply
    except OSError:
        return None


def servers():
    """name -> argv template (PORT replaced) and the reply its handler gives."""
    table = {
        "fdlaunch-accept -q": ([*LISTEN, "fdlaunch-accept", "-q", "-c", "100", "--", *HANDLER], REPLY),
        "fdlaunch-accept (logging)": ([*LISTEN, "fdlaunch-accept", "-c", "100", "--", *HANDLER], REPLY),
    }
    if shutil.which("tcpserver"):
        table["tcpserver -H -R -l0"] = (["tcpserver", "-H", "-R", "-l0", "-c", "100", "127.0.0.1", "PORT", *HANDLER], REPLY)
    if shutil.which("systemd-socket-activate"):
        # It sets no TCPREMOTEIP: the same handler echoes an empty line.
        argv = ["systemd-socket-activate", "--accept", "--inetd", "-l", "127.0.0.1:PORT", *HANDLER]
        table["systemd-socket-activate --accept"] = (argv, b"\n")
    return table


def dropping_servers(script):
    """The UCSPI idiom: name -> (argv template, extra environment), each handler dropping to nobody before script."""
    fused = [*LISTEN, "fdlaunch-accept", "-q", "-c", "100", "--", "fdlaunch-setuidgid", "nobody", "--", script]
    table = {
        "fdlaunch-accept -- fdlaunch-setuidgid nobody -- h.sh": (fused, {}),
        "the same, FDLAUNCH_FUSE=0": (fused, {"FDLAUNCH_FUSE": "0"}),
    }
    if shutil.which("tcpserver") and shutil.which("setuidgid"):
        argv = ["tcpserver", "-HR", "-l0", "-b", "128", "-c", "100", "127.0.0.1", "PORT", "setuidgid", "nobody", script]
        table["tcpserver -HR -l0 -b 128 setuidgid nobody h.sh"] = (argv, {})
    return table


class Running:
    def __init__(self, argv, expected, extra=None):
        self.port = free_port()
        self.expected = expected
        argv = [word.replace("PORT", str(self.port)) for word in argv]
        environ = {**os.environ, **(extra or {})}
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environ)
        deadline = time.monotonic() + 30
        while one_connection(self.port, timeout=5) != expected:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit(f"{argv[0]} did not start serving")
            time.sleep(0.05)

    def server_pid(self):
        """The pid that accepts: fdlaunch-listen fuses into fdlaunch-accept, so it is the process started."""
        return self.process.pid

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def rate(server, clients, seconds=SECONDS, total=None):
    """clients threads connect one after another for seconds (or until total connections): (connections per second, failures)."""
    lock = threading.Lock()
    counts = {"done": 0, "failed": 0}
    deadline = time.monotonic() + seconds

    def loop():
        while time.monotonic() < deadline:
            with lock:
                if total is not None and counts["done"] >= total:
                    return
                counts["done"] += 1
            if one_connection(server.port) != server.expected:
                with lock:
                    counts["failed"] += 1

    threads = [threading.Thread(target=loop) for _ in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return counts["done"] / (time.monotonic() - started), counts["failed"]


def burst(port, expected, clients):
    """clients connecting at the same moment, each once: how many failed."""
    results = []
    gate = threading.Event()

    def one():
        gate.wait()
        results.append(one_connection(port) == expected)

    threads = [threading.Thread(target=one) for _ in range(clients)]
    for thread in threads:
        thread.start()
    gate.set()
    for thread in threads:
        thread.join()
    return results.count(False)


def status_kib(pid, field):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    return 0


def compare(table, client_counts):
    """{name: {clients: median connections per second}}, {name: failures}: the servers take turns, ROUNDS times."""
    rates = {name: {n: [] for n in client_counts} for name in table}
    failures = dict.fromkeys(table, 0)
    for _ in range(ROUNDS):
        for name, (argv, expected, extra) in table.items():
            server = Running(argv, expected, extra)
            try:
                for clients in client_counts:
                    per_second, failed = rate(server, clients)
                    rates[name][clients].append(per_second)
                    failures[name] += failed
            finally:
                server.stop()
    return {name: {n: statistics.median(samples) for n, samples in by_count.items()} for name, by_count in rates.items()}, failures


def plain_handlers():
    table = {name: (argv, expected, {}) for name, (argv, expected) in servers().items()}
    rows, failures = compare(table, (1, CLIENTS))
    print(f"handler: {' '.join(HANDLER[:2])} {HANDLER[2]!r}; median of {ROUNDS} rounds of {SECONDS:g} s each, the servers taking turns")
    print(f"{'server':34} {'1 client/s':>11} {'64 clients/s':>13} {'failed':>7}")
    for name, by_count in rows.items():
        print(f"{name:34} {by_count[1]:11.0f} {by_count[CLIENTS]:13.0f} {failures[name]:7d}")
    ours = rows["fdlaunch-accept -q"]
    for name, by_count in rows.items():
        if not name.startswith("fdlaunch-accept"):
            one, many = ours[1] / by_count[1], ours[CLIENTS] / by_count[CLIENTS]
            print(f"fdlaunch-accept -q / {name}: 1 client x{one:.2f}, 64 clients x{many:.2f}")


def dropping_handlers(script):
    table = {name: (argv, REPLY, extra) for name, (argv, extra) in dropping_servers(script).items()}
    counts = (1, 8, CLIENTS)
    rows, failures = compare(table, counts)
    print()
    print('handler: setuidgid nobody, then h.sh (echo "$TCPREMOTEIP"); connections per second')
    print(f"{'server':55} {'1 client':>9} {'8 clients':>10} {'64 clients':>11} {'failed':>7}")
    for name, by_count in rows.items():
        print(f"{name:55} {by_count[1]:9.0f} {by_count[8]:10.0f} {by_count[CLIENTS]:11.0f} {failures[name]:7d}")
    peer = next((name for name in rows if name.startswith("tcpserver")), None)
    if peer is not None:
        for name in [n for n in rows if n != peer]:
            ratios = ", ".join(f"{n} x{rows[name][n] / rows[peer][n]:.2f}" for n in counts)
            print(f"{name} / tcpserver: {ratios}")


def burst_refusals():
    argv = [*LISTEN, "fdlaunch-accept", "-q", "-c", "40", "--", "sh", "-c", 'echo "$TCPREMOTEIP"; sleep 0.2']
    server = Running(argv, REPLY)
    try:
        failed = burst(server.port, REPLY, BURST)
    finally:
        server.stop()
    print()
    print(f"{BURST} clients at once, fdlaunch-accept -c 40 (handler sleeps 0.2 s): {failed} failed")


def peak_memory(script):
    """VmHWM of the server after RSS_CONNECTIONS connections, plain handler and fused handler chain."""
    handlers = {
        "h.sh": [script],
        "fdlaunch-setuidgid nobody -- h.sh (fused)": ["fdlaunch-setuidgid", "nobody", "--", script],
    }
    peaks = {}
    for name, handler in handlers.items():
        server = Running([*LISTEN, "fdlaunch-accept", "-q", "--", *handler], REPLY)
        try:
            _, failed = rate(server, 16, seconds=600, total=RSS_CONNECTIONS)
            peaks[name] = (status_kib(server.server_pid(), "VmHWM"), failed)
        finally:
            server.stop()
    print()
    for name, (peak, failed) in peaks.items():
        print(f"fdlaunch-accept peak RSS after {RSS_CONNECTIONS} connections, handler {name}: {peak / 1024:.1f} MiB ({failed} failed)")
    (plain, _), (fused, _) = peaks.values()
    print(f"fused handler chain - plain handler: {(fused - plain) / 1024:+.2f} MiB (target: within 1 MiB)")


def main():
    private = tempfile.mkdtemp(prefix="fdlaunch-bench-")
    try:
        os.chmod(private, 0o755)  # nobody runs h.sh from here
        script = os.path.join(private, "h.sh")
        with open(script, "w") as file:
            file.write('#!/bin/sh\necho "$TCPREMOTEIP"\n')
        os.chmod(script, 0o755)
        plain_handlers()
        dropping_handlers(script)
        burst_refusals()
        peak_memory(script)
    finally:
        shutil.rmtree(private)


if __name__ == "__main__":
    main()
