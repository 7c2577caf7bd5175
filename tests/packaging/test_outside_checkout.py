"""dsr1 as a pip user gets it: wheels installed into a fresh venv outside the checkout, with only what they declare.

The wheels are the core, the SDK and one plugin per family the default config takes from a plugin
(attention ``sdpa``, device ``cpu``, quant ``float``, pruning ``magnitude``; graph, pool, scheduler,
kvcache, decoding and monitor defaults are builtins of the core). They are built from this checkout
and installed with ``pip --no-index --no-deps``. Their declared requirements, followed through this
environment's metadata, are symlinked into the venv on a ``.pth`` line (:mod:`tests.venvkit`: no
network, torch reused), and nothing else: ensurepip's setuptools is removed too (torch declares one), so
an import of anything undeclared fails here as it would after ``pip install dsr1 ...``. ``pip check`` proves
every declared requirement is present. The commands run with the venv's ``dsr1`` script, in a
directory outside the checkout, with a private ``DSR1_HOME``.

One venv per module (about 30 s to build on 2 cores, most of it the core wheel's 40 MB of bundled
models), so the module is marked slow.
"""
from __future__ import annotations

import json
import os
import subprocess
import venv
import zipfile
from dataclasses import dataclass
from email import message_from_bytes
from email.message import Message
from pathlib import Path

import pytest

from tests.venvkit import REPO, closure_of, link_distributions, normalize, pip, session_wheel

pytestmark = pytest.mark.slow

PLUGINS = ("plugins/attention/sdpa", "plugins/devices/cpu", "plugins/quant/float", "plugins/pruning/magnitude")
#: What the default install must not bring: the `plot` extra, test tools, and what dsr1 used to import undeclared.
NOT_DECLARED = ("matplotlib", "scipy", "pytest", "hypothesis", "transformers", "sentence_transformers", "psutil")
PROMPT = "The Python interpreter"


@dataclass
class Outside:
    """The venv, its wheels, and where commands run."""

    python: Path
    wheels: list[Path]
    work: Path
    env: dict[str, str]


def wheel_metadata(wheel: Path) -> Message:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return message_from_bytes(z.read(name))


def kernel_cache(root: Path) -> str:
    """The venv's own cpu-kernel cache. Not the caller's: torch's ninja build line names torch's include
    directory, which is the venv's ``deps`` symlink here, so a shared cache would be rebuilt for the venv
    and then again for the next test in the checkout's environment. The venv builds its kernel (AVX-512
    CPUs) once, from the source its wheel ships, at its first command."""
    return str(root / "kernels")


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Outside:
    root = tmp_path_factory.mktemp("outside")
    assert REPO not in root.resolve().parents
    wheels = [session_wheel(REPO / src, root / "wheels") for src in (".", "sdk", *PLUGINS)]  # shared with tests/core
    ours = frozenset(normalize(str(wheel_metadata(w)["Name"])) for w in wheels)
    requires = [line for w in wheels for line in wheel_metadata(w).get_all("Requires-Dist") or []]
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    pip(py, "uninstall", "-y", "setuptools")  # ensurepip's (3.11); torch declares the one it needs
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    link_distributions(closure_of(requires, skip=ours), root / "deps")
    (Path(purelib) / "zz_dsr1_declared_deps.pth").write_text(str(root / "deps") + "\n")
    pip(py, "install", "--no-index", "--no-deps", *map(str, wheels))
    work = root / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DSR1_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(PATH=f"{env_dir / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", DSR1_HOME=str(root / "home"),
               DSR1_OFFLINE="1", HF_HUB_OFFLINE="1", TORCH_EXTENSIONS_DIR=kernel_cache(root))
    return Outside(python=py, wheels=wheels, work=work, env=env)


def run(o: Outside, *args: str) -> subprocess.CompletedProcess[str]:
    """``args`` in the venv (``dsr1 ...`` runs the venv's script), from a directory outside the checkout."""
    exe = str(o.python.parent / args[0]) if args[0] == "dsr1" else args[0]
    return subprocess.run([exe, *args[1:]], cwd=o.work, env=o.env, capture_output=True, text=True, check=False)


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    """``proc`` after checking it succeeded without a traceback (an undeclared import shows as one)."""
    tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.args}\n{tail}"
    assert "Traceback" not in proc.stderr and "ModuleNotFoundError" not in proc.stderr, tail
    return proc


def test_only_declared_requirements_are_installed(outside: Outside) -> None:
    ok(run(outside, str(outside.python), "-m", "pip", "check"))  # every declared requirement is present
    probe = "import importlib.util as u, sys; print([m for m in sys.argv[1:] if u.find_spec(m)])"
    found = ok(run(outside, str(outside.python), "-c", probe, *NOT_DECLARED)).stdout.strip()
    assert found == "[]", f"importable without being declared: {found}"
    where = ok(run(outside, str(outside.python), "-c", "import dsr1; print(dsr1.__file__)")).stdout.strip()
    assert REPO not in Path(where).resolve().parents, where


def test_the_core_requires_its_default_attention_and_device(outside: Outside) -> None:
    """``pip install dsr1`` alone must generate: the default config's plugins come with it."""
    core = next(w for w in outside.wheels if normalize(str(wheel_metadata(w)["Name"])) == "dsr1")
    required = {normalize(r.split(">")[0].split(";")[0].strip()) for r in wheel_metadata(core).get_all("Requires-Dist")
                or [] if "extra ==" not in r}
    assert {"dsr1-attention-sdpa", "dsr1-device-cpu"} <= required, sorted(required)


def test_generate(outside: Outside) -> None:
    proc = ok(run(outside, "dsr1", "generate", "--model", "dsr1-tiny", "--max-new-tokens", "8", "--seed", "0", PROMPT))
    assert proc.stdout.startswith(PROMPT) and len(proc.stdout.strip()) > len(PROMPT)


def test_prune_uses_the_shipped_text_and_notes_the_missing_plot(outside: Outside) -> None:
    out = outside.work / "pruned"
    proc = ok(run(outside, "dsr1", "prune", "--model", "dsr1-tiny", "--target-sparsity", "0.3", "--output-dir",
                  str(out), "--no-speed", "--eval-tokens", "256", "--calibration-samples", "4",
                  "--calibration-len", "64"))  # not --quiet: the progress display runs too
    assert (out / "report.json").is_file() and (out / "curve.csv").is_file() and (out / "stage-0.30").is_dir()
    assert not (out / "curve.png").exists()
    notes = [line for line in proc.stderr.splitlines() if "matplotlib" in line]
    assert notes == ["dsr1: note: curve.png needs matplotlib (pip install 'dsr1[plot]'); report.json and "
                     "curve.csv are written"], proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert len(report["stages"]) == 1 and report["dense"]["accuracy"]["perplexity"] > 1


def test_quantize_and_load_back(outside: Outside) -> None:
    out = outside.work / "bf16"
    proc = ok(run(outside, "dsr1", "quantize", "--model", "dsr1-tiny", "--quant", "bf16", "--output-dir", str(out),
                  "--json"))
    assert json.loads(proc.stdout) and (out / "model.safetensors").is_file()
    again = ok(run(outside, "dsr1", "generate", "--model", str(out), "--max-new-tokens", "4", "--seed", "0", PROMPT))
    assert again.stdout.startswith(PROMPT)


def test_plugins_list(outside: Outside) -> None:
    rows = json.loads(ok(run(outside, "dsr1", "plugins", "list", "--json")).stdout)["plugins"]
    status = {(r["family"], r["name"]): (r["status"], r["distribution"]) for r in rows}
    for key, dist in [(("attention", "sdpa"), "dsr1-attention-sdpa"), (("device", "cpu"), "dsr1-device-cpu"),
                      (("quant", "fp32"), "dsr1-quant-float"), (("pruning", "magnitude"), "dsr1-pruning-magnitude"),
                      (("kvcache", "contiguous"), "dsr1"), (("scheduler", "static"), "dsr1")]:
        assert status.get(key) == ("ok", dist), (key, status.get(key))
    assert not [r for r in rows if r["status"] != "ok"], [r for r in rows if r["status"] != "ok"]


def test_sdk_imports_without_test_tools_and_its_kits_say_what_is_missing(outside: Outside) -> None:
    ok(run(outside, str(outside.python), "-c", "import dsr1_sdk, dsr1_sdk.scaffold; print(dsr1_sdk.hookimpl)"))
    proc = run(outside, str(outside.python), "-c", "from dsr1_sdk.testing import AttentionConformance")
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1
    assert last == "ImportError: the dsr1 conformance kits need pytest and hypothesis: pip install 'dsr1-sdk[testing]'"


def test_every_wheel_carries_the_license_and_its_metadata(outside: Outside) -> None:
    license_text = (REPO / "LICENSE").read_bytes()
    for wheel in outside.wheels:
        meta = wheel_metadata(wheel)
        with zipfile.ZipFile(wheel) as z:
            licenses = [n for n in z.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
            assert len(licenses) == 1 and z.read(licenses[0]) == license_text, wheel.name
        assert meta["License-Expression"] == "Apache-2.0", wheel.name
        assert meta["Requires-Python"] == ">=3.10" and meta.get_all("Classifier"), wheel.name
        urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [])
        assert {"Homepage", "Repository", "Documentation", "Issues"} <= set(urls), wheel.name
    sdk = next(wheel_metadata(w) for w in outside.wheels if wheel_metadata(w)["Name"] == "dsr1-sdk")
    runtime = [r for r in sdk.get_all("Requires-Dist") or [] if "extra ==" not in r]
    assert runtime == ["dsr1>=0.1"], runtime
