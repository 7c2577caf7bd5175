"""The whole device path through a device plugin that is not a builtin.

``dsr1-test-cpudev`` (tests/plugins/cpudev) is a CPU-backed, test-only device package,
installed into a private target dir and made visible per test with ``with_plugins``. It is
selected by name, probed, checked by the SDK's ``DeviceConformance`` kit, and a tiny random
Llama checkpoint runs a forward pass on it through ``AutoModel``.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dsr1.config import PluginChoice, load_config
from dsr1.errors import Dsr1Error
from dsr1.interfaces import Device
from dsr1.registry import PluginRegistry
from dsr1_sdk.testing import DeviceConformance

WithPlugins = Callable[..., dict[str, str]]


@pytest.fixture
def cpudev(with_plugins: WithPlugins, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.delenv("DSR1_PLUGINS", raising=False)  # an allowlist in the caller's shell must not hide it
    return with_plugins("cpudev")


class TestCpudevConformance(DeviceConformance):
    """The SDK's device kit, every hardware check included (the device is available here)."""

    plugin = "cpudev"

    @pytest.fixture(autouse=True)
    def _visible(self, cpudev: dict[str, str]) -> None:
        """Make the test package visible to every kit test (and its subprocesses)."""


def test_select_by_name_and_probe(cpudev: dict[str, str]) -> None:
    device = PluginRegistry().make("device", PluginChoice(name="cpudev"))
    assert isinstance(device, Device) and type(device).__name__ == "CpudevDevice"
    result = device.probe()
    assert result.available and result.device_count == 1
    assert "test device" in result.reason and "test" in device.name
    assert device.torch_device() == torch.device("cpu")
    registry = PluginRegistry()
    registry.load("device", "cpudev")
    assert registry.origin("device", "cpudev").distribution == "dsr1-test-cpudev"


def test_config_device_cpudev_resolves(cpudev: dict[str, str]) -> None:
    pipeline = PluginRegistry().resolve(load_config(device="cpudev"))
    assert type(pipeline.device).__name__ == "CpudevDevice"
    assert pipeline.describe()["device"]["name"] == "cpudev"


def test_misspelt_device_suggests_cpudev(cpudev: dict[str, str]) -> None:
    with pytest.raises(Dsr1Error, match="no device plugin named 'cpudv'; did you mean 'cpudev'"):
        PluginRegistry().make("device", PluginChoice(name="cpudv"))


def test_cpudev_is_not_installed_by_default() -> None:
    """Without the fixture the test package is invisible: it lives only in a private target dir."""
    assert "cpudev" not in PluginRegistry().names("device")


# --- end to end -----------------------------------------------------------------------------


def _tiny_llama(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    LlamaForCausalLM(config).eval().save_pretrained(path)
    return path


@pytest.mark.skipif(importlib.util.find_spec("dsr1.auto") is None, reason="dsr1.auto (AutoModel) is not written yet")
def test_automodel_forward_on_cpudev(cpudev: dict[str, str], tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    from dsr1.auto import AutoModel

    ckpt = _tiny_llama(tmp_path / "tiny-llama")
    model = AutoModel.from_pretrained(ckpt, device="cpudev")
    assert type(model.pipeline.device).__name__ == "CpudevDevice"
    assert next(model.parameters()).device == torch.device("cpu")

    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(1))  # (B, T)
    with torch.inference_mode():
        got = model(ids).logits  # (B, T, V)
        on_cpu = AutoModel.from_pretrained(ckpt, device="cpu")(ids).logits
        want = LlamaForCausalLM.from_pretrained(ckpt).eval()(ids).logits
    assert got.shape == (2, 7, 96)
    assert torch.equal(got, on_cpu), "the same weights on the builtin cpu device give other logits"
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.skipif(importlib.util.find_spec("dsr1.auto") is None, reason="dsr1.auto (AutoModel) is not written yet")
@pytest.mark.parametrize("name, package", [("mlu", "torch_mlu"), ("npu", "torch_npu")])
def test_automodel_on_absent_accelerator_says_why(name: str, package: str, tmp_path: Path) -> None:
    """Selecting a device plugin whose hardware is missing fails at load with its probe's reason."""
    if name not in PluginRegistry().names("device"):
        pytest.skip(f"dsr1-device-{name} is not installed in this environment")
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    from dsr1.auto import AutoModel

    with pytest.raises(Dsr1Error, match=f"^{name} device is not available here: {package} is not installed"):
        AutoModel.from_pretrained(_tiny_llama(tmp_path / "tiny-llama"), device=name)
