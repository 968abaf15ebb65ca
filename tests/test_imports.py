"""What each tool imports before its exec, pinned: a new import fails here, by name.

Every link of a chain is a Python start, once per service start and, for
fdlaunch-accept's handler chains, per connection; what a link imports is
most of what it costs beyond the interpreter's own start (python -c pass).
Each tool runs here under PYTHONPROFILEIMPORTTIME=1, which makes the
interpreter name on stderr every module it loads, and the modules beyond
those of python -c pass must be exactly the set pinned below. A module
that goes away from a set is as welcome as it is reported: take it out.

The rules the sets keep, each said once, here; the code points here:

- The C modules, not their Python wrappers, where the wrapper costs more
  than it gives: ``import _socket as socket`` (socket.py imports selectors
  and makes an IntEnum of every constant, a millisecond); ``_signal`` in
  kernel/chain.py, which every tool imports (signal.py makes three enums at
  import, and one for every number its functions return: 62 for each
  pthread_sigmask; chain.signal_name imports signal when a name is wanted).
- A host name given to getaddrinfo as bytes when it is ASCII (kernel/sock.py):
  a str goes through the idna codec, which loads encodings.idna,
  stringprep and unicodedata.
- ``__import__`` to load a tool's module (cli.load, __main__), not
  importlib.import_module: the importlib package is one more import.
- namedtuple, not dataclass: dataclasses imports inspect (and with it
  ast, dis, tokenize...), some ten milliseconds.
- No shared library module where a system call answers: fds.limit reads
  RLIMIT_NOFILE by os.sysconf, not the resource module (a dlopen).
- Lazy where only some runs need it: docopt in cli.parse (fdlaunch-listen
  and fdlaunch-fdmap read their usage themselves), ctypes in kernel/proc.py
  and kernel/creds.py (prctl(2), capset(2), renaming a fused link: only
  links that need them pay for it, and a chain loads it at its start while
  the standard library is still readable), termios in creds.leave_terminal,
  sockfile in kernel/sock.py, a module of ours imported for one constant
  never (numbers.PID_MAX_LIMIT).
- Nothing compiled at import that only some runs use: a regular expression
  stays a string until re compiles it on first use (fdplan.BRACES), and a
  check that runs per connection (credspec.is_name) uses none at all.
- No contextlib (chain.stopping_signals_raise is a small class) and no
  __future__ in the package (fdlaunch/__init__.py writes its annotations
  as strings; typing only for a type checker).

The sets are those of the Python the suite tests (FDLAUNCH_TEST_PYTHON, the
interpreter of the console scripts): the standard library's own imports
change between versions, so each version has its own pins, and a version
without them is skipped and says so.
"""

import os
import shutil
import signal
import socket
import subprocess
import time

import pytest
from conftest import TIMEOUT, free_port

HEADER = "import time: self [us]"

# What every tool loads: the runtime, the standard library that re and namedtuple need.
COMMON = {
    "_collections", "_functools", "_operator", "_sre", "collections", "copyreg", "enum", "errno", "fcntl", "functools",
    "itertools", "keyword", "operator", "re", "re._casefix", "re._compiler", "re._constants", "re._parser", "reprlib", "types",
    "fdlaunch", "fdlaunch.cli", "fdlaunch.cmd", "fdlaunch.errors", "fdlaunch.kernel", "fdlaunch.kernel.chain",
    "fdlaunch.kernel.fds", "fdlaunch.text", "fdlaunch.text.numbers", "fdlaunch.text.usage",
}  # fmt: skip
# What docopt-ng brings: the tools that read their usage with it (cli.parse).
DOCOPT = {"__future__", "_typing", "collections.abc", "contextlib", "docopt", "docopt._version", "typing", "warnings"}
SOCKETS = {
    "_socket",
    "fdlaunch.kernel.sock",
    "fdlaunch.text.credspec",
    "fdlaunch.text.fdplan",
    "fdlaunch.text.listenenv",
    "fdlaunch.text.spec",
}
NOTIFY = {
    "_socket",
    "_struct",
    "array",
    "collections.abc",
    "struct",
    "fdlaunch.kernel.sdnotify",
    "fdlaunch.text.notifyproto",
}  # array registers with collections.abc
WATCH = {"select", "signal", "fdlaunch.kernel.proc", "fdlaunch.loops", "fdlaunch.loops.readiness"}
CTYPES = {"_ctypes", "ctypes", "ctypes._endian"}  # prctl(2) in a child: PR_SET_PDEATHSIG; seccomp(2)
INSTANCES = {"fdlaunch.kernel.fdstore", "fdlaunch.kernel.guard", "fdlaunch.loops.overlap"}

PINNED = {
    (3, 11): {
        "fdlaunch-listen": COMMON | SOCKETS | {"select", "fdlaunch.cmd.listen"},
        "fdlaunch-fdmap": COMMON | (SOCKETS - {"fdlaunch.kernel.sock"}) | {"fdlaunch.cmd.fdmap"},
        "fdlaunch-setuidgid": COMMON
        | DOCOPT
        | {"grp", "pwd", "resource", "select", "signal", "fdlaunch.cmd.setuidgid", "fdlaunch.kernel.creds", "fdlaunch.kernel.proc"}
        | {"fdlaunch.text.credspec"},
        "fdlaunch-notify-wait": COMMON
        | NOTIFY
        | WATCH
        | {"fdlaunch.cmd.notify_wait", "fdlaunch.loops.watching", "fdlaunch.kernel.readyfile", "fdlaunch.text.listenenv"},
        "fdlaunch-notify": COMMON | DOCOPT | NOTIFY | {"select", "fdlaunch.cmd.notify"},
        "fdlaunch-handoff": COMMON
        | NOTIFY
        | WATCH
        | CTYPES
        | INSTANCES
        | SOCKETS
        | {"fdlaunch.cmd.handoff", "fdlaunch.loops.listenfrom", "fdlaunch.text.socketset"},
        "fdlaunch-init": COMMON
        | DOCOPT
        | CTYPES
        | (NOTIFY - {"fdlaunch.kernel.sdnotify", "fdlaunch.text.notifyproto"})
        | (WATCH - {"fdlaunch.loops.readiness"})
        | {"fdlaunch.cmd.init", "fdlaunch.kernel.guard", "fdlaunch.loops.reaping"},
        "fdlaunch-foreground": COMMON
        | DOCOPT
        | NOTIFY
        | WATCH
        | CTYPES
        | {"fdlaunch.kernel.guard"}
        | {"math", "fdlaunch.cmd.foreground", "fdlaunch.loops.forking", "fdlaunch.text.listenenv"},
        "fdlaunch-accept": COMMON
        | DOCOPT
        | NOTIFY
        | WATCH
        | (SOCKETS - {"fdlaunch.kernel.sock", "fdlaunch.text.fdplan"})
        | {"grp", "pwd", "resource", "ipaddress", "math", "selectors", "shlex", "socket", "fdlaunch.kernel.creds"}
        | {"fdlaunch.cmd.accept", "fdlaunch.loops.accepting", "fdlaunch.text.rules", "fdlaunch.text.ucspi"},
        "fdlaunch-adopt": COMMON
        | DOCOPT
        | CTYPES
        | (SOCKETS - {"fdlaunch.text.fdplan"})
        | {"_struct", "array", "select", "signal", "struct", "fdlaunch.kernel.proc", "fdlaunch.kernel.seccomp", "fdlaunch.loops"}
        | {"fdlaunch.cmd.adopt", "fdlaunch.loops.adopting", "fdlaunch.text.adoption", "fdlaunch.text.sockaddr"} - {"fdlaunch.text.fdplan"},
    },
}


def loaded(stderr):
    """The modules each interpreter that wrote stderr loaded, in the order the interpreters started (a fork adds none)."""
    sets = []
    for line in stderr.splitlines():
        if line.startswith(HEADER):
            sets.append(set())
        elif line.startswith("import time:") and sets:
            sets[-1].add(line.rsplit("|", 1)[1].strip())
    return sets


def interpreter():
    with open(shutil.which("fdlaunch-listen"), "rb") as script:
        return script.readline()[2:].split()[0].decode()


def floor():
    done = subprocess.run([interpreter(), "-c", "pass"], env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}, capture_output=True, text=True)
    (modules,) = loaded(done.stderr)
    return modules


def pins():
    version = tuple(
        int(part) for part in subprocess.check_output([interpreter(), "-c", "import sys; print(*sys.version_info[:2])"]).split()
    )
    if version not in PINNED:
        pytest.skip(f"no import sets pinned for Python {'.'.join(map(str, version))}: add them to PINNED, from this test's report")
    return PINNED[version]


def imports_of(argv, index=0, status=0):
    """The modules the index-th interpreter of argv (run with each link exec'd) loads beyond python -c pass."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1", "FDLAUNCH_FUSE": "0"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == status, done.stderr
    return loaded(done.stderr)[index] - floor()


def compare(tool, found):
    wanted = pins()[tool]
    assert (sorted(found - wanted), sorted(wanted - found)) == ([], []), f"{tool}: (imported and not pinned, pinned and not imported)"


ME = f"{os.getuid()}:{os.getgid()}"
RUNS = {
    "fdlaunch-listen": (["fdlaunch-listen", "-tcp:127.0.0.1:0", "--", "true"], 0, 0),
    "fdlaunch-fdmap": (["fdlaunch-fdmap", "--map", "--", "true"], 0, 0),
    "fdlaunch-setuidgid": (["fdlaunch-setuidgid", ME, "--", "true"], 0, 0),
    "fdlaunch-notify-wait": (["fdlaunch-notify-wait", "--", "true"], 0, 0),
    "fdlaunch-notify": (["fdlaunch-notify", "READY=1"], 0, 1),  # nobody to tell: 1, fdlaunch-notify(1)
    "fdlaunch-handoff": (["fdlaunch-handoff", "--", "true"], 0, 0),
    "fdlaunch-init": (["fdlaunch-init", "--", "true"], 0, 0),
    "fdlaunch-foreground": (["fdlaunch-foreground", "--", "sh", "-c", "sleep 0.2 & exit 0"], 0, 0),
    "fdlaunch-adopt": (["fdlaunch-listen", "-tcp:127.0.0.1:0", "--", "fdlaunch-adopt", "--", "true"], 1, 0),
}


@pytest.mark.parametrize("tool", RUNS)
def test_a_tool_imports_what_it_is_pinned_to(tool):
    argv, index, status = RUNS[tool]
    compare(tool, imports_of(argv, index, status))


def test_fdlaunch_accept_imports_what_it_is_pinned_to():
    """Its start, a connection served (posix_spawn) and its stop: the second interpreter of listen, then accept."""
    port = free_port()
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1", "FDLAUNCH_FUSE": "0"}
    argv = ["fdlaunch-listen", f"-tcp:127.0.0.1:{port}", "--", "fdlaunch-accept", "-q", "--", "true"]
    server = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as client:
                    assert client.recv(1) == b"", "served: the handler closed it"
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline and server.poll() is None, "fdlaunch-accept never served"
                time.sleep(0.02)
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=TIMEOUT)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.returncode == 0, stderr
    compare("fdlaunch-accept", loaded(stderr)[1] - floor())


def test_the_pins_name_every_tool():
    from fdlaunch import cli

    for version, sets in PINNED.items():
        assert set(sets) == set(cli.TOOLS), f"Python {version}"
