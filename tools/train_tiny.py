"""Train ``dsr1-tiny``: a byte-level BPE tokenizer and a small Llama causal LM on the CPython corpus.

    python tools/train_tiny.py --output-dir core/dsr1/assets/dsr1-tiny [--steps N] [--seed 0] [--attention softmax]
    python tools/train_tiny.py --output-dir core/dsr1/assets/dsr1-tiny-linear --attention linear

Deterministic for a given seed, CPython version, torch version and thread count (2). The corpus and its split are
described in ``tools/tiny_corpus.py``. Everything is written to a temporary sibling directory first and renamed into
place at the end, so an interrupted run never leaves a half-written model. ``--tiny-config-for-tests`` shrinks the
model, the vocabulary and the corpus so the whole pipeline runs in seconds.

``--attention linear`` trains the same model (data, tokenizer, hyperparameters) with transformers' Llama whose attention
is the ``linear`` plugin's own forward (``dsr1_attention_linear``, registered with transformers'
``AttentionInterface``), so training and dsr1 inference run the same code; ``config.json`` then says
``"dsr1_attention": "linear"``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_corpus  # noqa: E402  (sibling module; tools/ is not a package)

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD]  # ids 0, 1, 2
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
PROMPT = "The Python interpreter"
ATTENTIONS = ("softmax", "linear")
#: transformers ``attn_implementation`` per ``--attention`` (``dsr1_linear`` is registered by ``use_attention``).
HF_ATTENTION = {"softmax": "sdpa", "linear": "dsr1_linear"}


def use_attention(name: str, seq_len: int = 256) -> str:
    """Register the attention ``name`` with transformers (if it is not built in); returns its implementation name."""
    if name == "linear":
        from dsr1_attention_linear import LinearAttention, LinearOptions
        from transformers import AttentionInterface

        # elu+1 as dsr1 loads it; one chunk per training window (the same sums, fewer ops than dsr1's 128-key chunks)
        attention = LinearAttention(LinearOptions(chunk=seq_len))

        def linear_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, **kwargs: object) -> tuple[torch.Tensor, None]:
            # unpadded causal batches only (training, evaluation, greedy sample): the mask is plain causal
            out = attention.forward(query, key, value)  # (B, H, T, D), queries aligned to the last T keys
            return out.transpose(1, 2).contiguous(), None  # (B, T, H, D) as transformers expects

        AttentionInterface.register("dsr1_linear", linear_forward)
    return HF_ATTENTION[name]


def train_tokenizer(docs: Sequence[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE; ``encode`` prepends ``<|bos|>`` and ``decode(skip_special_tokens=True)`` is lossless."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def encode_stream(tok: Tokenizer, docs: Sequence[str]) -> torch.Tensor:
    """Token ids of all documents, each as ``<|bos|> text <|eos|>``, concatenated. Shape ``(N,)``."""
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(list(docs), add_special_tokens=False):
        ids += [bos, *enc.ids, eos]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def heldout_perplexity(forward: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, window: int = 256) -> float:
    """Token-level perplexity of ``ids`` in non-overlapping ``window``-token windows, each scored on its own.

    ``forward`` maps ``(1, T)`` ids to ``(1, T, V)`` logits. Every window predicts its tokens 1..T-1 from the tokens
    before it in the same window; a trailing window shorter than 2 tokens is dropped. Returns
    ``exp(sum of NLL / number of predicted tokens)``. Reusable by any engine that produces logits.
    """
    nll, count = 0.0, 0
    for start in range(0, ids.numel(), window):
        chunk = ids[start : start + window].unsqueeze(0)  # (1, T)
        if chunk.shape[1] < 2:
            break
        logits = forward(chunk).float()  # (1, T, V)
        nll += F.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return math.exp(nll / count)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to ``peak / 10``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train_model(
    model: LlamaForCausalLM, data: torch.Tensor, heldout: torch.Tensor, args: argparse.Namespace
) -> dict[str, object]:
    """AdamW on random ``seq_len + 1`` windows of ``data``; returns the loss curves."""
    gen = torch.Generator().manual_seed(args.seed)
    groups = [{"params": [p for p in model.parameters() if (p.dim() >= 2) == wd], "weight_decay": 0.1 * wd}
              for wd in (True, False)]  # no decay on the RMSNorm weights
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    forward = lambda x: model(input_ids=x).logits  # noqa: E731  (tiny adapter)
    every = max(1, args.steps // 10)
    losses: list[float] = []
    heldout_curve: list[tuple[int, float]] = []
    t0 = time.time()
    model.train()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        starts = torch.randint(0, data.numel() - args.seq_len - 1, (args.batch_size,), generator=gen)
        batch = torch.stack([data[s : s + args.seq_len + 1] for s in starts.tolist()])  # (B, T+1)
        logits = model(input_ids=batch[:, :-1]).logits  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % every == 0 or step + 1 == args.steps:
            model.eval()
            ppl = heldout_perplexity(forward, heldout[: args.eval_tokens], args.seq_len)
            model.train()
            heldout_curve.append((step + 1, round(math.log(ppl), 4)))
            recent = sum(losses[-every:]) / len(losses[-every:])
            print(f"step {step + 1}/{args.steps} train_loss {recent:.4f} heldout_loss {math.log(ppl):.4f} "
                  f"lr {opt.param_groups[0]['lr']:.2e} {time.time() - t0:.0f}s", flush=True)
    model.eval()
    segment = max(1, len(losses) // 20)
    curve = [(min(i + segment, len(losses)), round(sum(losses[i : i + segment]) / len(losses[i : i + segment]), 4))
             for i in range(0, len(losses), segment)]
    return {"train_loss_first": round(losses[0], 4), "train_loss_last_10pct": round(sum(losses[-every:]) / every, 4),
            "train_loss_curve": curve, "heldout_loss_curve_first_tokens": heldout_curve,
            "heldout_loss_curve_eval_tokens": args.eval_tokens, "train_seconds": round(time.time() - t0, 1)}


def write_tokenizer_files(tok: Tokenizer, out: Path, max_len: int) -> None:
    """tokenizer.json, tokenizer_config.json (with a chat template) and special_tokens_map.json."""
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "model_max_length": max_len, "clean_up_tokenization_spaces": False, "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def greedy_sample(out: Path, prompt: str, new_tokens: int = 40, attention: str = "softmax") -> str:
    """Greedy continuation of ``prompt`` by the saved model, loaded back with transformers."""
    model = LlamaForCausalLM.from_pretrained(out, attn_implementation=use_attention(attention))
    tok = PreTrainedTokenizerFast.from_pretrained(out)
    inputs = tok(prompt, return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(ids[0], skip_special_tokens=True)


def compare_with_softmax(out: Path, card: dict) -> str:
    """A paragraph comparing held-out perplexity with the softmax dsr1-tiny beside ``out`` (empty if absent)."""
    softmax_card = out.parent / "dsr1-tiny" / "dsr1_tiny.json"
    if not softmax_card.is_file():
        return ""
    ref = json.loads(softmax_card.read_text())
    ratio = card["heldout_perplexity"] / ref["heldout_perplexity"]
    return (f"Softmax `dsr1-tiny`, same data, tokenizer, steps and seed: held-out perplexity "
            f"{ref['heldout_perplexity']:.3f}. Linear attention: {card['heldout_perplexity']:.3f}, "
            f"{ratio:.2f}x ({100 * (ratio - 1):+.1f}%).\n"
            f"Final training loss {card['train_loss_last_10pct']:.3f} "
            f"(softmax {ref['train_loss_last_10pct']:.3f}).\n\n")


def write_readme(out: Path, card: dict) -> None:
    """A short model card."""
    c = card["config"]
    linear = card.get("attention") == "linear"
    what = ("The linear-attention variant of dsr1-tiny: the same data, tokenizer and hyperparameters, trained with "
            "causal linear attention\n(Katharopoulos et al. 2020, φ = elu+1; the `linear` attention plugin) instead "
            "of softmax. Its `config.json` says\n`\"dsr1_attention\": \"linear\"`, so "
            "`AutoModel.from_pretrained(\"dsr1-tiny-linear\")` selects that attention and decodes\nfrom a "
            "fixed-size state per layer instead of a growing KV cache. It is"
            if linear else "The bundled default model of dsr1:")
    text = f"""# {card.get('name', 'dsr1-tiny')}

{what} a {card['parameters'] / 1e6:.2f} M-parameter Llama-architecture causal LM
(hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, {c['num_attention_heads']} heads, \
{c['num_key_value_heads']} KV heads, FFN {c['intermediate_size']}, vocab {c['vocab_size']}, context \
{c['max_position_embeddings']}, fp32) with a byte-level BPE tokenizer (`<|bos|>`, `<|eos|>`, `<|pad|>`).
It is a test and demo model, not a useful assistant.

## Data
English text that ships with CPython {card['corpus']['python_version']}: `pydoc_data.topics` and the docstrings of a
fixed list of standard-library modules (`tools/tiny_corpus.py`). Every 10th document is held out:
{card['corpus']['train_chars']:,} training characters, {card['corpus']['heldout_chars']:,} held-out characters.

## Quality
Held-out perplexity **{card['heldout_perplexity']:.3f}** (token level, {card['heldout_tokens']:,} tokens in
non-overlapping {card['seq_len']}-token windows; `heldout_perplexity` in `tools/train_tiny.py`).
Trained {card['steps']} steps of {card['batch_size']}x{card['seq_len']} tokens in {card['wall_seconds'] / 60:.1f} min
on 2 CPU cores (seed {card['seed']}, torch {card['torch_version']}). Details in `dsr1_tiny.json`.

{compare_with_softmax(out, card) if linear else ""}Greedy sample (transformers `generate`, 40 new tokens):

```text
{card['sample']}
```

## Reproduce
```bash
{card['command']}
```
"""
    (out / "README.md").write_text(text)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--tiny-config-for-tests`` overrides sizes so a run takes seconds."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention", default="softmax", help="attention the model is trained with: softmax or linear")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=688)
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens scored during training")
    p.add_argument("--max-corpus-chars", type=int, default=0, help="truncate each split (0: full corpus)")
    p.add_argument("--tiny-config-for-tests", action="store_true")
    args = p.parse_args(argv)
    if args.attention not in ATTENTIONS:
        p.error(f"--attention {args.attention!r} is not supported yet; choose from {', '.join(ATTENTIONS)}")
    if args.tiny_config_for_tests:
        args.__dict__.update(vocab_size=320, hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64,
                             seq_len=32, batch_size=2, warmup=1, eval_tokens=256, max_corpus_chars=20000)
    if args.steps < 1:
        p.error("--steps must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Build the corpus, train tokenizer and model, evaluate, and write the HF-format directory atomically."""
    args = parse_args(argv)
    command = shlex.join(["python", *(sys.argv if argv is None else ["tools/train_tiny.py", *argv])])
    t0 = time.time()
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)

    train_docs, heldout_docs = tiny_corpus.split_documents()
    if args.max_corpus_chars:
        train_docs = ["\n\n".join(train_docs)[: args.max_corpus_chars]]
        heldout_docs = ["\n\n".join(heldout_docs)[: args.max_corpus_chars // 4]]
    tok = train_tokenizer(train_docs, args.vocab_size)
    train_ids, heldout_ids = encode_stream(tok, train_docs), encode_stream(tok, heldout_docs)
    print(f"corpus: {train_ids.numel():,} train / {heldout_ids.numel():,} held-out tokens", flush=True)

    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=2 * args.seq_len, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tok.token_to_id(BOS), eos_token_id=tok.token_to_id(EOS), pad_token_id=tok.token_to_id(PAD),
        initializer_range=0.02,
    )
    config._attn_implementation = use_attention(args.attention, args.seq_len)
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params:,} parameters", flush=True)
    stats = train_model(model, train_ids, heldout_ids, args)
    ppl = heldout_perplexity(lambda x: model(input_ids=x).logits, heldout_ids, args.seq_len)
    print(f"held-out perplexity {ppl:.4f}", flush=True)

    out = args.output_dir.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.generation_config.update(do_sample=False, max_new_tokens=64)
        model.save_pretrained(tmp, safe_serialization=True)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["torch_dtype"] = cfg["dtype"] = "float32"  # transformers 5 writes "dtype"; older readers want the old key
        cfg["rope_theta"] = config.rope_parameters["rope_theta"]  # likewise: 5.x nests it under "rope_parameters"
        cfg.pop("_attn_implementation", None)
        cfg.pop("attn_implementation", None)
        if args.attention != "softmax":
            cfg["dsr1_attention"] = args.attention  # dsr1 selects this attention when loading (dsr1.auto)
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        write_tokenizer_files(tok, tmp, config.max_position_embeddings)
        card: dict = {
            "name": "dsr1-tiny" if args.attention == "softmax" else f"dsr1-tiny-{args.attention}",
            "heldout_perplexity": round(ppl, 4), "heldout_tokens": int(heldout_ids.numel()),
            "train_tokens": int(train_ids.numel()), "parameters": params, "steps": args.steps, "seed": args.seed,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr, "warmup": args.warmup,
            "attention": args.attention, **stats, "sample_prompt": PROMPT,
            "sample": greedy_sample(tmp, PROMPT, attention=args.attention),
            "wall_seconds": round(time.time() - t0, 1), "command": command,
            "torch_version": torch.__version__, "threads": torch.get_num_threads(),
            "date": datetime.date.today().isoformat(), "corpus": tiny_corpus.corpus_info(),
            "config": {k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                           "num_key_value_heads", "intermediate_size", "vocab_size",
                                           "max_position_embeddings")},
        }
        (tmp / "dsr1_tiny.json").write_text(json.dumps(card, indent=2) + "\n")
        write_readme(tmp, card)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            out.rename(old)
        for path in (tmp, *tmp.iterdir()):  # mkdtemp and safetensors create owner-only files
            path.chmod(0o755 if path.is_dir() else 0o644)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {out} in {time.time() - t0:.0f}s; sample: {card['sample']!r}", flush=True)


if __name__ == "__main__":
    main()
