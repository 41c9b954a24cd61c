"""preset=plus and its ingredients: preset resolution, the manifest's build preset, the calibrated radius, the
stored-positions-only leaves and the keys read under the optimised routing."""

import json
from dataclasses import replace

import pytest
import torch

from knnmoe_eval import KnnMoeError
from knnmoe_eval.core.build import MemoryBuilder
from knnmoe_eval.core.gradient import optimise_logits
from knnmoe_eval.core.memory import load_memory
from knnmoe_eval.core.mixing import mix, within_radius
from knnmoe_eval.core.options import PRESETS, UNCALIBRATED, KnnMoeOptions, default, split_model_args
from knnmoe_eval.core.retrieval import attach
from knnmoe_eval.core.routers import find_routers
from knnmoe_eval.core.sigma import RadiusSpec, layer_stats
from knnmoe_eval.testing import make_tiny_model, random_references, router_inputs, signature


def build(model, path, **given):
    # random references on a random model: no radius can separate them from its own samples, and the probe would
    # refuse the memory (its own test: test_the_build_refuses_a_radius_that_admits_the_models_own_samples)
    given.setdefault("probe_tokens", 0)
    b = MemoryBuilder(model, find_routers(model), signature(model), KnnMoeOptions(memory=str(path), mode="build", **given))
    b.run(random_references(n_cont=1), pad_id=0, batch_size=3)
    b.finalize()
    return load_memory(path)


def test_preset_sets_defaults_and_explicit_options_win():
    plus, _ = split_model_args({"preset": "plus", "memory": "m", "mode": "build", "calibration": __file__}, set())
    assert {k: getattr(plus, k) for k in PRESETS["plus"]} == PRESETS["plus"]
    # without calibration text the preset's radius is the same (the layers' agreement keeps in-domain tokens out);
    # an explicit radius_scale still wins
    bare, _ = split_model_args({"preset": "plus", "memory": "m"}, set())
    assert UNCALIBRATED["plus"] == {} and bare.radius_scale == plus.radius_scale == 2.0
    assert split_model_args({"preset": "plus", "memory": "m", "radius_scale": "3"}, set())[0].radius_scale == 3.0
    # lm-eval hands model_args over as strings or parsed numbers: explicit ones win over the preset either way
    mine, _ = split_model_args({"preset": "plus", "memory": "m", "steps": "3", "confidence": "kernel"}, set())
    assert (mine.steps, mine.confidence, mine.grad) == (3, "kernel", "dense")
    paper, _ = split_model_args({"memory": "m", "grad": "dense"}, set())
    assert (paper.preset, paper.grad, paper.steps, paper.confidence) == ("paper", "dense", 1, "kernel")
    assert default("steps", "plus") == PRESETS["plus"]["steps"] and default("steps") == 1
    with pytest.raises(KnnMoeError, match="preset='best'"):
        split_model_args({"preset": "best", "memory": "m"}, set())


def test_constructing_the_options_with_a_preset_applies_it():
    """`KnnMoeOptions(preset="plus")` is what it claims, however it is made: directly, through attach()'s keywords,
    or through model_args; a copy with one option changed keeps the rest."""
    direct = KnnMoeOptions(preset="plus", memory="m", calibration=__file__, mode="build")
    parsed, _ = split_model_args({"preset": "plus", "memory": "m", "calibration": __file__, "mode": "build"}, set())
    assert direct == parsed and {k: getattr(direct, k) for k in PRESETS["plus"]} == PRESETS["plus"]
    assert KnnMoeOptions(preset="plus", memory="m").radius_scale == PRESETS["plus"]["radius_scale"]
    assert KnnMoeOptions(memory="m").grad == "paper" == default("grad")
    assert replace(direct, k=4).grad == "dense" and replace(direct, k=4).k == 4


def test_paper_preset_builds_the_memory_a_build_without_preset_builds(tmp_path):
    model = make_tiny_model("olmoe")
    plain = build(model, tmp_path / "plain")
    paper = build(model, tmp_path / "paper", preset="paper")
    for layer in plain.layers:
        name = plain.manifest["layers"][str(layer)]["file"]
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "paper" / name).read_bytes()
    # the manifest's own checksum covers its creation time, which differs once the builds straddle a second
    strip = lambda m: {k: v for k, v in m.items() if k not in ("created", "manifest_sha256")}  # noqa: E731
    assert strip(plain.manifest) == strip(paper.manifest)
    assert "radius" not in plain.manifest["layers"][str(layer)]


def test_plus_memory_records_its_preset_and_refuses_another(tmp_path):
    model = make_tiny_model("olmoe")
    memory = build(model, tmp_path / "plus", preset="plus", steps=2)
    assert memory.manifest["build"]["preset"] == "plus" and memory.manifest["build"]["steps"] == 2
    with pytest.raises(KnnMoeError, match="built with preset=plus.*evaluated with preset=paper"):
        with attach(model, memory):
            pass
    paper = build(model, tmp_path / "paper")
    with pytest.raises(KnnMoeError, match="built with preset=paper.*evaluated with preset=plus"):
        with attach(model, paper, preset="plus"):
            pass
    with pytest.raises(KnnMoeError, match="confidence=radius needs each layer's radius"):
        with attach(model, paper, confidence="radius"):
            pass
    with attach(model, memory, preset="plus") as retriever:
        model(torch.tensor([random_references(1, n_cont=1)[0].tokens]))
    assert retriever.diagnostics()


def test_radius_mixes_a_stored_key_whole_and_leaves_far_tokens_stock():
    """Within the radius lambda is exactly 1 (z' = the stored value), beyond it the logits are returned as is."""
    dist2 = torch.tensor([[0.25], [4.0]])  # distances 0.5 and 2.0
    sims = within_radius(dist2, radius=1.0)
    z, values = torch.randn(2, 8), torch.randn(2, 1, 8)  # fp32, as mix computes: exact equality is the claim
    mixed, lam = mix(z, values, sims)
    assert lam.tolist() == [1.0, 0.0]
    assert torch.equal(mixed[0], values[0, 0]) and torch.equal(mixed[1], z[1])


def test_radius_is_the_scaled_leave_one_out_quantile_capped_by_far_text():
    keys = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [3.0, 4.0]], dtype=torch.float16)
    loo = torch.tensor([1.0, 1.0, 2.0, 4.0], dtype=torch.float64)  # each key's distance to its nearest other key
    stats = layer_stats(keys, RadiusSpec(quantile=0.5, scale=2.0), layer=0)
    # the quantile is taken of the squared distances (as the statistics store them), then square-rooted
    assert stats["radius"] == pytest.approx(2.0 * float(torch.quantile(loo**2, 0.5).sqrt()), rel=1e-6)
    assert layer_stats(keys, RadiusSpec(quantile=1.0, scale=2.0), layer=0)["radius"] == pytest.approx(8.0, rel=1e-6)
    far = {0: torch.tensor([[0.0, 1.2], [10.0, 10.0]], dtype=torch.float16)}  # nearest keys at 1.2 and ~9.2
    capped = layer_stats(keys, RadiusSpec(0.5, 2.0, far, calibration_quantile=0.0), layer=0)
    assert capped["radius"] == pytest.approx(1.2, rel=1e-3) and capped["radius_far_cap"] == capped["radius"]


def _batch():
    seqs = random_references(3, n_cont=1)
    width = max(len(s.tokens) for s in seqs)
    inputs, targets = torch.zeros(3, width, dtype=torch.long), torch.zeros(3, width, dtype=torch.long)
    scored = torch.zeros(3, width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        inputs[i, : len(s.tokens)], targets[i, : len(s.tokens)] = torch.tensor(s.tokens), torch.tensor(s.targets)
        scored[i, len(s.tokens) - 1] = True
    return inputs, targets, scored


@pytest.mark.parametrize("grad", ["paper", "dense"])
def test_free_kept_moves_only_the_stored_positions(grad):
    """The other positions' logits never move (they are the stock logits), over several steps; after one step the stored positions' values are
    those of free=all (their first gradient does not depend on the others)."""
    model = make_tiny_model("olmoe")
    sites = find_routers(model)
    inputs, targets, scored = _batch()
    rows = scored.reshape(-1)
    args = (model, sites, inputs, targets, scored, scored)
    stock_h = router_inputs(model, inputs)
    # free=kept steps from the prefix's key/value cache, so the sums run in another order: fp32 tolerance
    same = lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-5)  # noqa: E731
    every = optimise_logits(*args, eta=50.0, grad=grad)
    kept = optimise_logits(*args, eta=50.0, grad=grad, free="kept")
    several = optimise_logits(*args, eta=50.0, steps=3, grad=grad, free="kept")
    for s in sites:
        assert same(kept.values[s.layer][rows], every.values[s.layer][rows])
        assert not torch.equal(kept.values[s.layer][rows], s.logits(stock_h[s.layer])[rows].float())
        for result in (kept, several):  # the prefix's own forward: the same logits up to fp32 summation order
            assert torch.allclose(result.values[s.layer][~rows], s.logits(stock_h[s.layer])[~rows].float(),
                                  rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe"])
def test_free_kept_steps_from_the_prefix_cache_as_from_the_whole_sequence(family, monkeypatch):
    """Under free=kept the steps run only the columns from the first stored position on, from the prefix's
    key/value cache: the same keys, values and losses as recomputing every position each step (fp32 tolerance)."""
    import knnmoe_eval.core.gradient as gradient

    model = make_tiny_model(family)
    sites = find_routers(model)
    inputs, targets, scored = _batch()
    assert gradient.shared_prefix(scored) > 0
    kw = dict(eta=5.0, steps=3, grad="dense", optimizer="adam", free="kept", keys="mixed")
    cached = optimise_logits(model, sites, inputs, targets, scored, scored, **kw)
    monkeypatch.setattr(gradient, "shared_prefix", lambda scored: 0)
    whole = optimise_logits(model, sites, inputs, targets, scored, scored, **kw)
    assert cached.losses == pytest.approx(whole.losses, rel=1e-5)
    for s in sites:
        for a, b in ((cached.keys, whole.keys), (cached.values, whole.values)):
            assert a[s.layer].shape == b[s.layer].shape
            assert torch.allclose(a[s.layer], b[s.layer], rtol=1e-4, atol=1e-4)


def test_mixed_keys_are_router_inputs_under_the_stored_routing():
    model = make_tiny_model("olmoe")
    sites = find_routers(model)
    inputs, targets, scored = _batch()
    rows = scored.reshape(-1)
    stock = optimise_logits(model, sites, inputs, targets, scored, scored, eta=50.0)
    mixed = optimise_logits(model, sites, inputs, targets, scored, scored, eta=50.0, keys="mixed")
    assert torch.equal(stock.keys[sites[0].layer], router_inputs(model, inputs)[sites[0].layer])
    # the first layer's input does not depend on routing; a later layer's does, from the next position on (causal)
    assert torch.equal(mixed.keys[sites[0].layer], stock.keys[sites[0].layer])
    assert not torch.allclose(mixed.keys[sites[1].layer][rows], stock.keys[sites[1].layer][rows])

    def route_by_values(site, h, z):  # an independent replay: the stored positions take their values
        return torch.where(rows[:, None], mixed.values[site.layer].to(z.dtype), z)

    from knnmoe_eval.core.hooks import hooked_routers

    seen = {}
    with torch.no_grad(), hooked_routers(sites, lambda site, h, z: (seen.__setitem__(site.layer, h.clone()),
                                                                     route_by_values(site, h, z))[1]):
        model(inputs)
    for s in sites:
        assert torch.equal(mixed.keys[s.layer], seen[s.layer])


def test_calibration_text_caps_the_stored_radius(tmp_path):
    """The build reads the calibration text's router inputs and stores each layer's radius at most the chosen
    quantile of their distances to the nearest key; the manifest records the file's sha256."""
    from knnmoe_eval.core.build import read_texts

    text = tmp_path / "far.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("A: ab c", "B: ba cd e", "C: x")))
    assert list(read_texts(str(text))) == ["A: ab c", "B: ba cd e", "C: x"]
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(KnnMoeError, match="needs a 'text' field"):
        list(read_texts(str(tmp_path / "bad.jsonl")))
    model = make_tiny_model("olmoe")
    opts = KnnMoeOptions(memory=str(tmp_path / "mem"), mode="build", preset="plus", calibration=str(text),
                         calibration_quantile=0.0)
    b = MemoryBuilder(model, find_routers(model), signature(model), opts)
    b.run(random_references(n_cont=1), pad_id=0, batch_size=3)
    b.read_calibration(([1] + [ord(c) + 4 for c in t] for t in read_texts(str(text))), pad_id=0, batch_size=2)
    b.finalize()
    memory = load_memory(tmp_path / "mem")
    assert memory.manifest["build"]["calibration"]["quantile"] == 0.0 and opts.radius_scale == 2.0
    for layer, lm in memory.layers.items():
        nearest = torch.cdist(b.calibration[layer].float(), lm.keys.float()).min()  # quantile 0: the nearest token
        cap = memory.manifest["layers"][str(layer)]["radius_far_cap"]
        assert cap == pytest.approx(float(nearest), rel=1e-3) and lm.stats["radius"] <= cap


def test_calibration_is_read_in_token_filled_batches_as_one_text_at_a_time_and_no_further_than_the_cap(tmp_path):
    """Short texts share a forward up to the cap's token budget (one forward per few dozen tokens otherwise); each
    text's router inputs are those it has alone, and the texts are read only as far as the cap."""
    model = make_tiny_model("olmoe")
    gen = torch.Generator().manual_seed(0)
    texts = [torch.randint(4, 250, (int(n),), generator=gen).tolist() for n in torch.randint(3, 12, (40,), generator=gen)]
    read = []

    def lazily():
        for t in texts:
            read.append(t)
            yield t

    def calibration(name, batch_size, cap):
        b = MemoryBuilder(model, find_routers(model), signature(model),
                          KnnMoeOptions(memory=str(tmp_path / name), mode="build", preset="plus", calibration=__file__))
        forwards = []
        hook = model.register_forward_pre_hook(lambda m, args: forwards.append(args[0].shape))
        try:
            b.read_calibration(lazily(), pad_id=0, batch_size=batch_size, cap=cap)
        finally:
            hook.remove()
            b.release()
        return b.calibration, forwards

    whole, forwards = calibration("whole", 1, cap=10_000)
    n = sum(map(len, texts))
    assert n < 10_000 and len(forwards) == 1 and len(read) == 40  # one forward, though the batch size is 1
    read.clear()
    capped, forwards = calibration("capped", 1, cap=60)
    assert sum(map(len, read[:-2])) < 60  # read only as far as the cap, and one text beyond it at most
    assert 1 < len(forwards) < len(read)
    held = 0
    for rows, width in forwards:  # each forward within what the cap still asks for, unless it is one text
        assert rows == 1 or rows * width <= 60 - held
        held += sum(map(len, read[:rows]))
        del read[:rows]
    alone = [router_inputs(model, torch.tensor([t])) for t in texts]  # each text in a forward of its own
    for layer in whole:
        expected = torch.cat([a[layer] for a in alone]).to(torch.float16)
        # a batched matmul may round fp32 differently than a row alone; fp16 as stored: within a few fp16 ulps
        assert len(whole[layer]) == n and len(capped[layer]) == 60
        assert torch.allclose(whole[layer].float(), expected.float(), rtol=4e-3, atol=4e-3)
        assert torch.allclose(capped[layer].float(), expected[:60].float(), rtol=4e-3, atol=4e-3)


def test_layers_must_agree_a_token_beyond_an_earlier_radius_stays_beyond():
    """agree_with_earlier against an independent loop: a token keeps its neighbours at a layer only if it had at
    least one within the radius at every earlier layer; the first layer is the radius alone."""
    from knnmoe_eval.core.mixing import agree_with_earlier

    gen = torch.Generator().manual_seed(0)
    layers = [within_radius(torch.rand(50, 3, generator=gen, dtype=torch.float64), 0.6) for _ in range(4)]
    near_before, reach = None, [True] * 50
    for sims in layers:
        out, near_before = agree_with_earlier(sims, near_before)
        for t in range(50):
            reach[t] = reach[t] and bool(sims[t].sum() > 0)
            expected = sims[t] if reach[t] else torch.zeros(3, dtype=torch.float64)
            assert torch.equal(out[t], expected)
        assert near_before.tolist() == reach
    assert 0 < sum(reach) < 50  # the case is not trivial: some tokens lost on the way, some kept


def _radius_memory(path, model, inputs, far_layer):
    """A memory of `inputs`' own router inputs (stock logits as values) with a radius at every layer, except that
    layer `far_layer`'s keys are moved far away: the retrieval sees the query's own key at every other layer."""
    from knnmoe_eval.core.memory import write_memory_streamed

    sites = find_routers(model)
    h = router_inputs(model, inputs)
    rows = {}
    for s in sites:
        keys = h[s.layer] + (100.0 if s.layer == far_layer else 0.0)
        rows[s.layer] = (len(keys), [(keys.half(), s.logits(h[s.layer]).float())])
    return load_memory(write_memory_streamed(path, rows, signature(model), build={"preset": "plus"},
                                             radius=RadiusSpec(quantile=0.5, scale=0.25)))


def test_a_token_far_from_the_memory_at_the_first_layer_is_stock_at_every_layer(tmp_path):
    """The chained radius through the Retriever: every token sits on its own key at the second layer, yet with the
    first layer's keys moved away no token is mixed anywhere and the logits are the stock model's, bit for bit."""
    model = make_tiny_model("olmoe")
    sites = find_routers(model)
    assert len(sites) >= 2
    inputs = torch.tensor([s.tokens for s in random_references(3, length=9, n_cont=1)[:1]])
    with torch.no_grad():
        stock = model(inputs).logits
    near = _radius_memory(tmp_path / "near", model, inputs, far_layer=None)
    with torch.no_grad(), attach(model, near, preset="plus", k=1) as retriever:
        model(inputs)
    assert all(d["mean_lambda"] == 1.0 for d in retriever.diagnostics().values())  # the control: all on their keys
    far = _radius_memory(tmp_path / "far", model, inputs, far_layer=sites[0].layer)
    with torch.no_grad(), attach(model, far, preset="plus", k=1) as retriever:
        chained = model(inputs).logits
    assert all(d["mean_lambda"] == 0.0 for d in retriever.diagnostics().values())
    assert torch.equal(chained, stock)


def test_the_build_refuses_a_radius_that_admits_the_models_own_samples(tmp_path):
    """Without calibration text the build samples the stock model's own text (probe_tokens) and refuses a memory
    whose first-layer radius admits more than probe_bound of it, naming the fix; the largest radius_scale it names
    then builds, and the manifest's admitted share is the probe's share within the radius (brute force)."""
    model = make_tiny_model("olmoe")
    refs = random_references(n=48, n_cont=3)  # random tokens, as the random model samples: no radius separates them
    given = {"mode": "build", "preset": "plus", "probe_tokens": 256}

    def build_with(path, batch_size=16, **extra):
        b = MemoryBuilder(model, find_routers(model), signature(model),
                          KnnMoeOptions(memory=str(path), **given, **extra))
        b.build(refs, pad_id=0, batch_size=batch_size)
        return b

    with pytest.raises(KnnMoeError, match=r"no safe radius.*calibration=FILE.*radius_scale<=") as refused:
        build_with(tmp_path / "wide")
    assert not (tmp_path / "wide" / "manifest.json").exists()
    scale = float(str(refused.value).split("radius_scale<=")[1].split()[0])
    assert 0 < scale < 2
    b = build_with(tmp_path / "safe", radius_scale=scale)
    memory = load_memory(tmp_path / "safe")
    first = min(memory.layers)
    entry = memory.manifest["layers"][str(first)]
    nearest = torch.cdist(b.probe[first].double(), memory.layers[first].keys.double()).min(1).values
    assert entry["probe_admitted"] == pytest.approx(float((nearest <= entry["radius"]).double().mean()), abs=1 / 256)
    assert entry["probe_admitted"] <= 0.01 and len(b.probe[first]) == 256
    assert memory.manifest["build"]["probe"]["tokens"] == 256
    # the probe's text does not depend on the build's batch size (a merge resumed on its own reads it alone)
    other = build_with(tmp_path / "safe_b5", batch_size=5, radius_scale=scale)
    assert torch.equal(other.probe[first], b.probe[first])
    assert load_memory(tmp_path / "safe_b5").manifest["layers"][str(first)]["probe_admitted"] == entry["probe_admitted"]
