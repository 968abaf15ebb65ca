"""python -m fdlaunch TOOL ARGS...: the same as running fdlaunch-TOOL ARGS..."""

import importlib
import sys

TOOLS = ("listen", "setuidgid", "notify-wait", "notify", "fdmap", "handoff")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in TOOLS:
        sys.stderr.write(f"fdlaunch: usage: python -m fdlaunch {{{'|'.join(TOOLS)}}} ARGS...\n")
        return 100
    module = importlib.import_module(f"fdlaunch.cmd.{argv[0].replace('-', '_')}")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
