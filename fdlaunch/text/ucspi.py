"""The environment of a UCSPI handler: who connected, in the names other super-servers use. Pure.

TCP as tcpserver(1) and tcp-environ(5): PROTO=TCP, TCPLOCALIP,
TCPLOCALPORT, TCPREMOTEIP, TCPREMOTEPORT, and TCPLOCALHOST and
TCPREMOTEHOST only when given; TCPCONNNUM as s6-tcpserver(8). Unix sockets as
s6-ipcserver(8): PROTO=IPC, IPCLOCALPATH, IPCREMOTEEUID, IPCREMOTEEGID,
IPCCONNNUM, plus IPCREMOTEPID. With inetd=True, what systemd gives an
Accept=yes service: REMOTE_ADDR and REMOTE_PORT.
"""

import ipaddress
from collections import namedtuple

from fdlaunch.text import listenenv, spec

TCP_NAMES = ("TCPLOCALIP", "TCPLOCALPORT", "TCPLOCALHOST", "TCPREMOTEIP", "TCPREMOTEPORT", "TCPREMOTEHOST", "TCPREMOTEINFO", "TCPCONNNUM")
IPC_NAMES = ("IPCLOCALPATH", "IPCREMOTEEUID", "IPCREMOTEEGID", "IPCREMOTEPID", "IPCREMOTEPATH", "IPCCONNNUM")
INETD_NAMES = ("REMOTE_ADDR", "REMOTE_PORT")
# What a handler never inherits from the server's own environment: the
# sockets the server was handed, its supervisor's notify socket (a handler
# must not speak for the service), and connection variables of any caller.
REMOVED = (*listenenv.VARIABLES, "NOTIFY_SOCKET", "PROTO", *TCP_NAMES, *IPC_NAMES, *INETD_NAMES)

# ip: an ip_address (IPv4-mapped IPv6 shown as IPv4), port: int; or, on a
# unix socket, uid, gid, pid from SO_PEERCRED.
Peer = namedtuple("Peer", "ip port uid gid pid")


def base_environment(environ):
    """The server's environment without the variables no handler inherits."""
    return {name: value for name, value in environ.items() if name not in REMOVED}


def inet_peer(address):
    """A Peer from getpeername()'s (host, port, ...)."""
    return Peer(plain_ip(address[0]), address[1], None, None, None)


def unix_peer(pid, uid, gid):
    return Peer(None, None, uid, gid, pid)


def plain_ip(host):
    """The address as the client would write it: ::ffff:127.0.0.1 on a dual-stack socket is 127.0.0.1."""
    ip = ipaddress.ip_address(host)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def key(peer):
    """What -C counts connections by: the remote address, or the uid on a unix socket."""
    return str(peer.ip) if peer.ip is not None else peer.uid


def describe(peer):
    """The peer in a log line: 127.0.0.1:4711, [::1]:4711, uid 1000 pid 42."""
    if peer.ip is not None:
        return spec.format_address((peer.ip, peer.port))
    return f"uid {peer.uid} gid {peer.gid} pid {peer.pid}"


def tcp_environment(local, peer, count, local_host=None, remote_host=None):
    """local: getsockname() of the connection; count: connections from this address, this one included."""
    environ = {
        "PROTO": "TCP",
        "TCPLOCALIP": str(plain_ip(local[0])),
        "TCPLOCALPORT": str(local[1]),
        "TCPREMOTEIP": str(peer.ip),
        "TCPREMOTEPORT": str(peer.port),
        "TCPCONNNUM": str(count),
    }
    if local_host is not None:
        environ["TCPLOCALHOST"] = local_host
    if remote_host is not None:
        environ["TCPREMOTEHOST"] = remote_host
    return environ


def ipc_environment(local_path, peer, count):
    """local_path: the listening socket's path ('@name' in the abstract namespace)."""
    return {
        "PROTO": "IPC",
        "IPCLOCALPATH": local_path,
        "IPCREMOTEEUID": str(peer.uid),
        "IPCREMOTEEGID": str(peer.gid),
        "IPCREMOTEPID": str(peer.pid),
        "IPCCONNNUM": str(count),
    }


def inetd_environment(peer):
    """systemd.socket(5), Accept=yes: REMOTE_ADDR and REMOTE_PORT for an IP peer, nothing for a unix one."""
    if peer.ip is None:
        return {}
    return {"REMOTE_ADDR": str(peer.ip), "REMOTE_PORT": str(peer.port)}
