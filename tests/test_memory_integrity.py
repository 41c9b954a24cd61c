"""The manifest's schema and checksum, and a seeded fuzz of a whole memory: every corruption is refused with our
error, or the memory loads and the model's outputs are bit-identical to the uncorrupted memory's."""

import json
import random
from collections import Counter

import pytest
import torch

from knnmoe_eval import KnnMoeError, attach, load_memory
from knnmoe_eval.core.card import CARD
from knnmoe_eval.core.memory import _LAYER_SCHEMA, _SCHEMA, MANIFEST, MANIFEST_SHA256, manifest_digest
from knnmoe_eval.testing import make_tiny_model, router_inputs, write_constant_memory

REF_IDS = torch.randint(4, 250, (1, 12), generator=torch.Generator().manual_seed(0))
QUERY_IDS = torch.randint(4, 250, (2, 10), generator=torch.Generator().manual_seed(1))  # near the memory, not in it


def values(layer, n, e):
    return torch.randn(n, e, generator=torch.Generator().manual_seed(layer)) * 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The model, the memory's files as bytes, and the outputs the uncorrupted memory gives."""
    model = make_tiny_model("olmoe")
    mem = write_constant_memory(tmp_path_factory.mktemp("good") / "mem", model, router_inputs(model, REF_IDS), values)
    # the card (README.md) is for people, never read: corrupting it is harmless by construction (test_memory_card)
    files = {p.name: p.read_bytes() for p in sorted(mem.iterdir()) if p.name != CARD}
    return model, files, outputs(model, mem)


def outputs(model, mem):
    with torch.no_grad(), attach(model, mem):
        return model(QUERY_IDS).logits


def materialize(directory, files):
    directory.mkdir()
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory


def reseal(manifest: dict) -> dict:
    """What a careful hand edit would do: fix the manifest's checksum after changing it."""
    return {**manifest, MANIFEST_SHA256: manifest_digest(manifest)}


def encode(manifest: dict) -> bytes:
    return json.dumps(manifest, indent=2, sort_keys=True).encode()


def required_fields():
    """Every field the schema requires, as a path of keys ("0" is a layer of the test model), except the three read
    before the schema: format and format_version (their own message, tested below) and the checksum itself."""
    paths = []
    for name, kind in _SCHEMA.items():
        if name not in ("format", "format_version", MANIFEST_SHA256):
            paths += [("model", sub) for sub in kind] if isinstance(kind, dict) else [(name,)]
    paths += [("model", "router_fingerprints", "0"), ("layers", "0")]
    return paths + [("layers", "0", name) for name in _LAYER_SCHEMA]


def get_parent(obj, path):
    for key in path[:-1]:
        obj = obj[key]
    return obj


def test_the_memory_changes_the_outputs_and_sigma_matters(setup, tmp_path):
    """What makes the fuzz below meaningful: the memory changes the model's outputs (so a corrupted value would
    show), and its sigma statistic is one such value (so an unprotected manifest edit would show too)."""
    model, files, good = setup
    with torch.no_grad():
        assert not torch.equal(model(QUERY_IDS).logits, good)
    manifest = json.loads(files[MANIFEST])
    for entry in manifest["layers"].values():
        entry["mean_nn_sq_dist"] *= 4
    edited = materialize(tmp_path / "m", {**files, MANIFEST: encode(reseal(manifest))})
    assert not torch.equal(outputs(model, edited), good)


def test_an_edited_manifest_fails_its_checksum(setup, tmp_path):
    model, files, _ = setup
    manifest = json.loads(files[MANIFEST])
    manifest["layers"]["0"]["mean_nn_sq_dist"] *= 1.01
    mem = materialize(tmp_path / "m", {**files, MANIFEST: encode(manifest)})
    with pytest.raises(KnnMoeError, match="changed after the memory was written.*rebuild"):
        load_memory(mem)
    del manifest[MANIFEST_SHA256]
    mem = materialize(tmp_path / "unsealed", {**files, MANIFEST: encode(manifest)})
    with pytest.raises(KnnMoeError, match="changed after the memory was written.*rebuild"):
        load_memory(mem)


@pytest.mark.parametrize("path", required_fields(), ids=".".join)
@pytest.mark.parametrize("case", ["dropped", "mistyped"])
def test_a_dropped_or_mistyped_field_is_named(setup, tmp_path, path, case):
    """Even with a matching checksum (a hand edit, or another tool's writer), the schema names the field."""
    _, files, _ = setup
    manifest = json.loads(files[MANIFEST])
    parent = get_parent(manifest, path)
    if case == "dropped":
        del parent[path[-1]]
    else:
        parent[path[-1]] = ["not", "this"]
    mem = materialize(tmp_path / "m", {**files, MANIFEST: encode(reseal(manifest))})
    # a dropped layer entry or fingerprint is reported by the mapping that lacks it
    named = ".".join(path[:-1] if case == "dropped" and path[-1] == "0" else path)
    with pytest.raises(KnnMoeError, match=rf"manifest field {named} (is|has|must).*rebuild the memory"):
        load_memory(mem)


def test_a_memory_of_another_format_version_says_rebuild(setup, tmp_path):
    _, files, _ = setup
    manifest = json.loads(files[MANIFEST])
    manifest["format_version"] = 1
    mem = materialize(tmp_path / "m", {**files, MANIFEST: encode(reseal(manifest))})
    with pytest.raises(KnnMoeError, match="not a knnmoe-memory v2 memory .found 'knnmoe-memory' v1.; rebuild"):
        load_memory(mem)


def test_a_memory_of_a_newer_format_version_says_upgrade_knnmoe_eval(setup, tmp_path):
    _, files, _ = setup
    manifest = json.loads(files[MANIFEST])
    manifest["format_version"], manifest["knnmoe_eval_version"] = 3, "9.0"
    mem = materialize(tmp_path / "m", {**files, MANIFEST: encode(reseal(manifest))})
    with pytest.raises(KnnMoeError, match=r"v3 memory, written by knnmoe-eval 9.0; this knnmoe-eval reads v2\. "
                                          r"Upgrade knnmoe-eval \(pip install -U knnmoe-eval\)"):
        load_memory(mem)


def test_a_dropped_router_fingerprint_is_refused_not_skipped(setup, tmp_path):
    _, files, _ = setup
    manifest = json.loads(files[MANIFEST])
    del manifest["model"]["router_fingerprints"]["1"]
    mem = materialize(tmp_path / "m", {**files, MANIFEST: encode(reseal(manifest))})
    with pytest.raises(KnnMoeError, match=r"model.router_fingerprints has entries for layers \['0'\] but must have "
                                          r"one for each of model.moe_layers \['0', '1'\]"):
        load_memory(mem)


def leaves(obj, path=()):
    """Every path in a JSON value, containers included."""
    yield path
    children = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in children:
        yield from leaves(value, path + (key,))


OTHER_TYPES = ["x", 7, 0.5, None, True, [], {}]


def corrupt(rng: random.Random, files: dict[str, bytes]) -> tuple[str, dict[str, bytes]]:
    """One seeded corruption of the memory's files: (what was done, the new files)."""
    files = dict(files)
    name = rng.choice(sorted(files))
    data = bytearray(files[name])
    kind = rng.choice(["bit flip", "truncation", "appended bytes", "deleted file", "manifest field"])
    if kind == "bit flip":
        pos = rng.randrange(len(data))
        data[pos] ^= 1 << rng.randrange(8)
        files[name] = bytes(data)
        return f"{kind} in {name} at byte {pos}", files
    if kind == "truncation":
        size = rng.randrange(len(data))
        files[name] = bytes(data[:size])
        return f"{kind} of {name} to {size} bytes", files
    if kind == "appended bytes":
        files[name] = bytes(data) + rng.randbytes(rng.randint(1, 16))
        return f"{kind} to {name}", files
    if kind == "deleted file":
        del files[name]
        return f"{kind} {name}", files
    manifest = json.loads(files[MANIFEST])
    path = rng.choice(list(leaves(manifest))[1:])
    parent, key = get_parent(manifest, path), path[-1]
    old = parent[key]
    # changed to another value of its type, to a value of another type, or dropped; resealed half the time
    # (a careful hand edit) except for same-type changes, which only the checksum can catch
    action = rng.choice(["same type", "other type", "dropped"])
    if action == "dropped":
        parent.pop(key)
    elif action == "other type":
        parent[key] = rng.choice([v for v in OTHER_TYPES if type(v) is not type(old)])
    elif isinstance(old, bool) or not isinstance(old, (int, float, str)):
        parent[key] = rng.choice([v for v in OTHER_TYPES if type(v) is type(old)] or [None])
    else:
        parent[key] = old + rng.choice([1, 2]) if not isinstance(old, str) else old[:-1] + rng.choice("0af")
    sealed = action != "same type" and rng.random() < 0.5
    files[MANIFEST] = encode(reseal(manifest) if sealed else manifest)
    return f"manifest field {'.'.join(map(str, path))} {action}{' (resealed)' if sealed else ''}", files


def test_fuzzed_memories_are_refused_or_harmless(setup, tmp_path):
    model, files, good = setup
    rng = random.Random(0)
    outcomes = Counter()
    for case in range(300):
        what, corrupted = corrupt(rng, files)
        mem = materialize(tmp_path / str(case), corrupted)
        try:
            out = outputs(model, mem)
        except KnnMoeError:
            outcomes["refused"] += 1
            continue
        except Exception as e:  # noqa: BLE001 - anything but our error is the failure this test looks for
            pytest.fail(f"case {case} ({what}) raised {type(e).__name__}: {e}")
        assert torch.equal(out, good), f"case {case} ({what}) loaded and changed the model's outputs"
        outcomes["harmless"] += 1
    assert outcomes["refused"] + outcomes["harmless"] == 300
    assert outcomes["refused"] >= 250, outcomes  # nearly every corruption touches checksummed bytes


@pytest.mark.parametrize("field", ["mean_nn_sq_dist", "mean_nn_dist"])
def test_a_resealed_integer_statistic_is_refused(setup, tmp_path, field):
    """The sigma statistics are written as floats; a hand-edited integer in their place, even resealed, would move
    the kernel (sigma=auto reads mean_nn_sq_dist, sigma=mean_nn mean_nn_dist), so loading refuses it."""
    _, files, _ = setup
    manifest = json.loads(files[MANIFEST])
    manifest["layers"]["1"][field] = 7
    mem = materialize(tmp_path / "mem", {**files, MANIFEST: encode(reseal(manifest))})
    with pytest.raises(KnnMoeError, match=f"{field}.*(a float >= 0|not a distance)"):
        load_memory(mem)
