"""A tiny HTTP daemon that never binds: it serves on the sockets it is handed.

It finds them by LISTEN_FD_MAP (label=fd,...) or, failing that, by the
systemd convention (LISTEN_FDS from fd 3, checked against LISTEN_PID), and
answers every request with its pid and the socket the request came in on:

    fdlaunch-listen -tcp:label=http:127.0.0.1:8080 -- python3 examples/hello_httpd.py
"""

import os
import selectors
import socket


def passed_sockets(environ):
    """[(label, fd)] from either convention, as fdlaunch(7) describes them."""
    if environ.get("LISTEN_FD_MAP"):
        return [(label, int(fd)) for label, fd in (item.split("=") for item in environ["LISTEN_FD_MAP"].split(","))]
    if environ.get("LISTEN_PID") == str(os.getpid()):
        count = int(environ.get("LISTEN_FDS", "0"))
        names = environ.get("LISTEN_FDNAMES", ":".join(["unknown"] * count)).split(":")
        return [(names[i], 3 + i) for i in range(count)]
    return []


def answer(connection, label):
    with connection:
        connection.settimeout(5)
        request = connection.recv(4096).decode("latin-1")
        path = request.split(" ")[1] if request.count(" ") >= 2 else "/"
        body = f"hello from pid {os.getpid()} on {label}, you asked for {path}\n".encode()
        head = f"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        connection.sendall(head + body)


def main():
    listeners = selectors.DefaultSelector()
    for label, fd in passed_sockets(os.environ):
        listeners.register(socket.socket(fileno=fd), selectors.EVENT_READ, label)
    if not listeners.get_map():
        raise SystemExit("hello_httpd: fatal: no sockets passed; start me through fdlaunch-listen")
    while True:
        for key, _ in listeners.select():
            connection, _ = key.fileobj.accept()
            answer(connection, key.data)


if __name__ == "__main__":
    main()
