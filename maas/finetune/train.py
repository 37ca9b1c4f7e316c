"""Run one fine-tuning job: the program a worker starts in a child process.

    python -m maas.finetune.train --base DIR --data FILE.jsonl --out DIR
        [--method lora|full] [--epochs N] [--lr X] [--lora-rank R] [--lora-alpha A]
        [--batch-size B] [--checkpoint-every STEPS] [--seed S] [--max-steps N]
        [--max-length TOKENS] [--log-every STEPS] [--base-ref NAME@VERSION] [--devices N]
        [--parent-pid PID]

`--data` holds one {"prompt": str, "completion": str} object a line. The job is handed
pairs already rendered (`maas.finetune.datasets.training_examples` turns chat and
prompt/completion files into them with the serving engine's chat template), so this
program reads only that simple form. Each pair is tokenised as the engine tokenises a
prompt (with the tokenizer's special tokens), followed by the completion and the EOS
token; only the completion and EOS count in the loss.

`--method lora` (the default) trains a peft LoRA adapter on every linear projection of
the attention and MLP blocks and saves it with `save_pretrained` in OUT/adapter, which the
worker's engine loads with `PeftModel.from_pretrained`. `--method full` trains every
weight and saves model and tokenizer in OUT/model. AdamW, constant learning rate after a
short warm-up, deterministic for a given seed on a given machine; CUDA if there is one.

`--devices N` (N > 1) trains on N devices of this machine: the program runs itself again
under torchrun (`python -m torch.distributed.run --standalone --nproc-per-node N`, which
takes this process's place), one process a device (NCCL on CUDA, each on the GPU of its
local rank; gloo on the CPU), the model sharded by FSDP (`fully_shard` on each transformer
block and on the whole). Every global batch of `--batch-size` examples is split between the
ranks, each a disjoint part, and the loss is the mean over the whole batch's completion
tokens, so a step does what it does on one device. Rank 0 alone writes the JSON lines,
checkpoints and the result; they have the format of a one-device job's, so a job resumes
on any number of devices. The ranks agree at every step whether to stop.

Output: one JSON object a line on stdout (nothing else is written there; logs go to
stderr):

    {"event": "start", "step": 0, "total_steps": 40, "examples": 16, ...}
    {"event": "progress", "step": 1, "total_steps": 40, "epoch": 0.25, "loss": 5.1,
     "tokens_per_s": 2100.0, "eta_s": 12.3}
    {"event": "checkpoint", "step": 20, "path": "OUT/checkpoints/step-000020"}
    {"event": "done", "steps": 40, "loss_first": 5.1, "loss_last": 0.4,
     "train_seconds": 9.8, "tokens_per_s": 2100.0, "adapter_dir": "OUT/adapter"}
    {"event": "stopped", "step": 12, "path": "OUT/checkpoints/step-000012"}
    {"event": "error", "message": "..."}

Checkpoints (every `--checkpoint-every` steps, and when stopped) are directories
OUT/checkpoints/step-NNNNNN holding the trainable weights (`weights.pt`: the adapter's,
or the whole model's), the optimizer state (`optimizer.pt`), the RNG state (`rng.pt`)
and `state.json` (step, epoch, losses, the job's fingerprint). Each is written in a
temporary directory beside them and renamed into place, so a killed job never leaves a
half-written one; the last two are kept. Started again with the same OUT, a job resumes
from its latest checkpoint: the step count goes on and the data order is the one an
uninterrupted run would have seen. Checkpoints of a different job (other data, base,
method or hyperparameters) are refused rather than mixed in. Once the result is saved,
OUT/result.json marks the job finished (starting it again only repeats its "done" line)
and the checkpoints are removed.

SIGTERM (or SIGINT) stops the job at the next step boundary: it checkpoints, prints
"stopped" and exits with 75 (EX_TEMPFAIL: try again later), which is how a job yields
its device to serving. Exit codes: 0 done, 1 training failed, 2 bad arguments or
input (the error line names the problem; no traceback), 75 stopped. Under torchrun
(`--devices N`) the ranks exit with these codes and torchrun with its own (1 when a rank
did not exit 0), so the last JSON line ("done", "stopped" or "error") is what tells.
torchrun passes SIGTERM on to the ranks and waits SHUTDOWN_TIMEOUT seconds for them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_STOPPED",
    "EXIT_USAGE",
    "JobConfig",
    "JobError",
    "main",
    "read_pairs",
    "run_job",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on request, resumable from its checkpoint

DEFAULT_LR = {"lora": 1e-3, "full": 1e-4}
WARMUP_STEPS = 5
KEEP_CHECKPOINTS = 2
SHUTDOWN_TIMEOUT = 50  # seconds torchrun gives its ranks to checkpoint after SIGTERM (a worker waits 60)
CHECKPOINTS = "checkpoints"
RESULT = "result.json"
MAX_DATA_ERRORS = 5
_CHECKPOINT_NAME = re.compile(r"^step-(\d{6,})$")

Method = Literal["lora", "full"]
Emit = Callable[..., None]


class JobError(Exception):
    """Bad arguments or input: reported as an error line without a traceback."""


@dataclass(frozen=True)
class JobConfig:
    """One fine-tuning job, validated at construction."""

    base: Path
    """Base model directory (`from_pretrained`), with its tokenizer."""
    data: Path
    """JSONL of {"prompt", "completion"} pairs."""
    out: Path
    """Job directory: checkpoints, then the adapter (or model) and result.json."""
    method: Method = "lora"
    """"lora" (a peft adapter) or "full" (every weight; for small models)."""
    epochs: int = 3
    """Passes over the data."""
    lr: float | None = None
    """AdamW learning rate; None: 1e-3 for LoRA, 1e-4 for full fine-tuning."""
    lora_rank: int = 16
    """LoRA rank r."""
    lora_alpha: int | None = None
    """LoRA scaling numerator; None: twice the rank."""
    batch_size: int = 8
    """Examples a step."""
    checkpoint_every: int = 50
    """Steps between checkpoints; 0: only when stopped."""
    seed: int = 0
    """Seeds the adapter's initialisation, the data order and dropout."""
    max_steps: int | None = None
    """Stop after this many steps in all, even before `epochs` passes."""
    max_length: int | None = None
    """Tokens an example keeps (longer ones lose their end); None: the model's context."""
    log_every: int = 1
    """Steps between progress lines (the last step always prints one)."""
    base_ref: str | None = None
    """What names the base model in checkpoints (a worker passes "name@version", so another
    worker, with the base unpacked elsewhere, can resume them); None: the directory's path."""
    devices: int = 1
    """Devices of this machine to train on: more than one runs a process per device under
    torchrun, the model sharded by FSDP. Not part of a checkpoint's fingerprint: a job may
    resume on another number of devices."""

    def __post_init__(self) -> None:
        if self.method not in ("lora", "full"):
            raise JobError(f"--method must be lora or full, not {self.method!r}")
        for name in ("epochs", "lora_rank", "batch_size", "log_every", "devices"):
            if getattr(self, name) < 1:
                raise JobError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise JobError(f"--checkpoint-every must be 0 or more, not {self.checkpoint_every}")
        for name in ("max_steps", "max_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise JobError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
        for name in ("lr", "lora_alpha"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise JobError(f"--{name.replace('_', '-')} must be a positive number, not {value}")
        if not self.base.is_dir():
            raise JobError(f"base model directory {self.base} does not exist")
        if not (self.base / "config.json").is_file():
            raise JobError(f"base model directory {self.base} has no config.json")
        if not self.data.is_file():
            raise JobError(f"data file {self.data} does not exist")
        if self.out.exists() and not self.out.is_dir():
            raise JobError(f"output {self.out} exists and is not a directory")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    @property
    def alpha(self) -> int:
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank


# --- input ------------------------------------------------------------------------------


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """The (prompt, completion) pairs of a JSONL file; JobError naming the bad lines."""
    pairs: list[tuple[str, str]] = []
    errors: list[str] = []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise JobError(f"cannot read data file {path}: {exc}") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            pairs.append(_pair(line))
        except ValueError as exc:
            errors.append(f"line {number}: {exc}")
    if errors:
        more = f" (and {len(errors) - MAX_DATA_ERRORS} more)" if len(errors) > MAX_DATA_ERRORS else ""
        raise JobError(f"data file {path}: " + "; ".join(errors[:MAX_DATA_ERRORS]) + more)
    if not pairs:
        raise JobError(f"data file {path} has no examples")
    return pairs


def _pair(line: str) -> tuple[str, str]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected an object with prompt and completion, got {type(obj).__name__}")
    extra = sorted(set(obj) - {"prompt", "completion"})
    if extra:
        raise ValueError(f"unknown key {extra[0]!r} (expected prompt and completion)")
    for key in ("prompt", "completion"):
        if not isinstance(obj.get(key), str):
            raise ValueError(f"{key!r} must be a string" if key in obj else f"missing {key!r}")
    if not obj["completion"]:
        raise ValueError("'completion' is empty")
    return obj["prompt"], obj["completion"]


# --- checkpoints ------------------------------------------------------------------------


def _fingerprint(config: JobConfig) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed: everything that shapes the run."""
    return {
        "base": config.base_ref or str(config.base.resolve()),
        "data_sha256": hashlib.sha256(config.data.read_bytes()).hexdigest(),
        "method": config.method,
        "lr": config.learning_rate,
        "lora_rank": config.lora_rank if config.method == "lora" else None,
        "lora_alpha": config.alpha if config.method == "lora" else None,
        "batch_size": config.batch_size,
        "seed": config.seed,
        "max_length": config.max_length,
    }


def _checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under OUT, oldest first."""
    root = out / CHECKPOINTS
    found = []
    if root.is_dir():
        for entry in root.iterdir():
            match = _CHECKPOINT_NAME.match(entry.name)
            if match and (entry / "state.json").is_file():
                found.append((int(match.group(1)), entry))
    return sorted(found)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Put a fully written `tmp` at `dest`, replacing what was there."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.rename(dest, old)
        os.rename(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dest)
    _fsync_dir(dest.parent)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


# --- training ---------------------------------------------------------------------------


@dataclass
class _Progress:
    step: int = 0
    loss_first: float | None = None
    loss_last: float | None = None
    train_seconds: float = 0.0  # all runs of the job
    tokens: int = 0  # all runs of the job


@dataclass(frozen=True)
class _Ranks:
    """This process's place among a job's processes: rank 0 of 1 unless torchrun started it."""

    rank: int = 0
    world: int = 1
    local: int = 0  # the rank on this machine: the GPU it uses

    @property
    def leader(self) -> bool:
        """Rank 0: the one that writes the JSON lines, checkpoints and the result."""
        return self.rank == 0

    def total(self, value: torch.Tensor) -> float:
        """The sum of a one-element tensor over the ranks."""
        value = value.detach()
        if self.world > 1:
            import torch.distributed as dist

            value = value.clone()
            dist.all_reduce(value)
        return float(value)

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether any rank says so; every rank gets the same answer, at the same step."""
        if self.world == 1:
            return flag
        import torch
        import torch.distributed as dist

        value = torch.tensor([int(flag)], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())


def _under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


@contextmanager
def _distributed() -> Iterator[_Ranks]:
    """Join the job's process group when torchrun started this process (its environment
    says so): NCCL between GPUs, gloo on the CPU."""
    if not _under_torchrun():
        yield _Ranks()
        return
    import torch
    import torch.distributed as dist

    local = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    yield _Ranks(dist.get_rank(), dist.get_world_size(), local)
    # all ranks leave together (gloo aborts a process that tears its group down while a
    # peer still uses it); after an error torchrun ends the others
    dist.barrier()
    dist.destroy_process_group()


class _Trainer:
    """The model, optimizer and data of one job; `run` trains until done or stopped."""

    def __init__(self, config: JobConfig, pairs: Sequence[tuple[str, str]], emit: Emit,
                 ranks: _Ranks = _Ranks()) -> None:
        import torch

        self.config = config
        self.emit = emit
        self.ranks = ranks
        self.fingerprint = _fingerprint(config)
        self.device = torch.device(f"cuda:{ranks.local}" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(config.seed)  # the same on every rank: the same LoRA initialisation
        self.tokenizer, model = self._load_base()
        self.examples, self.skipped = self._encode(pairs, model.config)
        if not self.examples:
            raise JobError(f"no example of {config.data} fits in {self._max_length(model.config)} tokens")
        self.model = self._prepare(model).to(self.device)
        self.trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        if ranks.world > 1:
            self._shard()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=0.0)
        self.steps_per_epoch = math.ceil(len(self.examples) / config.batch_size)
        total = config.epochs * self.steps_per_epoch
        self.total_steps = min(total, config.max_steps) if config.max_steps else total
        self.progress = _Progress()
        self.resumed_from: Path | None = None
        self.last_checkpoint = 0

    def _load_base(self) -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.config.base)
            model = AutoModelForCausalLM.from_pretrained(self.config.base, dtype="float32")
        except (OSError, ValueError) as exc:
            raise JobError(f"cannot load base model from {self.config.base}: {exc}") from None
        if tokenizer.eos_token_id is None:
            raise JobError(f"the tokenizer of {self.config.base} has no end-of-sequence token")
        return tokenizer, model

    def _max_length(self, model_config: Any) -> int:
        context = getattr(model_config, "max_position_embeddings", None) or 2048
        return min(self.config.max_length or context, context)

    def _encode(self, pairs: Sequence[tuple[str, str]], model_config: Any) -> tuple[list[tuple[list[int], int]], int]:
        """(token ids, prompt length) per pair; pairs whose prompt leaves no room are skipped."""
        limit = self._max_length(model_config)
        examples, skipped = [], 0
        for prompt, completion in pairs:
            prompt_ids = list(self.tokenizer(prompt)["input_ids"])
            completion_ids = list(self.tokenizer(completion, add_special_tokens=False)["input_ids"])
            ids = (prompt_ids + completion_ids + [self.tokenizer.eos_token_id])[:limit]
            if len(prompt_ids) >= len(ids):
                skipped += 1
                continue
            examples.append((ids, len(prompt_ids)))
        return examples, skipped

    def _prepare(self, model: Any) -> Any:
        if self.config.method == "full":
            model.train()
            return model
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers.pytorch_utils import Conv1D

        # Every linear layer (GPT-2's Conv1D too), the output projection included. peft's "all-linear" leaves the
        # output layer out; on the demo model (tied embeddings, hidden 192) that capped a
        # 4-example job at a loss of about 1.0 per token however long it trained, so its
        # greedy answers were near-ties that flipped with float rounding (another thread
        # count, another CPU). With the output layer the same job reaches 0.02.
        targets = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                          if isinstance(module, torch.nn.Linear | Conv1D)})  # Conv1D: GPT-2's projections
        lora = LoraConfig(r=self.config.lora_rank, lora_alpha=self.config.alpha, lora_dropout=0.0,
                          target_modules=targets, task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
        model.train()
        return model

    def _shard(self) -> None:
        """FSDP2: each transformer block (the model's `_no_split_modules`) is a unit of its
        own, gathered only while it computes; the root holds the rest (embeddings, final
        norm, output layer, tied or not). Parameter names stay those of the plain model."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.ranks.world,))
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        blocks = set(getattr(base, "_no_split_modules", None) or ())
        for module in list(self.model.modules()):
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def _batches(self, epoch: int) -> list[list[int]]:
        """Example indices of each step of `epoch`: a permutation fixed by (seed, epoch)."""
        import torch

        generator = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
        order = torch.randperm(len(self.examples), generator=generator).tolist()
        size = self.config.batch_size
        return [order[i:i + size] for i in range(0, len(order), size)]

    def _collate(self, rows: Sequence[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        import torch

        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self._pad_id(), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, (ids, prompt_len) in enumerate(rows):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            labels[row, prompt_len:len(ids)] = torch.tensor(ids[prompt_len:])
            mask[row, :len(ids)] = 1
        return {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device),
                "labels": labels.to(self.device)}

    def _step(self, step: int, rows: Sequence[tuple[list[int], int]]) -> float:
        """One optimizer step on a global batch; returns its mean loss per completion token.

        Each rank takes every world-th row. Its loss is its rows' summed token losses over
        the whole batch's token count, times the world size because FSDP averages the
        gradients over the ranks: the sum of the ranks' gradients is the gradient of the
        batch's mean loss, as on one device. A rank left without a row (a batch smaller
        than the world) runs a row that counts nothing, since every rank must take part."""
        import torch

        lr = self.config.learning_rate * min(1.0, (step + 1) / WARMUP_STEPS)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        counted = max(1, sum(len(ids) - max(prompt_len, 1) for ids, prompt_len in rows))
        mine = rows[self.ranks.rank::self.ranks.world] or [([self._pad_id()], 1)]
        batch = self._collate(mine)
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                 batch["labels"][:, 1:].flatten(), ignore_index=-100, reduction="sum")
        value = self.ranks.total(loss) / counted
        if not math.isfinite(value):
            raise JobError(f"the loss is not finite at step {step + 1} (learning rate {lr:g}); try a lower --lr")
        (loss * (self.ranks.world / counted)).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    def run(self, stop: threading.Event) -> int:
        self._resume()
        config, progress = self.config, self.progress
        self.emit("start", step=progress.step, total_steps=self.total_steps, method=config.method,
                  examples=len(self.examples), skipped=self.skipped,
                  tokens_per_epoch=sum(len(ids) for ids, _ in self.examples),
                  trainable_parameters=self.trainable,
                  device=str(self.device), threads=_threads(), world_size=self.ranks.world,
                  resumed_from=str(self.resumed_from) if self.resumed_from else None)
        started, tokens_this_run, steps_this_run = time.perf_counter(), 0, 0
        epoch_batches: tuple[int, list[list[int]]] | None = None
        while progress.step < self.total_steps:
            if self.ranks.any(stop.is_set(), self.device):
                path = self._checkpoint()
                self.emit("stopped", step=progress.step, path=str(path) if path else None)
                return EXIT_STOPPED
            epoch, index = divmod(progress.step, self.steps_per_epoch)
            if epoch_batches is None or epoch_batches[0] != epoch:
                epoch_batches = (epoch, self._batches(epoch))
            rows = [self.examples[i] for i in epoch_batches[1][index]]
            step_started = time.perf_counter()
            loss = self._step(progress.step, rows)
            progress.train_seconds += time.perf_counter() - step_started
            tokens = sum(len(ids) for ids, _ in rows)
            progress.tokens += tokens
            tokens_this_run += tokens
            steps_this_run += 1
            progress.step += 1
            progress.loss_last = loss
            if progress.loss_first is None:
                progress.loss_first = loss
            elapsed = time.perf_counter() - started
            if progress.step % config.log_every == 0 or progress.step == self.total_steps:
                self.emit("progress", step=progress.step, total_steps=self.total_steps,
                          epoch=round(progress.step / self.steps_per_epoch, 3), loss=round(loss, 5),
                          tokens_per_s=round(tokens_this_run / elapsed, 1),
                          eta_s=round(elapsed / steps_this_run * (self.total_steps - progress.step), 1))
            if (config.checkpoint_every and progress.step % config.checkpoint_every == 0
                    and progress.step < self.total_steps):
                self._checkpoint()
        return self._finish(tokens_this_run / max(time.perf_counter() - started, 1e-9))

    # -- checkpoints --

    def _checkpoint(self) -> Path | None:
        """Save the job's state as OUT/checkpoints/step-NNNNNN; None if there is nothing new."""
        import torch

        progress = self.progress
        if progress.step == 0 or progress.step == self.last_checkpoint:
            latest = _checkpoints(self.config.out)
            return latest[-1][1] if latest and progress.step else None
        trainable, optimizer = self._trainable_state(), self._optimizer_state()  # every rank takes part
        if not self.ranks.leader:
            self.last_checkpoint = progress.step
            return None
        root = self.config.out / CHECKPOINTS
        root.mkdir(parents=True, exist_ok=True)
        dest = root / f"step-{progress.step:06d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=root))
        try:
            rng = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state()
            for name, obj in (("weights.pt", trainable), ("optimizer.pt", optimizer), ("rng.pt", rng)):
                with open(tmp / name, "wb") as f:
                    torch.save(obj, f)
                    f.flush()
                    os.fsync(f.fileno())
            _write_json(tmp / "state.json", {
                **asdict(progress), "epoch": progress.step / self.steps_per_epoch,
                "total_steps": self.total_steps, "fingerprint": self.fingerprint})
            _replace_dir(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.last_checkpoint = progress.step
        for _, old in _checkpoints(self.config.out)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
        self.emit("checkpoint", step=progress.step, path=str(dest))
        return dest

    def _whole(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """A tensor in full on the CPU: gathered from every rank when FSDP shards it (all
        take part); None on the ranks other than 0, which keep nothing."""
        from torch.distributed.tensor import DTensor

        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        return tensor.detach().cpu() if self.ranks.leader else None

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable weights by name, whole (as one device holds them), on rank 0."""
        gathered = {name: self._whole(p) for name, p in self.model.named_parameters() if p.requires_grad}
        return {name: t for name, t in gathered.items() if t is not None}

    def _optimizer_state(self) -> dict[str, Any]:
        """`optimizer.state_dict()` with every tensor whole (as on one device), on rank 0."""
        state = self.optimizer.state_dict()
        if self.ranks.world == 1:
            return state
        whole = {index: {key: self._whole(value) if hasattr(value, "detach") else value
                         for key, value in sorted(entry.items())}
                 for index, entry in sorted(state["state"].items())}
        return {"state": whole, "param_groups": state["param_groups"]}

    def _placed(self, tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A whole tensor (every rank read it) placed as `like` is: sharded alike (each rank
        cuts its own shard, nothing is sent) or on its device."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        if isinstance(like, DTensor):
            return distribute_tensor(tensor.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
        return tensor.to(like.device)

    def _resume(self) -> None:
        """Load the latest checkpoint that loads (an unreadable one is skipped, with a warning).

        If there are checkpoints and none loads, the job fails rather than start from zero
        with weights a failed load may have half overwritten.
        """
        root = self.config.out / CHECKPOINTS
        if root.is_dir() and self.ranks.leader:
            for stale in root.glob(".step-*"):  # left by a job killed while checkpointing
                shutil.rmtree(stale, ignore_errors=True)
        failures = []
        for step, path in reversed(_checkpoints(self.config.out)):
            try:
                state = json.loads((path / "state.json").read_text())
            except (OSError, ValueError) as exc:
                failures.append(f"{path.name}: {exc}")
                continue
            _check_same_job(state.get("fingerprint", {}), self.fingerprint, self.config.out)
            try:
                self._load_checkpoint(path)
            except Exception as exc:
                failures.append(f"{path.name}: {type(exc).__name__}: {exc}")
                print(f"skipping checkpoint {path}: {exc}", file=sys.stderr)
                continue
            self.progress = _Progress(step=step, loss_first=state.get("loss_first"),
                                      loss_last=state.get("loss_last"),
                                      train_seconds=float(state.get("train_seconds", 0.0)),
                                      tokens=int(state.get("tokens", 0)))
            self.resumed_from, self.last_checkpoint = path, step
            return
        if failures:
            raise JobError(f"no checkpoint in {root} can be resumed ({'; '.join(failures)}); "
                           "remove them to start afresh")

    def _load_checkpoint(self, path: Path) -> None:
        import torch
        from torch.distributed.tensor import DTensor

        weights = torch.load(path / "weights.pt", map_location="cpu", weights_only=True)
        named = dict(self.model.named_parameters())
        missing = [name for name, p in named.items() if p.requires_grad and name not in weights]
        if missing or set(weights) - set(named):
            raise ValueError(f"its weights do not match the model (missing {missing[:3]})")
        with torch.no_grad():
            for name, tensor in weights.items():
                param, placed = named[name], self._placed(tensor, named[name])
                if isinstance(param, DTensor) and isinstance(placed, DTensor):
                    param.to_local().copy_(placed.to_local())
                else:
                    param.copy_(placed)
        optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        for index, entry in optimizer["state"].items():  # moments shaped like their parameter: sharded alike
            param = self.params[index]
            for key, value in entry.items():
                if isinstance(param, DTensor) and isinstance(value, torch.Tensor) and value.shape == param.shape:
                    entry[key] = self._placed(value, param)
        self.optimizer.load_state_dict(optimizer)
        rng = torch.load(path / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])

    # -- result --

    def _finish(self, tokens_per_s: float) -> int:
        # sharded: the weights whole on rank 0 (all ranks take part), which alone saves them
        state = None
        if self.ranks.world > 1:
            if self.config.method == "lora":
                state = self._trainable_state()
            else:
                state, seen = {}, set()
                for name, tensor in self.model.state_dict(keep_vars=True).items():
                    if id(tensor) not in seen:  # a tied weight once, under its first name, as one device saves it
                        seen.add(id(tensor))
                        if (whole := self._whole(tensor)) is not None:
                            state[name] = whole
            if not self.ranks.leader:
                return EXIT_OK
        out = self.config.out
        name, key = ("adapter", "adapter_dir") if self.config.method == "lora" else ("model", "model_dir")
        dest = out / name
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out))
        try:
            if self.config.method == "lora":
                # the adapter alone: the base's (frozen) output layer is not copied into it,
                # although it is among the LoRA targets
                self.model.save_pretrained(tmp, save_embedding_layers=False, state_dict=state)
            else:
                self.model.save_pretrained(tmp, state_dict=state)
            if self.config.method == "full":
                self.tokenizer.save_pretrained(tmp)
            _replace_dir(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        progress = self.progress
        done = {"steps": progress.step, "loss_first": progress.loss_first, "loss_last": progress.loss_last,
                "train_seconds": round(progress.train_seconds, 3), "tokens_per_s": round(tokens_per_s, 1),
                key: str(dest)}
        _write_json(out / RESULT, {"fingerprint": self.fingerprint, "done": done})
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        self.emit("done", **done)
        return EXIT_OK


def _check_same_job(found: dict[str, Any], wanted: dict[str, Any], out: Path) -> None:
    differ = [key for key in wanted if found.get(key) != wanted[key]]
    if differ:
        key = differ[0]
        raise JobError(f"{out} holds a different job ({key} was {found.get(key)!r}, now {wanted[key]!r}); "
                       "use another --out to start afresh")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


# --- entry points -----------------------------------------------------------------------


def run_job(config: JobConfig, emit: Emit, stop: threading.Event | None = None, ranks: _Ranks = _Ranks()) -> int:
    """Run (or resume, or only report) the job in this process (one rank of it under
    torchrun); returns the exit code. Raises JobError."""
    pairs = read_pairs(config.data)  # before the training stack loads: bad data fails fast
    if (finished := _finished(config)) is not None:
        emit("done", **finished)
        return EXIT_OK
    config.out.mkdir(parents=True, exist_ok=True)
    return _Trainer(config, pairs, emit, ranks).run(stop or threading.Event())


def _finished(config: JobConfig) -> dict[str, Any] | None:
    """The "done" line of a job that finished already (OUT/result.json), if it did."""
    result = config.out / RESULT
    if not result.is_file():
        return None
    finished = json.loads(result.read_text())
    _check_same_job(finished.get("fingerprint", {}), _fingerprint(config), config.out)
    return dict(finished["done"])


def _launch(config: JobConfig, argv: Sequence[str], emit: Emit, stop: threading.Event) -> int:
    """Become torchrun running this job on `config.devices` processes of this machine: exec,
    so torchrun keeps this pid, and with it what the worker knows of this process (it
    signals it, it reads its stdout) and the parent-death signal armed for the worker; the
    ranks are told to die with torchrun. Returns only when there is nothing to run."""
    read_pairs(config.data)  # bad data fails here, before N processes load the model
    if (finished := _finished(config)) is not None:
        emit("done", **finished)
        return EXIT_OK
    if stop.is_set():  # asked to stop before it started: the checkpoints stay as they are
        latest = _checkpoints(config.out)
        emit("stopped", step=latest[-1][0] if latest else 0, path=str(latest[-1][1]) if latest else None)
        return EXIT_STOPPED
    own = [arg for i, arg in enumerate(argv) if not arg.startswith("--parent-pid")
           and not (i and argv[i - 1] == "--parent-pid")]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={config.devices}",
               f"--shutdown-timeout={SHUTDOWN_TIMEOUT}", "-m", "maas.finetune.train",
               *own, "--parent-pid", str(os.getpid())]
    # torchrun gives each rank one thread unless told otherwise
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // config.devices)))
    sys.stderr.flush()
    os.execv(sys.executable, command)
    raise AssertionError("unreachable")  # pragma: no cover


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would print usage and exit 2
        raise JobError(message)


def parse_args(argv: Sequence[str] | None = None) -> JobConfig:
    parser = _Parser(prog="python -m maas.finetune.train",
                     description="Fine-tune a causal LM (LoRA or full); progress as JSON lines on stdout.")
    parser.add_argument("--base", type=Path, required=True, help="base model directory")
    parser.add_argument("--data", type=Path, required=True, help='JSONL of {"prompt", "completion"}')
    parser.add_argument("--out", type=Path, required=True, help="job directory (resumed if it has checkpoints)")
    parser.add_argument("--method", default="lora", help="lora (default) or full")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, help="learning rate (1e-3 for lora, 1e-4 for full)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, help="LoRA alpha (twice the rank)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--checkpoint-every", type=int, default=50, help="steps; 0: only when stopped")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--max-length", type=int, help="tokens an example keeps (the model's context)")
    parser.add_argument("--log-every", type=int, default=1, help="steps between progress lines")
    parser.add_argument("--base-ref", help="names the base in checkpoints (default: its directory)")
    parser.add_argument("--devices", type=int, default=1,
                        help="devices of this machine to train on (more than one: under torchrun, sharded by FSDP)")
    parser.add_argument("--parent-pid", type=int, default=0,
                        help="die with this process, the one that started this one (a worker)")
    args = vars(parser.parse_args(argv))
    if parent := args.pop("parent_pid"):
        _exit_with_parent(parent)
    return JobConfig(**args)


def _exit_with_parent(parent: int) -> None:
    """Be killed when the parent (the worker, pid `parent`) dies: Linux's PR_SET_PDEATHSIG,
    so a worker killed with SIGKILL leaves no training process behind to hold its device;
    its job resumes elsewhere from the last checkpoint the worker saved. Elsewhere: a
    thread that watches for the parent's exit. If the parent died before this was armed
    (we were already adopted), exit at once."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(EXIT_FAILED)

        threading.Thread(target=watch, daemon=True, name="parent-watch").start()
    if os.getppid() != parent:  # it died before the signal was armed
        os._exit(EXIT_FAILED)


def _emitter(stream: IO[str]) -> Emit:
    def emit(event: str, **fields: Any) -> None:
        stream.write(json.dumps({"event": event, **fields}) + "\n")
        stream.flush()

    return emit


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Set `stop` on SIGTERM/SIGINT while inside; the old handlers come back after."""
    handler = lambda signum, frame: stop.set()  # noqa: E731
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def main(argv: Sequence[str] | None = None) -> int:
    stdout = sys.stdout
    # under torchrun every rank shares this stdout: rank 0 alone speaks there
    leader = not _under_torchrun() or os.environ.get("RANK", "0") == "0"
    emit = _emitter(stdout) if leader else lambda event, **fields: None
    sys.stdout = sys.stderr  # a stray print() from a library must not corrupt the event stream
    stop = threading.Event()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        with _stop_on_signals(stop):
            config = parse_args(args)
            if config.devices > 1 and not _under_torchrun():
                return _launch(config, args, emit, stop)
            with _distributed() as ranks:
                return run_job(config, emit, stop, ranks)
    except JobError as exc:
        emit("error", message=str(exc))
        return EXIT_USAGE
    except Exception as exc:
        traceback.print_exc()
        emit("error", message=f"{type(exc).__name__}: {exc}")
        return EXIT_FAILED
    finally:
        sys.stdout = stdout


if __name__ == "__main__":
    sys.exit(main())
