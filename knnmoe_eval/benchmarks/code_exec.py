"""MBPP pass@1, run in the project: lm-eval's own metric loads `evaluate`'s code_eval from the hub at import.

Generated code is untrusted. It runs only after an explicit opt-in (HF_ALLOW_CODE_EVAL=1, on top of lm-eval's
`--confirm_run_unsafe_code` for tasks marked `unsafe_code`), in a fresh interpreter inside an empty temporary
directory, under wall-time, CPU-time, address-space and file-size limits. A program that hangs, crashes, runs out
of memory or exits the interpreter before its asserts have run fails its own problem; it cannot stop the run.
This guards against accidents, not attacks: evaluate untrusted models inside a container.
"""

from __future__ import annotations

import os
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from knnmoe_eval.errors import KnnMoeError

OPT_IN_ENV = "HF_ALLOW_CODE_EVAL"
TIMEOUT_S = 10.0
MEMORY_MB = 1024
OUTPUT_MB = 16


def require_opt_in() -> None:
    if os.environ.get(OPT_IN_ENV) != "1":
        raise KnnMoeError(
            "MBPP runs model-generated code: opt in with HF_ALLOW_CODE_EVAL=1 in the environment and "
            "--confirm_run_unsafe_code on the lm_eval command line"
        )


def _limits(cpu_s: int, memory_mb: int):
    def apply() -> None:  # runs in the child between fork and exec
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_FSIZE, (OUTPUT_MB << 20, OUTPUT_MB << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # the program and everything it forked have already exited
        pass


def passes(
    program: str, tests: list[str], *, setup: str = "", timeout: float = TIMEOUT_S, memory_mb: int = MEMORY_MB
) -> bool:
    """True iff `setup`, `program` and every assert in `tests` run to completion in a limited subprocess."""
    require_opt_in()
    # Exit status 0 alone would credit a program that calls exit() before the asserts: the run must also reach
    # a line printing a token the program cannot know.
    token = secrets.token_hex(16)
    source = "\n".join([setup, program, *tests, f"print({token!r})", ""])
    with tempfile.TemporaryDirectory(prefix="knnmoe-mbpp-") as workdir:
        script, output = Path(workdir, "program.py"), Path(workdir, "stdout.txt")
        script.write_text(source, encoding="utf-8")
        with output.open("wb") as out:
            child = subprocess.Popen(
                [sys.executable, "-I", str(script)],
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.DEVNULL,
                env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"},
                preexec_fn=_limits(int(timeout) + 1, memory_mb),
                start_new_session=True,  # its own process group: a timeout kills whatever it forked too
            )
            try:
                status = child.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                status = None
            finally:
                _kill_group(child.pid)
                child.wait()
        lines = output.read_bytes().decode("utf-8", "replace").splitlines()
    return status == 0 and bool(lines) and lines[-1] == token
