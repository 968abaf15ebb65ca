"""Socket specs: '-PROTO:OPTIONS:ADDRESS' text in, Spec values out.

Pure: no system calls, no environment. Names (hosts, services, users) are
checked for shape here and looked up by fdlaunch.kernel.sock.
"""

import _socket as socket  # not socket.py: tests/test_imports.py
import os
import re
from collections import namedtuple

from fdlaunch.errors import UsageError, quoted
from fdlaunch.text import credspec, usage
from fdlaunch.text.listenenv import LABEL, VARIABLES
from fdlaunch.text.numbers import is_decimal, octal_mode

# transport: 'tcp', 'udp' or 'unix', the word printed after the address;
# type: 'stream', 'dgram' or 'seqpacket'; family: 'any', '4', '6' or 'unix'.
Protocol = namedtuple("Protocol", "name transport type family")


PROTOCOLS = {
    p.name: p
    for p in (
        Protocol("tcp", "tcp", "stream", "any"),
        Protocol("tcp4", "tcp", "stream", "4"),
        Protocol("tcp6", "tcp", "stream", "6"),
        Protocol("udp", "udp", "dgram", "any"),
        Protocol("udp4", "udp", "dgram", "4"),
        Protocol("udp6", "udp", "dgram", "6"),
        Protocol("unix", "unix", "stream", "unix"),
        Protocol("unix-dgram", "unix", "dgram", "unix"),
        Protocol("unix-seqpacket", "unix", "seqpacket", "unix"),
    )
}

# Patterns are strings, compiled on first use by re's cache: compiling them
# all at import would cost every chain link a few milliseconds.
VARIABLE = r"[A-Za-z_][A-Za-z0-9_]*"
SERVICE = r"[A-Za-z][A-Za-z0-9_+.-]*"
HOSTNAME = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?"
ACCOUNT_NAME = r"[^,:/@\s\x00-\x1f\x7f]+"
UNIX_PATH_MAX = 107  # sun_path is 108 bytes, one kept for the terminating NUL (unix(7))
IFNAMSIZ = 16  # netdevice(7): interface names are at most 15 bytes


_SPEC_FIELDS = {
    "proto": None,
    "host": "",  # inet: '' is the wildcard
    "port": "",  # inet: digits or a service name
    "path": "",  # unix: a path, or '@name' in the abstract namespace
    "label": None,
    "fd": None,
    "var": None,
    "backlog": None,
    "reuseport": False,
    "v6only": False,
    "freebind": False,
    "transparent": False,
    "rcvbuf": None,
    "sndbuf": None,
    "device": None,
    "mode": None,
    "owner": None,
    "mkdir": False,
    "shareddir": False,
}


# A namedtuple, not a dataclass: tests/test_imports.py.
class Spec(namedtuple("Spec", _SPEC_FIELDS, defaults=list(_SPEC_FIELDS.values())[1:])):
    """One socket to open, as the user asked for it."""

    __slots__ = ()

    @property
    def protocol(self):
        return PROTOCOLS[self.proto]

    @property
    def name(self):
        """The label the socket is passed under: label=, else the protocol word."""
        return self.label or self.proto

    @property
    def is_unix(self):
        return self.protocol.family == "unix"

    @property
    def is_abstract(self):
        return self.is_unix and self.path.startswith("@")

    def address(self):
        """The address as asked, printed by format_address: ':8080/tcp' for the wildcard."""
        return format_address(self.path if self.is_unix else (self.host, self.port), self.protocol.transport)


def format_address(where, transport=None):
    """An address as fdlaunch(7), DIAGNOSTICS, prints it: '127.0.0.1:8080/tcp', '[::1]:53/udp', '/run/x', '@name'.

    where: (host, port, ...) as a spec or a sockaddr has them, or a unix
    socket's name, str or bytes as getsockname() gives it. Without
    transport, an inet address is printed bare, as a peer: '[::1]:4711'.
    """
    if isinstance(where, (str, bytes)):
        return quoted(unix_name(where))
    host, port = str(where[0]), where[1]
    bracketed = f"[{host}]" if ":" in host else host
    return f"{bracketed}:{port}" + (f"/{transport}" if transport else "")


def unix_name(name):
    """getsockname() of a unix socket as text: the path, '@name' for the abstract namespace."""
    if isinstance(name, bytes):
        return "@" + name[1:].decode(errors="surrogateescape") if name[:1] == b"\0" else name.decode(errors="surrogateescape")
    return name


# Option values: each parser takes the text after '=' and returns the value
# or raises ValueError with what would be right.


def _label(text):
    if not re.fullmatch(LABEL, text):
        raise ValueError("a label is 1 to 255 of A-Z a-z 0-9 . _ -")
    return text


def _fd(text):
    number = _number(text, "fd")
    if number < 3:
        raise ValueError("fd must be 3 or more: 0, 1 and 2 are stdin, stdout and stderr")
    return number


def _variable(text):
    if not re.fullmatch(VARIABLE, text):
        raise ValueError("a variable name is a letter or _ followed by letters, digits or _")
    if text in VARIABLES:
        raise ValueError(f"{text} is set by fdlaunch-listen itself")
    return text


def _number(text, what):
    if not is_decimal(text) or len(text) > 10 or int(text) > 2**31 - 1:
        raise ValueError(f"{what} must be a whole number from 0 to {2**31 - 1}")
    return int(text)


def _size(text):
    multiplier = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    digits = text[:-1] if multiplier > 1 else text
    if not is_decimal(digits) or len(digits) > 10 or not 0 < int(digits) * multiplier <= 2**31 - 1:
        raise ValueError("a buffer size is a number of bytes, optionally with K, M or G, up to 2G-1")
    return int(digits) * multiplier


def _device(text):
    if not 0 < len(os.fsencode(text)) < IFNAMSIZ or "/" in text or text in (".", "..") or not text.isprintable() or " " in text:
        raise ValueError(f"an interface name is 1 to {IFNAMSIZ - 1} bytes, without '/' or spaces")
    return text


def _owner(text):
    credspec.split_user(text)
    return text


INET = "inet"
STREAMS = "stream"
DUAL = "dual"
UNIX_PATH = "unixpath"
ANY = "any"

# name: (value parser, or None for a flag word; where the option applies)
OPTIONS = {
    "label": (_label, ANY),
    "fd": (_fd, ANY),
    "var": (_variable, ANY),
    "backlog": (lambda text: _number(text, "backlog"), STREAMS),
    "reuseport": (None, INET),
    "v6only": (None, DUAL),
    "freebind": (None, INET),
    "transparent": (None, INET),
    "rcvbuf": (_size, ANY),
    "sndbuf": (_size, ANY),
    "device": (_device, INET),
    "mode": (octal_mode, UNIX_PATH),
    "owner": (_owner, UNIX_PATH),
    "mkdir": (None, UNIX_PATH),
    "shareddir": (None, UNIX_PATH),
}

WHERE = {
    INET: "tcp and udp sockets",
    STREAMS: "tcp, unix and unix-seqpacket sockets",
    DUAL: "tcp, tcp6, udp and udp6 sockets on IPv6 addresses",
    UNIX_PATH: "unix sockets with a path (not @abstract)",
}

# The options field, when present, is a list of flag words and key=value
# items; owner= may hold one ':' (USER:GROUP), which the regex engine tells
# apart from the field separator by backtracking.
_ITEM = rf"(?:owner={ACCOUNT_NAME}(?::{ACCOUNT_NAME})?|[a-z][a-z0-9_-]*(?:=[^,:]*)?)"
_OPTIONS_THEN_ADDRESS = rf"(?s)(?P<options>(?:{_ITEM}(?:,{_ITEM})*)?):(?P<address>.*)"
_SPEC = r"(?s)-(?P<proto>[^:=]+):(?P<rest>.*)"


def looks_like_spec(word):
    """Whether a command-line word is a socket spec rather than an option or the program."""
    return bool(re.match(r"-[^-:=][^:=]*:", word))


def parse(text):
    """Parse one spec; raise UsageError quoting it and saying what would be right."""
    try:
        return _parse(text)
    except ValueError as error:
        raise UsageError(f"bad socket spec {text!r}: {error}") from None


def _parse(text):
    match = re.fullmatch(_SPEC, text)
    if not match:
        raise ValueError("a spec is -PROTO:OPTIONS:ADDRESS, e.g. -tcp::8080 or -unix:mode=0600:/run/x.sock")
    proto = match["proto"]
    if proto not in PROTOCOLS:
        raise ValueError(f"unknown protocol {proto!r}; expected one of {', '.join(PROTOCOLS)}")
    options_text, address = split_options(match["rest"])
    values = {"proto": proto}
    try:
        values.update(_address(PROTOCOLS[proto], address))
    except ValueError:
        meant = None if options_text else _word_before_address(proto, address)
        if meant is not None:
            raise ValueError(meant) from None
        raise
    values.update(_options(options_text))
    spec = Spec(**values)
    _check_placement(spec)
    return spec


def split_options(rest):
    """Split 'OPTIONS:ADDRESS'; without a field of known options, all of it is the address.

    Option names are a closed set, so '-tcp:127.0.0.1:80' and '-tcp:8080' are
    addresses, while '-tcp:label=web:80' and the typo '-tcp:lable=web:80'
    (a key=value item) are options.
    """
    match = re.fullmatch(_OPTIONS_THEN_ADDRESS, rest)
    if match and all(_is_option_item(item) for item in match["options"].split(",") if match["options"]):
        return match["options"], match["address"]
    head, colon, tail = rest.partition(":")
    if colon and re.match(r"[a-z][a-z0-9_-]*=", head):
        return head, tail  # meant as options, if malformed: let _options say how
    return "", rest


def _word_before_address(proto, text):
    """What was likely meant by an inet address that does not parse, WORD:HOST:PORT: an option, or (most often,
    '-tcp:http:127.0.0.1:80') a label without its 'label='; None if it is not that shape."""
    head, _, tail = text.partition(":")
    if ":" not in tail or PROTOCOLS[proto].family == "unix" or not re.fullmatch(LABEL, head):
        return None
    try:
        _address(PROTOCOLS[proto], tail)
    except ValueError:
        return None
    near = usage.near_miss(head, list(OPTIONS))
    if near is not None:
        return f"unknown option {head!r}, did you mean {near!r}?"
    return f"{head!r} is neither an option nor part of the address: a label is given as label={head}, e.g. -{proto}:label={head}:{tail}"


def _is_option_item(item):
    return "=" in item or item in OPTIONS


def _options(text):
    values = {}
    for item in text.split(",") if text else ():
        name, has_value, value = item.partition("=")
        if not item:
            raise ValueError(f"options {text!r} have an empty item; separate options with one comma")
        if name not in OPTIONS:
            raise ValueError(f"unknown option {name!r}; known options: {', '.join(OPTIONS)}")
        if name in values:
            raise ValueError(f"option {name!r} is given twice")
        parser = OPTIONS[name][0]
        if parser is None:
            if has_value:
                raise ValueError(f"option {name!r} is a flag and takes no value: write {name!r}")
            values[name] = True
            continue
        if not has_value:
            raise ValueError(f"option {name!r} needs a value: {name}=...")
        try:
            values[name] = parser(value)
        except ValueError as error:
            raise ValueError(f"{name}={value!r}: {error}") from None
    return values


def _check_placement(spec):
    for name in Spec._fields:
        if name not in OPTIONS or getattr(spec, name) in (None, False):
            continue
        where = OPTIONS[name][1]
        if not _applies(where, spec):
            shown_path = spec.address() if spec.is_unix else ""
            raise ValueError(f"option {name!r} is only for {WHERE[where]}, not for {spec.proto} {shown_path}".rstrip())


def _applies(where, spec):
    protocol = spec.protocol
    return {
        ANY: True,
        INET: protocol.family != "unix",
        STREAMS: protocol.type != "dgram",
        DUAL: protocol.family in ("any", "6") and not _is_ip(socket.AF_INET, spec.host),
        UNIX_PATH: spec.is_unix and not spec.is_abstract,
    }[where]


def _address(protocol, text):
    if protocol.family == "unix":
        return {"path": _unix_path(text)}
    host, port = _split_host_port(text)
    _check_host(host, protocol)
    _check_port(port)
    return {"host": host, "port": port}


def _unix_path(text):
    if not text or text == "@":
        raise ValueError("a unix socket needs a path, or @name for the abstract namespace")
    if "\0" in text:
        raise ValueError("a unix socket path cannot contain a NUL byte")
    if len(os.fsencode(text)) > UNIX_PATH_MAX:
        raise ValueError(f"unix socket path is {len(os.fsencode(text))} bytes; the limit is {UNIX_PATH_MAX}")
    return text


def _split_host_port(text):
    if text.startswith("["):
        host, bracket, port = text[1:].partition("]")
        if not bracket or not port.startswith(":"):
            raise ValueError(f"address {text!r} is not [IPV6]:PORT, e.g. [::1]:53")
        if ":" not in host:
            raise ValueError(f"{host!r} is not an IPv6 address; brackets are for IPv6 only")
        return host, port[1:]
    if text.count(":") > 1:
        raise ValueError("an IPv6 address goes in brackets, e.g. [::1]:53")
    host, _, port = text.rpartition(":")
    return host, port


def _check_host(host, protocol):
    if host == "":
        return
    if ":" in host:
        address = host.split("%", 1)[0]
        if not _is_ip(socket.AF_INET6, address) or host.endswith("%"):
            raise ValueError(f"host {host!r} is not an IPv6 address")
        if protocol.family == "4":
            raise ValueError(f"{protocol.name} is IPv4 only; {host!r} is an IPv6 address")
        return
    if _is_ip(socket.AF_INET, host):
        if protocol.family == "6":
            raise ValueError(f"{protocol.name} is IPv6 only; {host!r} is an IPv4 address")
        return
    if re.fullmatch(r"[0-9.]+", host) or not re.fullmatch(HOSTNAME, host):
        raise ValueError(f"host {host!r} is not an IP address or a host name")


def _is_ip(family, text):
    try:
        socket.inet_pton(family, text)
    except (OSError, ValueError):
        return False
    return True


def _check_port(port):
    if is_decimal(port):
        if len(port) > 5 or int(port) > 65535:
            raise ValueError(f"port {port} is out of range; a port is 0 to 65535")
        return
    if not re.fullmatch(SERVICE, port):
        raise ValueError(f"port {port!r} is not a number from 0 to 65535 or a service name, e.g. 53 or domain")


def format_spec(spec):
    """The canonical text of a spec; parse(format_spec(s)) == s."""
    items = []
    for name in Spec._fields:
        value = getattr(spec, name)
        if name not in OPTIONS or value is None or value is False:
            continue
        if value is True:
            items.append(name)
        elif name == "mode":
            items.append(f"mode={value:04o}")
        else:
            items.append(f"{name}={value}")
    if spec.is_unix:
        address = spec.path
    else:
        host = f"[{spec.host}]" if ":" in spec.host else spec.host
        address = f"{host}:{spec.port}" if host else spec.port
    return f"-{spec.proto}:{','.join(items)}:{address}"


def split_words(argv):
    """Split fdlaunch-listen's argv into (option words, spec words, program argv).

    docopt cannot tell '-udp::53' from a cluster of short options, so specs
    are picked out by shape first; the program starts at '--' or at the
    first word that is neither an option nor a spec.
    """
    options, found = [], []
    for index, word in enumerate(argv):
        if word == "--":
            return options, found, argv[index + 1 :]
        if looks_like_spec(word):
            found.append(word)
        elif word.startswith("-") and word != "-":
            options.append(word)
        else:
            return options, found, argv[index:]
    return options, found, []
