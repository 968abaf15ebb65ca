"""fdlaunch-init: run a chain as a container's first process, PID 1 done right.

Usage:
  fdlaunch-init [options] [--] PROG [ARGS...]
  fdlaunch-init (-h | --help | --version)

Runs PROG as its child and stays: reaps every process that ends below it (as
PID 1, or as a child subreaper), passes SIGTERM, SIGINT, SIGHUP, SIGQUIT,
SIGUSR1, SIGUSR2 and SIGWINCH on to PROG, and exits with PROG's status (128
plus the signal that killed it). What PROG leaves running gets SIGTERM, and
SIGKILL after --grace. See fdlaunch-init(1).

Options:
  --group            Send the signals to PROG's process group, not to PROG
                     alone (dumb-init's default, tini -g).
  --grace=SECONDS    Once PROG has exited, how long what it left may take to
                     stop before SIGKILL [default: 5].
  -v, --verbose      Say on stderr what was started, how it ended, and what
                     was left.
  -h, --help         Print this help.
  --version          Print the version.
"""

from fdlaunch import cli
from fdlaunch.cli import tool
from fdlaunch.errors import say_as
from fdlaunch.kernel import chain
from fdlaunch.loops import reaping

PROG = "fdlaunch-init"


@tool(PROG)
def main(argv, environ):
    options = cli.parse(__doc__, argv)
    program = [options["PROG"], *options["ARGS"]]
    settings = reaping.Settings(options["--group"], cli.seconds("--grace", options["--grace"], zero=True))
    cli.find_program(program[0], environ)  # exit 126 or 127 now, before anything is started
    init = reaping.Init(settings, say_as(PROG, options["--verbose"]), say_as(f"{PROG} (guard)"))
    status = init.run(cli.program(program, environ), environ)
    return chain.exit_status(status)
