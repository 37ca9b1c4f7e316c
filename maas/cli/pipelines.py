"""`maas pipeline validate FILE`: check a pipeline's YAML offline, every problem with its line.

Registering, deploying and serving pipelines are not built yet (docs/pipelines.md says
what is); this command needs no running stack.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="pipelines: check a pipeline's YAML (validate)")
    psub = p.add_subparsers(dest="pipeline_command", required=True)
    validate = psub.add_parser("validate", help="check a pipeline file; errors name their line")
    validate.add_argument("file", type=Path)


def run(ns: argparse.Namespace) -> int:
    from maas.pipelines.spec import SpecErrors, parse

    try:
        text = ns.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"cannot read {ns.file}: {exc}", file=sys.stderr)
        return 2
    try:
        spec = parse(text, source=str(ns.file))
    except SpecErrors as e:
        print(e.message, file=sys.stderr)
        print(f"{len(e.problems)} problem{'s' if len(e.problems) != 1 else ''} in {ns.file}", file=sys.stderr)
        return 2
    kinds = ", ".join(f"{s.name} ({s.kind})" for s in spec.steps.values())
    print(f"{ns.file}: {len(spec.steps)} steps: {kinds}; output {spec.output}"
          f"{' (streams)' if spec.streams else ''}")
    return 0
