"""`knnmoe-memory`: inspect prints the manifest and per-layer sizes, verify exits 1 on every kind of defect, index
saves what evaluation then loads without training, all from the installed console script too."""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_hub import pushed, write_hub_cache

from knnmoe_eval import attach
from knnmoe_eval.core.hub import push_operations
from knnmoe_eval.core.memory import MANIFEST
from knnmoe_eval.memory_cli import main

QUERY = torch.randint(4, 250, (2, 10), generator=torch.Generator().manual_seed(1))



def test_inspect_prints_the_manifest_and_each_layers_size(mem, capsys):
    assert main(["inspect", str(mem)]) == 0
    out = capsys.readouterr().out
    manifest = json.loads((mem / MANIFEST).read_text())
    for layer, entry in manifest["layers"].items():
        size = (mem / entry["file"]).stat().st_size
        assert any(line.split()[:3] == [layer, str(entry["num_keys"]), str(size)] for line in out.splitlines())
    assert "card README.md: as the manifest renders it" in out and "olmoe" in out
    assert main(["inspect", str(mem), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == manifest


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def edit_manifest(mem: Path) -> None:
    manifest = json.loads((mem / MANIFEST).read_text())
    manifest["layers"]["0"]["mean_nn_sq_dist"] *= 2
    (mem / MANIFEST).write_text(json.dumps(manifest))


DEFECTS = {
    "flipped bit in a layer file": (lambda m: flip_last_byte(m / "layer_001.safetensors"), "truncated or corrupted"),
    "missing layer file": (lambda m: (m / "layer_000.safetensors").unlink(), "is missing"),
    "edited manifest": (edit_manifest, "changed after the memory was written"),
    "no manifest": (lambda m: (m / MANIFEST).unlink(), "incomplete"),
    "corrupted saved index": (lambda m: flip_last_byte(sorted((m / "index").glob("*.faiss"))[0]),
                              "truncated or corrupted"),
}


@pytest.mark.parametrize("defect", DEFECTS)
def test_verify_exits_non_zero_on_every_defect(mem, capsys, defect):
    assert main(["index", str(mem), "--index", "IVF2,Flat"]) == 0
    assert main(["verify", str(mem)]) == 0
    assert "ok:" in capsys.readouterr().out
    damage, message = DEFECTS[defect]
    damage(mem)
    assert main(["verify", str(mem)]) == 1
    assert message in capsys.readouterr().err


def test_verify_takes_a_hub_id(mem, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    commit = write_hub_cache(tmp_path / "hub", "org/mem", pushed(push_operations(mem, "org/mem")))
    assert main(["verify", "org/mem"]) == 0 and commit in capsys.readouterr().out
    assert main(["verify", "org/mem", "--revision", "v2"]) == 1
    assert "Hub repo 'org/mem' has no cached snapshot for revision 'v2'" in capsys.readouterr().err


def test_index_saves_what_evaluation_loads_without_training(mem, model, tmp_path, caplog, capsys):
    fresh = shutil.copytree(mem, tmp_path / "fresh")
    assert main(["index", str(mem), "--index", "ivfpq"]) == 0
    assert len(list((mem / "index").glob("*.faiss"))) == 2
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="knnmoe_eval.core.index"), torch.no_grad():
        with attach(model, mem, index="ivfpq"):
            saved = model(QUERY).logits
    assert "training" not in caplog.text  # both layers' indexes were read, not trained
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="knnmoe_eval.core.index"), torch.no_grad():
        with attach(model, fresh, index="ivfpq"):
            assert torch.equal(model(QUERY).logits, saved)  # they are the indexes evaluation would have trained
    assert "training" in caplog.text  # (and without them it does train: the check above can fail)
    assert main(["index", str(mem), "--index", "exact"]) == 1
    assert "nothing to train" in capsys.readouterr().err
    assert main(["index", "org/mem", "--index", "ivfpq"]) == 1
    assert "a Hub id" in capsys.readouterr().err


def test_the_console_script_is_installed(mem):
    script = Path(sys.executable).with_name("knnmoe-memory")
    proc = subprocess.run([str(script), "verify", str(mem)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok:" in proc.stdout, proc.stderr[-2000:]
    flip_last_byte(mem / "layer_000.safetensors")
    proc = subprocess.run([sys.executable, "-m", "knnmoe_eval.memory_cli", "verify", str(mem)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "DEFECT" in proc.stderr
