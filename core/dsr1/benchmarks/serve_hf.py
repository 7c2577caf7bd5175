"""``dsr1 bench serve --compare hf``: the same trace through transformers' own continuous
batching (``model.generate_batch``), on the same weights, in the same process.

transformers takes every request up front and blocks until all are done, so only a trace
whose requests all arrive at once can be replayed this way (``--rate`` left at its default);
its figures are the whole batch's: output tok/s over the wall time of the call, and no
per-request TTFT/TPOT (``record_timestamps`` would add per-token bookkeeping to its loop).
"""
from __future__ import annotations

import time
from typing import Any

from dsr1.errors import Dsr1Error


def hf_twin(model: Any, hf_config: dict[str, Any]) -> Any:
    """A transformers causal LM of ``hf_config`` holding ``model``'s weights, on its device and dtype."""
    import torch
    import transformers

    cfg = transformers.AutoConfig.for_model(**hf_config)
    with torch.device(model.device):
        twin = transformers.AutoModelForCausalLM.from_config(cfg, dtype=model.dtype)
    theirs = twin.state_dict()
    with torch.no_grad():
        for name, tensor in model.hf_state_dict():
            if name in theirs:
                theirs[name].copy_(tensor)
    twin.eval()
    return twin


def check_trace(trace: list[Any]) -> int:
    """The one output length of an all-at-once trace; anything else is refused."""
    if any(it.arrival > 0 for it in trace):
        raise Dsr1Error("--compare hf replays a trace whose requests all arrive at once: leave --rate at its default")
    lengths = {it.output_len for it in trace}
    if len(lengths) != 1:
        raise Dsr1Error("--compare hf needs one output length for every request (generate_batch takes one "
                        f"max_new_tokens), the trace has {len(lengths)}: use --lengths uniform:A-B,N-N")
    return lengths.pop()


def cache_config(kv_tokens: int | None) -> dict[str, Any]:
    """``generate_batch``'s cache sized to hold ``kv_tokens`` (dsr1's pool, when ``--num-blocks``
    sets it) instead of sized from free memory; empty when not set."""
    if kv_tokens is None:
        return {}
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
    except ImportError:
        raise Dsr1Error("--compare hf with --num-blocks needs a transformers with ContinuousBatchingConfig (5.17 "
                        "or later) to size its cache alike; upgrade transformers or leave out --num-blocks") from None
    page = ContinuousBatchingConfig().page_size
    return {"continuous_batching_config": ContinuousBatchingConfig(num_blocks=-(-kv_tokens // page))}


def replay_generate_batch(twin: Any, trace: list[Any], prompts: list[list[int]],
                          kv_tokens: int | None = None) -> dict[str, Any]:
    """Run every request of an all-at-once trace through ``twin.generate_batch``; ``kv_tokens``:
    the KV capacity to give it (default: what it infers from free memory)."""
    import torch
    from transformers import GenerationConfig

    new = check_trace(trace)
    cache = cache_config(kv_tokens)
    config = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    warm = GenerationConfig(max_new_tokens=2, do_sample=False, eos_token_id=None, pad_token_id=0)
    # no inference_mode here: generate_batch runs its loop in a thread of its own, where tensors
    # made under this thread's inference mode cannot be updated in place
    twin.generate_batch(inputs=[prompts[0][:8]], generation_config=warm, progress_bar=False, **cache)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.monotonic()
    outs = twin.generate_batch(inputs=prompts, generation_config=config, progress_bar=False, **cache)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    total = time.monotonic() - start
    if len(outs) != len(prompts):
        raise Dsr1Error(f"transformers' generate_batch returned {len(outs)} of {len(prompts)} requests (see its log "
                        f"above); no comparison written")
    tokens = sum(len(o.generated_tokens) for o in outs.values())
    return {"requests": len(outs), "seconds": round(total, 3), "output_tokens": tokens,
            "request_throughput": round(len(outs) / total, 3), "output_tok_s": round(tokens / total, 2)}
