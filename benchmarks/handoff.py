"""Restarts under load: 20 handoffs against 20 plain stop-and-start restarts, side by side.

One run drives examples/hello_httpd.py (one second of warm-up before
READY=1) with a load generator on loopback, and prints:
- failed requests during 20 fdlaunch-handoff handoffs, and during 20 plain
  restarts (SIGTERM, wait, start again) of the same daemon under fdlaunch-listen;
- request latency p50 and p99 in steady state and during the handoffs;
- failed requests on the socket that stays during 20 reloads of
  fdlaunch-handoff --listen-from=FILE that each add one port and remove
  another, and whether each new port answered and each removed one refused;
- the crash round: requests refused, and lost otherwise, while the serving
  daemon is SIGKILLed 20 times, under fdlaunch-handoff --respawn and under a
  supervisor that restarts the whole chain at once (the best any can do).
  Kills come CRASH_SPACING seconds apart, so that --respawn never sees a
  crash loop (5 exits within 10 seconds).

    python benchmarks/handoff.py [CLIENT_THREADS]
"""

import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HELLO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "hello_httpd.py")
RESTARTS = 20
THREADS = int(sys.argv[1]) if len(sys.argv) > 1 else 4
STEADY_SECONDS = 5
CRASH_SPACING = 2.6


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Load:
    """Client threads, each a loop of one request per connection; every result is kept with its time."""

    def __init__(self, port):
        self.port, self.results, self.running = port, [], True
        self.threads = [threading.Thread(target=self.loop, daemon=True) for _ in range(THREADS)]
        for thread in self.threads:
            thread.start()

    def loop(self):
        while self.running:
            started = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as client:
                    client.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    reply = b""
                    while chunk := client.recv(4096):
                        reply += chunk
                ok = reply.startswith(b"HTTP/1.0 200")
            except ConnectionRefusedError:
                ok = None  # refused: nobody held the socket
            except OSError:
                ok = False
            self.results.append((started, time.monotonic() - started, ok))

    def between(self, start, end):
        return [(latency, ok) for started, latency, ok in self.results if start <= started < end]

    def stop(self):
        self.running = False
        for thread in self.threads:
            thread.join(10)


class Upstream:
    def __init__(self, directory):
        self.path = os.path.join(directory, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(30)

    def wait_ready(self):
        """The next READY=1 datagram."""
        while b"READY=1" not in (message := self.sock.recv(4096)).split(b"\n"):
            pass
        return message.decode()


def handoffs(directory):
    """Steady state, then RESTARTS handoffs, under load: (steady results, handoff results)."""
    port, upstream = free_port(), Upstream(directory)
    argv = ["fdlaunch-listen", f"-tcp:127.0.0.1:{port}", "--", "fdlaunch-handoff", "--", sys.executable, HELLO, "1"]
    server = subprocess.Popen(argv, env={**os.environ, "NOTIFY_SOCKET": upstream.path}, stderr=subprocess.DEVNULL)
    try:
        upstream.wait_ready()
        load = Load(port)
        time.sleep(STEADY_SECONDS)
        middle = time.monotonic()
        for _ in range(RESTARTS):
            server.send_signal(signal.SIGHUP)
            upstream.wait_ready()
        end = time.monotonic()
        load.stop()
        return load.between(0, middle), load.between(middle, end)
    finally:
        server.kill()
        server.wait()


def plain_restarts(directory):
    """RESTARTS stop-and-start restarts of the same daemon under load: their results."""
    port, upstream = free_port(), Upstream(os.path.join(directory))
    argv = ["fdlaunch-listen", f"-tcp:127.0.0.1:{port}", "--", sys.executable, HELLO, "1"]
    environ = {**os.environ, "NOTIFY_SOCKET": upstream.path}
    server = subprocess.Popen(argv, env=environ, stderr=subprocess.DEVNULL)
    try:
        upstream.wait_ready()
        load = Load(port)
        start = time.monotonic()
        for _ in range(RESTARTS):
            server.send_signal(signal.SIGTERM)
            server.wait(30)
            server = subprocess.Popen(argv, env=environ, stderr=subprocess.DEVNULL)
            upstream.wait_ready()
        end = time.monotonic()
        load.stop()
        return load.between(start, end)
    finally:
        server.kill()
        server.wait()


def crashes(directory, respawn):
    """RESTARTS SIGKILLs of the serving daemon under load: their results.

    respawn: fdlaunch-handoff --respawn replaces it on the sockets it holds;
    else a supervisor (this loop) starts the whole chain again at once.
    """
    port, upstream = free_port(), Upstream(directory)
    daemon = [sys.executable, HELLO, "1"]
    middle = ["fdlaunch-handoff", "--respawn", "--main-pid=instance", "--"] if respawn else []
    argv = ["fdlaunch-listen", f"-tcp:127.0.0.1:{port}", "--", *middle, *daemon]
    environ = {**os.environ, "NOTIFY_SOCKET": upstream.path}
    server = subprocess.Popen(argv, env=environ, stderr=subprocess.DEVNULL)
    try:
        pid = ready_pid(upstream, server)
        load = Load(port)
        start = time.monotonic()
        for _ in range(RESTARTS):
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            if not respawn:
                server.wait(30)
                server = subprocess.Popen(argv, env=environ, stderr=subprocess.DEVNULL)
            pid = ready_pid(upstream, server)
            time.sleep(max(0, killed + CRASH_SPACING - time.monotonic()))
        end = time.monotonic()
        load.stop()
        return load.between(start, end)
    finally:
        server.kill()
        server.wait()


def ready_pid(upstream, server):
    """The daemon's pid, from the next READY=1's MAINPID (the process itself without one)."""
    for line in upstream.wait_ready().splitlines():
        if line.startswith("MAINPID="):
            return int(line.split("=", 1)[1])
    return server.pid


def set_changes(directory):
    """RESTARTS reloads that each add one port and remove another, under load on the socket that stays.

    Returns the results on the kept socket, and how many reloads were
    reported as changing the set, had the new port answering, and had the
    removed port refusing once the old instance was gone.
    """
    keep, upstream, sockets = free_port(), Upstream(directory), os.path.join(directory, "sockets")

    def write(port):
        with open(sockets, "w") as file:
            file.write(f"-tcp:label=keep:127.0.0.1:{keep}\n-tcp:label=moving:127.0.0.1:{port}\n")

    moving = free_port()
    write(moving)
    argv = ["fdlaunch-handoff", f"--listen-from={sockets}", "--", sys.executable, HELLO, "1"]
    server = subprocess.Popen(argv, env={**os.environ, "NOTIFY_SOCKET": upstream.path}, stderr=subprocess.DEVNULL)
    counts = {"reloaded": 0, "answered": 0, "refused": 0}
    try:
        upstream.wait_ready()
        load = Load(keep)
        start = time.monotonic()
        for _ in range(RESTARTS):
            previous, moving = moving, free_port()
            write(moving)
            server.send_signal(signal.SIGHUP)
            status = upstream.wait_ready()
            counts["reloaded"] += f"reloaded: +127.0.0.1:{moving}/tcp, -127.0.0.1:{previous}/tcp" in status
            counts["answered"] += answers(moving)
            counts["refused"] += refuses_soon(previous)
        end = time.monotonic()
        load.stop()
        return load.between(start, end), counts
    finally:
        server.kill()
        server.wait()


def answers(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            client.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return client.recv(4096).startswith(b"HTTP/1.0 200")
    except OSError:
        return False


def refuses_soon(port, within=5):
    """Whether connections are refused within a few seconds: the old instance stops, then the socket closes."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        except OSError:
            pass
        time.sleep(0.01)
    return False


def summary(results):
    latencies = sorted(latency for latency, ok in results if ok)
    failed = sum(1 for _, ok in results if not ok)  # refused (None) and lost (False)
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
    return len(results), failed, p50, p99


def main():
    with tempfile.TemporaryDirectory() as first, tempfile.TemporaryDirectory() as second:
        steady, during_handoffs = handoffs(first)
        during_restarts = plain_restarts(second)
    with tempfile.TemporaryDirectory() as third:
        during_set_changes, counts = set_changes(third)
    with tempfile.TemporaryDirectory() as fourth, tempfile.TemporaryDirectory() as fifth:
        respawned, restarted = crashes(fourth, respawn=True), crashes(fifth, respawn=False)
    print(f"{RESTARTS} restarts each, {THREADS} client threads, one request per connection, daemon warm-up 1 s")
    print(f"{'phase':32} {'requests':>9} {'failed':>7} {'p50 ms':>8} {'p99 ms':>8}")
    rows = {
        "steady state": steady,
        "during 20 handoffs": during_handoffs,
        "during 20 stop-and-start": during_restarts,
        "kept socket, 20 set changes": during_set_changes,
    }
    for name, results in rows.items():
        total, failed, p50, p99 = summary(results)
        print(f"{name:32} {total:9} {failed:7} {p50:8.2f} {p99:8.2f}")
    _, _, steady_p50, steady_p99 = summary(steady)
    _, _, handoff_p50, handoff_p99 = summary(during_handoffs)
    print(f"latency during handoffs / steady state: p50 x{handoff_p50 / steady_p50:.2f}, p99 x{handoff_p99 / steady_p99:.2f}")
    _, _, change_p50, change_p99 = summary(during_set_changes)
    print(f"latency, kept socket during set changes / steady state: p50 x{change_p50 / steady_p50:.2f}, p99 x{change_p99 / steady_p99:.2f}")
    print(
        f"set changes (+1 port, -1 port each): {counts['reloaded']}/{RESTARTS} reported in STATUS=, "
        f"new port answered {counts['answered']}/{RESTARTS}, removed port refused {counts['refused']}/{RESTARTS}"
    )
    print(f"crash round: the serving daemon SIGKILLed {RESTARTS} times, {CRASH_SPACING} s apart")
    print(f"{'':32} {'requests':>9} {'refused':>8} {'lost':>5} {'p50 ms':>8} {'p99 ms':>8}")
    for name, results in (("handoff --respawn", respawned), ("supervisor restarts the chain", restarted)):
        total, _, p50, p99 = summary(results)
        refused = sum(1 for _, ok in results if ok is None)
        lost = sum(1 for _, ok in results if ok is False)
        print(f"{name:32} {total:9} {refused:8} {lost:5} {p50:8.2f} {p99:8.2f}")


if __name__ == "__main__":
    main()
