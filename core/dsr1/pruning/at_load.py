"""``pruning:`` in an engine config: prune the model while it loads.

The pruning plugin's options carry what loading needs (:class:`dsr1.specs.PruningOptions`):
``sparsity`` and, for activation-aware plugins, ``calibration`` text. :func:`check_load_pruning`
refuses a config that could not prune (no sparsity and no default, calibration missing) when
the pipeline is resolved, so ``dsr1 config check`` says so and no weight is read first.
:func:`prune_at_load` runs in the builder's finishing steps, after the weights are assigned and
before the quant plugin and the pool's final placement (a quantized layer is no longer an
``nn.Linear``, so pruning after it would find nothing to prune). It calls the same
``Pruner.prune_`` as ``dsr1 prune`` (:func:`dsr1.tasks.prune.runner.prune_stage`) with the same
calibration text (:mod:`dsr1.pruning.data`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dsr1.errors import Dsr1Error
from dsr1.specs import PruningOptions

if TYPE_CHECKING:  # pragma: no cover - typing only
    from dsr1.interfaces import Pruner

log = logging.getLogger("dsr1")

#: ``model_type`` values whose calibration text is sentences (encoders), not token windows.
ENCODER_TYPES = ("bert",)


def check_load_pruning(pruner: Pruner, name: str) -> None:
    """Refuse a ``pruning:`` choice that cannot prune at load, in one line naming the option."""
    if not isinstance(pruner.options, PruningOptions):
        raise Dsr1Error(
            f"pruning {name!r} cannot prune at load: its options model {type(pruner.options).__name__} does not "
            f"derive from dsr1_sdk.PruningOptions, so it has no 'sparsity' option; prune with `dsr1 prune "
            f"--pruning-strategy {name}` instead, or remove 'pruning' from the engine config"
        )
    opts = pruner.options
    if opts.sparsity is None:
        raise Dsr1Error(
            f"pruning {name!r} needs the option 'sparsity' (the fraction of prunable weights to zero at load, in "
            f"[0, 1)): write pruning: {{name: {name}, options: {{sparsity: 0.5}}}}"
        )
    if opts.sparsity > 0.0 and pruner.needs_calibration() and opts.calibration is None:
        raise Dsr1Error(
            f"pruning {name!r} with these options needs calibration text: set the option 'calibration' to a UTF-8 "
            f"text file (or 'default' for the dsr1-tiny corpus), e.g. pruning: {{name: {name}, options: "
            f"{{sparsity: {opts.sparsity}, calibration: notes.txt}}}}"
        )


def calibration_batches(
    opts: PruningOptions, model: Any, model_dir: Path | None, preprocess: Any
) -> list[torch.Tensor]:
    """Token id batches of the ``calibration`` text, as ``dsr1 prune`` builds them: windows
    ``(1, calibration_len)`` for causal LMs, one ``(1, T_i)`` per sentence for encoders."""
    from dsr1.pruning import data as textdata

    if model_dir is None or not (model_dir / "tokenizer.json").is_file():
        where = "an in-memory checkpoint" if model_dir is None else f"{str(model_dir)!r}"
        raise Dsr1Error(f"pruning option 'calibration' needs the checkpoint's tokenizer.json; {where} has none")
    path = None if opts.calibration == "default" else opts.calibration
    tokenizer = preprocess.load(model_dir)
    config = getattr(model, "config", None)
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type in ENCODER_TYPES:
        limit = min(opts.calibration_len, int(config.get("max_position_embeddings", 512)) if config else 512)
        texts = textdata.calibration_sentences(path, opts.calibration_samples)
        return [tokenizer(t, return_tensors="pt", truncation=True, max_length=limit)["input_ids"]
                for t in texts]  # each (1, T_i)
    limit = int(config.get("max_position_embeddings", opts.calibration_len)) if config else opts.calibration_len
    seq = min(opts.calibration_len, limit)
    batches: list[torch.Tensor] = textdata.calibration_windows(path, tokenizer, opts.calibration_samples, seq,
                                                               min_tokens=min(64, seq))  # each (1, seq)
    return batches


def prune_at_load(pruner: Pruner, name: str, model: torch.nn.Module, model_dir: Path | None,
                  preprocess: Any) -> dict[str, torch.Tensor]:
    """Prune ``model`` in place to ``pruner.options.sparsity``; returns the keep-masks.

    A positive sparsity that zeroes nothing (no prunable layer) is refused rather than left
    as a silent no-op."""
    check_load_pruning(pruner, name)
    opts = pruner.options
    assert isinstance(opts, PruningOptions) and opts.sparsity is not None  # checked above
    if opts.sparsity == 0.0:  # an already pruned checkpoint: only the plugin's load hooks act (semi24's conversion)
        return {}
    calibration = calibration_batches(opts, model, model_dir, preprocess) if opts.calibration is not None else None
    before = _nonzero(model)
    with torch.no_grad():
        masks: dict[str, torch.Tensor] = pruner.prune_(model, opts.sparsity, calibration)
    after = _nonzero(model)[0]
    # nothing removed although the model was denser than asked (a model saved at this sparsity
    # is left as it is: the masks are idempotent); a structured pruner removes rows: fewer nonzeros too
    if after >= before[0] and before[0] > (1.0 - opts.sparsity) * before[1] + 0.5:
        raise Dsr1Error(f"pruning {name!r} at sparsity {opts.sparsity} removed no weight of "
                        f"{type(model).__name__} (it found no prunable linear layer)")
    log.info("pruning %r at load: %d of %d prunable weights nonzero before, %d after", name, before[0],
             before[1], after)
    return masks


def _nonzero(model: torch.nn.Module) -> tuple[int, int]:
    """(nonzero, numel) of the prunable linear weights (the sparsity ``dsr1 prune`` reports)."""
    from dsr1.pruning.metrics import prunable_linears

    layers = prunable_linears(model)
    return (sum(int(m.weight.count_nonzero()) for _, m in layers), sum(m.weight.numel() for _, m in layers))
