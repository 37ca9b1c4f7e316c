"""Names users give things (models, deployments, aliases): one rule for every service."""

from __future__ import annotations

import re

from maas.mesh.errors import InvalidArgument

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


def validate_name(name: str, what: str = "name") -> None:
    if not NAME_RE.match(name):
        raise InvalidArgument(
            f"{what} {name!r} is invalid: use 1-63 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit", field=what)
