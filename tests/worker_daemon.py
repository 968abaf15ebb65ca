"""A daemon that forks a worker and hands it the main pid, as a master handing over to a new one does.

The process started (PROG) forks a worker, sends MAINPID=<worker>, and then
only waits for it, staying its parent. The worker sends READY=1 with
STATUS=worker PID serving, and on each SIGUSR1 a new STATUS=worker PID
status N. Both notify through fdlaunch.notify() (NOTIFY_SOCKET).

Usage: worker_daemon.py
"""

import os
import signal

import fdlaunch


def worker(go):
    os.read(go, 1)  # the parent has told the new MAINPID
    told = []
    signal.signal(signal.SIGUSR1, lambda number, frame: told.append(number))
    fdlaunch.notify("READY=1", f"STATUS=worker {os.getpid()} serving")
    while True:
        signal.pause()
        if told:
            fdlaunch.notify(f"STATUS=worker {os.getpid()} status {len(told)}")


def main():
    go, went = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(went)
        worker(go)
    os.close(go)
    fdlaunch.notify(f"MAINPID={pid}")
    os.write(went, b"x")
    signal.signal(signal.SIGTERM, lambda number, frame: os.kill(pid, signal.SIGTERM))
    _, status = os.waitpid(pid, 0)
    raise SystemExit(os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    main()
