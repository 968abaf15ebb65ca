"""make install into a DESTDIR: the layout, the staged tools run by the interpreter
under test (as root and as nobody), and by a second Python version where one is
installed, the shipped systemd units, make uninstall."""

import glob
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import (
    PROBE,
    PYTHON,
    PYTHON_VERSION,
    TIMEOUT,
    console_scripts,
    free_port,
    http_get,
    interpreter,
    parse_probe,
    require,
    require_python_for_nobody,
    require_root,
    run,
)

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "/usr/local"
MAKE_TIMEOUT = 300  # pip may have to fetch setuptools and docopt-ng
# Where Pythons are installed besides the one under test: Debian's, built from source, pyenv's.
PYTHON_PLACES = ["/usr/bin/python3*", "/usr/local/bin/python3*", f"{os.environ.get('PYENV_ROOT', '~/.pyenv')}/versions/*/bin/python3"]


def make(*arguments, python=PYTHON, venv=sys.prefix, **kwargs):
    """make in the checkout for python, whose pip is the virtualenv venv's (the suite's own by default)."""
    return run(["make", "-C", str(ROOT), *arguments, f"PYTHON={python}", f"VENV={venv}"], timeout=MAKE_TIMEOUT, **kwargs)


def second_python():
    """An interpreter of a Python version the package supports other than the one under test, as
    (path, "X.Y"): FDLAUNCH_TEST_SECOND_PYTHON, else the first found in PYTHON_PLACES; None if there is none."""
    asked = os.environ.get("FDLAUNCH_TEST_SECOND_PYTHON")
    if asked:
        found = interpreter(asked)
        if found is None or found[1] == PYTHON_VERSION:
            pytest.fail(f"FDLAUNCH_TEST_SECOND_PYTHON={asked!r} is not a Python other than {PYTHON_VERSION}")
        return found
    for place in PYTHON_PLACES:
        for path in sorted(glob.glob(os.path.expanduser(place))):
            found = re.search(r"/python3(\.\d+)?$", path) and interpreter(path)
            if found and found[1] != PYTHON_VERSION and tuple(map(int, found[1].split("."))) >= (3, 11):
                return found
    return None


def listing(top):
    """Every path under top, without following links (and without bytecode caches others may write)."""
    found = set()
    for directory, subdirectories, files in os.walk(top):
        subdirectories[:] = [name for name in subdirectories if name != "__pycache__"]
        for name in subdirectories + files:
            found.add(os.path.relpath(os.path.join(directory, name), top))
    return found


def system_site_dirs(python):
    done = run([python, "-c", "import site; print('\\n'.join(site.getsitepackages()))"])
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def site_dir(python):
    """Where make install links the package: python's site directory under PREFIX, or, if it
    searches none there (a pyenv's), where its posix_prefix scheme puts one under PREFIX."""
    code = (
        "import site, sys, sysconfig; prefix = sys.argv[1]; scheme = {'base': prefix, 'platbase': prefix};"
        "print(next((d for d in site.getsitepackages() if d.startswith(prefix + '/lib/python')),"
        " sysconfig.get_path('purelib', 'posix_prefix', vars=scheme)))"
    )
    done = run([python, "-c", code, PREFIX])
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def system_state(python):
    """What a real install would touch: the prefix and the interpreter's site directories."""
    return {top: listing(top) for top in (PREFIX, *system_site_dirs(python))}


def staged_env(stage, **extra):
    """The staged bin, then the system's: no virtualenv on PATH."""
    return {"PATH": f"{stage}{PREFIX}/bin:/usr/bin:/bin", **extra}


def install(destdir, python=PYTHON, venv=sys.prefix):
    done = make("install", f"DESTDIR={destdir}", f"PREFIX={PREFIX}", python=python, venv=venv)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def public_tempdir():
    top = tempfile.mkdtemp(prefix="fdlaunch-install-", dir="/tmp")
    os.chmod(top, 0o755)  # the staged tree must be readable by nobody
    return top


@pytest.fixture(scope="module", params=["python-under-test", "second-python"])
def python(request):
    """The interpreter make install is given: the one under test, then another Python version's."""
    if request.param == "python-under-test":
        return PYTHON
    found = second_python()
    if found is None:
        pytest.skip(f"no Python 3.11 or later but {PYTHON_VERSION} in {', '.join(PYTHON_PLACES)}: set FDLAUNCH_TEST_SECOND_PYTHON")
    return found[0]


@pytest.fixture(scope="module")
def stage(python):
    """A DESTDIR that make install PYTHON=python filled; another version's pip is a new virtualenv's."""
    destdir = public_tempdir()
    venv = sys.prefix if python == PYTHON else tempfile.mkdtemp(prefix="fdlaunch-venv-")
    before = system_state(python)
    try:
        install(destdir, python, venv)
        assert system_state(python) == before, "make install DESTDIR=... created something outside DESTDIR"
        yield destdir
    finally:
        shutil.rmtree(destdir)
        if venv != sys.prefix:
            shutil.rmtree(venv)


def test_layout(stage, python):
    prefix = Path(stage + PREFIX)
    for tool in sorted(console_scripts()):
        script = prefix / "bin" / tool
        assert os.access(script, os.X_OK), tool
        assert script.read_text().startswith(f"#!{python}\n"), tool
        assert (prefix / "share/man/man1" / f"{tool}.1").is_file(), tool
    assert (prefix / "share/man/man7/fdlaunch.7").is_file()
    assert not (prefix / "local").exists(), "Debian's sysconfig scheme doubled /local"
    assert (prefix / "lib/fdlaunch/docopt/__init__.py").is_file()
    link = Path(stage + site_dir(python), "fdlaunch")
    assert link.is_symlink() and link.resolve() == (prefix / "lib/fdlaunch/fdlaunch").resolve(), link
    for directory in system_site_dirs(python):
        assert not Path(stage + directory, "docopt").exists(), directory
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
    for tool in sorted(console_scripts()):
        assert shutil.which(tool, path=staged_env(stage)["PATH"]) == f"{stage}{PREFIX}/bin/{tool}"
        helped = run([tool, "--help"], env=staged_env(stage))
        assert helped.returncode == 0 and "Usage:" in helped.stdout, (tool, helped.stderr)
        versioned = run([tool, "--version"], env=staged_env(stage))
        assert versioned.returncode == 0 and re.fullmatch(r"fdlaunch \S+\n", versioned.stdout), (tool, versioned.stderr)


def test_staged_tools_import_the_staged_package_without_scanning_metadata(stage, python):
    library = f"{stage}{PREFIX}/lib/fdlaunch"
    for tool in sorted(console_scripts()):
        done = run([python, "-v", "-X", "importtime", f"{stage}{PREFIX}/bin/{tool}", "--version"], env=staged_env(stage))
        assert done.returncode == 0, done.stderr
        imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
        assert not imported & {"importlib.metadata", "pkg_resources", "importlib_metadata"}, tool
        # -v names the file each module's code comes from: the staged, compiled copies
        loaded = re.findall(r"^# code object from '?([^' ]+)", done.stderr, re.M)
        ours = [path for path in loaded if re.search(r"/(fdlaunch|docopt)/", path)]
        assert ours and all(path.startswith(f"{library}/") and "/__pycache__/" in path for path in ours), (tool, ours)


def test_a_chain_from_the_staged_tree(stage, python):
    chain = ["fdlaunch-listen", "-tcp:label=web:127.0.0.1:0", "--", "fdlaunch-fdmap", "--vars", "--", python, PROBE, "-"]
    done = run(chain, env=staged_env(stage))
    assert done.returncode == 0, done.stderr
    report = parse_probe(done.stdout)
    assert report["fds"][3]["kind"] == "socket" and report["fds"][3]["listening"]
    assert report["env"]["FD_WEB"] == "3"


def test_a_staged_chain_starts_one_interpreter(stage):
    """make install's scripts are one text, each with its own module: a chain of them is fused (fdlaunch(7), FUSION)."""
    chain = ["fdlaunch-listen", "-tcp:127.0.0.1:0", "--", "fdlaunch-fdmap", "--vars", "--", "true"]
    for fuse, interpreters in (("1", 1), ("0", 2)):
        done = run(chain, env=staged_env(stage, PYTHONPROFILEIMPORTTIME="1", FDLAUNCH_FUSE=fuse))
        assert done.returncode == 0, done.stderr
        started = [line for line in done.stderr.splitlines() if line.startswith("import time:") and line.endswith("| site")]
        assert len(started) == interpreters, done.stderr


def test_a_staged_chain_runs_as_nobody(stage, python):
    """The tools run for any user who can read the tree and the interpreter: no venv."""
    require_python_for_nobody(python)
    drop = ["fdlaunch-setuidgid", "nobody", "--", "fdlaunch-fdmap", "--vars", "--", python, PROBE, "-"]
    done = run(["fdlaunch-listen", "-tcp:127.0.0.1:0", "--", *drop], env=staged_env(stage))
    assert done.returncode == 0, done.stderr
    report = parse_probe(done.stdout)
    assert report["uid"] == [65534, 65534, 65534]
    assert report["env"]["FD_TCP"] == "3"
    setpriv = require("setpriv")
    for tool in sorted(console_scripts()):
        done = run([setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups", tool, "--version"], env=staged_env(stage))
        assert done.returncode == 0, (tool, done.stderr)


def unit_fields(path):
    fields = {}
    for line in path.read_text().splitlines():
        key, equals, value = line.partition("=")
        if equals and not line.startswith("#"):
            fields[key.strip()] = value.strip()
    return fields


def staged_exec_start(stage, python, unit, port):
    """The unit's ExecStart=, run from the staged prefix by python, on a free port of the loopback."""
    words = []
    for word in shlex.split(unit["ExecStart"]):
        if word.startswith(f"{PREFIX}/"):
            word = stage + word
        elif word == "/usr/bin/python3":
            word = python
        elif word.startswith("-tcp"):
            word = re.sub(r":[^:]*:\d+$", f":127.0.0.1:{port}", word)
        words.append(word)
    return words


@pytest.mark.parametrize("name", sorted(path.name for path in (ROOT / "examples/systemd").glob("*.service")))
def test_shipped_unit_runs_from_the_staged_tree(stage, python, name):
    """As systemd would run it, with /usr/local being the staged copy: readiness, then an answer."""
    require_root()  # the units drop to nobody or bind as root
    unit = unit_fields(ROOT / "examples/systemd" / name)
    if "fdlaunch-setuidgid" in unit["ExecStart"]:
        require_python_for_nobody(python)
    port = free_port()
    command = staged_exec_start(stage, python, unit, port)
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
        env = staged_env(stage, NOTIFY_SOCKET=str(public / "notify"), PYTHONPATH=stage + site_dir(python))
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
    destdir = public_tempdir()
    try:
        # things that were there before, in the directories install also uses
        Path(destdir, "usr/local/bin").mkdir(parents=True)
        Path(destdir, "usr/local/bin/mytool").write_text("#!/bin/sh\n")
        Path(destdir, "usr/local/share/man/man7").mkdir(parents=True)
        Path(destdir, "usr/local/share/man/man7/other.7").write_text(".TH OTHER 7\n")
        before, system = listing(destdir), system_state(PYTHON)
        install(destdir)
        install(destdir)  # a second install replaces the first
        assert {"usr/local/bin/fdlaunch-listen", "usr/local/lib/fdlaunch"} <= listing(destdir)
        done = make("uninstall", f"DESTDIR={destdir}", f"PREFIX={PREFIX}")
        assert done.returncode == 0, done.stderr
        assert listing(destdir) == before
        again = make("uninstall", f"DESTDIR={destdir}", f"PREFIX={PREFIX}")
        assert again.returncode == 0 and "nothing installed" in again.stdout, again.stdout + again.stderr
        assert system_state(PYTHON) == system
    finally:
        shutil.rmtree(destdir)


def test_install_refuses_to_replace_a_package_it_did_not_install():
    """A foreign fdlaunch in the site directory is left alone, and so is everything else."""
    destdir = public_tempdir()
    try:
        site = site_dir(PYTHON)
        Path(destdir + site, "fdlaunch").mkdir(parents=True)
        before = listing(destdir)
        done = make("install", f"DESTDIR={destdir}", f"PREFIX={PREFIX}")
        assert done.returncode != 0
        assert f"{destdir}{site}/fdlaunch" in done.stderr and "make install did not make it" in done.stderr, done.stderr
        assert listing(destdir) == before
    finally:
        shutil.rmtree(destdir)


def test_a_plain_pip_install_gives_console_scripts_that_scan_no_metadata():
    """pyproject.toml: even a pip that would fall back to 'setup.py install' (Debian's 23.0, no
    wheel package) builds a wheel, whose scripts import their main directly."""
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
    destdir = public_tempdir()
    nowhere = tempfile.mkdtemp(prefix="fdlaunch-nowheels-", dir="/tmp")
    try:
        Path(destdir, "usr/local/bin").mkdir(parents=True)
        before = listing(destdir)
        offline = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": nowhere}
        done = make("install", f"DESTDIR={destdir}", f"PREFIX={PREFIX}", env=offline)
        assert done.returncode != 0, done.stdout
        assert "install: fatal: unable to install the package" in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert listing(destdir) == before
    finally:
        shutil.rmtree(destdir)
        shutil.rmtree(nowhere)
