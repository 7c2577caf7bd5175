"""``dsr1 config check FILE`` on random documents: accepted, or exactly one error line and exit 2.

Hypothesis writes random YAML, JSON and TOML documents (known and unknown keys, plugin names,
huge integers, NaN, unicode), then damages some of them: invalid bytes spliced in, the text
cut short, a value nested thousands of levels deep or a string of megabytes. The CLI runs in
process (a subprocess per example would cost a second each); a few cases go through the real
entry point to show it behaves the same. Never a traceback, never a hang: every input is
bounded before it is parsed (:mod:`dsr1.config`).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsr1.cli import main
from dsr1.errors import MAX_MESSAGE_CHARS
from dsr1.hookspecs import FAMILIES
from dsr1.registry import PluginRegistry
from tests.conftest import run_cli

KNOWN_KEYS = [*FAMILIES, "hardware", "name", "options", "type", "precision", "optimizer", "kernel_fusion",
              "tiling_strategy", "fallback", "backend", "threads", "max_batch_size", "granularity"]
NAMES = ["sdpa", "eager", "linear", "cpu", "cuda", "auto", "int8", "bf16", "fp32", "compile", "cudagraph", "static",
         "contiguous", "paged", "nvidia", "cambricon", "fixed", "tokenizers", "sampling", "timing", "single"]
PLACEHOLDER = "@@dsr1-fuzz@@"

keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=12))
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.sampled_from(NAMES), st.text(max_size=20),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(keys, inner, max_size=3)), max_leaves=12)
#: the plugin names installed here, per family (documents that name them reach the plugins' options).
INSTALLED = {family: PluginRegistry.from_env().names(family) or ["none"] for family in FAMILIES}
OPTION_KEYS = ["backend", "threads", "granularity", "block_size", "max_batch_size", "group_size", "compile",
               "tiling_strategy", "fallback", "sparsity", "capture", "window", "padding_side", "template_max_chars"]


def choices(family: str) -> st.SearchStrategy[Any]:
    name = st.one_of(st.sampled_from(INSTALLED[family]), st.sampled_from(NAMES))
    options = st.dictionaries(st.sampled_from(OPTION_KEYS), scalars, max_size=2)
    return st.one_of(name, st.fixed_dictionaries({"name": name}, optional={"options": options}))


hardware = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(NAMES), "precision": st.sampled_from(NAMES),
    "optimizer": st.fixed_dictionaries({}, optional={"kernel_fusion": st.booleans(), "fallback": st.booleans(),
                                                     "tiling_strategy": st.sampled_from(["auto", "fixed", "x"])})})
#: documents close to the schema (so the registry and the plugins' options are reached too) and anything at all.
documents = st.one_of(
    st.lists(st.sampled_from(FAMILIES), max_size=4, unique=True).flatmap(
        lambda families: st.fixed_dictionaries({f: choices(f) for f in families})).flatmap(
        lambda doc: st.one_of(st.just(doc), hardware.map(lambda hw: {**doc, "hardware": hw}))),
    st.dictionaries(keys, values, max_size=5),
)


def toml_value(value: Any) -> str:
    """A TOML (1.0) inline value; TOML has no null, so ``None`` becomes a string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps("None" if value is None else value)  # a JSON string is a TOML basic string


def serialize(doc: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(doc)
    if fmt == "yaml":
        return yaml.safe_dump(doc, allow_unicode=True)
    return "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in doc.items())


@st.composite
def config_files(draw: st.DrawFn) -> tuple[str, bytes]:
    """(suffix, content): a random document in a random format, maybe damaged."""
    fmt = draw(st.sampled_from(["json", "yaml", "toml"]))
    doc = draw(documents)
    damage = draw(st.sampled_from(["none", "none", "deep", "huge", "bytes", "truncate"]))
    if damage in ("deep", "huge"):  # put the monster where the schema looks first, or anywhere
        where = draw(st.sampled_from(["top", "options", "hardware"]))
        slot = {"top": {draw(keys): PLACEHOLDER}, "options": {"attention": {"name": "sdpa",
                "options": {"backend": PLACEHOLDER}}}, "hardware": {"hardware": {"type": PLACEHOLDER}}}[where]
        doc = {**doc, **slot}
    text = serialize(doc, fmt)
    if damage == "deep":
        depth = draw(st.integers(1, 3000))
        monster = "[" * depth + "1" + "]" * depth
    else:  # a long string, or a long number (YAML and TOML read 0x... of any length; decimals stop at 4300 digits)
        length = draw(st.integers(1000, 1_500_000))
        monster = draw(st.sampled_from([json.dumps("x" * length), json.dumps("é✓" * (length // 2)),
                                        "0x" + "f" * (length // 100), "9" * (length // 100)]))
    for quoted in (json.dumps(PLACEHOLDER), f"'{PLACEHOLDER}'", PLACEHOLDER):
        text = text.replace(quoted, monster)
    data = text.encode("utf-8")
    if damage == "bytes":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=6)) + data[at:]
    elif damage == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    return f".{'yml' if fmt == 'yaml' and draw(st.booleans()) else fmt}", data


def check(suffix: str, data: bytes) -> tuple[int, str, str]:
    """``dsr1 config check`` in process on a file holding ``data``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"engine{suffix}"
        path.write_bytes(data)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["config", "check", str(path)])
    return code, out.getvalue(), err.getvalue()


def assert_accepted_or_one_line(code: int, out: str, err: str) -> None:
    if code == 0:
        assert ": valid" in out and "Traceback" not in err
        return
    assert code == 2, (code, err[:2000])
    assert err.startswith("dsr1: error: ") and err.count("\n") == 1, err[:2000]
    assert len(err) < MAX_MESSAGE_CHARS + 100 and "Traceback" not in err


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(config_files())
def test_config_check_accepts_or_prints_one_line(file: tuple[str, bytes]) -> None:
    assert_accepted_or_one_line(*check(*file))


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([".yaml", ".json", ".toml"]))
def test_arbitrary_bytes_are_accepted_or_one_line(data: bytes, suffix: str) -> None:
    assert_accepted_or_one_line(*check(suffix, data))


def test_valid_documents_are_accepted() -> None:
    """The fuzzing above is not vacuous: documents the schema takes pass in every format."""
    doc = {"attention": "sdpa", "kvcache": {"name": "contiguous", "options": {"granularity": 64}},
           "hardware": {"type": "cpu", "precision": "fp32", "optimizer": {"kernel_fusion": False}}}
    for fmt, suffix in (("json", ".json"), ("yaml", ".yaml"), ("toml", ".toml")):
        code, out, err = check(suffix, serialize(doc, fmt).encode())
        assert code == 0 and ": valid" in out and err == "", err


def test_the_real_entry_point_behaves_the_same(tmp_path: Path) -> None:
    cases = {"bad.yaml": b"\xff\xfe\x00attention", "deep.json": b'{"a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
             "ok.toml": b'attention = "sdpa"\n'}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        proc = run_cli("config", "check", str(tmp_path / name))
        assert_accepted_or_one_line(proc.returncode, proc.stdout, proc.stderr)
        assert (proc.returncode == 0) == (name == "ok.toml")
