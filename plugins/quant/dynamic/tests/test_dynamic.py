"""``dynamic`` on a tiny random Llama: switching to int8 after warm-up, keeping sensitive layers,
the guard switching back, monitor events, and one-line errors for out-of-range settings."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

from dsr1.auto import AutoModel
from dsr1.config import PluginChoice
from dsr1.errors import Dsr1Error
from dsr1.registry import PluginRegistry
from dsr1_quant_dynamic import DynamicLinear
from dsr1_sdk.testing.quant import tiny_llama_checkpoint

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_checkpoint(tmp_path_factory.mktemp("tiny") / "llama")


def load(llama_dir: Path, **options: Any) -> Any:
    return AutoModel.from_pretrained(llama_dir, quant={"name": "dynamic", "options": options})


def events(model: Any, name: str) -> list[dict[str, Any]]:
    return [e for e in model.pipeline.monitor.stream() if e["event"] == name]


def test_warmup_then_int8_layers_match_the_int8_policy(llama_dir: Path) -> None:
    model = load(llama_dir, warmup_steps=2, sqnr_threshold_db=0.0, guard_every=1000)
    assert set(model.pipeline.quant.precision_map(model).values()) == {"bf16"}
    for _ in range(2):
        model(IDS)
    precision = model.pipeline.quant.precision_map(model)
    assert set(precision.values()) == {"int8"} and len(precision) == 2 * 4 + 1  # 4 fused linears per layer + head
    switches = events(model, "quant.switch")
    assert len(switches) == len(precision) and all(e["precision"] == "int8" and e["step"] == 2 for e in switches)
    int8 = AutoModel.from_pretrained(llama_dir, quant="int8")
    assert torch.equal(model(IDS).logits, int8(IDS).logits)  # same kernel, same scales


def test_sensitive_layers_stay_in_high_precision(llama_dir: Path) -> None:
    model = load(llama_dir, warmup_steps=1, sqnr_threshold_db=100.0)
    model.generate(IDS[:1, :6], max_new_tokens=3)
    controller = model.precision_controller
    assert controller.phase == "held" and not events(model, "quant.switch")
    assert all(30 < db < 100 for db in controller.report()["sqnr_db"].values())
    assert set(model.pipeline.quant.precision_map(model).values()) == {"bf16"}


def test_threshold_splits_layers_by_measured_sqnr(llama_dir: Path) -> None:
    probe = load(llama_dir, warmup_steps=1, sqnr_threshold_db=100.0)
    probe(IDS)
    measured = sorted(probe.precision_controller.report()["sqnr_db"].values())
    middle = (measured[len(measured) // 2 - 1] + measured[len(measured) // 2]) / 2
    model = load(llama_dir, warmup_steps=1, sqnr_threshold_db=middle)
    model(IDS)
    report = model.precision_controller.report()
    assert report["int8_layers"] == sum(db >= middle for db in report["sqnr_db"].values())
    assert 0 < report["int8_layers"] < report["layers"]


def test_guard_switches_back_when_int8_goes_wrong(llama_dir: Path) -> None:
    model = load(llama_dir, warmup_steps=1, sqnr_threshold_db=0.0, guard_every=1, guard_window_tokens=64,
                 guard_agreement=0.9)
    reference = AutoModel.from_pretrained(llama_dir, quant="bf16")
    model(IDS)  # warm-up → every layer int8
    assert model.precision_controller.phase == "running"
    for layer in model.modules():
        if isinstance(layer, DynamicLinear):
            layer.qweight.neg_()  # an accuracy collapse the guard must catch
    model(IDS)
    model(IDS)  # second sampled step fills the window → trip
    controller = model.precision_controller
    assert controller.phase == "held"
    (trip,) = events(model, "quant.guard")
    assert trip["agreement"] < 0.9 and trip["switched_back"] == 9
    back = [e for e in events(model, "quant.switch") if e["precision"] == "bf16"]
    assert len(back) == 9 and all(e["reason"].startswith("guard: top-1 agreement") for e in back)
    assert set(model.pipeline.quant.precision_map(model).values()) == {"bf16"}
    assert torch.equal(model(IDS).logits, reference(IDS).logits)


def test_fallback_fraction_switches_back_the_least_accurate_first(llama_dir: Path) -> None:
    model = load(llama_dir, warmup_steps=1, sqnr_threshold_db=0.0, guard_every=1, guard_window_tokens=1,
                 guard_agreement=1.0, fallback_fraction=0.5)
    model(IDS)
    for layer in model.modules():
        if isinstance(layer, DynamicLinear):
            layer.qweight.neg_()
    model(IDS)
    report = model.precision_controller.report()
    assert report["guard_trips"] == 1 and report["int8_layers"] == 9 - 5
    kept = [n for n, p in model.pipeline.quant.precision_map(model).items() if p == "int8"]
    dropped = [n for n in report["sqnr_db"] if n not in kept]
    assert max(report["sqnr_db"][n] for n in dropped) <= min(report["sqnr_db"][n] for n in kept)


def test_generate_is_unchanged_while_warming_up(llama_dir: Path) -> None:
    model = load(llama_dir, warmup_steps=100)
    reference = AutoModel.from_pretrained(llama_dir, quant="bf16")
    assert torch.equal(model.generate(IDS[:1, :6], max_new_tokens=5), reference.generate(IDS[:1, :6], max_new_tokens=5))
    assert model.precision_controller.step == 5  # prefill + 4 decode steps


def test_saves_as_plain_high_precision_weights(llama_dir: Path, tmp_path: Path) -> None:
    model = load(llama_dir, warmup_steps=1, sqnr_threshold_db=0.0)
    model(IDS)
    model.save_pretrained(tmp_path / "out")
    again = AutoModel.from_pretrained(tmp_path / "out", quant="bf16")
    assert torch.equal(again(IDS).logits, AutoModel.from_pretrained(llama_dir, quant="bf16")(IDS).logits)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("sqnr_threshold_db", 150.0, "less than or equal to 100"),
    ("sqnr_threshold_db", -1.0, "greater than or equal to 0"),
    ("guard_agreement", 0.0, "greater than 0"),
    ("guard_agreement", 1.5, "less than or equal to 1"),
    ("warmup_steps", 0, "greater than or equal to 1"),
    ("fallback_fraction", 2.0, "less than or equal to 1"),
    ("high_precision", "fp8", "'bf16' or 'fp16'"),
])
def test_out_of_range_settings_are_one_line_errors(key: str, value: object, message: str) -> None:
    with pytest.raises(Dsr1Error, match=rf"quant\.options\.{key}.*{message}") as err:
        PluginRegistry().make("quant", PluginChoice(name="dynamic", options={key: value}))
    assert "\n" not in str(err.value)


def _controller(window: int, agreement: float) -> Any:
    from dsr1_quant_dynamic import DynamicOptions, PrecisionController

    layer = DynamicLinear(torch.nn.Linear(16, 16), torch.bfloat16)
    controller = PrecisionController({"layer": layer}, DynamicOptions(guard_window_tokens=window,
                                                                      guard_agreement=agreement))
    layer.mode, layer.measured_db, controller.phase = "int8", 40.0, "running"
    return controller


def _logits(token: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor([token]), 4).float()  # (1, V): top-1 is ``token``


def test_guard_judges_the_newest_window_of_tokens() -> None:
    controller = _controller(window=10, agreement=0.8)
    controller.check(_logits(1), _logits(2))  # one flip...
    for _ in range(9):
        controller.check(_logits(1), _logits(1))  # ...in a full window of 10: agreement 0.9, kept
    assert controller.phase == "running"
    controller.check(_logits(1), _logits(2))
    controller.check(_logits(1), _logits(2))  # newest 10 tokens: 8 agree → 0.8, kept
    assert controller.phase == "running"
    controller.check(_logits(1), _logits(2))  # 7 of 10 → 0.7 < 0.8: trip
    assert controller.phase == "held"


def test_guard_trips_early_when_the_window_cannot_recover() -> None:
    controller = _controller(window=10, agreement=0.8)
    controller.check(_logits(1), _logits(2))
    controller.check(_logits(1), _logits(2))
    assert controller.phase == "running"  # 2 flips: a full window could still reach 0.8
    controller.check(_logits(1), _logits(2))
    assert controller.phase == "held"  # 3 flips > 2 allowed in 10


def test_int8_layers_use_the_chosen_cuda_kernel(llama_dir: Path) -> None:
    """``cuda_kernel`` reaches every layer; ``triton`` on CUDA is refused by ``validate`` without triton."""
    model = load(llama_dir, cuda_kernel="dequant")
    kernels = {m.cuda_kernel for m in model.modules() if isinstance(m, DynamicLinear)}
    assert kernels == {"dequant"}
    policy = PluginRegistry().load("quant", "dynamic").make()
    if importlib.util.find_spec("triton") is None:
        assert "pip install triton" in " ".join(policy.validate("cuda"))
    else:
        assert policy.validate("cuda") == []
    assert policy.validate("cpu") == []
