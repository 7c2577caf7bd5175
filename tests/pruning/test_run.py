"""``dsr1 prune`` end to end on tiny random models: stages, reloading, report, curve, Ctrl-C, floor."""
from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from dsr1.auto import AutoModel
from dsr1.tasks.prune import runner
from dsr1.pruning.data import heldout_stream
from dsr1.pruning.metrics import perplexity

Prune = Callable[..., tuple[int, str]]
UNFUSED = {"model": {"name": "llama", "options": {"fuse": False, "weight_layout": "nk"}}}


def report(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / "report.json").read_text()))


def no_partials(out: Path) -> bool:
    return not [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".dsr1-output.json"]


def ids(vocab: int = 4096) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 10), generator=torch.Generator().manual_seed(0))


def test_progressive_run_writes_loadable_stages(prune: Prune, tiny_llama: Path, tmp_path: Path) -> None:
    import transformers

    out = tmp_path / "out"
    code, err = prune("--model", tiny_llama, "--target-sparsity", "0.5", "--output-dir", out,
                      "--schedule", "progressive", "--stages", "0.2,0.4")
    assert code == 0, err
    r = report(out)
    assert [s["name"] for s in r["stages"]] == ["stage-0.20", "stage-0.40", "stage-0.50"]
    assert sorted(p.name for p in out.iterdir()) == [".dsr1-output.json", "curve.csv", "curve.png", "report.json",
                                                      "stage-0.20", "stage-0.40", "stage-0.50"]
    assert r["command"].startswith("dsr1 prune --model ") and "--stages 0.2,0.4" in r["command"]
    assert r["evaluation"]["tokens"] == 384 and r["evaluation"]["window"] == 128
    assert r["dense"]["realized_sparsity"] == 0.0 and not r["interrupted"]
    for stage in r["stages"]:
        assert abs(stage["realized_sparsity"] - stage["target_sparsity"]) < 1e-3
        assert set(stage["per_layer"]) == {n for n in r["dense"]["per_layer"]}
        assert stage["file_bytes"] > 0 and stage["transformers_loadable"]
    rows = list(csv.DictReader((out / "curve.csv").open()))
    assert [row["point"] for row in rows] == ["dense", "stage-0.20", "stage-0.40", "stage-0.50"]
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    stage = out / "stage-0.50"
    again = AutoModel.from_pretrained(stage, UNFUSED, device="cpu")
    stream = heldout_stream(None, again.tokenizer, 384)
    assert round(perplexity(again, stream, 128), 4) == r["stages"][-1]["accuracy"]["perplexity"]  # bit-identical
    hf = transformers.AutoModelForCausalLM.from_pretrained(stage).eval()
    with torch.no_grad():
        ref = hf(ids()).logits
    fused = AutoModel.from_pretrained(stage, device="cpu")
    for model in (again, fused):
        with torch.inference_mode():
            torch.testing.assert_close(model(ids()).logits, ref, rtol=1e-4, atol=1e-4)
    dense = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    pruned_state, dense_state = hf.state_dict(), dense.state_dict()
    w, w0 = pruned_state["model.layers.0.mlp.up_proj.weight"], dense_state["model.layers.0.mlp.up_proj.weight"]
    assert float((w == 0).float().mean()) == 0.5 and torch.equal(w[w != 0], w0[w != 0])
    assert torch.equal(pruned_state["lm_head.weight"], dense_state["lm_head.weight"])


def test_ctrl_c_between_stages_keeps_completed_stages(prune: Prune, tiny_llama: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = runner.prune_stage

    def interrupted(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(runner, "prune_stage", interrupted)
    out = tmp_path / "out"
    code, err = prune("--model", tiny_llama, "--target-sparsity", "0.5", "--output-dir", out,
                      "--schedule", "progressive", "--stages", "0.1,0.2,0.3")
    assert code == 130 and "dsr1: interrupted" in err
    assert sorted(p.name for p in out.iterdir()) == [".dsr1-output.json", "curve.csv", "curve.png", "report.json",
                                                      "stage-0.10", "stage-0.20"]
    r = report(out)
    assert r["interrupted"] and [s["name"] for s in r["stages"]] == ["stage-0.10", "stage-0.20"]
    for name in ("stage-0.10", "stage-0.20"):
        model = AutoModel.from_pretrained(out / name, device="cpu")
        with torch.inference_mode():
            assert torch.isfinite(model(ids()).logits).all()


def test_ctrl_c_while_saving_leaves_no_half_written_stage(prune: Prune, tiny_llama: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from dsr1.models import loading

    calls = {"n": 0}
    real = loading.write_safetensors

    def dies_halfway(path: Path, tensors: Any, metadata: dict[str, str]) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            path.write_bytes(b"half a file")
            raise KeyboardInterrupt
        real(path, tensors, metadata)

    monkeypatch.setattr(loading, "write_safetensors", dies_halfway)
    out = tmp_path / "out"
    code, _ = prune("--model", tiny_llama, "--target-sparsity", "0.5", "--output-dir", out,
                    "--schedule", "progressive", "--stages", "0.25")
    assert code == 130
    assert no_partials(out), [p.name for p in out.iterdir()]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["stage-0.25"]
    assert [s["name"] for s in report(out)["stages"]] == ["stage-0.25"]


def test_accuracy_floor_fails_after_writing_everything(prune: Prune, tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, err = prune("--model", tiny_llama, "--target-sparsity", "0.4", "--output-dir", out,
                      "--schedule", "progressive", "--stages", "0.2", "--accuracy-floor", "50")
    assert code == 1
    assert "stage-0.20 fell below --accuracy-floor 50.0" in err and "2 stage(s) below it" in err
    floor = report(out)["accuracy_floor"]
    assert floor["value"] == 50.0 and [f["stage"] for f in floor["failed"]] == ["stage-0.20", "stage-0.40"]
    assert (out / "stage-0.40").is_dir() and (out / "curve.png").is_file()
    code, err = prune("--model", tiny_llama, "--target-sparsity", "0.4", "--output-dir", out, "--overwrite",
                      "--accuracy-floor", "0.01")
    assert code == 0, err
    assert [s["name"] for s in report(out)["stages"]] == ["stage-0.40"] and not (out / "stage-0.20").exists()


def test_recovery_keeps_the_zeros(prune: Prune, tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, err = prune("--model", tiny_llama, "--target-sparsity", "0.5", "--output-dir", out,
                      "--pruning-strategy", "wanda", "--recover-steps", "3", "--recover-lr", "1e-3")
    assert code == 0, err
    stage = report(out)["stages"][0]
    assert stage["realized_sparsity"] == 0.5
    assert stage["recover"]["steps"] == 3 and stage["recover"]["loss_last"] > 0


def test_global_magnitude_through_option(prune: Prune, tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, err = prune("--model", tiny_llama, "--target-sparsity", "0.5", "--output-dir", out,
                      "--option", "scope=global")
    assert code == 0, err
    r = report(out)
    assert r["strategy"]["options"]["scope"] == "global" and "--option scope=global" in r["command"]
    layers = [v["sparsity"] for v in r["stages"][0]["per_layer"].values()]
    assert abs(r["stages"][0]["realized_sparsity"] - 0.5) < 1e-5 and max(layers) - min(layers) > 0.01


def test_semi24_skips_layers_not_multiple_of_4(prune: Prune, tiny_llama: Path, tmp_path: Path) -> None:
    import transformers

    from dsr1_sdk.reference import groups_hold_zeros

    odd = tmp_path / "odd"
    shutil.copytree(tiny_llama, odd)
    cfg = json.loads((odd / "config.json").read_text())
    cfg["intermediate_size"] = 42
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).save_pretrained(odd)
    out = tmp_path / "out"
    code, err = prune("--model", odd, "--target-sparsity", "0.5", "--output-dir", out, "--pruning-strategy", "semi24")
    assert code == 0, err
    r = report(out)
    stage = r["stages"][0]
    assert stage["skipped"] == {f"model.layers.{i}.mlp.down_proj": "input dim 42 is not a multiple of 4: left dense"
                                for i in range(2)}
    assert stage["per_layer"]["model.layers.0.mlp.down_proj"]["sparsity"] == 0.0
    assert any("dense with zeros" in n for n in r["notes"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "stage-0.50")
    assert groups_hold_zeros(hf.model.layers[1].mlp.up_proj.weight.detach())


def test_structured_stage_is_smaller_and_loads_in_transformers(prune: Prune, tiny_llama: Path,
                                                                tmp_path: Path) -> None:
    import transformers

    out = tmp_path / "out"
    code, err = prune("--model", tiny_llama, "--target-sparsity", "0.5", "--output-dir", out,
                      "--pruning-strategy", "structured")
    assert code == 0, err
    stage = report(out)["stages"][0]
    assert stage["config_shapes"]["num_attention_heads"] == 2 and stage["config_shapes"]["intermediate_size"] < 64
    assert abs(stage["realized_sparsity"] - 0.5) < 0.02 and stage["file_bytes"] < report(out)["dense"]["file_bytes"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "stage-0.50").eval()
    ours = AutoModel.from_pretrained(out / "stage-0.50", device="cpu")
    with torch.inference_mode():
        torch.testing.assert_close(ours(ids()).logits, hf(ids()).logits, rtol=1e-4, atol=1e-4)


def test_causal_speed_is_measured_against_dense(prune: Prune, tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, err = prune("--model", tiny_llama, "--target-sparsity", "0.5", "--output-dir", out,
                      "--pruning-strategy", "structured", "--speed-batch", "1", "--speed-prompt", "8",
                      "--speed-new-tokens", "4", "--speed-reps", "1", "--threads", "1", fast=False)
    assert code == 0, err
    r = report(out)
    assert r["dense"]["speed"]["metric"] == "decode_tok_s" and r["dense"]["speed"]["vs_dense"] == 1.0
    speed = r["stages"][0]["speed"]
    assert speed["value"] > 0 and speed["vs_dense"] > 0 and speed["details"]["prefill_tok_s"] > 0
    assert len(speed["dense_paired"]) == 2 and min(speed["dense_paired"]) > 0


def test_encoder_run_fidelity_speed_and_loading(prune: Prune, tiny_bert: Path, tmp_path: Path) -> None:
    import transformers

    out = tmp_path / "out"
    code, err = prune("--model", tiny_bert, "--target-sparsity", "0.5", "--output-dir", out,
                      "--pruning-strategy", "wanda", "--speed-batch", "2", "--speed-prompt", "16",
                      "--speed-reps", "1", "--eval-sentences", "12", "--calibration-samples", "8", "--quiet",
                      fast=False)
    assert code == 0, err
    r = report(out)
    assert r["model_kind"] == "encoder" and r["evaluation"]["sentences"] == 12
    acc = r["stages"][0]["accuracy"]
    assert 0 < acc["mean_cosine"] < 1 and -1 <= acc["spearman"] <= 1 and acc["score"] == acc["mean_cosine"]
    assert r["dense"]["accuracy"]["mean_cosine"] == 1.0 and r["stages"][0]["speed"]["metric"] == "tokens_s"
    hf = transformers.AutoModel.from_pretrained(out / "stage-0.50").eval()
    ours = AutoModel.from_pretrained(out / "stage-0.50", device="cpu")
    x = ids(30522)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x).last_hidden_state, hf(x).last_hidden_state, rtol=1e-4, atol=1e-4)


def test_structured_bert_loads_in_dsr1_only(prune: Prune, tiny_bert: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, err = prune("--model", tiny_bert, "--target-sparsity", "0.5", "--output-dir", out,
                      "--pruning-strategy", "structured", "--recover-steps", "2")
    assert code == 0, err
    stage = report(out)["stages"][0]
    assert stage["config_shapes"]["num_attention_heads"] == 2 and stage["config_shapes"]["head_dim"] == 8
    assert stage["transformers_loadable"] is False and stage["recover"]["steps"] == 2
    model = AutoModel.from_pretrained(out / "stage-0.50", device="cpu")
    assert model.encoder.layer[0].attention.self.query.weight.shape == (16, 32)
