"""`maas admin`: operator commands (backup and restore of the mesh's durable state)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def add_parser(sub: argparse._SubParsersAction, client_args: Callable[[argparse.ArgumentParser], None]) -> None:
    admin = sub.add_parser("admin", help="operator commands: backup and restore")
    asub = admin.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    backup = asub.add_parser("backup", help="write the registry, deployments and artifact manifest to FILE")
    client_args(backup)
    backup.add_argument("file")
    restore = asub.add_parser("restore", help="restore a backup written by `maas admin backup`")
    client_args(restore)
    restore.add_argument("file")


async def run(ns: argparse.Namespace, etcd: str) -> int:
    raise NotImplementedError("maas admin: not built yet")
