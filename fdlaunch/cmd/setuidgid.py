"""fdlaunch-setuidgid: run a program as another account, verified.

Usage:
  fdlaunch-setuidgid [options] [--limit=SPEC]... ACCOUNT [--] PROG [ARGS...]
  fdlaunch-setuidgid [options] [--limit=SPEC]... --from-env [--] PROG [ARGS...]
  fdlaunch-setuidgid [options] --export ACCOUNT [--] PROG [ARGS...]
  fdlaunch-setuidgid (-h | --help | --version)

ACCOUNT is USER, USER:GROUP, UID or UID:GID. See fdlaunch-setuidgid(1).

Options:
  --groups=LIST      Set exactly these supplementary groups, names or
                     numbers, comma-separated (empty: none).
  --env              Set HOME, USER, LOGNAME and SHELL from the account.
  --export           Only set UID, GID and GIDLIST for ACCOUNT and run PROG
                     with the credentials unchanged.
  --from-env         Become UID, GID and GIDLIST from the environment.
  --keep-cap=CAPS    Keep these capabilities as ambient ones, comma-separated,
                     e.g. net_bind_service.
  --umask=OCTAL      Set the umask.
  --chdir=DIR        Change directory, as the new account.
  --chroot=DIR       Change root before the account changes.
  --limit=SPEC       Set a resource limit, RESOURCE=SOFT[:HARD], e.g.
                     nofile=4096 (repeatable).
  --nice=N           Add N to the nice value.
  --setsid           Start a new session.
  --keep-tty         Keep the controlling terminal (it can be typed into).
  --no-new-privs     Set no_new_privs: no setuid exec regains anything.
  -v, --verbose      Say on stderr what the process became.
  -h, --help         Print this help.
  --version          Print the version.
"""

import os
from collections import namedtuple

from fdlaunch import cli
from fdlaunch.cli import tool
from fdlaunch.errors import BadCall, Fatal, UsageError, warn
from fdlaunch.kernel import chain, creds
from fdlaunch.text import credspec

PROG = "fdlaunch-setuidgid"
# What the process options ask for, parsed: limits as credspec.parse_limit
# gives them, nice and umask numbers or None, capabilities numbers (or ()).
Setup = namedtuple("Setup", "limits nice umask capabilities")
PROCESS_OPTIONS = (
    "--env",
    "--keep-cap",
    "--umask",
    "--chdir",
    "--chroot",
    "--limit",
    "--nice",
    "--setsid",
    "--keep-tty",
    "--no-new-privs",
)


@tool(PROG, accounts=True)
def main(argv, environ):
    options = cli.parse(__doc__, argv)
    program = [options["PROG"], *options["ARGS"]]
    lookups = creds.Lookups()
    account = account_of(options, lookups)
    wanted = credspec.from_environment(environ) if account is None else account.credentials
    if options["--groups"] is not None:
        wanted = wanted._replace(groups=credspec.parse_group_list(options["--groups"], lookups))
    if options["--export"]:
        return export(options, wanted, environ, program)
    setup = read_setup(options)
    if options["--env"]:
        environ.update(account_environment(account))
    status = creds.open_status()
    change_process(options, setup, status)
    creds.drop(wanted, setup.capabilities, status)
    verify(status, wanted, setup.capabilities)
    if options["--no-new-privs"]:
        creds.no_new_privs()
    if options["--chdir"]:
        creds.change_directory(options["--chdir"])
    path = cli.find_program(program[0], environ)
    os.close(status)
    if options["--verbose"]:
        warn(PROG, "info", f"now {credspec.describe(wanted, setup.capabilities)}")
    return chain.Exec(path, program, environ)


def account_of(options, lookups):
    """The account to become, or None with --from-env; a '--' where ACCOUNT goes gets the usage line."""
    if options["--from-env"]:
        return None
    if options["ACCOUNT"] == "--":
        raise BadCall(cli.synopsis(__doc__))
    return credspec.resolve_account(options["ACCOUNT"], lookups)


def export(options, wanted, environ, program):
    """--export: UID, GID and GIDLIST for a later --from-env, credentials unchanged."""
    refuse_with_export(options)
    exported = credspec.to_environment(wanted)
    environ.update(exported)
    if options["--verbose"]:
        warn(PROG, "info", f"set {' '.join(f'{k}={v}' for k, v in exported.items())}; credentials unchanged")
    return chain.Exec(cli.find_program(program[0], environ), program, environ)


def account_environment(account):
    if account is None:
        raise UsageError("--env needs an ACCOUNT to take HOME and SHELL from, not --from-env")
    return credspec.account_environment(account)


def change_process(options, setup, status):
    """What is changed while still privileged, in the order of fdlaunch-setuidgid(1): limits, nice, setsid, terminal, chroot, umask."""
    if setup.capabilities or options["--no-new-privs"] or (options["--chroot"] and creds.observe(status)["cap_inh"]):
        creds.load_libc()  # ctypes, while the standard library is still there to import: not after --chroot
    creds.set_limits(setup.limits)
    if setup.nice is not None:
        creds.change_nice(setup.nice)
    if options["--setsid"]:
        creds.new_session()
    if not options["--keep-tty"]:
        creds.leave_terminal()
    if options["--chroot"]:
        creds.change_root(options["--chroot"])
    if setup.umask is not None:
        os.umask(setup.umask)
    if setup.capabilities and not creds.has_capabilities(status, setup.capabilities):
        raise Fatal(f"unable to keep {credspec.capability_names(setup.capabilities)}: not in this process's permitted set")


def read_setup(options):
    """Every option value parsed before anything is changed."""
    return Setup(
        limits=[credspec.parse_limit(text) for text in options["--limit"]],
        nice=None if options["--nice"] is None else credspec.parse_nice(options["--nice"]),
        umask=None if options["--umask"] is None else credspec.parse_octal("--umask", options["--umask"]),
        capabilities=credspec.parse_capabilities(options["--keep-cap"]) if options["--keep-cap"] else (),
    )


def refuse_with_export(options):
    """--export changes nothing but three variables; any other change belongs with --from-env."""
    changes = [name for name in PROCESS_OPTIONS if options[name] not in (None, False, [])]
    if changes:
        raise UsageError(f"--export only sets UID, GID and GIDLIST; give {', '.join(changes)} to the --from-env that applies them")


def verify(status, wanted, capabilities):
    wrong = credspec.mismatches(wanted, capabilities, creds.observe(status))
    if wanted.uid != 0 and creds.can_regain_root():
        wrong.append("it could become root again")
    if wrong:
        raise Fatal(f"credentials not as asked, not running the program: {'; '.join(wrong)}")
