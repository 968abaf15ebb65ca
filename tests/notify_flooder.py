"""A local user's flood of a private notify socket, as tests/test_notify_inbox.py runs it (as the attacker).

usage: notify_flooder.py DIRECTORY DEPTH SENDERS DATAGRAMS SECONDS

Forks a chain DEPTH processes deep (each parent becomes a small sleep(1)
waiting on nothing), writes DIRECTORY/chained, then waits for the socket's
name ('@...') in DIRECTORY/name. The deepest process then sends DATAGRAMS
READY=1 datagrams to it, as fast as the socket takes them, spread over
SENDERS processes it forks one after the other (1: it sends them itself).
DIRECTORY/flooding appears once the first datagram is sent, DIRECTORY/sent
(the number sent) once the flood is over. The flood lasts SECONDS at most,
and the chain three times that.
"""

import os
import signal
import socket
import sys
import time


def main(directory, depth, senders, datagrams, seconds):
    lasting = int(3 * seconds) + 1
    for _ in range(depth):
        if os.fork():  # the parent becomes a small process that keeps its place in the chain a while
            os.execv("/bin/sleep", ["sleep", str(lasting)])
    signal.alarm(lasting)  # whatever happens, the deepest is gone by then too (alarms are not inherited)
    write(directory, "chained", str(os.getpid()))
    name = wait_for_name(directory, time.monotonic() + seconds)
    end = time.monotonic() + seconds
    target = b"\0" + name[1:].encode()
    sent = 0
    each = -(-datagrams // senders)
    while sent < datagrams and time.monotonic() < end:
        count = min(each, datagrams - sent)
        if senders == 1:
            sent += flood(target, count, end, directory)
            continue
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            signal.alarm(int(seconds) + 1)
            os.write(write_end, str(flood(target, count, end, directory)).encode())
            os._exit(0)
        os.close(write_end)
        sent += int(os.read(read_end, 32) or b"0")
        os.close(read_end)
        os.waitpid(pid, 0)
    write(directory, "sent", str(sent))


def flood(target, count, end, directory):
    """count datagrams to target (fewer if time is up); how many were sent."""
    sent = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)  # a full queue blocks the sender; never past the end
        while sent < count and time.monotonic() < end:
            try:
                sock.sendto(b"READY=1", target)
            except TimeoutError:
                continue
            except OSError:
                break  # the socket is gone: its owner has exited
            sent += 1
            if sent == 1 and not os.path.exists(os.path.join(directory, "flooding")):
                write(directory, "flooding", str(os.getpid()))
    return sent


def wait_for_name(directory, end):
    path = os.path.join(directory, "name")
    while time.monotonic() < end:
        try:
            with open(path) as told:
                name = told.read()
            if name.endswith("\n"):
                return name.strip()
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    sys.exit("no socket name came")


def write(directory, name, text):
    """DIRECTORY/name holding text, complete once it appears (written aside, then renamed)."""
    path = os.path.join(directory, name)
    with open(path + ".new", "w") as out:
        out.write(text + "\n")
    os.rename(path + ".new", path)


if __name__ == "__main__":
    main(sys.argv[1], *(int(word) for word in sys.argv[2:5]), float(sys.argv[5]))
