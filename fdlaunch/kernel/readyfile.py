"""A file whose presence says that a program is ready, for an orchestrator's probe (test -e FILE).

Its directory is opened once, when the tool starts, one name at a time: a
symbolic link is followed only out of a directory that nobody but root and
this user can change, and every directory on the way must belong to one of
them (a sticky directory such as /tmp may be passed through, never held in).
The directory itself must be writable by nobody else, since anyone who can
write there can make the file appear or disappear. From then on everything
goes through that descriptor, never through the path again: the file is
written under a temporary name and renamed into place, so it appears whole
(mode 0644), and it is removed only while its name still holds the file made.
"""

import errno
import os
import stat

from fdlaunch.errors import Fatal, UsageError, quoted, syscall_error

LINKS_MAX = 40  # as path_resolution(7): more symbolic links than this on one path is a loop
DIRECTORY = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


class ReadyFile:
    """FILE, made when ready and removed at the end, through a descriptor on its directory."""

    def __init__(self, path):
        self.path = path
        self.name = os.path.basename(path)
        if self.name in ("", ".", ".."):
            raise UsageError(f"--touch={path!r} names a directory; it needs a file name, for instance /run/app/ready")
        self.directory = open_directory(os.path.dirname(path) or ".", path)
        self.made = None  # (st_dev, st_ino) of the file, once made

    def fileno(self):
        return self.directory

    def create(self):
        """Put the file in place, whole and mode 0644 whatever the umask; Fatal if that fails."""
        temporary = f".{os.urandom(8).hex()}.fdlaunch-ready"
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=self.directory)
        except OSError as error:
            raise syscall_error(f"create {quoted(self.path)}", error) from None
        try:
            os.fchmod(fd, 0o644)
            info = os.fstat(fd)
            os.rename(temporary, self.name, src_dir_fd=self.directory, dst_dir_fd=self.directory)
        except OSError as error:
            os.unlink(temporary, dir_fd=self.directory)
            raise syscall_error(f"create {quoted(self.path)}", error) from None
        finally:
            os.close(fd)
        self.made = (info.st_dev, info.st_ino)

    def remove(self):
        """Remove the file if we made it and its name still holds it; Fatal if that fails."""
        if self.made is None:
            return
        made, self.made = self.made, None
        try:
            info = os.stat(self.name, dir_fd=self.directory, follow_symlinks=False)
            if (info.st_dev, info.st_ino) == made:
                os.unlink(self.name, dir_fd=self.directory)
        except FileNotFoundError:
            return  # removed by someone else: what we would have done
        except OSError as error:
            raise syscall_error(f"remove {quoted(self.path)}", error) from None

    def close(self):
        os.close(self.directory)


def open_directory(path, wanted):
    """An O_PATH descriptor on directory path, reached as this module's docstring says; wanted is the option's FILE, for messages."""
    todo = [part for part in reversed(path.split("/")) if part not in ("", ".")]
    here = os.open("/" if path.startswith("/") else ".", DIRECTORY)
    links = 0
    try:
        while todo:
            part = todo.pop()
            info = os.stat(part, dir_fd=here, follow_symlinks=False)
            if stat.S_ISLNK(info.st_mode):
                if others_may_change(os.fstat(here)):
                    raise refused(
                        wanted, f"the symbolic link {part!r} is in a directory other users can write, who could point it anywhere"
                    )
                links += 1
                if links > LINKS_MAX:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
                target = os.readlink(part, dir_fd=here)
                todo.extend(p for p in reversed(target.split("/")) if p not in ("", "."))
                if target.startswith("/"):
                    os.close(here)
                    here = os.open("/", DIRECTORY)
                continue
            if others_may_change(os.fstat(here)) and not os.fstat(here).st_mode & stat.S_ISVTX:
                raise refused(wanted, f"{part!r} is in a directory other users can write, who could put anything there")
            # O_NOFOLLOW: a link swapped in since the look above is refused, not followed.
            step = os.open(part, DIRECTORY | os.O_NOFOLLOW, dir_fd=here)
            os.close(here)
            here = step
            if not owned_by_us(os.fstat(here)):
                raise refused(wanted, f"the directory {part!r} on its path belongs to another user")
        if others_may_change(os.fstat(here)):
            raise refused(wanted, "its directory is writable by other users, who could make the file appear or remove it")
        if not owned_by_us(os.fstat(here)):
            raise refused(wanted, "its directory belongs to another user")
        if not os.access(".", os.W_OK | os.X_OK, dir_fd=here, effective_ids=True):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        return here
    except OSError as error:
        os.close(here)
        raise syscall_error(f"open the directory of --touch={quoted(wanted)}", error) from None
    except Fatal:
        os.close(here)
        raise


def others_may_change(info):
    """True if users other than root and us may write in the directory info describes."""
    return bool(info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)) or not owned_by_us(info)


def owned_by_us(info):
    return info.st_uid in (0, os.geteuid())


def refused(wanted, why):
    return UsageError(f"--touch={wanted!r} refused: {why}; use a directory that only root or this user can write, such as /run/NAME")
