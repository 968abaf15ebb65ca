"""make install into a DESTDIR: the layout, the staged tools run by the system's
interpreter (as root and as nobody), the shipped systemd units, make uninstall."""

import configparser
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import PROBE, TIMEOUT, free_port, http_get, missing, parse_probe, require, require_root, run

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "/usr/local"
PYTHON = "/usr/bin/python3"  # the Makefile's interpreter where it exists, and every user can run it
MAKE_TIMEOUT = 300  # pip may have to fetch setuptools and docopt-ng


def console_scripts():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["options.entry_points"]["console_scripts"].strip().splitlines()
    return sorted(line.split("=")[0].strip() for line in lines)


def make(*arguments):
    return run(["make", "-C", str(ROOT), *arguments], timeout=MAKE_TIMEOUT)


def listing(top):
    """Every path under top, without following links (and without bytecode caches others may write)."""
    found = set()
    for directory, subdirectories, files in os.walk(top):
        subdirectories[:] = [name for name in subdirectories if name != "__pycache__"]
        for name in subdirectories + files:
            found.add(os.path.relpath(os.path.join(directory, name), top))
    return found


def system_site_dirs():
    done = run([PYTHON, "-c", "import site; print('\\n'.join(site.getsitepackages()))"])
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def system_state():
    """What a real install would touch: the prefix and the interpreter's site directories."""
    return {top: listing(top) for top in (PREFIX, *system_site_dirs())}


def staged_env(stage, **extra):
    """The staged bin, then the system's: no virtualenv on PATH."""
    return {"PATH": f"{stage}{PREFIX}/bin:/usr/bin:/bin", **extra}


def install(destdir):
    done = make("install", f"DESTDIR={destdir}", f"PREFIX={PREFIX}")
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def public_tempdir():
    top = tempfile.mkdtemp(prefix="fdlaunch-install-", dir="/tmp")
    os.chmod(top, 0o755)  # the staged tree must be readable by nobody
    return top


@pytest.fixture(scope="module")
def stage():
    if not os.access(PYTHON, os.X_OK):
        missing(PYTHON)
    destdir = public_tempdir()
    before = system_state()
    try:
        install(destdir)
        assert system_state() == before, "make install DESTDIR=... created something outside DESTDIR"
        yield destdir
    finally:
        shutil.rmtree(destdir)


def test_layout(stage):
    prefix = Path(stage + PREFIX)
    for tool in console_scripts():
        script = prefix / "bin" / tool
        assert os.access(script, os.X_OK), tool
        assert script.read_text().startswith(f"#!{PYTHON}\n"), tool
        assert (prefix / "share/man/man1" / f"{tool}.1").is_file(), tool
    assert (prefix / "share/man/man7/fdlaunch.7").is_file()
    assert not (prefix / "local").exists(), "Debian's sysconfig scheme doubled /local"
    assert (prefix / "lib/fdlaunch/docopt/__init__.py").is_file()
    for site_dir in system_site_dirs():
        assert not Path(stage + site_dir, "docopt").exists(), site_dir
    for path in listing(stage):
        target = Path(stage, path)
        if target.is_file() and not target.is_symlink():
            assert stage.encode() not in target.read_bytes(), f"{path} names the DESTDIR"


def test_the_installed_package_is_the_checkout_s_package(stage):
    # setuptools builds in build/lib and keeps what an earlier build left there:
    # after a module moves, its old copy would be installed beside the new one.
    installed = {p for p in listing(f"{stage}{PREFIX}/lib/fdlaunch/fdlaunch") if p.endswith(".py")}
    checkout = {p for p in listing(ROOT / "fdlaunch") if p.endswith(".py")}
    assert installed == checkout


def test_staged_tools_answer_help_and_version(stage):
    for tool in console_scripts():
        assert shutil.which(tool, path=staged_env(stage)["PATH"]) == f"{stage}{PREFIX}/bin/{tool}"
        helped = run([tool, "--help"], env=staged_env(stage))
        assert helped.returncode == 0 and "Usage:" in helped.stdout, (tool, helped.stderr)
        versioned = run([tool, "--version"], env=staged_env(stage))
        assert versioned.returncode == 0 and re.fullmatch(r"fdlaunch \S+\n", versioned.stdout), (tool, versioned.stderr)


def test_staged_tools_import_the_staged_package_without_scanning_metadata(stage):
    library = f"{stage}{PREFIX}/lib/fdlaunch"
    for tool in console_scripts():
        done = run([PYTHON, "-v", "-X", "importtime", f"{stage}{PREFIX}/bin/{tool}", "--version"], env=staged_env(stage))
        assert done.returncode == 0, done.stderr
        imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
        assert not imported & {"importlib.metadata", "pkg_resources", "importlib_metadata"}, tool
        # -v names the file each module's code comes from: the staged, compiled copies
        loaded = re.findall(r"^# code object from '?([^' ]+)", done.stderr, re.M)
        ours = [path for path in loaded if re.search(r"/(fdlaunch|docopt)/", path)]
        assert ours and all(path.startswith(f"{library}/") and "/__pycache__/" in path for path in ours), (tool, ours)


def test_a_chain_from_the_staged_tree(stage):
    chain = ["fdlaunch-listen", "-tcp:label=web:127.0.0.1:0", "--", "fdlaunch-fdmap", "--vars", "--", PYTHON, PROBE, "-"]
    done = run(chain, env=staged_env(stage))
    assert done.returncode == 0, done.stderr
    report = parse_probe(done.stdout)
    assert report["fds"][3]["kind"] == "socket" and report["fds"][3]["listening"]
    assert report["env"]["FD_WEB"] == "3"


def test_a_staged_chain_runs_as_nobody(stage):
    """The tools run for any user who can read the tree: nothing under /root, no venv."""
    require_root()
    drop = ["fdlaunch-setuidgid", "nobody", "--", "fdlaunch-fdmap", "--vars", "--", PYTHON, PROBE, "-"]
    done = run(["fdlaunch-listen", "-tcp:127.0.0.1:0", "--", *drop], env=staged_env(stage))
    assert done.returncode == 0, done.stderr
    report = parse_probe(done.stdout)
    assert report["uid"] == [65534, 65534, 65534]
    assert report["env"]["FD_TCP"] == "3"
    setpriv = require("setpriv")
    for tool in console_scripts():
        done = run([setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups", tool, "--version"], env=staged_env(stage))
        assert done.returncode == 0, (tool, done.stderr)


def unit_fields(path):
    fields = {}
    for line in path.read_text().splitlines():
        key, equals, value = line.partition("=")
        if equals and not line.startswith("#"):
            fields[key.strip()] = value.strip()
    return fields


def staged_exec_start(stage, unit, port):
    """The unit's ExecStart=, run from the staged prefix, on a free port of the loopback."""
    words = []
    for word in shlex.split(unit["ExecStart"]):
        if word.startswith(f"{PREFIX}/"):
            word = stage + word
        elif word.startswith("-tcp"):
            word = re.sub(r":[^:]*:\d+$", f":127.0.0.1:{port}", word)
        words.append(word)
    return words


@pytest.mark.parametrize("name", sorted(path.name for path in (ROOT / "examples/systemd").glob("*.service")))
def test_shipped_unit_runs_from_the_staged_tree(stage, name):
    """As systemd would run it, with /usr/local being the staged copy: readiness, then an answer."""
    require_root()  # the units drop to nobody or bind as root
    unit = unit_fields(ROOT / "examples/systemd" / name)
    port = free_port()
    command = staged_exec_start(stage, unit, port)
    socket_unit = ROOT / "examples/systemd" / unit.get("Requires", name.replace(".service", ".socket"))
    if socket_unit.suffix == ".socket" and socket_unit.exists():
        activate = [require("systemd-socket-activate"), "-l", f"127.0.0.1:{port}"]
        activate += ["-E", "PATH", "-E", "NOTIFY_SOCKET", "-E", "PYTHONPATH"]  # it passes no other variable
        if "FileDescriptorName" in unit_fields(socket_unit):
            activate.append(f"--fdname={unit_fields(socket_unit)['FileDescriptorName']}")
        command = [*activate, *command]
    public = Path(public_tempdir())
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        upstream.bind(str(public / "notify"))
        upstream.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        upstream.settimeout(TIMEOUT)
        os.chmod(public / "notify", 0o777)  # as /run/systemd/notify: anyone may send
        # PYTHONPATH stands for the site directory a real install links the package into
        site_dir = next(d for d in system_site_dirs() if d.startswith(f"{PREFIX}/lib/"))
        env = staged_env(stage, NOTIFY_SOCKET=str(public / "notify"), PYTHONPATH=stage + site_dir)
        main = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            # a socket unit's service starts on the first connection (systemd-socket-activate waits for it)
            body = http_get(port, f"/{name}")
            assert re.match(rf"hello from pid {main.pid} on \S+, you asked for /{re.escape(name)}\n", body), body
            if unit.get("Type") == "notify":
                data, ancillary, _, _ = upstream.recvmsg(4096, socket.CMSG_SPACE(12))
                sender = int.from_bytes(ancillary[0][2][:4], "little")
                assert data.startswith(b"READY=1") and sender == main.pid, data
        finally:
            main.kill()
            _, errors = main.communicate(timeout=TIMEOUT)
        assert "Error" not in errors, errors
    finally:
        upstream.close()
        shutil.rmtree(public)


def test_uninstall_removes_exactly_what_install_put_there():
    if not os.access(PYTHON, os.X_OK):
        missing(PYTHON)
    destdir = public_tempdir()
    try:
        # things that were there before, in the directories install also uses
        Path(destdir, "usr/local/bin").mkdir(parents=True)
        Path(destdir, "usr/local/bin/mytool").write_text("#!/bin/sh\n")
        Path(destdir, "usr/local/share/man/man7").mkdir(parents=True)
        Path(destdir, "usr/local/share/man/man7/other.7").write_text(".TH OTHER 7\n")
        before, system = listing(destdir), system_state()
        install(destdir)
        install(destdir)  # a second install replaces the first
        assert {"usr/local/bin/fdlaunch-listen", "usr/local/lib/fdlaunch"} <= listing(destdir)
        done = make("uninstall", f"DESTDIR={destdir}", f"PREFIX={PREFIX}")
        assert done.returncode == 0, done.stderr
        assert listing(destdir) == before
        again = make("uninstall", f"DESTDIR={destdir}", f"PREFIX={PREFIX}")
        assert again.returncode == 0 and "nothing installed" in again.stdout, again.stdout + again.stderr
        assert system_state() == system
    finally:
        shutil.rmtree(destdir)


def test_install_refuses_to_replace_a_package_it_did_not_install():
    """A foreign fdlaunch in the site directory is left alone, and so is everything else."""
    if not os.access(PYTHON, os.X_OK):
        missing(PYTHON)
    destdir = public_tempdir()
    try:
        site_dir = next(d for d in system_site_dirs() if d.startswith(f"{PREFIX}/lib/"))
        Path(destdir + site_dir, "fdlaunch").mkdir(parents=True)
        before = listing(destdir)
        done = make("install", f"DESTDIR={destdir}", f"PREFIX={PREFIX}")
        assert done.returncode != 0
        assert f"{destdir}{site_dir}/fdlaunch" in done.stderr and "make install did not make it" in done.stderr, done.stderr
        assert listing(destdir) == before
    finally:
        shutil.rmtree(destdir)


def test_a_plain_pip_install_gives_console_scripts_that_scan_no_metadata():
    """pyproject.toml: even a pip that would fall back to 'setup.py install' (Debian's 23.0, no
    wheel package) builds a wheel, whose scripts import their main directly."""
    if not os.access(PYTHON, os.X_OK):
        missing(PYTHON)
    top = tempfile.mkdtemp(prefix="fdlaunch-pip-", dir="/tmp")
    try:
        assert run([PYTHON, "-m", "venv", f"{top}/venv"], timeout=MAKE_TIMEOUT).returncode == 0
        done = run([f"{top}/venv/bin/python", "-m", "pip", "install", str(ROOT)], timeout=MAKE_TIMEOUT)
        assert done.returncode == 0, done.stderr
        script = Path(top, "venv/bin/fdlaunch-listen").read_text()
        assert "importlib.metadata" not in script and "pkg_resources" not in script, script
        timed = run([f"{top}/venv/bin/python", "-X", "importtime", f"{top}/venv/bin/fdlaunch-listen", "--version"])
        assert timed.returncode == 0, timed.stderr
        assert "importlib.metadata" not in timed.stderr and "pkg_resources" not in timed.stderr
    finally:
        shutil.rmtree(top)


def test_a_failed_install_leaves_nothing_behind():
    """pip cannot fetch what the build needs: make install fails, and DESTDIR is as it was."""
    if not os.access(PYTHON, os.X_OK):
        missing(PYTHON)
    destdir = public_tempdir()
    nowhere = tempfile.mkdtemp(prefix="fdlaunch-nowheels-", dir="/tmp")
    try:
        Path(destdir, "usr/local/bin").mkdir(parents=True)
        before = listing(destdir)
        offline = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": nowhere}
        done = run(["make", "-C", str(ROOT), "install", f"DESTDIR={destdir}", f"PREFIX={PREFIX}"], timeout=MAKE_TIMEOUT, env=offline)
        assert done.returncode != 0, done.stdout
        assert "install: fatal: unable to install the package" in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert listing(destdir) == before
    finally:
        shutil.rmtree(destdir)
        shutil.rmtree(nowhere)
