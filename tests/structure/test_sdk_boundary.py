"""Plugins import only the public SDK (issue 21): ``dsr1_sdk``, torch, the standard library, their own
package and what their ``pyproject.toml`` declares.

The core's module layout (``dsr1.quantization.modules`` ...) is not an API: what plugins share is
re-exported, documented and versioned in ``dsr1_sdk`` (``dsr1_sdk.quant``, ``dsr1_sdk.pruning``,
``dsr1_sdk.layers``). Every import statement counts, function-level ones included: a lazy import
of a core module breaks at its first call instead of at load, which is worse. Checked on every
distribution under ``plugins/`` and on every plugin the scaffold writes.
"""
from __future__ import annotations

import ast
import fnmatch
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10: the same API from PyPI
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
DISTRIBUTIONS = sorted(p.parent for p in REPO.glob("plugins/*/*/pyproject.toml"))

#: what every plugin may import besides the standard library and its own packages.
ALWAYS = frozenset({"dsr1_sdk", "torch"})
#: extras for a plugin's own tests (tests/ is not checked), never for its package code.
TEST_EXTRAS = frozenset({"test", "tests", "testing"})
#: distributions whose import name is not their normalised name (none among the plugins yet).
IMPORT_NAMES: dict[str, str] = {}
#: directories setuptools' ``find`` could match that are not package code (stale build copies, tests).
NOT_PACKAGES = frozenset({"build", "dist", "tests", "test", "docs"})
#: the SDK submodules through which the core's shared code reaches plugins.
SDK_MODULES = ("dsr1_sdk.quant", "dsr1_sdk.pruning", "dsr1_sdk.layers")


def import_name(requirement: str) -> str:
    """``"dsr1-quant-int8>=0.1"`` → ``"dsr1_quant_int8"``; ``"dsr1-sdk[testing]>=0.1"`` → ``"dsr1_sdk"``."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"cannot read a distribution name from the requirement {requirement!r}"
    name = re.sub(r"[-_.]+", "_", match.group(1)).lower()
    return IMPORT_NAMES.get(name, name)


def allowed_dependencies(project: dict[str, Any]) -> set[str]:
    """Import names of ``[project].dependencies`` and of the extras other than the test ones.

    An extra counts: a package may import what an extra declares, where that extra is installed.
    The ones in use are the quant plugins' ``[cuda]`` extras, triton: CUDA builds of torch already
    depend on it, and the plugins import ``dsr1_sdk.kernels.weight_only`` (which imports triton)
    only on their first CUDA call. The cuda device plugin imports no triton.
    """
    requirements = list(project.get("dependencies", []))
    for extra, extra_requirements in project.get("optional-dependencies", {}).items():
        if extra not in TEST_EXTRAS:
            requirements += extra_requirements
    return {import_name(r) for r in requirements}


def package_dirs(dist: Path, pyproject: dict[str, Any]) -> list[Path]:
    """The top-level package directories the distribution declares (``[tool.setuptools]``)."""
    declared = pyproject.get("tool", {}).get("setuptools", {}).get("packages")
    if isinstance(declared, list):
        return sorted({dist / name.split(".")[0] for name in declared})
    assert isinstance(declared, dict) and "find" in declared, (
        f"{dist / 'pyproject.toml'}: declares no [tool.setuptools] packages (a list or packages.find); "
        "this test reads the package directories from there"
    )
    find = declared["find"]
    include, exclude = find.get("include", ["*"]), find.get("exclude", [])
    return [
        path
        for where in find.get("where", ["."])
        for path in sorted((dist / where).iterdir())
        if path.is_dir() and (path / "__init__.py").is_file() and path.name not in NOT_PACKAGES
        and any(fnmatch.fnmatchcase(path.name, p) for p in include)
        and not any(fnmatch.fnmatchcase(path.name, p) for p in exclude)
    ]


def imports(tree: ast.AST) -> Iterator[tuple[int, str, str]]:
    """``(line, top-level name, statement)`` of every absolute import anywhere in ``tree``: ``import``
    and ``from`` statements at any depth, and ``importlib.import_module("x")`` / ``__import__("x")``
    with a literal name. Relative imports are the package's own and are skipped."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.partition(".")[0], ast.unparse(node)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.partition(".")[0], ast.unparse(node)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func, target = node.func, node.args[0].value
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if called in ("import_module", "__import__") and isinstance(target, str) and not target.startswith("."):
                yield node.lineno, target.partition(".")[0], ast.unparse(node)


def violations(dist: Path) -> tuple[list[Path], list[str]]:
    """The modules checked in the distribution at ``dist``, and one line per import it may not make."""
    pyproject = tomllib.loads((dist / "pyproject.toml").read_text(encoding="utf-8"))
    packages = package_dirs(dist, pyproject)
    own = {p.name for p in packages}
    dependencies = allowed_dependencies(pyproject["project"])
    allowed = ALWAYS | own | dependencies
    modules = sorted(m for p in packages for m in p.rglob("*.py"))
    found = []
    for module in modules:
        tree = ast.parse(module.read_text(encoding="utf-8"), filename=str(module))
        for line, name, statement in sorted(imports(tree)):
            if name in allowed or name in sys.stdlib_module_names:
                continue
            hint = ("import it from dsr1_sdk (the root, or dsr1_sdk.quant / .pruning / .layers; export what is "
                    "missing there)" if name == "dsr1" else "declare it in [project].dependencies or an extra")
            found.append(
                f"{module}:{line}: `{statement}` imports {name!r}, which is not dsr1_sdk, torch, the standard "
                f"library, the package's own ({', '.join(sorted(own))}) or a declared dependency "
                f"({', '.join(sorted(dependencies))}): {hint}"
            )
    return modules, found


@pytest.mark.parametrize("dist", DISTRIBUTIONS, ids=lambda d: str(d.relative_to(REPO / "plugins")))
def test_plugin_package_imports_only_the_sdk_torch_stdlib_and_declared_dependencies(dist: Path) -> None:
    modules, found = violations(dist)
    assert modules, f"{dist}: no module found in the packages its pyproject declares"
    assert not found, "\n".join(found)


def test_every_plugin_family_is_checked() -> None:
    assert {d.parent.name for d in DISTRIBUTIONS} >= {"attention", "devices", "pruning", "quant"}, DISTRIBUTIONS


def test_scaffolded_plugins_import_only_the_sdk_and_torch(tmp_path: Path) -> None:
    from dsr1_sdk.scaffold import SCAFFOLD_FAMILIES, new_plugin

    for family in SCAFFOLD_FAMILIES:
        dist = new_plugin(family, "probe", tmp_path / family)
        modules, found = violations(dist)
        assert [m.relative_to(dist).as_posix() for m in modules] == [f"dsr1_{family}_probe/__init__.py"], modules
        assert not found, "\n".join(found)


def test_the_check_catches_core_imports_anywhere(tmp_path: Path) -> None:
    """A lazy core import, an undeclared one, a test-extra one and a literal ``import_module`` are caught;
    stdlib, torch, the SDK, declared dependencies, the package's own and relative imports pass."""
    dist = tmp_path / "dsr1-quant-bad"
    package = dist / "dsr1_quant_bad"
    package.mkdir(parents=True)
    (dist / "pyproject.toml").write_text(
        '[project]\nname = "dsr1-quant-bad"\ndependencies = ["dsr1-sdk>=0.1", "ninja"]\n'
        '[project.optional-dependencies]\ntest = ["pytest"]\n'
        '[tool.setuptools.packages.find]\ninclude = ["dsr1_quant_bad*"]\n'
    )
    (package / "__init__.py").write_text(
        "import os\nimport torch.nn\nimport ninja\nfrom dsr1_sdk.quant import flat\nfrom . import helpers\n"
        "from dsr1_quant_bad import helpers as h\n\n"
        "def f():\n    from dsr1.quantization.modules import QuantizedLinear\n    import pytest\n"
        "    import importlib\n    return importlib.import_module('dsr1.errors')\n"
    )
    stale = dist / "build" / "lib" / "dsr1_quant_bad"  # stale build copies are not package code
    stale.mkdir(parents=True)
    (stale / "__init__.py").write_text("import dsr1\n")
    modules, found = violations(dist)
    assert modules == [package / "__init__.py"]
    assert [f.split(": `")[0].rsplit(":", 1)[1] for f in found] == ["9", "10", "12"], found
    assert "`from dsr1.quantization.modules import QuantizedLinear` imports 'dsr1'" in found[0], found[0]


def test_sdk_submodules_export_what_they_list_and_the_root_stays_light() -> None:
    code = ("import importlib, sys, dsr1_sdk; light = 'torch' not in sys.modules; "
            f"mods = [importlib.import_module(m) for m in {SDK_MODULES!r}]; "
            "print(light, [f'{m.__name__}.{n}' for m in mods for n in m.__all__ if not hasattr(m, n)])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True []", out.stdout
