"""The pool conformance kit: ``single`` passes it, ``tiered`` too once installed, and the kit
catches pools that change the weights, overspend a budget, accept a plan that cannot fit, or
answer ``kv_swap`` with a bad policy."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from dsr1_sdk.testing import PoolConformance, PoolKit, peak_rss_bytes, reset_peak_rss
from dsr1_sdk.testing.pool import check_swap_policy, checkpoint_bytes, current_rss_bytes, measure_problem
from tests.core.plugin_dist import fake_plugin  # noqa: F401  # the fixture

WEIGHTS, LAYER = checkpoint_bytes("float32")
MiB = 1 << 20
#: activations, KV cache and logits of the kit's generate, with room for the CPU's batch relayout.
MARGIN = 32 * MiB


class TestSinglePool(PoolConformance):
    plugin = "single"
    # single keeps every weight in process memory: the weights plus the checkpoint pages read meanwhile
    weight_budget_bytes: ClassVar[int | None] = WEIGHTS + WEIGHTS // 2
    activation_margin_bytes: ClassVar[int] = MARGIN


# --- single and tiered through PoolKit, by name + options ---------------------------------------


def _gb(n: int) -> float:
    return n / 2**30


#: pool name → options factory (a directory for disk tiers), the weight budget and the options that cannot fit.
POOLS: dict[str, tuple[Callable[[Path], dict[str, Any]], int, Callable[[Path], dict[str, Any]] | None]] = {
    "single": (lambda _: {}, WEIGHTS + WEIGHTS // 2, None),
    # on a CPU device cpu_memory_gb is the one budget: the embedding, the head and two streaming
    # buffers of a layer fit it, the 4 layers stream from disk_dir. The stated margin: one layer (the
    # unit being read, or packed into its file, while the model loads) and 24 MiB of the growth any load
    # brings (read buffers, the interpreter's own; single's peak is its weights plus 10-16 MiB). The kit
    # measures in a fresh interpreter: the heap the rest of the suite leaves fragmented, whose holes
    # kept the load's freed buffers resident (tiered then peaked 24 MiB higher), no longer counts
    "tiered": (
        lambda d: {"cpu_memory_gb": _gb(2 * LAYER + 10 * MiB), "disk_dir": str(d)},
        3 * LAYER + 10 * MiB + 24 * MiB,
        lambda d: {"cpu_memory_gb": _gb(LAYER // 4), "disk_dir": str(d)},
    ),
}

CHOICES = ["single", "tiered"]
BUDGET_CHOICES = CHOICES


@pytest.mark.parametrize("name", CHOICES)
def test_pool_matches_single(name: str, tmp_path: Path) -> None:
    kit = PoolKit(name, POOLS[name][0](tmp_path))
    kit.check_outputs()
    kit.check_kv_swap()


@pytest.mark.parametrize("name", BUDGET_CHOICES)
def test_pool_within_budget(name: str, tmp_path: Path) -> None:
    peaks = PoolKit(name, POOLS[name][0](tmp_path)).check_budget(POOLS[name][1], MARGIN)
    assert peaks.weights > 0 and peaks.generate >= 0


@pytest.mark.parametrize("name", CHOICES)
def test_pool_refuses_what_cannot_fit(name: str, tmp_path: Path) -> None:
    unfit = POOLS[name][2]
    if unfit is None:
        pytest.skip(f"pool {name!r} has no budget to exceed")
    PoolKit(name, POOLS[name][0](tmp_path)).check_unfit(unfit(tmp_path))


# --- the measure ------------------------------------------------------------------------------


def test_peak_rss_resets_and_sees_a_new_peak() -> None:
    problem = reset_peak_rss()
    if problem:
        pytest.skip(problem)
    start = current_rss_bytes()
    assert peak_rss_bytes() - start < 8 * MiB  # the peak starts over at the current resident set
    block = torch.ones(64 * MiB // 4)  # touched: resident
    del block
    assert peak_rss_bytes() - start >= 60 * MiB


def test_device_measure_needs_cuda() -> None:
    assert measure_problem("device", torch.device("cpu")) is not None


# --- the kit catches broken pools ---------------------------------------------------------------

#: a pool that behaves like single, with a ``max_bytes`` budget per layer, and one fault on demand.
FAULTY = '''
import torch
from typing import Literal
from dsr1.interfaces import SwapPolicy
from dsr1_sdk import Dsr1Error, PluginOptions, PluginSpec, Pool, hookimpl

class FaultyOptions(PluginOptions):
    max_bytes: int | None = None
    fault: Literal["none", "perturb", "hoard", "ignore_budget", "vague", "negative_swap", "int_swap"] = "none"

class FaultyPool(Pool):
    def weight_device(self, device):
        return device.torch_device()

    def place(self, model, device):
        o = self.options
        if o.max_bytes is not None and o.fault != "ignore_budget":
            for i, layer in enumerate(model.model.layers):
                size = sum(p.numel() * p.element_size() for p in layer.parameters())
                if size > o.max_bytes:
                    if o.fault == "vague":
                        raise Dsr1Error("out of memory")
                    raise Dsr1Error(f"pool faulty: layer model.layers.{i} needs {size / 2**20:.1f} MiB, "
                                    f"more than max_bytes {o.max_bytes} B")
        if o.fault == "perturb":
            with torch.no_grad():
                model.model.norm.weight.mul_(1.01)
        if o.fault == "hoard":  # a second copy of every weight, kept
            self.copies = [p.detach().clone() for p in model.parameters()]
        return model

    def kv_swap(self, kv_bytes_per_token, device):
        if self.options.fault == "negative_swap":
            return SwapPolicy(host_bytes=-1, should_swap=lambda n: n > 16)
        if self.options.fault == "int_swap":
            return SwapPolicy(host_bytes=1 << 20, should_swap=lambda n: int(n > 16))
        return SwapPolicy(host_bytes=64 * kv_bytes_per_token, should_swap=lambda n: n > 16)

@hookimpl
def dsr1_pool():
    return PluginSpec(name="faulty", family="pool", impl=FaultyPool, options=FaultyOptions,
                      description="test: a pool with a fault on demand")
'''


@pytest.fixture
def faulty(fake_plugin: Callable[[str, str, str], str]) -> Callable[..., PoolKit]:  # noqa: F811
    fake_plugin("pool", "faulty", FAULTY)
    return lambda **options: PoolKit("faulty", options)


def test_a_sound_pool_passes_every_check(faulty: Callable[..., PoolKit]) -> None:
    kit = faulty(max_bytes=LAYER)
    kit.check_outputs()
    kit.check_budget(WEIGHTS + WEIGHTS // 2, MARGIN)
    message = kit.check_unfit({"max_bytes": LAYER // 2})
    assert "model.layers.0" in message
    policy = kit.check_kv_swap()
    assert policy is not None and policy.should_swap(32) is True


def test_a_pool_that_changes_a_weight_fails(faulty: Callable[..., PoolKit]) -> None:
    with pytest.raises(AssertionError, match="logits of the real prompt tokens"):
        faulty(fault="perturb").check_outputs()


def test_a_pool_over_its_budget_fails(faulty: Callable[..., PoolKit]) -> None:
    if measure_problem("rss", torch.device("cpu")):
        pytest.skip(str(measure_problem("rss", torch.device("cpu"))))
    with pytest.raises(AssertionError, match="peak while placing the weights.*exceeds the budget"):
        faulty(fault="hoard").check_budget(WEIGHTS + WEIGHTS // 2, MARGIN)


def test_a_pool_that_refuses_nothing_fails(faulty: Callable[..., PoolKit]) -> None:
    with pytest.raises(AssertionError, match="the load succeeded"):
        faulty(fault="ignore_budget").check_unfit({"max_bytes": LAYER // 2, "fault": "ignore_budget"})


def test_a_refusal_that_names_nothing_fails(faulty: Callable[..., PoolKit]) -> None:
    with pytest.raises(AssertionError, match="must name what does not fit"):
        faulty().check_unfit({"max_bytes": LAYER // 2, "fault": "vague"})


@pytest.mark.parametrize(("fault", "match"), [("negative_swap", "host_bytes -1"), ("int_swap", "return a Python bool")])
def test_a_bad_swap_policy_fails(faulty: Callable[..., PoolKit], fault: str, match: str) -> None:
    with pytest.raises(AssertionError, match=match):
        faulty(fault=fault).check_kv_swap()


def test_swap_policy_none_and_wrong_type() -> None:
    check_swap_policy(None, "none")  # always recompute: nothing to check
    with pytest.raises(AssertionError, match="return None or a dsr1.interfaces.SwapPolicy"):
        check_swap_policy({"host_bytes": 1}, "a dict")
