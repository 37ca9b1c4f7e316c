"""A pipeline's SLO: parsed with line-numbered errors, counted exactly, judged over a window."""

from __future__ import annotations

import pytest

from maas.pipelines import slo
from maas.pipelines.spec import SpecErrors, parse

HEAD = """\
steps:
  - {name: docs, kind: retrieve, index: kb, input: input.text, on_error: skip}
  - {name: answer, kind: generate, model: m, input: input.text}
"""


def spec_slo(body: str) -> slo.Slo:
    parsed = parse(HEAD + body).slo
    assert parsed is not None
    return parsed


def test_an_slo_is_parsed_and_its_mistakes_named_with_their_line() -> None:
    got = spec_slo("slo:\n  min_requests: 5\n  p95_ms: 800\n  steps:\n    docs: {error_rate: 0.01, p99_ms: 50}\n")
    assert got.min_requests == 5 and got.window_s == 60 and got.promote_after == 0
    assert got.objective(slo.WHOLE) == slo.Objective(slo.WHOLE, latency_ms=800, quantile=0.95)
    assert got.objective("docs") == slo.Objective("docs", error_rate=0.01, latency_ms=50, quantile=0.99)
    assert got.objective("answer") is None
    with pytest.raises(SpecErrors) as bad:
        parse(HEAD + "slo:\n  p95_ms: 1\n  p99_ms: 2\n  error_rate: 2\n  steps: {nope: {error_rate: 0.1}}\n")
    text = str(bad.value)
    assert "pipeline.yaml:4: slo: error_rate must be a number from 0 to 1, not 2" in text
    assert "slo: one latency bound per objective, not p95_ms, p99_ms" in text
    assert "slo: step 'nope' does not exist" in text
    with pytest.raises(SpecErrors, match="declares no objective"):
        parse(HEAD + "slo: {min_requests: 3}\n")
    with pytest.raises(SpecErrors, match="unknown field 'p97_ms'"):
        parse(HEAD + "slo:\n  steps: {docs: {p97_ms: 3}}\n")


def _tally(objectives: slo.Slo, outcomes: list[tuple[bool, float]], step: str = slo.WHOLE) -> dict[str, slo.Counts]:
    counts = slo.Counts()
    for failed, ms in outcomes:
        slo.count(objectives, step, failed, ms, counts)
    return {step: counts}


def test_a_latency_objective_is_judged_exactly_from_counts() -> None:
    objectives = spec_slo("slo:\n  min_requests: 20\n  p95_ms: 100\n")
    # 1 of 20 over the bound is exactly 5%: met; 2 of 20 is not
    ok = _tally(objectives, [(False, 50.0)] * 19 + [(False, 101.0)])
    assert slo.judge(objectives, ok, 20).action == ""
    bad = _tally(objectives, [(False, 50.0)] * 18 + [(False, 101.0), (False, 300.0)])
    verdict = slo.judge(objectives, bad, 20)
    assert verdict.action == "rollback"
    assert verdict.reason == ("the whole answer: 2 of 20 requests took longer than 100 ms (10%; the slowest 300 ms), "
                              "so its p95 is above the SLO's p95_ms 100")
    # too few requests: no verdict, however bad
    assert slo.judge(objectives, _tally(objectives, [(False, 900.0)] * 19), 19).action == ""


def test_errors_and_promotion() -> None:
    objectives = spec_slo("slo:\n  min_requests: 4\n  promote_after: 10\n  steps:\n    docs: {error_rate: 0.25}\n")
    docs = _tally(objectives, [(True, 5.0), (False, 5.0), (False, 5.0), (False, 5.0)], step="docs")
    whole = _tally(objectives, [(False, 10.0)] * 4)
    assert slo.judge(objectives, {**docs, **whole}, 9).action == ""          # 25% is allowed; 9 < promote_after
    assert slo.judge(objectives, {**docs, **whole}, 10).action == "promote"
    docs = _tally(objectives, [(True, 5.0), (True, 5.0), (False, 5.0), (False, 5.0)], step="docs")
    verdict = slo.judge(objectives, {**docs, **whole}, 10)
    assert (verdict.action, verdict.reason) == (
        "rollback", "step 'docs': 2 of 4 requests failed (50%), above the SLO's error_rate 0.25")
    # a step without an objective is not counted; the whole answer always is
    assert _tally(objectives, [(True, 1.0)], step="answer") == {"answer": slo.Counts()}


def test_the_window_forgets_old_reports() -> None:
    now = [0.0]
    window = slo.Window(clock=lambda: now[0])
    window.add(slo.WHOLE, slo.Counts(10, 5, 0, 3.0))
    now[0] = 30.0
    window.add(slo.WHOLE, slo.Counts(10, 0, 1, 9.0))
    assert window.totals(60)[slo.WHOLE] == slo.Counts(20, 5, 1, 9.0)
    now[0] = 61.0
    assert window.totals(60)[slo.WHOLE] == slo.Counts(10, 0, 1, 9.0)
    assert window.total_requests == 20  # promotion counts every request since the canary began
