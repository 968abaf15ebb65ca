"""A tiny HTTP daemon that never binds: it serves on the sockets it is handed.

It finds them with fdlaunch.listen_sockets(), whichever convention the
launcher used, says READY=1 with fdlaunch.notify() when it can answer (a
no-op without a NOTIFY_SOCKET), and answers every request with its pid and
the label of the socket the request came in on:

    fdlaunch-listen -tcp:label=http:127.0.0.1:8080 -- python3 examples/hello_httpd.py

Usage: hello_httpd.py [WARMUP_SECONDS]  (a pause before READY=1, to play a slow start)
"""

import os
import selectors
import signal
import sys
import time

import fdlaunch


def answer(connection, label):
    with connection:
        connection.setblocking(True)
        connection.settimeout(5)
        request = connection.recv(4096).decode("latin-1")
        path = request.split(" ")[1] if request.count(" ") >= 2 else "/"
        body = f"hello from pid {os.getpid()} on {label}, you asked for {path}\n".encode()
        head = f"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        connection.sendall(head + body)


def main():
    passed_by = {name: os.environ[name] for name in ("LISTEN_FD_MAP", "LISTEN_FDS") if name in os.environ}
    listeners = selectors.DefaultSelector()
    for label, group in fdlaunch.listen_sockets().items():
        for sock in group:
            sock.setblocking(False)  # instances may share a socket: accept must not wait
            listeners.register(sock, selectors.EVENT_READ, label)
    if not listeners.get_map():
        raise SystemExit("hello_httpd: fatal: no sockets passed; start me through fdlaunch-listen")
    described = ", ".join(f"{key.data} on fd {key.fd}" for key in listeners.get_map().values())
    print(f"hello_httpd: pid {os.getpid()} serving {described} ({passed_by})", file=sys.stderr, flush=True)
    time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 0)
    # SIGTERM (or ^C): finish the request in hand, accept no more, exit. Under
    # fdlaunch-handoff the next instance is already serving the same sockets.
    stopping = []
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda number, frame: stopping.append(number))
    fdlaunch.notify("READY=1", f"STATUS=serving {described}")
    while not stopping:
        for key, _ in listeners.select(timeout=0.1):
            try:
                connection, _ = key.fileobj.accept()
            except BlockingIOError:
                continue  # another instance on the same socket took it
            answer(connection, key.data)


if __name__ == "__main__":
    main()
