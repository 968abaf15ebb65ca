"""seccomp(2) user notification: a filter that sends bind(2) to a supervisor, and the supervisor's calls.

seccomp_unotify(2) and the kernel's Documentation/userspace-api/seccomp_filter.rst
describe the protocol. It needs Linux 5.9 or later (SECCOMP_IOCTL_NOTIF_ADDFD).
The structures are laid out alike on x86-64 and aarch64 (both LP64); what
differs between them (the audit architecture, the system call numbers, and
in principle the ioctl encoding) comes from the table below, chosen at run
time by the machine this runs on.
"""

import ctypes
import errno
import functools
import os
from collections import namedtuple

from fdlaunch.errors import Fatal, syscall_error
from fdlaunch.kernel import proc

# audit: AUDIT_ARCH_* (linux/audit.h), what seccomp_data.arch holds for a
# native system call; bind, seccomp, pidfd_getfd: system call numbers;
# ioc_write, ioc_read: the direction bits of _IOC (asm-generic/ioctl.h).
Arch = namedtuple("Arch", "name audit bind seccomp pidfd_getfd ioc_write ioc_read")
ARCHITECTURES = {
    "x86_64": Arch("x86-64", 0xC000003E, 49, 317, 438, 1, 2),
    "aarch64": Arch("aarch64", 0xC00000B7, 200, 277, 438, 1, 2),
}

# linux/seccomp.h
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_GET_NOTIF_SIZES = 3
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
SECCOMP_ADDFD_FLAG_SETFD = 1
SECCOMP_IOC_MAGIC = ord("!")
# linux/bpf_common.h and linux/filter.h
BPF_LD_W_ABS = 0x00 | 0x00 | 0x20
BPF_JEQ_K = 0x05 | 0x10 | 0x00
BPF_RET_K = 0x06 | 0x00
NR_OFFSET, ARCH_OFFSET = 0, 4  # in struct seccomp_data
PR_SET_NO_NEW_PRIVS = 38
PR_SET_PTRACER = 0x59616D61  # Yama's exception for one tracer (prctl(2)); EINVAL where Yama is not built in


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]


class SeccompData(ctypes.Structure):
    _fields_ = [("nr", ctypes.c_int), ("arch", ctypes.c_uint32), ("instruction_pointer", ctypes.c_uint64), ("args", ctypes.c_uint64 * 6)]


class Notif(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("pid", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("data", SeccompData)]


class NotifResp(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("val", ctypes.c_int64), ("error", ctypes.c_int32), ("flags", ctypes.c_uint32)]


class NotifAddfd(ctypes.Structure):
    _fields_ = [
        ("id", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("srcfd", ctypes.c_uint32),
        ("newfd", ctypes.c_uint32),
        ("newfd_flags", ctypes.c_uint32),
    ]


class NotifSizes(ctypes.Structure):
    _fields_ = [("seccomp_notif", ctypes.c_uint16), ("seccomp_notif_resp", ctypes.c_uint16), ("seccomp_data", ctypes.c_uint16)]


class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


# A bind(2) waiting for an answer: the notification's id, the thread that
# made it, and the call's arguments (fd, address pointer, address length).
Bind = namedtuple("Bind", "id tid fd address length")


def ioctl_number(arch, write, read, number, size):
    """_IOC(dir, '!', number, size), as linux/seccomp.h builds SECCOMP_IOCTL_NOTIF_*."""
    direction = (arch.ioc_write if write else 0) | (arch.ioc_read if read else 0)
    return direction << 30 | size << 16 | SECCOMP_IOC_MAGIC << 8 | number


def ioctls(arch):
    """{name: number} of the four ioctls of a notification listener."""
    return {
        "recv": ioctl_number(arch, True, True, 0, ctypes.sizeof(Notif)),
        "send": ioctl_number(arch, True, True, 1, ctypes.sizeof(NotifResp)),
        "id_valid": ioctl_number(arch, True, False, 2, ctypes.sizeof(ctypes.c_uint64)),
        "addfd": ioctl_number(arch, True, False, 3, ctypes.sizeof(NotifAddfd)),
    }


@functools.cache
def libc():
    """The C library with the prototypes used here, in its own handle: other users of ctypes keep theirs."""
    library = ctypes.CDLL(None, use_errno=True)
    library.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
    library.process_vm_readv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    library.process_vm_readv.restype = ctypes.c_ssize_t
    library.syscall.restype = ctypes.c_long
    return library


def _syscall(number, *arguments):
    """syscall(2), every argument a long (it is variadic); the result, or OSError."""
    result = libc().syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in arguments))
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def native():
    """The Arch of this machine, if the kernel offers user notification; else Fatal naming what is missing (111)."""
    machine = os.uname().machine
    arch = ARCHITECTURES.get(machine)
    if arch is None:
        raise Fatal(f"unable to adopt sockets on {machine}: fdlaunch-adopt knows the system calls of x86-64 and aarch64 only")
    if ctypes.sizeof(ctypes.c_void_p) != 8:
        raise Fatal(f"unable to adopt sockets: this Python is a 32-bit program on {arch.name}; the filter needs a 64-bit one")
    try:
        sizes = kernel_sizes(arch)
    except OSError as error:
        raise Fatal(
            f"unable to adopt sockets: the kernel offers no seccomp user notification ({error.strerror}); "
            "it needs Linux 5.9 or later, built with CONFIG_SECCOMP_FILTER"
        ) from None
    for name, ours in (("seccomp_notif", Notif), ("seccomp_notif_resp", NotifResp), ("seccomp_data", SeccompData)):
        if getattr(sizes, name) < ctypes.sizeof(ours):
            raise Fatal(f"unable to adopt sockets: the kernel's struct {name} is {getattr(sizes, name)} bytes, not {ctypes.sizeof(ours)}")
    return arch


def kernel_sizes(arch):
    """The kernel's sizes of the notification structures (SECCOMP_GET_NOTIF_SIZES); OSError without user notification."""
    sizes = NotifSizes()
    _syscall(arch.seccomp, SECCOMP_GET_NOTIF_SIZES, 0, ctypes.addressof(sizes))
    return sizes


def bind_filter(arch):
    """The BPF program: bind(2) of this architecture goes to the listener, everything else runs.

    The architecture is checked first, as seccomp(2) requires: a system call
    of another ABI (i386 on x86-64, x32's numbers) has other numbers and is let through.
    """
    program = [
        (BPF_LD_W_ABS, 0, 0, ARCH_OFFSET),
        (BPF_JEQ_K, 0, 3, arch.audit),  # another architecture: ALLOW
        (BPF_LD_W_ABS, 0, 0, NR_OFFSET),
        (BPF_JEQ_K, 0, 1, arch.bind),  # not bind: ALLOW
        (BPF_RET_K, 0, 0, SECCOMP_RET_USER_NOTIF),
        (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]
    return (SockFilter * len(program))(*(SockFilter(*instruction) for instruction in program))


def install(arch):
    """Install the bind filter on this process; (the listener's fd, whether no_new_privs had to be set).

    Without CAP_SYS_ADMIN the kernel takes a filter only with no_new_privs
    set (seccomp(2), EACCES): then it is set, and stays set for the program.
    """
    instructions = bind_filter(arch)
    program = SockFprog(len(instructions), instructions)
    call = (arch.seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER, ctypes.addressof(program))
    try:
        return _syscall(*call), False
    except OSError as error:
        if error.errno != errno.EACCES:
            raise _install_failed(error) from None
    try:
        proc.prctl(PR_SET_NO_NEW_PRIVS, 1)
        return _syscall(*call), True
    except OSError as error:
        raise _install_failed(error) from None


def _install_failed(error):
    if error.errno == errno.EBUSY:
        return Fatal(
            "unable to install the bind filter: a seccomp filter of this process already has a listener "
            "(an fdlaunch-adopt earlier in the chain, or a container manager's)"
        )
    return syscall_error("install the bind filter", error)


def check_addfd(arch, listener):
    """Fatal (111) unless the kernel has SECCOMP_IOCTL_NOTIF_ADDFD with SETFD (Linux 5.9).

    Asked for a notification that does not exist, a kernel that knows the
    call says ENOENT; one that does not know it, EINVAL.
    """
    request = NotifAddfd(id=0, flags=SECCOMP_ADDFD_FLAG_SETFD, srcfd=listener, newfd=listener, newfd_flags=0)
    if libc().ioctl(listener, ioctls(arch)["addfd"], ctypes.addressof(request)) == 0:
        return
    code = ctypes.get_errno()
    if code != errno.ENOENT:
        reason = os.strerror(code)
        raise Fatal(f"unable to adopt sockets: the kernel lacks SECCOMP_IOCTL_NOTIF_ADDFD ({reason}); it needs Linux 5.9 or later")


def allow_tracer(pid):
    """Let pid read this process's memory under Yama's ptrace_scope=1; nothing where Yama is not there.

    The exception survives execve(2): Yama has no hook on exec.
    """
    try:
        proc.prctl(PR_SET_PTRACER, pid)
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise syscall_error(f"let the supervisor (pid {pid}) read the program's memory", error) from None


class Listener:
    """The supervisor's end: receive a bind, read its address, answer it.

    Every buffer is made once: a continued bind costs two ioctls and one
    process_vm_readv, and as little Python as can be.
    """

    def __init__(self, arch, fd):
        self.arch, self.fd = arch, fd
        numbers = ioctls(arch)
        self.recv_number, self.send_number = numbers["recv"], numbers["send"]
        self.id_valid_number, self.addfd_number = numbers["id_valid"], numbers["addfd"]
        library = libc()
        self.ioctl, self.readv = library.ioctl, library.process_vm_readv
        # Buffers as large as the kernel's structures, should a later kernel's be larger than ours.
        sizes = kernel_sizes(arch)
        self.notif_buffer = ctypes.create_string_buffer(max(sizes.seccomp_notif, ctypes.sizeof(Notif)))
        self.notif = Notif.from_buffer(self.notif_buffer)
        self.notif_address, self.notif_size = ctypes.addressof(self.notif_buffer), len(self.notif_buffer)
        self.response_buffer = ctypes.create_string_buffer(max(sizes.seccomp_notif_resp, ctypes.sizeof(NotifResp)))
        self.response = NotifResp.from_buffer(self.response_buffer)
        self.response_address = ctypes.addressof(self.response_buffer)
        self.addfd = NotifAddfd()
        self.checked_id = ctypes.c_uint64()
        self.buffer = ctypes.create_string_buffer(256)
        self.local = IoVec(ctypes.addressof(self.buffer), 0)
        self.remote = IoVec(0, 0)
        self.local_address, self.remote_address = ctypes.addressof(self.local), ctypes.addressof(self.remote)

    def receive(self):
        """The next bind waiting, as a Bind; None if its caller is gone already (or a signal came)."""
        ctypes.memset(self.notif_address, 0, self.notif_size)  # the kernel refuses a buffer that is not zeroed
        if self.ioctl(self.fd, self.recv_number, self.notif_address) != 0:
            code = ctypes.get_errno()
            if code in (errno.ENOENT, errno.EINTR):
                return None
            raise OSError(code, os.strerror(code))
        args = self.notif.data.args
        length = args[2] & 0xFFFFFFFF
        return Bind(self.notif.id, self.notif.pid, ctypes.c_int(args[0] & 0xFFFFFFFF).value, args[1], length - (length >> 31 << 32))

    def read(self, tid, address, length):
        """length bytes at address in tid's memory; None where the kernel could not read them (EFAULT).

        Other errors (the thread gone, no permission to read) raise OSError.
        """
        self.local.len = self.remote.len = length
        self.remote.base = address
        count = self.readv(tid, self.local_address, 1, self.remote_address, 1, 0) if length else 0
        if count < 0:
            code = ctypes.get_errno()
            if code == errno.EFAULT:
                return None
            raise OSError(code, os.strerror(code))
        return self.buffer.raw[:count]

    def valid(self, notification_id):
        """Whether the bind is still waiting: its thread has not died (and its pid is not reused)."""
        self.checked_id.value = notification_id
        return self.ioctl(self.fd, self.id_valid_number, ctypes.addressof(self.checked_id)) == 0

    def answer(self, notification_id, error=0, proceed=False):
        """Let the kernel do the bind (proceed), or make it return 0 or fail with errno error; False if its caller is gone."""
        response = self.response
        response.id, response.val = notification_id, 0
        response.error = -error
        response.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE if proceed else 0
        if self.ioctl(self.fd, self.send_number, self.response_address) == 0:
            return True
        code = ctypes.get_errno()
        if code == errno.ENOENT:
            return False
        raise OSError(code, os.strerror(code))

    def place(self, notification_id, source, target, cloexec):
        """Put our fd source in the caller's process at fd target, replacing what is there; OSError if not.

        ENOENT: the caller is gone or no longer waiting, and nothing was placed.
        """
        request = self.addfd
        request.id, request.flags, request.srcfd, request.newfd = notification_id, SECCOMP_ADDFD_FLAG_SETFD, source, target
        request.newfd_flags = os.O_CLOEXEC if cloexec else 0
        if self.ioctl(self.fd, self.addfd_number, ctypes.addressof(request)) < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))


def take_fd(arch, pidfd, fd):
    """A duplicate of fd of the process behind pidfd, close-on-exec (pidfd_getfd(2)); OSError if not."""
    return _syscall(arch.pidfd_getfd, pidfd, fd, 0)
