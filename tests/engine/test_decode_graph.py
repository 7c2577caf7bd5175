"""The static decode step behind graph ``cudagraph``: same tokens as the ordinary decode step.

CI has no GPU, so the CPU tests run the static step without capture (``capture: false``):
that is the code a CUDA graph records. The capture itself is tested where CUDA exists.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsr1.auto import AutoModel
from dsr1.errors import Dsr1Error
from dsr1.graph.cudagraph import DecodeGraphs

STATIC = {"name": "cudagraph", "options": {"capture": False}}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_static_step_decodes_the_same_tokens(ckpts: dict[str, Path], kind: str) -> None:
    """Padded batch, greedy: the static step (whole-cache attention, device-side slot) matches."""
    ordinary = AutoModel.from_pretrained(ckpts[kind])
    static = AutoModel.from_pretrained(ckpts[kind], graph=STATIC)
    assert isinstance(static.decode_graphs, DecodeGraphs)
    ids = torch.tensor([[0, 0, 5, 17, 33, 41, 42, 60], [3, 9, 12, 44, 45, 46, 47, 48]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
    want = ordinary.generate(ids, mask, max_new_tokens=20, ignore_eos=True)  # mistral: past its window of 6
    got = static.generate(ids, mask, max_new_tokens=20, ignore_eos=True)
    assert torch.equal(got, want)


def test_static_step_logits_match(ckpts: dict[str, Path]) -> None:
    """Step logits of the static path equal full forwards of the growing sequence."""
    static = AutoModel.from_pretrained(ckpts["llama"], graph=STATIC)
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    out = static.generate(ids, max_new_tokens=8, ignore_eos=True)
    with torch.inference_mode():
        full = static(out).logits  # (1, T, V)
    assert torch.equal(full[0, ids.shape[1] - 1 : -1].argmax(-1), out[0, ids.shape[1] :])


def test_graph_is_reused_across_calls(ckpts: dict[str, Path]) -> None:
    static = AutoModel.from_pretrained(ckpts["llama"], graph=STATIC)
    ids = torch.tensor([[1, 40, 41, 42]])
    first = static.generate(ids, max_new_tokens=5, ignore_eos=True)
    second = static.generate(ids, max_new_tokens=9, ignore_eos=True)  # same 256-slot capacity: same graph
    assert len(static.decode_graphs.graphs) == 1
    assert torch.equal(second[:, : first.shape[1]], first)


def test_graphs_follow_reallocated_buffers(ckpts: dict[str, Path]) -> None:
    """A larger batch reallocates the cache (a longer call regrows the rotary tables): graphs captured
    against the old buffers are dropped, never replayed, and outputs stay exact."""
    static = AutoModel.from_pretrained(ckpts["llama"], graph=STATIC)
    ordinary = AutoModel.from_pretrained(ckpts["llama"])
    graphs = static.decode_graphs
    ids = torch.tensor([[1, 40, 41, 42]])
    static.generate(ids, max_new_tokens=4, ignore_eos=True)
    first = graphs.buffers
    long_ids = torch.randint(3, 200, (2, 60), generator=torch.Generator().manual_seed(0))
    got = static.generate(long_ids, max_new_tokens=6, ignore_eos=True)  # batch 2: a new cache
    assert graphs.buffers != first and list(graphs.graphs) == [(2, int(static.pipeline.kvcache.capacity))]
    assert torch.equal(got, ordinary.generate(long_ids, max_new_tokens=6, ignore_eos=True))


def test_capture_needs_cuda(ckpts: dict[str, Path]) -> None:
    with pytest.raises(Dsr1Error, match="graph 'cudagraph' captures CUDA graphs.*use graph 'compile'"):
        AutoModel.from_pretrained(ckpts["llama"], graph="cudagraph")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager_capture", "compiled_capture"])
def test_captured_graph_decodes_the_same_tokens_on_cuda(ckpts: dict[str, Path], compiled: bool) -> None:
    ordinary = AutoModel.from_pretrained(ckpts["llama"], device="cuda")
    graph = {"name": "cudagraph", "options": {"compile": compiled}}
    captured = AutoModel.from_pretrained(ckpts["llama"], device="cuda", graph=graph)
    ids = torch.tensor([[1, 40, 41, 42, 43], [0, 0, 7, 8, 9]], device="cuda")
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], device="cuda")
    for n in (12, 30):  # a second call replays the graph captured by the first
        assert torch.equal(captured.generate(ids, mask, max_new_tokens=n, ignore_eos=True),
                           ordinary.generate(ids, mask, max_new_tokens=n, ignore_eos=True))


def test_compiled_step_only_up_to_its_batch_limit(ckpts: dict[str, Path]) -> None:
    """compile: true uses the compiled step for batch <= compile_max_batch, the plain one above."""
    graph = {"name": "cudagraph", "options": {"capture": False, "compile": True, "compile_max_batch": 1}}
    model = AutoModel.from_pretrained(ckpts["llama"], graph=graph, device="engine-test-device")
    graphs = model.decode_graphs
    assert graphs.compiled is not None and graphs.compiled is not graphs.step
    ids = torch.tensor([[1, 40, 41, 42], [1, 50, 51, 52]])
    torch._dynamo.reset()
    want = AutoModel.from_pretrained(ckpts["llama"]).generate(ids, max_new_tokens=4, ignore_eos=True)
    steps = {}
    for rows in (ids[:1], ids):  # batch 2 reallocates the cache, so its call drops batch 1's step
        assert torch.equal(model.generate(rows, max_new_tokens=4, ignore_eos=True), want[: len(rows)])
        steps.update({b: g.step for (b, _), g in graphs.graphs.items()})
    assert steps[1] is graphs.compiled and steps[2] is graphs.step


class _NoCompileDevice:
    """A CPU device that declares no torch.compile backend (what kernel fusion must not ignore)."""

    torch_device_type = "cpu"

    def compile_backend(self) -> None:
        return None

    def autotune_settings(self, strategy: str) -> dict[str, object]:
        return {}


@pytest.mark.parametrize("graph", ["compile", "cudagraph"])
def test_kernel_fusion_without_a_compile_backend(ckpts: dict[str, Path], graph: str) -> None:
    """Refused with a clear message, or unfused with a warning when the config allows fallback."""
    from dsr1.graph.compile import CompileGraph, CompileOptions
    from dsr1.graph.cudagraph import CudaGraphOptions, CudaGraphPass

    model = AutoModel.from_pretrained(ckpts["llama"])
    make = {"compile": lambda **o: CompileGraph(CompileOptions(**o)),
            "cudagraph": lambda **o: CudaGraphPass(CudaGraphOptions(capture=False, compile=True, **o))}[graph]
    with pytest.raises(Dsr1Error, match="has no torch.compile backend.*set fallback: true"):
        make().apply(model, _NoCompileDevice())
    with pytest.warns(UserWarning, match="running the unfused decode step"):
        out = make(fallback=True).apply(model, _NoCompileDevice())
    assert not hasattr(out, "compiled_step")
    if graph == "cudagraph":
        assert out.decode_graphs.compiled is None


def test_hardware_fallback_reaches_the_graph_pass() -> None:
    from dsr1.config import load_config

    cfg = load_config({"hardware": {"type": "cpu", "optimizer": {"kernel_fusion": True, "fallback": True}}})
    assert cfg.choice("graph").options == {"tiling_strategy": "fixed", "fallback": True}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")
def test_many_successive_captured_generates_on_cuda() -> None:
    """Mixed batch sizes and lengths, each call regrowing or reusing the cache and rotary
    tables (the second call keeps the (batch, capacity) of the first with longer rotary
    tables: the case that once closed the graph pool and broke every later call): every call
    matches the eager path, and a failing step leaves the model usable."""
    ordinary = AutoModel.from_pretrained("dsr1-tiny", device="cuda")
    captured = AutoModel.from_pretrained("dsr1-tiny", device="cuda", graph="cudagraph")
    rng = torch.Generator().manual_seed(0)
    for i, (b, t, n) in enumerate([(4, 300, 8), (4, 320, 8), (2, 100, 6), (4, 60, 8), (8, 400, 4), (8, 410, 4),
                                   (1, 20, 10), (3, 200, 5), (3, 220, 5), (4, 300, 8)]):
        ids = torch.randint(3, 200, (b, t), generator=rng).cuda()
        mask = torch.ones_like(ids)
        mask[0, : t // 3] = 0  # a left-padded row
        want = ordinary.generate(ids, mask, max_new_tokens=n, ignore_eos=True)
        assert torch.equal(captured.generate(ids, mask, max_new_tokens=n, ignore_eos=True), want), f"call {i}"
    graphs = captured.decode_graphs
    real_step = graphs.step

    def failing(*args: object) -> torch.Tensor:
        raise RuntimeError("injected failure")

    graphs.step = failing
    graphs.graphs.clear()
    ids = torch.randint(3, 200, (2, 30), generator=rng).cuda()
    with pytest.raises(RuntimeError, match="injected failure"):
        captured.generate(ids, max_new_tokens=4, ignore_eos=True)
    graphs.step = real_step
    graphs.graphs.clear()
    assert torch.equal(captured.generate(ids, max_new_tokens=4, ignore_eos=True),
                       ordinary.generate(ids, max_new_tokens=4, ignore_eos=True))
