"""``pruning:`` in an engine config prunes the model while it loads (issue 13, point 5).

Sparsity is measured as ``dsr1 prune`` reports it: zeros among the prunable linear weights
(every linear layer but the output head). Missing options are one-line errors naming the
option, refused before any weight is read.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from dsr1.auto import AutoModel
from dsr1.cli import main
from dsr1.errors import Dsr1Error
from dsr1.pruning.metrics import prunable_linears
from dsr1.tasks.prune.runner import PruneRun
from tests.core.plugin_dist import fake_plugin  # noqa: F401  # the fixture

Prune = Callable[..., tuple[int, str]]


def zeros(model: Any) -> tuple[float, dict[str, float]]:
    """Fraction of zeros over all prunable linear weights, and per layer."""
    layers = prunable_linears(model)
    per = {name: float((m.weight == 0).float().mean()) for name, m in layers}
    total = sum(int((m.weight == 0).sum()) for _, m in layers) / sum(m.weight.numel() for _, m in layers)
    return total, per


@pytest.fixture(scope="module")
def dense() -> Any:
    return AutoModel.from_pretrained("dsr1-tiny")


def untouched(model: Any, dense: Any) -> bool:
    """The embeddings and the output head are the dense model's (they are never pruned)."""
    return torch.equal(model.lm_head.weight, dense.lm_head.weight) and torch.equal(
        model.model.embed_tokens.weight, dense.model.embed_tokens.weight)


def test_dense_load_has_no_zeros(dense: Any) -> None:
    assert zeros(dense)[0] == 0.0


@pytest.mark.parametrize("sparsity", [0.25, 0.5])
def test_magnitude_at_load_reaches_the_asked_sparsity(sparsity: float, dense: Any) -> None:
    model = AutoModel.from_pretrained("dsr1-tiny", pruning={"name": "magnitude", "options": {"sparsity": sparsity}})
    total, per = zeros(model)
    assert total == pytest.approx(sparsity, abs=1e-4)
    assert all(v == pytest.approx(sparsity, abs=1e-3) for v in per.values()), per  # scope layer: each layer
    assert untouched(model, dense)
    out = model.generate(torch.tensor([[0, 5, 9]]), max_new_tokens=3)  # still a working model
    assert out.shape == (1, 6)


def test_magnitude_global_scope_is_passed_through() -> None:
    model = AutoModel.from_pretrained("dsr1-tiny", pruning={"name": "magnitude",
                                                            "options": {"sparsity": 0.4, "scope": "global"}})
    total, per = zeros(model)
    assert total == pytest.approx(0.4, abs=1e-4)
    assert max(per.values()) - min(per.values()) > 0.01  # one threshold for all: layers differ


def test_pruning_runs_before_quantization() -> None:
    """int8 codes of a weight pruned first keep its zeros (pruning after quant would find no nn.Linear)."""
    model = AutoModel.from_pretrained("dsr1-tiny", pruning={"name": "magnitude", "options": {"sparsity": 0.5}},
                                      quant="int8")
    codes = [m.qweight for name, m in model.named_modules() if hasattr(m, "qweight") and "lm_head" not in name]
    assert codes
    frac = sum(int((c == 0).sum()) for c in codes) / sum(c.numel() for c in codes)
    assert frac >= 0.5


def test_semi24_defaults_to_half_in_a_2_4_pattern() -> None:
    model = AutoModel.from_pretrained("dsr1-tiny", pruning="semi24")
    assert zeros(model)[0] == pytest.approx(0.5, abs=1e-4)
    for _, m in prunable_linears(model):
        w = m.weight.detach()
        groups = (w.reshape(w.shape[0], -1, 4) == 0).sum(-1)  # (out, in/4) zeros per group of 4
        assert bool((groups >= 2).all())


def test_wanda_with_calibration_text(tmp_path: Path, dense: Any) -> None:
    text = tmp_path / "cal.txt"
    text.write_text(" ".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(200)))
    model = AutoModel.from_pretrained("dsr1-tiny", pruning={"name": "wanda", "options": {
        "sparsity": 0.5, "calibration": str(text), "calibration_samples": 2, "calibration_len": 64}})
    total, per = zeros(model)
    assert total == pytest.approx(0.5, abs=1e-4) and untouched(model, dense)


@pytest.mark.parametrize(("pruning", "message"), [
    ("magnitude", "pruning 'magnitude' needs the option 'sparsity' (the fraction of prunable weights to zero at "
                  "load, in [0, 1)): write pruning: {name: magnitude, options: {sparsity: 0.5}}"),
    ({"name": "wanda", "options": {"sparsity": 0.5}},
     "pruning 'wanda' with these options needs calibration text: set the option 'calibration' to a UTF-8 text file "
     "(or 'default' for the dsr1-tiny corpus), e.g. pruning: {name: wanda, options: {sparsity: 0.5, calibration: "
     "notes.txt}}"),
    ({"name": "semi24", "options": {"score": "wanda"}}, "pruning 'semi24' with these options needs calibration text"),
    ({"name": "structured", "options": {"sparsity": 0.3}}, "pruning 'structured' with these options needs calibration"),
    ({"name": "magnitude", "options": {"sparsity": 1.0}}, "pruning.options.sparsity"),
])
def test_what_cannot_prune_is_refused_in_one_line(pruning: Any, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from dsr1.models.checkpoint import CheckpointReader

    def no_read(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a weight was read before the config was refused")

    monkeypatch.setattr(CheckpointReader, "read", no_read)
    with pytest.raises(Dsr1Error) as err:
        AutoModel.from_pretrained("dsr1-tiny", pruning=pruning)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_config_check_refuses_a_pruning_key_without_sparsity(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pruning: magnitude\n")
    assert main(["config", "check", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs the option 'sparsity'" in err
    cfg.write_text("pruning: {name: magnitude, options: {sparsity: 0.5}}\n")
    assert main(["config", "check", str(cfg)]) == 0
    assert "sparsity': 0.5" in capsys.readouterr().out


def test_a_pruner_without_pruning_options_cannot_prune_at_load(fake_plugin: Callable[[str, str, str], str]) -> None:
    fake_plugin("pruning", "plain", '''
from dsr1_sdk import PluginSpec, Pruner, hookimpl

class PlainPruner(Pruner):
    def score(self, weight, activation_norm=None):
        return weight.abs()

    def mask(self, weight, sparsity, activation_norm=None):
        return weight != 0

@hookimpl
def dsr1_pruning():
    return PluginSpec(name="plain", family="pruning", impl=PlainPruner)
''')
    with pytest.raises(Dsr1Error, match=r"^pruning 'plain' cannot prune at load: its options model NoOptions does not "
                                        r"derive from dsr1_sdk.PruningOptions"):
        AutoModel.from_pretrained("dsr1-tiny", pruning="plain")


def test_dsr1_prune_refuses_the_load_time_options(prune: Prune, tmp_path: Path) -> None:
    code, err = prune("--model", "dsr1-tiny", "--target-sparsity", "0.5", "--output-dir", tmp_path / "out",
                      "--option", "sparsity=0.3")
    assert code == 2 and err.strip() == ("dsr1: error: --option sparsity is for pruning at load in an engine config; "
                                         "dsr1 prune takes --target-sparsity, --calibration, --calibration-samples and "
                                         "--calibration-len")


def test_a_saved_stage_loads_unchanged_for_its_speed_measurement(monkeypatch: pytest.MonkeyPatch) -> None:
    """``dsr1 prune`` measures a stage loaded with its strategy at sparsity 0: nothing more is pruned."""
    seen: list[dict[str, Any]] = []

    def measure(self: PruneRun, model_dir: Path, config: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
        seen.append(config)
        return {"decode_tok_s": 1.0}

    monkeypatch.setattr(PruneRun, "_measure", measure)
    run = PruneRun.__new__(PruneRun)
    run.s = type("S", (), {"speed": True, "device": "cpu", "threads": 1, "speed_batch": 1, "speed_prompt": 4,
                           "speed_new_tokens": 2, "speed_reps": 1, "strategy": "magnitude",
                           "strategy_options": {"scope": "global"}})()
    run.kind, run.dtype, run.model_dir = "causal", "float32", Path("dense")
    from dsr1.registry import PluginRegistry

    run.spec = PluginRegistry().load("pruning", "magnitude")
    run._speed(Path("stage"), stage=True)
    assert seen[1]["pruning"] == {"name": "magnitude", "options": {"scope": "global", "sparsity": 0.0}}
    model = AutoModel.from_pretrained("dsr1-tiny", seen[1])
    assert zeros(model)[0] == 0.0
