"""Issue 20's done-when: third-party decoding and kvcache plugins from ``dsr1 plugins new``
pass their kits as generated, and deliberately broken copies fail them (the graph, monitor and
scheduler scaffolds ride along: they pass their kits too).

The packages are written by ``dsr1 plugins new`` (the decoding demo through the CLI in a subprocess, as
a plugin author runs it), installed with ``pip --no-deps --target`` (the kit loads plugins through their
entry points, as the engine does) and their generated tests run in a pytest subprocess: the session
fixture ``kit_run`` in conftest.py, which does this once for every family and broken copy
(``test_scaffold.py`` reads the same run).
"""
from __future__ import annotations

from typing import Any

#: The scaffolds that must pass their kit, and how many of its tests at least pass.
MIN_PASSED: dict[str, int] = {"decoding": 25, "kvcache": 15, "graph": 10, "monitor": 12, "scheduler": 20}
FAMILIES = tuple(MIN_PASSED)

#: The broken copies (conftest.py's BREAKS): decoding "nominp" declares min_p and ignores it; kvcache "kasv"
#: hands attention the keys where the values belong. Only their checks that must catch them run.


def test_scaffolded_decoding_and_kvcache_pass_and_broken_copies_fail(kit_run: Any) -> None:
    results, stdout = kit_run.results, kit_run.stdout
    for family in FAMILIES:
        got = results[f"test_dsr1_{family}_demo"]
        failed = {k: v for k, v in got.items() if v.startswith("failed")}
        assert not failed and sum(v == "passed" for v in got.values()) >= MIN_PASSED[family], (
            family, failed, stdout[-3000:])

    decoding = results["test_dsr1_decoding_nominp"]
    assert decoding["test_case[min_p_0.2]"].startswith("failed") and "probability 0" in decoding["test_case[min_p_0.2]"]
    assert decoding["test_case[min_p_0.5_temperature_0.7]"].startswith("failed")
    assert decoding["test_case[top_k_3]"] == decoding["test_case[greedy]"] == "passed"  # the kit names the culprit

    kvcache = results["test_dsr1_kvcache_kasv"]
    assert all(kvcache[f"test_same_as_contiguous[{c}]"].startswith("failed") for c in ("prefill_decode", "padded_gqa"))
    assert "K/V differ from contiguous" in kvcache["test_same_as_contiguous[prefill_decode]"]
