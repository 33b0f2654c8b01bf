"""Run untrusted Python programs (model-written code and its unit tests) in a contained child process.

Two isolation modes; ``docs/sandbox.md`` says exactly what each contains and what it does not.

``namespace`` (the default wherever unprivileged user namespaces work): the program runs in fresh user,
mount, network, pid, IPC and UTS namespaces. Its root file system is a new tmpfs holding only read-only
binds of the interpreter's directories (``/usr``, the Python prefix, the virtualenv) and ``/dev/null`` and
friends, plus a size-capped writable ``/sandbox`` (its working directory, ``HOME`` and ``TMPDIR``); the
host's other files do not exist for it. The network namespace has only a loopback interface that is down,
so no connection leaves it, not even to the host's localhost. It is pid 1 of its own pid namespace, so
when it exits or is killed every process it forked dies with it, and it cannot see or signal any host
process. Every capability is dropped before the program runs (bounding set emptied, ``SECBIT_NOROOT``,
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

import atexit
import dataclasses
import marshal
import math
import os
import select
import selectors
import shutil
import signal
import socket
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

    def _spec(self, workdir: str, mode: str) -> dict:
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
            "site_packages": limits.site_packages,
            "read_only": read_only + list(DEVICES),
            "env": env,
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
        stdout, stderr, report, reason, seconds = self._jail(program, mode)
        if not report and reason is None:  # the launcher died holding the request: once more, with a new one
            stdout, stderr, report, reason, seconds = self._jail(program, mode)
        setup, returncode = _parse_report(report.decode(errors="replace"))
        if setup.startswith("error:"):
            raise ChatforgeError(f"sandbox setup failed ({mode} mode): {setup[6:].strip()}")
        if reason is None and setup != "ok":
            raise ChatforgeError(
                f"sandbox setup failed ({mode} mode, exit {returncode}): "
                f"{stderr.decode(errors='replace').strip()[-500:] or 'the jail reported nothing'}"
            )
        if reason is None and returncode == 128 + signal.SIGXCPU:
            reason = "timeout"  # the CPU-time limit
        status: Status = reason or ("passed" if returncode == 0 else "failed")
        return SandboxResult(
            status, returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace"), round(seconds, 3)
        )

    def _jail(self, program: str, mode: str) -> tuple[bytes, bytes, bytes, Status | None, float]:
        """Run ``program`` in one jail: its stdout, stderr, status report, why it was killed, and seconds."""
        workdir = tempfile.mkdtemp(prefix="chatforge-sandbox-")
        pipes = [list(os.pipe()) for _ in range(3)]  # stdout, stderr, status
        try:
            Path(workdir, "main.py").write_text(program, encoding="utf-8")
            if mode == "namespace":
                os.chmod(workdir, 0o755)  # the mapped user must be able to reach the mount point
            started = time.monotonic()
            _launch(self.python, self._spec(workdir, mode), [w for _, w in pipes])
            for pipe in pipes:
                os.close(pipe[1])
                pipe[1] = -1
            return *self._collect([r for r, _ in pipes], started), time.monotonic() - started
        finally:
            for pipe in pipes:
                for fd in pipe:
                    if fd >= 0:
                        os.close(fd)
            shutil.rmtree(workdir, ignore_errors=True)

    def _collect(self, fds: list[int], started: float) -> tuple[bytes, bytes, bytes, Status | None]:
        """Read stdout, stderr and the status pipe until all three close (the jail has exited), the output
        cap is hit or the deadline passes; in the last two cases kill the jail and drain the status pipe."""
        cap = self.limits.output_kb << 10
        deadline = started + self.limits.timeout
        buffers = {fd: bytearray() for fd in fds}
        stdout, stderr, report = (buffers[fd] for fd in fds)
        reason: Status | None = None
        with selectors.DefaultSelector() as selector:
            for fd in fds:
                os.set_blocking(fd, False)
                selector.register(fd, selectors.EVENT_READ)
            while selector.get_map():
                now = time.monotonic()
                if reason is None and (now >= deadline or len(stdout) + len(stderr) > cap):
                    reason = "timeout" if now >= deadline else "output_limit"
                    if not _kill_jail(report, fds[2]):
                        break  # it never said who it is: nothing to kill
                    for fd in fds[:2]:
                        if fd in selector.get_map():
                            selector.unregister(fd)
                    deadline = now + 5.0  # SIGKILLed, the status pipe closes once the kernel has torn it down
                elif reason is not None and now >= deadline:
                    break
                for key, _ in selector.select(timeout=min(deadline - now, 0.5)):
                    chunk = os.read(key.fd, 65536)
                    if chunk:
                        buffers[key.fd] += chunk
                    else:
                        selector.unregister(key.fd)
        return bytes(stdout[:cap]), bytes(stderr[:cap]), bytes(report), reason


def _parse_report(text: str) -> tuple[str, int | None]:
    """``pid N\n<setup>\nexit N`` -> (setup, exit code); no exit code when the jail was killed."""
    lines = text.split("\n")[1:]
    if lines and lines[-1].startswith("exit "):
        return "\n".join(lines[:-1]), int(lines[-1][5:])
    return "\n".join(lines), None


def _kill_jail(report: bytearray, report_fd: int) -> bool:
    """SIGKILL the jail's process group (named on the first line of its report); in namespace mode its pid 1
    then dies and takes every process along. False when the jail never said who it is."""
    give_up = time.monotonic() + 5.0
    while b"\n" not in report and select.select([report_fd], [], [], max(0.0, give_up - time.monotonic()))[0]:
        chunk = os.read(report_fd, 4096)
        if not chunk:
            break
        report += chunk
    if not report.startswith(b"pid "):
        return False
    try:
        os.killpg(int(report[4 : report.index(b"\n")]), signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return True


class _Launcher:
    """A standing ``_jail.py`` process that forks one jail per program (see its docstring): one per
    interpreter, shared by every Sandbox and thread of this process, started again if it died."""

    def __init__(self, python: str) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self.process = subprocess.Popen(
                [python, "-I", "-S", str(JAIL), str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
                pass_fds=(theirs.fileno(),),
                cwd="/",
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            )
        self.socket = ours
        self.lock = threading.Lock()

    def launch(self, spec: dict, fds: list[int]) -> None:
        with self.lock:
            socket.send_fds(self.socket, [marshal.dumps(spec, 4)], fds)

    def close(self) -> None:
        self.socket.close()  # the launcher exits at the end of its socket
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_launchers: dict[str, _Launcher] = {}
_launchers_lock = threading.Lock()


def _launch(python: str, spec: dict, fds: list[int]) -> None:
    """Hand one jail's spec and descriptors to the launcher of ``python``, starting one if there is none or
    it died (a second try covers a launcher that died after the check)."""
    for attempt in range(2):
        with _launchers_lock:
            launcher = _launchers.get(python)
            if launcher is None or launcher.process.poll() is not None:
                if launcher is not None:
                    launcher.close()
                launcher = _launchers[python] = _Launcher(python)
        try:
            launcher.launch(spec, fds)
            return
        except OSError as exc:
            try:
                code = launcher.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                raise ChatforgeError(f"the sandbox launcher refused a program: {exc}") from exc
            if attempt:
                raise ChatforgeError(f"the sandbox launcher ({python}) exited with {code}: {exc}") from exc


@atexit.register
def _close_launchers() -> None:
    with _launchers_lock:
        for launcher in _launchers.values():
            launcher.close()
        _launchers.clear()
