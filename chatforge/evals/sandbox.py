"""Run untrusted Python programs (model-written code and its unit tests) in a contained child process.

Two isolation modes; ``docs/sandbox.md`` says exactly what each contains and what it does not.

``namespace`` (the default wherever unprivileged user namespaces work): the program runs in fresh user,
mount, network, pid, IPC and UTS namespaces. Its root file system is a new tmpfs holding only read-only
binds of the interpreter's directories (``/usr``, the Python prefix, the virtualenv) and ``/dev/null`` and
friends, plus a size-capped writable ``/sandbox`` (its working directory, ``HOME`` and ``TMPDIR``); the
host's other files do not exist for it. The network namespace has only a loopback interface that is down,
so no connection leaves it, not even to the host's localhost. It is pid 1 of its own pid namespace, so
when it exits or is killed every process it forked dies with it, and it cannot see or signal any host
process. Every capability is dropped before the exec (bounding set emptied, ``SECBIT_NOROOT``,
``no_new_privs``), and a seccomp filter denies mount, ptrace, nested namespaces, BPF, keyrings and the
like. When the evaluator runs as root, the jail's uid 0 is mapped to the unprivileged host uid
``sandbox_uid`` (default 65534): files of the host are judged by ordinary permissions, and
``RLIMIT_NPROC`` — which the kernel never enforces for real root — applies. Because the limit is counted
per user namespace, each sandbox gets its own process budget instead of sharing one per-user budget.

``rlimit`` (fallback where namespaces are unavailable): resource limits, a new session, a scrubbed
environment, a fresh temporary working directory and a Python audit hook that refuses files outside it,
sockets, process creation and signals. An audit hook is a guard against accidents, not a security
boundary: code that reaches native code or interpreter internals can get around it.

Both modes: wall-clock limit (the whole process group is SIGKILLed), CPU-time, address-space, process
count, file-size and open-file limits, output capped (the program is killed when it prints more), stdin
from /dev/null, an environment that holds only what the program needs.
"""

from __future__ import annotations

import dataclasses
import marshal
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from chatforge.config import option
from chatforge.errors import ChatforgeError, ConfigError

JAIL = Path(__file__).with_name("_jail.py")
SETUP_FAILED = 125
Isolation = Literal["auto", "namespace", "rlimit"]
Status = Literal["passed", "failed", "timeout", "output_limit"]

# Host directories the interpreter needs. Merged-/usr systems have /bin, /lib... as symlinks into /usr,
# recreated as symlinks in the jail; paths missing here are skipped.
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache", "/etc/localtime")
DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")


@dataclass
class SandboxLimits:
    timeout: float = option(5.0, "wall-clock seconds per program before its whole process tree is killed")
    cpu_seconds: int = option(5, "CPU seconds per process (RLIMIT_CPU)")
    memory_mb: int = option(1024, "address space per process in MiB (RLIMIT_AS)")
    max_processes: int = option(16, "processes (and threads) the program may have at once (RLIMIT_NPROC)")
    output_kb: int = option(1024, "stdout+stderr kept; a program printing more is killed")
    disk_mb: int = option(64, "size of the writable /sandbox tmpfs; largest file it may write (RLIMIT_FSIZE)")
    max_open_files: int = option(64, "open file descriptors per process (RLIMIT_NOFILE)")
    isolation: str = option(
        "auto", "namespace, rlimit (weaker, see docs/sandbox.md) or auto (namespace when available)"
    )
    site_packages: bool = option(
        False, "let programs import installed packages; off, they get the standard library and start ~20 ms "
               "sooner (site's processing of the environment's .pth files is most of a bare program's start)"
    )
    sandbox_uid: int = option(
        65534, "host uid the jail's root maps to when the evaluator runs as root (namespace mode)"
    )

    def validate(self) -> None:
        if self.isolation not in ("auto", "namespace", "rlimit"):
            raise ConfigError(f"option 'isolation' must be auto, namespace or rlimit; got {self.isolation!r}")
        for name in ("timeout", "cpu_seconds", "memory_mb", "max_processes", "output_kb", "disk_mb", "max_open_files"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"option '{name}' must be > 0; got {getattr(self, name)}")


@dataclass
class SandboxResult:
    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _guard_code(read_roots: Sequence[str]) -> str:
    """Audit hook for ``rlimit`` mode: reads only below ``read_roots`` and the working directory, writes only
    below the working directory, no sockets, processes, signals or native code. Runs the program after it."""
    return f"""
import os, sys
_WORK = os.path.realpath(os.getcwd())
_READ = (_WORK,) + tuple(os.path.realpath(p) for p in {tuple(read_roots)!r})
_BLOCKED = {{"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
    "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "os.startfile",
    "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill", "ctypes.dlopen",
    "ctypes.dlsym", "ctypes.cdata", "os.setuid", "os.setgid"}}
_PATH_EVENTS = {{"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.chmod",
    "os.chown", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move", "os.chflags",
    "os.lchmod", "os.setxattr", "os.removexattr"}}
_LIST_EVENTS = {{"os.listdir", "os.scandir", "glob.glob", "os.chdir"}}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def _inside(path, roots):
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    real = os.path.realpath(os.path.join(_WORK, path))
    return any(real == r or real.startswith(r + os.sep) for r in roots)

def _hook(event, args):
    if event in _BLOCKED:
        raise PermissionError(f"sandbox: {{event}} is not allowed")
    if event == "import" and args[0] in ("ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters"):
        raise PermissionError(f"sandbox: import of {{args[0]}} is not allowed")
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None))[:3]
        if isinstance(path, int) or path is None:
            return
        writing = bool((flags or 0) & _WRITE_FLAGS) or any(c in (mode or "") for c in "wax+")
        if not _inside(path, (_WORK,) if writing else _READ):
            raise PermissionError(f"sandbox: {{path!r}} is outside the sandbox")
    elif event in _PATH_EVENTS or event in _LIST_EVENTS:
        roots = _READ if event in _LIST_EVENTS else (_WORK,)
        for path in args:
            if isinstance(path, (str, bytes, os.PathLike)) and not _inside(os.fspath(path), roots):
                raise PermissionError(f"sandbox: {{event}} {{path!r}} is outside the sandbox")

sys.addaudithook(_hook)
sys.argv = sys.argv[1:]
import runpy
runpy.run_path(sys.argv[0], run_name="__main__")
"""


_probe_lock = threading.Lock()
_probe: dict[int, str | None] = {}


def namespace_error(sandbox_uid: int = 65534) -> str | None:
    """Why ``namespace`` isolation cannot be used here, or None if it works (probed once per process)."""
    with _probe_lock:
        if sandbox_uid not in _probe:
            limits = SandboxLimits(timeout=30, isolation="namespace", sandbox_uid=sandbox_uid)
            try:
                result = Sandbox(limits)._run("print(6 * 7)", "namespace")
                _probe[sandbox_uid] = (
                    None
                    if result.stdout.strip() == "42"
                    else (f"probe program failed ({result.status}): {result.stderr.strip()[-300:]}")
                )
            except ChatforgeError as exc:
                _probe[sandbox_uid] = str(exc)
        return _probe[sandbox_uid]


class Sandbox:
    """Runs Python programs under ``limits``; ``run`` one, or ``run_many`` in parallel with a progress bar."""

    def __init__(
        self, limits: SandboxLimits | None = None, python: str = sys.executable, read_only: Sequence[str] = ()
    ) -> None:
        self.limits = limits or SandboxLimits()
        self.limits.validate()
        self.python = python
        self.extra_read_only = [os.path.abspath(p) for p in read_only]
        self._mode: str | None = None

    @property
    def mode(self) -> str:
        """The isolation actually used: ``namespace`` or ``rlimit``."""
        if self._mode is None:
            wanted = self.limits.isolation
            if wanted == "rlimit":
                self._mode = "rlimit"
            else:
                error = namespace_error(self.limits.sandbox_uid)
                if error and wanted == "namespace":
                    raise ChatforgeError(f"namespace sandbox unavailable: {error}")
                if error:
                    print(
                        f"chatforge: warning: namespace sandbox unavailable ({error}); falling back to the "
                        "weaker rlimit sandbox (see docs/sandbox.md)",
                        file=sys.stderr,
                    )
                self._mode = "rlimit" if error else "namespace"
        return self._mode

    def run(self, program: str) -> SandboxResult:
        return self._run(program, self.mode)

    def run_many(
        self, programs: Sequence[str], workers: int = 0, desc: str = "sandbox", progress: bool = True
    ) -> list[SandboxResult]:
        """Results in the order of ``programs``; ``workers`` = 0 means one per CPU core."""
        from tqdm import tqdm

        mode = self.mode
        workers = workers or os.cpu_count() or 1
        with (
            ThreadPoolExecutor(max_workers=workers) as pool,
            tqdm(total=len(programs), desc=desc, unit="prog", disable=not progress, file=sys.stderr) as bar,
        ):
            futures = [pool.submit(self._run, program, mode) for program in programs]
            results = []
            for future in futures:
                results.append(future.result())
                bar.update(1)
        return results

    # --- one program ------------------------------------------------------------------------------------------

    def _read_only_paths(self) -> list[str]:
        prefixes = {
            sys.prefix,
            sys.base_prefix,
            sys.exec_prefix,
            sys.base_exec_prefix,
            os.path.dirname(os.path.dirname(os.path.realpath(self.python))),
        }
        paths = sorted({*SYSTEM_PATHS, *prefixes, *self.extra_read_only})
        # a path inside another bound directory is already there (and binding it twice would fail read-only)
        kept = [
            p
            for p in paths
            if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in paths if not os.path.islink(q))
        ]
        return kept

    def _spec(self, workdir: str, mode: str, status_fd: int) -> dict:
        limits = self.limits
        switch_user = os.geteuid() == 0 and limits.sandbox_uid != 0
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONHASHSEED": "0",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        home = "/sandbox" if mode == "namespace" else workdir
        env.update(HOME=home, TMPDIR=home, PWD=home)
        read_only = self._read_only_paths()
        return {
            "mode": mode,
            "workdir": workdir,
            "python": self.python,
            "python_flags": ["-I"] if limits.site_packages else ["-I", "-S"],
            "status_fd": status_fd,
            "read_only": read_only + list(DEVICES),
            "env": env,
            "guard": mode == "rlimit",
            "guard_code": _guard_code(read_only),
            "seccomp": True,
            "switch_user": switch_user,
            "host_uid": limits.sandbox_uid if switch_user else os.geteuid(),
            "host_gid": limits.sandbox_uid if switch_user else os.getegid(),
            "limits": {
                "cpu_seconds": max(1, math.ceil(limits.cpu_seconds)),
                "memory_bytes": limits.memory_mb << 20,
                # counted per user namespace, so only meaningful in namespace mode, where the jail's own
                # two helpers (A and B in _jail.py) share the budget; outside one it would count every
                # process of the user (and never bind root), so the audit hook refuses forks instead
                "max_processes": limits.max_processes + 2 if mode == "namespace" else 0,
                "file_bytes": limits.disk_mb << 20,
                "disk_bytes": limits.disk_mb << 20,
                "max_open_files": limits.max_open_files,
            },
        }

    def _run(self, program: str, mode: str) -> SandboxResult:
        workdir = tempfile.mkdtemp(prefix="chatforge-sandbox-")
        status_r, status_w = os.pipe()
        try:
            Path(workdir, "main.py").write_text(program, encoding="utf-8")
            if mode == "namespace":
                os.chmod(workdir, 0o755)  # the mapped user must be able to reach the mount point
            spec = self._spec(workdir, mode, status_w)
            started = time.monotonic()
            proc = subprocess.Popen(
                [self.python, "-I", "-S", str(JAIL), marshal.dumps(spec, 4).hex()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                close_fds=True,
                pass_fds=(status_w,),
                cwd=workdir,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            )
            os.close(status_w)
            status_w = -1
            stdout, stderr, reason = self._collect(proc, started)
            seconds = time.monotonic() - started
            os.set_blocking(status_r, False)
            try:
                setup = os.read(status_r, 4096).decode(errors="replace")
            except BlockingIOError:
                setup = ""
        finally:
            if status_w >= 0:
                os.close(status_w)
            os.close(status_r)
            shutil.rmtree(workdir, ignore_errors=True)
        if setup.startswith("error:"):
            raise ChatforgeError(f"sandbox setup failed ({mode} mode): {setup[6:].strip()}")
        if reason is None and setup != "ok":
            raise ChatforgeError(
                f"sandbox setup failed ({mode} mode, exit {proc.returncode}): "
                f"{stderr.decode(errors='replace').strip()[-500:]}"
            )
        returncode = proc.returncode
        if reason is None and returncode == 128 + signal.SIGXCPU:
            reason = "timeout"  # the CPU-time limit
        status: Status = reason or ("passed" if returncode == 0 else "failed")
        return SandboxResult(
            status, returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace"), round(seconds, 3)
        )

    def _collect(self, proc: subprocess.Popen, started: float) -> tuple[bytes, bytes, Status | None]:
        """Read stdout/stderr until both close, the output cap is hit or the deadline passes (then kill)."""
        cap = self.limits.output_kb << 10
        deadline = started + self.limits.timeout
        buffers = {proc.stdout: bytearray(), proc.stderr: bytearray()}
        reason: Status | None = None
        with selectors.DefaultSelector() as selector:
            for stream in buffers:
                os.set_blocking(stream.fileno(), False)
                selector.register(stream, selectors.EVENT_READ)
            while selector.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    reason = "timeout"
                    break
                for key, _ in selector.select(timeout=min(remaining, 0.5)):
                    chunk = os.read(key.fileobj.fileno(), 65536)
                    if not chunk:
                        selector.unregister(key.fileobj)
                        continue
                    buffers[key.fileobj] += chunk
                if sum(map(len, buffers.values())) > cap:
                    reason = "output_limit"
                    break
        if reason is not None:
            _kill_group(proc)
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            reason = "timeout"
            _kill_group(proc)
            proc.wait()
        for stream in buffers:
            stream.close()
        out, err = (bytes(b[:cap]) for b in buffers.values())
        return out, err, reason


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the jail's process group; in namespace mode its pid-1 then dies and takes every process along."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
