"""One program per connection: fdlaunch-accept against tcpserver and systemd-socket-activate, side by side.

Every server runs the same handler, sh -c 'echo "$TCPREMOTEIP"', on
127.0.0.1, and one run prints:
- connections per second with sequential clients and with 64 concurrent
  clients (the median of 5 rounds in which the servers take turns), for fdlaunch-accept (-q, and with its default log lines),
  tcpserver -H -R -l0 (ucspi-tcp) and systemd-socket-activate --accept,
  with the ratio of fdlaunch-accept to each;
- failed connections with 200 concurrent clients against fdlaunch-accept -c 40
  (the others wait in the listen backlog);
- fdlaunch-accept's resident memory after 100 and after 10,000 connections.

    python benchmarks/accept.py [SEQUENTIAL] [CONCURRENT_TOTAL]
"""

import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time

LISTEN = ["fdlaunch-listen", "-tcp:127.0.0.1:PORT", "--"]
HANDLER = ["sh", "-c", 'echo "$TCPREMOTEIP"']
SEQUENTIAL = int(sys.argv[1]) if len(sys.argv) > 1 else 300
CONCURRENT_TOTAL = int(sys.argv[2]) if len(sys.argv) > 2 else 1500
ROUNDS = 5
CLIENTS = 64
BURST = 200
RSS_CONNECTIONS = 10_000


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
        "fdlaunch-accept -q": ([*LISTEN, "fdlaunch-accept", "-q", "-c", "100", "--", *HANDLER], b"127.0.0.1\n"),
        "fdlaunch-accept (logging)": ([*LISTEN, "fdlaunch-accept", "-c", "100", "--", *HANDLER], b"127.0.0.1\n"),
    }
    if shutil.which("tcpserver"):
        table["tcpserver -H -R -l0"] = (["tcpserver", "-H", "-R", "-l0", "-c", "100", "127.0.0.1", "PORT", *HANDLER], b"127.0.0.1\n")
    if shutil.which("systemd-socket-activate"):
        # It sets no TCPREMOTEIP: the same handler echoes an empty line.
        argv = ["systemd-socket-activate", "--accept", "--inetd", "-l", "127.0.0.1:PORT", *HANDLER]
        table["systemd-socket-activate --accept"] = (argv, b"\n")
    return table


class Running:
    def __init__(self, argv, expected):
        self.port = free_port()
        self.expected = expected
        argv = [word.replace("PORT", str(self.port)) for word in argv]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while one_connection(self.port, timeout=5) != expected:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit(f"{argv[0]} did not start serving")
            time.sleep(0.05)

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def sequential(server, count):
    failed = 0
    started = time.monotonic()
    for _ in range(count):
        failed += one_connection(server.port) != server.expected
    return count / (time.monotonic() - started), failed


def concurrent(server, clients, total):
    """clients threads share total connections: (connections per second, failures)."""
    lock = threading.Lock()
    left = [total]
    failed = [0]

    def loop():
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            if one_connection(server.port) != server.expected:
                with lock:
                    failed[0] += 1

    threads = [threading.Thread(target=loop) for _ in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return total / (time.monotonic() - started), failed[0]


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


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main():
    # The machine may be shared: the servers take turns, ROUNDS times, and each figure is the median of its rounds.
    table = servers()
    failures = {}
    results = {name: ([], []) for name in table}
    for _ in range(ROUNDS):
        for name, (argv, expected) in table.items():
            server = Running(argv, expected)
            try:
                sequential_rate, sequential_failed = sequential(server, SEQUENTIAL)
                concurrent_rate, concurrent_failed = concurrent(server, CLIENTS, CONCURRENT_TOTAL)
            finally:
                server.stop()
            results[name][0].append(sequential_rate)
            results[name][1].append(concurrent_rate)
            failures[name] = failures.get(name, 0) + sequential_failed + concurrent_failed
    rows = {name: (statistics.median(seq), statistics.median(conc)) for name, (seq, conc) in results.items()}
    print(f"handler: {' '.join(HANDLER[:2])} {HANDLER[2]!r}; median of {ROUNDS} rounds of {SEQUENTIAL} sequential connections")
    print(f"and {CONCURRENT_TOTAL} by {CLIENTS} clients, the servers taking turns")
    print(f"{'server':34} {'sequential/s':>13} {'64 clients/s':>13} {'failed':>7}")
    for name, (seq, conc) in rows.items():
        print(f"{name:34} {seq:13.0f} {conc:13.0f} {failures[name]:7d}")
    ours = rows["fdlaunch-accept -q"]
    for name, (seq, conc) in rows.items():
        if not name.startswith("fdlaunch-accept"):
            print(f"fdlaunch-accept -q / {name}: sequential x{ours[0] / seq:.2f}, 64 clients x{ours[1] / conc:.2f}")

    argv = [*LISTEN, "fdlaunch-accept", "-q", "-c", "40", "--", "sh", "-c", 'echo "$TCPREMOTEIP"; sleep 0.2']
    server = Running(argv, b"127.0.0.1\n")
    try:
        burst_failed = burst(server.port, b"127.0.0.1\n", BURST)
    finally:
        server.stop()
    print(f"{BURST} clients at once, fdlaunch-accept -c 40 (handler sleeps 0.2 s): {burst_failed} failed")

    argv = [*LISTEN, "fdlaunch-accept", "-q", "--", *HANDLER]
    server = Running(argv, b"127.0.0.1\n")
    try:
        concurrent(server, 8, 100)
        start = rss_kib(server.process.pid)
        _, failed = concurrent(server, 16, RSS_CONNECTIONS)
        end = rss_kib(server.process.pid)
    finally:
        server.stop()
    print(f"fdlaunch-accept RSS: {start} KiB after 100 connections, {end} KiB after {RSS_CONNECTIONS} more ({failed} failed)")


if __name__ == "__main__":
    main()
