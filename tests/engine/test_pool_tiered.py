"""The ``tiered`` pool: the plan (pure), the streamer, and tiny models streamed from disk on the CPU
giving the same logits and tokens as ``single``; its bad inputs."""
from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from dsr1.errors import Dsr1Error
from dsr1.pool import bandwidth
from dsr1.pool.plan import Unit, compact, make_plan, spread
from dsr1.pool.stream import UnitStreamer

from .conftest import make_checkpoint, padded_batch

RATES = {"device_read": 20.0, "host_to_device": 10.0, "host_read": 20.0, "disk_read": 2.0,  # GB/s: no measuring
         "cpu_matmul": 5.0}
BPS = {k: v * 1e9 for k, v in RATES.items()}
MB = 1 << 20


def units(n_layers: int = 8, layer: int = 100 * MB, head: int = 300 * MB, tied: bool = False) -> list[Unit]:
    return [Unit("model.embed_tokens", 0 if tied else head, "embed", movable=not tied)] + \
        [Unit(f"model.layers.{i}", layer, "layer") for i in range(n_layers)] + \
        [Unit("lm_head", 0 if tied else head, "head", movable=not tied)]


def plan(device_mb: float, cpu_mb: float, compute: str = "cuda", disk: str | None = None, tied: bool = False,
         cpu_compute: tuple[str, ...] = ("model.embed_tokens",)) -> Any:
    return make_plan(units(tied=tied), 10 * MB, compute, {"device": int(device_mb * MB), "cpu": int(cpu_mb * MB)},
                     BPS, list(cpu_compute), disk, "gpu_memory_gb")


# --- the plan ---------------------------------------------------------------------------------


def test_everything_fits_stays_resident() -> None:
    p = plan(2000, 0)
    assert not p.streams and set(p.tier.values()) == {"device"} and p.device_bytes() == 1410 * MB


def test_half_the_layers_stream_spread_evenly_within_the_budget() -> None:
    p = plan(1000, 10_000)
    assert p.tier["model.embed_tokens"] == "cpu-compute"  # the lookup reads a few rows: it runs on the CPU
    streamed = [u.name for u in p.streamed]
    assert p.slots == 2 and p.device_bytes() <= 1000 * MB  # double buffering, within the budget
    assert p.device_bytes() + 100 * MB > 1000 * MB  # the fewest units that fit: one layer fewer would not
    idx = sorted(int(n.split(".")[-1]) for n in streamed)
    assert idx == spread(8, len(idx)) and idx[-1] - idx[0] >= len(idx)  # not bunched at one end
    assert all(p.tier[n] == "cpu" for n in streamed)
    costs = p.step_costs()
    assert costs["host_to_device"] == pytest.approx(len(streamed) * 100 * MB / BPS["host_to_device"])
    assert p.floor_s() == pytest.approx(sum(costs.values()))


def test_host_budget_overflows_to_disk() -> None:
    p = plan(700, 350)  # 300 MiB of it taken by the embedding run on the CPU
    tiers = {p.tier[u.name] for u in p.streamed}
    assert tiers == {"disk"} or tiers == {"cpu", "disk"}
    assert p.bytes_on("cpu") + p.bytes_on("cpu-compute") <= 350 * MB
    assert p.step_costs()["disk"] > 0


def test_plan_refusals_name_the_unit_and_the_size() -> None:
    with pytest.raises(Dsr1Error, match=r"gpu_memory_gb 50\.0 MiB cannot hold .* streaming buffers of its largest "
                                        r"unit .*\(300\.0 MiB\); give gpu_memory_gb at least"):
        plan(50, 10_000)
    with pytest.raises(Dsr1Error, match="disk tier cannot be used: not safetensors"):
        plan(700, 0, disk="not safetensors")
    # tied embedding and head cannot move: they are counted as resident
    p = plan(1000, 10_000, tied=True)
    assert p.tier["model.embed_tokens"] == "device" and p.tier["lm_head"] == "device"


def test_cpu_compute_plans_only_resident_and_disk() -> None:
    p = make_plan(units(), 10 * MB, "cpu", {"device": 900 * MB, "cpu": 900 * MB}, BPS, [], None, "cpu_memory_gb")
    assert {p.tier[u.name] for u in p.streamed} == {"disk"} and p.step_costs()["host_to_device"] == 0
    assert p.host_bytes() == p.device_bytes() <= 900 * MB
    text = p.table()
    assert "disk, streamed" in text and "floor per decode step" in text and json.dumps(p.as_dict())


def cpu_layers_plan(cpu_matmul_gbps: float, cpu_mb: float = 10_000, allowed: bool = True) -> Any:
    """8 layers of 100 MiB with 400 MiB of them off the GPU (device 200, link 10 GB/s: the link decides)."""
    rates = {**BPS, "device_read": 200e9, "cpu_matmul": cpu_matmul_gbps * 1e9}
    names = ["model.embed_tokens"] + ([f"model.layers.{i}" for i in range(8)] + ["lm_head"] if allowed else [])
    return make_plan(units(), 10 * MB, "cuda", {"device": int(1000 * MB), "cpu": int(cpu_mb * MB)}, rates,
                     names, None, "gpu_memory_gb")


def test_layers_run_on_the_cpu_where_that_beats_streaming_them() -> None:
    streamed_only = cpu_layers_plan(5.0, allowed=False)
    assert not streamed_only.cpu_run_bytes() and streamed_only.streams
    p = cpu_layers_plan(5.0)
    on_cpu = [n for n, t in p.tier.items() if t == "cpu-compute" and n.startswith("model.layers.")]
    assert on_cpu and p.streams  # some run on the CPU, the rest still stream over the link
    assert p.overlapped_s() < 0.99 * streamed_only.overlapped_s()  # the shorter step is why
    costs = p.step_costs()
    assert costs["cpu_compute"] == pytest.approx(p.cpu_run_bytes() / 5e9) and costs["cpu_compute"] > 0
    # balanced: moving one layer more or one fewer to the CPU would not shorten the step
    for k in (len(on_cpu) - 1, len(on_cpu) + 1):
        trial = dict(p.tier)
        offloaded = [u.name for u in p.units if p.tier[u.name] in ("cpu", "disk", "cpu-compute") and u.kind == "layer"]
        for i, name in enumerate(offloaded):
            trial[name] = "cpu-compute" if i < k else "cpu"
        other = type(p)(p.compute, p.units, trial, p.fixed_bytes, p.budgets, p.bandwidth)
        assert other.overlapped_s() >= p.overlapped_s() * 0.99
    assert p.device_bytes() <= 1000 * MB and p.host_bytes() <= 10_000 * MB
    assert "run on the CPU" in p.table() and "overlapping compute" in p.table()
    record = json.loads(json.dumps(p.as_dict()))
    assert record["overlapped_s"] == pytest.approx(p.overlapped_s(), abs=1e-6)
    assert record["overlapped_s"] < record["floor_s"]


def test_a_slow_cpu_or_a_small_host_budget_keeps_layers_streaming() -> None:
    slow = cpu_layers_plan(0.5)  # the CPU reads weights twenty times slower than the link copies them
    assert not slow.cpu_run_bytes() and slow.streams
    tight = cpu_layers_plan(50.0, cpu_mb=450)  # the embedding's 300 MiB leave room for one layer
    assert tight.cpu_run_bytes() <= 100 * MB


def test_compact_names() -> None:
    assert compact(["model.layers.1", "model.layers.2", "model.layers.3", "model.layers.7", "lm_head"]) == \
        "model.layers.[1-3,7], lm_head"


# --- the streamer -----------------------------------------------------------------------------


class Odd(nn.Module):
    """Tensors of every kind the streamer packs: a transposed parameter, a buffer, a tied pair."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(6, 5).t(), requires_grad=False)  # (5, 6), strides (1, 5)
        self.register_buffer("scale", torch.rand(6) + 0.5)
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 6)
        self.c.weight = self.b.weight  # shared inside the unit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(x @ self.a) * self.scale)


@pytest.mark.parametrize("n", [3, 4])  # odd: the last unit and the first share a buffer across steps
def test_streamer_runs_units_from_disk_through_two_buffers(tmp_path: Path, n: int) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(*[Odd() for _ in range(n)]).requires_grad_(False)
    x = torch.randn(3, 5)
    outs = [m(x) for m in net]  # each unit on the same input: what matters is which weights it ran with
    files = {f"u{i}": tmp_path / f"u{i}.safetensors" for i in range(n)}  # the streamer writes them
    s = UnitStreamer([(f"u{i}", m, "disk") for i, m in enumerate(net)], torch.device("cpu"), files, 2)
    assert net[0].a.untyped_storage().data_ptr() == net[2].a.untyped_storage().data_ptr()  # one buffer, two units
    assert net[0].a.stride() == (1, 5) and net[0].c.weight is net[0].b.weight
    for _ in range(3):  # again: the cyclic prefetch brings the first units back for the next step
        for i, m in enumerate(net):
            assert torch.equal(m(x), outs[i])
    s.close()


# --- whole models on the CPU ------------------------------------------------------------------


def tiered(**options: Any) -> dict[str, Any]:
    return {"name": "tiered", "options": {"bandwidth_gbps": RATES, **options}}


def weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in model.state_dict().values()}.values())


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Six-layer checkpoints: streaming saves memory once there are more layers than buffers."""
    root = tmp_path_factory.mktemp("deep")
    return {k: make_checkpoint(root / k, k, layers=6) for k in ("qwen2", "qwen2-tied", "deepseek_v2")}


@pytest.mark.parametrize("kind", ["qwen2", "qwen2-tied", "deepseek_v2"])  # dense, tied, MLA + MoE
def test_streamed_model_matches_single(deep: dict[str, Path], kind: str) -> None:
    from dsr1.auto import AutoModel

    path = deep[kind]
    ref = AutoModel.from_pretrained(path)
    size = weight_bytes(ref)
    model = AutoModel.from_pretrained(path, pool=tiered(cpu_memory_gb=0.8 * size / 2**30))
    placement = model.runtime.placement
    assert placement.streams and {placement.tier[u.name] for u in placement.streamed} == {"disk"}
    assert placement.device_bytes() <= 0.8 * size
    files = list(placement.streamer.files.values())
    assert files and all(f.is_file() for f in files)
    batch = padded_batch(path)
    assert torch.equal(model(**batch).logits, ref(**batch).logits)
    want = ref.generate(**batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(**batch, max_new_tokens=6, do_sample=False), want)
    del model, placement
    gc.collect()
    assert not any(f.exists() for f in files)  # the pool removes the files it wrote, and only those


def test_a_budget_that_holds_everything_is_single(ckpts: dict[str, Path]) -> None:
    from dsr1.auto import AutoModel

    model = AutoModel.from_pretrained(ckpts["qwen2"], pool=tiered(cpu_memory_gb=1.0))
    assert not model.runtime.placement.streams and model.device == torch.device("cpu")
    assert model.runtime.placement.tier["model.layers.1"] == "device"


def test_bad_inputs(deep: dict[str, Path], tmp_path: Path) -> None:
    from dsr1.auto import AutoModel

    path = deep["qwen2"]
    with pytest.raises(Dsr1Error, match="cpu_memory_gb .* cannot hold .*; give cpu_memory_gb at least"):
        AutoModel.from_pretrained(path, pool=tiered(cpu_memory_gb=1e-5))
    with pytest.raises(Dsr1Error, match="gpu_memory_gb budgets a GPU, but this model computes on the cpu"):
        AutoModel.from_pretrained(path, pool=tiered(gpu_memory_gb=1))
    with pytest.raises(Dsr1Error, match="unknown bandwidth 'pcie'"):
        AutoModel.from_pretrained(path, pool={"name": "tiered", "options": {"bandwidth_gbps": {"pcie": 5}}})
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(Dsr1Error, match=f"disk_dir '{blocker}/d' is not a writable directory"):
        AutoModel.from_pretrained(path, pool=tiered(disk_dir=str(blocker / "d")))
    with pytest.raises(Dsr1Error, match="cpu_modules names 'model.norm', which is not a unit"):
        AutoModel.from_pretrained(path, pool=tiered(cpu_modules=["model.norm"]))
    with pytest.warns(UserWarning, match="cpu_memory_gb 100000.0 GiB is more than the machine has"):
        AutoModel.from_pretrained(path, pool=tiered(cpu_memory_gb=1e5))
    with pytest.raises(Dsr1Error, match="graph 'compile' cannot capture; use graph: eager"):
        AutoModel.from_pretrained(path, pool=tiered(cpu_memory_gb=3e-4), graph="compile")


def test_device_lists_need_a_pool_that_places_across_devices(deep: dict[str, Path]) -> None:
    from dsr1.auto import AutoModel

    path = deep["qwen2"]
    with pytest.raises(Dsr1Error, match=r"device \[cuda, cpu\] lets a pool run modules on cpu too, but pool "
                                        r"'single' keeps every module on the compute device; use pool: tiered"):
        AutoModel.from_pretrained(path, device=["cuda", "cpu"])
    with pytest.raises(Dsr1Error, match="pool tiered runs modules on the cpu beside the compute device, not on "
                                        "'cuda'; write device: \\[cuda, cpu\\]"):
        AutoModel.from_pretrained(path, device=["cpu", "cuda"], pool=tiered())
    with pytest.raises(Dsr1Error, match="must name distinct devices"):
        AutoModel.from_pretrained(path, device=["cpu", "cpu"], pool=tiered())


def test_a_layer_run_on_the_cpu_hooks_only_its_matrices(deep: dict[str, Path]) -> None:
    """What runs on the CPU in a layer: the modules holding a matrix (the projections); the
    norms, rope and attention around them run where the layer's caller is."""
    from dsr1.auto import AutoModel
    from dsr1.pool.tiered import _run_on_cpu

    model = AutoModel.from_pretrained(deep["qwen2"])
    ids = torch.tensor([[5, 9, 2, 7]])
    want = model(ids).logits
    layer = model.model.layers[1]
    _run_on_cpu(layer, torch.device("cpu"))
    hooked = {n for n, m in layer.named_modules() if m._forward_pre_hooks}
    matrices = {n for n, m in layer.named_modules()
                if any(t.dim() >= 2 for t in [*m._parameters.values(), *m._buffers.values()] if t is not None)}
    assert hooked == matrices and hooked and not any("norm" in n for n in hooked)
    assert torch.equal(model(ids).logits, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_a_checkpoint_that_fits_is_read_straight_to_the_gpu(deep: dict[str, Path]) -> None:
    """Budgets that hold the model even in float32: built on the GPU as ``single`` builds it."""
    from dsr1.auto import AutoModel

    model = AutoModel.from_pretrained(deep["qwen2"], device="cuda", pool=tiered())
    direct = model.pipeline.pool.direct
    assert direct is not None and direct.type == "cuda" and not model.runtime.placement.hooked
    assert {t.device.type for t in model.state_dict().values()} == {"cuda"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_runs_layers_on_the_cpu(deep: dict[str, Path]) -> None:
    """device [cuda, cpu], with a CPU the cost model finds fast: some layers run there, the rest
    stream or stay, and the tokens are ``single``'s."""
    from dsr1.auto import AutoModel

    path = deep["qwen2"]
    batch = {k: v.cuda() for k, v in padded_batch(path).items()}
    ref = AutoModel.from_pretrained(path, device="cuda")
    want = ref.generate(**batch, max_new_tokens=6)
    size = weight_bytes(ref)
    rates = {**RATES, "device_read": 1000.0, "cpu_matmul": 8.0}
    model = AutoModel.from_pretrained(path, device=["cuda", "cpu"], graph="eager", pool={
        "name": "tiered", "options": {"bandwidth_gbps": rates, "gpu_memory_gb": 0.6 * size / 2**30}})
    placement = model.runtime.placement
    on_cpu = [u.name for u in placement.units if placement.tier[u.name] == "cpu-compute" and u.kind == "layer"]
    assert on_cpu and model.device.type == "cuda" and model.streams_weights
    layer = model.get_submodule(on_cpu[0])
    devices = {n: t.device.type for n, t in layer.named_parameters()}
    assert {d for n, d in devices.items() if "norm" in n} == {"cuda"}
    assert {d for n, d in devices.items() if "proj" in n} == {"cpu"}
    torch.testing.assert_close(model.generate(**batch, max_new_tokens=6), want, atol=0, rtol=0)


def test_config_check_prints_the_plan(deep: dict[str, Path], tmp_path: Path) -> None:
    from dsr1.commands.config import resolve_report

    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"pool": tiered(cpu_memory_gb=3e-4)}))
    report = resolve_report(str(cfg), str(deep["qwen2"]))
    assert report["pool_plan"]["streaming_buffers"]["count"] == 2
    assert "floor per decode step" in report["pool_plan_text"]
    assert "before any quant plugin" in report["pool_plan_text"]


def test_bandwidths_are_measured_once_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake(device: torch.device, disk_dir: Path) -> dict[str, float]:
        calls.append(1)
        return {k: 1e9 * (i + 1) for i, k in enumerate(bandwidth.NAMES)}

    monkeypatch.setattr(bandwidth, "measure", fake)
    cache = tmp_path / "bw.json"
    first = bandwidth.bandwidths(torch.device("cpu"), tmp_path, cache=cache)
    again = bandwidth.bandwidths(torch.device("cpu"), tmp_path, {"disk_read": 7}, cache=cache)
    assert len(calls) == 1 and again["disk_read"] == 7e9 and again["device_read"] == first["device_read"]
    cache.write_text("{not json")
    bandwidth.bandwidths(torch.device("cpu"), tmp_path, cache=cache)
    assert len(calls) == 2 and json.loads(cache.read_text())  # a corrupt cache is measured again and rewritten


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("host_gb", [1.0, 2e-4])  # pinned host memory only; then part of it on disk
def test_cuda_streams_pinned_and_disk_units(deep: dict[str, Path], host_gb: float) -> None:
    from dsr1.auto import AutoModel

    path = deep["qwen2"]
    ref = AutoModel.from_pretrained(path, device="cuda")
    size = weight_bytes(ref)
    ref.generate(**{k: v.cuda() for k, v in padded_batch(path).items()}, max_new_tokens=1)  # cuBLAS workspaces
    before = torch.cuda.memory_allocated()
    model = AutoModel.from_pretrained(path, device="cuda", graph="eager",
                                      pool=tiered(gpu_memory_gb=0.6 * size / 2**30, cpu_memory_gb=host_gb))
    placement = model.runtime.placement
    tiers = {placement.tier[u.name] for u in placement.streamed}
    assert tiers == {"cpu"} if host_gb == 1.0 else "disk" in tiers
    assert placement.tier["model.embed_tokens"] == "cpu-compute" and model.device.type == "cuda"
    assert torch.cuda.memory_allocated() - before <= 0.6 * size  # the weights this load put on the GPU
    batch = {k: v.cuda() for k, v in padded_batch(path).items()}
    torch.testing.assert_close(model(**batch).logits, ref(**batch).logits, rtol=0, atol=0)
    want = ref.generate(**batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(**batch, max_new_tokens=6, do_sample=False), want)


def test_engine_loop_over_a_streamed_model(deep: dict[str, Path]) -> None:
    """The engine (continuous scheduler, paged KV, few blocks: preemptions) over streamed layers
    gives the tokens of the same requests on ``single``; on the CPU the pool offers no KV swap."""
    from dsr1.decoding.params import SamplingParams
    from dsr1.engine.engine import Engine

    prompts = [[5, 9, 13, 17, 21, 25, 29, 33][: 3 + i] for i in range(5)]

    def tokens(**pool: Any) -> tuple[list[list[int]], Engine]:
        engine = Engine.from_pretrained(deep["qwen2"], num_blocks=6, kvcache={"name": "paged",
                                                                              "options": {"block_size": 4}}, **pool)
        ids = [engine.add_request(p, SamplingParams(max_tokens=10, temperature=0.0)) for p in prompts]
        out = engine.run()
        return [list(out[i].output_ids) for i in ids], engine

    want, _ = tokens()
    got, engine = tokens(pool=tiered(cpu_memory_gb=3e-4))
    assert engine.model.runtime.placement.streams and engine.swap_policy is None
    assert got == want and sum(engine.requests_preempted.values()) > 0
