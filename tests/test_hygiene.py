"""fdlaunch(7), CHAIN LOADING, for every tool that runs a program: what the program is handed.

The environment it was started with (plus only the documented variables),
SIGPIPE and SIGXFSZ at their defaults, the caller's ignored signals and
mask kept, and no descriptor but the inherited ones and those documented.
"""

import os
import signal

import pytest
from conftest import run

# Each tool in front of the program, and the variables it documents adding.
CHAINS = {
    "fdlaunch-listen": (["fdlaunch-listen", "-tcp:127.0.0.1:0", "--"], {"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "LISTEN_FD_MAP"}),
    "fdlaunch-setuidgid": (["fdlaunch-setuidgid", str(os.getuid()) + ":" + str(os.getgid()), "--"], set()),
    "fdlaunch-notify-wait": (["fdlaunch-notify-wait", "--"], {"NOTIFY_SOCKET"}),
    "fdlaunch-notify-wait --fork": (["fdlaunch-notify-wait", "--fork", "--"], {"NOTIFY_SOCKET"}),
    "fdlaunch-fdmap": (["fdlaunch-fdmap", "--map", "--"], {"LISTEN_FD_MAP"}),
    "fdlaunch-handoff": (["fdlaunch-handoff", "--"], {"NOTIFY_SOCKET"}),
}

# Environment and descriptors: the program is /bin/sh, reporting on its own
# pid ($$) only through commands that take their output file as an argument
# (a redirection, command substitution or pipeline would have sh open fds of
# its own: dash parks the saved stdout on fd 10).
REPORT = r"""
fdlaunch-notify READY=1
find /proc/$$/fd -mindepth 1 -maxdepth 1 -fprintf "$TMPDIR/fds" "%f\n"
cp /proc/$$/environ "$TMPDIR/environ"
"""
# Signals: the program is cp itself, since dash clears the signal mask and
# Python ignores SIGPIPE at start-up; cp changes neither.
SIGNALS = ["cp", "/proc/self/status"]


def bit(number):
    return 1 << (number - 1)


@pytest.mark.parametrize("chain", CHAINS)
def test_what_the_program_is_handed(chain, tmp_path):
    argv, documented = CHAINS[chain]
    if chain == "fdlaunch-setuidgid" and os.geteuid() != 0:
        pytest.skip("needs root to set even its own credentials")

    def caller_state():
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup leaves it
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})

    caller = {"PATH": os.environ["PATH"], "TMPDIR": str(tmp_path), "ODD": "a=b c", "EMPTY": ""}
    done = run([*argv, "/bin/sh", "-c", REPORT], env=caller, timeout=20)
    assert done.returncode == 0, done.stderr
    environ = dict(entry.split("=", 1) for entry in (tmp_path / "environ").read_text().split("\0") if entry)
    added = set(environ) - set(caller)
    assert added <= documented, f"undocumented variables: {added - documented}"
    assert {k: environ[k] for k in caller} == caller
    listening = 1 if chain == "fdlaunch-listen" else 0
    assert sorted(int(fd) for fd in (tmp_path / "fds").read_text().split()) == [0, 1, 2, *range(3, 3 + listening)]

    # cp never says READY=1: in fork mode that is exit 1, after cp has run
    done = run([*argv, *SIGNALS, str(tmp_path / "status")], env=caller, preexec_fn=caller_state, timeout=20)
    assert done.returncode == (1 if "--fork" in argv else 0), done.stderr
    status = dict(line.split(":\t", 1) for line in (tmp_path / "status").read_text().splitlines() if ":\t" in line)
    ignored, blocked = int(status["SigIgn"], 16), int(status["SigBlk"], 16)
    assert ignored & bit(signal.SIGHUP)
    assert not ignored & (bit(signal.SIGPIPE) | bit(signal.SIGXFSZ))
    assert blocked == bit(signal.SIGUSR2)
