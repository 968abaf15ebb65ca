"""A daemon that forks into the background the classic way, for fdlaunch-foreground's tests.

The launching process forks; the child calls setsid(2) and forks again; the
grandchild (the daemon) writes its PID file and tells the launching process,
which exits. The daemon then logs the signals it gets, serves on an
inherited socket if it was handed one, and runs until told to stop.

Usage: selfdaemon.py LOG [--pidfile=PATH] [--pidfile-pid=PID] [--launch-status=N]
                         [--worker=PATH] [--exit-after=SECONDS] [--status=N]
"""

import argparse
import os
import signal
import socket
import sys
import time


def daemon(args, tell):
    log = open(args.log, "a", buffering=1)
    for number in (signal.SIGHUP, signal.SIGUSR1, signal.SIGTERM):
        signal.signal(number, lambda number, frame: on_signal(log, number, args))
    if args.pidfile:
        with open(args.pidfile, "w") as pidfile:
            pidfile.write(f"{args.pidfile_pid or os.getpid()}\n")
    if args.worker:
        worker = os.fork()
        if worker == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            while True:
                time.sleep(1)
        with open(args.worker, "w") as out:
            out.write(f"{worker}\n")
    log.write(f"up {os.getpid()}\n")
    os.write(tell, b"x")
    os.close(tell)
    deadline = None if args.exit_after is None else time.monotonic() + args.exit_after
    listener = socket.socket(fileno=3) if os.environ.get("LISTEN_FD_MAP") or os.environ.get("LISTEN_FDS") else None
    while deadline is None or time.monotonic() < deadline:
        if listener is None:
            time.sleep(0.05)
            continue
        listener.settimeout(0.05)
        try:
            connection, _ = listener.accept()
        except (TimeoutError, InterruptedError):
            continue
        with connection:
            connection.sendall(f"served by {os.getpid()}\n".encode())
    sys.exit(args.status)


def on_signal(log, number, args):
    log.write(f"{signal.Signals(number).name}\n")
    if number == signal.SIGTERM:
        os._exit(args.status)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("log")
    parser.add_argument("--pidfile")
    parser.add_argument("--pidfile-pid", type=int)
    parser.add_argument("--launch-status", type=int, default=0)
    parser.add_argument("--worker")
    parser.add_argument("--exit-after", type=float)
    parser.add_argument("--status", type=int, default=0)
    args = parser.parse_args()
    listen, tell = os.pipe()
    if os.fork() == 0:
        os.close(listen)
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1):
            os.dup2(devnull, fd)
        daemon(args, tell)
        os._exit(0)
    os.close(tell)
    os.read(listen, 1)  # the daemon is up (or gone)
    sys.exit(args.launch_status)


if __name__ == "__main__":
    main()
