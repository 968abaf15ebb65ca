"""Under a real systemd (tests/systemd_harness.py): the shipped units, and the tools in the units users write.

One systemd runs for the whole module, with /usr/local inside being a
`make install DESTDIR=...` staged tree, so units name /usr/local/bin/fdlaunch-*
as a user's do. Each test has units of its own names and stops them.
Pids systemd reports (MainPID) are pids of its namespace; so are those
hello_httpd answers with.
"""

import os
import re
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest
import systemd_harness
from conftest import TIMEOUT, cannot_run, free_port, http_get, missing
from systemd_harness import Systemd, wait_until
from test_examples import commands_beside
from test_foreground import NGINX_CONF
from test_handoff import HttpLoad
from test_install import PREFIX, PYTHON, install, public_tempdir

pytestmark = pytest.mark.systemd

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "examples" / "systemd"
HELLO = f"{PREFIX}/share/fdlaunch/examples/hello_httpd.py"
BIN = f"{PREFIX}/bin"
NOBODY = 65534


@pytest.fixture(scope="module")
def stage():
    """fdlaunch installed by make install into a staged tree, to be /usr/local inside the namespace."""
    if not Path(PYTHON).exists():
        missing(PYTHON)
    destdir = public_tempdir()
    try:
        install(destdir)
        yield destdir
    finally:
        shutil.rmtree(destdir)


@pytest.fixture(scope="module")
def systemd(request):
    try:
        systemd_harness.check_machine()  # before the staged install, which takes seconds
    except systemd_harness.Unavailable as reason:
        cannot_run(str(reason))
    stage = request.getfixturevalue("stage")
    manager = Systemd(binds=[(stage + PREFIX, PREFIX)])
    try:
        yield manager.start()
    finally:
        manager.stop()
    assert not manager.cgroup.exists(), "the cgroup is removed"
    assert process_gone(manager.pid1), "the namespace's PID 1 is gone"
    assert not manager.state.exists(), "the state directory is removed"


def unit_log(systemd, unit):
    """systemd's log lines about unit."""
    return [line for line in (systemd.state / "systemd.log").read_text().splitlines() if f" {unit}: " in line or f" {unit}." in line]


def stop_and_check_nothing_is_left(systemd, *units):
    """systemctl stop; every unit inactive, no process left in its cgroup."""
    systemd.systemctl("stop", *units)
    for unit in units:
        assert systemd.state_of(unit) == "inactive/dead", systemd.log()
        wait_until(lambda: not systemd.unit_processes(unit), f"processes of {unit} are left", log=systemd.log)  # noqa: B023
        assert not [line for line in unit_log(systemd, unit) if "remains running" in line], systemd.log()


def answer(port, path="/"):
    """One HTTP request: the body, or None if the connection was refused."""
    try:
        return http_get(port, path, seconds=0)
    except ConnectionRefusedError:
        return None


def answering_pid(body, label):
    match = re.match(rf"hello from pid (\d+) on {label}, you asked for ", body)
    assert match, body
    return int(match[1])


# The harness keeps systemd away from the host


def test_systemd_loads_no_unit_but_ours(systemd):
    """Debian's units (tmpfiles, sysctl, udev) would act on the host: nothing but our own is loaded."""
    ours = (str(systemd.units) + "/", "/etc/systemd/system/")  # the latter is a private tmpfs inside
    loaded = systemd.loaded_units()
    assert "init.scope" in loaded and "default.target" in loaded
    for unit, (state, fragment, dropins) in loaded.items():
        assert fragment == "" or fragment.startswith(ours), (unit, fragment)
        assert all(path.startswith(ours) for path in dropins), (unit, dropins)
        if unit.endswith((".service", ".socket", ".timer", ".path")):
            assert state == "not-found" or fragment.startswith(ours), (unit, state)


def inside(systemd, *argv):
    """The output of argv run in the namespace."""
    done = systemd.nsenter(list(argv))
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_namespace_cannot_write_to_the_host(systemd):
    paths = ["/run", "/etc", "/var", "/etc/systemd/system", "/sys/fs/cgroup", "/proc/sys", "/sys", PREFIX]
    look = "import os, sys; print(*('ro' if os.statvfs(p).f_flag & os.ST_RDONLY else 'rw' for p in sys.argv[1:]))"
    kinds = inside(systemd, "stat", "-f", "-c", "%T", *paths).split()
    modes = inside(systemd, "/usr/bin/python3", "-c", look, *paths).split()
    cgroup = inside(systemd, "ls", "/sys/fs/cgroup").split()
    seen = {path: (kind, mode) for path, kind, mode in zip(paths, kinds, modes, strict=True)}
    assert seen == {
        "/run": ("tmpfs", "rw"),
        "/etc": ("overlayfs", "rw"),
        "/var": ("overlayfs", "rw"),
        "/etc/systemd/system": ("tmpfs", "rw"),
        "/sys/fs/cgroup": ("cgroup2fs", "rw"),
        "/proc/sys": ("proc", "ro"),
        "/sys": ("sysfs", "ro"),
        PREFIX: (seen[PREFIX][0], "ro"),
    }
    assert "cgroup.procs" in cgroup and not {"systemd", "pids", "unified"} & set(cgroup), "no hierarchy of the host's is reachable"
    for directory in systemd_harness.GENERATOR_DIRS:
        if Path(directory).is_dir():
            assert inside(systemd, "ls", "-A", directory) == "", f"{directory} is hidden behind an empty one"
    capabilities = re.search(r"^CapBnd:\s+(\w+)$", Path(f"/proc/{systemd.pid1}/status").read_text(), re.M)[1]
    assert not int(capabilities, 16) & (1 << 16 | 1 << 25 | 1 << 12), "no sys_module, sys_time or net_admin"


# The shipped units, installed as their headers say


def entry_points():
    """The units whose header gives the commands that install and start them (the others come along)."""
    return sorted(path.name for path in EXAMPLES.iterdir() if any("systemctl start" in command for command in commands_beside(path)))


def test_every_shipped_unit_is_installed_by_some_header():
    copied = set()
    for name in entry_points():
        copy = commands_beside(EXAMPLES / name)[0]
        copied.update(copy.split("&&")[0].split()[1:-1])
    assert copied == {path.name for path in EXAMPLES.iterdir()}


def with_free_port(copy, port):
    """The user's copy of the units, on 127.0.0.1:port instead of the port they name."""
    for unit in copy.iterdir():
        text = unit.read_text()
        text, specs = re.subn(r"(-tcp:[^:\s]*):\S*", rf"\g<1>:127.0.0.1:{port}", text)
        text, streams = re.subn(r"^ListenStream=.*$", f"ListenStream=127.0.0.1:{port}", text, flags=re.M)
        assert specs + streams <= 1, unit
        unit.write_text(text)


@pytest.mark.parametrize("entry", entry_points())
def test_shipped_unit_installed_as_its_header_says(systemd, entry):
    """Copied to /etc/systemd/system and started with the header's own commands, with /usr/local the staged tree."""
    copy = Path(public_tempdir()) / "systemd"
    try:
        shutil.copytree(EXAMPLES, copy)
        port = free_port()
        with_free_port(copy, port)
        *commands, curl = commands_beside(copy / entry)
        assert re.fullmatch(r"curl http://127\.0\.0\.1(:8080)?/", curl), curl
        for command in commands:
            done = systemd.nsenter(["sh", "-c", command], cwd=copy)
            assert done.returncode == 0, f"{command}: {done.stdout}{done.stderr}\n{systemd.log()}"
        service = entry.replace(".socket", ".service")
        if entry.endswith(".socket"):
            assert systemd.state_of(entry) == "active/listening"
            assert systemd.state_of(service) == "inactive/dead", "nothing runs before the first request"
        pid = answering_pid(http_get(port, f"/{entry}"), "http")
        systemd.wait_for_state(service, "active/running")
        assert systemd.main_pid(service) == pid, "systemd's main pid is the daemon"
        assert systemd.host_pid(pid) in systemd.unit_processes(service)
        exec_start = next(line for line in (copy / service).read_text().splitlines() if line.startswith("ExecStart="))
        expected = NOBODY if "fdlaunch-setuidgid nobody" in exec_start else 0
        assert systemd.uids(pid) == [expected] * 4
        stop_and_check_nothing_is_left(systemd, *([service, entry] if entry != service else [service]))
    finally:
        shutil.rmtree(copy.parent)


# fdlaunch-notify-wait --forward


def test_notify_wait_forward_follows_the_main_pid_a_daemon_hands_to_its_worker(systemd):
    unit = "worker.service"
    systemd.write_unit(
        unit,
        f"[Service]\nType=notify\nExecStart={BIN}/fdlaunch-notify-wait --forward -- /usr/bin/python3 {HERE}/worker_daemon.py\n",
    )
    systemd.systemctl("daemon-reload")
    systemd.systemctl("start", unit)
    fields = systemd.show(unit, "MainPID", "StatusText", "NotifyAccess")
    main = int(fields["MainPID"])
    assert fields["NotifyAccess"] == "main", "the relay speaks as the main pid systemd knows, which NotifyAccess=main accepts"
    assert fields["StatusText"] == f"worker {main} serving", "systemd's main pid followed MAINPID= to the worker"
    status = Path(f"/proc/{systemd.host_pid(main)}/status").read_text()
    parent = int(re.search(r"^PPid:\s+(\d+)$", status, re.M)[1])
    assert parent in systemd.unit_processes(unit) and "worker_daemon.py" in Path(f"/proc/{parent}/cmdline").read_text()
    systemd.systemctl("kill", "--kill-whom=main", "--signal=SIGUSR1", unit)
    later = f"worker {main} status 1"
    wait_until(lambda: systemd.show(unit, "StatusText")["StatusText"] == later, "a later STATUS= never arrived", log=systemd.log)
    assert systemd.state_of(unit) == "active/running"
    stop_and_check_nothing_is_left(systemd, unit)


@pytest.mark.parametrize(("option", "how"), [("--upstart", "upstart"), ("--ready-fd=3", "fd 3")])
def test_a_daemon_that_never_heard_of_sd_notify_is_a_type_notify_service(systemd, option, how):
    """upstart's SIGSTOP, or s6's newline on its fd, is READY=1 with MAINPID= the daemon for a Type=notify unit."""
    unit = f"legacy-{how.split()[0]}.service"
    log = systemd.state / f"{unit}.log"
    daemon = f"/usr/bin/python3 {HERE}/legacy_daemon.py {log} {how}"
    systemd.write_unit(unit, f"[Service]\nType=notify\nExecStart={BIN}/fdlaunch-notify-wait --forward {option} -- {daemon}\n")
    systemd.systemctl("daemon-reload")
    systemd.systemctl("start", unit)  # returns once systemd has READY=1
    assert systemd.state_of(unit) == "active/running"
    main = systemd.host_pid(systemd.main_pid(unit))
    assert "legacy_daemon.py" in Path(f"/proc/{main}/cmdline").read_text(), "systemd's main pid is the daemon"
    said = "continued" if how == "upstart" else "ready"
    wait_until(lambda: said in log.read_text().splitlines(), f"the daemon never logged {said!r}", log=systemd.log)
    assert Path(f"/proc/{main}/status").read_text().count("TracerPid:\t0\n") == 1, "not traced once ready"
    stop_and_check_nothing_is_left(systemd, unit)
    assert log.read_text().splitlines()[-1] == "SIGTERM"


def test_foreground_forward_makes_the_daemon_that_forked_away_the_main_pid(systemd):
    """Type=notify around a daemon that double-forks: systemd's MainPID is the daemon, not fdlaunch-foreground."""
    unit = "forking.service"
    pidfile, log = systemd.state / "forking.pid", systemd.state / "forking.log"
    daemon = f"/usr/bin/python3 {HERE}/selfdaemon.py {log} --pidfile={pidfile}"
    systemd.write_unit(unit, f"[Service]\nType=notify\nExecStart={BIN}/fdlaunch-foreground --forward --pidfile={pidfile} -- {daemon}\n")
    systemd.systemctl("daemon-reload")
    systemd.systemctl("start", unit)
    assert systemd.main_pid(unit) == int(pidfile.read_text()), "systemd's main pid is the daemon"
    assert systemd.state_of(unit) == "active/running"
    stop_and_check_nothing_is_left(systemd, unit)
    assert log.read_text().splitlines()[-1] == "SIGTERM", "the daemon got systemd's SIGTERM"


def test_foreground_follows_nginx_through_its_binary_upgrade(systemd):
    """USR2 to the main pid (nginx starts a new master), QUIT to it (the old one quits): the unit stays up, on the new master."""
    directory = systemd.state / "nginx"
    directory.mkdir()
    directory.chmod(0o777)
    port, pidfile = free_port(), directory / "nginx.pid"
    (directory / "nginx.conf").write_text(NGINX_CONF.format(dir=directory, port=port))
    nginx = f"/usr/sbin/nginx -p {directory} -c {directory}/nginx.conf"
    unit = "nginx-upgrade.service"
    keep = f"{BIN}/fdlaunch-foreground -v --forward --pidfile={pidfile}"
    systemd.write_unit(unit, f"[Service]\nType=notify\nExecStart={keep} -- {BIN}/fdlaunch-setuidgid nobody -- {nginx}\n")
    systemd.systemctl("daemon-reload")
    systemd.systemctl("start", unit)
    old = systemd.main_pid(unit)
    assert old == int(pidfile.read_text()), "systemd's main pid is the master"
    systemd.systemctl("kill", "--kill-whom=main", "--signal=SIGUSR2", unit)
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip() not in ("", str(old)), "no new master", log=systemd.log)
    new = int(pidfile.read_text())
    systemd.systemctl("kill", "--kill-whom=main", "--signal=SIGQUIT", unit)
    wait_until(lambda: systemd.main_pid(unit) == new, "systemd's main pid is not the new master", log=systemd.log)
    wait_until(lambda: systemd.host_pid(old) is None, "the old master never quit", log=systemd.log)
    assert systemd.state_of(unit) == "active/running"
    assert answer(port).startswith("hello from pid "), "the new master serves"
    stop_and_check_nothing_is_left(systemd, unit)


def test_watchdog_pings_are_relayed_and_a_daemon_that_stops_pinging_is_restarted(systemd):
    unit = "watchdog.service"
    systemd.write_unit(
        unit,
        "[Service]\nType=notify\nWatchdogSec=1\nRestart=on-watchdog\nRestartSec=0.1\n"
        f"ExecStart={BIN}/fdlaunch-notify-wait --forward -- /usr/bin/python3 {HERE}/watchdog_daemon.py\n",
    )
    core_before = Path("/core").exists()
    systemd.systemctl("daemon-reload")
    systemd.systemctl("start", unit)
    first = systemd.main_pid(unit)

    def pinged_since(start):
        return lambda: int(systemd.show(unit, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]) > start

    # Pinged for more than twice WatchdogSec: without the relay systemd would have restarted it by then.
    began = int(systemd.show(unit, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"])
    wait_until(pinged_since(began + 2_500_000), "the pings did not go on for 2.5 s", timeout=10, log=systemd.log)
    assert systemd.show(unit, "NRestarts", "MainPID") == {"NRestarts": "0", "MainPID": str(first)}
    systemd.systemctl("kill", "--kill-whom=main", "--signal=SIGUSR1", unit)
    wait_until(lambda: systemd.show(unit, "NRestarts")["NRestarts"] == "1", "not restarted once silent", timeout=10, log=systemd.log)
    systemd.wait_for_state(unit, "active/running")
    second = systemd.main_pid(unit)
    assert second != first
    assert any("Watchdog timeout" in line for line in unit_log(systemd, unit)), systemd.log()
    restarted = int(systemd.show(unit, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"])
    wait_until(pinged_since(restarted), "the new instance's pings are not relayed", timeout=5, log=systemd.log)
    stop_and_check_nothing_is_left(systemd, unit)
    assert Path("/core").exists() == core_before, "the killed daemon dumped no core on the host"


# fdlaunch-handoff: the reload unit users write by habit


def tcp(label, port):
    return f"-tcp:label={label}:127.0.0.1:{port}"


def write_sockets(path, lines):
    """Replace the --listen-from file whole, as fdlaunch-handoff(1) says to."""
    partial = path.with_suffix(".new")
    partial.write_text("".join(line + "\n" for line in lines))
    partial.rename(path)


def wait_served_on(systemd, unit, port, label):
    """The pid of the instance answering on port, once one does; fail at once if the unit went down."""

    def served():
        state = systemd.state_of(unit)
        assert state.split("/")[0] in ("active", "reloading"), f"{unit} went {state}\n{systemd.log()}"
        body = answer(port)
        return body and answering_pid(body, label)

    return wait_until(served, f"nobody answers on {port}", log=systemd.log)


def habitual_reload_unit(systemd, unit, options, sockets, warmup="0.3", extra=""):
    """Type=notify, ExecReload=kill -HUP $MAINPID; sockets bound as root, instances as nobody."""
    web = free_port()
    handoff = " ".join([f"{BIN}/fdlaunch-handoff", *options.split(), f"--listen-from={sockets}"])
    daemon = f"{BIN}/fdlaunch-setuidgid nobody -- /usr/bin/python3 {HELLO} {warmup}"
    systemd.write_unit(
        unit,
        f"[Service]\nType=notify\n{extra}ExecStart={BIN}/fdlaunch-listen {tcp('web', web)} -- {handoff} -- {daemon}\n"
        "ExecReload=/bin/kill -HUP $MAINPID\n",
    )
    systemd.systemctl("daemon-reload")
    return web


@pytest.mark.parametrize(
    "options, extra", [("", ""), ("--respawn --main-pid=self", "NotifyAccess=all\n")], ids=["default", "respawn-notifyaccess-all"]
)
def test_three_reloads_under_load_fail_no_request_and_bring_in_the_changed_socket_set(systemd, options, extra):
    unit = f"habitual-{'all' if extra else 'default'}.service"
    sockets = systemd.state / f"{unit}.sockets"
    ports = [free_port() for _ in range(4)]
    write_sockets(sockets, [tcp("p0", ports[0])])
    web = habitual_reload_unit(systemd, unit, options, sockets, extra=extra)
    load = None
    try:
        systemd.systemctl("start", unit)
        main = systemd.main_pid(unit)  # fdlaunch-handoff, which ExecReload's SIGHUP must reach
        first = wait_served_on(systemd, unit, ports[0], "p0")
        assert systemd.uids(first) == [NOBODY] * 4 and systemd.uids(main)[0] == 0
        load = HttpLoad(web)
        serving = [first]
        for reload in (1, 2, 3):
            # each reload adds a port and drops the oldest
            write_sockets(sockets, [tcp(f"p{reload - 1}", ports[reload - 1]), tcp(f"p{reload}", ports[reload])])
            systemd.systemctl("reload", unit)
            pid = wait_served_on(systemd, unit, ports[reload], f"p{reload}")
            assert pid not in serving, "a new instance serves the added port"
            serving.append(pid)
            systemd.wait_for_state(unit, "active/running")
            assert systemd.main_pid(unit) == main
            assert systemd.host_pid(main) in systemd.unit_processes(unit), "MainPID is a live process of the unit"
        wait_until(lambda: answer(ports[0]) is None, "the dropped port still answers", log=systemd.log)
        load.stop()
        assert load.failures == [], load.failures
        assert serving[-1] in load.pids, "the load reached the last instance"
        stop_and_check_nothing_is_left(systemd, unit)
        assert all(answer(port) is None for port in [web, *ports])
    finally:
        if load:
            load.stop()
        systemd.systemctl("stop", unit, check=False)


def test_a_unit_stopped_during_a_handoff_leaves_no_process(systemd):
    """KillMode=mixed: SIGTERM goes to fdlaunch-handoff alone, which must stop both instances itself."""
    unit = "handoff-stop.service"
    warmup = systemd.state / "warmup"
    warmup.write_text("0")
    port = free_port()
    daemon = f"/bin/sh -c 'exec /usr/bin/python3 {HELLO} \"$$(cat {warmup})\"'"
    systemd.write_unit(
        unit,
        f"[Service]\nType=notify\nKillMode=mixed\nExecStart={BIN}/fdlaunch-listen {tcp('web', port)} -- "
        f"{BIN}/fdlaunch-handoff --main-pid=self -- {daemon}\nExecReload=/bin/kill -HUP $MAINPID\n",
    )
    systemd.systemctl("daemon-reload")
    systemd.systemctl("start", unit)
    first = wait_served_on(systemd, unit, port, "web")
    warmup.write_text("60")  # the next instance never becomes ready
    systemd.systemctl("reload", "--no-block", unit)  # the reload job would wait for a READY=1 that never comes
    # fdlaunch-handoff, its guard, the old instance and the new one
    wait_until(lambda: len(systemd.unit_processes(unit)) == 4, "the new instance never started", log=systemd.log)
    assert answering_pid(http_get(port), "web") == first, "the old instance serves while the new one starts"
    started = time.monotonic()
    stop_and_check_nothing_is_left(systemd, unit)
    assert time.monotonic() - started < 10, "stopped well before TimeoutStopSec"
    assert not [line for line in unit_log(systemd, unit) if "SIGKILL" in line], "systemd had nothing left to kill"


def instance_of(systemd, unit, script):
    """The host pid of the unit's one process that runs script (its argv[1]), not of those that were handed its name."""
    found = [pid for pid in systemd.unit_processes(unit) if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1].endswith(script)]
    assert len(found) == 1, found
    return found[0]


def test_handoff_respawns_a_crashed_daemon_and_systemd_sees_no_restart(systemd):
    unit = "respawn.service"
    sockets = systemd.state / f"{unit}.sockets"
    port = free_port()
    write_sockets(sockets, [tcp("p0", port)])
    habitual_reload_unit(systemd, unit, "--respawn", sockets)
    try:
        systemd.systemctl("start", unit)
        main = systemd.main_pid(unit)
        first = wait_served_on(systemd, unit, port, "p0")
        os.kill(systemd.host_pid(first), signal.SIGKILL)
        wait_until(lambda: (body := answer(port)) is not None and answering_pid(body, "p0") != first, "no replacement", log=systemd.log)
        shown = systemd.show(unit, "NRestarts", "MainPID", "ActiveState")
        assert shown == {"NRestarts": "0", "MainPID": str(main), "ActiveState": "active"}
        stop_and_check_nothing_is_left(systemd, unit)
    finally:
        systemd.systemctl("stop", unit, check=False)


def test_watchdog_through_handoff_restarts_a_unit_whose_daemon_stops_pinging(systemd):
    unit = "watchdog-handoff.service"
    systemd.write_unit(
        unit,
        "[Service]\nType=notify\nWatchdogSec=1\nRestart=on-watchdog\nRestartSec=0.1\n"
        f"ExecStart={BIN}/fdlaunch-handoff -- /usr/bin/python3 {HERE}/watchdog_daemon.py\n",
    )
    systemd.systemctl("daemon-reload")
    try:
        systemd.systemctl("start", unit)
        first = systemd.main_pid(unit)
        began = int(systemd.show(unit, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"])
        pinged = lambda: int(systemd.show(unit, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]) > began + 2_500_000
        wait_until(pinged, "the serving instance's pings did not go through handoff for 2.5 s", timeout=10, log=systemd.log)
        assert systemd.show(unit, "NRestarts")["NRestarts"] == "0"
        os.kill(instance_of(systemd, unit, b"watchdog_daemon.py"), signal.SIGUSR1)  # silenced: it hangs, as far as anyone can tell
        wait_until(lambda: systemd.show(unit, "NRestarts")["NRestarts"] == "1", "not restarted once silent", timeout=10, log=systemd.log)
        systemd.wait_for_state(unit, "active/running")
        assert systemd.main_pid(unit) != first
        assert any("Watchdog timeout" in line for line in unit_log(systemd, unit)), systemd.log()
        stop_and_check_nothing_is_left(systemd, unit)
    finally:
        systemd.systemctl("stop", unit, check=False)


# fdlaunch-accept behind a socket unit


def listening_inode(port):
    """The inode of the socket listening on 127.0.0.1:port, from /proc/net/tcp (the network namespace is shared)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":
            return int(fields[9])
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


@pytest.mark.parametrize("through", ["", f"{BIN}/fdlaunch-fdmap --map --"], ids=["direct", "fdmap"])
def test_accept_serves_the_socket_of_a_socket_unit(systemd, through):
    name = "greet-fdmap" if through else "greet"
    port = free_port()
    systemd.write_unit(f"{name}.socket", f"[Socket]\nListenStream=127.0.0.1:{port}\nAccept=no\nFileDescriptorName=greet\n")
    handler = "/bin/sh -c 'echo \"hello $$TCPREMOTEIP, this is $$(id -un)\"'"  # $$: a $ systemd leaves alone
    accept = f"{through} {BIN}/fdlaunch-accept --label=greet -- {handler}".strip()
    systemd.write_unit(f"{name}.service", f"[Service]\nType=notify\nExecStart={BIN}/fdlaunch-setuidgid nobody -- {accept}\n")
    systemd.systemctl("daemon-reload")
    systemd.systemctl("start", f"{name}.socket")
    assert systemd.state_of(f"{name}.service") == "inactive/dead"
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as client:
            reply = b""
            while chunk := client.recv(4096):
                reply += chunk
        assert reply == b"hello 127.0.0.1, this is nobody\n"
    systemd.wait_for_state(f"{name}.service", "active/running")
    main = systemd.main_pid(f"{name}.service")
    assert systemd.uids(main) == [NOBODY] * 4
    held = {os.readlink(f"/proc/{systemd.host_pid(main)}/fd/{fd}") for fd in os.listdir(f"/proc/{systemd.host_pid(main)}/fd")}
    assert f"socket:[{listening_inode(port)}]" in held, "the main process is the one serving the socket systemd opened"
    stop_and_check_nothing_is_left(systemd, f"{name}.service", f"{name}.socket")


# The harness itself


def test_two_at_once_do_not_collide_and_leave_nothing_behind():
    """Two more, as two test runs would start them, each with a service of the same name, stopped with it running."""
    try:
        managers = [Systemd(), Systemd()]
    except systemd_harness.Unavailable as reason:
        cannot_run(str(reason))
    sleepers = []
    try:
        for manager in managers:
            manager.start()
            manager.write_unit("sleeper.service", "[Service]\nExecStart=/bin/sleep 600\n")
            manager.systemctl("start", "sleeper.service")
            sleepers.append(manager.host_pid(manager.main_pid("sleeper.service")))
        assert None not in sleepers and sleepers[0] != sleepers[1]
        assert managers[0].unit_processes("sleeper.service") == {sleepers[0]}
        assert managers[1].unit_processes("sleeper.service") == {sleepers[1]}
    finally:
        for manager in managers:
            manager.stop()
    for manager, sleeper in zip(managers, sleepers, strict=True):
        assert process_gone(sleeper) and process_gone(manager.pid1)
        assert not manager.cgroup.exists() and not manager.state.exists()


def process_gone(pid):
    """No such process, or only a zombie for its parent to reap (this machine's init may reap late)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
