"""A daemon that pings systemd's watchdog, WATCHDOG=1 four times per WATCHDOG_USEC, until SIGUSR1 silences it.

It says READY=1 at once; silenced, it goes on running without a word, as a
hung daemon would. It notifies through fdlaunch.notify() (NOTIFY_SOCKET).

Usage: watchdog_daemon.py
"""

import os
import signal
import time

import fdlaunch


def main():
    interval = int(os.environ["WATCHDOG_USEC"]) / 4 / 1e6
    silenced = []
    signal.signal(signal.SIGUSR1, lambda number, frame: silenced.append(number))
    fdlaunch.notify("READY=1", f"STATUS=pinging every {interval:.2f} s")
    while True:
        time.sleep(interval)
        if not silenced:
            fdlaunch.notify("WATCHDOG=1")


if __name__ == "__main__":
    main()
