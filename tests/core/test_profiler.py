"""``monitor: profiler`` and ``dsr1 profile``.

The statistics are checked against fake clocks (exact figures, no timing), the sub-block
attribution on a toy module tree whose modules advance the fake clock by known amounts, the
sampling rate by which steps were timed and by the hooks being absent from unsampled steps, the
Chrome trace and ``/metrics`` by their shape, and ``dsr1 profile`` end to end on dsr1-tiny (CPU).
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from dsr1.cli import main
from dsr1.errors import Dsr1Error
from dsr1.monitor.profiler import HostClock, ProfilerMonitor, ProfilerOptions, RunningStat, bucket, classify
from dsr1_sdk.testing.monitor import MonitorConformance


class FakeClock:
    """Seconds that move only when a test (or a toy module) says so."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def profiler(clock: FakeClock, every: int = 1, keep: int = 64, layers: int | str = 1) -> ProfilerMonitor:
    return ProfilerMonitor(ProfilerOptions(every=every, keep=keep, layers=layers), clock=HostClock(clock), wall=clock)


class Tick(nn.Module):
    """A leaf that takes ``cost`` fake seconds and holds ``n`` float32 weights."""

    def __init__(self, clock: FakeClock, cost: float, n: int = 4) -> None:
        super().__init__()
        self.clock, self.cost = clock, cost
        self.weight = nn.Parameter(torch.zeros(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.t += self.cost
        return x


class Attn(nn.Module):
    """qkv (3 s), its own work (rope, cache, attention: 4 s), o_proj (5 s), a per-head norm (1 s)."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock
        self.qkv_proj, self.q_norm, self.o_proj = Tick(clock, 3, 12), Tick(clock, 1, 1), Tick(clock, 5, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.q_norm(self.qkv_proj(x))
        self.clock.t += 4
        return self.o_proj(x)


class Block(nn.Module):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.input_layernorm, self.self_attn = Tick(clock, 2, 2), Attn(clock)
        self.post_attention_layernorm, self.mlp = Tick(clock, 2, 2), Tick(clock, 7, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.post_attention_layernorm(self.self_attn(self.input_layernorm(x))))


class Toy(nn.Module):
    """Two layers named as the llama builder names them: ``model.layers.N.self_attn.qkv_proj``..."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = Tick(clock, 1, 8)
        self.model.layers = nn.ModuleList([Block(clock), Block(clock)])
        self.model.norm = Tick(clock, 2, 2)
        self.lm_head = Tick(clock, 11, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(x)
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(self.model.norm(x))


#: per forward of :class:`Toy`, fake seconds by operator (two layers; sampling is the 13 s a test adds)
TOY_SECONDS = {"embed": 1, "norm": 2 * (2 + 1 + 2) + 2, "qkv": 2 * 3, "attention": 2 * 4, "o_proj": 2 * 5,
               "mlp": 2 * 7, "lm_head": 11, "sampling": 13}
#: weight bytes by operator (float32)
TOY_BYTES = {"embed": 32, "norm": 4 * (2 * (2 + 1 + 2) + 2), "qkv": 2 * 48, "o_proj": 2 * 24, "mlp": 2 * 96,
             "lm_head": 32}


def toy_profiler(every: int = 1, layers: int | str = 1) -> tuple[FakeClock, Toy, ProfilerMonitor]:
    """A fake clock, a :class:`Toy` that advances it, and a profiler on that clock attached to the toy."""
    clock = FakeClock()
    toy = Toy(clock)
    mon = profiler(clock, every=every, layers=layers)
    mon.attach(toy)
    return clock, toy, mon


def toy_step(mon: ProfilerMonitor, toy: Toy, clock: FakeClock, batch: int = 1, context: int = 9) -> None:
    mon.begin_step(batch, context, batch)
    clock.t += 0.5  # scheduling work before the forward
    toy(torch.zeros(1))
    clock.t += 13  # sampling
    mon.end_step()


# --- statistics against a fake clock -----------------------------------------------------------


@pytest.mark.parametrize(("n", "want"), [(0, 1), (1, 1), (2, 2), (3, 4), (8, 8), (9, 16), (1000, 1024)])
def test_bucket_is_the_power_of_two_at_or_above(n: int, want: int) -> None:
    assert bucket(n) == want


def test_classify_names_the_llama_sub_blocks() -> None:
    got = {n: classify(n) for n in ("model.layers.3.input_layernorm", "model.layers.3.self_attn",
                                    "model.layers.3.self_attn.qkv_proj", "model.layers.3.self_attn.o_proj",
                                    "model.layers.3.mlp", "model.layers.3.mlp.down_proj", "lm_head", "model.norm",
                                    "model.layers.3")}
    assert got == {"model.layers.3.input_layernorm": "norm", "model.layers.3.self_attn": "attention",
                   "model.layers.3.self_attn.qkv_proj": "qkv", "model.layers.3.self_attn.o_proj": "o_proj",
                   "model.layers.3.mlp": "mlp", "model.layers.3.mlp.down_proj": None, "lm_head": "lm_head",
                   "model.norm": "norm", "model.layers.3": None}


#: steps as (batch size, context, tokens fed, seconds), and the buckets they fall in.
STEPS = {
    "decode_one_bucket": [(1, 9, 1, 0.5), (1, 10, 1, 0.75), (1, 11, 1, 1.5)],
    "mixed": [(3, 40, 60, 2.0), (2, 5, 2, 0.25), (4, 7, 4, 0.5), (3, 33, 3, 1.0), (4, 64, 4, 3.0), (1, 1, 1, 0.125)],
}


@pytest.mark.parametrize("case", list(STEPS))
def test_step_latency_mean_and_variance_per_bucket(case: str) -> None:
    clock = FakeClock()
    mon = profiler(clock, every=1000)  # no step sampled: latency only
    want: dict[tuple[str, int, int], list[float]] = {}
    for b, c, t, seconds in STEPS[case]:
        mon.begin_step(b, c, t)
        clock.t += seconds
        mon.end_step()
        want.setdefault(("decode" if t == b else "prefill", bucket(b), bucket(c)), []).append(seconds)
    got = {(s.phase, s.batch_bucket, s.context_bucket): s for s in mon.operator_stats() if s.operator == "step"}
    assert sorted(got) == sorted(want)
    for key, values in want.items():
        assert got[key].count == len(values), key
        assert got[key].mean_s == pytest.approx(statistics.fmean(values), rel=1e-12), key
        assert got[key].variance_s == pytest.approx(statistics.pvariance(values), rel=1e-12, abs=1e-15), key
    json.dumps(mon.summary())


def test_running_stat_merge_equals_one_pass() -> None:
    values = [0.5, 2.0, 0.25, 7.0, 1.5, 3.25, 0.75]
    a, b, whole = RunningStat(), RunningStat(), RunningStat()
    for i, v in enumerate(values):
        (a if i < 3 else b).add(v)
        whole.add(v)
    a.merge(b)
    assert (a.count, a.mean) == (whole.count, pytest.approx(whole.mean))
    assert a.variance == pytest.approx(statistics.pvariance(values))


def test_operators_of_a_sampled_step_exclusive_of_their_timed_children() -> None:
    clock, toy, mon = toy_profiler()
    for _ in range(3):
        toy_step(mon, toy, clock)
    ops = {s.operator: s for s in mon.operator_stats() if (s.phase, s.batch_bucket, s.context_bucket) ==
           ("decode", 1, 16)}
    for op, seconds in TOY_SECONDS.items():
        assert ops[op].count == 3 and ops[op].mean_s == pytest.approx(seconds), (op, ops[op])
        assert ops[op].variance_s == pytest.approx(0.0, abs=1e-12), op
    assert ops["sampled.step"].mean_s == pytest.approx(sum(TOY_SECONDS.values()) + 0.5)
    assert mon.weight_bytes == TOY_BYTES
    shares = {op: v["share"] for op, v in mon.summary()["profile"]["buckets"][0]["operators"].items()}
    assert shares["mlp"] == pytest.approx(14 / (sum(TOY_SECONDS.values()) + 0.5))


def test_a_sampled_step_times_one_layer_in_turn_and_scales_it_to_the_stack() -> None:
    clock, toy, mon = toy_profiler()
    toy.model.layers[1].mlp.cost = 9  # the layers differ: the turns average to the stack's true time
    hooked = []
    for _ in range(4):
        mon.begin_step(1, 9, 1)
        hooked.append([bool(layer.mlp._forward_pre_hooks) for layer in toy.model.layers])
        assert toy.lm_head._forward_pre_hooks and toy.model.embed_tokens._forward_pre_hooks  # outside: always
        toy(torch.zeros(1))
        clock.t += 13
        mon.end_step()
    assert hooked == [[True, False], [False, True]] * 2
    assert [e["layers"] for e in mon.samples] == [[0], [1]] * 2
    ops = {s.operator: s for s in mon.operator_stats() if s.phase == "decode"}
    assert ops["mlp"].mean_s == pytest.approx(7 + 9)  # 2 x 7 and 2 x 9, one layer timed per step
    for op in ("qkv", "o_proj", "attention", "embed", "lm_head", "sampling"):
        assert ops[op].mean_s == pytest.approx(TOY_SECONDS[op]), op
    spans = mon.trace()["traceEvents"]
    assert sum(1 for e in spans if e.get("cat") == "mlp") == 4  # one mlp span per sampled step


@pytest.mark.parametrize("every", [1, 3, 4])
def test_every_n_times_exactly_the_nth_steps_and_hooks_only_then(every: int) -> None:
    clock, toy, mon = toy_profiler(every=every)
    hooked: list[int] = []
    for i in range(1, 13):
        mon.begin_step(1, 9, 1)
        if toy.lm_head._forward_pre_hooks:  # an unsampled step runs the model with no hook at all
            hooked.append(i)
        toy(torch.zeros(1))
        mon.end_step()
        assert not toy.lm_head._forward_pre_hooks and not toy.lm_head._forward_hooks, "hooks left after a step"
    want = [i for i in range(1, 13) if i % every == 0]
    assert hooked == want
    assert [e["step"] for e in mon.stream() if e["event"] == "profile.step"] == want
    steps = {s.operator: s.count for s in mon.operator_stats()}
    assert steps["step"] == 12 and steps["sampled.step"] == len(want) and steps["mlp"] == len(want)


def test_a_forward_that_raises_leaves_no_hooks_and_no_open_spans() -> None:
    clock, toy, mon = toy_profiler()
    mon.begin_step(1, 4, 1)
    try:
        with pytest.raises(RuntimeError):
            toy.model.layers[0].self_attn.qkv_proj.register_forward_hook(
                lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
            toy(torch.zeros(1))
    finally:
        mon.end_step()
    assert not toy.lm_head._forward_pre_hooks
    json.dumps(mon.summary())
    toy.model.layers[0].self_attn.qkv_proj._forward_hooks.clear()
    toy_step(mon, toy, clock)  # the next sampled step starts clean
    assert {s.operator: s.count for s in mon.operator_stats()}["lm_head"] == 1


# --- exports -----------------------------------------------------------------------------------


def sampled_monitor(steps: int = 3, layers: int | str = 1) -> ProfilerMonitor:
    clock, toy, mon = toy_profiler(layers=layers)
    for i in range(steps):
        toy_step(mon, toy, clock, batch=2, context=20 + i)
    return mon


def test_chrome_trace_is_well_formed(tmp_path: Path) -> None:
    mon = sampled_monitor(layers="all")
    path = mon.write_trace(tmp_path / "trace.json")
    data = json.loads(path.read_text())
    events = data["traceEvents"]
    steps = [e for e in events if e.get("ph") == "X" and e["cat"] == "step"]
    ops = [e for e in events if e.get("ph") == "X" and e["cat"] != "step"]
    assert len(steps) == 3 and len(ops) == 3 * 17  # 17 timed modules in the toy, per forward
    for e in steps + ops:
        assert {"name", "ph", "ts", "dur", "pid", "tid"} <= set(e) and e["dur"] >= 0, e
    for s in steps:  # each step's operators lie inside it
        inner = [o for o in ops if s["ts"] <= o["ts"] and o["ts"] + o["dur"] <= s["ts"] + s["dur"] + 1e-6]
        assert len(inner) == 17, s
    assert {o["cat"] for o in ops} == set(TOY_SECONDS) - {"sampling"}
    assert not list(tmp_path.glob(".*tmp*")), "a temp file was left"


def test_trace_never_replaces_a_file_it_did_not_write(tmp_path: Path) -> None:
    mon = sampled_monitor(1)
    theirs = tmp_path / "trace.json"
    theirs.write_text('{"traceEvents": []}')
    with pytest.raises(Dsr1Error, match="not a trace dsr1 wrote"):
        mon.write_trace(theirs)
    assert theirs.read_text() == '{"traceEvents": []}'
    ours = mon.write_trace(tmp_path / "ours.json")
    mon.write_trace(ours)  # its own: replaced
    assert json.loads(ours.read_text())["otherData"]["writer"] == "dsr1.monitor.profiler"


def test_metrics_show_per_operator_latency() -> None:
    pytest.importorskip("prometheus_client")
    from dsr1.monitor.timing import TimingMonitor
    from dsr1.serve.metrics import ServerMetrics

    mon = sampled_monitor()
    text = ServerMetrics(lambda: {}, lambda: mon, lambda: False).render()[0].decode()
    labels = 'batch_bucket="2",context_bucket="32"'  # prometheus-client writes labels sorted by name
    for op in ("step", "mlp", "qkv", "attention", "sampling"):
        line = f'dsr1_operator_latency_mean_seconds{{{labels},operator="{op}",phase="decode"}}'
        assert line in text, f"{line} not in /metrics"
    assert f'dsr1_operator_latency_mean_seconds{{{labels},operator="mlp",phase="decode"}} 14.0' in text
    assert f'dsr1_operator_latency_steps{{{labels},operator="mlp",phase="decode"}} 3.0' in text
    plain = ServerMetrics(lambda: {}, lambda: TimingMonitor(), lambda: False).render()[0].decode()
    assert "dsr1_operator_latency" not in plain


class TestProfilerConformance(MonitorConformance):
    plugin = "profiler"
    options = {"every": 2}


def test_generate_with_the_profiler_samples_every_nth_engine_step(tmp_path: Path) -> None:
    from dsr1.auto import AutoModel

    model = AutoModel.from_pretrained("dsr1-tiny", {"device": "cpu", "monitor": {"name": "profiler",
                                                                                 "options": {"every": 2}}})
    ids = torch.tensor([[5, 17, 33, 9], [64, 12, 99, 7]])
    model.generate(ids, max_new_tokens=5, ignore_eos=True, pad_token_id=0)  # 1 prefill + 4 decode steps
    mon = model.pipeline.monitor
    assert mon.steps_seen == 5
    assert [e["step"] for e in mon.stream() if e["event"] == "profile.step"] == [2, 4]
    stats = {(s.phase, s.operator): s.count for s in mon.operator_stats()}
    assert stats[("prefill", "step")] == 1 and stats[("decode", "step")] == 4
    for op in ("norm", "qkv", "attention", "o_proj", "mlp", "lm_head", "sampling"):
        assert stats[("decode", op)] == 2, op
    assert not any(m._forward_pre_hooks for m in model.modules()), "hooks left on the model"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_events_time_the_operators_and_leave_the_tokens_alone() -> None:
    from dsr1.auto import AutoModel

    ids = torch.tensor([[5, 17, 33, 9], [64, 12, 99, 7]]).cuda()
    want = AutoModel.from_pretrained("dsr1-tiny", device="cuda").generate(ids, max_new_tokens=6, ignore_eos=True)
    model = AutoModel.from_pretrained("dsr1-tiny", {"device": "cuda", "monitor": {"name": "profiler",
                                                                                  "options": {"every": 2}}})
    assert torch.equal(model.generate(ids, max_new_tokens=6, ignore_eos=True), want)
    stats = {(s.phase, s.operator): s for s in model.pipeline.monitor.operator_stats()}
    for op in ("qkv", "attention", "mlp", "lm_head"):
        assert stats[("decode", op)].count >= 2 and stats[("decode", op)].mean_s > 0, op
    assert not any(m._forward_pre_hooks for m in model.modules()), "hooks left on the model"


# --- dsr1 profile ------------------------------------------------------------------------------


def test_dsr1_profile_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "prof"
    argv = ["profile", "--model", "dsr1-tiny", "--device", "cpu", "--batch-size", "1,2", "--steps", "3",
            "--prompt-len", "4", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "batch 1:" in printed and "batch 2:" in printed and "mlp" in printed and "GB/s" in printed
    report = json.loads((out / "profile.json").read_text())
    assert [r["batch_size"] for r in report["results"]] == [1, 2]
    for r in report["results"]:
        assert r["sampled_steps"] == 3
        ops = {row["operator"]: row for row in r["operators"]}
        assert {"norm", "qkv", "attention", "o_proj", "mlp", "lm_head", "sampling"} <= set(ops)
        assert ops["mlp"]["weight_bytes"] > 0 and ops["attention"]["gb_per_s"] is None
    assert (out / "profile.png").read_bytes().startswith(b"\x89PNG")
    for b in (1, 2):
        assert json.loads((out / f"trace-b{b}.json").read_text())["traceEvents"]
    assert main([*argv[:6], "2", "--steps", "1", *argv[9:]]) == 0, "a second run replaces its own files"
    assert [r["batch_size"] for r in json.loads((out / "profile.json").read_text())["results"]] == [2]


class _Kept:
    """What ``decode_rows`` reads of a profiler: its stats, weight bytes and kept samples."""

    def __init__(self, samples: list[dict[str, Any]]) -> None:
        self.samples = samples
        self.weight_bytes = {"mlp": 10**9}
        self.step_stats = {("decode", 1, 1): RunningStat()}
        ops: dict[str, RunningStat] = {"step": RunningStat()}
        for x in samples:
            self.step_stats[("decode", 1, 1)].add(x["seconds"])
            ops["step"].add(x["seconds"])
            for op, t in x["operators"].items():
                ops.setdefault(op, RunningStat()).add(t)
        self.op_stats = {("decode", 1, 1): ops}

    def operator_stats(self) -> list[Any]:
        return []


def test_dsr1_profile_reports_medians_not_a_stall_times_the_layers() -> None:
    """One sampled step whose timed layer stalled (its o_proj 50x, scaled by the layer count as every layer
    sub-block is) moves the mean far, not the median: shares come from medians and add up to the step."""
    from dsr1.commands.profile import decode_rows

    samples = [{"phase": "decode", "seconds": 0.010, "operators": {"mlp": 0.006, "o_proj": 0.001, "norm": 0.003}}
               for _ in range(9)]
    samples[0] = {"phase": "decode", "seconds": 0.014, "operators": {"mlp": 0.006, "o_proj": 0.050, "norm": 0.003}}
    samples.append({"phase": "prefill", "seconds": 9.0, "operators": {"mlp": 5.0}})  # not a decode step
    step, rows = decode_rows(_Kept(samples))
    by_op = {r["operator"]: r for r in rows}
    assert step["sampled_step_median_s"] == pytest.approx(0.010)
    assert by_op["o_proj"]["median_s"] == pytest.approx(0.001) and by_op["o_proj"]["mean_s"] > 0.006
    assert by_op["mlp"]["share"] == pytest.approx(0.6) and by_op["mlp"]["gb_per_s"] == pytest.approx(1 / 0.006)
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert [r["operator"] for r in rows] == ["mlp", "norm", "o_proj"]


def _bad(args: list[str], tmp_path: Path) -> list[str]:
    return ["profile", "--out", str(tmp_path / "out"), "--quiet", *args]


BAD: dict[str, tuple[list[str], str]] = {
    "zero_batch": (["--batch-size", "0"], "--batch-size must be comma-separated integers >= 1"),
    "word_batch": (["--batch-size", "1,eight"], "--batch-size must be comma-separated integers >= 1"),
    "empty_batch": (["--batch-size", ","], "--batch-size must be comma-separated integers >= 1"),
    "zero_steps": (["--steps", "0"], "--steps must be an integer >= 1"),
    "no_sampled_step": (["--steps", "2", "--every", "3"], "samples no step"),
    "zero_layers": (["--layers", "0"], "--layers must be an integer >= 1 or 'all'"),
    "missing_model": (["--model", "/nonexistent/dsr1-model"], "/nonexistent/dsr1-model"),
    "past_context": (["--steps", "600"], "--steps 600 + 1 (the prefill's token) exceeds the model's context"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_dsr1_profile_bad_input_is_one_line_and_exit_2(case: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    args, says = BAD[case]
    assert main(_bad(args, tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err
    assert not (tmp_path / "out").exists(), "nothing is written on bad input"


def test_dsr1_profile_never_replaces_files_it_did_not_write(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "profile.png").write_bytes(b"someone's chart")
    assert main(["profile", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "profile.png exists and was not written by dsr1 profile" in err
    assert (out / "profile.png").read_bytes() == b"someone's chart"
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["profile", "--out", str(afile), "--quiet"]) == 2
    assert "is a file" in capsys.readouterr().err


class Lin(nn.Module):
    """A layer with real tensors, named as the llama builder names its sub-blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(8)
        self.self_attn = nn.Module()
        self.self_attn.qkv_proj = nn.Linear(8, 8)
        self.mlp = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.mlp(self.self_attn.qkv_proj(self.input_layernorm(x))))


@pytest.mark.parametrize("first_sampled", [True, False])
def test_compiled_code_recompiles_at_most_once_for_the_hooks_and_never_keeps_a_mark(first_sampled: bool) -> None:
    """Hooks come and go with sampled steps; dynamo traces no mark into compiled code."""
    import torch._dynamo

    torch._dynamo.reset()
    graphs: list[Any] = []

    def backend(gm: Any, example_inputs: Any) -> Any:
        graphs.append(gm)
        return gm.forward

    model = Lin()
    step = torch.compile(model, backend=backend)
    mon = ProfilerMonitor(ProfilerOptions(every=2))
    mon.attach(model)
    x = torch.randn(2, 8)
    want = model(x)
    if first_sampled:  # step 1 without the model: the first compiled call is in step 2, a sampled one
        mon.begin_step(2, 8, 2)
        mon.end_step()
    compiled = []
    for _ in range(6):
        mon.begin_step(2, 8, 2)
        torch.testing.assert_close(step(x), want)
        mon.end_step()
        compiled.append(len(graphs))
    # dynamo guards on a hook dict that was not empty when it traced: code first traced in a sampled
    # step is traced once more without the hooks, and never again
    assert compiled == ([1] + [2] * 5 if first_sampled else [1] * 6), compiled
    ops = {s.operator for s in mon.operator_stats()}
    assert "sampled.step" in ops and not ops & {"qkv", "mlp", "lm_head", "norm"}, ops
    torch._dynamo.reset()


def test_the_paged_engine_reports_its_steps_by_bucket() -> None:
    from dsr1.engine.engine import Engine
    from dsr1.interfaces import SamplingParams

    engine = Engine.from_pretrained("dsr1-tiny", {"device": "cpu", "monitor": {"name": "profiler",
                                                                               "options": {"every": 1}}},
                                    num_blocks=8)
    outs = engine.generate([[5, 17, 33], [64, 12, 99, 7, 8, 9]], SamplingParams(max_tokens=3, ignore_eos=True))
    assert [len(o.output_ids) for o in outs] == [3, 3]
    mon = engine.monitor
    steps = {(s.phase, s.batch_bucket, s.context_bucket): s.count for s in mon.operator_stats() if s.operator == "step"}
    assert sum(steps.values()) == mon.steps_seen
    assert any(phase == "prefill" for phase, _, _ in steps) and ("decode", 2, 8) in steps, steps
    decode = {s.operator for s in mon.operator_stats() if s.phase == "decode"}
    assert {"qkv", "attention", "o_proj", "mlp", "lm_head", "sampling"} <= decode, decode


def test_dsr1_profile_without_matplotlib_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ModuleNotFoundError
    assert main(["profile", "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install matplotlib" in err, err
    assert not (tmp_path / "out").exists()


def test_the_module_tree_is_walked_once_per_model_and_again_only_when_it_changes() -> None:
    """A sampled step reuses the timed-module list; a swapped module is found and timed, the old one not."""
    clock, toy, mon = toy_profiler()
    for _ in range(5):
        toy_step(mon, toy, clock)
    assert mon.walks == 1
    old = toy.model.layers[1].mlp
    toy.model.layers[1].mlp = Tick(clock, 7, 24)
    toy_step(mon, toy, clock)
    toy_step(mon, toy, clock)
    assert mon.walks == 2
    assert not old._forward_pre_hooks and not toy.model.layers[1].mlp._forward_pre_hooks
    ops = {s.operator: s for s in mon.operator_stats() if s.batch_bucket == 1}
    assert ops["mlp"].count == 7 and ops["mlp"].mean_s == pytest.approx(TOY_SECONDS["mlp"])
