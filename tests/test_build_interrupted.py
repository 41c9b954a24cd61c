"""A build owns its directory, and one killed at any of its writes resumes with the same command to the same bytes.

The kills land in the named windows by construction, not by timing: a forked copy of the test process builds with
a file-size limit (RLIMIT_FSIZE) set just before the write in question, so the kernel kills it with SIGXFSZ inside
that very write (safetensors' own shard write, the merge's layer file), or it SIGKILLs itself between the last
layer and the manifest. Forking keeps the loaded torch: no interpreter start per trial.
"""

import errno
import json
import os
import resource
import signal
import traceback

import pytest
import torch
from test_build import builder

from knnmoe_eval import KnnMoeError
from knnmoe_eval.core import build as B
from knnmoe_eval.core import memory as M
from knnmoe_eval.core.files import sha256_file
from knnmoe_eval.core.memory import load_memory
from knnmoe_eval.testing import make_tiny_model, random_references

SEQS = random_references(8)
LIMIT = 64  # bytes: below any shard or layer file, above nothing we need written after the limit is set


def contents(mem):
    """Every file of a memory by its sha256; the manifest by its content, less its creation time (and with it its
    own checksum): two builds of the same memory differ in nothing else."""
    out = {p.name: sha256_file(p) for p in mem.iterdir() if p.name != M.MANIFEST}
    manifest = json.loads((mem / M.MANIFEST).read_text())
    return {**out, M.MANIFEST: {k: v for k, v in manifest.items() if k not in ("created", M.MANIFEST_SHA256)}}


@pytest.fixture(scope="module")
def model():
    # one thread here and in the forked children (a fork must not use OpenMP's pool), so that the shards written
    # before a kill and those written by the resume are the bytes one uninterrupted build writes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield make_tiny_model("olmoe")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """The same build, never interrupted: sha256 of each file of the memory."""
    root = tmp_path_factory.mktemp("ref")
    b = builder(model, root, shard_tokens=1)
    b.run(SEQS, pad_id=0, batch_size=2)
    b.finalize()
    return contents(root / "mem")


def in_child(fn, report=None) -> int:
    """Run fn in a forked copy of this process; its wait status. An exception's message goes to `report`."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 0
        try:
            torch.set_num_threads(1)
            fn()
        except BaseException as e:
            code = 3
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            if report is not None:
                report.write_text(f"{type(e).__name__}: {e}")
            traceback.print_exc()
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def limit_file_size(ignore: bool = False) -> None:
    """From now on a write past LIMIT bytes kills this process with SIGXFSZ (or, ignored, fails with EFBIG)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN if ignore else signal.SIG_DFL)  # Python starts with it ignored
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, resource.RLIM_INFINITY))


def on_second_shard(action, monkeypatch):
    real, calls = B.save_tensors_atomic, []

    def save(path, tensors, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            action()
        return real(path, tensors, metadata)

    monkeypatch.setattr(B, "save_tensors_atomic", save)


def kill_during_shard_write(model, root, monkeypatch):
    on_second_shard(limit_file_size, monkeypatch)
    builder(model, root, shard_tokens=1).run(SEQS, pad_id=0, batch_size=2)


def kill_during_merge(model, root, monkeypatch):
    b = builder(model, root, shard_tokens=1)
    b.run(SEQS, pad_id=0, batch_size=2)
    limit_file_size()
    b.finalize()


def kill_before_manifest(model, root, monkeypatch):
    real = M.write_json_atomic

    def write(path, obj):
        if path.name == M.MANIFEST:  # every layer file is written: die before the manifest
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, obj)

    monkeypatch.setattr(M, "write_json_atomic", write)
    b = builder(model, root, shard_tokens=1)
    b.run(SEQS, pad_id=0, batch_size=2)
    b.finalize()


@pytest.mark.parametrize(
    ("kill", "signo", "leftover"),
    [
        (kill_during_shard_write, signal.SIGXFSZ, lambda mem: list((mem / "shards").glob(".tmp*"))),
        (kill_during_merge, signal.SIGXFSZ, lambda mem: list(mem.glob("layer_000.safetensors.tmp*"))),
        (kill_before_manifest, signal.SIGKILL, lambda mem: list(mem.glob("layer_*.safetensors"))),
    ],
    ids=["during-shard-write", "during-merge", "before-manifest"],
)
def test_a_build_killed_in_each_window_resumes_to_the_same_memory_and_a_clean_directory(
        model, reference, tmp_path, monkeypatch, caplog, kill, signo, leftover):
    status = in_child(lambda: kill(model, tmp_path, monkeypatch))
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signo, status
    mem = tmp_path / "mem"
    assert leftover(mem), sorted(p.name for p in mem.rglob("*"))  # the kill landed in its window
    with pytest.raises(KnnMoeError, match="incomplete.*Rerun the same build command"):
        load_memory(mem)
    caplog.set_level("INFO", logger="knnmoe_eval")
    resumed = builder(model, tmp_path, shard_tokens=1)  # the kill left no stale lock
    resumed.run(SEQS, pad_id=0, batch_size=2)
    resumed.finalize()
    assert contents(mem) == reference  # same bytes, nothing else left
    assert "resuming" in caplog.text
    load_memory(mem)


def test_a_full_disk_says_so_and_that_the_same_command_resumes(model, reference, tmp_path, monkeypatch):
    report = tmp_path / "error.txt"
    on_second_shard(lambda: limit_file_size(ignore=True), monkeypatch)
    status = in_child(lambda: builder(model, tmp_path, shard_tokens=1).run(SEQS, pad_id=0, batch_size=2), report)
    assert os.WEXITSTATUS(status) == 3
    message = report.read_text()
    assert message.startswith("KnnMoeError: the build stopped in") and "the disk is full" in message
    assert "rerun the same command to resume" in message and os.strerror(errno.EFBIG) in message
    monkeypatch.undo()
    resumed = builder(model, tmp_path, shard_tokens=1)
    resumed.run(SEQS, pad_id=0, batch_size=2)
    resumed.finalize()
    assert contents(tmp_path / "mem") == reference


def test_ctrl_c_says_that_the_same_command_resumes(model, tmp_path, monkeypatch, caplog):
    # Python's own Ctrl-C handler, whatever this process inherited: a shell starts background jobs (CI's, say) with
    # SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        on_second_shard(lambda: os.kill(os.getpid(), signal.SIGINT), monkeypatch)
        with pytest.raises(KeyboardInterrupt):
            builder(model, tmp_path, shard_tokens=1).run(SEQS, pad_id=0, batch_size=2)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert "interrupted" in caplog.text and "rerun the same command to resume" in caplog.text


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_target_says_so(model, tmp_path):
    (tmp_path / "mem").mkdir()
    (tmp_path / "mem").chmod(0o555)
    try:
        with pytest.raises(KnnMoeError, match="not writable.*rerun the same command"):
            builder(model, tmp_path, shard_tokens=1).run(SEQS, pad_id=0, batch_size=2)
    finally:
        (tmp_path / "mem").chmod(0o755)


def test_two_builds_into_one_directory_the_second_is_refused_naming_the_first(model, tmp_path):
    first = builder(model, tmp_path, eta=10.0, shard_tokens=1)
    with pytest.raises(KnnMoeError, match=rf"being written by another build \(pid {os.getpid()} on host "):
        builder(model, tmp_path, eta=20.0, shard_tokens=1)
    with pytest.raises(KnnMoeError, match="being written by another build"):  # identical settings too
        builder(model, tmp_path, eta=10.0, shard_tokens=1)
    first.run(SEQS, pad_id=0, batch_size=2)
    with pytest.raises(KnnMoeError, match="being written by another build"):  # also mid-build
        builder(model, tmp_path, eta=10.0, shard_tokens=1)
    first.finalize()
    assert load_memory(tmp_path / "mem").manifest["build"]["eta"] == 10.0
    assert sorted(p.name for p in (tmp_path / "mem").iterdir()) == ["README.md", "layer_000.safetensors",
                                                                   "layer_001.safetensors", "manifest.json"]


def test_a_killed_builds_lock_is_not_stale(model, tmp_path):
    def hold_and_die():
        builder(model, tmp_path, shard_tokens=1)
        os.kill(os.getpid(), signal.SIGKILL)

    assert os.WTERMSIG(in_child(hold_and_die)) == signal.SIGKILL
    assert (tmp_path / "mem" / ".build.lock").exists()
    builder(model, tmp_path, shard_tokens=1).run(SEQS, pad_id=0, batch_size=2)  # taken over at once
