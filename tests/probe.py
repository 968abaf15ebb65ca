"""The exec target of the tests: report what this process was handed, as JSON.

Usage: probe.py OUTFILE   (or '-' for stdout)

Reports pid, parent and process group, argv, environment, credentials, capabilities, ignored and
blocked signals, umask, cwd, resource limits, and every open descriptor: its close-on-exec flag
and, for a socket, family, type, bound address and whether it listens.
Imports only the standard library and opens nothing before listing fds.
"""

import fcntl
import json
import os
import resource
import socket
import stat
import sys


def descriptors():
    found = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            info = os.fstat(fd)
        except OSError:
            continue  # the directory listdir had open
        entry = {"cloexec": bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC), "kind": "other"}
        if stat.S_ISSOCK(info.st_mode):
            entry.update(describe_socket(fd))
        elif stat.S_ISFIFO(info.st_mode):
            entry["kind"] = "fifo"
        found[fd] = entry
    return found


def describe_socket(fd):
    sock = socket.socket(fileno=fd)
    try:
        address = sock.getsockname()
        if isinstance(address, bytes):
            address = "@" + address[1:].decode()
        return {
            "kind": "socket",
            "family": socket.AddressFamily(sock.family).name,
            "type": socket.SocketKind(sock.type).name,
            "address": list(address) if isinstance(address, tuple) else address,
            "listening": bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)),
            "v6only": sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) if sock.family == socket.AF_INET6 else None,
            "reuseport": sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT),
            "rcvbuf": sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        }
    finally:
        sock.detach()


def received_environment():
    """The environment as execve gave it: os.environ may hold Python's own LC_CTYPE (PEP 538)."""
    with open("/proc/self/environ", "rb") as block:
        entries = block.read().split(b"\0")
    return dict(os.fsdecode(e).split("=", 1) for e in entries if b"=" in e)


def status_fields():
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def main():
    fds = descriptors()
    status = status_fields()
    umask = os.umask(0)
    report = {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "pgid": os.getpgrp(),
        "argv": sys.argv,
        "env": received_environment(),
        "fds": fds,
        "uid": os.getresuid(),
        "gid": os.getresgid(),
        "groups": sorted(os.getgroups()),
        "umask": umask,
        "cwd": os.getcwd(),
        "limits": {name: resource.getrlimit(getattr(resource, name)) for name in sorted(dir(resource)) if name.startswith("RLIMIT_")},
        "ignored": int(status["SigIgn"], 16),
        "blocked": int(status["SigBlk"], 16),
        "cap_eff": int(status["CapEff"], 16),
        "cap_amb": int(status["CapAmb"], 16),
    }
    text = json.dumps(report)
    if sys.argv[1:2] == ["-"] or len(sys.argv) < 2:
        print(text)
    else:
        with open(sys.argv[1], "w") as out:
            out.write(text)


if __name__ == "__main__":
    main()
