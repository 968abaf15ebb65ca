"""A tool's Options section read as a table, and argv's leading options checked against it.

Pure: text in, values out. The tool runtime (cli) uses it to name an option
that docopt would only fail to match, and, for the two usages docopt cannot
read, to read the options themselves (see cli).
"""

import functools
from collections import namedtuple

from fdlaunch.errors import UsageError

Option = namedtuple("Option", "name value default repeatable")
Option.__doc__ = """One entry of an Options section: the key docopt would give it; value None
(a flag), 'required' (--fd=N, -c N) or 'optional' (--vars[=PREFIX]); its
[default: X] or None; whether the usage repeats it ('[--limit=SPEC]...')."""


@functools.lru_cache(maxsize=16)
def options_of(doc):
    """Each spelling of each option in doc's Options section ('-v', '--verbose') -> its Option.

    Memoized (a pure function of doc): a server whose children run a link
    of ours reads that link's usage once (cli.read_ahead); callers never
    change the table.

    An entry starts on an indented line beginning with '-': its spellings,
    comma-separated, then two spaces and the description, which may go on
    over the lines that follow.
    """
    usage, _, section = doc.partition("\nOptions:")
    entries = []
    for line in section.splitlines():
        text = line.strip()
        if text.startswith("-") and line[:1].isspace():
            spellings, _, description = text.partition("  ")
            entries.append([spellings, description])
        elif entries and text:
            entries[-1][1] += " " + text
    table = {}
    for spellings, description in entries:
        words = [spelling_of(s.strip()) for s in spellings.split(",")]
        name = max((w[0] for w in words), key=lambda w: w.startswith("--"))
        value = next((w[1] for w in words if w[1]), None)
        default = description.partition("[default: ")[2].partition("]")[0] or None
        option = Option(name, value, default, f"[{spellings.split(', ')[-1]}]..." in usage)
        for spelling, _ in words:
            table[spelling] = option
    return table


def spelling_of(text):
    """('--fd', 'required') from '--fd=N' or '-c N'; ('--vars', 'optional') from '--vars[=PREFIX]'; ('-v', None) from '-v'."""
    for mark, value in (("[=", "optional"), ("=", "required"), (" ", "required")):
        if mark in text:
            return text.partition(mark)[0], value
    return text, None


def read_options(table, argv):
    """argv's leading options checked against table: ([(name, value)], the words after them).

    Options end at '--' (kept in the rest), at '-' or a number, or at the
    first word that is not an option, as docopt's options_first reads them.
    A long option may be a unique prefix of one (docopt allows it: '--dry'
    is '--dry-run'). A flag's value is True; an option with an optional
    value given bare is True too.
    """
    given, index = [], 0
    while index < len(argv) and is_option(argv[index]):
        word = argv[index]
        index += 1
        if word.startswith("--"):
            spelling, equals, value = word.partition("=")
            if spelling == "--":  # '--=x': no name at all, not a prefix of every option
                raise UsageError(f"unknown option {word!r}")
            option = long_option(table, spelling)
            if equals and option.value is None:
                raise UsageError(f"option {spelling!r} takes no value")
            if not equals and option.value == "required":
                if index == len(argv) or argv[index] == "--":
                    raise UsageError(f"option {spelling!r} needs a value")
                value, index = argv[index], index + 1
            given.append((option.name, value if equals or option.value == "required" else True))
            continue
        for at, letter in enumerate(word[1:], 1):
            option = table.get(f"-{letter}")
            if option is None:
                raise UsageError(f"unknown option '-{letter}'" + (f" in {word!r}" if len(word) > 2 else ""))
            if option.value is None:
                given.append((option.name, True))
                continue
            value = word[at + 1 :]
            if not value:
                if index == len(argv) or argv[index] == "--":
                    raise UsageError(f"option '-{letter}' needs a value")
                value, index = argv[index], index + 1
            given.append((option.name, value))
            break
    names = [name for name, _ in given]
    for name in names:
        if names.count(name) > 1 and not table[name].repeatable:
            raise UsageError(f"option {name!r} given more than once")
    return given, argv[index:]


def is_option(word):
    """Whether docopt reads word as an option: it starts with '-' and is not '--', '-' or a number."""
    if not word.startswith("-") or word in ("-", "--"):
        return False
    try:
        float(word)
        return False
    except ValueError:
        return True


def long_option(table, spelling):
    """The Option spelling names, exactly or as the one option it begins; else a UsageError naming it."""
    if spelling in table:
        return table[spelling]
    longs = sorted(s for s in table if s.startswith("--"))
    starting = [s for s in longs if s.startswith(spelling)]
    if len(starting) == 1:
        return table[starting[0]]
    if starting:
        raise UsageError(f"ambiguous option {spelling!r}: {' or '.join(starting)}?")
    near = near_miss(spelling, longs)
    raise UsageError(f"unknown option {spelling!r}" + (f", did you mean {near}?" if near else ""))


def near_miss(word, names):
    """The one name word is a likely typo of (one letter wrong, missing, extra or two swapped), or None."""
    near = [name for name in names if typo_of(word, name)]
    return near[0] if len(near) == 1 else None


def typo_of(word, name):
    if abs(len(word) - len(name)) > 1 or word == name:
        return False
    if len(word) == len(name):
        diff = [i for i, (a, b) in enumerate(zip(word, name, strict=True)) if a != b]
        swapped = len(diff) == 2 and diff[1] == diff[0] + 1 and word[diff[0]] == name[diff[1]] and word[diff[1]] == name[diff[0]]
        return len(diff) == 1 or swapped
    short, long = sorted((word, name), key=len)
    return any(long[:i] + long[i + 1 :] == short for i in range(len(long)))
