"""The README demo, run as the README runs it."""

import re
import sys
from pathlib import Path

from conftest import free_port, run

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_demo_daemon_answers_through_fdlaunch_listen():
    port = free_port()
    done = run(
        ["sh", str(EXAMPLES / "demo.sh")], env={"PATH": __import__("os").environ["PATH"], "PORT": str(port), "PYTHON": sys.executable}
    )
    assert done.returncode == 0, done.stderr
    assert f"fdlaunch-listen: info: fd 3: tcp 127.0.0.1:{port}/tcp, label http" in done.stderr
    answer = re.search(r"hello from pid (\d+) on http, you asked for /demo\n\(fdlaunch-listen started as pid (\d+)", done.stdout)
    assert answer, done.stdout
    assert answer[1] == answer[2]
