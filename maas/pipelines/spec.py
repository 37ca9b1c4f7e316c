"""A pipeline's YAML, parsed and checked, with errors that name the line.

    description: answer from the docs
    output: safe                 # the step whose output is the answer (default: the last)
    steps:
      - name: docs
        kind: retrieve
        index: project-docs
        input: input.text        # the caller's last user message
        k: 3
        timeout_ms: 80           # this step's share of the caller's deadline
        on_error: skip           # fail (default) | skip | fallback (with `fallback: VALUE`)
      - name: prompt
        kind: template
        template: "Context: {% for d in steps.docs or [] %}{{ d.text }} {% endfor %}\\n{{ input.text }}"
      - name: answer
        kind: generate
        model: demo
        input: steps.prompt
        max_tokens: 128
      - name: safe
        kind: guard
        input: steps.answer
        block: [password]

A reference is `input.text`, `input.messages` or `steps.NAME`; a template's references are
found in its text (`steps.NAME`). Checked here: the YAML's shape, unknown step kinds and
fields, missing or duplicate names, references to steps that do not exist, cycles, retries
on a step that does not declare itself idempotent, and a stream read by a step that
would stop it (only a guard, a switch case or the pipeline's output may read a generate
step's stream). Whether the models and indexes exist is asked of `known` callbacks, since
only a registry knows.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from maas.mesh.errors import InvalidArgument
from maas.pipelines.slo import Slo, parse_slo

KINDS = ("generate", "embed", "retrieve", "template", "plugin", "switch", "parallel", "guard")
ON_ERROR = ("fail", "skip", "fallback")
INPUTS = ("input.text", "input.messages")
COMMON = {"name", "kind", "input", "timeout_ms", "on_error", "fallback", "idempotent", "retries", "description"}
FIELDS: dict[str, set[str]] = {
    "generate": {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "system"},
    "embed": {"model"},
    "retrieve": {"index", "k"},
    "template": {"template", "template_file"},
    "plugin": {"plugin", "config", "stream"},
    "switch": {"cases", "default"},
    "parallel": {"steps"},
    "guard": {"block", "action", "case_sensitive", "replacement"},
}
REQUIRED: dict[str, tuple[str, ...]] = {
    "generate": ("model", "input"), "embed": ("model", "input"), "retrieve": ("index", "input"),
    "template": (), "plugin": ("plugin",), "switch": ("input", "cases"), "parallel": ("steps",),
    "guard": ("input", "block"),
}
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
MAX_STEPS = 200
STEP_REF = re.compile(r"\bsteps\.([A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True)
class Step:
    name: str
    kind: str
    line: int
    input: str = ""                  # a reference, or "" (template, parallel, a plugin without input)
    timeout_ms: int = 0              # 0: only the caller's deadline bounds it
    on_error: str = "fail"
    fallback: Any = None
    idempotent: bool = False
    retries: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # the kind's own fields

    @property
    def streams(self) -> bool:
        """Its output is a stream of text chunks (a generate step, unless stream: false; a
        plugin with stream: true)."""
        if self.kind == "plugin":
            return self.options.get("stream") is True
        return self.kind == "generate" and bool(self.options.get("stream", True))

    @property
    def filters_streams(self) -> bool:
        """It may read a stream without stopping it: a guard, or a streaming plugin."""
        return self.kind == "guard" or (self.kind == "plugin" and self.options.get("stream") is True)

    def reads(self) -> list[str]:
        """The steps whose output this step needs before it starts (a switch's cases are
        started only when chosen, so they are not among them)."""
        refs = [self.input] if self.input.startswith("steps.") else []
        names = [r.removeprefix("steps.") for r in refs]
        if self.kind == "template" and isinstance(self.options.get("template"), str):
            names += STEP_REF.findall(self.options["template"])
        if self.kind == "parallel":
            names += [str(s) for s in self.options.get("steps", [])]
        return list(dict.fromkeys(names))

    def branches(self) -> list[str]:
        if self.kind != "switch":
            return []
        cases = list(dict(self.options.get("cases", {})).values())
        default = self.options.get("default")
        return [str(c) for c in [*cases, *([default] if default else [])]]


@dataclass(frozen=True)
class PipelineSpec:
    steps: dict[str, Step]  # in file order
    output: str
    description: str = ""
    slo: Slo | None = None  # what a canary of it is held to (maas.pipelines.slo)
    capture: float = 0.0    # the share of its owner's requests captured for replay (0: none)

    @property
    def streams(self) -> bool:
        """The answer streams: the output step streams, or guards a stream."""
        return self._streams(self.output)

    def _streams(self, name: str) -> bool:
        step = self.steps[name]
        if step.streams:
            return True
        if step.kind == "guard" and step.input.startswith("steps."):
            return self._streams(step.input.removeprefix("steps."))
        if step.kind == "switch":
            return any(self._streams(b) for b in step.branches())
        return False


class SpecErrors(InvalidArgument):
    """Every problem found, one per line, each with its line number."""

    def __init__(self, problems: list[tuple[int, str]], source: str = "pipeline") -> None:
        self.problems = sorted(problems)
        lines = [f"{source}:{line}: {text}" if line else f"{source}: {text}" for line, text in self.problems]
        super().__init__("\n".join(lines), field="pipeline")


def parse(text: str, *, source: str = "pipeline.yaml",
          known_model: Callable[[str], bool] | None = None,
          known_index: Callable[[str], bool] | None = None,
          files: dict[str, bytes] | None = None) -> PipelineSpec:
    """The checked spec of a pipeline's YAML, or SpecErrors listing every problem. `files`:
    the other files of its package (what `template_file` names), None for the YAML alone."""
    problems: list[tuple[int, str]] = []
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise SpecErrors([(mark.line + 1 if mark else 0, f"not valid YAML: {getattr(exc, 'problem', exc)}")],
                         source) from None
    if not isinstance(root, yaml.MappingNode):
        raise SpecErrors([(1, "a pipeline is a mapping with a `steps` list")], source)
    alias = _first_alias(root)
    if alias is not None:  # shared nodes can expand exponentially; a pipeline never needs them
        raise SpecErrors([(_line(alias), "YAML anchors and aliases (&name, *name) are not allowed in a pipeline")],
                         source)
    top = _mapping(root)
    for key, (knode, _) in top.items():
        if key not in ("steps", "output", "description", "version", "slo", "capture"):
            problems.append((_line(knode), f"unknown top-level field {key!r} (expected steps, output, description, "
                                           "slo, capture)"))
    steps_node = top.get("steps", (None, None))[1]
    if not isinstance(steps_node, yaml.SequenceNode) or not steps_node.value:
        raise SpecErrors([*problems, (_line(steps_node) if steps_node else 1, "`steps` must be a non-empty list")],
                         source)
    if len(steps_node.value) > MAX_STEPS:
        raise SpecErrors([(_line(steps_node), f"a pipeline has at most {MAX_STEPS} steps, "
                                              f"not {len(steps_node.value)}")], source)
    steps: dict[str, Step] = {}
    for node in steps_node.value:
        step = _step(node, problems, files)
        if step is None:
            continue
        if step.name in steps:
            problems.append((step.line, f"step {step.name!r} is defined twice (first on line {steps[step.name].line})"))
            continue
        steps[step.name] = step
    output_node = top.get("output", (None, None))[1]
    output = str(_construct(output_node)) if output_node is not None else (list(steps)[-1] if steps else "")
    if output and output not in steps:
        problems.append((_line(output_node) if output_node else 1, f"output names step {output!r}, which does not exist"))
    _check_references(steps, problems, known_model, known_index)
    if not problems:
        _check_cycles(steps, problems)
    if not problems:
        _check_streams(steps, output, problems)
    if problems:
        raise SpecErrors(problems, source)
    slo = None
    if "slo" in top:
        slo = parse_slo(_construct(top["slo"][1]), _line(top["slo"][0]), problems, steps)
    capture = 0.0
    if "capture" in top:
        capture = _capture(_construct(top["capture"][1]), _line(top["capture"][0]), problems)
    if problems:
        raise SpecErrors(problems, source)
    description = str(_construct(top["description"][1])) if "description" in top else ""
    return PipelineSpec(steps=steps, output=output, description=description, slo=slo, capture=capture)


def _capture(raw: Any, line: int, problems: list[tuple[int, str]]) -> float:
    """`capture: {rate: R}`: the share (0 < R <= 1) of requests captured for replay."""
    rate = raw.get("rate") if isinstance(raw, dict) and set(raw) == {"rate"} else None
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate <= 1:
        problems.append((line, f"capture must be {{rate: R}} with 0 < R <= 1 (the share of requests captured "
                               f"for `maas pipeline replay`), not {raw!r}"))
        return 0.0
    return float(rate)


def _first_alias(root: yaml.Node) -> yaml.Node | None:
    """A node reached twice (what an alias makes), if any."""
    seen: set[int] = set()
    todo = [root]
    while todo:
        node = todo.pop()
        if id(node) in seen:
            return node
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            todo.extend(n for pair in node.value for n in pair)
        elif isinstance(node, yaml.SequenceNode):
            todo.extend(node.value)
    return None


def _line(node: yaml.Node | None) -> int:
    return node.start_mark.line + 1 if node is not None else 0


def _mapping(node: yaml.MappingNode) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    return {str(k.value): (k, v) for k, v in node.value}


def _construct(node: yaml.Node) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


def _step(node: yaml.Node, problems: list[tuple[int, str]], files: dict[str, bytes] | None = None) -> Step | None:
    line = _line(node)
    if not isinstance(node, yaml.MappingNode):
        problems.append((line, "each step is a mapping with at least `name` and `kind`"))
        return None
    fields = _mapping(node)
    raw = {key: _construct(v) for key, (_, v) in fields.items()}
    name, kind = raw.get("name"), raw.get("kind")
    if not isinstance(name, str) or not NAME.match(name):
        problems.append((line, f"a step needs a `name` of letters, digits and _ (got {name!r})"))
        return None
    where = f"step {name!r}"
    if kind not in KINDS:
        problems.append((_line(fields["kind"][1]) if "kind" in fields else line,
                         f"{where}: unknown kind {kind!r} (expected one of {', '.join(KINDS)})"))
        return None
    allowed = COMMON | FIELDS[kind]
    for key, (knode, _) in fields.items():
        if key not in allowed:
            problems.append((_line(knode), f"{where}: unknown field {key!r} for a {kind} step "
                                           f"(expected {', '.join(sorted(allowed - {'name', 'kind'}))})"))
    for key in REQUIRED[kind]:
        if raw.get(key) in (None, "", [], {}):
            problems.append((line, f"{where}: a {kind} step needs `{key}`"))
    ref = raw.get("input", "")
    if ref and (not isinstance(ref, str) or not (ref in INPUTS or ref.startswith("steps."))):
        problems.append((_line(fields["input"][1]), f"{where}: input must be input.text, input.messages or "
                                                    f"steps.NAME, not {ref!r}"))
        ref = ""
    timeout = raw.get("timeout_ms", 0)
    if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 0:
        problems.append((_line(fields["timeout_ms"][1]), f"{where}: timeout_ms must be a whole number of "
                                                         f"milliseconds >= 0, not {timeout!r}"))
        timeout = 0
    on_error = raw.get("on_error", "fail")
    if on_error not in ON_ERROR:
        problems.append((_line(fields["on_error"][1]), f"{where}: on_error must be one of {', '.join(ON_ERROR)}, "
                                                       f"not {on_error!r}"))
        on_error = "fail"
    if on_error == "fallback" and "fallback" not in raw:
        problems.append((_line(fields["on_error"][1]), f"{where}: on_error: fallback needs a `fallback` value"))
    retries, idempotent = raw.get("retries", 0), raw.get("idempotent", False)
    if not isinstance(retries, int) or isinstance(retries, bool) or not 0 <= retries <= 5:
        problems.append((_line(fields["retries"][1]), f"{where}: retries must be between 0 and 5, not {retries!r}"))
        retries = 0
    if retries and idempotent is not True:
        problems.append((_line(fields["retries"][1]), f"{where}: retries need `idempotent: true` (a step that is "
                                                      "not idempotent is never retried)"))
    options = {k: v for k, v in raw.items() if k in FIELDS[kind]}
    if kind == "template":
        problems.extend((line, f"{where}: {p}") for p in _template_source(options, files))
    problems.extend((line, f"{where}: {p}") for p in _kind_problems(kind, options))
    return Step(name=name, kind=kind, line=line, input=ref or "", timeout_ms=timeout, on_error=on_error,
                fallback=raw.get("fallback"), idempotent=idempotent is True, retries=retries, options=options)


def _template_source(o: dict[str, Any], files: dict[str, bytes] | None) -> list[str]:
    """A template step's text: `template`, or the package file `template_file` names (read
    into `template` here, so the rest of the pipeline sees one kind of template step)."""
    given = [k for k in ("template", "template_file") if o.get(k) not in (None, "")]
    if len(given) != 1:
        return ["a template step needs `template` (the text) or `template_file` (a file of its package), "
                "one of them"]
    if given[0] == "template":
        return []
    name = str(o["template_file"]).removeprefix("./")
    if files is None:
        return [f"template_file {name!r} needs the pipeline pushed as a directory holding it"]
    if name not in files:
        return [f"template_file {name!r} is not in the pipeline's package"]
    try:
        o["template"] = files[name].decode("utf-8")
    except UnicodeDecodeError:
        return [f"template_file {name!r} is not UTF-8 text"]
    return []


def _kind_problems(kind: str, o: dict[str, Any]) -> list[str]:
    problems = []
    if kind == "template":
        if not isinstance(o.get("template", ""), str):
            problems.append("template must be a string")
        else:
            try:
                from maas.pipelines.executor import compile_template

                compile_template(o.get("template", ""))
            except Exception as exc:  # jinja's TemplateSyntaxError, with the template's own line
                problems.append(f"the template does not compile: {exc}")
    if kind == "guard":
        block = o.get("block")
        if not isinstance(block, list) or not block or not all(isinstance(b, str) and b for b in block):
            problems.append("block must be a list of non-empty phrases")
        if o.get("action", "stop") not in ("stop", "redact"):
            problems.append(f"action must be stop or redact, not {o.get('action')!r}")
        elif not problems:
            from maas.pipelines.guard import PhraseGuard

            try:
                PhraseGuard(block, action=str(o.get("action", "stop")),  # type: ignore[arg-type]
                            case_sensitive=bool(o.get("case_sensitive", False)),
                            replacement=str(o.get("replacement", "[redacted]")))
            except ValueError as exc:
                problems.append(str(exc))
    if kind == "switch":
        if not isinstance(o.get("cases", {}), dict):
            problems.append("cases must map values to step names")
    if kind == "parallel" and not (isinstance(o.get("steps"), list) and o["steps"]):
        problems.append("steps must be a non-empty list of step names")
    if kind == "retrieve" and not (isinstance(o.get("k", 4), int) and 1 <= o.get("k", 4) <= 100):
        problems.append(f"k must be between 1 and 100, not {o.get('k')!r}")
    if kind == "generate" and not (isinstance(o.get("max_tokens", 256), int) and o.get("max_tokens", 256) > 0):
        problems.append(f"max_tokens must be > 0, not {o.get('max_tokens')!r}")
    if kind == "plugin" and o.get("stream", False) not in (True, False):
        problems.append(f"stream must be true or false, not {o.get('stream')!r}")
    if kind == "plugin" and not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", str(o.get("plugin", ""))):
        problems.append(f"plugin must be MODULE:CLASS (a module in the pipeline's package), not {o.get('plugin')!r}")
    return problems


def _check_references(steps: dict[str, Step], problems: list[tuple[int, str]],
                      known_model: Callable[[str], bool] | None, known_index: Callable[[str], bool] | None) -> None:
    for step in steps.values():
        for name in [*step.reads(), *step.branches()]:
            if name not in steps:
                problems.append((step.line, f"step {step.name!r} reads steps.{name}, which does not exist"))
            elif name == step.name:
                problems.append((step.line, f"step {step.name!r} reads itself"))
        model = step.options.get("model")
        if known_model is not None and model and not known_model(str(model)):
            problems.append((step.line, f"step {step.name!r}: model {model!r} does not exist"))
        index = step.options.get("index")
        if known_index is not None and index and not known_index(str(index)):
            problems.append((step.line, f"step {step.name!r}: index {index!r} does not exist"))


def _check_cycles(steps: dict[str, Step], problems: list[tuple[int, str]]) -> None:
    """Depth-first, with an explicit stack (a long chain of steps must not hit Python's
    recursion limit)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in steps:
        if start in state:
            continue
        path: list[str] = [start]
        state[start] = 1
        stack = [iter([*steps[start].reads(), *steps[start].branches()])]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
                continue
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                problems.append((steps[nxt].line, f"cycle: {' -> '.join(cycle)}"))
                return
            if nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter([*steps[nxt].reads(), *steps[nxt].branches()]))


def _check_streams(steps: dict[str, Step], output: str, problems: list[tuple[int, str]]) -> None:
    spec = PipelineSpec(steps=steps, output=output)
    for step in steps.values():
        for name in step.reads():
            if spec._streams(name) and not step.filters_streams:
                problems.append((step.line, f"step {step.name!r} ({step.kind}) reads the stream of step {name!r}, "
                                            "which would stop it; only a guard, a plugin with stream: true or the "
                                            "pipeline's output can read a stream (set stream: false on the generate "
                                            "step to collect it first)"))


__all__ = ["KINDS", "PipelineSpec", "SpecErrors", "Step", "parse"]
