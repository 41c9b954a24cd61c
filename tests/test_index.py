"""Indexes: exact stays the paper's bit-identical default; ivfpq/hnsw are saved, checksummed, reloaded and agree."""

import json
import logging

import faiss
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from knnmoe_eval import attach
from knnmoe_eval.core import index as knn_index
from knnmoe_eval.core.files import sha256_file
from knnmoe_eval.core.options import KnnMoeOptions
from knnmoe_eval.errors import KnnMoeError
from knnmoe_eval.testing import make_tiny_model, router_inputs, write_constant_memory

IDS = torch.randint(4, 250, (2, 10), generator=torch.Generator().manual_seed(0))


def clustered(n, d, seed=0):
    """Keys with structure (router inputs are far from isotropic): 40 clusters in a 16-dim subspace, plus noise."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(16, d, generator=g)
    centres = torch.randn(40, 16, generator=g) * 3
    x = centres[torch.randint(0, 40, (n,), generator=g)] + torch.randn(n, 16, generator=g)
    return (x @ basis + 0.1 * torch.randn(n, d, generator=g)).half()


def test_exact_is_the_default_and_bit_identical_to_a_plain_sqfp16_index():
    assert KnnMoeOptions(memory="m").index == "exact"
    keys = clustered(2000, 64)
    queries = clustered(100, 64, seed=1).float().numpy()
    plain = faiss.index_factory(64, "SQfp16", faiss.METRIC_L2)
    plain.add(keys.float().numpy())
    ours = knn_index.build_index(keys, knn_index.plan("exact", 64, 2000).factory)
    for a, b in zip(plain.search(queries, 4), knn_index.search(ours, queries, 4)):
        np.testing.assert_array_equal(a, b)


def test_ivfpq_is_the_papers_and_ivfpq_rerank_ours_with_lists_scaling_with_n():
    paper = knn_index.plan("ivfpq", 2048, 100_000)
    assert (paper.factory, paper.nprobe, paper.rerank) == ("PCA256,IVF1024,SQ8", 32, False)
    assert not paper.true_distances
    ours = knn_index.plan("ivfpq_rerank", 2048, 100_000)
    assert (ours.factory, ours.nprobe, ours.rerank) == ("PCA256,IVF1024,PQ32x8np", 8, True)
    assert knn_index.plan("ivfpq_rerank", 2048, 1_000_000).factory == "PCA256,IVF4096,PQ32x8np"
    assert knn_index.plan("ivfpq", 2048, 1_000_000, nprobe=8).nprobe == 8
    small = knn_index.plan("ivfpq_rerank", 64, 2000).factory  # too few keys for 256 PQ centroids or 1024 lists
    assert small.startswith("PCA8,IVF32,PQ8x")
    assert knn_index.plan("IVF16,Flat", 64, 2000) == knn_index.IndexPlan("IVF16,Flat", 8, rerank=True)
    assert knn_index.plan("exact", 64, 2000).true_distances
    from knnmoe_eval.core.options import split_model_args

    assert split_model_args({"memory": "m", "nprobe": "auto"}, set())[0].nprobe is None  # the index's own
    assert split_model_args({"memory": "m", "nprobe": "16"}, set())[0].nprobe == 16
    with pytest.raises(KnnMoeError, match="nprobe"):
        KnnMoeOptions(memory="m", nprobe=0)


@pytest.mark.parametrize("name", ["ivfpq", "ivfpq_rerank", "hnsw"])
def test_trained_index_round_trips_through_the_memory_directory(tmp_path, name, monkeypatch):
    keys = clustered(2000, 64)
    factory = knn_index.plan(name, 64, 2000).factory
    queries = clustered(200, 64, seed=1).float().numpy()
    first = knn_index.load_or_build(keys, factory, 8, False, tmp_path, 3, "sha-of-keys")
    saved = list((tmp_path / "index").glob("layer_003.*.faiss"))
    assert len(saved) == 1 and saved[0].with_name(saved[0].name + ".json").exists()

    def no_training(*args, **kwargs):
        raise AssertionError("the saved index should have been reused")

    monkeypatch.setattr(knn_index, "build_index", no_training)
    again = knn_index.load_or_build(keys, factory, 8, False, tmp_path, 3, "sha-of-keys")
    for a, b in zip(knn_index.search(first, queries, 2), knn_index.search(again, queries, 2)):
        np.testing.assert_array_equal(a, b)
    # other keys (or another factory) must not pick up this file
    assert knn_index.index_path(tmp_path, 3, knn_index.index_spec(factory, False, "other")) != saved[0]


def saved(tmp_path, layer=0):
    (path,) = (tmp_path / "index").glob(f"layer_{layer:03d}.*.faiss")
    return path, path.with_name(path.name + ".json")


def forge_sidecar(path, sidecar):
    """What a swap needs to get past the checksum: the sidecar's sha256 updated to the swapped-in file."""
    meta = json.loads(sidecar.read_text())
    meta["sha256"] = sha256_file(path)
    sidecar.write_text(json.dumps(meta))


def same_search(a, b, keys):
    queries = keys[:100].float().numpy()
    return all(np.array_equal(x, y) for x, y in zip(knn_index.search(a, queries, 4), knn_index.search(b, queries, 4)))


def test_a_corrupted_index_file_is_refused_and_retrained_never_used(tmp_path, caplog):
    keys = clustered(2000, 64)
    factory = knn_index.plan("ivfpq_rerank", 64, 2000).factory
    first = knn_index.load_or_build(keys, factory, 8, False, tmp_path, 0, "sha")
    path, _ = saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="knnmoe_eval.core.index"):
        again = knn_index.load_or_build(keys, factory, 8, False, tmp_path, 0, "sha")
    assert "truncated or corrupted" in caplog.text and "Retraining it in its place" in caplog.text
    assert same_search(first, again, keys)
    assert knn_index.read_saved_index(path, knn_index.index_spec(factory, False, "sha"), keys) is not None  # rewritten


@pytest.mark.parametrize(("swap", "why"), [("other keys", "made from other keys"), ("other factory", "is not a")])
def test_a_swapped_index_with_a_matching_sidecar_is_refused_and_retrained(tmp_path, caplog, swap, why):
    """Issue 23: another memory's ivfpq index under this one's name, its sidecar's checksum updated, loaded
    silently and moved the outputs. Now it is refused for what it is, and this memory's own index is trained."""
    keys = clustered(2000, 64)
    factory = knn_index.plan("ivfpq", 64, 2000).factory
    mine = knn_index.load_or_build(keys, factory, 8, False, tmp_path / "a", 0, "sha-a")
    if swap == "other keys":
        other = knn_index.load_or_build(clustered(2000, 64, seed=5), factory, 8, False, tmp_path / "b", 0, "sha-b")
    else:
        other = knn_index.load_or_build(keys, knn_index.plan("hnsw", 64, 2000).factory, 8, False, tmp_path / "b", 0,
                                        "sha-a")
    assert not same_search(mine, other, keys)
    path, sidecar = saved(tmp_path / "a")
    path.write_bytes(saved(tmp_path / "b")[0].read_bytes())
    forge_sidecar(path, sidecar)
    with caplog.at_level(logging.WARNING, logger="knnmoe_eval.core.index"):
        used = knn_index.load_or_build(keys, factory, 8, False, tmp_path / "a", 0, "sha-a")
    assert why in caplog.text and "was not used" in caplog.text
    assert same_search(mine, used, keys)


def test_corrupted_index_files_with_matching_sidecars_never_surface_a_faiss_error(tmp_path):
    """30 seeded corruptions (bit flips, zeroed runs, truncations), each with its sidecar updated: every one is
    refused for a reason (which load_or_build turns into retraining, above), or a harmless flip that still is this
    memory's index; none surfaces faiss's raw RuntimeError (issue 23: 12 of 30 did)."""
    keys = clustered(2000, 64)
    factory = knn_index.plan("ivfpq_rerank", 64, 2000).factory
    spec = knn_index.index_spec(factory, False, "sha")
    knn_index.load_or_build(keys, factory, 8, False, tmp_path, 0, "sha")
    path, sidecar = saved(tmp_path)
    good = path.read_bytes()
    rng = np.random.default_rng(0)
    refused = 0
    for trial in range(30):
        data = bytearray(good)
        at = int(rng.integers(0, len(data)))
        if trial % 3 == 0:
            data[at] ^= 1 << int(rng.integers(0, 8))
        elif trial % 3 == 1:
            data[at : at + 64] = bytes(len(data[at : at + 64]))
        else:
            data = data[:at]
        path.write_bytes(bytes(data))
        forge_sidecar(path, sidecar)
        try:
            assert knn_index.read_saved_index(path, spec, keys).ntotal == 2000
        except knn_index.RefusedIndex:
            refused += 1
    assert refused >= 10


@pytest.mark.parametrize("name", ["ivfpq", "ivfpq_rerank", "hnsw"])
def test_approximate_indexes_find_near_keys_and_return_true_distances(name):
    keys = clustered(2000, 64)
    exact = knn_index.build_index(keys)
    approx = knn_index.build_index(keys, knn_index.plan(name, 64, 2000).factory, nprobe=8)
    queries = (keys[:200].float() + 0.05 * torch.randn(200, 64)).numpy()
    d_exact, _ = knn_index.search(exact, queries, 1)
    _, ids = knn_index.search(approx, queries, 1)
    d_found = ((keys.float().numpy()[ids[:, 0]] - queries) ** 2).sum(1)
    assert np.median(d_found / np.maximum(d_exact[:, 0], 1e-9)) < 1.05


@pytest.mark.parametrize("name", ["ivfpq", "ivfpq_rerank", "hnsw"])
def test_self_retrieval_through_an_approximate_index_is_confident(tmp_path, name):
    model = make_tiny_model("olmoe")
    near = router_inputs(model, IDS)
    # the sequence's own router inputs among enough unrelated keys to train PCA, IVF and PQ on
    g = torch.Generator().manual_seed(0)
    keys = {l: torch.cat([k, 3 * torch.randn(500, k.shape[1], generator=g)]) for l, k in near.items()}
    mem = write_constant_memory(tmp_path / "m", model, keys, lambda l, n, e: torch.zeros(n, e))
    with torch.no_grad(), attach(model, mem, index=name, nprobe=4, sigma=1.0) as retriever:
        model(IDS)
    assert all(d["mean_lambda"] > 0.99 for d in retriever.diagnostics().values())
    assert list((tmp_path / "m" / "index").glob("*.faiss"))


def test_exact_search_that_would_dominate_is_reported_once(caplog):
    with caplog.at_level(logging.WARNING, logger="knnmoe_eval.core.index"):
        knn_index.warn_if_exact_dominates("mem-small", 1000, 64, layer_macs=10**6)
        knn_index.warn_if_exact_dominates("mem-big", 100_000, 2048, layer_macs=67 * 10**6)
        knn_index.warn_if_exact_dominates("mem-big", 100_000, 2048, layer_macs=67 * 10**6)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "mem-big" in warnings[0] and "index=ivfpq" in warnings[0]


@pytest.mark.skipif(not (torch.cuda.is_available() and knn_index.gpu_available()), reason="needs a GPU and faiss-gpu")
@pytest.mark.parametrize("name", ["ivfpq", "ivfpq_rerank"])
def test_gpu_index_searches_cuda_tensors_like_the_cpu_index(name):
    keys = clustered(2000, 64)
    cpu = knn_index.build_index(keys, knn_index.plan(name, 64, 2000).factory, nprobe=8)
    gpu = knn_index.to_device(cpu, torch.device("cuda:0"))
    assert isinstance(gpu, knn_index.GpuIndex)
    queries = keys[:100].float()
    _, ids_cpu = knn_index.search(cpu, queries.numpy(), 1)
    _, ids_gpu = gpu.search(queries.cuda(), 1)
    assert ids_gpu.is_cuda
    assert (ids_gpu.cpu().numpy() == ids_cpu).mean() > 0.95


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_exact_search_on_a_gpu_finds_what_it_finds_on_the_cpu():
    keys = clustered(3000, 64)
    queries = clustered(100, 64, seed=1).float()
    d_cpu, _ = knn_index.TorchExactIndex(keys, torch.device("cpu"), False).search(queries, 4)
    d_gpu, i_gpu = knn_index.TorchExactIndex(keys, torch.device("cuda:0"), False).search(queries.cuda(), 4)
    assert i_gpu.is_cuda
    torch.testing.assert_close(d_gpu.cpu(), d_cpu, rtol=1e-5, atol=1e-5)


def test_cuda_without_faiss_gpu_falls_back_to_the_cpu_index(monkeypatch):
    monkeypatch.setattr(knn_index, "gpu_available", lambda: False)
    cpu = knn_index.build_index(clustered(100, 64))
    assert knn_index.to_device(cpu, torch.device("cuda:0")) is cpu


def test_ivfpq_from_mapped_keys_in_small_chunks_finds_the_same_neighbours(tmp_path, monkeypatch):
    keys = clustered(3000, 64)
    save_file({"keys": keys}, str(tmp_path / "keys.safetensors"))
    mapped = load_file(str(tmp_path / "keys.safetensors"))["keys"]  # memory-mapped, as load_memory returns it
    factory = knn_index.plan("ivfpq_rerank", 64, 3000).factory
    queries = clustered(300, 64, seed=1).float().numpy()
    whole = knn_index.build_index(keys, factory, nprobe=8)
    monkeypatch.setattr(knn_index, "_CHUNK", 100)  # 30 adds instead of one
    chunked = knn_index.build_index(mapped, factory, nprobe=8)
    for a, b in zip(knn_index.search(whole, queries, 4), knn_index.search(chunked, queries, 4)):
        np.testing.assert_array_equal(a, b)


def test_exact_indexes_that_exceed_the_available_ram_are_refused_at_setup(tmp_path, monkeypatch):
    model = make_tiny_model("olmoe")
    mem = write_constant_memory(tmp_path / "m", model, router_inputs(model, IDS), lambda l, n, e: torch.zeros(n, e))
    monkeypatch.setattr(knn_index, "available_ram", lambda: 1000)  # fewer bytes than 20 fp16 keys of 2 layers
    with pytest.raises(KnnMoeError, match=r"index=exact keeps every layer's fp16 keys in RAM.*Use index=ivfpq"):
        with attach(model, mem):
            pass
    monkeypatch.setattr(knn_index, "available_ram", lambda: None)  # unknown: no check
    with attach(model, mem):
        pass


@pytest.mark.parametrize("normalize", [False, True])
def test_rerank_keeps_the_truly_nearest_candidates_with_exact_distances(normalize):
    keys = clustered(500, 64)
    q = clustered(50, 64, seed=1).float()
    ids = torch.randint(0, 500, (50, 12), generator=torch.Generator().manual_seed(2))
    ids[:5, -3:] = -1  # the index found fewer candidates for these queries
    k64 = keys.double()
    q64 = q.double()
    if normalize:
        k64 = k64 / k64.norm(dim=-1, keepdim=True)
        q64 = q64 / q64.norm(dim=-1, keepdim=True)
    ref = (k64[ids.clamp_min(0)] - q64.unsqueeze(1)).pow(2).sum(-1).masked_fill(ids < 0, float("inf"))
    ref_d, ref_order = ref.topk(3, dim=-1, largest=False)
    qin = torch.nn.functional.normalize(q, dim=-1) if normalize else q
    dist2, found = knn_index.rerank(qin, ids, keys, knn_index.key_norms(keys), 3, normalize)
    # fp16 ranking products may only swap candidates whose true distances are within their rounding
    true_of_found = (k64[found] - q64.unsqueeze(1)).pow(2).sum(-1)
    torch.testing.assert_close(dist2.double(), true_of_found, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dist2.double(), ref_d, rtol=1e-3, atol=1e-4)
    assert (found == ids.gather(1, ref_order)).float().mean() > 0.97
    assert (dist2.diff(dim=-1) >= 0).all()


@pytest.mark.parametrize("normalize", [False, True])
def test_torch_exact_index_finds_what_faiss_exact_search_finds(normalize):
    keys = clustered(3000, 64)
    queries = clustered(100, 64, seed=1).float()
    torch_index = knn_index.TorchExactIndex(keys, torch.device("cpu"), normalize)
    torch_index.chunk = 1000  # several chunks of keys, merged
    d_torch, i_torch = torch_index.search(queries, 4)
    q = torch.nn.functional.normalize(queries, dim=-1).numpy() if normalize else queries.numpy()
    d_faiss, _ = knn_index.search(knn_index.build_index(keys, normalize=normalize), q, 4)
    # the same 4 nearest distances; faiss rounds the normalised keys to fp16 (2^-11), torch normalises in fp32
    np.testing.assert_allclose(d_torch.numpy(), d_faiss, rtol=1e-3 if normalize else 1e-4, atol=1e-5)
    k = torch.nn.functional.normalize(keys.float(), dim=-1) if normalize else keys.float()
    true = (k[i_torch] - torch.from_numpy(q).unsqueeze(1)).pow(2).sum(-1)  # ... of the keys returned
    torch.testing.assert_close(d_torch, true, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("normalize", [False, True])
def test_index_nn_statistic_of_an_exact_index_is_the_memorys(normalize):
    from knnmoe_eval.core.sigma import mean_nn_sq_dists

    keys = clustered(3000, 64)
    raw, l2 = mean_nn_sq_dists(keys)
    ours = knn_index.index_nn_sq_dist(knn_index.build_index(keys, normalize=normalize), keys, normalize)
    assert ours == pytest.approx(l2 if normalize else raw, rel=1e-4)


@pytest.mark.parametrize("name", ["ivfpq", "ivfpq_rerank", "hnsw"])
def test_every_index_through_the_retrieval_path_agrees_with_exact(tmp_path, name):
    from knnmoe_eval.core.memory import load_memory
    from knnmoe_eval.core.retrieval import Retriever

    model = make_tiny_model("olmoe")
    d = model.config.hidden_size
    keys = {l: clustered(2000, d, seed=l) for l in range(model.config.num_hidden_layers)}
    memory = load_memory(write_constant_memory(tmp_path / "m", model, keys, lambda l, n, e: torch.zeros(n, e)))
    exact = Retriever(model, memory, KnnMoeOptions(memory=str(memory.path)))
    approx = Retriever(model, memory, KnnMoeOptions(memory=str(memory.path), index=name))
    g = torch.Generator().manual_seed(1)
    for layer, lr in approx.layers.items():
        q = keys[layer][:200].float() + 0.3 * torch.randn(200, d, generator=g)  # near stored keys, not on them
        _, i_exact = exact.layers[layer].search(q, 1)
        dist2, ids = lr.search(q, 1)
        true = (keys[layer][ids[:, 0]].float() - q).pow(2).sum(-1)
        assert (ids[:, 0] == i_exact[:, 0]).float().mean() > 0.9
        if lr.plan.rerank:  # re-ranked: true distances
            torch.testing.assert_close(dist2[:, 0], true, rtol=1e-5, atol=1e-4)
        else:  # the paper's ivfpq: distances in PCA space (shorter), sigma=auto measured in that same space
            assert (dist2[:, 0] <= true * 1.05).all()
            assert lr.two_sigma2 == pytest.approx(knn_index.index_nn_sq_dist(lr.index, keys[layer], False))
            assert lr.two_sigma2 < memory.layers[layer].stats["mean_nn_sq_dist"]


def test_a_nan_router_input_is_refused_before_the_search(tmp_path):
    from knnmoe_eval.core.memory import load_memory
    from knnmoe_eval.core.retrieval import Retriever
    from knnmoe_eval.core.routers import find_routers

    model = make_tiny_model("olmoe")
    memory = load_memory(write_constant_memory(tmp_path / "m", model, router_inputs(model, IDS),
                                               lambda l, n, e: torch.zeros(n, e)))
    retriever = Retriever(model, memory, KnnMoeOptions(memory=str(memory.path)))
    site = find_routers(model)[0]
    h = torch.randn(4, model.config.hidden_size)
    h[2, 5] = float("nan")
    with pytest.raises(KnnMoeError, match="NaN in the router input"):
        retriever(site, h, site.module(h))
