"""Reading argv: our Options reader, the docopt-ng behaviour the runtime relies on, one usage grammar."""

import inspect

import pytest
from conftest import run
from docopt import DocoptExit, docopt

from fdlaunch import cli
from fdlaunch.errors import BadCall, UsageError
from fdlaunch.text import usage

DOC = """fdlaunch-x: a tool to read.

Usage:
  fdlaunch-x [options] [--limit=SPEC]... [--] PROG [ARGS...]
  fdlaunch-x (-h | --help | --version)

Options:
  --map          A flag.
  --dry-run      Another flag.
  --fd=N         A value [default: 3].
  -c N           A short option with a value.
  --limit=SPEC   Repeatable.
  --vars[=PREFIX]  An optional value, described
                 over two lines.
  -v, --verbose  Say more.
  -h, --help     Print this help.
  --version      Print the version.
"""


def test_options_of_reads_every_spelling():
    table = usage.options_of(DOC)
    assert table["--map"] == usage.Option("--map", None, None, False)
    assert table["--fd"] == usage.Option("--fd", "required", "3", False)
    assert table["-c"] == usage.Option("-c", "required", None, False)
    assert table["--limit"] == usage.Option("--limit", "required", None, True)
    assert table["--vars"] == usage.Option("--vars", "optional", None, False)
    assert table["-v"] is table["--verbose"] and table["-v"].name == "--verbose"
    assert sorted(table) == ["--dry-run", "--fd", "--help", "--limit", "--map", "--vars", "--verbose", "--version", "-c", "-h", "-v"]


@pytest.mark.parametrize(
    "argv, given, rest",
    [
        ([], [], []),
        (["--map", "prog", "--map"], [("--map", True)], ["prog", "--map"]),
        (["--fd=4"], [("--fd", "4")], []),
        (["--fd", "5", "prog"], [("--fd", "5")], ["prog"]),
        (["-vc5", "prog"], [("--verbose", True), ("-c", "5")], ["prog"]),
        (["-c", "-v", "prog"], [("-c", "-v")], ["prog"]),
        (["--vars"], [("--vars", True)], []),
        (["--vars=X", "prog"], [("--vars", "X")], ["prog"]),
        (["--limit=a", "--limit=b", "--", "-x"], [("--limit", "a"), ("--limit", "b")], ["--", "-x"]),
        (["--dry", "-", "x"], [("--dry-run", True)], ["-", "x"]),
        (["-5", "x"], [], ["-5", "x"]),
    ],
)
def test_read_options(argv, given, rest):
    assert usage.read_options(usage.options_of(DOC), argv) == (given, rest)


@pytest.mark.parametrize(
    "argv, reason",
    [
        (["--bogus", "prog"], "unknown option '--bogus'"),
        (["--mpa", "prog"], "unknown option '--mpa', did you mean --map?"),
        (["--verbsoe", "prog"], "unknown option '--verbsoe', did you mean --verbose?"),
        (["--maps", "prog"], "unknown option '--maps', did you mean --map?"),
        (["--ver", "prog"], "ambiguous option '--ver': --verbose or --version?"),
        (["-x", "prog"], "unknown option '-x'"),
        (["-vx", "prog"], "unknown option '-x' in '-vx'"),
        (["--map=1", "prog"], "option '--map' takes no value"),
        (["--=1", "prog"], "unknown option '--=1'"),
        (["--=", "prog"], "unknown option '--='"),
        (["--fd"], "option '--fd' needs a value"),
        (["--fd", "--", "prog"], "option '--fd' needs a value"),
        (["-c"], "option '-c' needs a value"),
        (["--fd=1", "--fd=2", "prog"], "option '--fd' given more than once"),
        (["-v", "--verbose", "prog"], "option '--verbose' given more than once"),
    ],
)
def test_read_options_refuses(argv, reason):
    with pytest.raises(UsageError) as refused:
        usage.read_options(usage.options_of(DOC), argv)
    assert str(refused.value) == reason


def test_read_gives_docopts_shape():
    options = cli.read(DOC, ["-v", "--limit=a", "--vars", "--", "prog", "-x"])
    assert options == {
        "--map": False,
        "--dry-run": False,
        "--fd": "3",
        "-c": None,
        "--limit": ["a"],
        "--vars": True,
        "--verbose": True,
        "--help": False,
        "--version": False,
        "PROG": "prog",
        "ARGS": ["-x"],
        "GIVEN": {"--verbose", "--limit", "--vars"},  # --fd has its default: not given
    }


def test_a_refusal_names_the_first_usage_form():
    with pytest.raises(
        UsageError, match=r"^unknown option '--bogus' \(usage: fdlaunch-x \[options\] \[--limit=SPEC\]\.\.\. \[--\] PROG \[ARGS\.\.\.\]\)$"
    ):
        cli.parse(DOC, ["--bogus", "prog"])
    with pytest.raises(BadCall, match=r"^fdlaunch-x \[options\]"):
        cli.parse(DOC, ["--map"])


@pytest.mark.parametrize("tool", cli.TOOLS)
def test_every_option_of_a_usage_is_in_its_options_section(tool):
    """The reader knows only the Options section: an option named only in the usage would be refused."""
    doc = cli.load(cli.TOOLS[tool]).__doc__
    forms = doc.split("Usage:", 1)[1].split("\n\n", 1)[0]
    named = {word.strip("[]().|").partition("=")[0].partition("[")[0] for word in forms.split() if word.strip("[(").startswith("-")}
    assert named - {"--", ""} <= set(usage.options_of(doc))


@pytest.mark.parametrize("tool", cli.TOOLS)
def test_what_a_tool_says_it_does_first_is_what_it_does(tool):
    """tool(parses=, accounts=) tell a server what to do once for children that run the tool (cli.program)."""
    module = cli.load(cli.TOOLS[tool])
    source = inspect.getsource(module)
    assert module.main.parses == ("cli.parse(__doc__" in source)
    assert module.main.accounts == ("creds.Lookups()" in inspect.getsource(module.main.body))


def test_parse_reads_once_and_hands_out_copies():
    first = cli.parse(DOC, ["--limit=nofile=1", "prog"])
    first["--limit"].append("changed")
    assert cli.parse(DOC, ["--limit=nofile=1", "prog"])["--limit"] == ["nofile=1"]
    assert cli.docopt_reading.cache_info().hits >= 1


# What cli.parse relies on in docopt-ng: if an upgrade changes it, this fails, not a user.


def test_docopt_raises_docoptexit_when_no_form_matches():
    with pytest.raises(DocoptExit) as refused:
        docopt(DOC, argv=["--map"], default_help=False, options_first=True)
    assert isinstance(refused.value, SystemExit)


def test_docopt_leaves_the_programs_options_alone_with_options_first():
    options = docopt(DOC, argv=["-v", "prog", "--map", "-x", "--bogus"], default_help=False, options_first=True)
    assert (options["--verbose"], options["--map"], options["PROG"], options["ARGS"]) == (True, False, "prog", ["--map", "-x", "--bogus"])


def test_docopt_returns_a_dict_by_long_name_with_defaults():
    options = docopt(
        DOC.replace("--vars[=PREFIX]", "--vars=PREFIX"),
        argv=["-vc", "5", "--limit=a", "--limit", "b", "--", "-p"],
        default_help=False,
        options_first=True,
    )
    assert isinstance(options, dict)
    assert {k: v for k, v in options.items() if k != "--"} == {
        "--map": False,
        "--dry-run": False,
        "--fd": "3",
        "-c": "5",
        "--limit": ["a", "b"],
        "--vars": None,
        "--verbose": True,
        "--help": False,
        "--version": False,
        "PROG": "-p",
        "ARGS": [],
    }


def test_docopt_takes_a_unique_prefix_and_nothing_else():
    """read_options takes the same prefixes, so the two never disagree on a word."""
    assert docopt(DOC, argv=["--dry", "prog"], default_help=False, options_first=True)["--dry-run"] is True
    with pytest.raises(DocoptExit):
        docopt(DOC, argv=["--ver", "prog"], default_help=False, options_first=True)


def test_docopt_does_not_print_help_with_default_help_off(capsys):
    assert docopt(DOC, argv=["--help"], default_help=False, options_first=True)["--help"] is True
    assert capsys.readouterr().out == ""


def test_docopt_cannot_read_the_two_usages_we_read_ourselves():
    """Why fdlaunch-listen and fdlaunch-fdmap use cli.read: if a docopt-ng learns these, they can use cli.parse."""
    listen = "Usage:\n  prog [options] SPEC... [--] PROG [ARGS...]\n\nOptions:\n  -v  Say more.\n"
    with pytest.raises(DocoptExit):  # SPEC... takes every word and gives none back to PROG
        docopt(listen, argv=["-tcp::0", "true"], default_help=False, options_first=True)
    fdmap = "Usage:\n  prog --vars[=PREFIX] [--] PROG\n\nOptions:\n  --vars[=PREFIX]  Variables.\n"
    with pytest.raises(DocoptExit):  # no optional value: '--vars' is a flag and '=PREFIX' a word
        docopt(fdmap, argv=["--vars=FD_", "true"], default_help=False, options_first=True)


# One usage grammar (fdlaunch(7), DIAGNOSTICS): a call that fits no form, a bare one
# first, says 'TOOL: usage: FIRST FORM' (the first form of --help's usage), exit 100.


def first_form(tool):
    return run([tool, "--help"]).stdout.split("Usage:", 1)[1].strip().splitlines()[0].strip()


WRONG_CALLS = [(tool, []) for tool in cli.TOOLS] + [
    ("fdlaunch-listen", ["-v"]),
    ("fdlaunch-listen", ["--map", "--lazy"]),
    ("fdlaunch-listen", ["-tcp:127.0.0.1:0"]),
    ("fdlaunch-listen", ["true"]),
    ("fdlaunch-listen", ["-5", "-tcp:127.0.0.1:0", "true"]),
    ("fdlaunch-fdmap", ["--map", "--subst", "true"]),
    ("fdlaunch-fdmap", ["--map", "--order=x", "true"]),
    ("fdlaunch-fdmap", ["--vars"]),
    ("fdlaunch-fdmap", ["true"]),
    ("fdlaunch-setuidgid", ["nobody"]),
    ("fdlaunch-setuidgid", ["--export", "--from-env", "true"]),
    ("fdlaunch-notify", ["-v"]),
    ("fdlaunch-accept", ["-q"]),
    ("fdlaunch-notify-wait", ["--fork"]),
    ("fdlaunch-handoff", ["--"]),
]


@pytest.mark.parametrize("tool, argv", WRONG_CALLS)
def test_a_wrong_call_prints_the_first_usage_form(tool, argv):
    done = run([tool, *argv])
    assert (done.returncode, done.stderr, done.stdout) == (100, f"{tool}: usage: {first_form(tool)}\n", "")


@pytest.mark.parametrize("tool", cli.TOOLS)
def test_help_among_other_words_is_help_for_every_tool(tool):
    # Whether docopt reads the tool's usage or the tool reads its own (listen, fdmap): the same answer.
    wanted = run([tool, "--help"])
    for argv in (["-v", "--help"], ["--help", "true"], ["--version", "--help"]):
        done = run([tool, *argv])
        assert (done.returncode, done.stdout, done.stderr) == (0, wanted.stdout, ""), argv


@pytest.mark.parametrize("tool", cli.TOOLS)
def test_an_unknown_option_is_named_in_one_line(tool):
    done = run([tool, "--bogus", "-tcp:127.0.0.1:0", "true"])
    assert (done.returncode, done.stderr) == (100, f"{tool}: fatal: unknown option '--bogus' (usage: {first_form(tool)})\n")
