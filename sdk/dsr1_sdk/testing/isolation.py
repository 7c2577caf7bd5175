"""Import a plugin in a clean subprocess and report what that started.

Run as ``python -m dsr1_sdk.testing.isolation FAMILY NAME [OPTIONS_JSON] [--probe]``; prints
one JSON object. The conformance kit uses :func:`import_report` to check that importing
(and registering) a plugin starts no device runtime: CUDA stays uninitialized and no
vendor extension (``torch_mlu``, ``torch_npu`` ...) is imported unless the plugin is that
device. With ``--probe`` a device plugin is also instantiated and probed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

#: Vendor runtime modules → the torch device type they belong to.
RUNTIME_MODULES: dict[str, str] = {
    "torch_mlu": "mlu",
    "torch_npu": "npu",
    "torch_musa": "musa",
    "intel_extension_for_pytorch": "xpu",
    "habana_frameworks": "hpu",
}

_CACHE: dict[tuple[str, str, str, bool], dict[str, Any]] = {}


def _state() -> dict[str, Any]:
    torch = sys.modules.get("torch")
    cuda_init = False
    if torch is not None:
        cuda_init = bool(torch.cuda.is_initialized())
    return {
        "runtime_modules": sorted(m for m in RUNTIME_MODULES if m in sys.modules),
        "cuda_initialized": cuda_init,
        "torch_imported": torch is not None,
    }


def main(argv: list[str]) -> int:
    """Entry point of the subprocess: load one plugin, print what happened as JSON."""
    probe = "--probe" in argv
    args = [a for a in argv if a != "--probe"]
    family, name = args[0], args[1]
    options = json.loads(args[2]) if len(args) > 2 else {}
    from dsr1.registry import PluginRegistry

    report: dict[str, Any] = {}
    spec = PluginRegistry().load(family, name)
    report["after_import"] = _state()
    report["device_type"] = getattr(spec.impl, "torch_device_type", None)
    if probe:
        result = spec.make(options).probe()
        report["probe"] = {"available": result.available, "reason": result.reason}
        report["after_probe"] = _state()
    print(json.dumps(report))
    return 0


def import_report(family: str, name: str, options: dict[str, Any] | None = None, probe: bool = False) -> dict[str, Any]:
    """Run :func:`main` in a subprocess with this interpreter and ``sys.path``; cached per session."""
    options_json = json.dumps(options or {}, sort_keys=True)
    key = (family, name, options_json, probe)
    if key in _CACHE:
        return _CACHE[key]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    cmd = [sys.executable, "-m", "dsr1_sdk.testing.isolation", family, name, options_json]
    if probe:
        cmd.append("--probe")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise AssertionError(f"importing {family} plugin {name!r} in a subprocess failed: " + " | ".join(tail))
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    _CACHE[key] = report
    return report


def runtime_problems(state: dict[str, Any], own_device: str | None, when: str, allow_own: bool = False) -> list[str]:
    """Human-readable problems in one :func:`_state` snapshot (empty: clean).

    A runtime of another device is always a problem; the plugin's own (``own_device``)
    only when ``allow_own`` is false (at import, or when probing found no device).
    """
    problems = []
    if state["cuda_initialized"] and not (allow_own and own_device == "cuda"):
        problems.append(f"{when} initialized CUDA (torch.cuda.is_initialized() is True)")
    for module in state["runtime_modules"]:
        if RUNTIME_MODULES[module] != own_device:  # importing its own extension is the plugin's right
            problems.append(f"{when} imported the {RUNTIME_MODULES[module]} runtime {module!r}")
    return problems


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
