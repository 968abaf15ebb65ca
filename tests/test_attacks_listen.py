"""A local user against the unix socket files root's fdlaunch-listen and fdlaunch-handoff make.

fdlaunch-listen(1), Unix socket files: the owner and mode go to the socket
bound and nothing else, a symlink someone else could have planted is never
followed, and as root a directory others can write is refused unless the
spec says shareddir. Each race is run for real by the attacker fixture's
unprivileged account against the installed tools run as root, bounded in
tries, and must win nothing.
"""

import os
import signal
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import HERE, TIMEOUT, require_root, run
from test_handoff import Upstream

ATTEMPTS = 300  # runs raced where the tool binds: code that works by name loses about every second one
REFUSALS = 50  # runs raced where the tool must refuse before it binds
FLIPS = 150  # runs against a directory flipped blindly: code that works by name loses about one in 20
RACER = (HERE / "swap_racer.py").read_text()
REPLACED = "unable to bind {path}: the file there is not the socket just bound: someone who can write its directory replaced it"
DROP_NET_ADMIN = ["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin", "--"]


class Racer:
    """swap_racer.py run as the attacker, until stopped: how many swaps it made."""

    def __init__(self, attacker, *arguments):
        script = attacker.script("swap_racer.py", RACER)
        self.process = attacker.popen(["/usr/bin/python3", script, *arguments, "600"], stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline() == "ready\n", "the racer did not start"

    def stop(self):
        self.process.kill()
        said, _ = self.process.communicate(timeout=TIMEOUT)
        return said.count("swapped\n")


def snapshot(top, skip):
    """Every entry under top but those under skip: (type and mode, owner, group, inode, size) by path."""
    found = {}
    for directory, names, files in os.walk(top):
        names[:] = [n for n in names if Path(directory, n) != skip]
        for name in names + files:
            info = os.lstat(Path(directory, name))
            found[os.path.join(directory, name)] = (info.st_mode, info.st_uid, info.st_gid, info.st_ino, info.st_size)
    return found


def empty(directory):
    """Remove everything the attacker and the tool left in directory (as root)."""
    for entry in os.scandir(directory):
        if entry.is_dir(follow_symlinks=False):
            empty(entry.path)
            os.rmdir(entry.path)
        else:
            os.unlink(entry.path)


@pytest.fixture
def arena(attacker):
    """(the attacker's directory, a root-only 0600 file, a root directory holding a file named s.sock), all in a fresh home.

    Nothing in that home but the attacker's directory may change.
    """
    require_root()
    home = Path(tempfile.mkdtemp(prefix="t", dir=attacker.home))  # short: a socket path is at most 107 bytes
    home.chmod(0o755)
    directory = home / "attacker"
    directory.mkdir()
    os.chown(directory, attacker.uid, attacker.gid)
    target = home / "secret"
    target.write_text("root's own\n")
    target.chmod(0o600)
    victim = home / "victim"
    victim.mkdir()
    (victim / "s.sock").write_text("not a socket\n")
    before = snapshot(home, directory)
    yield directory, target, victim
    assert snapshot(home, directory) == before, "something outside the attacker's directory changed"


def untouched(target):
    """Whether the target is still root's, 0600; put back as it was if not."""
    info = os.stat(target)
    if (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o600, 0, 0):
        return True
    os.chown(target, 0, 0)
    os.chmod(target, 0o600)
    return False


def one_fatal_line(done):
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fdlaunch-listen: fatal: "), done.stderr
    return lines[0]


@pytest.mark.parametrize(
    "options, capabilities",
    [("shareddir", "all"), ("owner={uid},mode=0600,shareddir", "all"), ("owner={uid},mode=0600,shareddir", "without CAP_NET_ADMIN")],
    ids=["no owner or mode", "owner and mode", "owner and mode, without CAP_NET_ADMIN"],
)
def test_a_swap_racer_never_gets_roots_chmod_or_chown(attacker, arena, options, capabilities):
    """The socket is swapped for a symlink to a root-only file right after the bind: the file keeps its mode and owner."""
    directory, target, _ = arena
    path = directory / "s.sock"
    head = DROP_NET_ADMIN if capabilities != "all" else []
    argv = [*head, "fdlaunch-listen", f"-unix:{options.format(uid=attacker.uid)}:{path}", "true"]
    racer = Racer(attacker, "swap", str(directory), "s.sock", str(target))
    wins = 0
    try:
        for _ in range(ATTEMPTS):
            empty(directory)
            done = run(argv)
            if done.returncode != 0:  # the swap came before the check: refused; after it: the chmod went to the socket
                assert (done.returncode, one_fatal_line(done)) == (111, f"fdlaunch-listen: fatal: {REPLACED.format(path=path)}")
            wins += not untouched(target)
    finally:
        swaps = racer.stop()
    assert wins == 0, f"{wins} of {ATTEMPTS} runs changed the target ({swaps} swaps)"
    assert swaps > ATTEMPTS // 2, f"the racer swapped only {swaps} times in {ATTEMPTS} runs"


def test_mkdir_never_moves_a_symlink_someone_put_in_place_of_the_directory(attacker, arena):
    """The directory mkdir makes, swapped for a symlink to a root-only file: refused before it is made, as its parent is the attacker's."""
    directory, target, _ = arena
    path = directory / "sub" / "s.sock"
    racer = Racer(attacker, "swap", str(directory), "sub", str(target))
    wins = 0
    try:
        for _ in range(REFUSALS):
            empty(directory)
            done = run(["fdlaunch-listen", f"-unix:mkdir,shareddir:{path}", "true"])
            assert done.returncode == 100, done.stderr
            wins += not untouched(target)
    finally:
        swaps = racer.stop()
    assert wins == 0, f"{wins} of {REFUSALS} runs changed the target"
    assert swaps == 0, "nothing was made for the racer to swap"
    expected = (
        f"unable to create directory {path.parent}: its directory is writable by others (owner uid {attacker.uid}, mode 0755), "
        "who could replace it; as root a socket's path goes through directories only root can change"
    )
    assert one_fatal_line(done) == f"fdlaunch-listen: fatal: {expected}"


@pytest.mark.parametrize("options", ["mkdir", "mkdir,shareddir"])
def test_a_directory_the_attacker_made_first_in_a_sticky_directory_is_refused(attacker, arena, options):
    """mkdir in a /tmp-like directory, where the attacker made the socket's directory first and races in it."""
    sticky, target, _ = arena
    os.chown(sticky, 0, 0)
    sticky.chmod(0o1777)
    attacker.run(["mkdir", str(sticky / "app")], check=True)
    path = sticky / "app" / "s.sock"
    racer = Racer(attacker, "swap", str(sticky / "app"), "s.sock", str(target))
    wins = 0
    try:
        for _ in range(REFUSALS):
            empty(sticky / "app")
            done = run(["fdlaunch-listen", f"-unix:{options}:{path}", "true"])
            assert done.returncode == 100, done.stderr
            wins += not untouched(target)
    finally:
        swaps = racer.stop()
        empty(sticky)
    assert (wins, swaps) == (0, 0)
    expected = (
        f"unable to bind {path}: {path.parent} can be replaced by others, its directory being writable by them "
        "(owner uid 0, mode 1777); as root a socket's path goes through directories only root can change"
    )
    assert one_fatal_line(done) == f"fdlaunch-listen: fatal: {expected}"


def test_stale_socket_removal_never_follows_a_swapped_directory(attacker, arena):
    """The socket's directory flips between the attacker's (with a stale socket) and a symlink to root's: root's file stays."""
    directory, _, victim = arena
    precious = victim / "s.sock"
    stale = "import socket, sys; s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1])"
    attacker.run(["mkdir", str(directory / "sub")], check=True)
    attacker.run(["/usr/bin/python3", "-c", stale, str(directory / "sub" / "s.sock")], check=True)
    attacker.run(["ln", "-s", str(victim), str(directory / "other")], check=True)
    racer = Racer(attacker, "flip", str(directory), "sub", "other")
    wins = 0
    try:
        for _ in range(FLIPS):
            done = run(["fdlaunch-listen", f"-unix:shareddir:{directory}/sub/s.sock", "true"])
            assert done.returncode == 100, done.stderr
            if not precious.is_file():
                wins += 1
                for entry in victim.iterdir():
                    entry.unlink()
                precious.write_text("not a socket\n")
    finally:
        racer.stop()
        empty(directory)
    assert wins == 0, f"{wins} of {FLIPS} runs removed a file through the swapped directory"


def test_a_handoff_reload_never_gets_roots_chmod_for_a_swap_racer(attacker, arena, tmp_path):
    """fdlaunch-handoff --listen-from binds the same way at every reload: the socket swapped after each bind, the target stays."""
    directory, target, _ = arena
    path = directory / "s.sock"
    sockets = tmp_path / "sockets"
    keep = "-unix:label=keep:@fdlaunch-attack-keep-" + str(os.getpid())
    raced = [keep, f"-unix:label=raced,mode=0666,shareddir:{path}"]
    sockets.write_text(keep + "\n")
    upstream = Upstream(tmp_path)
    instance = ["sh", "-c", "fdlaunch-notify READY=1 && exec sleep 600"]
    handoff = subprocess.Popen(
        ["fdlaunch-handoff", f"--listen-from={sockets}", "--", *instance],
        env={**os.environ, "NOTIFY_SOCKET": upstream.path},
        stderr=subprocess.DEVNULL,
    )
    racer = None
    wins, attempts = 0, ATTEMPTS // 3
    try:
        upstream.wait_ready()
        racer = Racer(attacker, "swap", str(directory), "s.sock", str(target))
        for _ in range(attempts):
            for lines in (raced, [keep]):  # bind the raced socket anew, then let it go
                empty(directory)
                sockets.write_text("".join(line + "\n" for line in lines))
                handoff.send_signal(signal.SIGHUP)
                upstream.wait_ready()
                wins += not untouched(target)
        assert handoff.poll() is None
    finally:
        swaps = racer.stop() if racer else 0
        handoff.send_signal(signal.SIGTERM)
        try:
            handoff.wait(TIMEOUT)
        finally:
            handoff.kill()
            handoff.wait()
            upstream.sock.close()
    assert wins == 0, f"{wins} of {attempts} reloads changed the target ({swaps} swaps)"
    assert swaps > attempts // 2, f"the racer swapped only {swaps} times in {attempts} reloads"


@pytest.mark.parametrize(
    "owner, mode, shown",
    [
        ("attacker", 0o755, "owner uid {uid}, mode 0755"),
        ("root", 0o1777, "owner uid 0, mode 1777"),
        ("root", 0o775, "owner uid 0, mode 0775"),
    ],
    ids=["another owner", "sticky", "group-writable"],
)
def test_as_root_a_directory_others_can_write_is_refused_unless_the_spec_says_shareddir(attacker, tmp_path, owner, mode, shown):
    require_root()
    directory = tmp_path / "sockets"
    directory.mkdir()
    directory.chmod(mode)
    if owner == "attacker":
        os.chown(directory, attacker.uid, attacker.gid)
    path = directory / "s.sock"
    done = run(["fdlaunch-listen", f"-unix:mode=0660:{path}", "true"])
    expected = (
        f"unable to bind {path}: directory {directory} is writable by others ({shown.format(uid=attacker.uid)}); "
        "as root a socket goes in a directory only root can write, unless the spec says shareddir"
    )
    assert (done.returncode, one_fatal_line(done)) == (100, f"fdlaunch-listen: fatal: {expected}")
    assert list(directory.iterdir()) == []
    done = run(["fdlaunch-listen", f"-unix:mode=0660,shareddir:{path}", "true"])
    assert done.returncode == 0, done.stderr
    info = os.lstat(path)
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o660 and info.st_uid == 0


def test_a_symlink_only_root_could_have_made_is_followed(probe, tmp_path):
    require_root()
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    done, report = probe(["fdlaunch-listen", f"-unix:mode=0600:{tmp_path}/link/s.sock"])
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(os.lstat(tmp_path / "real" / "s.sock").st_mode) == 0o600
    assert report["fds"][3]["address"] == f"{tmp_path}/link/s.sock", "bound under the name asked for"


def test_a_symlink_in_a_directory_others_can_write_is_not_followed_even_with_shareddir(attacker, arena):
    directory, _, victim = arena
    attacker.run(["ln", "-s", str(victim), str(directory / "link")], check=True)
    path = directory / "link" / "s.sock"
    done = run(["fdlaunch-listen", f"-unix:shareddir:{path}", "true"])
    expected = (
        f"unable to bind {path}: not following symlink {directory}/link, in a directory others can write "
        f"(owner uid {attacker.uid}, mode 0755)"
    )
    assert (done.returncode, one_fatal_line(done)) == (100, f"fdlaunch-listen: fatal: {expected}")


def test_not_root_a_directory_others_can_write_is_taken(attacker, tmp_path):
    """The refusal guards root; a user binding in a /tmp-like directory is only at risk of itself."""
    sticky = attacker.home / f"sticky-{os.getpid()}"
    sticky.mkdir()
    sticky.chmod(0o1777)
    path = sticky / "s.sock"
    done = run(["fdlaunch-listen", f"-unix:mode=0600:{path}", "true"], user="nobody")
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    path.unlink()
    sticky.rmdir()
