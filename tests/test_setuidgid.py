"""fdlaunch-setuidgid end to end: real credential changes as root, compared with s6."""

import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import termios

import pytest
from conftest import require, require_python_for_nobody, require_root, run, sockets

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: changes credentials for real")

# Names of this run's own: two suites at once must not make or remove each other's accounts.
USER, GROUPS = f"fdlt{os.getpid()}", (f"fdlg1-{os.getpid()}", f"fdlg2-{os.getpid()}")
CAP_NET_BIND_SERVICE = 10
# setpriv(1)'s --inh-caps for a caller with inheritable capabilities, as some container runtimes start services
INHERITED = "+net_raw,+sys_admin,+dac_override"


@pytest.fixture(scope="module")
def multi_group_user():
    """A user with a primary group of its own and two supplementary ones, removed afterwards."""
    require_root()
    for group in GROUPS:
        subprocess.run(["groupadd", "-f", group], check=True)
    subprocess.run(["useradd", "-M", "-s", "/bin/false", "-G", ",".join(GROUPS), USER], check=True)
    yield USER
    subprocess.run(["userdel", USER], check=True)
    for group in GROUPS:
        subprocess.run(["groupdel", group], check=True)


def credentials_lines(argv):
    """The Uid, Gid and Groups lines of /proc/self/status as the program sees them, and id's output."""
    status = run([*argv, "grep", "-E", "^(Uid|Gid|Groups):", "/proc/self/status"])
    identity = run([*argv, "id"])
    assert status.returncode == 0 and identity.returncode == 0, status.stderr + identity.stderr
    return status.stdout, identity.stdout


@pytest.mark.parametrize("account", ["nobody", "multi", "4242:4343"])
def test_id_matches_s6_setuidgid(account, multi_group_user):
    s6 = require("s6-setuidgid")
    account = multi_group_user if account == "multi" else account
    ours_status, ours_id = credentials_lines(["fdlaunch-setuidgid", account])
    s6_status, s6_id = credentials_lines([s6, account])
    assert ours_id == s6_id
    ours, theirs = ours_status.splitlines(), s6_status.splitlines()
    assert ours[:2] == theirs[:2]  # Uid and Gid, all four of each
    if ":" not in account:
        assert ours[2] == theirs[2]  # Groups
    else:
        # s6 puts the gid in the list; fdlaunch gives a numeric account none (see the man page)
        assert ours[2].split() == ["Groups:"]


def test_multi_group_user_has_all_its_groups(multi_group_user):
    _, identity = credentials_lines(["fdlaunch-setuidgid", multi_group_user])
    for group in (multi_group_user, *GROUPS):
        assert f"({group})" in identity


def test_user_colon_group_and_explicit_groups(multi_group_user):
    status, identity = credentials_lines(["fdlaunch-setuidgid", "--groups=daemon,100", f"{multi_group_user}:daemon"])
    assert "gid=1(daemon)" in identity
    assert status.splitlines()[2].split() == ["Groups:", "1", "100"]


def test_unprivileged_asked_for_root_fails():
    require_python_for_nobody()
    done = run(["fdlaunch-setuidgid", "root", "id"], user="nobody", group="nogroup", extra_groups=[])
    assert done.returncode == 111
    assert done.stderr == "fdlaunch-setuidgid: fatal: unable to set supplementary groups: Operation not permitted\n"
    assert done.stdout == ""


def test_keeping_a_capability_that_regains_root_is_refused():
    done = run(["fdlaunch-setuidgid", "--keep-cap=setuid", "nobody", "id"])
    assert done.returncode == 111
    assert "could become root again" in done.stderr and done.stdout == ""


BIND_53 = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError as error:
    print(error.strerror)
else:
    print("bound")
print(open("/proc/self/status").read())
"""


def privileged_udp_port():
    for port in (53, 853, 953, 999):
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            probe.close()
    pytest.skip("no free port below 1024 on 127.0.0.1")


def status_masks(text):
    fields = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
    return {key: int(fields[key], 16) for key in ("CapEff", "CapAmb", "CapPrm", "CapInh")}


def test_keep_cap_binds_port_53_as_nobody():
    require_python_for_nobody()
    port = privileged_udp_port()
    kept = run(["fdlaunch-setuidgid", "--keep-cap=net_bind_service", "nobody", sys.executable, "-c", BIND_53, str(port)])
    assert kept.returncode == 0, kept.stderr
    assert kept.stdout.startswith("bound\n")
    masks = status_masks(kept.stdout)
    assert masks == {name: 1 << CAP_NET_BIND_SERVICE for name in masks}
    plain = run(["fdlaunch-setuidgid", "nobody", sys.executable, "-c", BIND_53, str(port)])
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.startswith("Permission denied\n")
    assert set(status_masks(plain.stdout).values()) == {0}


@pytest.mark.parametrize("account", ["nobody", "multi", "4242:4343"])
def test_export_then_from_env_equals_one_step(account, multi_group_user):
    account = multi_group_user if account == "multi" else account
    one_step = credentials_lines(["fdlaunch-setuidgid", account])
    two_step = credentials_lines(["fdlaunch-setuidgid", "--export", account, "fdlaunch-setuidgid", "--from-env"])
    assert one_step == two_step


def test_export_sets_only_the_three_variables():
    done = run(["fdlaunch-setuidgid", "--export", "nobody", "env"], env={"PATH": os.environ["PATH"], "KEEP": "1"})
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == sorted(["PATH=" + os.environ["PATH"], "KEEP=1", "UID=65534", "GID=65534", "GIDLIST=65534"])


def test_sockets_from_fdlaunch_listen_still_work_after_the_drop(probe):
    require_python_for_nobody()
    serve = (
        "import os, socket; s = socket.socket(fileno=3);"
        "c = socket.create_connection(s.getsockname()); a, _ = s.accept(); c.sendall(b'hi');"
        "print(os.getuid(), os.environ['LISTEN_PID'] == str(os.getpid()), a.recv(2).decode())"
    )
    done = run(["fdlaunch-listen", "-tcp:127.0.0.1:0", "--", "fdlaunch-setuidgid", "nobody", "--", sys.executable, "-c", serve])
    assert done.returncode == 0, done.stderr
    assert done.stdout == "65534 True hi\n"
    chained, report = probe(["fdlaunch-listen", "-udp:127.0.0.1:0", "--", "fdlaunch-setuidgid", "nobody", "--"])
    assert chained.returncode == 0
    assert report["uid"] == [65534] * 3 and list(sockets(report)) == [3]
    assert report["env"]["LISTEN_PID"] == str(report["pid"])


def test_environment_untouched_without_env_and_set_with_it(probe):
    require_python_for_nobody()
    caller = {"PATH": os.environ["PATH"], "HOME": "/root", "ODD": "x y"}
    done, report = probe(["fdlaunch-setuidgid", "nobody"], env=caller)
    assert done.returncode == 0 and report["env"] == caller
    done, report = probe(["fdlaunch-setuidgid", "--env", "nobody"], env=caller)
    assert done.returncode == 0
    assert report["env"] == {**caller, "HOME": "/nonexistent", "USER": "nobody", "LOGNAME": "nobody", "SHELL": "/usr/sbin/nologin"}


@pytest.fixture
def public_dir():
    """A directory nobody can enter (pytest's own tmp_path is under a 0700 directory)."""
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="fdlaunch-") as path:
        os.chmod(path, 0o755)
        yield path


def test_process_setup_options(public_dir):
    tmp_path = public_dir
    script = "ulimit -Sn; ulimit -Hn; ulimit -c; umask; pwd; nice"
    done = run(
        [
            "fdlaunch-setuidgid",
            "--limit=nofile=100:200",
            "--limit=core=0",
            "--umask=027",
            "--nice=5",
            f"--chdir={tmp_path}",
            "nobody",
            "sh",
            "-c",
            script,
        ]
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["100", "200", "0", "0027", str(tmp_path), str(os.nice(0) + 5)]


def test_setsid_and_no_new_privs():
    done = run(["fdlaunch-setuidgid", "--setsid", "--no-new-privs", "nobody", "cat", "/proc/self/stat", "/proc/self/status"])
    assert done.returncode == 0, done.stderr
    fields = done.stdout.split(")", 1)[1].split()
    pid = int(done.stdout.split()[0])
    assert int(fields[3]) == pid  # session id
    assert "NoNewPrivs:\t1" in done.stdout


def test_setsid_refuses_a_process_group_leader():
    done = run(["fdlaunch-setuidgid", "--setsid", "nobody", "true"], preexec_fn=lambda: os.setpgid(0, 0))
    assert done.returncode == 111
    assert "unable to start a new session: Operation not permitted" in done.stderr and "leads a process group" in done.stderr


@pytest.mark.parametrize("asked", [[], ["--no-new-privs"], ["--keep-cap=net_bind_service"], ["inherited"]])
def test_chroot(tmp_path, asked):
    """A root holding dash and its libraries: the program runs inside it, as nobody.

    prctl(2) and capset(2) come after the chroot, where no Python library is
    left to import: what they need was loaded before (also to empty the
    inheritable set of a caller that has one).
    """
    root = tmp_path / "root"
    for path in ("/bin/sh", "/bin/dash", *shared_libraries("/bin/dash")):
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(path), target)
    (root / "marker-inside").write_text("")
    caller = ["setpriv", f"--inh-caps={INHERITED}"] if asked == ["inherited"] else []
    asked = [] if asked == ["inherited"] else asked
    done = run([*caller, "fdlaunch-setuidgid", f"--chroot={root}", *asked, "nobody", "/bin/sh", "-c", 'cd / && echo * && echo "$(pwd)"'])
    assert done.returncode == 0, done.stderr
    entries, cwd = done.stdout.splitlines()
    assert "marker-inside" in entries.split() and cwd == "/"


def shared_libraries(binary):
    listing = run(["ldd", binary]).stdout
    return [word for word in listing.split() if word.startswith("/")]


@pytest.mark.parametrize(
    "argv, status, message",
    [
        (["no-such-user-fdl", "true"], 100, "unknown user 'no-such-user-fdl'"),
        (["nobody:no-such-group-fdl", "true"], 100, "unknown group 'no-such-group-fdl'"),
        (["nobody:", "true"], 100, "account 'nobody:': not USER, USER:GROUP, UID or UID:GID"),
        (["bad name", "true"], 100, "account 'bad name': not USER, USER:GROUP"),
        (["987654", "true"], 100, "uid 987654 has no passwd entry"),
        (["--groups=wheel,,1", "nobody", "true"], 100, "has an empty item"),
        (["--keep-cap=net_bind", "nobody", "true"], 100, "unknown capability 'net_bind'"),
        (["--limit=files=10", "nobody", "true"], 100, "unknown resource 'files'"),
        (["--limit=nofile=ten", "nobody", "true"], 100, "'ten' is not a number"),
        (["--limit=nofile=20:10", "nobody", "true"], 100, "soft limit is above the hard limit"),
        (["--umask=999", "nobody", "true"], 100, "--umask='999': an octal mode is 1 to 4 digits 0-7, from 0000 to 0777"),
        (["--nice=fast", "nobody", "true"], 100, "--nice='fast'"),
        (["--from-env", "--env", "true"], 100, "--from-env: UID is not set"),
        (["--export", "--chroot=/", "nobody", "true"], 100, "--export only sets UID, GID and GIDLIST; give --chroot to the --from-env"),
        (["--bogus", "nobody", "true"], 100, "unknown option '--bogus'"),
        (["nobody"], 100, "fdlaunch-setuidgid: usage: fdlaunch-setuidgid [options]"),
        (["--", "nobody", "true"], 100, "fdlaunch-setuidgid: usage: fdlaunch-setuidgid [options]"),  # '--' before the account
        (["--chroot=/no/such/dir", "nobody", "true"], 111, "unable to chroot to /no/such/dir: No such file or directory"),
        (["--chdir=/no/such/dir", "nobody", "true"], 111, "unable to chdir to /no/such/dir: No such file or directory"),
        (["nobody", "/no/such/program-fdl"], 127, "unable to exec /no/such/program-fdl: No such file or directory"),
        (["nobody", "/etc/passwd"], 126, "unable to exec /etc/passwd: Permission denied"),
    ],
)
def test_errors(argv, status, message):
    done = run(["fdlaunch-setuidgid", *argv])
    assert done.returncode == status, done.stderr
    assert done.stderr.startswith(("fdlaunch-setuidgid: fatal: ", "fdlaunch-setuidgid: usage: ")) and done.stderr.count("\n") == 1
    assert message in done.stderr


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"GID": "1", "GIDLIST": ""}, "UID is not set"),
        ({"UID": "x", "GID": "1", "GIDLIST": ""}, "UID='x' is not a number"),
        ({"UID": "1", "GIDLIST": ""}, "GID is not set"),
        ({"UID": "1", "GID": "1"}, "GIDLIST is not set"),
        ({"UID": "1", "GID": "1", "GIDLIST": "1,a"}, "GIDLIST='1,a'"),
    ],
)
def test_from_env_names_the_bad_variable(environ, message):
    done = run(["fdlaunch-setuidgid", "--from-env", "true"], env={"PATH": os.environ["PATH"], **environ})
    assert done.returncode == 100
    assert message in done.stderr


@pytest.fixture
def private_program(tmp_path):
    """An executable in a directory only root may enter (pytest's tmp_path is under a 0700 one), as /root/bin/x is."""
    directory = tmp_path / "bin"
    directory.mkdir(mode=0o700)
    program = directory / "mytrue"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    return program


def test_a_program_the_account_may_not_reach_is_refused_for_permission(private_program):
    """execve(2) says EACCES, not ENOENT: 126 and 'Permission denied', as s6-setuidgid says it."""
    done = run(["fdlaunch-setuidgid", "nobody", "--", str(private_program)])
    assert (done.returncode, done.stderr) == (126, f"fdlaunch-setuidgid: fatal: unable to exec {private_program}: Permission denied\n")
    s6 = run([require("s6-setuidgid"), "nobody", str(private_program)])
    assert s6.returncode == done.returncode and "Permission denied" in s6.stderr


def test_a_path_directory_the_account_may_not_search_is_permission_denied(private_program):
    """execvp(3)'s rule: EACCES met on the PATH search is 126, unless a later directory has the program."""
    tool = shutil.which("fdlaunch-setuidgid")
    searched = {"PATH": f"{private_program.parent}:/usr/bin:/bin"}
    done = run([tool, "nobody", "--", "mytrue"], env=searched)
    assert (done.returncode, done.stderr) == (126, "fdlaunch-setuidgid: fatal: unable to exec mytrue: Permission denied\n")
    found_later = run([tool, "nobody", "--", "true"], env=searched)
    assert (found_later.returncode, found_later.stderr) == (0, "")
    nowhere = run([tool, "nobody", "--", "no-such-program-fdl"], env={"PATH": "/usr/bin:/bin"})
    assert nowhere.returncode == 127
    assert nowhere.stderr == "fdlaunch-setuidgid: fatal: unable to exec no-such-program-fdl: No such file or directory\n"


def test_inherited_capabilities_do_not_survive_the_drop(attacker, public_dir):
    """A caller with inheritable capabilities (as some container runtimes give): the program's are exactly --keep-cap's.

    Left inheritable, they would be gained back by executing any file with
    inheritable file capabilities: here a copy of capsh(1) with cap_net_raw+ei.
    """
    setcap, capsh = require("setcap"), require("capsh")
    marked = os.path.join(public_dir, "capsh")
    shutil.copy(capsh, marked)
    assert run([setcap, "cap_net_raw+ei", marked]).returncode == 0
    inherited = ["setpriv", f"--inh-caps={INHERITED}", "fdlaunch-setuidgid"]
    account = f"{attacker.uid}:{attacker.gid}"
    done = run([*inherited, account, "--", "grep", "^Cap", "/proc/self/status"])
    assert done.returncode == 0, done.stderr
    assert status_masks(done.stdout) == {"CapEff": 0, "CapPrm": 0, "CapInh": 0, "CapAmb": 0}
    regained = run([*inherited, account, "--", marked, "--has-p=cap_net_raw"])
    assert regained.returncode == 1 and "not permitted" in regained.stderr, regained.stderr
    kept = run([*inherited, "--keep-cap=net_bind_service", account, "--", "grep", "^Cap", "/proc/self/status"])
    assert kept.returncode == 0, kept.stderr
    assert status_masks(kept.stdout) == {name: 1 << CAP_NET_BIND_SERVICE for name in ("CapEff", "CapPrm", "CapInh", "CapAmb")}


# The program an attacker would run: type a command into the terminal (TIOCSTI), through
# /dev/tty and through fd 0, and take the terminal as a new session's; it reports what
# happened as JSON on stdout.
TYPE_INTO_TERMINAL = """
import fcntl, json, os, termios
report = {"tty_nr": open("/proc/self/stat").read().rsplit(")", 1)[1].split()[4]}
targets = {"fd 0": 0}
try:
    targets["/dev/tty"] = os.open("/dev/tty", os.O_RDWR)
except OSError as error:
    report["/dev/tty"] = error.strerror
for name, fd in targets.items():
    try:
        for byte in b"echo typed-by-the-program\\n":
            fcntl.ioctl(fd, termios.TIOCSTI, bytes([byte]))
        report[name] = "typed"
    except OSError as error:
        report[name] = error.strerror
child = os.fork()
if child == 0:  # a session of its own, and the terminal taken as its controlling one (TIOCSCTTY)
    os.setsid()
    try:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    except OSError as error:
        os._exit(error.errno)
    os._exit(0)
taken = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
report["taken back"] = os.strerror(taken) if taken else "taken"
print(json.dumps(report))
"""

# A root shell on a terminal, as far as this matters: it leads the session the terminal
# (its stdin) controls, runs the command in a process group of its own that it makes the
# foreground one (as a shell with job control does), and once the command has exited
# reports on stdout what it printed and what waits in the terminal's input queue to be
# read as typed by the shell.
ROOT_SHELL = """
import fcntl, json, os, signal, subprocess, sys, termios
os.setsid()
fcntl.ioctl(0, termios.TIOCSCTTY, 0)
signal.signal(signal.SIGTTOU, signal.SIG_IGN)
command = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, process_group=0)
os.tcsetpgrp(0, command.pid)
out, err = command.communicate(timeout=20)
os.tcsetpgrp(0, os.getpgrp())
queued = int.from_bytes(fcntl.ioctl(0, termios.FIONREAD, bytes(4)), sys.byteorder)
os.set_blocking(0, False)
print(json.dumps({"status": command.returncode, "stdout": out, "stderr": err, "queued": os.read(0, queued).decode() if queued else ""}))
"""


@contextlib.contextmanager
def terminal():
    """A pseudo-terminal: (controller, terminal) descriptors, closed afterwards."""
    controller, device = os.openpty()
    try:
        yield controller, device
    finally:
        os.close(controller)
        os.close(device)


def from_root_shell(argv):
    """argv run as a command of ROOT_SHELL on a fresh terminal: what the shell reported."""
    with terminal() as (_, device):
        done = run([sys.executable, "-c", ROOT_SHELL, *argv], stdin=device)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_program_cannot_type_into_the_callers_terminal(attacker):
    """Run from a root shell, the program has no controlling terminal: what it types never reaches that shell."""
    program = attacker.script("type-into-terminal.py", TYPE_INTO_TERMINAL)
    shell = from_root_shell(["fdlaunch-setuidgid", attacker.name, "--", sys.executable, program])
    assert (shell["status"], shell["stderr"], shell["queued"]) == (0, "", "")
    report = json.loads(shell["stdout"])
    assert report["tty_nr"] == "0" and report["/dev/tty"] == "No such device or address"
    assert report["fd 0"] in ("Operation not permitted", "Input/output error")  # EIO where dev.tty.legacy_tiocsti=0
    assert report["taken back"] == "Operation not permitted"  # the shell's session holds it


def test_keep_tty_keeps_the_controlling_terminal(attacker):
    program = attacker.script("type-into-terminal.py", TYPE_INTO_TERMINAL)
    shell = from_root_shell(["fdlaunch-setuidgid", "--keep-tty", attacker.name, "--", sys.executable, program])
    assert (shell["status"], shell["stderr"]) == (0, "")
    report = json.loads(shell["stdout"])
    assert report["tty_nr"] != "0" and "/dev/tty" in report and report["/dev/tty"] != "No such device or address"


def test_a_session_leader_with_a_terminal_is_refused_unless_it_keeps_it():
    """The leader of the terminal's session could take it back after TIOCNOTTY (TIOCSCTTY): refused, nothing run."""

    def lead_the_terminal_session():
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    with terminal() as (_, device):
        argv = ["fdlaunch-setuidgid", "nobody", "--", "sh", "-c", "echo ran"]
        refused = run(argv, stdin=device, preexec_fn=lead_the_terminal_session)
        kept = run([argv[0], "--keep-tty", *argv[1:]], stdin=device, preexec_fn=lead_the_terminal_session)
    assert (refused.returncode, refused.stdout) == (111, "")
    assert refused.stderr.startswith(
        "fdlaunch-setuidgid: fatal: unable to give up the controlling terminal: this process leads its session"
    )
    assert refused.stderr.endswith("give --keep-tty\n") and refused.stderr.count("\n") == 1
    assert (kept.returncode, kept.stdout, kept.stderr) == (0, "ran\n", "")
