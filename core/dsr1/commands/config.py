"""``dsr1 config check FILE``: validate a config and print what every setting resolved to."""
from __future__ import annotations

import argparse
import json
from typing import Any

from dsr1.config import load_config
from dsr1.registry import PluginRegistry


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("config", help="validate configs")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="validate FILE and print what each setting resolved to here")
    check.add_argument("file", help="YAML, TOML or JSON engine config")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.add_argument("--model", help="a checkpoint (name or path): also print the pool's placement plan for it")
    check.set_defaults(func=run_check)


def resolve_report(config_path: str, model: str | None = None) -> dict[str, Any]:
    config = load_config(config_path)
    pipeline = PluginRegistry.from_env().resolve(config)
    report: dict[str, Any] = {"config": json.loads(config.to_json()), "resolved": pipeline.describe()}
    plan_checkpoint = getattr(pipeline.pool, "plan_checkpoint", None)
    model_dir = None
    if model is not None:  # found (or refused in one line) whatever the pool: the plan is for this model
        from dsr1.models.loading import resolve_model_dir

        model_dir = resolve_model_dir(model, download=False)
    if model_dir is not None and callable(plan_checkpoint):  # a pool that plans (tiered): its plan for this model
        plan = plan_checkpoint(model_dir, pipeline.device)
        report["pool_plan"] = plan.as_dict()
        report["pool_plan_text"] = plan.table()
    elif model is not None:
        report["pool_plan"] = None  # the pool places everything on the device (single)
    probe = pipeline.device.probe()
    report["resolved"]["device"]["available"] = probe.available
    report["resolved"]["device"]["reason"] = probe.reason
    hw = config.hardware
    if hw is not None:
        report["hardware"] = {
            "type": f"{hw.type} -> device {hw.device!r}",
            "precision": f"{hw.precision} -> quant {hw.precision!r}" if hw.precision else "checkpoint dtype",
            "kernel_fusion": (f"graph {report['resolved']['graph']['name']!r}" if hw.optimizer.kernel_fusion
                              else "off (graph 'eager')"),
            "tiling_strategy": hw.optimizer.tiling_strategy,
        }
    return report


def run_check(args: argparse.Namespace) -> int:
    report = resolve_report(args.file, args.model)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(f"{args.file}: valid")
    for family, entry in report["resolved"].items():
        name = entry.get("name") or "off"
        where = f" ({entry['distribution']} {entry['version']})" if "distribution" in entry else ""
        options = f" options={entry['options']}" if entry.get("options") else ""
        extra = ""
        if family == "device":
            extra = "  available" if entry["available"] else f"  NOT AVAILABLE HERE: {entry['reason']}"
            if "auto" in entry:
                extra += f"  (auto: {entry['auto']['reason']})"
        print(f"  {family:<11} {name}{where}{options}{extra}")
        for rejected, why in entry.get("auto", {}).get("rejected", {}).items():
            print(f"  {'':<11} auto rejected {rejected}: {why}")
    for key, value in report.get("hardware", {}).items():
        print(f"  hardware.{key}: {value}")
    if "pool_plan_text" in report:
        print(report["pool_plan_text"])
    elif "pool_plan" in report:
        print(f"  pool {report['resolved']['pool']['name']}: every weight on the device")
    return 0
