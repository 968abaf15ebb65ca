"""fdlaunch-fdmap: pass the sockets this was handed on in the form the program needs.

Usage:
  fdlaunch-fdmap [-v] --systemd [--order=LABELS] [--] PROG [ARGS...]
  fdlaunch-fdmap [-v] --map [--] PROG [ARGS...]
  fdlaunch-fdmap [-v] --vars[=PREFIX] [--] PROG [ARGS...]
  fdlaunch-fdmap [-v] --subst [--] PROG [ARGS...]
  fdlaunch-fdmap [-v] --stdin=LABEL [--] PROG [ARGS...]
  fdlaunch-fdmap (-h | --help | --version)

Reads LISTEN_FD_MAP, or LISTEN_FDS and LISTEN_FDNAMES with a LISTEN_PID
that is this process. See fdlaunch-fdmap(1).

Options:
  --systemd         Move the sockets to 3, 4, ... and set LISTEN_FDS,
                    LISTEN_PID, LISTEN_FDNAMES (and LISTEN_FD_MAP to match).
  --order=LABELS    With --systemd, only these labels, in this order,
                    comma-separated; the other sockets are closed.
  --map             Write LISTEN_FD_MAP; move nothing.
  --vars[=PREFIX]   Set PREFIX+LABEL to the label's fd numbers, for
                    daemons that take them on the command line (FD_).
  --subst           Replace each {LABEL} in ARGS by that label's fd number
                    ({{ and }} are braces): kresd -S {udp} -S {tcp}.
  --stdin=LABEL     Put that listening socket on fd 0 and fd 1 and close
                    the others: inetd's 'wait' style, the program accepts.
                    For a program per connection, see fdlaunch-accept(1).
  -v, --verbose     Say on stderr what was moved, set or replaced.
  -h, --help        Print this help.
  --version         Print the version.
"""

import os

from fdlaunch import cli
from fdlaunch.cli import tool
from fdlaunch.errors import BadCall, UsageError, warn
from fdlaunch.kernel import chain, fds
from fdlaunch.text import fdplan, listenenv

PROG = "fdlaunch-fdmap"
DEFAULT_PREFIX = "FD_"
MODES = ("--systemd", "--map", "--vars", "--subst", "--stdin")


@tool(PROG, parses=False)
def main(argv, environ):
    options = read_call(argv)
    pid = os.getpid()
    program = [options["PROG"], *options["ARGS"]]
    passed = listenenv.inherited(environ, pid, fds.limit())
    open_now = fds.open_fds()
    fds.check_inherited(passed, open_now)
    path = cli.find_program(program[0], environ)
    if options["--systemd"]:
        environ, moved = as_systemd(passed, options["--order"], open_now, environ, pid)
    elif options["--stdin"] is not None:
        environ, moved = as_stdin(passed, options["--stdin"], environ)
    else:
        fds.make_inheritable(p.fd for p in passed)
        program, moved = in_place(options, passed, program, environ)
    if options["--verbose"]:
        for line in moved:
            warn(PROG, "info", line)
    return chain.Exec(path, program, environ)


def read_call(argv):
    """argv by the usage: one mode, --order only with --systemd, a program; a bare --vars is --vars=FD_."""
    # docopt cannot read the optional value of '--vars[=PREFIX]' (see cli): the forms are checked here.
    options = cli.read(__doc__, argv)
    modes = [mode for mode in MODES if options[mode] not in (None, False)]
    if len(modes) != 1 or (options["--order"] is not None and modes != ["--systemd"]) or options["PROG"] is None:
        raise BadCall(cli.synopsis(__doc__))
    if options["--vars"] is True:
        options["--vars"] = DEFAULT_PREFIX
    return options


def in_place(options, passed, program, environ):
    """--map, --vars, --subst: the sockets stay where they are, environ says where; the program, and what was done."""
    if options["--map"]:
        environ["LISTEN_FD_MAP"] = listenenv.format_map(passed)
        return program, [f"LISTEN_FD_MAP={environ['LISTEN_FD_MAP']}"]
    if options["--vars"] is not None:
        variables = fdplan.variables(passed, options["--vars"])
        environ.update(variables)
        return program, [f"{name}={value}" for name, value in variables.items()] or ["no sockets, no variables"]
    program = [program[0], *fdplan.substitute(program[1:], passed)]
    return program, [f"arguments now {program[1:]!r}"]


def as_systemd(passed, order, open_now, environ, pid):
    chosen = fdplan.choose(passed, order)
    moves = fdplan.systemd_moves(chosen, open_now, handed={p.fd for p in passed})
    dropped = [p for p in passed if p not in chosen]
    fds.close_all(p.fd for p in dropped)
    fds.place(moves)
    placed = [listenenv.Passed(p.label, to) for p, (_, to) in zip(chosen, moves, strict=True)]
    done = [f"fd {p.fd} ({p.label}) closed: not in --order" for p in dropped]
    done += [f"fd {p.fd} ({p.label}) {'stays at' if p.fd == q.fd else 'moved to'} fd {q.fd}" for p, q in zip(chosen, placed, strict=True)]
    return listenenv.environment(environ, placed, pid, True, {}), done or ["no sockets were passed"]


def as_stdin(passed, label, environ):
    matching = [p for p in passed if p.label == label]
    if len(matching) != 1:
        found = f"{len(matching)} sockets are" if matching else "no socket is"
        raise UsageError(f"--stdin={label!r}: {found} labelled {label!r}; it needs exactly one")
    fds.place([(matching[0].fd, 0)])
    os.dup2(0, 1)
    fds.close_all({p.fd for p in passed} - {0, 1})
    others = [p for p in passed if p != matching[0] and p.fd not in (0, 1)]
    done = [f"fd {matching[0].fd} ({label}) on fd 0 and fd 1"] + [f"fd {p.fd} ({p.label}) closed" for p in others]
    return {name: value for name, value in environ.items() if name not in listenenv.VARIABLES}, done
