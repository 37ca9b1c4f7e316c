"""Forge a tiny, deterministic demo causal LM that loads like any Hugging Face model.

`forge_demo_model` trains a byte-level BPE tokenizer and a small Llama on Python
standard-library sources found on this machine, then saves both with
`save_pretrained`, so `AutoTokenizer.from_pretrained(dest)` and
`AutoModelForCausalLM.from_pretrained(dest)` load it like a real checkpoint. The
result is cached: a `maas_forge.json` marker records the parameters, and forging
again with the same parameters returns at once. Everything is built in a temporary
directory beside `dest` and renamed into place, so a killed forge never leaves a
half-written model behind.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils.logging import disable_progress_bar

log = logging.getLogger(__name__)

MARKER = "maas_forge.json"
# Bump when anything below changes what a forge produces, so stale caches are rebuilt.
FORGE_VERSION = 1

# Standard-library modules used as the training corpus, read in this order. Missing
# ones (other Python versions) are skipped; the corpus is capped at CORPUS_MAX_CHARS.
CORPUS_MODULES = (
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "codecs", "colorsys",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "difflib", "enum",
    "fnmatch", "fractions", "functools", "getopt", "gettext", "glob", "graphlib", "gzip",
    "heapq", "hmac", "inspect", "ipaddress", "keyword", "linecache", "numbers",
    "operator", "optparse", "os", "pprint", "queue", "random", "reprlib", "sched",
    "secrets", "selectors", "shlex", "shutil", "socket", "statistics", "string",
    "subprocess", "tempfile", "textwrap", "threading", "tokenize", "traceback", "types",
    "typing", "uuid", "warnings", "weakref",
)  # fmt: skip
CORPUS_MAX_CHARS = 1_500_000

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
VOCAB_SIZE = 2048
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Sized for the time budget (~30 s on 2 CPU cores): on such a short run a shallow model
# taking many small steps learns far more than a deeper one taking few.
HIDDEN_SIZE = 192
NUM_LAYERS = 2
NUM_HEADS = 4
INTERMEDIATE_SIZE = 512
MAX_POSITIONS = 1024

DEFAULT_STEPS = 500
SEQ_LEN = 64
BATCH_SIZE = 8
LEARNING_RATE = 3e-3
WARMUP_STEPS = 10


def forge_demo_model(
    dest: Path,
    *,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    train_seconds: float | None = None,
) -> Path:
    """Build the demo model into `dest` (unless already there) and return `dest`.

    Training runs `steps` optimizer steps, which makes the result deterministic for a
    given seed on a given machine. `train_seconds`, if set, also stops training once
    that much wall time has passed; that trades determinism for a bounded run time.
    """
    dest = Path(dest)
    wanted = {"version": FORGE_VERSION, "seed": seed, "steps": steps, "train_seconds": train_seconds}
    if _marker_matches(dest, wanted):
        log.debug("demo model already forged in %s", dest)
        return dest

    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.forging-", dir=dest.parent))
    try:
        started = time.monotonic()
        texts = _load_corpus()
        chars = sum(map(len, texts))
        log.info("forging demo model into %s: %d corpus files, %d chars", dest, len(texts), chars)
        tokenizer = _train_tokenizer(texts)
        model, report = _train_model(tokenizer, texts, seed=seed, steps=steps, train_seconds=train_seconds)
        disable_progress_bar()  # a few MB: a progress bar is only noise in `maas up`
        tokenizer.save_pretrained(work)
        model.save_pretrained(work, safe_serialization=True)
        report |= wanted | {"forge_seconds": round(time.monotonic() - started, 2)}
        (work / MARKER).write_text(json.dumps(report, indent=2) + "\n")
        # A concurrent forge (another test process) may have finished first: keep its result.
        if not _marker_matches(dest, wanted):
            _replace_dir(work, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("forged demo model in %.1fs: %s", report["forge_seconds"], report)
    return dest


def _marker_matches(dest: Path, wanted: dict[str, Any]) -> bool:
    try:
        marker = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and all(marker.get(k) == v for k, v in wanted.items())


def _replace_dir(src: Path, dest: Path) -> None:
    """Move the finished `src` into place as `dest`, discarding any stale `dest`."""
    if dest.exists():
        stale = Path(tempfile.mkdtemp(prefix=f".{dest.name}.stale-", dir=dest.parent))
        os.replace(dest, stale / dest.name)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(src, dest)


def _load_corpus() -> list[str]:
    """Read the fixed list of stdlib sources as normalised code (about 1 MB)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    total = 0
    for name in CORPUS_MODULES:
        path = stdlib / f"{name}.py"
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        text = _normalise_source(text)[: CORPUS_MAX_CHARS - total]
        texts.append(text)
        total += len(text)
        if total >= CORPUS_MAX_CHARS:
            break
    if not texts:
        raise RuntimeError(f"no corpus files found under {stdlib}")
    return texts


def _normalise_source(source: str) -> str:
    """Drop comments and docstrings and reformat uniformly (`ast.unparse`).

    The training budget is tiny, so prose and style variations are left out: pure,
    consistently formatted code is what lets the model look Python-like this fast.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return source
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree) + "\n"


def _train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (exact round trip for any text) and wrap it for transformers."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[BOS, EOS, UNK, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=MAX_POSITIONS,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def _encode_corpus(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """One long id stream: `<s> file </s>` for each file."""
    ids: list[int] = []
    for encoding in tokenizer.backend_tokenizer.encode_batch(texts):
        ids.extend(encoding.ids)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def _batches(data: torch.Tensor, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless random windows of SEQ_LEN tokens, drawn from `generator`."""
    high = len(data) - SEQ_LEN
    while True:
        starts = torch.randint(0, high, (BATCH_SIZE,), generator=generator)
        yield torch.stack([data[s : s + SEQ_LEN] for s in starts.tolist()])


def _learning_rate(step: int, steps: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < WARMUP_STEPS:
        return LEARNING_RATE * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return LEARNING_RATE * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _train_model(
    tokenizer: PreTrainedTokenizerFast,
    texts: list[str],
    *,
    seed: int,
    steps: int,
    train_seconds: float | None,
) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    """Initialise a small Llama from `seed` and train it briefly on the corpus."""
    data = _encode_corpus(tokenizer, texts)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_HEADS,
        intermediate_size=INTERMEDIATE_SIZE,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.95), weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    deadline = None if train_seconds is None else time.monotonic() + train_seconds
    recent: list[float] = []
    model.train()
    step = 0
    for step, batch in zip(range(steps), _batches(data, generator), strict=False):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, steps)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recent = [*recent[-9:], loss.item()]
        if step % 10 == 0 or step == steps - 1:
            log.info("forge step %d/%d loss %.3f", step + 1, steps, recent[-1])
        if deadline is not None and time.monotonic() >= deadline:
            log.info("forge stopped at step %d: train_seconds reached", step + 1)
            break
    model.eval()
    report = {
        "steps_done": step + 1,
        "final_loss": round(sum(recent) / len(recent), 4),
        "corpus_tokens": len(data),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return model, report


def main(argv: list[str] | None = None) -> int:
    """`python -m maas.models.forge DEST [--seed N] [--steps N]`."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--train-seconds", type=float, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    path = forge_demo_model(args.dest, seed=args.seed, steps=args.steps, train_seconds=args.train_seconds)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
