"""``dsr1 plugins list`` and ``dsr1 plugins new``.

``list`` is a diagnostic: it imports each installed plugin in isolation (a fresh
registry per plugin) to learn its status, and a plugin that raises is reported, never
fatal. ``--no-load`` lists from metadata alone. Under an allow-list (``DSR1_PLUGINS``) a
plugin it does not allow is listed as "not allowed" from metadata and never imported.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dsr1 import __version__
from dsr1.errors import Dsr1Error
from dsr1.hookspecs import FAMILIES
from dsr1.registry import EntryPointInfo, PluginRegistry


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("plugins", help="list installed plugins or scaffold a new one")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    ls = actions.add_parser("list", help="every family, name, distribution, version and status")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.add_argument("--no-load", action="store_true", help="list from metadata alone (import nothing)")
    ls.add_argument("--family", choices=FAMILIES, help="only this family")
    ls.set_defaults(func=run_list)

    new = actions.add_parser("new", help="write a complete installable plugin package from a template")
    new.add_argument("--family", required=True, help=f"one of: {', '.join(_scaffold_families())}")
    new.add_argument("--name", required=True, help="the name users will write in config")
    new.add_argument("--dir", required=True, type=Path, help="directory to create")
    new.set_defaults(func=run_new)


def _scaffold_families() -> list[str]:
    """The families ``new`` has a template for (the SDK's list; empty without the SDK)."""
    try:
        from dsr1_sdk.scaffold import SCAFFOLD_FAMILIES
    except ModuleNotFoundError:
        return []
    return list(SCAFFOLD_FAMILIES)


def _row(info: EntryPointInfo) -> dict[str, Any]:
    return {"family": info.family, "name": info.name, "distribution": info.distribution, "version": info.version,
            "entry_point": info.value}


def plugin_status(info: EntryPointInfo, allowlist: frozenset[str] | None = None) -> dict[str, Any]:
    """Load one plugin with a fresh registry (under ``allowlist``); report ok / broken / unavailable."""
    row = _row(info)
    registry = PluginRegistry(allowlist=allowlist)
    try:
        spec = registry.load(info.family, info.name)
    except Dsr1Error as err:
        return {**row, "status": "broken", "reason": str(err)}
    except Exception as err:  # noqa: BLE001 - a diagnostic must survive any plugin failure
        return {**row, "status": "broken", "reason": f"{type(err).__name__}: {err}"}
    row.update(
        api_version=spec.api_version,
        capabilities=sorted(spec.capabilities),
        description=spec.description,
        status="ok",
        reason="",
    )
    if info.family == "device":
        try:
            probe = spec.make().probe()
        except Exception as err:  # noqa: BLE001 - a probe that raises is a broken plugin
            return {**row, "status": "broken", "reason": f"probe() raised {type(err).__name__}: {err}"}
        if not probe.available:
            row.update(status="unavailable", reason=probe.reason)
    return row


def collect(no_load: bool, family: str | None = None) -> list[dict[str, Any]]:
    registry = PluginRegistry.from_env()
    rows: list[dict[str, Any]] = []
    for info in registry.discover(family):
        if not registry.allows(info):  # decided from metadata: its code is never run
            rows.append({**_row(info), "status": "not allowed",
                         "reason": f"not in DSR1_PLUGINS ({registry.describe_allowlist()}); not imported"})
        elif no_load:
            rows.append({**_row(info), "status": "not loaded", "reason": ""})
        else:
            rows.append(plugin_status(info, registry.allowlist))
    return rows


def run_list(args: argparse.Namespace) -> int:
    rows = collect(args.no_load, args.family)
    families = [args.family] if args.family else list(FAMILIES)
    if args.json:
        print(json.dumps({"dsr1_version": __version__, "families": families, "plugins": rows}, indent=2))
        return 0
    widths = {"family": 10, "name": 12, "distribution": 24, "version": 8}
    header = "".join(k.upper().ljust(w + 2) for k, w in widths.items()) + "STATUS"
    print(header)
    for family in families:
        mine = [r for r in rows if r["family"] == family]
        if not mine:
            print(f"{family.ljust(widths['family'] + 2)}(none installed)")
        for r in mine:
            status = r["status"] + (f": {r['reason']}" if r["reason"] else "")
            print("".join(str(r[k]).ljust(w + 2) for k, w in widths.items()) + status)
    return 0


def run_new(args: argparse.Namespace) -> int:
    try:
        from dsr1_sdk.scaffold import new_plugin
    except ModuleNotFoundError:
        raise Dsr1Error("`dsr1 plugins new` needs the plugin SDK; `pip install dsr1-sdk`") from None
    dist = f"dsr1-{args.family}-{args.name}"
    for row in collect(no_load=True, family=args.family):  # installing it would shadow or replace that one
        if row["name"] == args.name or str(row["distribution"]).lower() == dist:
            raise Dsr1Error(f"{args.family} plugin {args.name!r} is already installed (distribution "
                            f"{row['distribution']}): a package named {dist} would replace or shadow it; pick "
                            f"another --name")
    path = new_plugin(args.family, args.name, args.dir)
    print(f"wrote plugin package dsr1-{args.family}-{args.name} to {path}")
    print(f"next: pip install -e '{path}[test]' && pytest {path}")
    return 0
