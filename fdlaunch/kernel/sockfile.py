"""Unix socket files, reached only through descriptors of their directory.

A socket's path is walked one component at a time (openat with
O_PATH|O_NOFOLLOW), so a name someone else can change is never looked up
twice: the stale socket is examined, probed and removed, the socket bound
is found and given its owner and mode, and our files are removed, all
relative to the one directory descriptor the walk gave, or through an
O_PATH descriptor of the file itself (/proc/self/fd/N names exactly that
inode). fdlaunch-listen(1), Unix socket files, states the rules kept here.
"""

import _socket as socket  # not socket.py: tests/test_imports.py
import contextlib
import errno
import fcntl
import os
import signal
import stat

from fdlaunch.errors import Fatal, UsageError, quoted, syscall_error

# linux/un.h: SIOCPROTOPRIVATE + 0, an O_PATH descriptor of the very file a
# unix socket is bound to (Linux 4.11, needs CAP_NET_ADMIN).
SIOCUNIXFILE = 0x89E0
# An entry as it is, a symlink included; opening it needs no permission on it.
ENTRY = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
SYMLINKS_MAX = 40  # as the kernel's own path walk (path_resolution(7))
# Cleanup runs to its end whatever comes: these are held (blocked) meanwhile.
STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


@contextlib.contextmanager
def stops_held():
    """Stop signals wait (blocked) until the block ends, then act as they would have."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def through(fd):
    """The name of exactly the inode fd holds, whatever its path has become since."""
    return f"/proc/self/fd/{fd}"


class Directory:
    """Where a unix socket's file goes: a descriptor of its directory (closed on leaving a with block) and the file's name in it."""

    def __init__(self, fd, name, path):
        self.fd, self.name, self.path = fd, name, path  # path: the socket's, as asked

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        os.close(self.fd)

    def entry(self):
        """An O_PATH descriptor of the file at our name, a symlink included; None if there is none."""
        try:
            return os.open(self.name, ENTRY, dir_fd=self.fd)
        except FileNotFoundError:
            return None

    def remove(self, inode):
        """Remove our name if it still names inode (st_dev, st_ino); never anything else, never through a symlink."""
        try:
            now = os.stat(self.name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if (now.st_dev, now.st_ino) == inode:
            (os.rmdir if stat.S_ISDIR(now.st_mode) else os.unlink)(self.name, dir_fd=self.fd)


def directory_of(path, shared, made=None):
    """The Directory of the socket file at path, the path walked through descriptors only.

    A symlink on the way is followed only where nobody but root or we could
    have put it there. As root, no directory on the way may be one someone
    else can rename or replace, and (unless shared) the last one must be one
    nobody else can write. made: a list to which each directory created on
    the way is added, as (path, (st_dev, st_ino)), outermost first, for the
    mkdir option; None: a missing directory is an error.
    """
    parent, name = os.path.split(path)
    root = os.geteuid() == 0
    fd, walked = _walk(path, parent, root, made)
    try:
        info = os.fstat(fd)
        if root and not shared and _writable_by_others(info):
            raise UsageError(
                f"unable to bind {quoted(path)}: directory {quoted(walked)} is writable by others ({_ownership(info)}); "
                "as root a socket goes in a directory only root can write, unless the spec says shareddir"
            )
    except BaseException:
        os.close(fd)
        raise
    return Directory(fd, name, path)


def _walk(path, directory, root, made):
    """Return an O_PATH descriptor of directory and the directory as walked, reached one component at a time."""
    here, where, info = _start(directory)
    todo = directory.split("/")[::-1]  # a stack: the next component last
    links = 0
    try:
        while todo:
            component = todo.pop()
            if component in ("", "."):
                continue
            below = os.path.join(where, component)
            child = _open_entry(here, info, component, below, root, path, directory, made)
            try:
                entry = os.fstat(child)
                if stat.S_ISLNK(entry.st_mode):
                    target = _link_target(child, info, entry, below, path)
                elif not stat.S_ISDIR(entry.st_mode):
                    raise syscall_error(f"open directory {quoted(below)}", OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)))
                elif root and not _held(info, entry.st_uid):
                    raise UsageError(
                        f"unable to bind {quoted(path)}: {quoted(below)} can be replaced by others, its directory being "
                        f"writable by them ({_ownership(info)}); as root a socket's path goes through directories only root can change"
                    )
            except BaseException:
                os.close(child)
                raise
            if stat.S_ISDIR(entry.st_mode):
                os.close(here)
                here, where, info = child, below, entry
                continue
            os.close(child)
            links += 1
            if links > SYMLINKS_MAX:
                raise syscall_error(f"bind {quoted(path)}", OSError(errno.ELOOP, os.strerror(errno.ELOOP)))
            todo.extend(target.split("/")[::-1])
            if target.startswith("/"):
                os.close(here)
                here, where, info = _start(target)
        return here, where
    except BaseException:
        os.close(here)
        raise


def _start(path):
    """(descriptor, name, stat) of where a walk of path begins: / for an absolute path, else the working directory."""
    where = "/" if path.startswith("/") else "."
    fd = os.open(where, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return fd, where, os.fstat(fd)


def _open_entry(here, info, component, below, root, path, directory, made):
    """An O_PATH descriptor of component in here, made first if it is missing and made is a list."""
    try:
        return os.open(component, ENTRY, dir_fd=here)
    except FileNotFoundError:
        if made is None:
            raise Fatal(
                f"unable to bind {quoted(path)}: directory {quoted(directory)} does not exist (the mkdir option makes it)"
            ) from None
        return _make(here, info, component, below, root, made)
    except OSError as error:
        raise syscall_error(f"open directory {quoted(below)}", error) from None


def _link_target(link, info, entry, below, path):
    """What symlink link says, if nobody but root or we could have made or changed it.

    The kernel's protected_symlinks rule, kept whatever the sysctl says.
    """
    if not _held(info, entry.st_uid):
        raise UsageError(
            f"unable to bind {quoted(path)}: not following symlink {quoted(below)}, in a directory others can write ({_ownership(info)})"
        )
    return os.readlink("", dir_fd=link)


def _make(here, info, component, below, root, made):
    """Directory component, created in here with mode 0755 through descriptors; an O_PATH descriptor of it."""
    if root and not _held(info, os.geteuid()):
        raise UsageError(
            f"unable to create directory {quoted(below)}: its directory is writable by others ({_ownership(info)}), "
            "who could replace it; as root a socket's path goes through directories only root can change"
        )
    try:
        # Mode 0700 until it has its own: never reachable more widely than asked.
        os.mkdir(component, 0o700, dir_fd=here)
        created = True
    except FileExistsError:
        created = False  # made meanwhile by someone else: examined as any directory found
    except OSError as error:
        raise syscall_error(f"create directory {quoted(below)}", error) from None
    try:
        child = os.open(component, ENTRY, dir_fd=here)
    except OSError as error:
        raise syscall_error(f"open directory {quoted(below)}", error) from None
    entry = os.fstat(child)
    if created and stat.S_ISDIR(entry.st_mode) and entry.st_uid == os.geteuid():
        made.append((below, (entry.st_dev, entry.st_ino)))
        try:
            os.chmod(through(child), 0o755)
        except OSError as error:
            os.close(child)
            raise syscall_error(f"change the mode of {quoted(below)}", error) from None
    return child


def remove_stale(directory, kind):
    """Remove a socket file nobody listens on at our name; refuse a live socket or any other file."""
    entry = directory.entry()
    if entry is None:
        return
    path = directory.path
    try:
        info = os.fstat(entry)
        if not stat.S_ISSOCK(info.st_mode):
            raise Fatal(f"unable to bind {quoted(path)}: it exists and is not a socket; not removing it")
        # Non-blocking: a live listener whose backlog is full answers EAGAIN
        # (unix(7)) where a blocking connect would wait for it forever.
        probe = socket.socket(socket.AF_UNIX, kind | socket.SOCK_NONBLOCK)
        try:
            probe.connect(through(entry))  # that very file, not whatever the name holds by now
        except ConnectionRefusedError:
            directory.remove((info.st_dev, info.st_ino))  # stale: left by a listener that is gone
            return
        except BlockingIOError:
            pass  # live, with its backlog full
        except OSError as error:
            if error.errno == errno.EPROTOTYPE:
                raise Fatal(f"unable to bind {quoted(path)}: a socket of another type is listening there") from None
            raise syscall_error(f"bind {quoted(path)}", error) from None
        finally:
            probe.close()
        raise Fatal(f"unable to bind {quoted(path)}: a socket is already listening there")
    finally:
        os.close(entry)


def bound_file(sock, directory):
    """An O_PATH descriptor of the file sock was just bound to, and its (st_dev, st_ino); what is not ours is refused.

    Ours: the inode the kernel says the socket is bound to (SIOCUNIXFILE);
    without CAP_NET_ADMIN, a socket at our name with one link, owned by us
    and still mode 0000, as a bind under umask 0777 makes it. Either way it
    must be at our name in the directory walked.
    """
    exact = _bound_inode(sock)
    entry = directory.entry()
    try:
        info = os.fstat(entry) if entry is not None else None
        inode = None if info is None else (info.st_dev, info.st_ino)
        if exact is not None:
            ours = inode == exact
        else:
            ours = info is not None and stat.S_ISSOCK(info.st_mode) and info.st_uid == os.geteuid()
            ours = ours and info.st_nlink == 1 and stat.S_IMODE(info.st_mode) == 0
        if not ours:
            raise Fatal(
                f"unable to bind {quoted(directory.path)}: the file there is not the socket just bound: "
                "someone who can write its directory replaced it"
            )
    except BaseException:
        if entry is not None:
            os.close(entry)
        raise
    return entry, inode


def _bound_inode(sock):
    """(st_dev, st_ino) of the file sock is bound to, as the kernel knows it; None if it will not say."""
    try:
        fd = fcntl.ioctl(sock.fileno(), SIOCUNIXFILE)
    except OSError:
        return None  # no CAP_NET_ADMIN (EPERM), or a kernel without it
    try:
        info = os.fstat(fd)
        return info.st_dev, info.st_ino
    finally:
        os.close(fd)


def _trusted(uid):
    return uid == 0 or uid == os.geteuid()


def _writable_by_others(info):
    """Whether someone other than root or us may create, rename or remove entries in this directory.

    Its owner always may (it can chmod); group and other write bits say the
    rest, and with a POSIX ACL the group bits are its mask, so a named
    user's write shows there too (acl(5)).
    """
    return not _trusted(info.st_uid) or bool(info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _held(directory, owner):
    """Whether nobody but root or us can rename, replace or remove an entry owned by owner in directory.

    In a sticky directory only the entry's owner, the directory's owner and
    root can (the rule of /tmp, inode(7)).
    """
    if not _writable_by_others(directory):
        return True
    return bool(directory.st_mode & stat.S_ISVTX) and _trusted(directory.st_uid) and _trusted(owner)


def _ownership(info):
    return f"owner uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o}"


def remove(path, inode):
    """Remove the file or directory inode (st_dev, st_ino) at path, if path still names it; quietly, on the way out.

    The path is walked again as for a bind: our descriptors would not
    survive the moves that put the program's sockets in place.
    """
    try:
        with directory_of(path, shared=True) as directory:
            directory.remove(inode)
    except (Fatal, OSError):
        pass
