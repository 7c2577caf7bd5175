"""The shared machinery of the compressing caches (``streaming``, ``heavy-hitter``).

Not a plugin itself: a policy subclasses :class:`EvictingKVCache` and says two things, how
many tokens a sequence keeps once it has ``written`` real tokens (:meth:`budget`) and which
ones (:meth:`priority`, higher is kept; ties go to the more recent slot).

Every decision is per sequence: a row's budget counts its own real tokens, never the left
padding that lines it up with longer rows, and its priorities see only its own slots, so a
prompt keeps the same tokens alone and inside any batch. The rows share one slot count
``n`` per layer (a rectangle), the budget of the longest row; a row that keeps fewer holds
the rest as *dead* slots (padding, or tokens it evicted), marked not valid, placed before its
live slots and masked out by :meth:`select_mask`. A batch with padding must therefore pass a
mask on every forward (the model does); without one every row is the same length and no
slot is dead.

Storage per layer is a buffer of ``C = budget(max_len) + 1`` slots, ``(L, B, Hkv, C, D)``
for keys and values, and per slot its absolute position, whether it holds a live token of
the row and a float score the policy may use. Live slots stay sorted by position, after the
dead ones, so a model's own sliding window (``k[:, :, -window:]``) still means "the last
``window`` tokens". The life of one forward of a layer:

1. ``update`` writes the new tokens after the kept ones, in place when they fit (decode),
   else into a fresh ``kept + new`` tensor (a prefill: the prompt attends all of itself),
   and returns that. Nothing is evicted yet; the call is *pending*.
2. ``select_mask`` (padded batches) gathers the mask columns of the returned slots, masks
   the dead ones and learns which new slots are padding, from the last query's row.
3. ``observe`` (policies that score with attention) adds the layer's attention weights.
4. The pending call is committed, each row evicting down to the budget of its real tokens:
   at the next ``update`` (of any layer), ``observe`` or ``nbytes`` (never before attention
   has read the returned views). At most one layer's returned tensors are held meanwhile.

Keys are stored after rotary embedding (the model applies RoPE before ``update``), so an
evicted gap needs no re-rotation: each key keeps the position it was written at.
StreamingLLM instead re-assigns positions inside the cache (sinks at 0.., the window right
after) so that positions never exceed the trained length; we keep the original positions,
which is exact for attention within the model's trained context, and for RoPE models
beyond it would need a rope re-rotation that dsr1 does not do.
"""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import torch

from dsr1.interfaces import CacheShape, KVCache

#: Priority offsets: protected slots sit above any score, padding below everything.
PROTECTED = float(2**40)
PADDING = -float(2**41)


@dataclass
class Pending:
    """What the last ``update`` returned (views into the buffers when written in place)."""

    layer: int
    k: torch.Tensor  # (B, Hkv, S, D)
    v: torch.Tensor  # (B, Hkv, S, D)
    pos: torch.Tensor  # (B, S) absolute slot of each returned key
    valid: torch.Tensor  # (B, S) holds a live token of the row
    score: torch.Tensor  # (B, S) float32 policy score
    end: int  # slots written so far
    new: int  # the last ``new`` returned slots are this call's tokens
    in_place: bool
    masked: bool = False  # select_mask ran: rows may differ in real tokens


class EvictingKVCache(KVCache):
    """Keep at most :meth:`budget` slots per row, chosen by :meth:`priority`."""

    compresses = True

    def __init__(self, options: object = None) -> None:
        super().__init__(options)  # type: ignore[arg-type]  # each policy passes its own options model
        self.k: torch.Tensor | None = None  # (L, B, Hkv, C, D)
        self.v: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None  # (L, B, C) long
        self.valid: torch.Tensor | None = None  # (L, B, C) bool
        self.score: torch.Tensor | None = None  # (L, B, C) float32
        self.written: torch.Tensor | None = None  # (L, B) long: real tokens each row has written
        self.n: list[int] = []  # filled slots per layer (the same in every row, live or dead)
        self._pending: Pending | None = None

    # --- the policy ------------------------------------------------------------------------

    @abstractmethod
    def budget(self, written: int) -> int:
        """Tokens a sequence keeps once it wrote ``written`` real tokens (non-decreasing, grows ≤ 1 per token)."""

    def row_budgets(self, written: torch.Tensor) -> torch.Tensor:
        """:meth:`budget` of each row's ``written`` ``(B,)`` count, as a ``(B,)`` long tensor.

        This default asks :meth:`budget` row by row (a device sync); the builtin policies
        override it with tensor math."""
        return torch.tensor([self.budget(int(w)) for w in written.tolist()], dtype=torch.long, device=written.device)

    @abstractmethod
    def priority(self, pos: torch.Tensor, valid: torch.Tensor, score: torch.Tensor, end: int) -> torch.Tensor:
        """``(B, S)`` float64 keep-priority of the slots, higher is kept; each row's alone.

        Live slots are sorted by position; slots not ``valid`` (padding, dead) must rank below
        every live one (:data:`PADDING`)."""

    # --- KVCache ---------------------------------------------------------------------------

    def allocate(self, shape: CacheShape, dtype: torch.dtype, device: torch.device) -> None:
        cap = max(min(self.budget(shape.max_len) + 1, shape.max_len), 1)
        dims = (shape.n_layers, shape.batch_size, shape.n_kv_heads, cap, shape.head_dim)
        k = self.k
        if k is None or k.shape != dims or k.dtype != dtype or k.device != torch.device(device):
            self.k = self.v = None  # free the old buffers first
            self.k = torch.zeros(dims, dtype=dtype, device=device)
            self.v = torch.zeros(dims, dtype=dtype, device=device)
            self.pos = torch.zeros(dims[:2] + (cap,), dtype=torch.long, device=device)
            self.valid = torch.zeros(dims[:2] + (cap,), dtype=torch.bool, device=device)
            self.score = torch.zeros(dims[:2] + (cap,), dtype=torch.float32, device=device)
            self.written = torch.zeros(dims[:2], dtype=torch.long, device=device)
        self.reset()

    def reset(self) -> None:
        self._pending = None
        self.n = [0] * (self.k.shape[0] if self.k is not None else 0)
        if self.written is not None:
            self.written.zero_()

    def update(
        self, layer: int, key: torch.Tensor, value: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None or self.v is None or self.pos is None or self.valid is None or self.score is None:
            raise RuntimeError(f"{type(self).__name__}.update before allocate")
        self._commit()
        b, _, t, _ = key.shape
        end, n, cap = start + t, self.n[layer], self.k.shape[3]
        new_pos = torch.arange(start, end, device=key.device).expand(b, t)  # (B, T)
        kb, vb = self.k[layer], self.v[layer]  # (B, Hkv, C, D)
        pb, ab, sb = self.pos[layer], self.valid[layer], self.score[layer]  # (B, C)
        if n + t <= cap:  # fits: write in place, return views
            kb[:, :, n : n + t].copy_(key)
            vb[:, :, n : n + t].copy_(value)
            pb[:, n : n + t] = new_pos
            ab[:, n : n + t] = True
            sb[:, n : n + t] = 0.0
            self.n[layer] = n = n + t
            pending = Pending(layer, kb[:, :, :n], vb[:, :, :n], pb[:, :n], ab[:, :n], sb[:, :n], end, t, True)
        else:  # a prefill past the budget: every key it needs, in a fresh tensor
            ones = torch.ones((b, t), dtype=torch.bool, device=key.device)
            zeros = torch.zeros((b, t), dtype=torch.float32, device=key.device)
            pending = Pending(
                layer,
                torch.cat([kb[:, :, :n], key], dim=2),  # (B, Hkv, n + T, D)
                torch.cat([vb[:, :, :n], value], dim=2),
                torch.cat([pb[:, :n], new_pos], dim=1),  # (B, n + T)
                torch.cat([ab[:, :n], ones], dim=1),
                torch.cat([sb[:, :n], zeros], dim=1),
                end,
                t,
                False,
            )
        self._pending = pending
        return pending.k, pending.v

    def select_mask(self, layer: int, mask: torch.Tensor) -> torch.Tensor:
        p = self._pending
        assert p is not None and p.layer == layer, "select_mask must follow the update of the same layer"
        b, s = p.pos.shape
        mask = mask.expand(b, -1, -1, -1)  # (B, 1, T, S_written)
        t = mask.shape[2]
        out = mask.gather(-1, p.pos[:, None, None, :].expand(b, 1, t, s))  # (B, 1, T, S)
        # dead kept slots hold tokens their row evicted: masked although their positions are real
        # (never a query's own key, which is a new slot: no query row becomes all-masked)
        out = out & p.valid[:, None, None, :]
        p.valid.logical_and_(out[:, 0, -1, :])  # the last query sees every real earlier token
        p.masked = True
        return out  # no eviction here: attention has yet to read the returned (maybe in-place) views

    def nbytes(self) -> int:
        self._commit()
        held = (self.k, self.v, self.pos, self.valid, self.score, self.written)
        return sum(x.nbytes for x in held if x is not None)

    # --- eviction --------------------------------------------------------------------------

    def keep_indices(self, p: Pending, keep: int, live: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, keep)`` indices of the returned slots to keep and whether each stays live.

        ``live`` ``(B,)``: how many of its best slots a row keeps live (``None``: all ``keep``);
        the rest of its ``keep`` are dead. Dead slots come first, then live ones by position."""
        prio = self.priority(p.pos, p.valid, p.score, p.end)  # (B, S)
        s = prio.shape[1]
        order = torch.argsort(prio.flip(1), dim=1, descending=True, stable=True)  # ties: more recent first
        idx = s - 1 - order[:, :keep]  # (B, keep), best first
        alive = p.valid.gather(1, idx)  # (B, keep)
        if live is not None:
            alive &= torch.arange(keep, device=idx.device)[None, :] < live[:, None]
        pos = p.pos.gather(1, idx)  # (B, keep)
        slot = torch.where(alive, pos, pos - p.end - 1).argsort(dim=1)  # dead first; positions are distinct
        return idx.gather(1, slot), alive.gather(1, slot)

    def _commit(self) -> None:
        p, self._pending = self._pending, None
        if p is None:
            return
        assert self.k is not None and self.v is not None and self.pos is not None
        assert self.valid is not None and self.score is not None and self.written is not None
        layer, (b, s) = p.layer, p.pos.shape
        written = self.written[layer]  # (B,)
        written += p.valid[:, s - p.new :].sum(dim=1)
        keep = min(self.budget(p.end), s)  # no row writes more than ``end`` tokens: the longest row's budget
        # Rows whose real-token counts differ (padding: select_mask ran) have budgets of their own,
        # unless the budget does not depend on the count (then every row's equals the rectangle's).
        live = None
        if p.masked and self.budget(0) != self.budget(p.end):
            live = torch.minimum(self.row_budgets(written), p.valid.sum(dim=1))  # (B,)
        if keep == s and live is None:
            if not p.in_place:  # fits after all (a prefill just over the in-place room)
                self.k[layer, :, :, :s].copy_(p.k)
                self.v[layer, :, :, :s].copy_(p.v)
                self.pos[layer, :, :s], self.valid[layer, :, :s], self.score[layer, :, :s] = p.pos, p.valid, p.score
            self.n[layer] = s
            return
        kb, vb = self.k[layer], self.v[layer]  # (B, Hkv, C, D)
        idx, alive = self.keep_indices(p, keep, live)  # (B, keep)
        hkv, d = p.k.shape[1], p.k.shape[3]
        kv_idx = idx[:, None, :, None].expand(b, hkv, keep, d)  # (B, Hkv, keep, D)
        kb[:, :, :keep].copy_(p.k.gather(2, kv_idx))  # gather first: p.k may view this buffer
        vb[:, :, :keep].copy_(p.v.gather(2, kv_idx))
        self.pos[layer, :, :keep] = p.pos.gather(1, idx)
        self.valid[layer, :, :keep] = alive
        self.score[layer, :, :keep] = p.score.gather(1, idx)
        self.n[layer] = keep

    def kept_positions(self, layer: int) -> torch.Tensor:
        """``(B, n)`` absolute positions of the slots ``layer`` keeps now, ascending; ``-1`` at the
        slots that hold no token of their row (padding, evicted: they come first)."""
        self._commit()
        assert self.pos is not None and self.valid is not None
        n = self.n[layer]
        return self.pos[layer, :, :n].masked_fill(~self.valid[layer, :, :n], -1)

    def kept_tokens(self) -> int:
        """Slots held now, summed over layers (per row, live or dead)."""
        self._commit()
        return sum(self.n)
