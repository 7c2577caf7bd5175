"""Under a torchrun launch of several ranks each process takes the device its LOCAL_RANK names (one GPU per
rank on a machine); an explicit index, or a vendor device's ``device_index`` option, still wins. Without a
launch the first device, as before."""
from __future__ import annotations

import pytest
import torch

from dsr1_sdk.reference.device import CpuReferenceDevice


class GpuLike(CpuReferenceDevice):
    """The reference device under another device type (torch.device needs no such device to exist)."""

    torch_device_type = "cuda"


@pytest.mark.parametrize(("env", "want"), [({}, 0), ({"WORLD_SIZE": "1", "LOCAL_RANK": "0"}, 0),
                                           ({"WORLD_SIZE": "4", "RANK": "6", "LOCAL_RANK": "2"}, 2)])
def test_the_default_device_is_the_rank_s_own(env: dict[str, str], want: int, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    device = GpuLike()
    assert device.local_index() == want
    assert device.torch_device() == torch.device("cuda", want)
    assert device.torch_device(0) == torch.device("cuda", 0)  # an explicit index wins
    assert CpuReferenceDevice().torch_device() == torch.device("cpu")


def test_a_vendor_device_s_index_option_wins_over_the_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    from dsr1_device_mlu import MluDevice

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert MluDevice()._index(None) == 1
    assert MluDevice(MluDevice.Options(device_index=0))._index(None) == 0
    assert MluDevice()._index(3) == 3


def test_tensor_1_is_the_single_device_path(tmp_path: object) -> None:
    """``parallel: {tensor: 1, pipeline: 1}`` builds the same modules and computes bit for bit what no
    ``parallel`` key does: nothing is wrapped, no process group is joined."""
    import torch.distributed as dist

    from dsr1.auto import AutoModel
    from dsr1.parallel.tensor import ParallelLMHead, RowParallelLinear, VocabParallelEmbedding

    plain = AutoModel.from_pretrained("dsr1-tiny")
    one = AutoModel.from_pretrained("dsr1-tiny", {"parallel": {"tensor": 1, "pipeline": 1}})
    assert [type(m) for m in one.modules()] == [type(m) for m in plain.modules()]
    assert not any(isinstance(m, (RowParallelLinear, VocabParallelEmbedding, ParallelLMHead)) for m in one.modules())
    assert not (dist.is_available() and dist.is_initialized())
    ids = torch.tensor([[5, 17, 33, 9, 64]])
    with torch.no_grad():
        assert torch.equal(one(ids).logits, plain(ids).logits)
    assert torch.equal(one.generate(ids, max_new_tokens=6, ignore_eos=True),
                       plain.generate(ids, max_new_tokens=6, ignore_eos=True))
