"""A daemon for the README's chains: on every socket it was handed, it says what it got.

Usage: label_daemon.py fdlaunch|systemd

fdlaunch: the sockets of fdlaunch.listen_sockets() (either convention),
READY=1 by fdlaunch.notify(). systemd: only LISTEN_FDS and LISTEN_FDNAMES,
read by python-systemd's listen_fds_with_names() as gunicorn reads them
(run it with an interpreter that has python-systemd: conftest's
python_systemd()), READY=1 by systemd.daemon.notify(); it never
looks at LISTEN_FD_MAP. Each stream connection gets, and each datagram is
answered with, one JSON line: pid, label, fd, and the fds open at start.
"""

import json
import os
import selectors
import socket
import sys


def handed(kind):
    """[(label, socket)] and a readiness function, by the convention asked for."""
    if kind == "systemd":
        import systemd.daemon

        found = systemd.daemon.listen_fds_with_names()
        return [(label, socket.socket(fileno=fd)) for fd, label in sorted(found.items())], systemd.daemon.notify
    import fdlaunch

    found = fdlaunch.listen_sockets()
    return [(label, s) for label, group in found.items() for s in group], fdlaunch.notify


def is_open(fd):
    try:
        os.fstat(fd)
    except OSError:
        return False  # the directory listdir had open
    return True


def main():
    open_at_start = [fd for fd in sorted(map(int, os.listdir("/proc/self/fd"))) if is_open(fd)]
    sockets, notify = handed(sys.argv[1])
    if not sockets:
        raise SystemExit("label_daemon: fatal: no sockets were passed")
    ready = selectors.DefaultSelector()
    for label, s in sockets:
        s.setblocking(False)
        ready.register(s, selectors.EVENT_READ, label)
    notify("READY=1")
    while True:
        for key, _ in ready.select():
            s, label = key.fileobj, key.data
            line = json.dumps({"pid": os.getpid(), "label": label, "fd": s.fileno(), "fds": open_at_start}).encode() + b"\n"
            try:
                if s.type == socket.SOCK_DGRAM:
                    _, peer = s.recvfrom(512)
                    s.sendto(line, peer)
                else:
                    connection, _ = s.accept()
                    with connection:
                        connection.setblocking(True)
                        connection.sendall(line)
            except BlockingIOError:
                continue


if __name__ == "__main__":
    main()
