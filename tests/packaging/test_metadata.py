"""Every distribution's pyproject.toml: license, classifiers, URLs, Python range, what it depends on.

Static checks of all of them (no build); ``test_outside_checkout`` builds a few wheels and checks
what the built metadata says.
"""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from tests.venvkit import REPO

PROJECTS = [REPO, REPO / "sdk", *sorted(p.parent for p in REPO.glob("plugins/*/*/pyproject.toml"))]
IDS = [str(p.relative_to(REPO)) or "core" for p in PROJECTS]


def pyproject(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = tomllib.loads((path / "pyproject.toml").read_text())
    return data


def test_every_distribution_is_covered() -> None:
    assert len(PROJECTS) == 20 and IDS[0] == "." and "plugins/devices/cpu" in IDS


@pytest.mark.parametrize("path", PROJECTS, ids=IDS)
def test_license_classifiers_urls(path: Path) -> None:
    data = pyproject(path)
    project = data["project"]
    # PEP 639 metadata (an SPDX expression plus license-files) needs setuptools 77
    assert data["build-system"]["requires"] == ["setuptools>=77"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert (path / "LICENSE").read_bytes() == (REPO / "LICENSE").read_bytes()
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]  # setuptools refuses both
    assert "Typing :: Typed" in project["classifiers"]
    assert set(project["urls"]) == {"Homepage", "Documentation", "Repository", "Issues"}
    assert project["requires-python"] == ">=3.10"
    python = "Programming Language :: Python :: 3."
    versions = {c.rsplit(" :: ", 1)[1] for c in project["classifiers"] if c.startswith(python)}
    assert versions and all(v in SpecifierSet(project["requires-python"]) for v in versions)


@pytest.mark.parametrize("path", PROJECTS[2:], ids=IDS[2:])
def test_plugins_depend_on_plain_sdk(path: Path) -> None:
    reqs = [Requirement(r) for r in pyproject(path)["project"]["dependencies"]]
    sdk = [r for r in reqs if r.name == "dsr1-sdk"]
    assert len(sdk) == 1 and not sdk[0].extras
    assert not {r.name for r in reqs} & {"pytest", "hypothesis", "transformers"}
    test = [Requirement(r) for r in pyproject(path)["project"]["optional-dependencies"]["test"]]
    assert [(r.name, r.extras) for r in test] == [("dsr1-sdk", {"testing"})]  # what the plugin's tests need


def test_sdk_runtime_and_testing_dependencies() -> None:
    project = pyproject(REPO / "sdk")["project"]
    assert project["dependencies"] == ["dsr1>=0.1"]
    assert {Requirement(r).name for r in project["optional-dependencies"]["testing"]} >= {"pytest", "hypothesis"}


def test_core_declares_what_it_imports_and_reads_toml_before_3_11() -> None:
    project = pyproject(REPO)["project"]
    reqs = {Requirement(r).name: Requirement(r) for r in project["dependencies"]}
    assert {"numpy", "rich", "torch", "tokenizers", "safetensors"} <= set(reqs)
    tomli = reqs["tomli"]
    assert tomli.marker is not None and str(tomli.marker) == 'python_version < "3.11"'
    assert "matplotlib" not in reqs and [Requirement(r).name for r in project["optional-dependencies"]["plot"]] == [
        "matplotlib"]
