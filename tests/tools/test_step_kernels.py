"""``python -m dsr1.benchmarks.step_kernels`` on CPU: its kernel kinds, the per-step arithmetic (long call minus
short call over the steps) and the summary; the profiled run itself needs CUDA (the device runs it)."""
from __future__ import annotations

import pytest

from dsr1.benchmarks import step_kernels


def test_kernels_are_sorted_into_kinds_by_name() -> None:
    assert step_kernels.kind("_gemv_kernel") == "weights"
    assert step_kernels.kind("nvjet_hsh_128x64_64x4_1x2_h_bz_coopA_NTT") == "weights"
    assert step_kernels.kind("void pytorch_flash::flash_fwd_splitkv_kernel<...>") == "attention"
    assert step_kernels.kind("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0") == "fused (inductor)"
    assert step_kernels.kind("_decode_kernel") == "attention"  # the SDK's CUDA decode attention
    assert step_kernels.kind("Memcpy DtoD (Device -> Device)") == "copy"
    assert step_kernels.kind("void at::native::vectorized_elementwise_kernel<4>") == "other"


def test_one_step_is_the_long_call_minus_the_short_one() -> None:
    short = [("prefill_gemm", 50.0), ("_gemv_kernel", 4.0), ("triton_poi_fused_0", 1.0)]
    long = short + [("_gemv_kernel", 4.0), ("triton_poi_fused_0", 1.0)] * 2 * 4  # 4 steps, 2 of each per step
    rows = step_kernels.per_step(short, long, steps=4)
    assert [(r["kernel"], r["calls_per_step"], r["us_per_step"]) for r in rows] == [
        ("_gemv_kernel", 2.0, 8.0), ("triton_poi_fused_0", 2.0, 2.0)]  # prefill's gemm cancels out
    summary = step_kernels.summarize(rows, step_us=14.0)
    assert summary["kernel_us"] == 10.0 and summary["idle_us"] == 4.0 and summary["kernels_per_step"] == 4.0
    assert summary["by_kind_us"] == {"weights": 8.0, "fused (inductor)": 2.0}


def test_bad_arguments_are_refused_before_any_work(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        step_kernels.main(["--steps", "0"])
    assert exit_.value.code == 2 and "--steps and --prompt-len must be at least 1" in capsys.readouterr().err
