"""Import a plugin in a clean subprocess and report what that started.

Run as ``python -m dsr1_sdk.testing.isolation FAMILY NAME [OPTIONS_JSON] [--probe]``; prints
one JSON object (``--zygote``: read such argument lists as JSON lines, answer each from a fork). The conformance kit uses :func:`import_report` to check that importing
(and registering) a plugin starts no device runtime: CUDA stays uninitialized and no
vendor extension (``torch_mlu``, ``torch_npu`` ...) is imported unless the plugin is that
device. With ``--probe`` a device plugin is also instantiated and probed.
"""
from __future__ import annotations

import atexit
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
    """Run :func:`main` in a fresh process with this interpreter and ``sys.path``; cached per session.

    Without ``probe`` the options play no part (the plugin is only imported), so any report of the
    same plugin answers. Each report comes from a child forked off a helper that has imported torch
    and nothing else: starting Python and importing torch once per session instead of per plugin.
    """
    options_json = json.dumps(options or {}, sort_keys=True)
    if not probe:
        for (f, n, _, _), report in _CACHE.items():
            if (f, n) == (family, name):
                return report
    key = (family, name, options_json, probe)
    if key in _CACHE:
        return _CACHE[key]
    args = [family, name, options_json] + (["--probe"] if probe else [])
    rc, out, err = _run(args)
    if rc != 0:
        tail = (err or out).strip().splitlines()[-5:]
        raise AssertionError(f"importing {family} plugin {name!r} in a subprocess failed: " + " | ".join(tail))
    report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    _CACHE[key] = report
    return report


_ZYGOTE: subprocess.Popen[str] | None = None
_ZYGOTE_ENV: dict[str, str] = {}


def _run(args: list[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``main(args)`` in a fresh process."""
    global _ZYGOTE
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}  # changes with every test
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    if not hasattr(os, "fork"):  # no fork (Windows): a whole interpreter per report
        proc = subprocess.run([sys.executable, "-m", "dsr1_sdk.testing.isolation", *args], capture_output=True,
                              text=True, env=env, timeout=300, check=False)
        return proc.returncode, proc.stdout, proc.stderr
    if _ZYGOTE is not None and (_ZYGOTE.poll() is not None or env != _ZYGOTE_ENV):  # a test changed the path or env
        _stop_zygote()
    if _ZYGOTE is None:
        if not _ZYGOTE_ENV:
            atexit.register(_stop_zygote)
        _ZYGOTE_ENV.clear()
        _ZYGOTE_ENV.update(env)
        _ZYGOTE = subprocess.Popen([sys.executable, "-m", "dsr1_sdk.testing.isolation", "--zygote"], text=True,
                                   env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert _ZYGOTE.stdin is not None and _ZYGOTE.stdout is not None
    _ZYGOTE.stdin.write(json.dumps(args) + "\n")
    _ZYGOTE.stdin.flush()
    line = _ZYGOTE.stdout.readline()
    if not line:
        return 1, "", f"the isolation helper exited with {_ZYGOTE.wait()}"
    rc, out, err = json.loads(line)
    return int(rc), str(out), str(err)


def _stop_zygote() -> None:
    global _ZYGOTE
    if _ZYGOTE is None:
        return
    for pipe in (_ZYGOTE.stdin, _ZYGOTE.stdout):
        if pipe is not None:
            pipe.close()  # its stdin at EOF: the helper leaves its loop
    _ZYGOTE.wait(30)
    _ZYGOTE = None


def _zygote() -> int:
    """Import torch (it starts no device runtime by itself), then fork one child per request line."""
    import tempfile

    import torch  # noqa: F401 - the cost every report would otherwise pay again

    for line in sys.stdin:
        args = json.loads(line)
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            pid = os.fork()
            if pid == 0:  # the child: its own modules from here on; the helper's stay as they were
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                code = 1
                try:
                    code = main(args)
                except BaseException:  # noqa: BLE001 - reported through stderr and the exit status
                    import traceback

                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            out.seek(0)
            err.seek(0)
            print(json.dumps([os.waitstatus_to_exitcode(status), out.read(), err.read()]), flush=True)
    return 0


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
    raise SystemExit(_zygote() if sys.argv[1:] == ["--zygote"] else main(sys.argv[1:]))
