"""docopt with the settings every chain loader needs.

options_first=True keeps the program's own options away from docopt, and a
DocoptExit (docopt's own exit 1) becomes a one-line UsageError (exit 100).
"""

import re
import sys

from docopt import DocoptExit, docopt

from fdlaunch import __version__
from fdlaunch.errors import Finished, UsageError


def parse(doc, argv, match=None):
    """Parse argv against doc's usage; doc is what --help prints.

    match, when given, is a docstring with the same Options section and a
    usage docopt can match; fdlaunch-listen needs one, since docopt cannot
    match 'SPEC... PROG' (its '...' is greedy and never backtracks).
    """
    try:
        options = docopt(match or doc, argv=argv, default_help=False, options_first=True)
    except DocoptExit as error:
        raise UsageError(f"{explain(error, argv)} (usage: {synopsis(doc)})") from None
    if options.get("--help"):
        sys.stdout.write(doc.strip() + "\n")
        raise Finished(0)
    if options.get("--version"):
        sys.stdout.write(f"fdlaunch {__version__}\n")
        raise Finished(0)
    return options


def synopsis(doc):
    """The usage lines of doc, joined on one line."""
    lines = doc.split("Usage:", 1)[1].strip().split("\n\n", 1)[0].splitlines()
    return " | ".join(line.strip() for line in lines)


def explain(error, argv):
    """Say what docopt disliked in one phrase."""
    first = str(error).splitlines()[0] if str(error) else ""
    # docopt-ng accepts an unknown option while reading argv and only
    # reports it as left unmatched; its repr is the one place that names it.
    unmatched = re.findall(r"Option\((?:'([^']*)'|None), (?:'([^']*)'|None)", first)
    if unmatched:
        short, long = unmatched[0]
        return f"unknown or repeated option {long or short!r}"
    if first and not first.startswith("Usage:") and "unmatched" not in first:
        return first.rstrip(".")
    return f"cannot make sense of {' '.join(argv)!r}"
