"""A local user's race against a tool that works on names in a directory the user can write.

Run as that user, with no privilege:

  swap_racer.py swap DIRECTORY NAME TARGET SECONDS
      The moment inotify says NAME was made in DIRECTORY, put a symlink to
      TARGET in its place (one renameat2(RENAME_EXCHANGE) with a symlink
      made beforehand, so the window between the tool's calls is hit at
      once). One line 'swapped' for each swap.
  swap_racer.py flip DIRECTORY NAME OTHER SECONDS
      Exchange NAME and OTHER in DIRECTORY over and over, every FLIP_HOLD.

Prints 'ready' once it races; ends after SECONDS at most.
"""

import ctypes
import os
import select
import sys
import time

IN_CREATE = 0x100
RENAME_EXCHANGE = 2
AT_FDCWD = -100
# How long each state of a flip lasts: about a Python tool's time between
# looking at a name and using it, so both states are seen by one run (won
# most often against the name-based code, tried from 0 to 100 us).
FLIP_HOLD = 30e-6
libc = ctypes.CDLL(None, use_errno=True)


def exchange(first, second):
    return libc.renameat2(AT_FDCWD, first, AT_FDCWD, second, RENAME_EXCHANGE) == 0


def swap(directory, name, target, deadline):
    watch = libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
    if watch < 0 or libc.inotify_add_watch(watch, os.fsencode(directory), IN_CREATE) < 0:
        sys.exit(f"swap_racer: inotify: {os.strerror(ctypes.get_errno())}")
    path = os.fsencode(os.path.join(directory, name))
    made = b"\0" + os.fsencode(name) + b"\0"  # an event's name, NUL-padded after a length whose last byte is 0
    poller = select.poll()
    poller.register(watch, select.POLLIN)
    bait, baits = None, 0
    print("ready", flush=True)
    while time.monotonic() < deadline:
        if bait is None or not os.path.lexists(bait):
            bait = os.fsencode(os.path.join(directory, f".bait{baits}"))
            baits += 1
            os.symlink(target, bait)
        try:
            events = os.read(watch, 65536)
        except BlockingIOError:
            poller.poll(100)
            continue
        if made in events and exchange(bait, path):
            bait = None
            print("swapped", flush=True)


def flip(directory, name, other, deadline):
    first, second = os.fsencode(os.path.join(directory, name)), os.fsencode(os.path.join(directory, other))
    print("ready", flush=True)
    while time.monotonic() < deadline:
        exchange(first, second)
        until = time.perf_counter() + FLIP_HOLD
        while time.perf_counter() < until:
            pass


if __name__ == "__main__":
    mode, directory, name, other, seconds = sys.argv[1:]
    {"swap": swap, "flip": flip}[mode](directory, name, other, time.monotonic() + float(seconds))
