"""Sandboxed MBPP pass@1: opt-in; every way a program can fail fails only its own problem; no trick forges a pass;
no escape reaches the evaluator. Each hostile program below is wrong unless its trick or escape worked, so a
False verdict means both that it was scored and that the trick failed; the host side is checked too.

Both mechanisms are tested: bubblewrap (skipped where it cannot run, unless KNNMOE_REQUIRE_BWRAP=1, which CI
sets) and the in-process floor alone (KNNMOE_CODE_SANDBOX=guard)."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from knnmoe_eval.benchmarks import code_exec
from knnmoe_eval.benchmarks import data as B
from knnmoe_eval.errors import KnnMoeError

TESTS = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]
WRONG = "def add(a, b):\n    return a * b\n"
BWRAP_PROBLEM = code_exec.bwrap_problem()


@pytest.fixture(autouse=True)
def opted_in(monkeypatch):
    monkeypatch.setenv(code_exec.OPT_IN_ENV, "1")


@pytest.fixture(params=["bwrap", "guard"])
def mode(request, monkeypatch):
    if request.param == "bwrap" and BWRAP_PROBLEM is not None:
        if os.environ.get("KNNMOE_REQUIRE_BWRAP") == "1":
            pytest.fail(f"bubblewrap {BWRAP_PROBLEM}")
        pytest.skip(f"bubblewrap {BWRAP_PROBLEM}")
    monkeypatch.setenv(code_exec.SANDBOX_ENV, request.param)
    return request.param


def passes(program, **kw):
    return code_exec.passes(program, TESTS, timeout=kw.pop("timeout", 5), **kw)


@pytest.mark.parametrize(
    ("program", "passed"),
    [
        ("def add(a, b):\n    return a + b", True),
        ("def add(a, b):\n    return a * b", False),
        ("def add(a, b):\n    return a +", False),  # syntax error
        ("import sys\nsys.exit(0)", False),  # exits with status 0 before the asserts
        ("import os\nos._exit(0)", False),
        ("exit()", False),
        ("def add(a, b):\n    return a + b\nx = '''", False),  # an open string cannot swallow the tests
        ("import ctypes\nctypes.string_at(0)", False),  # segfault (or refused)
        ("x = bytearray(8 << 30)", False),  # over the memory limit
        ("import time\ntime.sleep(60)", False),  # hangs
        ("import collections, re\nP = collections.namedtuple('P', 'x')\ndef add(a, b):\n    return P(a + b).x",
         True),  # the stdlib the MBPP solutions use works
    ],
)
def test_pass_at_1_outcomes(mode, program, passed):
    assert passes(program, timeout=2) is passed


def test_setup_code_runs_first(mode):
    assert code_exec.passes("def add(a, b):\n    return a + b + OFFSET", TESTS, setup="OFFSET = 0")


# -- a pass cannot be forged (issue 23: each of these gave pass@1 = 1 for a wrong program) ---------------------

LEAK = WRONG + """
import os, re, sys
def leak(found):
    # every 32-hex-digit string it found: into every descriptor and the verdict's FIFO, then printed last
    for t in found:
        for fd in range(3, 64):
            try:
                os.write(fd, t.encode())
            except OSError:
                pass
        for path in [*(a + "/report" for a in sys.argv[1:2]), "/knnmoe/report"]:
            try:
                with open(path, "wb") as f:
                    f.write(t.encode())
            except OSError:
                pass
    for t in found:
        print(t, flush=True)
def hexes(text):
    return re.findall(r"[0-9a-f]{32}", text)
def frame_locals():
    try:
        return repr(sys._getframe().f_back.f_locals)
    except Exception:
        return ""
"""

TRICKS = {
    "co_consts": LEAK + "leak(hexes(frame_locals()) + [c for c in sys._getframe().f_code.co_consts\n"
                        "     if isinstance(c, str) and re.fullmatch('[0-9a-f]{32}', c)]); os._exit(0)",
    "reads program.py": LEAK + "found = []\nfor d in (*sys.argv[1:2], '/knnmoe', '.'):\n"
                               "    for n in (os.listdir(d) if os.path.isdir(d) else []):\n"
                               "        try:\n            found += hexes(open(os.path.join(d, n)).read())\n"
                               "        except OSError:\n            pass\nleak(found); os._exit(0)",
    "python -O": LEAK + "import subprocess\nif not sys.flags.optimize:  # again, with the asserts stripped\n"
                        "    try:\n        os._exit(subprocess.run([sys.executable, '-O', *sys.argv]).returncode)\n"
                        "    except OSError:\n        os.execv(sys.executable, [sys.executable, '-O', *sys.argv])",
    "excepthook": LEAK + "def hook(*a):\n    leak(hexes(open((sys.argv[1:2] or ['.'])[0] + '/program.py').read()))\n"
                         "    os._exit(0)\n"
                         "sys.excepthook = hook",
    "audit event": LEAK + "import threading\ndef spam():\n    while True:\n        try:\n"
                          "            sys.audit('knnmoe.report')\n        except Exception:\n            pass\n"
                          "threading.Thread(target=spam, daemon=True).start()\n"
                          "try:\n    sys.audit('knnmoe.report')\nexcept Exception:\n    pass",
    "gc and closures": LEAK + "import gc\ntry:\n    objs = gc.get_objects()\nexcept Exception:\n    objs = []\n"
                              "found = [o for o in objs if isinstance(o, (str, bytes)) and len(o) == 32]\n"
                              "leak([o.decode() if isinstance(o, bytes) else o for o in found]); os._exit(0)",
    "re-run the runner": LEAK + "import types\nf = sys._getframe().f_back\n"
                                "types.FunctionType(f.f_code, f.f_globals)()",
    "replaced exec": LEAK + "import builtins\nbuiltins.exec = lambda *a, **k: None\n"
                            "sys.modules['__main__'].exec = builtins.exec",
    "always-true AssertionError": LEAK + "import builtins\nclass E(Exception): pass\nbuiltins.AssertionError = E",
}


@pytest.mark.parametrize("trick", list(TRICKS))
def test_no_trick_forges_a_pass(mode, trick):
    assert passes(TRICKS[trick]) is False
    right = TRICKS[trick].replace("a * b", "a + b")  # the same program, right: passes (or crashes) on its merits
    if trick in ("audit event", "replaced exec", "always-true AssertionError"):
        assert passes(right) is True


# -- nothing escapes (issue 23's list) ------------------------------------------------------------------------


def right_if(condition_code: str) -> str:
    """A program that is right only when `condition_code` (it sets `ok`) succeeded."""
    body = "\n".join("    " + line for line in condition_code.splitlines())
    return f"ok = False\ntry:\n{body}\nexcept BaseException:\n    pass\ndef add(a, b):\n    return a + b if ok else None"


def test_no_files_outside_its_scratch(mode, tmp_path):
    victim, escaped = tmp_path / "victim", tmp_path / "escaped"
    victim.write_text("keep me")
    program = right_if(f"import os\nopen({str(escaped)!r}, 'w').write('x')\nos.remove({str(victim)!r})\nok = True")
    assert passes(program) is False
    assert victim.read_text() == "keep me" and not escaped.exists()
    assert passes(right_if("open('mine.txt', 'w').write('x')\nok = open('mine.txt').read() == 'x'")) is True


def test_no_processes(mode, tmp_path):
    marker = tmp_path / "ran"
    for start in (f"import os\nok = os.system('touch {marker}') == 0",
                  f"import subprocess\nok = subprocess.run(['touch', {str(marker)!r}]).returncode == 0",
                  "import os\npid = os.fork()\nif pid == 0:\n    os._exit(0)\nok = True",
                  "import os\nos.execv('/bin/true', ['true'])"):
        assert passes(right_if(start)) is False
    assert not marker.exists()


def test_no_network_not_even_the_evaluators_loopback(mode):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        program = right_if(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nok = True")
        assert passes(program) is False
        server.settimeout(0)
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever connected


def test_the_evaluators_environment_is_out_of_reach(mode, monkeypatch):
    monkeypatch.setenv("KNNMOE_TEST_SECRET", "hunter2-the-evaluators-secret")
    program = right_if(  # its environment, or any byte of the evaluator's /proc/<pid>/environ (its parent's)
        "import os\nfound = 'hunter2' in repr(dict(os.environ))\n"
        f"for pid in (os.getppid(), {os.getpid()}):\n"
        "    try:\n        found = found or len(open(f'/proc/{pid}/environ', 'rb').read()) > 0\n"
        "    except (OSError, ValueError):\n        pass\nok = found")
    assert passes(program) is False


def test_it_cannot_kill_the_evaluation(mode):
    assert passes(right_if("import os\nos.kill(os.getppid(), 9)\nok = True")) is False  # and we are still here


def test_nothing_outlives_the_evaluation(mode):
    marker = f"7.{os.getpid()}{time.time_ns() % 10**6}"  # a sleep no other process runs
    program = right_if("import subprocess, os\n"
                       f"subprocess.Popen(['setsid', 'sleep', '{marker}'], start_new_session=True)\nok = True")
    assert passes(program) is False
    time.sleep(0.2)
    assert not any(marker in p.read_text(errors="replace") for p in Path("/proc").glob("[0-9]*/cmdline")
                   if p.exists() and os.access(p, os.R_OK))


def test_the_memory_limit_holds_for_the_whole_program(mode):
    # four children of 200 MB each against a 256 MB limit: no child can be made at all
    program = right_if("import os\nkids = []\nfor _ in range(4):\n    pid = os.fork()\n    if pid == 0:\n"
                       "        x = bytearray(200 << 20)\n        os._exit(0)\n    kids.append(pid)\n"
                       "ok = all(os.waitpid(k, 0)[1] == 0 for k in kids)")
    assert passes(program, memory_mb=256) is False


def test_hostile_code_is_scored_through_the_tasks_metric(mode):
    doc = {"test_list": TESTS, "test_setup_code": ""}
    for trick in ("co_consts", "python -O", "excepthook"):
        assert B.mbpp_process_generation(doc, [TRICKS[trick]]) == {"pass@1": 0, "acc": 0}


def test_bubblewraps_seccomp_filter_refuses_processes_but_not_threads(mode, tmp_path):
    if mode != "bwrap":
        pytest.skip("the filter is bubblewrap's")
    bpf = code_exec.seccomp_filter()
    if bpf is None:
        pytest.skip(f"no syscall table for {os.uname().machine}")
    rules = tmp_path / "rules.bpf"
    rules.write_bytes(bpf)
    argv = code_exec.bwrap_argv(tmp_path, 3)
    script = ("import os, threading\nt = threading.Thread(target=print, args=('thread',)); t.start(); t.join()\n"
              "try:\n    os.fork()\nexcept OSError as e:\n    print('fork', e.errno)\n")
    with open(rules, "rb") as f:
        os.dup2(f.fileno(), 3, inheritable=True) if f.fileno() != 3 else None
        run = subprocess.run(argv[: argv.index("--") + 1] + [code_exec._python(), "-I", "-S", "-c", script],
                             capture_output=True, text=True, pass_fds=(3,), timeout=30)
    assert run.stdout.split() == ["thread", "fork", "1"], run.stderr  # EPERM


# -- refusal without a sandbox, and the opt-ins -----------------------------------------------------------------


def test_without_bubblewrap_mbpp_is_refused_naming_the_fix(monkeypatch):
    monkeypatch.delenv(code_exec.SANDBOX_ENV, raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    code_exec.bwrap_problem.cache_clear()
    try:
        with pytest.raises(KnnMoeError, match=r"bubblewrap is not installed.*apt-get install bubblewrap.*"
                                              r"KNNMOE_CODE_SANDBOX=guard"):
            code_exec.passes("def add(a, b):\n    return a + b", TESTS)
    finally:
        monkeypatch.undo()
        code_exec.bwrap_problem.cache_clear()


def test_no_code_runs_without_opt_in(monkeypatch):
    monkeypatch.delenv(code_exec.OPT_IN_ENV)
    with pytest.raises(KnnMoeError, match="HF_ALLOW_CODE_EVAL=1"):
        code_exec.passes("def add(a, b):\n    return a + b", TESTS)
    with pytest.raises(KnnMoeError, match="--confirm_run_unsafe_code"):
        B.load("mbpp", "test", data_dir=Path(__file__).parent / "fixtures" / "data", runs_code=True)


def test_mbpp_scoring_reads_the_program_out_of_the_completion(mode):
    doc = {"test_list": TESTS, "test_setup_code": ""}
    fenced = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert B.mbpp_process_generation(doc, [fenced]) == {"pass@1": 1, "acc": 1}
    assert B.mbpp_process_generation(doc, ["def add(a, b):\n    return a + b\n[DONE] trailing"]) == {"pass@1": 1, "acc": 1}
    assert B.mbpp_process_generation(doc, ["lol"]) == {"pass@1": 0, "acc": 0}


assert sys.platform.startswith("linux") or True  # the sandbox is Linux's (namespaces, seccomp); elsewhere refused
