"""Each tool's --help usage is its man page SYNOPSIS, and the man pages lint clean."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import console_scripts, missing, run

from fdlaunch import cli
from fdlaunch.text import usage

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
    scripts = console_scripts()
    assert sorted(scripts) == sorted(TOOLS)
    for tool in scripts:
        assert (MAN / f"{tool}.1").exists()
    assert (MAN / "fdlaunch.7").exists()


def test_man_pages_lint_clean():
    if shutil.which("mandoc") is None:
        missing("mandoc")
    done = run(["mandoc", "-Tlint", "-W", "warning", *sorted(str(p) for p in MAN.iterdir())])
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("tool", TOOLS)
def test_every_option_of_the_help_has_its_entry_in_the_man_page(tool):
    """A fact the page must state, not its sentences: each option --help lists is an entry of OPTIONS."""
    if shutil.which("mandoc") is None:
        missing("mandoc")
    module = __import__(f"fdlaunch.cmd.{cli.TOOLS[tool]}", fromlist=["__doc__"])
    rendered = subprocess.run(["mandoc", "-Tascii", "-Owidth=300", str(MAN / f"{tool}.1")], capture_output=True, text=True, check=True)
    section = re.sub(".\b", "", rendered.stdout).split("\nOPTIONS\n", 1)[1].split("\nENVIRONMENT\n", 1)[0]
    entries = {line.strip() for line in section.splitlines() if line.startswith("       -")}  # an entry's tag, at the first indent
    for spelling in usage.options_of(module.__doc__):
        assert any(re.match(rf"(.*, )?{re.escape(spelling)}([=, [ ]|$)", entry) for entry in entries), (spelling, sorted(entries))


def test_every_console_script_is_a_tool_the_runtime_knows():
    """cli.TOOLS (what fusion, python -m fdlaunch and these tests go by) lists setup.cfg's console scripts."""
    assert console_scripts() == cli.TOOLS
