"""Each tool's --help usage is its man page SYNOPSIS, and the man pages lint clean."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import missing, run

MAN = Path(__file__).resolve().parent.parent / "man"
TOOLS = ["fdlaunch-listen", "fdlaunch-setuidgid", "fdlaunch-notify-wait", "fdlaunch-notify", "fdlaunch-fdmap", "fdlaunch-handoff"]
TOOLS.append("fdlaunch-accept")


def words(text):
    return re.sub(r"\s+", " ", text).strip()


def synopsis_of_page(page):
    rendered = subprocess.run(["mandoc", "-Tascii", "-Owidth=300", str(page)], capture_output=True, text=True, check=True).stdout
    plain = re.sub(".\b", "", rendered)
    body = plain.split("SYNOPSIS", 1)[1].split("DESCRIPTION", 1)[0]
    return [words(line) for line in body.strip().splitlines()]


def usage_of_help(tool):
    done = run([tool, "--help"])
    assert done.returncode == 0
    usage = done.stdout.split("Usage:", 1)[1].split("\n\n", 1)[0]
    return [words(line) for line in usage.strip().splitlines()]


@pytest.mark.parametrize("tool", TOOLS)
def test_synopsis_matches_help(tool):
    if shutil.which("mandoc") is None:
        missing("mandoc")
    assert synopsis_of_page(MAN / f"{tool}.1") == usage_of_help(tool)


def test_every_console_script_has_a_page():
    setup = (MAN.parent / "setup.cfg").read_text()
    scripts = re.findall(r"^\s+(fdlaunch-[a-z-]+) =", setup, re.M)
    assert sorted(scripts) == sorted(TOOLS)
    for tool in scripts:
        assert (MAN / f"{tool}.1").exists()
    assert (MAN / "fdlaunch.7").exists()


def test_man_pages_lint_clean():
    if shutil.which("mandoc") is None:
        missing("mandoc")
    done = run(["mandoc", "-Tlint", "-W", "warning", *sorted(str(p) for p in MAN.iterdir())])
    assert done.returncode == 0, done.stdout + done.stderr
