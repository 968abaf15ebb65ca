"""A careless daemon, for fdlaunch-init's tests: it orphans its helpers and sets no signal handler.

Each helper is started through a middle process that exits at once (as
`sh -c 'helper &'` does), so the helper is handed to PID 1, or to the
nearest subreaper, and exits soon after; the daemon reaps its middles and
nothing else. Once every helper has exited it prints 'helpers done' and
sleeps, with SIGTERM at its default action (which PID 1 never gets).

Usage: orphan_daemon.py COUNT [LINGERER_LOG]

With LINGERER_LOG, one more orphan stays behind, catching SIGTERM: it
writes 'stopped by SIGTERM' there and exits, so a test can tell a clean
stop from the kernel's SIGKILL of a whole namespace.
"""

import os
import signal
import sys
import time


def orphan(work):
    """Run work() in a grandchild whose parent exits at once; the middle is reaped here."""
    middle = os.fork()
    if middle == 0:
        if os.fork() == 0:
            try:
                work()
            finally:
                os._exit(0)
        os._exit(0)
    os.waitpid(middle, 0)


def linger(log):
    def stop(number, frame):
        with open(log, "a") as out:
            out.write("stopped by SIGTERM\n")
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    with open(log, "a") as out:
        out.write(f"lingering as pid {os.getpid()}\n")
    while True:
        time.sleep(1)


def main():
    count = int(sys.argv[1])
    if len(sys.argv) > 2:
        orphan(lambda: linger(sys.argv[2]))
    done_read, done_write = os.pipe()
    for _ in range(count):
        orphan(lambda: time.sleep(0.01))  # holds done_write until it exits
    os.close(done_write)
    os.read(done_read, 1)  # end of file: every helper has exited
    print("helpers done", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
