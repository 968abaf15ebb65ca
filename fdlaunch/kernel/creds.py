"""Changing credentials and process attributes, and reading back what the kernel did.

Order follows s6-applyuidgid: supplementary groups, then gid, then uid; the
result is then read back from /proc/self/status and compared, never assumed.
"""

import errno
import fcntl
import grp
import os
import pwd
import resource

from fdlaunch.errors import Fatal, quoted, syscall_error
from fdlaunch.kernel import proc

# prctl(2) options (linux/prctl.h)
PR_SET_KEEPCAPS = 8
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522
# Linux's number (asm-generic/resource.h); Python's resource module does not name it.
RLIMIT_LOCKS = 10


class Lookups:
    """The user and group databases, as credspec.resolve_account wants them."""

    def __init__(self):
        self.getpwnam, self.getpwuid = pwd.getpwnam, pwd.getpwuid
        self.getgrnam = grp.getgrnam
        self.getgrouplist = os.getgrouplist


def load_databases():
    """Have the C library load what it looks accounts up with, as it does on the first lookup (nsswitch.conf, its modules).

    A server whose children look accounts up does this once: each child
    then finds the modules loaded (a dlopen(3) each, otherwise, per child).
    """
    try:
        root = pwd.getpwuid(0)
    except KeyError:
        return
    os.getgrouplist(root.pw_name, root.pw_gid)  # every source of the group database, as fdlaunch-setuidgid asks it


def set_limits(limits):
    for name, soft, hard in limits:
        number = RLIMIT_LOCKS if name == "locks" else getattr(resource, f"RLIMIT_{name.upper()}")
        _, current_hard = resource.getrlimit(number)
        if hard is None:
            raise_hard = soft == resource.RLIM_INFINITY or (current_hard != resource.RLIM_INFINITY and soft > current_hard)
            hard = soft if raise_hard else current_hard
        try:
            resource.setrlimit(number, (soft, hard))
        except (OSError, ValueError) as error:
            raise Fatal(f"unable to set the {name} limit to {_show(soft)}:{_show(hard)}: {_reason(error)}") from None


def _show(value):
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


def _reason(error):
    return error.strerror if isinstance(error, OSError) and error.strerror else str(error)


def change_root(directory):
    try:
        os.chroot(directory)
        os.chdir("/")
    except OSError as error:
        raise syscall_error(f"chroot to {quoted(directory)}", error) from None


def change_directory(directory):
    try:
        os.chdir(directory)
    except OSError as error:
        raise syscall_error(f"chdir to {quoted(directory)}", error) from None


def new_session():
    if os.getsid(0) == os.getpid():
        return  # already a session leader, as s6-supervise and runsv make it
    try:
        os.setsid()
    except OSError as error:
        # setsid(2) refuses a process group leader, and the pid must be kept, so no fork
        raise Fatal(
            f"unable to start a new session: {error.strerror} (pid {os.getpid()} already leads a process group; "
            "start it from a supervisor, or drop --setsid)"
        ) from None


def leave_terminal():
    """Give up the controlling terminal, if there is one, staying in the same session and process group.

    With it, the program could push input into the terminal (TIOCSTI,
    tty_ioctl(4)) that the caller's shell then reads as if typed. For a
    process that does not lead its session, TIOCNOTTY ends only its own tie
    to the terminal; setsid(2) could not be used anyway (a shell with job
    control makes the command lead a process group, and the pid is kept).
    Its group stays the terminal's foreground one, so ^C still reaches it.
    A session leader is refused instead: TIOCNOTTY would hang up its group
    (SIGHUP), and as a session leader the program could take the terminal
    back (TIOCSCTTY). Without a terminal (the usual case under a
    supervisor) this costs one failed open(2).
    """
    terminal = _controlling_terminal()
    if terminal is None:
        return
    try:
        if os.getsid(0) == os.getpid():
            raise Fatal(
                "unable to give up the controlling terminal: this process leads its session, and a session leader "
                "can take its terminal back (TIOCSCTTY); run it from a shell without exec, or give --keep-tty"
            )
        import termios  # only with a terminal: the usual path never imports it

        try:
            fcntl.ioctl(terminal, termios.TIOCNOTTY)
        except OSError as error:
            raise syscall_error("give up the controlling terminal", error) from None
    finally:
        os.close(terminal)
    still = _controlling_terminal()
    if still is not None:
        os.close(still)
        raise Fatal("unable to give up the controlling terminal: /dev/tty still opens after TIOCNOTTY")


def _controlling_terminal():
    """A descriptor on this process's controlling terminal (/dev/tty), or None if it has none (ENXIO)."""
    try:
        return os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        if error.errno == errno.ENXIO:
            return None
        fields = proc.stat_fields("self")
        if fields is not None and fields[4] == "0":
            return None  # no /dev/tty to open (a bare container), and tty_nr (proc(5)) says there is no terminal
        raise syscall_error("open /dev/tty to give up the controlling terminal", error) from None


def change_nice(increment):
    try:
        os.nice(increment)
    except OSError as error:
        raise syscall_error(f"change the nice value by {increment}", error) from None


def drop(credentials, capabilities, status):
    """Become credentials, keeping exactly the given capabilities (ambient) if any.

    The inheritable set becomes exactly those too: the uid change clears the
    permitted, effective and ambient sets but leaves it, and a program could
    then gain it back by executing a file that has the same capabilities as
    inheritable file capabilities (capabilities(7)). Without capabilities to
    keep and with nothing inherited (the common case), ctypes is not loaded.
    """
    inherited = observe(status)["cap_inh"]
    kernel = _Kernel() if capabilities or inherited else None
    if capabilities:
        kernel.prctl(PR_SET_KEEPCAPS, 1)
    for what, call, value in (
        ("set supplementary groups", os.setgroups, list(credentials.groups)),
        (f"set gid {credentials.gid}", os.setresgid, (credentials.gid,) * 3),
        (f"set uid {credentials.uid}", os.setresuid, (credentials.uid,) * 3),
    ):
        try:
            call(*value) if isinstance(value, tuple) else call(value)
        except OSError as error:
            raise syscall_error(what, error) from None
    if capabilities:
        kernel.keep_only(capabilities)
        kernel.prctl(PR_SET_KEEPCAPS, 0)
    elif inherited:
        kernel.clear_inheritable()


def open_status():
    """/proc/self/status, opened now so that observe() still works after a chroot."""
    try:
        return os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        raise syscall_error("open /proc/self/status to verify credentials", error) from None


def observe(status):
    """Credentials and capabilities as the kernel reports them now (procfs regenerates on each read)."""
    fields = {}
    for line in os.pread(status, 1 << 16, 0).decode().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return {
        "uid": tuple(int(v) for v in fields["Uid"]),
        "gid": tuple(int(v) for v in fields["Gid"]),
        "groups": tuple(int(v) for v in fields.get("Groups", [])),
        "cap_eff": int(fields["CapEff"][0], 16),
        "cap_prm": int(fields["CapPrm"][0], 16),
        "cap_inh": int(fields["CapInh"][0], 16),
        "cap_amb": int(fields["CapAmb"][0], 16),
    }


def can_regain_root():
    """Try what would give root back; True would mean the drop is not real.

    setuid(0) works with uid 0 anywhere or CAP_SETUID. setgroups(2) always
    needs CAP_SETGID, so setting the groups already held tests for it
    without changing anything. (A setgid to the gid already held succeeds
    for anyone, so it proves nothing: a target gid of 0 is allowed, as
    s6-setuidgid allows it.)
    """
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        return True
    try:
        os.setgroups(os.getgroups())
    except PermissionError:
        return False
    return True


def load_libc():
    """Load libc through ctypes now: after a chroot or the drop, the standard library may not be readable."""
    proc.libc()


def no_new_privs():
    _Kernel().prctl(PR_SET_NO_NEW_PRIVS, 1)


def has_capabilities(status, numbers):
    return all(observe(status)["cap_prm"] & (1 << n) for n in numbers)


class _Kernel:
    """prctl(2) and capset(2) through libc; loaded only when needed (ctypes: tests/test_imports.py)."""

    def __init__(self):
        import ctypes  # the standard library: still readable after a drop, unlike our own installation may be

        self.ctypes = ctypes
        self.libc = proc.libc()

    def prctl(self, *arguments):
        try:
            proc.prctl(*arguments)
        except OSError as error:
            raise Fatal(f"unable to prctl {arguments[0]}: {error.strerror}") from None

    def keep_only(self, capabilities):
        """Permitted, effective and inheritable = capabilities, then raise them as ambient."""
        mask = sum(1 << n for n in capabilities)
        self.capset(mask, mask, mask)
        self.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
        for number in capabilities:
            self.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, number)

    def clear_inheritable(self):
        """An empty inheritable set, the others as they are (lowering it needs no privilege)."""
        effective, permitted, _ = self.capget()
        self.capset(effective, permitted, 0)

    def capget(self):
        """Return this process's effective, permitted and inheritable capabilities, as bit masks."""
        header, data = self._capability_structures()
        if self.libc.capget(self.ctypes.byref(header), data) != 0:
            raise Fatal(f"unable to read capabilities: {os.strerror(self.ctypes.get_errno())}")
        return tuple(getattr(data[0], name) | getattr(data[1], name) << 32 for name in ("effective", "permitted", "inheritable"))

    def capset(self, effective, permitted, inheritable):
        header, data = self._capability_structures()
        for index in (0, 1):
            data[index].effective, data[index].permitted, data[index].inheritable = (
                (mask >> (32 * index)) & 0xFFFFFFFF for mask in (effective, permitted, inheritable)
            )
        if self.libc.capset(self.ctypes.byref(header), data) != 0:
            raise Fatal(f"unable to set capabilities: {os.strerror(self.ctypes.get_errno())}")

    def _capability_structures(self):
        """capget(2)'s and capset(2)'s header (version 3, this process) and two 32-bit data words."""
        ctypes = self.ctypes

        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

        return Header(LINUX_CAPABILITY_VERSION_3, 0), (Data * 2)()
