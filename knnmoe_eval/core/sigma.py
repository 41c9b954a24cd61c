"""The RBF bandwidth sigma: the memory's nearest-neighbour distance statistics, and the choice of 2 sigma^2.

The paper sets sigma "heuristically based on the average nearest neighbor distance in the memory", without the
formula. Two readings: `sigma=auto` (the default, our reading) sets 2 sigma^2 = the mean *squared* nearest-neighbour
distance, so a neighbour at the typical distance gets similarity e^-1; `sigma=mean_nn` sets sigma = the mean
nearest-neighbour distance itself, so 2 sigma^2 = 2 (mean distance)^2 (a wider kernel: at the typical distance
e^-1/2, less the spread of the distances). Each layer's statistics are computed once when the memory is written
(sampled queries, exact search) and stored in its manifest; `two_sigma2` turns them, or an explicit `sigma=`, into
the kernel's 2 sigma^2 at load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from ..errors import KnnMoeError

_SIGMA_SAMPLE = 2048  # queries used to estimate the mean nearest-neighbour distance
_NN_ROWS = 4096  # keys per chunk of the nearest-neighbour statistics: 32 MB as float32 at d = 2048


def sampled_nn_sq_dists(keys: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Squared distance from each of a sample of keys to its nearest *other* key (leave-one-out), raw and between
    L2-normalised keys: two (s,) float64 tensors (sampled queries, exact search); None below two keys.

    One pass over the keys in chunks: both distances come from the same dot products,
    ||q - x||^2 = |q|^2 + |x|^2 - 2 q.x and ||q/|q| - x/|x|||^2 = 2 - 2 q.x / (|q| |x|).
    """
    n = keys.shape[0]
    if n < 2:
        return None
    rows = torch.from_numpy(np.random.default_rng(seed).choice(n, size=min(n, _SIGMA_SAMPLE), replace=False))
    q = keys[rows].float()  # (s, d)
    q_sq = q.pow(2).sum(-1, keepdim=True)  # (s, 1)
    q_norm = q_sq.sqrt().clamp_min(1e-12)
    best = {"raw": [], "l2": []}  # per chunk: (s, 2) two smallest distances, (s, 2) their ids
    for start in range(0, n, _NN_ROWS):
        x = keys[start : start + _NN_ROWS].float()  # (c, d)
        x_sq = x.pow(2).sum(-1)  # (c,)
        dots = q @ x.T  # (s, c)
        raw = (q_sq + x_sq - 2 * dots).clamp_min(0)
        l2 = (2 - 2 * dots / (q_norm * x_sq.sqrt().clamp_min(1e-12))).clamp_min(0)
        for name, dist in (("raw", raw), ("l2", l2)):
            d2, ids = dist.topk(min(2, dist.shape[1]), dim=1, largest=False)
            best[name].append((d2, ids + start))
    out = []
    for name in ("raw", "l2"):
        d2, ids = torch.cat([d for d, _ in best[name]], 1), torch.cat([i for _, i in best[name]], 1)
        d2, order = d2.topk(2, dim=1, largest=False)
        ids = ids.gather(1, order)
        # the query itself is among the keys; an exact duplicate may come before it
        out.append(torch.where(ids[:, 0] == rows, d2[:, 1], d2[:, 0]).double())
    return out[0], out[1]


def mean_nn_sq_dists(keys: torch.Tensor, seed: int = 0) -> tuple[float | None, float | None]:
    """Mean squared distance from a key to its nearest other key, raw and L2-normalised; None below two keys."""
    dists = sampled_nn_sq_dists(keys, seed)
    return (None, None) if dists is None else (float(dists[0].mean()), float(dists[1].mean()))


@dataclass(frozen=True)
class RadiusSpec:
    """How a build sets each layer's confidence radius (`confidence=radius`, beyond the paper)."""

    quantile: float  # of the keys' leave-one-out nearest-neighbour distances
    scale: float  # the radius as a multiple of that quantile
    calibration: Mapping[int, torch.Tensor] | None = None  # layer -> (m, d) router inputs of text that is not this domain
    calibration_quantile: float = 0.001  # ... the radius stays below this quantile of their distances to the nearest key
    probe: Mapping[int, torch.Tensor] | None = None  # layer -> (m, d) router inputs of the stock model's own samples
    probe_bound: float = 0.01  # the largest share of them the first MoE layer's radius may admit (probe_tokens)

    def check_probe(self, entries: Mapping[str, dict], first: int, where: str) -> None:
        """Refuse a memory whose first MoE layer's radius admits more than probe_bound of the probe's tokens:
        under the layers' agreement (mixing.agree_with_earlier) that layer decides which tokens take the memory
        anywhere, so the share it admits is the share of the model's own text the memory would change."""
        if self.probe is None:
            return
        entry = entries[str(first)]
        share = entry["probe_admitted"]
        if share > self.probe_bound:
            raise KnnMoeError(
                f"{where}: no safe radius from the memory alone: the first MoE layer's radius "
                f"({entry['radius']:.4g}) admits {share:.1%} of {len(self.probe[first])} tokens the stock model "
                f"samples itself (probe_tokens), above probe_bound={self.probe_bound:g}, so the memory would change "
                "the model's routing on its own text. Pass calibration=FILE (text that is not this memory's domain: "
                f"each layer's radius is then capped below it), or radius_scale<={_down(entry.get('probe_safe_scale', 0.0))} "
                "(the largest that keeps the probe within the bound), or probe_bound=1 to write it anyway. Build into "
                "a new directory (or delete this one): its layer files are written, its manifest is not."
            )


def _down(x: float, digits: int = 3) -> str:
    """`x` rounded down to `digits` significant digits: a scale that, pasted back, still keeps under the bound."""
    if x <= 0:
        return "0"
    e = math.floor(math.log10(x)) - digits + 1
    return f"{math.floor(x / 10**e) * 10**e:.{max(0, -e)}f}"


def nearest_sq_dists(queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distance from each query (m, d) to its nearest key (n, d), raw and L2-normalised: two (m,) float64."""
    q = queries.float()
    q_sq = q.pow(2).sum(-1, keepdim=True)  # (m, 1)
    q_norm = q_sq.sqrt().clamp_min(1e-12)
    raw = torch.full((len(q),), float("inf"), dtype=torch.float64)
    l2 = raw.clone()
    for start in range(0, keys.shape[0], _NN_ROWS):
        x = keys[start : start + _NN_ROWS].float()  # (c, d)
        x_sq = x.pow(2).sum(-1)  # (c,)
        dots = q @ x.T  # (m, c)
        raw = torch.minimum(raw, (q_sq + x_sq - 2 * dots).clamp_min(0).min(1).values.double())
        l2 = torch.minimum(l2, (2 - 2 * dots / (q_norm * x_sq.sqrt().clamp_min(1e-12))).clamp_min(0).min(1).values.double())
    return raw, l2


def layer_stats(keys_fp16: torch.Tensor, radius: RadiusSpec | None = None, layer: int | None = None) -> dict:
    """The sigma statistics and, when `radius` is given, the layer's confidence radius (raw and between
    L2-normalised keys): scale x the quantile of the keys' leave-one-out nearest-neighbour distance, capped, when
    not-this-domain router inputs are given, at the calibration_quantile of their distances to the nearest key."""
    dists = sampled_nn_sq_dists(keys_fp16)
    stats = {"mean_nn_sq_dist": None, "mean_nn_sq_dist_l2": None}
    if dists is not None:
        stats = {"mean_nn_sq_dist": float(dists[0].mean()), "mean_nn_sq_dist_l2": float(dists[1].mean()),
                 # sigma=mean_nn's basis: the mean distance, not the root of the mean squared one
                 "mean_nn_dist": float(dists[0].sqrt().mean()), "mean_nn_dist_l2": float(dists[1].sqrt().mean())}
    if radius is None or dists is None:
        return stats
    calibration = None
    if radius.calibration is not None and len(radius.calibration[layer]):
        calibration = nearest_sq_dists(radius.calibration[layer], keys_fp16)
    quantiles = [float(torch.quantile(d, radius.quantile).sqrt()) for d in dists]  # raw, between normalised keys
    for i, name in enumerate(("radius", "radius_l2")):
        r = radius.scale * quantiles[i]
        if calibration is not None:
            cap = float(torch.quantile(calibration[i], radius.calibration_quantile).sqrt())
            if cap <= 0:
                raise KnnMoeError(
                    f"layer {layer}: the calibration text lands on the memory's own keys (distance 0 at its "
                    f"{radius.calibration_quantile} quantile), so no radius can keep it out: calibration must be text that "
                    "is NOT this memory's domain (e.g. another domain's training text), or drop calibration="
                )
            stats[f"{name}_far_cap"] = cap
            r = min(r, cap)
        stats[name] = r
    if radius.probe is not None and len(radius.probe[layer]):
        near = nearest_sq_dists(radius.probe[layer], keys_fp16)[0].sqrt()  # (m,) float64
        stats["probe_admitted"] = float((near <= stats["radius"]).double().mean())
        # the largest scale that admits at most probe_bound of them: below the bound's quantile of their distances
        # (the j nearest may be admitted, j = bound x m: the radius must stay below the (j+1)-th)
        ordered, j = near.sort().values, int(radius.probe_bound * len(near))
        if j < len(near) and quantiles[0] > 0:
            stats["probe_safe_scale"] = float(ordered[j]) / quantiles[0] * (1 - 1e-6)
    return stats


MEAN_NN = "mean_nn"  # sigma's other reading: sigma = the mean nearest-neighbour distance


def two_sigma2(similarity: str, sigma: float | str | None, stats: dict, layer: int, path: Path,
               in_index_space: Callable[[], np.ndarray | None] | None = None) -> float:
    """2 sigma^2 of one layer's kernel: 1 for cosine (no bandwidth), 2 sigma^2 for an explicit sigma; for
    sigma=auto the layer's mean squared nearest-neighbour distance, for sigma=mean_nn 2 (mean distance)^2 (between
    L2-normalised keys for rbf_l2); for an index that returns its own distances rather than true ones, those
    statistics as the index measures them (`in_index_space`: the sampled keys' squared distances to their nearest
    other key in the index)."""
    if similarity == "cosine":
        return 1.0
    if sigma is not None and sigma != MEAN_NN:
        return 2.0 * sigma**2
    suffix = "_l2" if similarity != "rbf" else ""
    if in_index_space is not None:
        d2 = in_index_space()
        stat = None if d2 is None or not len(d2) else float(
            np.sqrt(d2).mean() if sigma == MEAN_NN else d2.mean())
    elif sigma == MEAN_NN:
        if f"mean_nn_dist{suffix}" not in stats:
            raise KnnMoeError(f"sigma=mean_nn needs the mean nearest-neighbour distance, which {path} (built by an "
                              "earlier version) does not store; rebuild the memory, or use sigma=auto or a number")
        stat = stats[f"mean_nn_dist{suffix}"]
    else:
        stat = stats[f"mean_nn_sq_dist{suffix}"]
    if not stat:
        raise KnnMoeError(
            f"sigma={sigma or 'auto'} needs at least two distinct keys per layer, and layer {layer} of {path} has "
            "not; pass sigma=<number>"
        )
    return 2.0 * stat**2 if sigma == MEAN_NN else stat
