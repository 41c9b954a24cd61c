"""Memory construction through lm-eval: reference requests -> batches -> the gradient step -> shards -> memory.

The method itself (leaf logits, the loss, z* = z - eta g) is `gradient.py`; this module feeds it padded batches,
keeps the stored positions, and owns resume and the merge. Keys are router inputs under stock routing; values of
layer l >= 1 are computed with earlier layers stock, but at inference they are applied after earlier layers were
already mixed: that mismatch is the paper's, kept by default; `keys=mixed` (preset=plus) re-reads the keys under
the stored routing instead. With `radius_quantile` (and `calibration` text) the merge also stores each layer's
confidence radius (`sigma.layer_stats`).

Long builds flush shards to OUT_DIR/shards as they go and a rerun of the same command skips finished requests;
the memory itself is written last, manifest last of all. Finalizing merges one layer at a time, streaming each
request's rows from the memory-mapped shards into the layer's file (`memory.write_memory_streamed`), so neither
the build nor the merge ever holds more than one shard's worth of keys.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import re
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from ..errors import KnnMoeError
from .files import DirectoryLock, is_leftover, remove_leftovers, save_tensors_atomic, sha256_file, write_json_atomic
from .gradient import _cache_arg, optimise_logits
from .hooks import Recorder, hooked_routers
from .memory import MANIFEST, ROWS, write_memory_streamed
from .options import BUILD_FIELDS, KnnMoeOptions
from .routers import RouterSite
from .sigma import RadiusSpec

log = logging.getLogger(__name__)

RequestId = tuple[str, int, int]  # (task name, doc id, choice index): how lm-eval identifies a request
BUILD_STATE = "build.json"
LOCK = ".build{}.lock"  # one per rank (rank 0: ".build.lock"), held for the whole build
RADIUS_RULE = "within every layer's radius so far (mixing.agree_with_earlier)"
CALIBRATION_TOKENS = 4096  # calibration tokens read per layer: its 0.001 quantile is about the 4th nearest
PROBE_LENGTH = 32  # tokens sampled per probe row (probe_tokens): short enough for any model's context
PROBE_SEED = 0
PROBE_BATCH = 32  # rows sampled together: fixed, since the draws' order (so the text) depends on the batching


@dataclass
class RefSequence:
    """One reference sequence, tokenized as lm-eval's `hf` model does for loglikelihood."""

    rid: RequestId
    tokens: list[int]  # model input: (context + continuation)[:-1], left-truncated to max_length
    targets: list[int]  # next tokens: (context + continuation)[1:]
    n_cont: int  # the last n_cont positions predict the continuation


@dataclass
class _Shard:
    rids: list[RequestId] = field(default_factory=list)
    loglik: list[tuple[float, bool]] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)  # kept positions per request
    keys: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    values: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    @property
    def positions(self) -> int:
        return sum(self.counts)


class MemoryBuilder:
    def __init__(self, model: torch.nn.Module, sites: Sequence[RouterSite], signature: dict, options: KnnMoeOptions,
                 rank: int = 0, world_size: int = 1):
        self.model, self.sites, self.signature, self.options = model, list(sites), signature, options
        self.rank, self.world_size = rank, world_size
        self.out = Path(options.memory)
        self.shard_dir = self.out / "shards"
        self.calibration: dict[int, torch.Tensor] | None = None  # router inputs of the calibration text, per layer
        self.wall_s: float | None = None  # the last build's wall time, the cost the paper sets against SFT training
        self.calibration_s = 0.0  # reading the calibration text, before `build`: added to wall_s
        self.probe_s = 0.0  # sampling the probe, inside `build` (its merge): already in wall_s
        self.probe: dict[int, torch.Tensor] | None = None  # router inputs of the stock model's own samples, per layer
        self.lock = DirectoryLock(self.out / LOCK.format("" if rank == 0 else f".rank{rank:03d}"), str(self.out))
        self._check_out_dir()

    # -- resumable state -------------------------------------------------------------------------------------
    def _state(self) -> dict:
        return {"model": self.signature, "build": build_settings(self.options)}

    def _refuse_complete(self) -> None:
        if (self.out / MANIFEST).exists():
            raise KnnMoeError(
                f"{self.out} already holds a complete memory; build into a new directory (or delete this one)"
            )

    def _check_out_dir(self) -> None:
        """Own the directory (its lock) and check that it is new, or a partial build of this model and settings."""
        self._refuse_complete()
        state_file = self.out / BUILD_STATE
        if not state_file.exists() and self.out.exists():
            foreign = [p.name for p in self.out.iterdir() if not (p.name.startswith(".build") or is_leftover(p.name))]
            if foreign:
                raise KnnMoeError(f"{self.out} exists and is not a kNN-MoE build directory; choose an empty or new one")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
        except OSError as e:
            raise KnnMoeError(_write_failure(self.out, e, "could not start the build")) from e
        try:
            self._check_state(state_file)
        except BaseException:
            self.lock.release()
            raise

    def _check_state(self, state_file: Path) -> None:
        self._refuse_complete()  # again, under the lock: a build that finished while we waited for it
        if state_file.exists():
            old = json.loads(state_file.read_text())
            if old["model"] != self.signature:
                raise KnnMoeError(
                    f"{self.out} holds a partial build for another model ({old['model'].get('name_or_path')!r}); "
                    "use another directory or delete it"
                )
            if old["build"] != build_settings(self.options):
                raise KnnMoeError(
                    f"{self.out} holds a partial build with other settings {old['build']}; resume it with those "
                    "settings, or use another directory"
                )
            if self.rank == 0:
                # a killed build's temporary files: ours (`*.tmp<pid>`) and safetensors' (`shards/.tmpXXXXXX`);
                # the shards of other ranks are only swept once they are done (finalize)
                removed = remove_leftovers(self.out)
                if self.world_size == 1:
                    removed += remove_leftovers(self.shard_dir)
                if removed:
                    log.info("resuming build in %s: removed %d temporary files of the interrupted run (%s)",
                             self.out, len(removed), ", ".join(removed[:4]) + (" ..." if len(removed) > 4 else ""))

    def release(self) -> None:
        """Give up the directory (the build is over or abandoned); a later build may take it and resume."""
        self.lock.release()

    def _finished_shards(self) -> list[Path]:
        return sorted(self.shard_dir.glob("shard_*.safetensors")) if self.shard_dir.exists() else []

    @staticmethod
    def _read_meta(path: Path) -> dict:
        """A shard's requests, their loglikelihoods and row counts (its header only: no tensor is read)."""
        with safe_open(str(path), "pt") as f:
            return json.loads(f.metadata()["build"])

    def _flush(self, shard: _Shard, seq_no: int) -> None:
        if not shard.rids:
            return
        tensors = {}
        for layer in shard.keys:
            tensors[f"keys.{layer}"] = torch.cat(shard.keys[layer])
            tensors[f"values.{layer}"] = torch.cat(shard.values[layer])
        meta = {"rids": shard.rids, "loglik": shard.loglik, "counts": shard.counts}
        save_tensors_atomic(self.shard_dir / f"shard_{self.rank:03d}_{seq_no:06d}.safetensors", tensors,
                            metadata={"build": json.dumps(meta)})

    # -- batches ----------------------------------------------------------------------------------------------
    def _batch_step(self, batch: list[RefSequence], shard: _Shard, pad_id: int) -> list[float]:
        """Run the gradient step on one batch, append its entries to `shard`; returns the loss before each step."""
        device = next(self.model.parameters()).device
        width = max(len(s.tokens) for s in batch)
        inputs = torch.full((len(batch), width), pad_id, dtype=torch.long)
        targets = torch.zeros(len(batch), width, dtype=torch.long)
        answer = torch.zeros(len(batch), width, dtype=torch.bool)  # the request's continuation
        kept = torch.zeros(len(batch), width, dtype=torch.bool)  # stored in the memory, and scored by the loss
        for i, s in enumerate(batch):
            n = len(s.tokens)
            inputs[i, :n] = torch.tensor(s.tokens)
            targets[i, :n] = torch.tensor(s.targets)
            answer[i, n - s.n_cont : n] = True
            # position 0 (BOS or the first context token) has the same router input in every sequence
            kept[i, n - s.n_cont if self.options.positions == "answer" else min(1, n - 1) : n] = True
        o = self.options
        result = optimise_logits(self.model, self.sites, inputs.to(device), targets.to(device), kept.to(device),
                                 answer.to(device), eta=o.eta, steps=o.steps, loss=o.loss, grad=o.grad,
                                 optimizer=o.optimizer, free=o.free, keys=o.keys)
        flat_kept = kept.reshape(-1).to(device)
        for site in self.sites:
            # fp16 as stored: half the shard's RAM, and the same numbers (any float -> fp16 rounds once)
            shard.keys.setdefault(site.layer, []).append(result.keys[site.layer][flat_kept].to(torch.float16).cpu())
            shard.values.setdefault(site.layer, []).append(result.values[site.layer][flat_kept].cpu())
        for i, s in enumerate(batch):
            shard.rids.append(s.rid)
            shard.counts.append(int(kept[i].sum()))
            shard.loglik.append((float(result.answer_logprob[i]), bool(result.answer_greedy[i])))
        return result.losses

    def run(self, sequences: list[RefSequence], pad_id: int, batch_size: int) -> dict[RequestId, tuple[float, bool]]:
        """Build (or resume) this rank's shards from `sequences`; returns the stock loglikelihood of each."""
        with self._stopping("the build"):
            return self._run(sequences, pad_id, batch_size)

    @contextmanager
    def _stopping(self, what: str) -> Iterator[None]:
        """A build that stops (Ctrl-C, a full disk, a read-only target, any error) says so and that the same
        command resumes it, and gives up the directory's lock."""
        try:
            yield
        except KeyboardInterrupt:
            self.release()
            log.error("%s into %s was interrupted; the shards written so far are kept: rerun the same command to "
                      "resume it", what, self.out)
            raise
        except (OSError, SafetensorError) as e:
            self.release()
            raise KnnMoeError(_write_failure(self.out, e, f"{what} stopped")) from e
        except BaseException:
            self.release()
            raise

    def _run(self, sequences: list[RefSequence], pad_id: int, batch_size: int) -> dict[RequestId, tuple[float, bool]]:
        if not sequences:
            raise KnnMoeError("the build task produced no requests: its reference split is empty")
        for p in self.model.parameters():
            p.requires_grad_(False)  # only the leaf logits are differentiated
        self.out.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            write_json_atomic(self.out / BUILD_STATE, self._state())
        self.shard_dir.mkdir(exist_ok=True)

        results: dict[RequestId, tuple[float, bool]] = {}
        mine = [p for p in self._finished_shards() if p.name.startswith(f"shard_{self.rank:03d}_")]
        for path in mine:
            meta = self._read_meta(path)
            results.update({tuple(r): tuple(ll) for r, ll in zip(meta["rids"], meta["loglik"])})
        todo = [s for s in sequences if s.rid not in results]
        if results:
            log.info("resuming build in %s: %d of %d requests already done (%d shards), %d to go", self.out,
                     len(results), len(sequences), len(mine), len(todo))
        todo.sort(key=lambda s: -len(s.tokens))  # similar lengths share a batch: less padding
        shard, seq_no, tokens, start = _Shard(), len(mine), 0, time.perf_counter()
        self.loss_curve = [0.0] * self.options.steps  # summed reference NLL before each step, over this run's batches
        bar = tqdm(total=len(todo), desc=f"kNN-MoE build (rank {self.rank})", unit="seq")
        for b in range(0, len(todo), batch_size):
            batch = todo[b : b + batch_size]
            losses = self._batch_step(batch, shard, pad_id)
            self.loss_curve = [a + b for a, b in zip(self.loss_curve, losses)]
            tokens += sum(len(s.tokens) for s in batch)
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):.0f}", nll=f"{losses[0] / len(batch):.3f}")
            if shard.positions >= self.options.shard_tokens:
                self._flush(shard, seq_no)
                results.update(zip(shard.rids, shard.loglik))
                shard, seq_no = _Shard(), seq_no + 1
        bar.close()
        self._flush(shard, seq_no)
        results.update(zip(shard.rids, shard.loglik))
        return results

    def build(self, sequences: list[RefSequence], pad_id: int, batch_size: int,
              barrier: Callable[[], None] | None = None) -> dict[RequestId, tuple[float, bool]]:
        """This rank's part of the build, then (rank 0, once every rank is done) the memory; returns the stock
        loglikelihood of each of this rank's requests. `barrier` waits for every rank (several processes)."""
        start = time.perf_counter()
        results = self.run(sequences, pad_id, batch_size)
        if barrier is not None:
            barrier()
        if self.rank == 0:
            self.finalize()
        if barrier is not None:
            barrier()
        self.lock.release(remove=True)
        self.wall_s = time.perf_counter() - start + self.calibration_s
        log.info("kNN-MoE build: %d sequences in %.1f s", len(sequences), self.wall_s)
        return results

    @torch.no_grad()
    def read_calibration(self, token_lists: Iterable[list[int]], pad_id: int, batch_size: int,
                         cap: int = CALIBRATION_TOKENS) -> None:
        """Router inputs (stock routing) at every position of the not-this-domain calibration text, up to `cap`
        tokens per layer: what each layer's radius must stay clear of (`sigma.RadiusSpec`)."""
        start = time.perf_counter()
        device = next(self.model.parameters()).device
        kept: dict[int, list[torch.Tensor]] = {s.layer: [] for s in self.sites}
        held = 0
        texts = iter(token_lists)  # consumed lazily: a large file is read only as far as the cap
        bar = tqdm(total=cap, desc="kNN-MoE calibration text", unit="tok")
        while held < cap:
            batch = list(itertools.islice(texts, batch_size))
            if not batch:
                break
            width = max(len(t) for t in batch)
            inputs = torch.full((len(batch), width), pad_id, dtype=torch.long)
            real = torch.zeros(len(batch), width, dtype=torch.bool)
            for i, t in enumerate(batch):
                inputs[i, : len(t)], real[i, : len(t)] = torch.tensor(t), True
            recorder = Recorder()
            with hooked_routers(self.sites, recorder):
                self.model(inputs.to(device))
            rows = real.reshape(-1).to(device)
            for layer, h in recorder.inputs.items():
                kept[layer].append(h[rows].to("cpu", torch.float16))
            held += int(real.sum())
            bar.update(int(real.sum()))
        bar.close()
        self.calibration = {layer: torch.cat(hs)[:cap] for layer, hs in kept.items()}
        self.calibration_s = time.perf_counter() - start

    @torch.no_grad()
    def read_probe(self, n_tokens: int) -> None:
        """Router inputs (stock routing) of `n_tokens` the stock model samples from its BOS token (seed
        PROBE_SEED): the model's own distribution, which without calibration text stands in for what the radius
        must not admit (`probe_tokens`; the check is `memory.write_memory_streamed`'s). The BOS itself is left out:
        its router input is the same in every row. Rows go PROBE_BATCH at a time whatever the build's batch size, so
        that a merge resumed on its own reads the text the uninterrupted build read."""
        start = time.perf_counter()
        config = self.model.config
        named = [getattr(config, "bos_token_id", None), getattr(config, "eos_token_id", None)]
        named = [t[0] if isinstance(t, (list, tuple)) and t else t for t in named]  # several EOS ids: the first
        bos = next((t for t in named if isinstance(t, int) and not isinstance(t, bool)), None)
        if bos is None:
            raise KnnMoeError("probe_tokens samples the model's own text from its BOS (or EOS) token, and this model's "
                              "config names neither: pass calibration=FILE (text that is not this domain), or "
                              "probe_tokens=0")
        device = next(self.model.parameters()).device
        gen = torch.Generator().manual_seed(PROBE_SEED)
        rows = -(-n_tokens // PROBE_LENGTH)
        kept: dict[int, list[torch.Tensor]] = {s.layer: [] for s in self.sites}
        for first in range(0, rows, PROBE_BATCH):
            ids = torch.full((min(PROBE_BATCH, rows - first), 1), bos, dtype=torch.long, device=device)
            past, step = None, ids
            for _ in range(PROBE_LENGTH):  # sampled on the CPU from one generator: the same text on any device
                out = self.model(step, use_cache=True, **({} if past is None else {_cache_arg(self.model): past}))
                past = getattr(out, _cache_arg(self.model))
                probs = out.logits[:, -1].float().softmax(-1).cpu()
                step = torch.multinomial(probs, 1, generator=gen).to(device)
                ids = torch.cat([ids, step], 1)
            recorder = Recorder()
            with hooked_routers(self.sites, recorder):
                self.model(ids)
            for layer, h in recorder.inputs.items():
                kept[layer].append(h.view(ids.shape[0], ids.shape[1], -1)[:, 1:].reshape(-1, h.shape[-1])
                                   .to("cpu", torch.float16))
        self.probe = {layer: torch.cat(hs)[:n_tokens] for layer, hs in kept.items()}
        self.probe_s = time.perf_counter() - start

    def finalize(self) -> Path:
        """Merge every rank's shards in request order (dropping lm-eval's padding duplicates) into the memory."""
        if self.lock.fd is None:  # the build gave up its directory (it stopped); merging needs it again
            self._check_out_dir()
        with self._stopping("the merge of the build's shards"):
            return self._finalize()

    def _finalize(self) -> Path:
        removed = remove_leftovers(self.shard_dir) + remove_leftovers(self.out)  # every rank is done writing
        if removed:
            log.info("removed %d temporary files of an interrupted run from %s", len(removed), self.out)
        if any(self.out.glob("layer_*.safetensors")):
            log.info("resuming the merge in %s: every request is in the shards, the memory's files are rewritten",
                     self.out)
        where: dict[RequestId, tuple[Path, int, int]] = {}  # request -> (shard, first row, rows)
        for path in self._finished_shards():
            meta = self._read_meta(path)
            offset = 0
            for rid, count in zip(meta["rids"], meta["counts"]):
                where.setdefault(tuple(rid), (path, offset, count))  # the first copy wins, as shards are named
                offset += count
        order = sorted(where)
        n = sum(where[r][2] for r in order)
        settings = {**build_settings(self.options), "requests": len(order), "tasks": sorted({r[0] for r in order})}
        with ExitStack() as stack:
            shards: dict[Path, object] = {}

            def rows(layer: int):
                """The layer's rows in request order, read from the mapped shards and handed on in ~ROWS chunks."""
                keys, values, held = [], [], 0
                for rid in order:
                    path, start, count = where[rid]
                    if path not in shards:
                        shards[path] = stack.enter_context(safe_open(str(path), "pt"))
                    f = shards[path]
                    keys.append(f.get_slice(f"keys.{layer}")[start : start + count])
                    values.append(f.get_slice(f"values.{layer}")[start : start + count])
                    held += count
                    if held >= ROWS:
                        yield torch.cat(keys), torch.cat(values)
                        keys, values, held = [], [], 0
                if keys:
                    yield torch.cat(keys), torch.cat(values)

            o = self.options
            if probes(o) and self.probe is None:  # read once, here: for a build and for a merge resumed on its own
                self.read_probe(o.probe_tokens)
            radius = None if o.radius_quantile is None else RadiusSpec(
                o.radius_quantile, o.radius_scale, self.calibration, o.calibration_quantile,
                self.probe if probes(o) else None, o.probe_bound)
            write_memory_streamed(self.out, {s.layer: (n, rows(s.layer)) for s in self.sites}, self.signature,
                                  build=settings, radius=radius)
        for path in self._finished_shards():
            path.unlink()
        remove_leftovers(self.shard_dir)
        self.shard_dir.rmdir()
        (self.out / BUILD_STATE).unlink()
        remove_leftovers(self.out)
        self.lock.release(remove=True)  # other ranks remove their own (build)
        log.info("kNN-MoE memory written to %s: %d requests, %d keys per layer", self.out, len(order), n)
        return self.out


def _write_failure(out: Path, e: BaseException, what: str) -> str:
    """What stopped a build's write, in words, and that the same command resumes it."""
    code = getattr(e, "errno", None)
    if code is None:  # safetensors' SafetensorError carries the OS error only in its text: "(os error 28)"
        found = re.search(r"os error (\d+)", str(e))
        code = int(found.group(1)) if found else None
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        why = "the disk is full (or a quota or file-size limit was reached)"
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        why = "the directory is not writable (read-only file system or permissions)"
    else:
        why = "a file could not be written"
    return (f"{what} in {out}: {why} ({e}). Nothing written so far is lost or half-kept: free space or fix the "
            "directory, then rerun the same command to resume the build.")


def pad_batch(seqs: list[RefSequence], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Right-padded (b, T) inputs, attention mask, targets and the answer positions of reference sequences."""
    width = max(len(s.tokens) for s in seqs)
    inputs = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    targets = torch.zeros(len(seqs), width, dtype=torch.long)
    scored = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        n = len(s.tokens)
        inputs[i, :n], targets[i, :n], mask[i, :n] = torch.tensor(s.tokens), torch.tensor(s.targets), 1
        scored[i, n - s.n_cont : n] = True
    return inputs.to(device), mask.to(device), targets.to(device), scored.to(device)


def tokenize_request(rid: RequestId, context_enc: list[int], continuation_enc: list[int], max_length: int) -> RefSequence:
    """The same truncation as lm-eval's `hf` loglikelihood: keep the last max_length + 1 tokens."""
    if not continuation_enc:
        raise KnnMoeError(f"request {rid} has an empty continuation: a build task's target must be the gold answer")
    whole = (context_enc + continuation_enc)[-(max_length + 1):]
    return RefSequence(rid, whole[:-1], whole[1:], min(len(continuation_enc), len(whole) - 1))


def build_settings(opts: KnnMoeOptions) -> dict:
    """What a built memory records about how it was built (labels: null = gold answers)."""
    settings = {n: getattr(opts, n) for n in BUILD_FIELDS}
    if opts.radius_quantile is not None:  # how confidence=radius reads the radii: every earlier layer must agree
        settings["radius_rule"] = RADIUS_RULE
    if probes(opts):
        settings["probe"] = {"tokens": opts.probe_tokens, "bound": opts.probe_bound, "length": PROBE_LENGTH,
                             "batch": PROBE_BATCH, "seed": PROBE_SEED, "text": "the stock model's samples from its BOS token"}
    return {**settings, "labels": None if opts.labels is None else describe(opts.labels),
            "calibration": None if opts.calibration is None else {
                "sha256": sha256_file(Path(opts.calibration)), "quantile": opts.calibration_quantile}}


def probes(opts: KnnMoeOptions) -> bool:
    """Whether the build checks its radii on the model's own samples: a radius and no calibration text."""
    return bool(opts.probe_tokens) and opts.radius_quantile is not None and opts.calibration is None


def describe(labels_path: str | Path) -> dict:
    """What a memory built from a labels file (pseudo-labels, `harness/labels.py`) records about it."""
    labellers = set()
    with open(labels_path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                labellers.add(json.loads(line).get("labeller", "?"))
    return {"sha256": sha256_file(Path(labels_path)), "labellers": sorted(labellers)}


def read_texts(path: str) -> Iterator[str]:
    """The calibration texts, read lazily: one per line, or JSONL records with a "text" field (e.g. a toy's train
    split)."""
    found = False
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                record = json.loads(line)
                if "text" not in record:
                    raise KnnMoeError(f"{path}:{n}: a JSONL calibration record needs a 'text' field")
                line = record["text"]
            found = True
            yield line.rstrip("\n")
    if not found:
        raise KnnMoeError(f"calibration file {path} holds no text")
