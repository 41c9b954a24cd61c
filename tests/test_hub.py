"""Memories by Hub id: what a push would upload, laid out as huggingface_hub's cache, loads offline by id (through
attach and through plain `lm_eval`), pinned to its commit; a missing repo or revision is named. The push itself
needs a Hub and is not run here: its commit (the operation list) is checked, and offline it refuses cleanly."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from knnmoe_eval import KnnMoeError, attach
from knnmoe_eval.core.card import CARD, render_card
from knnmoe_eval.core.hub import push_memory, push_operations, resolve_memory, split_hub_id
from knnmoe_eval.core.memory import MANIFEST, MANIFEST_SHA256
from knnmoe_eval.testing import make_tiny_model

TASKS = str(Path(__file__).parent / "fixtures" / "tasks")  # the tinyqa fixture tasks

QUERY = torch.randint(4, 250, (2, 10), generator=torch.Generator().manual_seed(1))
LFS = (".safetensors", ".faiss")  # stored as LFS blobs on the Hub: the cache names them by sha256


def write_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes], refs: tuple[str, ...] = ("main",)) -> str:
    """A repo snapshot in huggingface_hub's cache layout (docs: "Understand caching"), written by hand as no
    offline path of huggingface_hub writes one: blobs/<etag> (sha256 for LFS files, the git blob sha1 otherwise),
    snapshots/<commit>/<path> relative symlinks to them, refs/<name> holding the commit. Returns the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(json.dumps(sorted((p, hashlib.sha256(d).hexdigest()) for p, d in files.items()))
                          .encode()).hexdigest()
    for path, data in files.items():
        etag = (hashlib.sha256(data).hexdigest() if path.endswith(LFS)
                else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        (repo / "blobs" / etag).write_bytes(data)
        link = repo / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / etag, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return commit


def pushed(ops) -> dict[str, bytes]:
    files = {}
    for op in ops:
        with op.as_file() as f:
            files[op.path_in_repo] = f.read()
    return files



@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hub cache with huggingface_hub offline (its constants are read at import, so patched there)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def outputs(model, mem, **options):
    with torch.no_grad(), attach(model, mem, **options):
        return model(QUERY).logits


@pytest.mark.parametrize("name, expected", [
    ("org/name", ("org/name", None)),
    ("org/name/olmoe/v2", ("org/name", "olmoe/v2")),
    ("name", None), ("/abs/path", None), ("./org/name", None), ("../org/name", None), ("org//name", None),
    ("org--x/name", None), ("~/memories/x", None),
])
def test_which_names_can_be_hub_ids(name, expected):
    assert split_hub_id(name) == expected


def test_the_hub_layout_written_here_is_the_one_huggingface_hub_reads(mem, offline_cache):
    from huggingface_hub import scan_cache_dir

    commit = write_hub_cache(offline_cache, "org/mem", pushed(push_operations(mem, "org/mem")), ("main", "v1"))
    info = scan_cache_dir(offline_cache)
    assert not info.warnings
    (repo,) = info.repos
    (rev,) = repo.revisions
    assert repo.repo_id == "org/mem" and rev.commit_hash == commit and rev.refs == {"main", "v1"}
    assert {f.file_name for f in rev.files} == {MANIFEST, CARD, "layer_000.safetensors", "layer_001.safetensors"}


def test_a_memory_loads_by_hub_id_from_the_offline_cache_pinned_to_its_commit(model, mem, offline_cache):
    ops = push_operations(mem, "org/mem") + push_operations(mem, "org/mem", path_in_repo="olmoe/v2")
    commit = write_hub_cache(offline_cache, "org/mem", pushed(ops), ("main", "v1"))
    local = outputs(model, mem)
    with torch.no_grad():
        assert not torch.equal(model(QUERY).logits, local)  # the memory is in play: equal outputs mean something
    snapshot = offline_cache / "models--org--mem" / "snapshots" / commit
    for name, revision in [("org/mem", "main"), ("org/mem", "v1"), ("org/mem", commit), ("org/mem/olmoe/v2", "main")]:
        source = resolve_memory(name, revision)
        assert source.commit == commit and source.path == snapshot / (source.subfolder or "")
        assert (source.path / MANIFEST).resolve().parent.name == "blobs"  # read through the cache's blobs
        assert torch.equal(outputs(model, name, memory_revision=revision), local)
    assert resolve_memory("org/mem").record() == {"source": "hub", "repo_id": "org/mem", "subfolder": None,
                                                  "revision": "main", "commit": commit, "path": str(snapshot)}


def test_a_local_directory_wins_over_a_hub_repo_of_the_same_name(model, mem, offline_cache, tmp_path,
                                                                  monkeypatch):
    write_hub_cache(offline_cache, "org/mem", pushed(push_operations(mem, "org/mem")))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "mem").symlink_to(mem)
    assert resolve_memory("org/mem").record() == {"source": "local", "path": "org/mem"}


def test_missing_repo_revision_or_subfolder_is_named(mem, offline_cache):
    write_hub_cache(offline_cache, "org/mem", pushed(push_operations(mem, "org/mem")))
    with pytest.raises(KnnMoeError, match=r"memory=org/none: there is no local directory.*Hub repo 'org/none' has "
                                          r"no cached snapshot for revision 'main', and HF_HUB_OFFLINE is set"):
        resolve_memory("org/none")
    with pytest.raises(KnnMoeError, match=r"Hub repo 'org/mem' has no cached snapshot for revision 'v9'"):
        resolve_memory("org/mem", "v9")
    with pytest.raises(KnnMoeError, match=r"Hub repo 'org/mem' at revision 'main' \(commit [0-9a-f]{40}\) has no "
                                          r"sub/manifest.json"):
        resolve_memory("org/mem/sub")


def test_everything_loading_checks_still_runs_on_the_downloaded_files(model, mem, offline_cache):
    files = pushed(push_operations(mem, "org/mem"))
    layer = bytearray(files["layer_001.safetensors"])
    layer[-3] ^= 1  # a flipped bit in a value: only the checksum can see it
    write_hub_cache(offline_cache, "org/bad", {**files, "layer_001.safetensors": bytes(layer)})
    with pytest.raises(KnnMoeError, match=r"layer_001.safetensors is truncated or corrupted"):
        outputs(model, "org/bad")
    other = make_tiny_model("olmoe", seed=1)
    write_hub_cache(offline_cache, "org/good", files)
    with pytest.raises(KnnMoeError, match="router weights of layers"):
        outputs(other, "org/good")


def test_the_harness_reports_a_missing_repo_and_revision(olmoe_dir, offline_cache):
    from knnmoe_eval.harness.lm import KnnMoeLM

    with pytest.raises(KnnMoeError, match=r"Hub repo 'org/none' has no cached snapshot for revision 'v3'"):
        KnnMoeLM(pretrained=olmoe_dir, memory="org/none", memory_revision="v3", device="cpu")


def test_the_push_commit_holds_the_memory_its_indexes_and_a_card_naming_the_repo(mem, tmp_path):
    from knnmoe_eval.memory_cli import main

    assert main(["index", str(mem), "--index", "IVF2,Flat"]) == 0
    (mem / "index" / "stray.tmp123").write_bytes(b"half a file")  # never uploaded
    ops = push_operations(mem, "org/mem", path_in_repo="olmoe")
    files = pushed(ops)
    index_files = sorted(p.relative_to(mem).as_posix() for p in (mem / "index").glob("*.faiss*"))
    assert len(index_files) == 4
    assert sorted(files) == sorted(f"olmoe/{f}" for f in [MANIFEST, CARD, "layer_000.safetensors",
                                                         "layer_001.safetensors", *index_files])
    for name, data in files.items():
        if not name.endswith(CARD):
            assert data == (mem / name.removeprefix("olmoe/")).read_bytes()
    manifest = json.loads((mem / MANIFEST).read_text())
    assert files["olmoe/" + CARD].decode() == render_card(manifest, "org/mem")
    assert "memory=org/mem" in files["olmoe/" + CARD].decode()
    # a card someone edited is pushed as it is
    (mem / CARD).write_text("# my own words\n")
    assert pushed(push_operations(mem, "org/mem"))[CARD] == b"# my own words\n"


def test_push_refuses_a_corrupted_memory_and_an_offline_hub(mem, offline_cache):
    with pytest.raises(KnnMoeError, match="HF_HUB_OFFLINE is set"):
        push_memory(mem, "org/mem")  # huggingface_hub's own offline guard, before any byte leaves
    data = bytearray((mem / "layer_000.safetensors").read_bytes())
    data[-1] ^= 1
    (mem / "layer_000.safetensors").write_bytes(bytes(data))
    with pytest.raises(KnnMoeError, match="truncated or corrupted"):
        push_operations(mem, "org/mem")


@pytest.mark.e2e
def test_plain_lm_eval_loads_a_memory_by_hub_id_offline_and_records_the_commit(olmoe_dir, mem, tmp_path):
    hf_home = tmp_path / "hf"
    commit = write_hub_cache(hf_home / "hub", "org/mem", pushed(push_operations(mem, "org/mem")), ("main", "v1"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    cmd = [str(Path(sys.executable).with_name("lm_eval")), "--model", "hf-knnmoe",
           "--model_args", f"pretrained={olmoe_dir},memory=org/mem,memory_revision=v1", "--tasks", "tinyqa",
           "--include_path", TASKS, "--limit", "2", "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = list((tmp_path / "out").rglob("results_*.json"))
    knnmoe = json.loads(results.read_text())["config"]["knnmoe"]
    manifest = json.loads((mem / MANIFEST).read_text())
    assert knnmoe["memory"] == {"source": "hub", "repo_id": "org/mem", "subfolder": None, "revision": "v1",
                                "commit": commit, MANIFEST_SHA256: manifest[MANIFEST_SHA256],
                                "path": str(hf_home / "hub" / "models--org--mem" / "snapshots" / commit)}
    assert knnmoe["options"]["memory_revision"] == "v1"
