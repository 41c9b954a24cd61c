"""The paper's SFT baselines: LoRA SFT and router-only SFT on the same reference set a kNN-MoE memory is built from.

Data. The sequences are exactly those of a memory build: the loglikelihood requests of lm-eval `_ref` tasks
(context + gold answer), tokenized by lm-eval's `hf` model (`build.encode_request`).
The loss is the cross-entropy of the answer tokens only, averaged over answer tokens. Documents are split
85/15 into train and validation by a seeded shuffle; validation runs after every epoch and the adapter kept is
the epoch with the lowest validation loss (trained epochs only; the stock model's loss is recorded beside it).

What is trained.
- `lora`: LoRA (peft) on every linear map of the model. The paper's models were tuned when transformers kept
  each expert's projections and the router as `nn.Linear`, where peft's `all-linear` covered attention, router,
  every expert and shared experts (never `lm_head`). transformers 5 fuses experts into 3-d parameters and makes
  routers `*TopKRouter` modules, which `all-linear` does not see as linear; peft 0.21 maps `all-linear` back onto
  the fused weights for OLMoE, Qwen3-MoE and Mixtral only. We name them for every family: `all-linear` plus
  `target_parameters` on the fused expert weights (one LoRA per expert, gate_up at rank 2r as peft's mapping
  does) and on the router weight. Biases and norms stay frozen.
- `router`: the routers' weights and biases (`routers.find_routers`) trained in full, nothing else. peft's
  `modules_to_save` holds a trainable copy of each router and saves it into the adapter; peft requires some
  adapter target, so the config names peft's own "dummy-target-modules" (the no-op target X-LoRA uses). Every
  other weight stays bit-identical.
Both save `adapter_config.json` + `adapter_model.safetensors`, which lm-eval's `hf` model loads with `peft=OUT`.

Training follows the paper's Table 15 where it is legible (AdamW, weight decay 0.01, learning rate decaying
linearly to 0, LoRA alpha = r, no dropout, no bias; it trains with TRL, where the model's load-balancing loss
is part of the objective, so we add `router_aux_loss_coef` x the model's own aux loss too). Also: gradient
clipping at 1, model in eval mode (no dropout or router jitter, so the function trained is the one evaluated),
data order a pure function of (seed, epoch), rank 32 and batch 16 by default as the paper's; its learning rate
and epoch count did not survive the text export.
Checkpoints after each epoch under OUT/checkpoints (trainable tensors as safetensors, optimizer and RNG state
loadable with weights_only=True, counters and history in state.json written last): a rerun resumes from the
last one and ends with the same adapter, bit for bit, as an uninterrupted run. OUT/train.json, written last,
marks a finished run; a rerun with the same settings returns it, with other settings it is refused.

    python -m knnmoe_eval.experiments.sft --pretrained P --tasks knnmoe_medmcqa_ref --method lora --out sft/lora \
        --include_path tasks --metadata '{"data_dir": "data"}'
    lm_eval --model hf --model_args pretrained=P,peft=sft/lora --tasks knnmoe_medmcqa --include_path tasks
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
import warnings
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

from ..core.build import RefSequence, pad_batch
from ..core.files import atomic_path, save_tensors_atomic, write_json_atomic
from ..core.options import option
from ..core.routers import find_routers
from ..errors import KnnMoeError
from ..harness.requests import encode_request, refuse_several_answers

METHODS = ("lora", "router")
DEFAULT_LR = {"lora": 1e-3, "router": 1e-3}
WEIGHT_DECAY = 0.01  # the paper's Table 15, like alpha = r and the linear decay
TRAIN_JSON = "train.json"
CKPT_DIR = "checkpoints"
STATE_JSON = "state.json"


def _tasks(value: str) -> tuple[str, ...]:
    return tuple(value.split(","))


@dataclass(frozen=True)
class SftSettings:
    """One SFT baseline: which model trains how on which reference tasks (the paper's Table 15 where legible).
    `python -m knnmoe_eval.experiments.sft` has one flag per field: its help, and how argparse reads it, are the
    field's metadata."""

    pretrained: str = option("model path or hub id")
    tasks: tuple[str, ...] = option("build tasks, comma-separated, e.g. knnmoe_medmcqa_ref", type=_tasks)
    method: str = option("lora: LoRA on every linear map; router: the routers' weights alone", choices=METHODS)
    include_path: str | None = option("lm-eval --include_path of the tasks (default: lm-eval's own tasks only)", None)
    metadata: dict | None = option('JSON passed to the tasks, e.g. \'{"data_dir": "data"}\' (default: none)', None,
                                   type=json.loads)
    limit: int | None = option("reference documents used (default: all)", None, type=int)
    seed: int = option("seeds the train/validation split, the data order and LoRA's initialisation", 0, type=int)
    epochs: int = option("training epochs (the paper's count did not survive)", 3, type=int)
    lr: float | None = option(f"peak learning rate, decaying linearly to 0 (default per method: {DEFAULT_LR})", None,
                              type=float)
    batch_size: int = option("documents per step (the paper's Table 15)", 16, type=int)
    val_frac: float = option("share of the documents held out; the epoch of lowest validation loss is kept", 0.15,
                             type=float)
    lora_r: int = option("LoRA rank, alpha = r (the paper's Table 15)", 32, type=int)
    device: str = option("torch device", "cpu")
    dtype: str = option("model dtype", "float32")
    prompt: dict | None = option("lm-eval's prompt formatting (apply_chat_template, system_instruction, "
                                 "fewshot_as_multiturn) as JSON, so that SFT trains on the prompts it is tested on "
                                 "(default: lm-eval's plain prompts)", None, type=json.loads)

    def __post_init__(self):
        object.__setattr__(self, "tasks", tuple(self.tasks))  # a list is fine from Python
        if self.method not in METHODS:
            raise KnnMoeError(f"unknown SFT method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.epochs < 1 or self.batch_size < 1 or self.lora_r < 1:
            raise KnnMoeError(f"epochs, batch_size and lora_r must be >= 1 (got {self.epochs}, {self.batch_size}, "
                              f"{self.lora_r})")

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    def record(self) -> dict:
        """What an output directory records of its run, and what a rerun must match to reuse or resume it (the
        device is left out: the same run may go on elsewhere)."""
        return json.loads(json.dumps(dict(
            pretrained=str(self.pretrained), tasks=list(self.tasks), method=self.method,
            include_path=self.include_path, metadata=self.metadata, limit=self.limit, seed=self.seed,
            epochs=self.epochs, lr=self.peak_lr, batch_size=self.batch_size, val_frac=self.val_frac,
            lora_r=self.lora_r if self.method == "lora" else None, dtype=self.dtype, prompt=self.prompt or {},
        )))


# -- data ------------------------------------------------------------------------------------------------------
def _task_manager(tasks: list[str], include_path: str | None, metadata: dict | None):
    from lm_eval.tasks import TaskManager

    if include_path:  # indexing lm-eval's built-in tasks takes ~10 s: skip it when include_path has them all
        tm = TaskManager(include_path=include_path, include_defaults=False, metadata=metadata)
        if all(t in tm.all_tasks for t in tasks):
            return tm
    return TaskManager(include_path=include_path, metadata=metadata)


def reference_requests(tasks: list[str], include_path: str | None = None, metadata: dict | None = None,
                       limit: int | None = None, lm=None, prompt: dict | None = None) -> list:
    """The lm-eval loglikelihood Instances of build tasks, one gold answer per document (else refused).

    `prompt` holds lm-eval's prompt formatting (apply_chat_template, system_instruction, fewshot_as_multiturn),
    applied with `lm`'s chat template as `simple_evaluate` would, so SFT trains on the prompts it is tested on."""
    loaded = _task_manager(list(tasks), include_path, metadata).load(list(tasks))["tasks"]  # groups flattened
    prompt = dict(prompt or {})
    chat = prompt.get("apply_chat_template")
    if chat and lm is not None:
        prompt.update(chat_template=lm.apply_chat_template, tokenizer_name=lm.tokenizer_name)
    requests = []
    for task in loaded.values():
        task.build_all_requests(limit=limit, rank=0, world_size=1, **prompt)
        for inst in task.instances:
            if inst.request_type != "loglikelihood":
                raise KnnMoeError(
                    f"task {inst.task_name!r} emits {inst.request_type} requests; SFT trains on loglikelihood build "
                    "tasks whose target is the gold answer (the knnmoe_*_ref tasks)"
                )
            requests.append(inst)
    refuse_several_answers([(r.task_name, r.doc_id, r.idx) for r in requests], "SFT")
    return requests


def tokenize(lm, requests) -> list[RefSequence]:
    """Token ids of each request exactly as `hf-knnmoe`'s build (and `hf`'s loglikelihood) tokenizes them."""
    return [encode_request(lm, (req.task_name, req.doc_id, req.idx), *req.args) for req in requests]


def split(sequences: list[RefSequence], val_frac: float, seed: int) -> tuple[list[RefSequence], list[RefSequence]]:
    """Seeded train/validation split of the documents; refuses an empty side."""
    if not sequences:
        raise KnnMoeError("the reference tasks produced no requests: their reference split is empty")
    if not 0 < val_frac < 1:
        raise KnnMoeError(f"val_frac must lie strictly between 0 and 1 (got {val_frac}); the paper uses 0.15")
    sequences = sorted(sequences, key=lambda s: s.rid)  # the split depends on the documents, not request order
    order = list(range(len(sequences)))
    random.Random(seed).shuffle(order)
    n_val = round(len(sequences) * val_frac)
    if n_val == 0 or n_val == len(sequences):
        raise KnnMoeError(
            f"{len(sequences)} reference documents with val_frac={val_frac} leave "
            f"{'no validation' if n_val == 0 else 'no training'} documents; use more documents (limit) or "
            "another val_frac"
        )
    return [sequences[i] for i in sorted(order[n_val:])], [sequences[i] for i in sorted(order[:n_val])]


# -- the model ---------------------------------------------------------------------------------------------------
def _expert_and_router_params(model) -> tuple[list[str], list[str]]:
    """(fused 3-d expert weights, router weights) as layer-relative parameter names, e.g. 'mlp.experts.down_proj'."""
    experts, routers = set(), set()
    for site in find_routers(model):
        layer = site.decoder_layer_name + "."
        routers.add(site.weight_name.removeprefix(layer))
        for name, p in site.experts.named_parameters(recurse=False):
            if p.ndim == 3:  # (E, in, out) weights; 2-d expert biases are left frozen, like every bias
                experts.add(f"{site.experts_name.removeprefix(layer)}.{name}")
    return sorted(experts), sorted(routers)


def peft_config(model, method: str, lora_r: int):
    from peft import LoraConfig
    from peft.utils.constants import DUMMY_TARGET_MODULES

    if method == "lora":
        experts, routers = _expert_and_router_params(model)
        # gate_up_proj fuses two transformers-4 linears (gate, up), each with its own rank-r LoRA: rank 2r, as
        # peft's own transformers-5 conversion does. lora_dropout stays 0: peft cannot apply dropout to
        # parameter-targeted LoRA.
        fused = {rf".*\.{name.rsplit('.', 1)[1]}": 2 * lora_r for name in experts if name.endswith("gate_up_proj")}
        return LoraConfig(r=lora_r, lora_alpha=lora_r, lora_dropout=0.0, target_modules="all-linear",
                          target_parameters=experts + routers, rank_pattern=fused, alpha_pattern=dict(fused))
    return LoraConfig(target_modules=DUMMY_TARGET_MODULES, modules_to_save=[s.name for s in find_routers(model)])


def answer_nll(model, seqs: list[RefSequence], pad_id: int, aux: bool = False):
    """Summed NLL of the answer tokens of `seqs` (one batch), their number, and the load-balancing loss if `aux`."""
    inputs, mask, targets, scored = pad_batch(seqs, pad_id, next(model.parameters()).device)
    out = model(input_ids=inputs, attention_mask=mask, output_router_logits=aux)
    nll = F.cross_entropy(out.logits[scored].float(), targets[scored], reduction="sum")  # logits (b, T, V)
    return nll, int(scored.sum()), out.aux_loss if aux else None


@torch.no_grad()
def mean_answer_nll(model, seqs: list[RefSequence], pad_id: int, batch_size: int) -> float:
    """Validation loss: NLL per answer token over `seqs`."""
    ordered = sorted(seqs, key=lambda s: -len(s.tokens))
    total, count = 0.0, 0
    for b in range(0, len(ordered), batch_size):
        nll, n, _ = answer_nll(model, ordered[b : b + batch_size], pad_id)
        total, count = total + float(nll), count + n
    return total / count


# -- checkpoints -----------------------------------------------------------------------------------------------
def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(ckpt: Path, epoch: int, model, optimizer, state: dict) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic(ckpt / f"epoch_{epoch:04d}.safetensors",
                        {n: p.detach().cpu() for n, p in _trainable(model).items()})
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    with atomic_path(ckpt / f"epoch_{epoch:04d}.optim.pt") as tmp:
        torch.save({"optimizer": optimizer.state_dict(), "rng": rng}, tmp)
    write_json_atomic(ckpt / STATE_JSON, state)  # last: names the epoch the files above belong to
    keep = {f"epoch_{e:04d}{x}" for e in (epoch, state["best_epoch"]) for x in (".safetensors", ".optim.pt")}
    for path in ckpt.glob("epoch_*"):
        if path.name not in keep:
            path.unlink()


def _load_weights(model, path: Path) -> None:
    tensors, params = load_file(str(path)), _trainable(model)
    if set(tensors) != set(params):
        raise KnnMoeError(f"checkpoint {path} does not hold this adapter's weights; delete {path.parent} to restart")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])


def _resume(ckpt: Path, model, optimizer) -> None:
    epoch = json.loads((ckpt / STATE_JSON).read_text())["epoch"]
    _load_weights(model, ckpt / f"epoch_{epoch:04d}.safetensors")
    saved = torch.load(ckpt / f"epoch_{epoch:04d}.optim.pt", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"]["torch"])
    random.setstate(_as_tuple(saved["rng"]["python"]))
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _check_out(out: Path, settings: dict) -> dict | None:
    """The finished summary to reuse, None to train or resume; refuses another run's directory."""
    for marker in (out / TRAIN_JSON, out / CKPT_DIR / STATE_JSON):
        if marker.exists():
            old = json.loads(marker.read_text())["settings"]
            if old != settings:
                keys = sorted(set(old) | set(settings))
                diff = {k: (old.get(k), settings.get(k)) for k in keys if old.get(k) != settings.get(k)}
                raise KnnMoeError(
                    f"{out} holds an SFT run with other settings (setting: (there, requested)) {diff}; rerun with "
                    "those settings to reuse or resume it, or choose another output directory"
                )
            return json.loads(marker.read_text()) if marker.name == TRAIN_JSON else None
    if out.exists() and any(out.iterdir()):
        raise KnnMoeError(f"{out} exists and is not an SFT output directory; choose an empty or new one")
    return None


# -- training --------------------------------------------------------------------------------------------------
def trainable_model(model, s: SftSettings):
    """`model` under peft with `s.method`'s adapter (seeded from `s.seed`), its AdamW, and the coefficient of the
    model's load-balancing loss in the objective."""
    from peft import get_peft_model

    random.seed(s.seed)
    torch.manual_seed(s.seed)  # LoRA's A matrices are initialised from it: a resumed run rebuilds the same model
    with warnings.catch_warnings():
        # peft 0.21 checks rank/alpha patterns against module names only and calls our gate_up_proj pattern
        # unmatched, although the parameter-targeted LoRA does get rank 2r (tests/test_sft.py sees its effect)
        warnings.filterwarnings("ignore", message=r"The following (rank|alpha)_pattern keys did not match")
        model = get_peft_model(model, peft_config(model, s.method, s.lora_r)).eval()
    optimizer = torch.optim.AdamW(list(_trainable(model).values()), lr=s.peak_lr, weight_decay=WEIGHT_DECAY)
    aux_coef = float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0)
    return model, optimizer, aux_coef


def train_epoch(model, optimizer, aux_coef: float, train: list[RefSequence], val: list[RefSequence], pad_id: int,
                s: SftSettings, epoch: int, bar: tqdm | None = None) -> tuple[float, float]:
    """One training epoch (1-based `epoch` of `s.epochs`) over `train`, then the validation pass: what an SFT
    run's `wall_time_s` counts. Returns (mean train NLL per answer token, validation loss).

    The data order is a pure function of (seed, epoch) and the learning rate of the global step, so that a resumed
    run trains exactly as an uninterrupted one."""
    steps = math.ceil(len(train) / s.batch_size)
    total_steps = s.epochs * steps
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(s.seed * 1_000_003 + epoch))
    total, count = 0.0, 0
    for step, b in enumerate(range(0, len(train), s.batch_size), start=(epoch - 1) * steps):
        for group in optimizer.param_groups:  # linear decay to 0, a pure function of the step: resumes exactly
            group["lr"] = s.peak_lr * (1 - step / total_steps)
        batch = [train[i] for i in order[b : b + s.batch_size].tolist()]
        nll, n, aux = answer_nll(model, batch, pad_id, aux=aux_coef > 0)
        optimizer.zero_grad(set_to_none=True)
        (nll / n + aux_coef * aux if aux_coef > 0 else nll / n).backward()
        torch.nn.utils.clip_grad_norm_(list(_trainable(model).values()), 1.0)
        optimizer.step()
        total, count = total + float(nll.detach()), count + n
        if bar is not None:
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{total / count:.4f}")
    return total / count, mean_answer_nll(model, val, pad_id, s.batch_size)


def train_sft(settings: SftSettings, out: str | Path, *, progress: bool = True,
              stop_after_epochs: int | None = None) -> dict:
    """Train (or resume, or reuse) the SFT baseline `settings` into `out`; returns the summary written to
    out/train.json.

    `stop_after_epochs` stops after that many epochs as an interruption would, leaving only the checkpoint
    (for resume tests and time-boxed runs); a rerun without it finishes the same run.

    On the CPU the run uses one thread whatever OMP_NUM_THREADS says: sums split over more threads round
    differently and training turns that into another adapter, so a baseline's figures (the toy's Table 1) would
    depend on the machine's thread count. On a GPU the CPU threads do not touch the numbers and stay as they are.
    """
    threads = torch.get_num_threads()
    if torch.device(settings.device).type == "cpu":
        torch.set_num_threads(1)
    try:
        return _train_sft(settings, Path(out), progress, stop_after_epochs)
    finally:
        torch.set_num_threads(threads)


def _train_sft(s: SftSettings, out: Path, progress: bool, stop_after_epochs: int | None) -> dict:
    recorded = s.record()
    if (done := _check_out(out, recorded)) is not None:
        return done

    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=s.pretrained, device=s.device, dtype=s.dtype, batch_size=s.batch_size)
    requests = reference_requests(s.tasks, s.include_path, s.metadata, s.limit, lm, s.prompt)
    train, val = split(tokenize(lm, requests), s.val_frac, s.seed)
    pad_id = lm.tokenizer.pad_token_id or 0
    model, optimizer, aux_coef = trainable_model(lm.model, s)

    ckpt = out / CKPT_DIR
    if (ckpt / STATE_JSON).exists():
        state = json.loads((ckpt / STATE_JSON).read_text())
        _resume(ckpt, model, optimizer)
    else:
        stock = mean_answer_nll(model, val, pad_id, s.batch_size)
        state = dict(settings=recorded, epoch=0, stock_val_loss=stock, train_loss=[], val_loss=[], best_epoch=None,
                     best_val_loss=None, wall_time_s=0.0, n_train=len(train), n_val=len(val),
                     aux_loss_coef=aux_coef, val_docs=[list(s.rid[:2]) for s in val])
    steps = math.ceil(len(train) / s.batch_size)
    bar = tqdm(total=(s.epochs - state["epoch"]) * steps, desc=f"SFT ({s.method})", unit="step", disable=not progress)
    last = s.epochs if stop_after_epochs is None else min(s.epochs, stop_after_epochs)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for epoch in range(state["epoch"] + 1, last + 1):
        start = time.perf_counter()
        train_loss, val_loss = train_epoch(model, optimizer, aux_coef, train, val, pad_id, s, epoch, bar)
        state["train_loss"].append(train_loss)
        state["val_loss"].append(val_loss)
        if state["best_val_loss"] is None or val_loss < state["best_val_loss"]:
            state["best_epoch"], state["best_val_loss"] = epoch, val_loss
        state["epoch"] = epoch
        state["wall_time_s"] += time.perf_counter() - start
        _save_checkpoint(ckpt, epoch, model, optimizer, state)
    bar.close()
    if state["epoch"] < s.epochs:
        return {**state, "stopped_after_epoch": state["epoch"]}

    _load_weights(model, ckpt / f"epoch_{state['best_epoch']:04d}.safetensors")
    model.save_pretrained(out)
    summary = {k: v for k, v in state.items() if k != "epoch"}
    summary["trainable_params"] = sum(p.numel() for p in _trainable(model).values())
    if torch.cuda.is_available() and str(s.device).startswith("cuda"):
        summary["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    write_json_atomic(out / TRAIN_JSON, summary)  # last: its presence means a finished run
    shutil.rmtree(ckpt)
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m knnmoe_eval.experiments.sft",
                                description="LoRA / router-only SFT baselines on kNN-MoE reference tasks")
    p.add_argument("--out", required=True, help="the adapter, its checkpoints while it trains, and train.json")
    for f in fields(SftSettings):
        cli = {"help": f.metadata["help"], **f.metadata["argparse"]}
        if f.default is MISSING:
            cli["required"] = True
        elif f.default is not None:  # a None default says in its help what it means
            cli.update(default=f.default, help=f"{cli['help']} (default: {f.default})")
        p.add_argument(f"--{f.name}", **cli)
    args = vars(p.parse_args(argv))
    out = args.pop("out")
    summary = train_sft(SftSettings(**args), out)
    print(json.dumps({k: v for k, v in summary.items() if k != "val_docs"}, indent=2))


if __name__ == "__main__":
    main()
