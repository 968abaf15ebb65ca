"""What fdlaunch-adopt costs, side by side in one run.

- Per bind(2): a plain bind, a bind continued through the supervisor
  (ephemeral UDP ports, as a resolver binds one per query; the rate one
  supervisor sustains is printed), and an adopted bind (the passed socket
  given to the caller's fd), each from the same Python loop timing the
  bind call alone.
- Per other system call: getppid() plain and under the filter.
- Start-up: fdlaunch-listen -- true, with and without fdlaunch-adopt in between.
- Requests per second of one daemon (nginx, else busybox httpd, else
  python3 -m http.server) binding its port by itself, and the same daemon
  adopting the port from fdlaunch-listen, each driven alike by client
  threads, one connection per request, rounds alternating.

    make bench, or: PATH=$PWD/.venv/bin:$PATH python3 benchmarks/adopt.py [BINDS] [SECONDS]
"""

import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

BINDS = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
SECONDS = float(sys.argv[2]) if len(sys.argv) > 2 else 3.0
ROUNDS = 5
CLIENTS = 4

# Run under each chain: times N binds (or calls) and prints microseconds per call.
LOOP = r"""
import os, socket, sys, time
kind, count, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
spent = 0
if kind == "getppid":  # too quick to time one by one: the loop, timed whole
    start = time.perf_counter_ns()
    for _ in range(count):
        os.getppid()
    print((time.perf_counter_ns() - start) / count / 1000)
    sys.exit()
for _ in range(count):
    if kind == "adopted":
        sock, where = socket.socket(), ("127.0.0.1", port)
    else:
        sock, where = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), ("127.0.0.1", 0)
    start = time.perf_counter_ns(); sock.bind(where); spent += time.perf_counter_ns() - start
    sock.close()
print(spent / count / 1000)
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_tools():
    if shutil.which("fdlaunch-adopt") is None:
        sys.exit("adopt.py: fdlaunch-adopt is not on PATH: run 'make bench', or put .venv/bin first in PATH after 'make test'")


def per_call(kind, adopted, port):
    """Microseconds per call of kind, in one run of LOOP, under fdlaunch-adopt or not."""
    chain = ["fdlaunch-listen", f"-tcp:127.0.0.1:{port}", "--", "fdlaunch-adopt", "--"] if adopted else []
    count = BINDS * 100 if kind == "getppid" else BINDS
    done = subprocess.run([*chain, sys.executable, "-c", LOOP, kind, str(count), str(port)], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        sys.exit(f"adopt.py: {kind} failed: {done.stderr}")
    return float(done.stdout)


def bind_costs():
    rows = {
        "plain bind (UDP, port 0)": ("bind", False),
        "continued bind (UDP, port 0)": ("bind", True),
        "adopted bind (TCP, passed)": ("adopted", True),
        "getppid(), plain": ("getppid", False),
        "getppid(), under the filter": ("getppid", True),
    }
    samples = {name: [] for name in rows}
    for _ in range(ROUNDS):
        for name, (kind, adopted) in rows.items():
            samples[name].append(per_call(kind, adopted, free_port()))
    return {name: statistics.median(values) for name, values in samples.items()}


def start_up():
    rows = {
        "fdlaunch-listen -tcp:127.0.0.1:0 -- true": ["fdlaunch-listen", "-tcp:127.0.0.1:0", "--", "true"],
        "fdlaunch-listen ... -- fdlaunch-adopt -- true": ["fdlaunch-listen", "-tcp:127.0.0.1:0", "--", "fdlaunch-adopt", "--", "true"],
    }
    samples = {name: [] for name in rows}
    for _ in range(20):
        for name, argv in rows.items():
            start = time.perf_counter()
            subprocess.run(argv, check=True)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1000 for name, values in samples.items()}


NGINX_CONF = """daemon off;
pid {dir}/nginx.pid;
worker_processes 1;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy; fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
    server {{ listen 127.0.0.1:{port}; location / {{ return 200 "hello\\n"; }} }}
}}
"""


def daemon(directory, port):
    """(name, argv) of a daemon that binds 127.0.0.1:port itself and answers GET /."""
    (directory / "index.html").write_text("hello\n")
    if shutil.which("nginx"):
        conf = directory / f"nginx-{port}.conf"
        conf.write_text(NGINX_CONF.format(dir=directory, port=port))
        return "nginx", ["nginx", "-p", str(directory), "-c", str(conf), "-e", "stderr"]
    if shutil.which("busybox"):
        return "busybox httpd", ["busybox", "httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", str(directory)]
    return "python3 -m http.server", [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(directory)]


def answering(port):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    sys.exit(f"adopt.py: nothing answers on port {port}")


def requests_per_second(port):
    counts = [0] * CLIENTS
    failures = [0]
    stop = time.monotonic() + SECONDS

    def client(index):
        while time.monotonic() < stop:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                    conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    while conn.recv(4096):
                        pass
                counts[index] += 1
            except OSError:
                failures[0] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / SECONDS, failures[0]


def serving(directory, adopted):
    port = free_port()
    name, argv = daemon(directory, port)
    chain = ["fdlaunch-listen", f"-tcp:127.0.0.1:{port}", "--", "fdlaunch-adopt", "--"] if adopted else []
    process = subprocess.Popen([*chain, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        answering(port)
        return name, requests_per_second(port)
    finally:
        process.terminate()
        process.wait(10)


def throughput():
    directory = tempfile.mkdtemp(prefix="fdl-bench-adopt.")
    try:
        from pathlib import Path

        samples = {False: [], True: []}
        for _ in range(ROUNDS):
            for adopted in (False, True):
                name, (rate, failed) = serving(Path(directory), adopted)
                if failed:
                    sys.exit(f"adopt.py: {failed} requests failed")
                samples[adopted].append(rate)
        return name, samples
    finally:
        shutil.rmtree(directory)


def main():
    require_tools()
    costs = bind_costs()
    plain = costs["plain bind (UDP, port 0)"]
    print(f"Per call, median of {ROUNDS} runs of {BINDS} calls each (the call alone timed, from Python)")
    print(f"{'call':40} {'us':>9} {'x plain':>8}")
    for name, value in costs.items():
        base = costs["getppid(), plain"] if name.startswith("getppid") else plain
        print(f"{name:40} {value:9.2f} {value / base:8.1f}")
    continued = costs["continued bind (UDP, port 0)"]
    print(f"A resolver binding one ephemeral UDP port per query: {1e6 / continued:,.0f} binds/s through one supervisor")
    print(f"The filter on every other call: {(costs['getppid(), under the filter'] - costs['getppid(), plain']) * 1000:+.0f} ns")
    print()
    print("Start-up, median of 20 runs")
    started = start_up()
    for name, ms in started.items():
        print(f"{name:50} {ms:8.1f} ms")
    print()
    name, samples = throughput()
    rates = {adopted: statistics.median(values) for adopted, values in samples.items()}
    print(f"{name}, {CLIENTS} client threads, one connection per request, {SECONDS:g} s a round, {ROUNDS} rounds alternating")
    print(f"{'':32} {'median':>10} {'min':>8} {'max':>8}")
    for adopted, label in ((False, "binding by itself"), (True, "adopting from fdlaunch-listen")):
        values = samples[adopted]
        print(f"{label:32} {rates[adopted]:10,.0f} {min(values):8,.0f} {max(values):8,.0f} req/s")
    print(f"ratio of the medians: {rates[True] / rates[False]:.3f}")


if __name__ == "__main__":
    main()
