"""A daemon that never heard of sd_notify: it says it is ready the upstart way, or the s6 way.

upstart: as the upstart cookbook and the "PID tracking in modern init
systems" article show it, once ready it checks UPSTART_JOB and, when that
is set, stops itself with SIGSTOP and waits for its supervisor's SIGCONT.
fd N: as s6 daemons do (notification-fd), it writes a newline to fd N
and closes it; with fd-var NAME it reads N from the variable NAME.

It logs to LOG, one line each: 'started' once its signal handlers are in
place, 'job NAME' (UPSTART_JOB as it found it, or
'job -'), 'stopping' and 'continued' around its SIGSTOP, 'ready' once it
said so, and the signals it gets (SIGHUP, SIGTERM). With --go=PATH it
waits for PATH to exist before it says it is ready; with --close-only it
closes its fd without the newline. It serves the sockets it was handed,
if any, answering every HTTP request with 'hello from pid PID', and exits 0
on SIGTERM.

Usage: legacy_daemon.py LOG (upstart | fd N | fd-var NAME) [--go=PATH] [--close-only] [--threads]
"""

import os
import selectors
import signal
import sys
import threading
import time

import fdlaunch


def log(path, line):
    with open(path, "a") as file:
        file.write(line + "\n")


def answer(connection):
    with connection:
        connection.setblocking(True)
        connection.settimeout(5)
        connection.recv(4096)
        body = f"hello from pid {os.getpid()} (a legacy daemon)\n".encode()
        connection.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def say_ready(logfile, how, options):
    if how[0] == "upstart":
        log(logfile, f"job {os.environ.get('UPSTART_JOB', '-')}")
        if "UPSTART_JOB" in os.environ:
            log(logfile, "stopping")
            if "--threads" in options:
                # Another thread raises it: the group stop starts in a thread the watcher does not trace.
                raiser = threading.Thread(target=lambda: signal.raise_signal(signal.SIGSTOP))
                raiser.start()
                raiser.join()
            else:
                os.kill(os.getpid(), signal.SIGSTOP)
            log(logfile, "continued")
        return
    fd = int(how[1]) if how[0] == "fd" else int(os.environ[how[1]])
    if "--close-only" not in options:
        os.write(fd, b"\n")
    os.close(fd)
    log(logfile, "ready")


def main():
    logfile, words = sys.argv[1], 1 if sys.argv[2] == "upstart" else 2
    how, options = sys.argv[2 : 2 + words], sys.argv[2 + words :]
    stopping = []
    signal.signal(signal.SIGHUP, lambda number, frame: log(logfile, "SIGHUP"))
    signal.signal(signal.SIGTERM, lambda number, frame: (log(logfile, "SIGTERM"), stopping.append(number)))
    log(logfile, "started")
    listeners = selectors.DefaultSelector()
    for group in fdlaunch.listen_sockets().values():
        for sock in group:
            sock.setblocking(False)  # instances may share a socket: accept must not wait
            listeners.register(sock, selectors.EVENT_READ)
    go = next((option.split("=", 1)[1] for option in options if option.startswith("--go=")), None)
    while go is not None and not os.path.exists(go) and not stopping:
        time.sleep(0.02)
    if not stopping:
        say_ready(logfile, how, options)
    while not stopping:
        if not listeners.get_map():
            time.sleep(0.1)
            continue
        for key, _ in listeners.select(timeout=0.1):
            try:
                connection, _ = key.fileobj.accept()
            except BlockingIOError:
                continue  # another instance on the same socket took it
            answer(connection)


if __name__ == "__main__":
    main()
