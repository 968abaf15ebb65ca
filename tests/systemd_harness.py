"""A real systemd for the tests: PID 1 of private namespaces, in container mode, driven with systemctl.

systemd (Debian's 252 and later) runs as PID 1 of new pid, mount, uts, ipc
and cgroup namespaces, in a cgroup of its own, and is driven with
`nsenter ... systemctl`. The network namespace is the host's, so services
answer on 127.0.0.1, and the filesystem is the host's, so the tools, the
tests' scripts and files under /tmp are the same paths inside and out.

What keeps the host safe, by construction rather than by care:
- systemd loads units only from SYSTEMD_UNIT_PATH: a minimal set of our own
  (empty targets, and an exit path that unmounts nothing) and a private,
  empty /etc/systemd/system. Debian's units, which would run
  systemd-tmpfiles --remove (emptying the host's /tmp), sysctl and udev
  against the host, are never read; generators are hidden behind an empty
  directory. Systemd.loaded_units() lists what it did load.
- Inside, /run is a tmpfs, /etc and /var are overlays whose writes go to a
  tmpfs, /proc/sys, /proc/sysrq-trigger and /sys are read-only, /dev/console
  is /dev/null and /dev/kmsg is our log file; the mounts are private.
- The only cgroup hierarchy mounted inside is cgroup2, rooted at a cgroup
  of our own: the host's (v1 ones on a hybrid host included) are hidden.
- systemd's capability bounding set is systemd-nspawn's default set (no
  module loading, no clock, no network configuration: the network namespace
  is the host's); every service has LimitCORE=0, since the kernel's
  core_pattern may write a core file on the host's filesystem.

Stopping is `systemctl exit`, then SIGKILL to the namespace's PID 1 (which
takes everything in the namespace with it), then the cgroup is killed and
removed; a namespace whose test process died is killed with it (parent-death
signal), and its cgroup is removed by the next run.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SYSTEMD = ("/usr/lib/systemd/systemd", "/lib/systemd/systemd")
GENERATOR_DIRS = (
    "/usr/lib/systemd/system-generators",
    "/usr/local/lib/systemd/system-generators",
    "/etc/systemd/system-generators",
    "/usr/lib/systemd/system-environment-generators",
    "/usr/local/lib/systemd/system-environment-generators",
    "/etc/systemd/system-environment-generators",
)
# systemd-nspawn's default capability set; the others (sys_module, sys_time,
# net_admin, sys_rawio, syslog, ...) act on the host itself.
CAPABILITIES = (
    "audit_control audit_write chown dac_override dac_read_search fowner fsetid ipc_owner kill lease "
    "linux_immutable mknod net_bind_service net_broadcast net_raw setfcap setgid setpcap setuid "
    "sys_admin sys_boot sys_chroot sys_nice sys_ptrace sys_resource sys_tty_config"
).split()
CAP_SYS_ADMIN = 21
PREFIX = "fdlaunch-test-"  # of our cgroups: fdlaunch-test-<pid of the test run>-<random>
STATE_PREFIX = "/tmp/fdlaunch-systemd-"  # of our state directories: the same <random>
START_TIMEOUT = 15
STOP_TIMEOUT = 15
SYSTEMCTL_TIMEOUT = 30  # above the services' TimeoutStartSec= and TimeoutStopSec=

# The minimal unit set. Services and sockets pull in sysinit.target and
# order after basic.target and sockets.target; exit.target is what
# `systemctl exit` starts. Debian's systemd-exit.service also requires
# umount.target, which would unmount everything in the namespace: ours stops
# the services (they conflict with shutdown.target) and exits.
TARGETS = ("default", "multi-user", "basic", "sysinit", "sockets", "local-fs", "paths", "timers", "slices", "network")
EXIT_UNITS = {
    "shutdown.target": "[Unit]\nDescription=Shutdown\nDefaultDependencies=no\nRefuseManualStart=yes\n",
    "exit.target": "[Unit]\nDescription=Exit the container\nDefaultDependencies=no\n"
    "Requires=systemd-exit.service\nAfter=systemd-exit.service\nAllowIsolate=yes\n",
    "systemd-exit.service": "[Unit]\nDescription=Exit the container\nDefaultDependencies=no\n"
    "Requires=shutdown.target\nAfter=shutdown.target\nSuccessAction=exit-force\n",
}
# Every service: no core file, output to our log, bounded start and stop.
SERVICE_DEFAULTS = """[Service]
LimitCORE=0
StandardOutput=append:{log}
StandardError=append:{log}
TimeoutStartSec=15
TimeoutStopSec=15
"""

# Run as PID 1 of the new namespaces: $1 the state directory, $2 the unit
# directory, $3 the container name, then pairs of SOURCE TARGET to bind
# read-only (a staged /usr/local, say).
INIT = r"""
set -eu
state=$1 units=$2 name=$3
shift 3
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=0700 tmpfs "$state/layers"
for dir in etc var; do
    mkdir "$state/layers/$dir" "$state/layers/$dir.work"
    mount -t overlay overlay -o "lowerdir=/$dir,upperdir=$state/layers/$dir,workdir=$state/layers/$dir.work" "/$dir"
done
mkdir -p /etc/systemd/system
mount -t tmpfs -o mode=0755 tmpfs /etc/systemd/system
# Binding /sys over itself also hides the host's cgroup mounts under it: the
# cgroup2 mounted after it, rooted at our cgroup, is the only one systemd sees.
for path in /proc/sys /proc/sysrq-trigger /sys; do
    if [ -e "$path" ]; then
        mount --bind "$path" "$path"
        mount -o remount,bind,ro "$path"
    fi
done
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount --bind /dev/null /dev/console
mount --bind "$state/systemd.log" /dev/kmsg
for dir in $GENERATOR_DIRS; do
    if [ -d "$dir" ]; then mount --bind "$state/empty" "$dir"; fi
done
while [ $# -ge 2 ]; do
    mount --bind "$1" "$2"
    mount -o remount,bind,ro "$2"
    shift 2
done
exec setpriv --bounding-set="-all,$CAPABILITIES" -- env -i container="$name" SYSTEMD_UNIT_PATH="/etc/systemd/system:$units" \
    NOTIFY_SOCKET="$state/notify" "$SYSTEMD" --system --log-target=kmsg --log-level=info --show-status=no
"""


class Unavailable(Exception):
    """This machine cannot run systemd so: the reason."""


def systemd_binary():
    for path in SYSTEMD:
        if os.access(path, os.X_OK):
            return path
    raise Unavailable("systemd is not installed (.ci/run installs it)")


def has_cap_sys_admin():
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("CapEff:"))
    return bool(int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1)


def cgroup2_root():
    """Where this process's cgroup2 hierarchy is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified when hybrid)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        filesystem = fields[fields.index("-") + 1]
        if filesystem == "cgroup2" and fields[3] == "/":
            return Path(fields[4])
    raise Unavailable("no cgroup2 hierarchy is mounted (a pure or hybrid cgroup2 host is needed)")


def check_machine():
    """The systemd binary; Unavailable with the reason if this machine cannot run it here."""
    binary = systemd_binary()
    for program in ("systemctl", "unshare", "nsenter", "setpriv"):
        if shutil.which(program) is None:
            raise Unavailable(f"{program} is not installed (.ci/run installs it)")
    if not has_cap_sys_admin():
        raise Unavailable("needs CAP_SYS_ADMIN (root) to make namespaces and mount")
    if not os.access(cgroup2_root(), os.W_OK):
        raise Unavailable(f"{cgroup2_root()} is not writable: no cgroup of our own for systemd")
    return binary


def remove_cgroup(top, deadline):
    """Kill what is left in the cgroup top and remove it, its children first."""
    if not top.exists():
        return
    if (top / "cgroup.kill").exists():
        (top / "cgroup.kill").write_text("1")
    for directory in sorted((path for path in top.rglob("*") if path.is_dir()), key=lambda path: -len(path.parts)) + [top]:
        while True:
            try:
                directory.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:  # EBUSY while its killed processes are still being reaped
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)


def remove_stale(root):
    """The cgroups and state directories of earlier runs whose test process is gone (killed before its teardown)."""
    for directory in root.glob(f"{PREFIX}*"):
        match = re.fullmatch(rf"{PREFIX}(\d+)-(\w+)", directory.name)
        if match and not Path(f"/proc/{match[1]}").exists():
            remove_cgroup(directory, time.monotonic() + STOP_TIMEOUT)
            shutil.rmtree(f"{STATE_PREFIX}{match[2]}", ignore_errors=True)


def wait_until(condition, what, timeout=START_TIMEOUT, log=lambda: ""):
    """Poll condition() until it returns something true, which is returned; fail with what after timeout."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}, not within {timeout} s\n{log()}")
        time.sleep(0.02)
    return result


class Systemd:
    """systemd 252+ as PID 1 of private namespaces; start() it, stop() it (always)."""

    def __init__(self, binds=()):
        """binds: (source, target) directories bound read-only over target inside, such as a staged /usr/local."""
        self.binary = check_machine()
        self.cgroup_root = cgroup2_root()
        self.binds = list(binds)
        self.state = Path(tempfile.mkdtemp(prefix=os.path.basename(STATE_PREFIX), dir=os.path.dirname(STATE_PREFIX)))
        os.chmod(self.state, 0o755)  # services running as nobody read their scripts here
        self.name = f"{PREFIX}{os.getpid()}-{str(self.state).removeprefix(STATE_PREFIX)}"
        self.cgroup = self.cgroup_root / self.name
        self.units = self.state / "units"
        self.process = None
        self.pid1 = None

    # starting and stopping

    def start(self):
        remove_stale(self.cgroup_root)
        for directory in ("units", "units/service.d", "layers", "empty"):
            (self.state / directory).mkdir()
        (self.state / "systemd.log").touch()
        (self.state / "services.log").touch()
        for target in TARGETS:
            self.write_unit(f"{target}.target", f"[Unit]\nDescription={target}\n")
        for name, text in EXIT_UNITS.items():
            self.write_unit(name, text)
        self.write_unit("service.d/harness.conf", SERVICE_DEFAULTS.format(log=self.state / "services.log"))
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            notify.bind(str(self.state / "notify"))
            notify.settimeout(0.05)
            self.cgroup.mkdir()
            with (self.state / "init.log").open("w") as errors:
                environ = self.init_environ()
                self.process = subprocess.Popen(self.argv(), env=environ, stdin=subprocess.DEVNULL, stdout=errors, stderr=errors)
            self.wait_ready(notify)
        finally:
            notify.close()
        self.pid1 = self.find_pid1()
        return self

    def wait_ready(self, notify):
        """systemd tells its container manager READY=1 once it has started up; fail at once if it died."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                if b"READY=1" in notify.recv(4096).split(b"\n"):
                    return
            except TimeoutError:
                pass
            assert self.process.poll() is None, f"systemd exited with {self.process.returncode} before it was ready\n{self.log()}"
            assert time.monotonic() < deadline, f"systemd was not ready within {START_TIMEOUT} s\n{self.log()}"

    def argv(self):
        """Move into our cgroup (the new cgroup namespace's root), then unshare, and die with the test process."""
        into_cgroup = 'echo $$ > "$1" && shift && exec "$@"'
        unshare = ["unshare", "--pid", "--fork", "--kill-child=SIGKILL", "--mount", "--propagation", "private", "--mount-proc"]
        unshare += ["--uts", "--ipc", "--cgroup"]
        binds = [path for pair in self.binds for path in pair]
        init = ["/bin/sh", "-c", INIT, "init", str(self.state), str(self.units), self.name, *binds]
        return ["/bin/sh", "-c", into_cgroup, "sh", str(self.cgroup / "cgroup.procs"), "setpriv", "--pdeathsig=KILL", *unshare, *init]

    def init_environ(self):
        return {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "SYSTEMD": self.binary,
            "CAPABILITIES": ",".join(f"+{cap}" for cap in CAPABILITIES),
            "GENERATOR_DIRS": " ".join(GENERATOR_DIRS),
        }

    def find_pid1(self):
        """The host pid of the namespace's PID 1: unshare's only child."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        assert len(children) == 1, children
        return int(children[0])

    def stop(self):
        """systemctl exit; SIGKILL to PID 1 if it is not gone in time; the cgroup and our files removed."""
        deadline = time.monotonic() + STOP_TIMEOUT
        try:
            if self.process is not None and self.process.poll() is None and self.pid1 is not None:
                try:
                    self.nsenter(["systemctl", "exit"], timeout=STOP_TIMEOUT)
                    self.process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            if self.process is not None and self.process.poll() is None:
                if self.pid1 is not None:
                    os.kill(self.pid1, signal.SIGKILL)  # everything in the pid namespace dies with it
                self.process.kill()  # unshare, whose --kill-child takes PID 1 if it was not known yet
                self.process.wait(STOP_TIMEOUT)
        finally:
            remove_cgroup(self.cgroup, time.monotonic() + STOP_TIMEOUT)
            shutil.rmtree(self.state, ignore_errors=True)

    # driving it

    def nsenter(self, argv, timeout=SYSTEMCTL_TIMEOUT, cwd=None):
        """argv run inside all the namespaces of systemd but the network's (the host's anyway)."""
        enter = ["nsenter", "-t", str(self.pid1), "-m", "-u", "-i", "-p", "-C", f"--wd={cwd or '/'}"]
        environ = {"PATH": os.environ["PATH"], "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", "LANG": "C.UTF-8"}
        return subprocess.run([*enter, *argv], timeout=timeout, text=True, capture_output=True, env=environ)

    def systemctl(self, *arguments, check=True):
        done = self.nsenter(["systemctl", "--no-ask-password", *arguments])
        if check:
            assert done.returncode == 0, f"systemctl {' '.join(arguments)}: {done.returncode}\n{done.stdout}{done.stderr}\n{self.log()}"
        return done

    def show(self, unit, *properties):
        """{property: value} of systemctl show."""
        done = self.systemctl("show", f"--property={','.join(properties)}", unit)
        return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)

    def state_of(self, unit):
        """'active/running', 'inactive/dead', 'reloading/reload', ..."""
        fields = self.show(unit, "ActiveState", "SubState")
        return f"{fields['ActiveState']}/{fields['SubState']}"

    def main_pid(self, unit):
        """systemd's MainPID of unit, a pid in the namespace (0: none)."""
        return int(self.show(unit, "MainPID")["MainPID"])

    def write_unit(self, name, text):
        path = self.units / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        return path

    def wait_for_state(self, unit, wanted, timeout=START_TIMEOUT):
        """Wait until unit is in state wanted ('active/running'); fail at once if it failed."""

        def reached():
            now = self.state_of(unit)
            assert not now.startswith("failed/") or wanted.startswith("failed/"), f"{unit} is {now}\n{self.log()}"
            return now == wanted

        wait_until(reached, f"{unit} never {wanted} (now {self.state_of(unit)})", timeout, self.log)

    # processes

    def namespace_pids(self):
        """{host pid: namespace pid} of every process in the namespace."""
        ours = os.readlink(f"/proc/{self.pid1}/ns/pid")
        found = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") != ours:
                    continue
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue  # gone meanwhile
            nspid = re.search(r"^NSpid:\s+(.*)$", status, re.M)[1].split()
            found[int(entry)] = int(nspid[-1])
        return found

    def host_pid(self, ns_pid):
        """The host's pid of a process of the namespace (None if there is none)."""
        return next((host for host, inside in self.namespace_pids().items() if inside == ns_pid), None)

    def unit_processes(self, unit):
        """Host pids of every process in the unit's cgroup (in system.slice, the default), and below it."""
        top = self.cgroup / "system.slice" / unit
        pids = set()
        for procs in top.rglob("cgroup.procs") if top.exists() else ():
            try:
                pids.update(int(pid) for pid in procs.read_text().split())
            except FileNotFoundError:
                continue  # removed meanwhile
        return pids

    def uids(self, ns_pid):
        """The real, effective, saved and filesystem uids of a process of the namespace."""
        host = self.host_pid(ns_pid)
        assert host is not None, f"no pid {ns_pid} in the namespace"
        status = Path(f"/proc/{host}/status").read_text()
        return [int(uid) for uid in re.search(r"^Uid:\s+(.*)$", status, re.M)[1].split()]

    # what it did

    def loaded_units(self):
        """{unit: (load state, fragment path, drop-in paths)} of every unit systemd has loaded."""
        listed = self.systemctl("list-units", "--all", "--plain", "--no-legend", "--full").stdout
        names = [line.split()[0] for line in listed.splitlines() if line.strip()]
        shown = self.systemctl("show", "--property=Id,LoadState,FragmentPath,DropInPaths", "--", *names).stdout
        units = {}
        for block in shown.strip().split("\n\n"):
            fields = dict(line.split("=", 1) for line in block.splitlines())
            units[fields["Id"]] = (fields["LoadState"], fields["FragmentPath"], fields["DropInPaths"].split())
        return units

    def log(self):
        """systemd's own log and the services' output, for a failure's message."""
        parts = []
        for name in ("init.log", "systemd.log", "services.log"):
            path = self.state / name
            if path.exists():
                parts.append(f"--- {name}\n{path.read_text(errors='replace')[-6000:]}")
        return "\n".join(parts)
