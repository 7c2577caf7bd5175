"""``device: auto`` probes the installed device plugins in order and says what it chose and why."""
from __future__ import annotations

from pathlib import Path

import pytest

from dsr1.config import load_config
from dsr1.device_select import AUTO_ORDER, candidates, select_device
from dsr1.errors import Dsr1Error
from dsr1.registry import PluginRegistry


def test_order_is_accelerators_then_others_then_cpu():
    assert candidates(["cpu", "zzz", "cuda", "aaa"]) == [*AUTO_ORDER, "aaa", "zzz", "cpu"]


def test_auto_picks_the_first_available_and_records_every_rejection():
    registry = PluginRegistry()
    pipeline = registry.resolve(load_config({"device": "auto"}))
    chosen = pipeline.device_selection.chosen
    probe = pipeline.device.probe()
    assert probe.available and type(pipeline.device) is type(registry.make("device", load_config(
        {"device": chosen}).choice("device")))
    rejected = pipeline.device_selection.rejected
    order = candidates(registry.names("device"))
    assert set(rejected) == set(order[: order.index(chosen)])  # everything before the winner, nothing after
    for name, why in rejected.items():
        assert why.startswith(("not installed (pip install dsr1-device-", "not available: ", "broken: ")), (name, why)
    described = pipeline.describe()["device"]
    assert described["name"] == chosen and described["auto"]["rejected"] == rejected


def test_auto_options_go_to_the_chosen_plugin():
    with pytest.raises(Dsr1Error, match="device.options"):
        PluginRegistry().resolve(load_config({"device": {"name": "auto", "options": {"no_such_option": 1}}}))


def test_auto_with_no_usable_device_lists_every_reason(monkeypatch):
    registry = PluginRegistry()
    monkeypatch.setattr(registry, "names", lambda family: [])
    with pytest.raises(Dsr1Error, match=r"^device auto found no usable device \(cuda: not installed .*cpu: not installed"):
        select_device(registry, {})


def test_hardware_type_auto(tmp_path: Path):
    path = tmp_path / "hw.yaml"
    path.write_text("hardware:\n  type: auto\n")
    pipeline = PluginRegistry().resolve(load_config(path))
    assert pipeline.device_selection is not None and pipeline.device.probe().available


def test_kernel_fusion_follows_the_device_auto_picked(monkeypatch):
    """kernel_fusion with type auto fuses for the device auto picked: cudagraph when it is cuda."""
    import dsr1.device_select as device_select
    from dsr1.config import PluginChoice
    from dsr1.device_select import DeviceSelection

    def pretend_cuda(registry, options):  # as if cuda had probed available (building it starts nothing)
        return registry.make("device", PluginChoice(name="cuda")), DeviceSelection("cuda", "pretend", {})

    if "cuda" not in PluginRegistry().names("device"):
        pytest.skip("dsr1-device-cuda is not installed")

    monkeypatch.setattr(device_select, "select_device", pretend_cuda)
    cfg = load_config({"hardware": {"type": "auto", "optimizer": {"kernel_fusion": True}}})
    pipeline = PluginRegistry().resolve(cfg)
    assert pipeline.describe()["graph"]["name"] == "cudagraph"
    assert type(pipeline.graph) is pipeline.registry.load("graph", "cudagraph").impl
    assert pipeline.graph.options.compile is True
