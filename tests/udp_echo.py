"""A UDP daemon for the handoff tests: answers each datagram with its pid.

Usage: udp_echo.py [WARMUP_SECONDS]. Takes its socket from fdlaunch, says
READY=1 after the warm-up, and on SIGTERM answers what it has read, then exits.
"""

import os
import selectors
import signal
import sys
import time

import fdlaunch


def main():
    (sock,) = [s for group in fdlaunch.listen_sockets().values() for s in group]
    sock.setblocking(False)  # shared with the next instance: recv must not wait
    time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 0)
    stopping = []
    signal.signal(signal.SIGTERM, lambda number, frame: stopping.append(number))
    fdlaunch.notify("READY=1")
    waiting = selectors.DefaultSelector()
    waiting.register(sock, selectors.EVENT_READ)
    while not stopping:
        if not waiting.select(timeout=0.1):
            continue
        try:
            data, peer = sock.recvfrom(2048)
        except BlockingIOError:
            continue
        sock.sendto(f"{os.getpid()} {data.decode()}".encode(), peer)


if __name__ == "__main__":
    main()
