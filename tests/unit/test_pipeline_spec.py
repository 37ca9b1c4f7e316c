"""Pipeline YAML: a good one parses; every mistake is reported with its line."""

from __future__ import annotations

from pathlib import Path

import pytest

from maas.pipelines.spec import SpecErrors, parse

GOOD = """\
description: answer from the docs
output: safe
steps:
  - name: docs
    kind: retrieve
    index: kb
    input: input.text
    timeout_ms: 80
    on_error: skip
  - name: prompt
    kind: template
    template: "{{ steps.docs }} {{ input.text }}"
  - name: answer
    kind: generate
    model: demo
    input: steps.prompt
  - name: safe
    kind: guard
    input: steps.answer
    block: [password]
"""


def errors(text: str, **known: object) -> list[str]:
    with pytest.raises(SpecErrors) as e:
        parse(text, source="p.yaml", **known)  # type: ignore[arg-type]
    assert e.value.field == "pipeline"
    return str(e.value.message).splitlines()


def test_a_good_pipeline_parses() -> None:
    spec = parse(GOOD, known_model=lambda m: m == "demo", known_index=lambda i: i == "kb")
    assert list(spec.steps) == ["docs", "prompt", "answer", "safe"] and spec.output == "safe" and spec.streams
    assert spec.steps["prompt"].reads() == ["docs"] and spec.steps["docs"].timeout_ms == 80
    assert spec.description == "answer from the docs"


def test_each_mistake_is_named_with_its_line() -> None:
    bad = GOOD.replace("kind: template", "kind: templat").replace("model: demo", "model: demo\n    modle: x")
    assert errors(bad) == [
        "p.yaml:11: step 'prompt': unknown kind 'templat' (expected one of generate, embed, retrieve, template, "
        "plugin, switch, parallel, guard)",
        "p.yaml:13: step 'answer' reads steps.prompt, which does not exist",
        "p.yaml:16: step 'answer': unknown field 'modle' for a generate step (expected description, fallback, "
        "idempotent, input, max_tokens, model, on_error, retries, seed, stop, stream, system, temperature, "
        "timeout_ms, top_p)",
    ]
    assert errors(GOOD.replace("on_error: skip", "on_error: skip\n    retries: 2")) == [
        "p.yaml:10: step 'docs': retries need `idempotent: true` (a step that is not idempotent is never retried)"]
    assert errors(GOOD, known_model=lambda m: False, known_index=lambda i: True) == [
        "p.yaml:13: step 'answer': model 'demo' does not exist"]
    assert errors(GOOD.replace("output: safe", "output: nope")) == ["p.yaml:2: output names step 'nope', "
                                                                    "which does not exist"]
    assert errors("steps:\n  - {name: x, kind: generate\n") == [
        "p.yaml:3: not valid YAML: expected ',' or '}', but got '<stream end>'"]
    assert errors("steps: []\n") == ["p.yaml:1: `steps` must be a non-empty list"]


def test_cycles_and_stopped_streams_are_refused() -> None:
    cycle = """\
steps:
  - {name: a, kind: template, template: "{{ steps.b }}"}
  - {name: b, kind: template, template: "{{ steps.a }}"}
"""
    assert errors(cycle) == ["p.yaml:2: cycle: a -> b -> a"]
    stopped = GOOD.replace("kind: guard\n    input: steps.answer\n    block: [password]",
                           "kind: template\n    template: '{{ steps.answer }}'")
    assert errors(stopped) == [
        "p.yaml:17: step 'safe' (template) reads the stream of step 'answer', which would stop it; only a guard, "
        "a plugin with stream: true or the pipeline's output can read a stream (set stream: false on the generate "
        "step to collect it first)"]
    collected = stopped.replace("input: steps.prompt", "input: steps.prompt\n    stream: false")
    assert not parse(collected).streams


def test_maas_pipeline_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from maas.cli.main import main

    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    assert main(["pipeline", "validate", str(good)]) == 0
    assert "4 steps: docs (retrieve), prompt (template), answer (generate), safe (guard); output safe (streams)" \
        in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("input: steps.prompt", "input: steps.promt"))
    assert main(["pipeline", "validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:13: step 'answer' reads steps.promt, which does not exist" in err and "1 problem in" in err
    assert main(["pipeline", "validate", str(tmp_path / "none.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_hostile_files_are_refused_cheaply() -> None:
    bomb = "a: &a [x, x]\nb: &b [*a, *a]\nsteps:\n  - {name: t, kind: template, template: *b}\n"
    assert errors(bomb) == ["p.yaml:1: YAML anchors and aliases (&name, *name) are not allowed in a pipeline"]
    chain = "steps:\n" + "".join(f"  - {{name: s{i}, kind: template, template: '{{{{ steps.s{i + 1} }}}}'}}\n"
                                 for i in range(150)) + "  - {name: s150, kind: template, template: '{{ steps.s0 }}'}\n"
    assert errors(chain)[0].startswith("p.yaml:") and "cycle: s0 -> s1 -> s2" in errors(chain)[0]
    many = "steps:\n" + "".join(f"  - {{name: s{i}, kind: template, template: x}}\n" for i in range(201))
    assert errors(many) == ["p.yaml:2: a pipeline has at most 200 steps, not 201"]
    assert errors("steps:\n  - {name: t, kind: template, template: [1, 2]}\n") == [
        "p.yaml:2: step 't': template must be a string"]
    assert errors("steps:\n  - {name: t, kind: template, template: '{% for %}'}\n")[0].startswith(
        "p.yaml:2: step 't': the template does not compile:")


def test_a_template_can_come_from_a_file_of_the_package(tmp_path: Path) -> None:
    text = ("steps:\n  - {name: prompt, kind: template, template_file: prompt.j2}\n"
            "  - {name: answer, kind: generate, model: m, input: steps.prompt}\n")
    spec = parse(text, files={"prompt.j2": b"Context first. Q: {{ input.text }}"})
    assert spec.steps["prompt"].options["template"].startswith("Context first.")
    with pytest.raises(SpecErrors, match="pipeline.yaml:2: step 'prompt': template_file 'prompt.j2' needs the "
                                         "pipeline pushed as a directory"):
        parse(text)
    with pytest.raises(SpecErrors, match="template_file 'prompt.j2' is not in the pipeline's package"):
        parse(text, files={"other.j2": b""})
    with pytest.raises(SpecErrors, match="does not compile"):
        parse(text, files={"prompt.j2": b"{% for %}"})
    # the file's references count as the step's (a step it reads must exist)
    with pytest.raises(SpecErrors, match="step 'prompt' reads steps.docs, which does not exist"):
        parse(text, files={"prompt.j2": b"{{ steps.docs }}"})
    # the CLI checks a directory with its files
    from maas.cli.main import main

    (tmp_path / "pipeline.yaml").write_text(text)
    (tmp_path / "prompt.j2").write_text("Q: {{ input.text }}")
    assert main(["pipeline", "validate", str(tmp_path)]) == 0
