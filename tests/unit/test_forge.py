"""The demo model forge: caching, atomic output, loadable and Python-flavoured."""

from __future__ import annotations

import json
import time
from pathlib import Path

from maas.models.forge import MARKER, forge_demo_model


def test_forging_again_is_a_cached_no_op(demo_model_dir: Path) -> None:
    marker = json.loads((demo_model_dir / MARKER).read_text())
    weights = demo_model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    started = time.monotonic()
    assert forge_demo_model(demo_model_dir, seed=marker["seed"], steps=marker["steps"]) == demo_model_dir
    assert time.monotonic() - started < 1
    assert weights.stat().st_mtime_ns == before
    assert not [p for p in demo_model_dir.parent.iterdir() if ".forging-" in p.name]


def test_greedy_completion_looks_like_python(demo_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir)
    inputs = tokenizer("def add(a, b):", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    completion = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert completion.strip()
    assert model.config.model_type == "llama" and (demo_model_dir / "model.safetensors").exists()


def test_tokenizer_round_trips_and_has_a_chat_template(demo_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    text = "def f(x):\n\treturn 'naïve → 世界 🎉'  # ok\n"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("</s>", "<pad>")
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "hi" in chat and chat.endswith("<|assistant|>\n")


def test_small_forge_is_atomic_and_rebuilds_on_new_parameters(tmp_path: Path) -> None:
    dest = tmp_path / "model"
    forge_demo_model(dest, seed=1, steps=2)
    assert json.loads((dest / MARKER).read_text())["steps_done"] == 2
    forge_demo_model(dest, seed=2, steps=1)
    marker = json.loads((dest / MARKER).read_text())
    assert (marker["seed"], marker["steps_done"]) == (2, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary leftovers
