"""The exec target of fdlaunch-adopt's tests: a daemon that binds as its command line says.

Usage: binder.py STEP...

Each step prints one JSON line on stdout (flushed) and the socket it made
stays open until a close=N step (N: the step's place among the arguments, from 1):

  tcp=HOST:PORT, udp=HOST:PORT   an AF_INET or AF_INET6 socket (by HOST), bound
  tcp6only=[HOST]:PORT           AF_INET6 with IPV6_V6ONLY set before the bind
  tcpflags=HOST:PORT             made with SOCK_NONBLOCK | SOCK_CLOEXEC
  tcpinherit=HOST:PORT           made blocking and inheritable (not close-on-exec)
  unix=PATH, abstract=NAME       an AF_UNIX stream socket, bound
  raw=KIND:HOST:PORT             bind(2) called through libc with a bad argument:
                                 fault (pointer 1), short (length 8), long (129),
                                 negative (-1), badfd (fd 999), notsock (/dev/null's fd)
  close=N                        close the socket of step N
  child=STEP                     fork, do STEP in the child (which reports), wait for it
  race=N:HOST:PORT               fork N children that each bind HOST:PORT in a thread
                                 and exit at once, some killed by SIGKILL meanwhile
  many=N                         N sockets bound to 127.0.0.1:0 (UDP) and closed
  wait                           read one line from stdin first

A bind reports {"step", "errno"} and, when it worked, "fd", "inode" (of the
socket now at that fd), "cloexec", "nonblock" and "name" (getsockname).
"""

import ctypes
import errno
import fcntl
import json
import os
import random
import signal
import socket
import sys
import threading

LIBC = ctypes.CDLL(None, use_errno=True)
kept = {}  # the sockets bound, by the place of their step
place = [0]


def say(**fields):
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def address(text):
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, (host, int(port))


def report(step, sock, failure=None):
    if failure is not None:
        say(step=step, errno=errno.errorcode[failure.errno])
        sock.close()
        return
    fd = sock.fileno()
    kept[place[0]] = sock
    say(
        step=step,
        errno=None,
        fd=fd,
        inode=os.fstat(fd).st_ino,
        cloexec=bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
        nonblock=bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK),
        name=repr(sock.getsockname()),
    )


def bind(step, family, kind, where, v6only=None, inheritable=False):
    sock = socket.socket(family, kind)
    sock.set_inheritable(inheritable)
    if v6only is not None:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
    try:
        sock.bind(where)
    except OSError as failure:
        report(step, sock, failure)
        return
    report(step, sock)


def raw(step, text):
    kind, _, rest = text.partition(":")
    family, (host, port) = address(rest)
    sock = socket.socket(family, socket.SOCK_STREAM)
    packed = socket.inet_pton(family, host)
    if family == socket.AF_INET:
        data = family.to_bytes(2, sys.byteorder) + port.to_bytes(2, "big") + packed + bytes(8)
    else:
        data = family.to_bytes(2, sys.byteorder) + port.to_bytes(2, "big") + bytes(4) + packed + bytes(4)
    buffer = ctypes.create_string_buffer(data, 256)
    fd, pointer, length = sock.fileno(), ctypes.addressof(buffer), len(data)
    if kind == "fault":
        pointer = 1
    elif kind == "short":
        length = 8
    elif kind == "long":
        length = 129
    elif kind == "negative":
        length = -1
    elif kind == "badfd":
        fd = 999
    elif kind == "notsock":
        fd = os.open(os.devnull, os.O_RDONLY)
    result = LIBC.bind(ctypes.c_int(fd), ctypes.c_void_p(pointer), ctypes.c_int(length))
    number = ctypes.get_errno()
    say(step=step, errno=None if result == 0 else errno.errorcode[number])
    sock.close()


def quietly_bind(sock, where):
    try:
        sock.bind(where)
    except OSError:
        pass


def race(step, text):
    count, _, where = text.partition(":")
    family, target = address(where)
    children = []
    for _ in range(int(count)):
        pid = os.fork()
        if pid == 0:
            sock = socket.socket(family, socket.SOCK_STREAM)
            threading.Thread(target=quietly_bind, args=(sock, target), daemon=True).start()
            os._exit(0)  # while the thread is, or is not yet, in bind
        if random.random() < 0.5:
            os.kill(pid, signal.SIGKILL)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    say(step=step, errno=None, children=len(children))


def many(step, count):
    failed = 0
    for _ in range(int(count)):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind(("127.0.0.1", 0))
            except OSError:
                failed += 1
    say(step=step, errno=None, failed=failed)


def do(step):
    name, _, value = step.partition("=")
    if name in ("tcp", "udp"):
        family, where = address(value)
        bind(step, family, socket.SOCK_STREAM if name == "tcp" else socket.SOCK_DGRAM, where)
    elif name == "tcp6only":
        bind(step, socket.AF_INET6, socket.SOCK_STREAM, address(value)[1], v6only=1)
    elif name == "tcpflags":
        family, where = address(value)
        bind(step, family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, where)
    elif name == "tcpinherit":
        family, where = address(value)
        bind(step, family, socket.SOCK_STREAM, where, inheritable=True)
    elif name == "unix":
        bind(step, socket.AF_UNIX, socket.SOCK_STREAM, value)
    elif name == "abstract":
        bind(step, socket.AF_UNIX, socket.SOCK_STREAM, b"\0" + value.encode())
    elif name == "raw":
        raw(step, value)
    elif name == "close":
        kept.pop(int(value)).close()
        say(step=step, errno=None)
    elif name == "child":
        pid = os.fork()
        if pid == 0:
            do(value)
            os._exit(0)
        os.waitpid(pid, 0)
    elif name == "race":
        race(step, value)
    elif name == "many":
        many(step, value)
    elif name == "wait":
        sys.stdin.readline()
        say(step=step, errno=None)
    else:
        sys.exit(f"binder.py: unknown step {step!r}")


for number, argument in enumerate(sys.argv[1:], 1):
    place[0] = number
    do(argument)
