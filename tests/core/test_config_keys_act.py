"""Every key of ``EngineConfig`` acts or is refused: no silent no-op (issue 13, point 5).

``ACTS`` holds, for each key (the twelve families and every key of the hardware section), a
check that setting it changes something observable when dsr1-tiny loads or generates: the
weights, the logits, the tokenizer, what the monitor recorded, or a call into the plugin that
the key selected. ``REFUSED`` holds settings that cannot act here; each must be a one-line
``Dsr1Error``. :func:`test_every_key_has_a_case` fails when a key is added without a case, so a
new key cannot be a silent no-op either.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from dsr1.auto import AutoModel
from dsr1.config import EngineConfig, HardwareConfig, OptimizerConfig, PluginChoice, load_config
from dsr1.errors import Dsr1Error
from dsr1.hookspecs import FAMILIES
from dsr1.monitor.timing import TimingMonitor
from dsr1.pruning.metrics import prunable_linears
from dsr1.registry import PluginRegistry

IDS = torch.tensor([[0, 17, 301, 42, 9, 77]])


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """Every event any timing monitor records during the test."""
    seen: list[dict[str, Any]] = []
    original = TimingMonitor.record

    def record(self: TimingMonitor, event: str, **values: Any) -> None:
        seen.append({"event": event, **values})
        original(self, event, **values)

    monkeypatch.setattr(TimingMonitor, "record", record)
    yield seen


def spy(monkeypatch: pytest.MonkeyPatch, cls: type, method: str) -> list[tuple[Any, ...]]:
    """Record each call of ``cls.method`` (and still run it)."""
    calls: list[tuple[Any, ...]] = []
    original = getattr(cls, method)

    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append((self, *args))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, wrapper)
    return calls


def load(config: dict[str, Any] | None = None) -> Any:
    return AutoModel.from_pretrained("dsr1-tiny", config)


def logits(model: Any) -> torch.Tensor:
    with torch.inference_mode():
        return model(IDS).logits.float()


# --- what each key does --------------------------------------------------------------------------


def acts_preprocess(mp: pytest.MonkeyPatch, events: list[dict[str, Any]]) -> None:
    assert load().tokenizer.padding_side == "left"
    model = load({"preprocess": {"name": "tokenizers", "options": {"padding_side": "right"}}})
    assert model.tokenizer.padding_side == "right"


def acts_model(mp: pytest.MonkeyPatch, events: list[dict[str, Any]]) -> None:
    fused = {n.rsplit(".", 1)[-1] for n, _ in load().named_modules()}
    split = {n.rsplit(".", 1)[-1] for n, _ in load({"model": {"name": "llama", "options": {"fuse": False}}})
             .named_modules()}
    assert "qkv_proj" in fused and "q_proj" not in fused
    assert {"q_proj", "k_proj", "v_proj"} <= split and "qkv_proj" not in split


def acts_attention(mp: pytest.MonkeyPatch, events: list[dict[str, Any]]) -> None:
    dense, linear = logits(load({"attention": "sdpa"})), logits(load({"attention": "linear"}))
    assert (dense - linear).abs().max() > 1e-2  # another attention: other logits


def acts_device(mp: pytest.MonkeyPatch, events: list[dict[str, Any]]) -> None:
    threads = torch.get_num_threads()
    try:
        want = 1 if threads != 1 else 2
        model = load({"device": {"name": "cpu", "options": {"threads": want}}})
        assert torch.get_num_threads() == want
        assert all(p.device.type == "cpu" for p in model.parameters())
    finally:
        torch.set_num_threads(threads)


def acts_quant(mp: pytest.MonkeyPatch, events: list[dict[str, Any]]) -> None:
    model = load({"quant": "int8"})
    codes = [m.qweight for _, m in model.named_modules() if hasattr(m, "qweight")]
    assert codes and all(c.dtype == torch.int8 for c in codes)


def acts_pruning(mp: pytest.MonkeyPatch, events: list[dict[str, Any]]) -> None:
    model = load({"pruning": {"name": "magnitude", "options": {"sparsity": 0.5}}})
    layers = prunable_linears(model)
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers) / sum(m.weight.numel() for _, m in layers)
    assert zeros == pytest.approx(0.5, abs=1e-4)


def acts_graph(mp: pytest.MonkeyPatch, events: list[dict[str, Any]]) -> None:
    from dsr1.graph.compile import CompileGraph
    from dsr1.graph.eager import EagerGraph

    eager, compiled = spy(mp, EagerGraph, "apply"), spy(mp, CompileGraph, "apply")
    load({"graph": "compile"})
    assert len(compiled) == 1 and not eager  # the pass the key names rewrote the model, not the default
    assert compiled[0][0].options.tiling_strategy == "fixed"


def acts_pool(mp: pytest.MonkeyPatch, events: list[dict[str, Any]]) -> None:
    from dsr1.pool.single import SinglePool

    asked, placed = spy(mp, SinglePool, "weight_device"), spy(mp, SinglePool, "place")
    load({"pool": "single"})
    assert asked and placed  # the builder read the weights where the pool said, and the pool placed the model

    def full(self: SinglePool, device: Any) -> torch.device:
        raise Dsr1Error("pool refuses: no room")

    mp.setattr(SinglePool, "weight_device", full)
    with pytest.raises(Dsr1Error, match="^pool refuses: no room$"):
        load()  # the builder has no device of its own to fall back on


def acts_scheduler(mp: pytest.MonkeyPatch, events: list[dict[str, Any]]) -> None:
    load({"scheduler": "static"}).generate(IDS, max_new_tokens=2)
    assert not [e for e in events if e["event"] == "engine.step"]
    load({"scheduler": "continuous", "kvcache": "paged"}).generate(IDS, max_new_tokens=2)
    assert [e for e in events if e["event"] == "engine.step"]  # the engine loop ran the request


def acts_kvcache(mp: pytest.MonkeyPatch, events: list[dict[str, Any]]) -> None:
    def kv_bytes(config: dict[str, Any]) -> int:
        events.clear()
        load(config).generate(IDS, max_new_tokens=2)
        return int([e for e in events if e["event"] == "kvcache.bytes"][-1]["bytes"])

    assert kv_bytes({"kvcache": "int8"}) < kv_bytes({"kvcache": "contiguous"})


def acts_decoding(mp: pytest.MonkeyPatch, events: list[dict[str, Any]]) -> None:
    from dsr1.decoding.sampling import SamplingDecoder

    picked = spy(mp, SamplingDecoder, "next_token")
    load({"decoding": "sampling"}).generate(IDS, max_new_tokens=3, do_sample=True, temperature=0.7, seed=1)
    assert len(picked) >= 2  # the selected decoder chose the tokens


def acts_monitor(mp: pytest.MonkeyPatch, events: list[dict[str, Any]]) -> None:
    load({"monitor": "timing"}).generate(IDS, max_new_tokens=3)
    decode = [e for e in events if e["event"] == "decode"]
    assert decode and decode[-1]["tokens"] == 3


def acts_hardware(mp: pytest.MonkeyPatch, events: list[dict[str, Any]]) -> None:
    model = load({"hardware": {"type": "cpu", "precision": "bf16"}})
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def acts_hardware_type(mp: pytest.MonkeyPatch, events: list[dict[str, Any]]) -> None:
    assert load_config({"hardware": {"type": "cambricon"}}).choice("device").name == "mlu"
    assert all(p.device.type == "cpu" for p in load({"hardware": {"type": "cpu"}}).parameters())


def acts_hardware_precision(mp: pytest.MonkeyPatch, events: list[dict[str, Any]]) -> None:
    assert {p.dtype for p in load({"hardware": {"precision": "bf16"}}).parameters()} == {torch.bfloat16}


def acts_hardware_optimizer(mp: pytest.MonkeyPatch, events: list[dict[str, Any]]) -> None:
    acts_hardware_kernel_fusion(mp, events)


def acts_hardware_kernel_fusion(mp: pytest.MonkeyPatch, events: list[dict[str, Any]]) -> None:
    from dsr1.graph.compile import CompileGraph

    compiled = spy(mp, CompileGraph, "apply")
    load({"hardware": {"optimizer": {"kernel_fusion": True}}})
    assert len(compiled) == 1


def acts_hardware_tiling_strategy(mp: pytest.MonkeyPatch, events: list[dict[str, Any]]) -> None:
    from dsr1.graph.compile import CompileGraph

    compiled = spy(mp, CompileGraph, "apply")
    load({"hardware": {"optimizer": {"kernel_fusion": True, "tiling_strategy": "auto"}}})
    assert compiled[0][0].options.tiling_strategy == "auto"


def acts_hardware_fallback(mp: pytest.MonkeyPatch, events: list[dict[str, Any]]) -> None:
    from dsr1.graph.compile import CompileGraph

    compiled = spy(mp, CompileGraph, "apply")
    load({"hardware": {"optimizer": {"kernel_fusion": True, "fallback": True}}})
    assert compiled[0][0].options.fallback is True


def acts_parallel(mp: pytest.MonkeyPatch, events: list[dict[str, Any]]) -> None:
    """Outside torchrun there is one rank: a tensor degree of 2 is refused (tests/parallel shards for real)."""
    with pytest.raises(Dsr1Error, match="parallel.tensor 2 must equal the world size 1"):
        load({"parallel": {"tensor": 2}})


def acts_extra_devices(mp: pytest.MonkeyPatch, events: list[dict[str, Any]]) -> None:
    """``device: [cuda, cpu]`` reaches the pool, which takes the CPU as a second device or refuses it."""
    from dsr1.pool.tiered import TieredPool

    with pytest.raises(Dsr1Error, match="but pool 'single' keeps every module on the compute device"):
        load({"device": ["cuda", "cpu"]})
    taken = spy(mp, TieredPool, "use_devices")
    try:  # on a machine without CUDA the load then stops at the device; what matters is that the pool heard
        load({"extra_devices": ["cpu"], "device": "cuda", "pool": "tiered"})
    except Dsr1Error as err:
        assert "cuda device is not available here" in str(err)
    assert [(call[1]) for call in taken] == [["cpu"]] and taken[0][0].host_compute


#: key path → the check that it acts.
ACTS: dict[str, Callable[[pytest.MonkeyPatch, list[dict[str, Any]]], None]] = {
    "preprocess": acts_preprocess,
    "model": acts_model,
    "attention": acts_attention,
    "device": acts_device,
    "quant": acts_quant,
    "pruning": acts_pruning,
    "graph": acts_graph,
    "pool": acts_pool,
    "scheduler": acts_scheduler,
    "kvcache": acts_kvcache,
    "decoding": acts_decoding,
    "monitor": acts_monitor,
    "hardware": acts_hardware,
    "hardware.type": acts_hardware_type,
    "hardware.precision": acts_hardware_precision,
    "hardware.optimizer": acts_hardware_optimizer,
    "hardware.optimizer.kernel_fusion": acts_hardware_kernel_fusion,
    "hardware.optimizer.tiling_strategy": acts_hardware_tiling_strategy,
    "hardware.optimizer.fallback": acts_hardware_fallback,
    "parallel": acts_parallel,
    "extra_devices": acts_extra_devices,
}

#: settings that could only be silent here, with the start of the one-line error that refuses them.
REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "pruning_without_sparsity": ({"pruning": "magnitude"}, "pruning 'magnitude' needs the option 'sparsity'"),
    "pruning_without_calibration": ({"pruning": {"name": "wanda", "options": {"sparsity": 0.5}}},
                                    "pruning 'wanda' with these options needs calibration text"),
    "tiling_without_fusion": ({"hardware": {"optimizer": {"tiling_strategy": "auto"}}},
                              "config: invalid config value at '<root>': hardware.optimizer.tiling_strategy 'auto' "
                              "tunes kernel fusion, but kernel fusion is off"),
    "fallback_with_eager": ({"graph": "eager", "hardware": {"optimizer": {"fallback": True}}},
                            "config: invalid config value at '<root>': hardware.optimizer.fallback true tunes kernel "
                            "fusion, but graph 'eager' does not fuse kernels"),
    "precision_that_is_no_quant": ({"hardware": {"precision": "int3"}}, "no quant plugin named 'int3'"),
    "unknown_key": ({"schedular": "static"}, "config: unknown config key 'schedular'; did you mean 'scheduler'?"),
    "unknown_hardware_key": ({"hardware": {"kernel_fusion": True}},
                             "config: unknown config key 'hardware.kernel_fusion'"),
}


def _key_paths() -> list[str]:
    paths = list(EngineConfig.model_fields)
    paths += [f"hardware.{k}" for k in HardwareConfig.model_fields]
    paths += [f"hardware.optimizer.{k}" for k in OptimizerConfig.model_fields]
    return paths


def test_every_key_has_a_case() -> None:
    assert set(FAMILIES) <= set(EngineConfig.model_fields)
    assert sorted(ACTS) == sorted(_key_paths())


@pytest.mark.parametrize("key", sorted(ACTS))
def test_key_acts(key: str, monkeypatch: pytest.MonkeyPatch, events: list[dict[str, Any]]) -> None:
    ACTS[key](monkeypatch, events)


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_cannot_act_is_refused_in_one_line(case: str) -> None:
    config, message = REFUSED[case]
    with pytest.raises(Dsr1Error) as err:
        load(config)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "model"])
def test_every_family_refuses_an_unknown_plugin_and_option(family: str) -> None:
    with pytest.raises(Dsr1Error) as err:
        load({family: "no-such-plugin"})
    assert str(err.value).startswith(f"no {family} plugin named 'no-such-plugin'") and "\n" not in str(err.value)
    default = load_config({}).choice(family) or PluginChoice(name=PluginRegistry().names(family)[0])
    options = {"no_such_option": 1, **({"sparsity": 0.5} if family == "pruning" else {})}
    with pytest.raises(Dsr1Error) as err:
        load({family: {"name": default.name, "options": options}})
    assert f"unknown config key '{family}.options.no_such_option'" in str(err.value) and "\n" not in str(err.value)


def test_the_model_key_refuses_a_builder_for_another_type() -> None:
    with pytest.raises(Dsr1Error, match=r"^model 'bert' builds model_type bert, not 'llama'"):
        load({"model": "bert"})

