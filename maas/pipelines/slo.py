"""A pipeline's service-level objectives, and judging a canary against them.

    slo:
      window_s: 60          # judged over the last minute of requests (default 60)
      min_requests: 20      # no verdict on fewer (default 20)
      promote_after: 200    # a canary that met every objective over this many requests in a
                            #   row is promoted (default 0: promoted by hand only)
      error_rate: 0.05      # the whole answer: at most 5% of requests fail
      p95_ms: 2000          # the whole answer: 95% reach their first chunk within 2 s
      steps:
        docs: {error_rate: 0.01, p99_ms: 150}   # a step: failed, skipped or given its
                                                #   fallback counts as an error

A latency objective `pQ_ms: X` holds when at most (100 - Q)% of the requests took longer
than X ms (for the whole answer: to its first chunk; for a step: to its value, a stream's
first chunk). That is exact from counts: routers count the requests over X, with no
histogram and no estimate.

Routers count what each run of a deployed pipeline did per objective (`Tally`) and report
it about every second; the scheduler leader sums the reports over the window (`Window`)
and `judge`s the canary.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

QUANTILES = {"p50_ms": 0.50, "p90_ms": 0.90, "p95_ms": 0.95, "p99_ms": 0.99}
FIELDS = {"window_s", "min_requests", "promote_after", "error_rate", "steps", *QUANTILES}
WHOLE = ""  # the objective of the whole answer
MAX_WINDOW_S = 3600.0


@dataclass(frozen=True)
class Objective:
    step: str                  # WHOLE or a step's name
    error_rate: float | None = None
    latency_ms: float | None = None
    quantile: float = 0.0      # of latency_ms: at most (1 - quantile) of requests may be slower

    def describe(self) -> str:
        return "the whole answer" if self.step == WHOLE else f"step {self.step!r}"


@dataclass(frozen=True)
class Slo:
    objectives: tuple[Objective, ...]
    window_s: float = 60.0
    min_requests: int = 20
    promote_after: int = 0

    def objective(self, step: str) -> Objective | None:
        for o in self.objectives:
            if o.step == step:
                return o
        return None


def parse_slo(raw: Any, line: int, problems: list[tuple[int, str]], steps: Iterable[str]) -> Slo | None:
    """The `slo` mapping, checked (problems appended with `line`)."""
    if not isinstance(raw, dict):
        problems.append((line, "slo must be a mapping (window_s, min_requests, promote_after, error_rate, "
                               "pNN_ms, steps)"))
        return None
    before = len(problems)
    for key in raw:
        if key not in FIELDS:
            problems.append((line, f"slo: unknown field {key!r} (expected {', '.join(sorted(FIELDS))})"))
    window = _number(raw.get("window_s", 60), "slo: window_s", line, problems, low=1, high=MAX_WINDOW_S)
    least = _whole(raw.get("min_requests", 20), "slo: min_requests", line, problems, low=1)
    promote = _whole(raw.get("promote_after", 0), "slo: promote_after", line, problems, low=0)
    objectives = []
    whole = _objective(WHOLE, raw, line, problems)
    if whole is not None:
        objectives.append(whole)
    known = set(steps)
    per_step = raw.get("steps", {}) or {}
    if not isinstance(per_step, dict):
        problems.append((line, "slo: steps must map step names to objectives"))
        per_step = {}
    for name, body in per_step.items():
        if str(name) not in known:
            problems.append((line, f"slo: step {name!r} does not exist"))
            continue
        if not isinstance(body, dict) or not body:
            problems.append((line, f"slo: step {name!r} needs error_rate and/or a pNN_ms bound"))
            continue
        for key in body:
            if key not in QUANTILES and key != "error_rate":
                problems.append((line, f"slo: step {name!r}: unknown field {key!r} (expected error_rate, "
                                       f"{', '.join(QUANTILES)})"))
        objective = _objective(str(name), body, line, problems)
        if objective is not None:
            objectives.append(objective)
    if not objectives and len(problems) == before:
        problems.append((line, "slo: declares no objective (error_rate or a pNN_ms bound, for the whole answer "
                               "or under steps)"))
    if len(problems) > before:
        return None
    return Slo(tuple(objectives), window_s=window, min_requests=least, promote_after=promote)


def _objective(step: str, raw: dict[str, Any], line: int, problems: list[tuple[int, str]]) -> Objective | None:
    where = "slo" if step == WHOLE else f"slo: step {step!r}"
    rate = raw.get("error_rate")
    if rate is not None:
        rate = _number(rate, f"{where}: error_rate", line, problems, low=0, high=1)
    bounds = [k for k in QUANTILES if k in raw]
    if len(bounds) > 1:
        problems.append((line, f"{where}: one latency bound per objective, not {', '.join(bounds)}"))
        return None
    latency = _number(raw[bounds[0]], f"{where}: {bounds[0]}", line, problems, low=0.001, high=3_600_000) \
        if bounds else None
    if rate is None and latency is None:
        return None
    return Objective(step, error_rate=rate, latency_ms=latency, quantile=QUANTILES[bounds[0]] if bounds else 0.0)


def _number(value: Any, what: str, line: int, problems: list[tuple[int, str]], *, low: float,
            high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        problems.append((line, f"{what} must be a number from {low:g} to {high:g}, not {value!r}"))
        return low
    return float(value)


def _whole(value: Any, what: str, line: int, problems: list[tuple[int, str]], *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        problems.append((line, f"{what} must be a whole number >= {low}, not {value!r}"))
        return low
    return value


# ---- counting (routers) and judging (the scheduler leader) ----------------------------------


@dataclass
class Counts:
    requests: int = 0
    errors: int = 0
    slow: int = 0
    max_ms: float = 0.0

    def add(self, requests: int, errors: int, slow: int, max_ms: float) -> None:
        self.requests += requests
        self.errors += errors
        self.slow += slow
        self.max_ms = max(self.max_ms, max_ms)


def count(slo: Slo, step: str, failed: bool, ms: float | None, into: Counts) -> None:
    """Count one request's outcome at one objective (`ms` None: it never got that far)."""
    objective = slo.objective(step)
    if objective is None and step != WHOLE:  # the whole answer is always counted (promote_after)
        return
    slow = objective is not None and objective.latency_ms is not None and (ms is None or ms > objective.latency_ms)
    into.add(1, int(failed), int(slow and not failed), ms or 0.0)


@dataclass
class Verdict:
    action: str  # "rollback", "promote" or "" (not yet)
    reason: str


def judge(slo: Slo, totals: dict[str, Counts], since_start: int) -> Verdict:
    """Whether the canary with `totals` over the window (by objective step) broke `slo`
    (roll it back), met it over `promote_after` requests since it began (promote it), or
    neither yet."""
    for objective in slo.objectives:
        got = totals.get(objective.step)
        if got is None or got.requests < slo.min_requests:
            continue
        n = got.requests
        if objective.error_rate is not None and got.errors / n > objective.error_rate:
            return Verdict("rollback", f"{objective.describe()}: {got.errors} of {n} requests failed "
                                       f"({got.errors / n:.0%}), above the SLO's error_rate {objective.error_rate:g}")
        if objective.latency_ms is not None:
            allowed = 1.0 - objective.quantile
            if got.slow / n > allowed + 1e-9:
                q = round(objective.quantile * 100)
                return Verdict("rollback", f"{objective.describe()}: {got.slow} of {n} requests took longer than "
                                           f"{objective.latency_ms:g} ms ({got.slow / n:.0%}; the slowest "
                                           f"{got.max_ms:.0f} ms), so its p{q} is above the SLO's "
                                           f"p{q}_ms {objective.latency_ms:g}")
    whole = totals.get(WHOLE, Counts())
    if slo.promote_after and since_start >= slo.promote_after and whole.requests >= slo.min_requests:
        return Verdict("promote", f"met every objective of its SLO over {since_start} requests")
    return Verdict("", "")


@dataclass
class Window:
    """Reports of one version summed over the last `window_s` seconds."""

    clock: Callable[[], float] = time.monotonic
    entries: collections.deque[tuple[float, str, Counts]] = field(default_factory=collections.deque)
    total_requests: int = 0  # since this window began (the canary's start)

    def add(self, step: str, counts: Counts) -> None:
        now = self.clock()
        self.entries.append((now, step, counts))
        if step == WHOLE:
            self.total_requests += counts.requests
        while self.entries and self.entries[0][0] < now - MAX_WINDOW_S:  # bounded whoever judges
            self.entries.popleft()

    def totals(self, window_s: float) -> dict[str, Counts]:
        cut = self.clock() - window_s
        while self.entries and self.entries[0][0] < cut:
            self.entries.popleft()
        out: dict[str, Counts] = {}
        for _, step, c in self.entries:
            out.setdefault(step, Counts()).add(c.requests, c.errors, c.slow, c.max_ms)
        return out


__all__ = ["Counts", "Objective", "Slo", "Verdict", "Window", "count", "judge", "parse_slo"]
