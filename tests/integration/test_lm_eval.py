"""lm-evaluation-harness, unmodified, against the mesh's OpenAI API: its `local-completions`
model scores a small multiple-choice task (loglikelihood: token-id prompts, echo and prompt
logprobs) and a generation task the test writes itself. The scores it computes must equal
the demo model's own, computed here with a plain forward pass."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from .conftest import MeshHarness

pytest.importorskip("lm_eval", reason="lm-eval is a dev dependency (pip install -e '.[dev]')")

MC = [{"question": "def add(a, b):\n    return a", "choices": [" + b", " * c", " if x"], "answer": 0},
      {"question": "import os\nimport", "choices": [" sys", " 42", " ("], "answer": 0},
      {"question": "for i in range(", "choices": ["10):", "]]]", "else"], "answer": 0}]
GEN = [{"prompt": "def add(a, b):\n", "target": "    return a + b"},
       {"prompt": "import os\n", "target": "import sys"}]
TASKS = """\
task: maas_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
---
task: maas_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
"""


def _loglikelihood(model: torch.nn.Module, tokenizer: object, context: str, continuation: str) -> float:
    """The continuation's log-probability given the context, as lm-eval splits the pair."""
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids  # type: ignore[operator]
    ctx = tokenizer(context, add_special_tokens=False).input_ids  # type: ignore[operator]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    return float(sum(logp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


async def test_lm_eval_harness_scores_loglikelihood_and_generation(mesh: MeshHarness, demo_model_dir: Path,
                                                                   tmp_path: Path) -> None:
    router = await mesh.serving_hf(demo_model_dir)
    key = await mesh.key("acme")
    base = f"http://{router.info.http_endpoint}/v1"

    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC))
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in GEN))
    for name, text in zip(("maas_mc", "maas_gen"), TASKS.format(dir=tmp_path).split("---\n"), strict=True):
        (tmp_path / f"{name}.yaml").write_text(text)
    out = tmp_path / "out"
    args = ["--model", "local-completions",
            "--model_args", f"model=demo,base_url={base}/completions,tokenizer={demo_model_dir},"
                            "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1,max_length=1024",
            "--tasks", "maas_mc,maas_gen", "--include_path", str(tmp_path), "--output_path", str(out),
            "--log_samples", "--batch_size", "1"]
    env = {**os.environ, "OPENAI_API_KEY": key, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "TOKENIZERS_PARALLELISM": "false"}
    child = await asyncio.create_subprocess_exec(sys.executable, "-m", "lm_eval", *args, env=env,
                                                 stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    log, _ = await asyncio.wait_for(child.communicate(), timeout=300)
    assert child.returncode == 0, log.decode()[-4000:]

    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    assert 0.0 <= results["maas_mc"]["acc,none"] <= 1.0
    assert [v for k, v in results["maas_gen"].items() if k.startswith("exact_match,")]

    # what the harness scored is what the model says: each choice's loglikelihood, as
    # computed here with a plain forward pass over the same tokens
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir).eval()
    samples = [json.loads(line) for line in next(out.rglob("samples_maas_mc_*.jsonl")).read_text().splitlines()]
    assert len(samples) == len(MC)
    for sample in samples:
        doc = sample["doc"]
        scored = [float(r[0][0]) for r in sample["resps"]]
        want = [_loglikelihood(model, tokenizer, doc["question"], c) for c in doc["choices"]]
        assert scored == pytest.approx(want, abs=1e-3), doc
    # and the generations are the model's greedy completions through the API
    import openai

    client = openai.AsyncOpenAI(base_url=base, api_key=key, max_retries=0)
    samples = [json.loads(line) for line in next(out.rglob("samples_maas_gen_*.jsonl")).read_text().splitlines()]
    for sample in samples:
        ids = tokenizer(sample["doc"]["prompt"], add_special_tokens=False).input_ids
        direct = await client.completions.create(model="demo", prompt=ids, max_tokens=12, temperature=0,
                                                 stop=["\n"])
        assert sample["resps"][0][0] == direct.choices[0].text
    await client.close()
