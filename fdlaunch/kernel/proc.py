"""Processes as /proc shows them: who descends from whom, and which pid a pidfd holds."""

import os

from fdlaunch.text import notifyproto


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
        try:
            pid = notifyproto.parent_of(read_proc(f"/proc/{pid}/stat"))
        except (OSError, ValueError, IndexError):
            return ()  # gone, or an ancestor went away under us
    if not chain or (pidfd is not None and pid_of(pidfd) != chain[0]):
        return ()
    return tuple(chain)


def lineage_of(pid):
    """lineage() of a pid read in a message (a MAINPID): () unless it is a process here now."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return ()
    try:
        return lineage(pid, pidfd)
    finally:
        os.close(pidfd)


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
