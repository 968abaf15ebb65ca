"""Each tool's --help usage is its man page SYNOPSIS, and the man pages lint clean."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import missing, run

from fdlaunch import cli

MAN = Path(__file__).resolve().parent.parent / "man"
TOOLS = list(cli.TOOLS)


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


def test_stdin_says_it_passes_the_listening_socket():
    """--stdin is inetd's 'wait' style (the program accepts), not one connection per program (issue 9)."""
    usage = run(["fdlaunch-fdmap", "--help"]).stdout
    page = (MAN / "fdlaunch-fdmap.1").read_text()
    option = page.split(".BI \\-\\-stdin= LABEL\nPut", 1)[1].split(".TP", 1)[0]
    assert "inetd style" not in usage and "inetd-style" not in page
    assert "'wait' style, the program accepts" in words(usage) and "fdlaunch-accept(1)" in usage
    assert "listening socket" in option and ".BR wait :" in option and ".BR fdlaunch-accept (1)" in option
    assert ".BR fdlaunch-accept (1)," in page.split(".SH SEE ALSO", 1)[1]


def test_every_console_script_is_a_tool_the_runtime_knows():
    """cli.TOOLS (what fusion, python -m fdlaunch and these tests go by) lists setup.cfg's console scripts."""
    text = (MAN.parent / "setup.cfg").read_text()
    scripts = dict(re.findall(r"^\s+(fdlaunch-[a-z-]+) = fdlaunch\.cmd\.([a-z_]+):main$", text, re.M))
    assert scripts == cli.TOOLS
