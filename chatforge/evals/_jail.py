"""Sandbox launcher: ``python -I -S _jail.py CONTROL_FD`` stands by and builds one jail per request.

Runs as a standalone script (standard library only, no chatforge import) so that nothing of the evaluator's
state reaches the jail. It is started once per interpreter path and kept: each request on the control
socket (a Unix SEQPACKET socket) carries a marshalled spec and three descriptors (the program's stdout and
stderr, a status pipe), and is served by a fork of this warm process; in ``namespace`` mode the program
itself runs in that fork (``run_here``). Both save interpreter starts (~20 ms each) and the ctypes import
on every program. ``chatforge.evals.sandbox`` documents what each step contains and why; this file only
performs them.

On the status pipe the forked jail writes ``pid N`` (its process group, for the host to kill), then ``ok``
right before running the program or ``error: <message>`` if a setup step failed, so the host can tell a
broken jail from a failing program, and last ``exit N`` with the program's exit code (128 + signal).

Process tree in ``namespace`` mode::

    launcher (stands by; forks one outer per request)
     └─ outer (host namespaces, own session; writes the child's uid/gid maps, waits, reports the exit)
         └─ A (new user/mount/net/ipc/uts namespaces; becomes the mapped user, waits)
             └─ B (pid 1 of a new pid namespace; builds the root, drops every privilege, waits)
                 └─ C (the program)
"""

from __future__ import annotations

import ctypes
import marshal
import os
import resource
import signal
import socket
import struct
import sys

# linux/sched.h, linux/mount.h, linux/prctl.h, linux/capability.h, linux/securebits.h, linux/seccomp.h
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWCGROUP = 0x10000000, 0x20000000, 0x40000000, 0x02000000
NAMESPACES = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWPID
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
ST_RELATIME = 4096
MNT_DETACH = 2
O_PATH = 0o10000000
PR_SET_PDEATHSIG, PR_SET_SECCOMP, PR_CAPBSET_DROP, PR_SET_SECUREBITS = 1, 22, 24, 28
PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 47, 4
SECBIT_NOROOT, SECBIT_NOROOT_LOCKED, SECBIT_KEEP_CAPS_LOCKED = 1, 2, 32
SYS_PIVOT_ROOT = 155
LINUX_CAPABILITY_VERSION_3 = 0x20080522

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
libc.capset.argtypes = [ctypes.c_char_p, ctypes.c_char_p]


class SetupError(Exception):
    pass


def check(result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(errno)}")
    return result


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {source} on {target}")


def prctl(option: int, arg: int = 0, arg2: int = 0) -> None:
    check(libc.prctl(option, arg, arg2, 0, 0), f"prctl({option})")


# --- the pieces -----------------------------------------------------------------------------------------------


def set_limits(limits: dict) -> None:
    cpu = limits["cpu_seconds"]
    # soft CPU limit sends SIGXCPU (default: die); the hard one a SIGKILL a second later for programs that catch it
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    memory = limits["memory_bytes"]
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    if limits["max_processes"]:
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_processes"],) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["max_open_files"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def last_capability() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as fh:
        return int(fh.read())


def drop_privileges(last_cap: int) -> None:
    """No capability survives the exec, none can be regained, and no set-uid binary can grant any."""
    for cap in range(last_cap + 1):
        prctl(PR_CAPBSET_DROP, cap)
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    # uid 0 inside the namespace must not be granted capabilities again by the exec
    prctl(PR_SET_SECUREBITS, SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_KEEP_CAPS_LOCKED)
    prctl(PR_SET_NO_NEW_PRIVS, 1)


# x86-64 system call numbers the program never needs and that widen the kernel's attack surface: tracing,
# mounting and namespace games, kernel keyrings, BPF, perf, io_uring, module loading, handles to host files.
DENIED_SYSCALLS_X86_64 = {
    101: "ptrace", 103: "syslog", 135: "personality", 153: "vhangup", 155: "pivot_root", 161: "chroot",
    163: "acct", 165: "mount", 166: "umount2", 167: "swapon", 168: "swapoff", 169: "reboot",
    175: "init_module", 176: "delete_module", 179: "quotactl", 246: "kexec_load", 248: "add_key",
    249: "request_key", 250: "keyctl", 272: "unshare", 298: "perf_event_open", 303: "name_to_handle_at",
    304: "open_by_handle_at", 308: "setns", 310: "process_vm_readv", 311: "process_vm_writev",
    313: "finit_module", 320: "kexec_file_load", 321: "bpf", 323: "userfaultfd", 425: "io_uring_setup",
    426: "io_uring_enter", 427: "io_uring_register", 428: "open_tree", 429: "move_mount", 430: "fsopen",
    431: "fsconfig", 432: "fsmount", 433: "fspick", 442: "mount_setattr",
}
SYS_CLONE, SYS_CLONE3 = 56, 435
AUDIT_ARCH_X86_64 = 0xC000003E
SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_ERRNO, SECCOMP_RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
EPERM, ENOSYS = 1, 38
BPF_LD_W_ABS, BPF_JEQ_K, BPF_JGE_K, BPF_JSET_K, BPF_RET_K = 0x20, 0x15, 0x35, 0x45, 0x06


def seccomp_filter() -> bool:
    """Install a deny-list seccomp filter (x86-64 only); returns whether one was installed."""
    if os.uname().machine != "x86_64":
        return False
    denied = sorted(DENIED_SYSCALLS_X86_64)
    ns_flags = NAMESPACES | CLONE_NEWCGROUP
    prog = [
        (BPF_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
        (BPF_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        (BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),
        (BPF_LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
        (BPF_JGE_K, 0, 1, 0x40000000),  # the x32 ABI would be a second way in to every call below
        (BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | EPERM),
        # clone3 passes its flags in memory a filter cannot read: ENOSYS makes libc fall back to clone
        (BPF_JEQ_K, 0, 1, SYS_CLONE3),
        (BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | ENOSYS),
        (BPF_JEQ_K, 0, 3, SYS_CLONE),
        (BPF_LD_W_ABS, 0, 0, 16),  # low half of args[0], the clone flags
        (BPF_JSET_K, 0, len(denied) + 1, ns_flags),  # no namespace flag: jump over the list to ALLOW
        (BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | EPERM),
    ]
    for i, nr in enumerate(denied):
        remaining = len(denied) - i - 1
        prog.append((BPF_JEQ_K, remaining + 1, 0, nr))  # hit: jump to the EPERM after the list
    prog.append((BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    prog.append((BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | EPERM))
    raw = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buffer = ctypes.create_string_buffer(raw)
    fprog = struct.pack("HxxxxxxP", len(prog), ctypes.addressof(buffer))
    fprog_buffer = ctypes.create_string_buffer(fprog)
    prctl(PR_SET_SECCOMP, 2, ctypes.addressof(fprog_buffer))  # SECCOMP_MODE_FILTER
    return True


def write_map(pid: int, map_file: str, line: str) -> None:
    with open(f"/proc/{pid}/{map_file}", "w") as fh:
        fh.write(line)


def mount_flags_of(path: str) -> int:
    """Flags of the mount holding ``path`` that a user namespace may not clear (they are locked)."""
    flags = os.statvfs(path).f_flag
    locked = flags & (MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME | MS_RDONLY)
    return locked | (MS_RELATIME if flags & ST_RELATIME else 0)


def bind_read_only(fd: int, source: str, target: str, is_dir: bool) -> None:
    if is_dir:
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    mount(f"/proc/self/fd/{fd}", target, None, MS_BIND)
    flags = mount_flags_of(target) | MS_RDONLY | MS_NOSUID | MS_NODEV
    mount(None, target, None, MS_REMOUNT | MS_BIND | flags)


def build_root(spec: dict, program: bytes, sources: list[tuple[str, int | None, str | None, bool]]) -> None:
    """Make a fresh tmpfs the root: read-only binds of the interpreter's directories, a few device nodes,
    a size-capped writable /sandbox holding the program, nothing else of the host's file system."""
    root = spec["workdir"]
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates back to the host
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path, fd, link, is_dir in sources:
        target = root + path
        if link is not None:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(link, target)
        elif path.startswith("/dev/"):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "a").close()
            mount(f"/proc/self/fd/{fd}", target, None, MS_BIND)
        else:
            bind_read_only(fd, path, target, is_dir)
    sandbox = root + "/sandbox"
    os.mkdir(sandbox)
    mount("tmpfs", sandbox, "tmpfs", MS_NOSUID | MS_NODEV, f"size={spec['limits']['disk_bytes']},mode=0777")
    with open(sandbox + "/main.py", "wb") as fh:
        fh.write(program)
    if not os.path.lexists(root + "/tmp"):
        os.symlink("/sandbox", root + "/tmp")
    os.chdir(root)
    check(libc.syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
    # the old root is stacked under the new one: detach it so no path leads back to the host
    check(libc.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")
    mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir("/sandbox")


def open_sources(spec: dict) -> list[tuple[str, int | None, str | None, bool]]:
    """O_PATH handles on what the jail binds, opened while the caller can still traverse e.g. /root."""
    sources = []
    for path in spec["read_only"]:
        if not os.path.lexists(path):
            continue
        if os.path.islink(path) and os.path.dirname(path) == "/":
            sources.append((path, None, os.readlink(path), False))  # /bin -> usr/bin on merged-/usr systems
            continue
        fd = os.open(path, O_PATH | os.O_CLOEXEC)
        sources.append((path, fd, None, os.path.isdir(path)))
    return sources


def exec_program(spec: dict, status_fd: int, program_path: str) -> None:
    """``rlimit`` mode: a fresh interpreter with the audit hook (in this one, ctypes is already imported)."""
    argv = [spec["python"], *spec["python_flags"], "-c", spec["guard_code"], program_path]
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.write(status_fd, b"ok")
    os.execve(spec["python"], argv, spec["env"])


def run_here(spec: dict, status_fd: int, program_path: str) -> None:
    """``namespace`` mode: run the program in this forked interpreter, as ``python -I -S`` would run it,
    instead of starting a new one (half of a short program's time). The launcher holds nothing of the
    evaluator's; what a new interpreter's exec did for the jail is done here: empty capability sets,
    no descriptor but 0, 1 and 2, the program's environment."""
    header = struct.pack("Ii", LINUX_CAPABILITY_VERSION_3, 0)
    check(libc.capset(header, bytes(24)), "capset")  # effective, permitted, inheritable: none, both words
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    with open(program_path, "rb") as fh:
        source = fh.read()
    os.write(status_fd, b"ok")
    os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[1] + 1024)  # the status pipe and A's handshake
    os.environ.clear()
    os.environ.update(spec["env"])
    os._exit(run_main(program_path, source, spec["site_packages"]))


def run_main(path: str, source: bytes, site_packages: bool) -> int:
    """Execute ``source`` as ``__main__`` and finish like the interpreter does; returns the exit code."""
    import builtins
    import types

    if site_packages:
        import site

        site.main()
    module = types.ModuleType("__main__")
    module.__file__, module.__builtins__ = path, builtins
    sys.modules["__main__"] = module
    sys.argv[:] = [path]
    code = 0
    try:
        exec(compile(source, path, "exec"), module.__dict__)
    except SystemExit as exc:
        code = exit_code(exc)
    except BaseException as exc:  # noqa: BLE001 - reported as the interpreter reports an uncaught exception
        exc.__traceback__ = exc.__traceback__.tb_next  # from the program's frames on
        sys.excepthook(type(exc), exc, exc.__traceback__)
        code = 1
    if "threading" in sys.modules:
        sys.modules["threading"]._shutdown()  # the interpreter waits for non-daemon threads
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - the interpreter's code for an unflushable stdout
            code = code or 120
    return code


def exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    print(exc.code, file=sys.stderr)
    return 1


def fail(status_fd: int, message: str) -> None:
    try:
        os.write(status_fd, f"error: {message}".encode()[:4000])
    finally:
        os._exit(125)


def wait_and_exit(pid: int, report_fd: int | None = None) -> None:
    """Exit with the child's exit code (128 + signal when killed); ``report_fd`` also gets ``exit N``."""
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
    if report_fd is not None:
        os.write(report_fd, f"\nexit {code}".encode())
    os._exit(code)


def run_namespace(spec: dict, status_fd: int, program: bytes) -> None:
    to_child_r, to_child_w = os.pipe()
    to_outer_r, to_outer_w = os.pipe()
    pid = os.fork()
    if pid:  # outer: map the child's root to an unprivileged user of the host
        os.close(to_child_r)
        os.close(to_outer_w)
        if os.read(to_outer_r, 1) != b"1":
            wait_and_exit(pid, status_fd)
        uid, gid = spec["host_uid"], spec["host_gid"]
        try:
            if os.geteuid() != 0:
                write_map(pid, "setgroups", "deny")  # an unprivileged writer may only map itself, without groups
            write_map(pid, "uid_map", f"0 {uid} 1\n")
            write_map(pid, "gid_map", f"0 {gid} 1\n")
        except OSError as exc:
            fail(status_fd, f"writing the user namespace maps: {exc}")
        os.write(to_child_w, b"1")
        wait_and_exit(pid, status_fd)
    try:  # A
        os.close(to_child_w)
        os.close(to_outer_r)
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        check(libc.unshare(NAMESPACES), "unshare (user namespaces may be disabled here)")
        os.write(to_outer_w, b"1")
        if os.read(to_child_r, 1) != b"1":
            os._exit(125)
        sources = open_sources(spec)
        last_cap = last_capability()  # /proc is gone once the new root is in place
        if spec["switch_user"]:
            # still the host's root (now unmapped): become the mapped user, dropping root's groups
            os.setgroups([])
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
        child = os.fork()
        if child:
            os.close(status_fd)
            wait_and_exit(child)
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # B: pid 1; when it exits the kernel kills the whole namespace
        build_root(spec, program, sources)
        for _, fd, _, _ in sources:
            if fd is not None:
                os.close(fd)
        set_limits(spec["limits"])
        drop_privileges(last_cap)
        if spec["seccomp"]:
            seccomp_filter()
        run_program(spec, status_fd, "/sandbox/main.py", report=False)
    except (SetupError, OSError) as exc:
        fail(status_fd, str(exc))


def run_program(spec: dict, status_fd: int, program_path: str, report: bool) -> None:
    """Fork the program and wait for it: it gets ordinary signal semantics (pid 1 would ignore SIGXCPU and
    every signal sent from inside its namespace), and its parent is this process, not the evaluator.
    ``report``: this process is the outer one, which writes the exit code on the status pipe."""
    child = os.fork()
    if child == 0:
        try:
            (run_here if spec["mode"] == "namespace" else exec_program)(spec, status_fd, program_path)
        except (SetupError, OSError) as exc:
            fail(status_fd, str(exc))
    if not report:
        os.close(status_fd)
    wait_and_exit(child, status_fd if report else None)


def run_rlimit(spec: dict, status_fd: int) -> None:
    try:
        os.chdir(spec["workdir"])
        set_limits(spec["limits"])
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        run_program(spec, status_fd, os.path.join(spec["workdir"], "main.py"), report=True)
    except (SetupError, OSError) as exc:
        fail(status_fd, str(exc))


def launch(spec: dict, stdout_fd: int, stderr_fd: int, status_fd: int) -> None:
    """In a fresh fork of the launcher: become the outer process of one jail and never return."""
    try:
        os.setsid()  # its own process group: the host kills the whole jail through it
        os.set_inheritable(status_fd, False)  # the program's exec closes it
        os.write(status_fd, f"pid {os.getpid()}\n".encode())
        devnull = os.open(os.devnull, os.O_RDONLY)
        for fd, target in ((devnull, 0), (stdout_fd, 1), (stderr_fd, 2)):
            os.dup2(fd, target)
            os.close(fd)
        if spec["mode"] == "namespace":
            with open(os.path.join(spec["workdir"], "main.py"), "rb") as fh:
                program = fh.read()
            run_namespace(spec, status_fd, program)
        else:
            run_rlimit(spec, status_fd)
    except BaseException as exc:  # noqa: BLE001 - a fork of the launcher must never return into its loop
        fail(status_fd, f"{type(exc).__name__}: {exc}")


def reap_finished() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def serve(control: socket.socket) -> None:
    """One request, one forked jail, until the host closes the socket."""
    while True:
        reap_finished()
        message, fds, flags, _ = socket.recv_fds(control, 1 << 20, 3)
        if not message:
            return
        pid = os.fork() if len(fds) == 3 and not flags & socket.MSG_TRUNC else -1
        if pid == 0:
            control.close()
            launch(marshal.loads(message), *fds)  # marshal: json's import alone cost 14 ms a start
        for fd in fds:
            os.close(fd)


def main() -> None:
    serve(socket.socket(fileno=int(sys.argv[1])))


if __name__ == "__main__":
    main()
