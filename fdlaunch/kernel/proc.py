"""Processes: who descends from whom as /proc shows them, which pid a pidfd holds, PID files, signalling, prctl(2)."""

import errno
import functools
import os
import select
import signal
import stat
import sys
import time

from fdlaunch.errors import NOT_EXECUTABLE, quoted, syscall_error
from fdlaunch.text.numbers import PID_MAX_LIMIT, is_decimal


def lineage(pid, pidfd):
    """pid and its ancestors up to init, as /proc has them; () if that cannot be known for sure.

    pidfd is a descriptor on the process meant (below 0: it was gone
    already; None: no pidfd to check with). The walk counts only if that
    process still has the pid once it is done, so a pid freed and reused
    meanwhile is never taken for the sender.
    """
    if pidfd is not None and pidfd < 0:
        return ()
    chain = []
    while pid > 0 and len(chain) < 4096:
        chain.append(pid)
        if pid == 1:
            break
        fields = stat_fields(pid)
        if fields is None:
            return ()  # gone, or an ancestor went away under us
        pid = int(fields[1])
    if not chain or (pidfd is not None and pid_of(pidfd) != chain[0]):
        return ()
    return tuple(chain)


# A walk up /proc from a sender goes no further than this many levels: a
# chain of processes is cheap to make, and how deep it is, is the sender's choice.
WALK_DEPTH_MAX = 128
# Processes found not to be below the top, kept so that their next datagram costs one read.
STRANGERS_KEPT = 1024


class Family:
    """Which processes are top or below it, told by walking up /proc from them.

    The walk stops at top; at an ancestor that started before top (nothing
    older than top can be below it); at a process already found not to be
    below top; or after WALK_DEPTH_MAX levels. What a sender costs is so
    bounded by numbers it does not choose, however deep a chain it forks.
    Raises OSError if /proc cannot be read (EMFILE): that is never "gone".
    """

    def __init__(self, top):
        self.top = top
        self.top_started = start_time(top) or 0
        self.strangers = {}  # (pid, start time) of processes not below top: None; oldest first

    def lineage(self, pid, pidfd):
        """pid and its ancestors up to top, or up to where the walk stopped; () if that cannot be known for sure.

        pidfd is a descriptor on the process meant (None: no pidfd to check
        with). A lineage that reaches top counts only if that process still
        has the pid once the walk is done, so a pid freed and reused
        meanwhile is never taken for the sender.
        """
        chain, walked = [], []
        child_started = None
        while len(chain) < WALK_DEPTH_MAX:
            chain.append(pid)
            if pid == self.top:
                return tuple(chain) if pidfd is None or pid_of(pidfd) == chain[0] else ()
            fields = read_stat(pid)
            if fields is None:
                return ()  # gone, or an ancestor went away under us
            started = int(fields[19])
            if child_started is not None and started > child_started:
                return ()  # younger than its child: the parent died and its pid was taken meanwhile
            walked.append((pid, started))
            pid, child_started = int(fields[1]), started
            if started < self.top_started or walked[-1] in self.strangers or pid == 0:
                self.remember_strangers(walked)  # all of them: none is below top
                return tuple(chain)
        self.remember_strangers(walked[:1])  # too deep to be believed, which stays so
        return tuple(chain)

    def lineage_of(self, pid):
        """lineage() of a pid read in a message (a MAINPID): () unless it is a process here now."""
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as error:
            if error.errno in (errno.EMFILE, errno.ENFILE):
                raise
            return ()
        try:
            return self.lineage(pid, pidfd)
        finally:
            os.close(pidfd)

    def remember_strangers(self, walked):
        for key in walked:
            self.strangers.pop(key, None)  # to the end: the last to be forgotten
            self.strangers[key] = None
        while len(self.strangers) > STRANGERS_KEPT:
            del self.strangers[next(iter(self.strangers))]


def start_time(pid):
    """When pid started, in clock ticks since boot (proc(5), /proc/PID/stat field 22); None if it is gone."""
    fields = stat_fields(pid)
    return int(fields[19]) if fields else None


def pid_of(pidfd):
    """The pid of the process behind a pidfd, or -1 once it has been reaped (pidfd_open(2), fdinfo)."""
    for line in read_proc(f"/proc/self/fdinfo/{pidfd}").splitlines():
        if line.startswith("Pid:"):
            return int(line.split()[1])
    return -1


def read_proc(path):
    """A small /proc file, read with two system calls: a watcher reads several per datagram."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 4096).decode(errors="replace")
    finally:
        os.close(fd)


def tgid_of(tid):
    """The process a thread belongs to (Tgid in /proc/TID/status), or None if the thread is gone."""
    try:
        status = read_proc(f"/proc/{tid}/status")
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("Tgid:"):
            return int(line.split()[1])
    return None


def name_of(pid):
    """The command name ps(1) shows for pid (/proc/PID/comm), or '?' if it is gone."""
    try:
        return read_proc(f"/proc/{pid}/comm").strip()
    except OSError:
        return "?"


def fd_flags(tid, fd):
    """The open flags of fd in tid's descriptor table, O_CLOEXEC among them if it is close-on-exec (proc(5), fdinfo)."""
    for line in read_proc(f"/proc/{tid}/fdinfo/{fd}").splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8)
    raise OSError(errno.ENOENT, f"no flags in /proc/{tid}/fdinfo/{fd}")


def sockets_held(pid, inodes):
    """Which of these socket inodes pid holds on any descriptor, from the links in /proc/PID/fd."""
    names = {f"socket:[{inode}]": inode for inode in inodes}
    held = set()
    directory = f"/proc/{pid}/fd"
    for fd in os.listdir(directory):
        try:
            target = os.readlink(f"{directory}/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target in names:
            held.add(names[target])
    return held


def file_seen_by(tid, path):
    """Return (st_dev, st_ino) of the socket file path names for tid (inside its root, from its cwd); None if there is none."""
    where = b"/proc/%d/%s/" % (tid, b"root" if path.startswith(b"/") else b"cwd")
    try:
        info = os.stat(where + path.lstrip(b"/"))
    except OSError:
        return None
    return (info.st_dev, info.st_ino) if stat.S_ISSOCK(info.st_mode) else None


def read_pidfile(path):
    """Return the pid, the uid of the file's owner and None, or None, None and why not: a PID file is one decimal number, a newline allowed.

    Opened O_PATH|O_NOFOLLOW first and looked at through that descriptor, so
    nothing but a regular file is ever opened to be read: not what a
    symlink put there points to (the daemon's user could aim it at a file
    only root may read), not a FIFO or a device, whose open may block or act.
    The reason never quotes what the file holds.
    """
    try:
        where = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, None, "was not written"
    except OSError as error:
        return None, None, f"cannot be opened: {error.strerror}"
    try:
        info = os.fstat(where)
        if stat.S_ISLNK(info.st_mode):
            return None, None, "is a symbolic link: refused, never followed"
        if not stat.S_ISREG(info.st_mode):
            return None, None, f"is {_file_kind(info.st_mode)}, not a regular file"
        fd = os.open(f"/proc/self/fd/{where}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)  # the same inode, not the path again
    except OSError as error:
        return None, None, f"cannot be read: {error.strerror}"
    finally:
        os.close(where)
    try:
        text = os.read(fd, 64).strip()
    finally:
        os.close(fd)
    if not text:
        return None, None, "is empty"
    if not is_decimal(text) or not 0 < int(text) <= PID_MAX_LIMIT:
        return None, None, "does not hold a pid (one decimal number)"
    return int(text), info.st_uid, None


def _file_kind(mode):
    kinds = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a character device"}
    return next((kind for test, kind in kinds.items() if test(mode)), "a block device")


def uids_of(pid):
    """The real, effective, saved and filesystem uids of pid (proc(5), status), or () if it is gone."""
    try:
        status = read_proc(f"/proc/{pid}/status")
    except OSError:
        return ()
    for line in status.splitlines():
        if line.startswith("Uid:"):
            return tuple(int(uid) for uid in line.split()[1:])
    return ()


def stat_fields(pid):
    """The fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...), or None if it is gone or unreadable."""
    try:
        return read_stat(pid)
    except OSError:
        return None


def read_stat(pid):
    """stat_fields(pid), None only if there is no such process to see; OSError if it could not be read (EMFILE)."""
    try:
        return read_proc(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
        return None  # gone (ESRCH while it is being reaped), or hidden from us (hidepid=)


def state_of(pid):
    """The one-letter state in /proc/PID/stat (Z: a zombie), or None if it is gone."""
    fields = stat_fields(pid)
    return fields[0] if fields else None


def children_of(pid):
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found  # gone meanwhile
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as children:  # may be longer than read_proc reads
                found.extend(int(child) for child in children.read().split())
        except OSError:
            continue
    return found


def descendants(root):
    """The live (not zombie) processes below root, as {pid: ppid}.

    Walked down through /proc/PID/task/TID/children (proc(5)), which costs
    a few reads per process below us rather than one per process on the
    system; where the kernel lacks those files, the whole of /proc is read.
    """
    if not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"):
        return descendants_by_scan(root)
    found, todo = {}, [root]
    while todo:
        parent = todo.pop()
        for pid in children_of(parent):
            if pid not in found:
                todo.append(pid)
                if state_of(pid) not in ("Z", None):
                    found[pid] = parent
    return found


def descendants_by_scan(root):
    table = {pid: (int(fields[1]), fields[0]) for pid, fields in all_stats()}
    children = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, [root]
    while todo:
        for pid in children.get(todo.pop(), ()):
            if pid not in found:
                todo.append(pid)
                if table[pid][1] != "Z":
                    found[pid] = table[pid][0]
    return found


def others_in_group(group):
    """True while a live process other than group's leader is in process group group."""
    return any(pid != group and int(fields[2]) == group and fields[0] != "Z" for pid, fields in all_stats())


def all_stats():
    """Yield (pid, stat_fields(pid)) for every process on the system that is still there."""
    for name in os.listdir("/proc"):
        if is_decimal(name):
            fields = stat_fields(name)
            if fields is not None:
                yield int(name), fields


def pin_below(root, root_pidfd, found):
    """{pid: pidfd} for the processes of found that, once pinned by a pidfd, are still below root.

    found is {pid: ppid} as descendants(root) gives it, parents first.
    A pidfd signals the process it was opened on and no other, even once
    its pid is free and taken by another process (pidfd_open(2)), so a
    number read a moment ago is never signalled as such. Each process is
    taken only if, read after its pidfd was opened, its parent is one
    already taken here that still holds its pid, and it still holds its
    own: then that parent and that child are the ones found. One /proc
    read per process, however deep the tree. root_pidfd: a pidfd on root,
    or None when root is this process (whose pid no one else can take).
    The caller closes the pidfds.
    """
    pinned = {root: root_pidfd}
    for pid, parent in found.items():
        if parent not in pinned:
            continue  # its parent could not be taken: neither can it
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue  # gone meanwhile
        fields = stat_fields(pid)
        parent_pidfd = pinned[parent]
        if (
            fields is not None
            and int(fields[1]) == parent
            and pid_of(pidfd) == pid
            and (parent_pidfd is None or pid_of(parent_pidfd) == parent)
        ):
            pinned[pid] = pidfd
        else:
            os.close(pidfd)
    del pinned[root]
    return pinned


def received_dispositions(numbers):
    """Which of these signals this process was started with ignored: a child we start gets the same."""
    return {number: signal.SIG_IGN if signal.getsignal(number) == signal.SIG_IGN else signal.SIG_DFL for number in numbers}


class Child:
    """A process we started and wait for: its pid, a pidfd it is signalled through, its wait status once reaped."""

    def __init__(self, pid):
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.status = None  # wait status, once reaped

    def send(self, number):
        send_pidfd(self.pidfd, number)

    def reap(self, wait=False):
        """Collect the exit status if it has exited (with wait, once it has); True once it has."""
        if self.status is None:
            pid, status = os.waitpid(self.pid, 0 if wait else os.WNOHANG)
            if pid == self.pid:
                self.status = status
                os.close(self.pidfd)
        return self.status is not None


def start_child(program, environ, dispositions, moves=(), more_setup=None, kind=Child):
    """Start program (a chain.Program, by chain.spawn) as a child that dies with us, with dispositions; a kind (Child).

    Fatal (126/127) if the exec fails. more_setup, if given, runs in the
    child last before the program does. A child we could not watch (no
    pidfd: out of descriptors) is stopped, not left.
    """
    from fdlaunch.kernel import chain

    parent = os.getpid()

    def setup():
        signal.set_wakeup_fd(-1)
        for number, disposition in dispositions.items():
            signal.signal(number, disposition)
        if not die_with(parent):  # a child left behind would hold what we hold for it
            os._exit(NOT_EXECUTABLE)
        if more_setup is not None:
            more_setup()

    pid = chain.spawn(program, environ, setup, moves)
    try:
        return kind(pid)
    except OSError as error:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise syscall_error(f"watch {quoted(program.argv[0])} (pid {pid})", error) from None


def send_pidfd(pidfd, number):
    """Signal the process behind pidfd; nothing if it has exited already."""
    try:
        signal.pidfd_send_signal(pidfd, number)
    except ProcessLookupError:
        pass


def end_within(pidfds, grace):
    """Give the processes behind pidfds grace seconds to exit, then SIGKILL those left; the pidfds killed."""
    left = running(pidfds, time.monotonic() + grace)
    for pidfd in left:
        send_pidfd(pidfd, signal.SIGKILL)
    return left


def exited(pidfd):
    """True once the process behind pidfd has exited (a zombie or reaped): its pidfd is readable (pidfd_open(2))."""
    return bool(select.select([pidfd], [], [], 0)[0])


def running(pidfds, deadline):
    """Wait until every process behind pidfds has exited or deadline passes; the pidfds still running."""
    left = list(pidfds)
    while left and time.monotonic() < deadline:
        poller = select.poll()
        for pidfd in left:
            poller.register(pidfd, select.POLLIN)
        exited = {fd for fd, _ in poller.poll(poll_timeout(deadline))}
        left = [pidfd for pidfd in left if pidfd not in exited]
    return left


def poll_timeout(*deadlines):
    """poll(2)'s timeout for the earliest of deadlines (time.monotonic(), None for none): ms, rounded up; None: no limit."""
    due = [deadline for deadline in deadlines if deadline is not None]
    return None if not due else max(0, int((min(due) - time.monotonic()) * 1000) + 1)


def catch_signals(numbers):
    """Have these signals written to a pipe (Python's wakeup fd) instead of acting; the read end, for poll(2).

    Nothing is lost between a look and the wait: a signal that comes
    meanwhile is already in the pipe.
    """
    read_end, write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    for number in numbers:
        signal.signal(number, _written)
    return read_end


def _written(number, frame):
    pass  # the wakeup fd carries it


def caught_signals(read_end):
    """The numbers of the signals caught since the last call, in order."""
    try:
        return list(os.read(read_end, 1024))
    except BlockingIOError:
        return []


# prctl(2) options (linux/prctl.h)
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36


def prctl(option, *arguments):
    """prctl(2) through libc; OSError if the kernel refuses. bytes arguments are passed as char *."""
    import ctypes

    padded = [ctypes.c_char_p(a) if isinstance(a, bytes) else ctypes.c_ulong(a) for a in (*arguments, 0, 0, 0, 0)[:4]]
    if libc_prctl()(ctypes.c_int(option), *padded) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))


@functools.cache
def libc():
    """The C library, loaded on first use: most links never need ctypes (tests/test_imports.py)."""
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


@functools.cache
def libc_prctl():
    """The C library's prctl, found once: a server's children find it found."""
    return libc().prctl


def become_subreaper():
    """Inherit the orphans of every process below us (PR_SET_CHILD_SUBREAPER)."""
    try:
        prctl(PR_SET_CHILD_SUBREAPER, 1)
    except OSError as error:
        raise syscall_error("become a child subreaper", error) from None


def die_with(parent):
    """SIGTERM when parent dies, even by SIGKILL; False if it was gone already.

    The setting survives execve(2) (prctl(2), PR_SET_PDEATHSIG); a parent
    already gone before it was made is caught by the getppid() check.
    """
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    return os.getppid() == parent


def name_self(name):
    """The name ps(1) and top(1) show (comm, 15 bytes at most); nothing if the kernel refuses.

    By PR_SET_NAME when ctypes is loaded already; else written to
    /proc/self/comm, which takes no ctypes, or, where that file is not ours
    to write (a process that changed its user is not dumpable, and its /proc
    files are root's), by PR_SET_NAME all the same.
    """
    text = os.fsencode(name)[:15]
    if "ctypes" in sys.modules or not write_own("comm", text):
        try:
            prctl(PR_SET_NAME, text)
        except (OSError, ImportError):
            pass


def set_arguments(words):
    """What ps -o args and pgrep -f show for this process (/proc/self/cmdline): its first word, then words.

    The first word stays the one the kernel gave it (the interpreter named
    on a script's #! line). Written over the command line in place (as
    setproctitle(3) does, but never past its end): cut to its length, the
    rest filled with NULs, which ps(1) and pgrep(1) do not show. So the
    environment after it (/proc/self/environ) is left as it was, and the
    last byte stays NUL: the kernel reads the area as argument strings.
    By ctypes, or through /proc/self/mem, as name_self chooses; nothing if
    neither can.
    """
    area = command_line_area()
    if area is None:
        return
    start, end, first = area
    text = b"\0".join([first, *(os.fsencode(word) for word in words)])[: end - start - 1].ljust(end - start, b"\0")
    if "ctypes" not in sys.modules and write_own("mem", text, start):
        return
    try:
        import ctypes
    except ImportError:
        return
    ctypes.memmove(start, text, len(text))


def write_own(name, data, offset=None):
    """Write data to this process's /proc/self/NAME (at offset, for mem); False if it is not ours to write (EACCES).

    Each /proc/self file a process opens is an entry the kernel drops when
    the process is reaped: a server's children prefer ctypes, which it has
    loaded for them (cli.program).
    """
    try:
        fd = os.open(f"/proc/self/{name}", os.O_WRONLY | os.O_CLOEXEC)
    except (PermissionError, FileNotFoundError):
        return False  # not dumpable (a change of user), or no /proc (a chroot)
    try:
        if offset is None:
            os.write(fd, data)
        else:
            os.pwrite(fd, data, offset)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


@functools.cache
def command_line_area():
    """Return (start, end, first word) of this process's argument strings (proc(5), /proc/PID/stat fields 48 and 49), or None.

    Read once: a forked child has a copy of the same memory at the same
    addresses, and set_arguments keeps the first word as it is.
    """
    fields = stat_fields(os.getpid())
    if fields is None or len(fields) < 47 or not 0 < int(fields[45]) < int(fields[46]):
        return None
    start, end = int(fields[45]), int(fields[46])
    fd = os.open("/proc/self/cmdline", os.O_RDONLY | os.O_CLOEXEC)
    try:
        first = os.read(fd, end - start).split(b"\0", 1)[0]
    finally:
        os.close(fd)
    return start, end, first


def procfs_is_ours():
    """True if /proc shows this process's pid namespace: its 'self' is our own pid.

    Under a /proc mounted for another namespace (unshare --pid without
    --mount-proc) every pid read there would name some other process here.
    """
    try:
        return os.readlink("/proc/self") == str(os.getpid())
    except OSError:
        return False


def age_of(pid):
    """Seconds since pid started (to a clock tick, field 22 of /proc/PID/stat), or None if it is gone."""
    fields = stat_fields(pid)
    if fields is None:
        return None
    return time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")


def terminal_we_lead():
    """0 if stdin is a terminal whose foreground process group is ours, else None: whether a child may take it."""
    try:
        return 0 if os.tcgetpgrp(0) == os.getpgrp() else None
    except OSError:
        return None  # not a terminal, or none of ours


def lead_own_group(terminal):
    """Make this process the leader of a new process group, and with terminal (a fd) that terminal's foreground group.

    Done by the new group's own member, as tini does: with SIGTTOU blocked,
    tcsetpgrp(3) from a background group is allowed. A terminal refused is
    not fatal: the program still runs, only not in the foreground.
    """
    os.setpgid(0, 0)
    if terminal is None:
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
    try:
        os.tcsetpgrp(terminal, os.getpgrp())
    except OSError:
        pass
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
