"""python -m fdlaunch TOOL ARGS...: the same as running fdlaunch-TOOL ARGS..."""

import sys

from fdlaunch.cli import TOOLS


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    names = [name.removeprefix("fdlaunch-") for name in TOOLS]
    if not argv or argv[0] not in names:
        sys.stderr.write(f"fdlaunch: usage: python -m fdlaunch {{{'|'.join(names)}}} ARGS...\n")
        return 100
    module = TOOLS[f"fdlaunch-{argv[0]}"]
    __import__(f"fdlaunch.cmd.{module}")
    return sys.modules[f"fdlaunch.cmd.{module}"].main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
