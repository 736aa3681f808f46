"""Key/value caches: one small interface, implemented by the dynamic cache and the static step.

The decoder talks to a cache through ``Cache`` only:

- ``update(layer, k, v)`` stores one layer's new keys/values (B, H, T, D) and returns the
  keys/values that attention reads, (B, H, S, D). The caller's mask covers those S positions.
- ``advance(n)`` is called once per forward pass, after the last layer, with the number of
  new positions T.

Positions and the attention mask are the caller's business (``OPTModel.forward`` derives them
from a 2-D attention mask and ``KVCache.length``; the static step from its key mask), so the
decoder needs nothing else from a cache.

Three implementations:

- ``KVCache``: preallocated ``(layers, batch, heads, capacity, head_dim)`` buffers, one length
  for all rows held on the host; ``update`` writes at ``length`` and returns the filled prefix
  (shapes grow by one per step). Also ``reset``, ``truncate`` (speculative decoding drops
  rejected positions), ``reorder`` (beam search) and ``copy_rows_from`` (one prompt's cache
  into N rows).
- ``StaticCacheView``: the same buffers seen by a static-shape step (``torch.compile``, CUDA
  graphs): ``update`` writes at a *tensor* slot and returns the whole capacity, so no shape
  depends on the step; the key mask hides the unfilled slots. Its owner moves the slot.

- ``RowCache``: the same buffers with one length per row (continuous batching): each row is
  a request of its own, admitted from a prompt's ``KVCache`` and retired when it ends.
  ``update`` writes the new keys/values at ``lengths[b] + arange(T)`` of each row (one
  ``index_put_``) and returns the rows and positions in use; ``advance(n)`` adds n to the
  lengths of the active rows. ``step_inputs`` builds the decoder's positions and key mask
  from the lengths, so a row's logits are those of the same tokens run alone.
  ``truncate_row`` drops one row's newest positions (the server's speculative rollback).
"""

from __future__ import annotations

from typing import Protocol

import torch

from flagopt.model.config import OPTConfig


class Cache(Protocol):
    """What the decoder needs from a key/value cache (see the module docstring)."""

    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``layer``'s new keys/values (B, H, T, D); return what attention reads."""
        ...

    def advance(self, num_positions: int) -> None:
        """Count ``num_positions`` new positions as written (once per forward pass)."""
        ...


class KVBuffers:
    """The preallocated key and value tensors both caches hold,
    ``(layers, rows, heads, capacity, head_dim)`` each, and what can be read off them."""

    def __init__(self, num_layers: int, rows: int, num_heads: int, capacity: int,
                 head_dim: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        shape = (num_layers, rows, num_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def for_model(cls, config: OPTConfig, rows: int, capacity: int, *,
                  dtype: torch.dtype, device: torch.device | str) -> "KVBuffers":
        """Buffers shaped for ``config``: ``rows`` sequences of up to ``capacity`` positions."""
        return cls(config.num_hidden_layers, rows, config.num_attention_heads, capacity,
                   config.head_dim, dtype=dtype, device=device)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device


class KVCache(KVBuffers):
    """Keys and values of every layer, preallocated to ``capacity`` positions; a ``Cache``.

    ``dtype`` is the storage dtype; keys and values are converted to it when written.
    API: ``update`` (write one layer's new keys/values, get the filled prefix back),
    ``advance`` (count the positions a forward pass added), ``reset``, ``truncate``
    (drop the newest positions), ``reorder`` (beam
    search: gather rows by index, in place) and ``copy_rows_from`` (copy each prompt's cache
    into N consecutive rows).
    """

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, capacity: int,
                 head_dim: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        super().__init__(num_layers, batch_size, num_heads, capacity, head_dim, dtype=dtype,
                         device=device)
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k_new``/``v_new`` (B, H, T, D) after the filled positions of ``layer``.

        Returns the keys and values of all positions so far, (B, H, length + T, D), as views.
        """
        start, end = self.length, self.length + k_new.shape[2]
        if end > self.capacity:
            self._grow(end)
        self.k[layer, :, :, start:end] = k_new  # converted to the cache's dtype
        self.v[layer, :, :, start:end] = v_new
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, num_positions: int) -> None:
        """Count ``num_positions`` new positions as filled (once per forward pass)."""
        self.length += num_positions

    def reset(self) -> None:
        """Forget every position (the memory is kept for reuse)."""
        self.length = 0

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (speculative decoding's rollback of
        rejected draft tokens); the memory is kept and the next write lands at ``length``.

        Raises:
            ValueError: ``length`` is negative or more than the positions filled.
        """
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}; "
                             f"expected 0 <= length <= {self.length}")
        self.length = length

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` positions (filled ones are kept); never shrinks."""
        if capacity > self.capacity:
            self._grow(capacity, exact=True)

    def gather_slots(self, index: torch.Tensor) -> None:
        """Make position ``j`` of row ``b`` what position ``index[b, j]`` held, in every
        layer, and keep ``index.shape[1]`` positions (speculative decoding moves each row's
        kept positions to the front, past the holes of rejected proposals).

        Raises:
            ValueError: ``index`` is not (batch, n) with n <= length.
        """
        rows, n = index.shape
        if rows != self.batch_size or n > self.length:
            raise ValueError(f"index of shape {tuple(index.shape)}; expected ({self.batch_size}, "
                             f"n) with n <= length={self.length}")
        heads, dim = self.k.shape[2], self.k.shape[4]
        where = index[:, None, :, None].expand(rows, heads, n, dim)
        for kind in (self.k, self.v):
            for layer in range(kind.shape[0]):
                kind[layer, :, :, :n] = kind[layer, :, :, :self.length].gather(2, where)
        self.length = n

    def reorder(self, index: torch.Tensor) -> None:
        """Make row ``i`` a copy of row ``index[i]`` in every layer (beam search), in place."""
        filled = slice(0, self.length)
        for kind in (self.k, self.v):
            for layer in range(kind.shape[0]):
                rows = kind[layer, :, :, filled]  # (B, H, length, D)
                rows.copy_(rows.index_select(0, index))

    def copy_rows_from(self, other: "KVCache", n: int) -> None:
        """Fill rows ``i*n .. i*n+n-1`` with ``other``'s row ``i`` (one prompt, n beams).

        ``other`` must hold ``batch / n`` rows; its filled positions are copied and this
        cache's ``length`` becomes ``other.length``.
        """
        if other.batch_size * n != self.batch_size:
            raise ValueError(f"cannot copy {other.batch_size} rows x {n} into "
                             f"{self.batch_size} rows")
        filled = slice(0, other.length)
        for i in range(n):  # strided writes: no temporary of the repeated size
            self.k[:, i::n, :, filled] = other.k[:, :, :, filled]
            self.v[:, i::n, :, filled] = other.v[:, :, :, filled]
        self.length = other.length

    def static_view(self, write_at: torch.Tensor) -> "StaticCacheView":
        """These buffers as a static-shape step sees them, writing at slot ``write_at``."""
        return StaticCacheView(self.k, self.v, write_at)

    def _grow(self, needed: int, exact: bool = False) -> None:
        # For callers that did not size the cache up front: forward(use_cache=True)
        # allocates the prompt's length, and feeding the returned cache more tokens grows it
        # (doubling); ``reserve`` grows to exactly what it is asked.
        capacity = needed if exact else max(needed, 2 * self.capacity)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[:3] + (capacity,) + old.shape[4:])
            new[:, :, :, :self.length] = old[:, :, :, :self.length]
            setattr(self, name, new)


class StaticCacheView:
    """A ``Cache`` with shapes that never change, for a compiled one-token step.

    ``update`` writes the new keys/values at slot ``write_at`` (a (1,) long tensor, so the
    slot is data, not a constant baked into the compiled graph) and returns the whole
    capacity (B, H, capacity, D); the caller's key mask hides the slots not written yet.
    ``advance`` does nothing: the owner moves ``write_at`` (and its ``KVCache.length``)
    between steps, outside the compiled code.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, write_at: torch.Tensor) -> None:
        self.k, self.v, self.write_at = k, v, write_at  # (L, B, H, capacity, D) each

    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k_new``/``v_new`` (B, H, 1, D) at the slot; return (B, H, capacity, D)."""
        self.k[layer].index_copy_(2, self.write_at, k_new.to(self.k.dtype))
        self.v[layer].index_copy_(2, self.write_at, v_new.to(self.v.dtype))
        return self.k[layer], self.v[layer]

    def advance(self, num_positions: int) -> None:
        """Nothing to count here: the owner moves the slot between steps."""


class RowCache(KVBuffers):
    """A ``Cache`` whose rows each hold one sequence of its own length (continuous batching).

    Buffers ``(layers, rows, heads, capacity, head_dim)`` as in ``KVCache``; ``lengths`` (rows,)
    long on the cache's device and ``active`` (rows,) bool say what each row holds. A forward
    pass covers rows ``[0, span_rows)`` and positions ``[0, span)`` (set by ``step_inputs``),
    so free rows past the last active one and unfilled positions past the longest row cost
    nothing. API: ``admit`` (a prompt's ``KVCache`` row into a free row), ``retire``,
    ``truncate_row``, ``step_inputs`` (positions and key mask of the next T tokens),
    ``update``, ``advance``.
    """

    def __init__(self, num_layers: int, rows: int, num_heads: int, capacity: int,
                 head_dim: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        super().__init__(num_layers, rows, num_heads, capacity, head_dim, dtype=dtype,
                         device=device)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.active = torch.zeros(rows, dtype=torch.bool, device=device)
        self._span_rows, self._span = rows, capacity

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    def free_rows(self) -> list[int]:
        """Indices of the rows holding no sequence, lowest first (admit there first)."""
        return (~self.active).nonzero().flatten().tolist()

    def admit(self, row: int, prompt: KVCache, prompt_row: int = 0) -> None:
        """Copy ``prompt``'s row ``prompt_row`` (its filled positions) into free row ``row``.

        Raises:
            ValueError: ``row`` is in use, or the prompt does not fit the capacity.
        """
        if bool(self.active[row]):
            raise ValueError(f"row {row} is in use; admit into one of {self.free_rows()}")
        n = prompt.length
        if n > self.capacity:
            raise ValueError(f"a prompt of {n} positions does not fit a capacity of "
                             f"{self.capacity}")
        self.k[:, row, :, :n] = prompt.k[:, prompt_row, :, :n]  # (L, H, n, D)
        self.v[:, row, :, :n] = prompt.v[:, prompt_row, :, :n]
        self.lengths[row] = n
        self.active[row] = True

    def retire(self, row: int) -> None:
        """Free ``row``: its positions are forgotten and the row can be admitted into again."""
        self.active[row] = False
        self.lengths[row] = 0

    def truncate_row(self, row: int, length: int) -> None:
        """Forget the positions of active ``row`` from ``length`` on (speculative decoding's
        rollback of that row's rejected proposals); its next write lands at ``length``.

        Raises:
            ValueError: ``row`` is not an active row, or ``length`` is negative or more than
                the row's filled positions.
        """
        if not (isinstance(row, int) and 0 <= row < self.rows and bool(self.active[row])):
            raise ValueError(f"row={row!r} is not an active row; expected one of "
                             f"{self.active.nonzero().flatten().tolist()}")
        filled = int(self.lengths[row])
        if not 0 <= length <= filled:
            raise ValueError(f"cannot truncate row {row} of {filled} positions to {length}; "
                             f"expected 0 <= length <= {filled}")
        self.lengths[row] = length

    def step_inputs(self, t: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (R, T) and key mask (R, 1, T, S) for T new tokens in rows ``[0, R)``.

        R is one past the last active row and S the longest row's length plus T; the next
        ``update`` returns exactly those rows and positions. Query t of row b sees the slots
        ``<= lengths[b] + t`` (its past and itself); a free row's queries see slot 0 alone, so
        no row of the mask is empty (which would turn into NaN).
        """
        active = self.active.nonzero().flatten()
        rows = int(active[-1]) + 1 if len(active) else 1
        lengths = self.lengths[:rows]
        span = min(int(lengths.max()) + t, self.capacity)
        self._span_rows, self._span = rows, span
        new = torch.arange(t, device=self.device)
        positions = lengths[:, None] + new  # (R, T)
        slots = torch.arange(span, device=self.device)
        mask = slots[None, None, :] <= positions[:, :, None]  # (R, T, S)
        return positions, mask[:, None]  # (R, 1, T, S)

    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k_new``/``v_new`` (R, H, T, D) at each row's length; return (R, H, S, D).

        R and S are the rows and positions of the last ``step_inputs`` call.
        """
        rows, t = k_new.shape[0], k_new.shape[2]
        slots = self.lengths[:rows, None] + torch.arange(t, device=self.device)  # (R, T)
        index = (torch.arange(rows, device=self.device)[:, None].expand(rows, t), slots)
        # index_put_ over (rows, slots) of the (R, C, H, D) view: one write for every row
        for buf, new in ((self.k, k_new), (self.v, v_new)):
            buf[layer].transpose(1, 2).index_put_(index, new.transpose(1, 2).to(buf.dtype))
        return (self.k[layer, :self._span_rows, :, :self._span],
                self.v[layer, :self._span_rows, :, :self._span])

    def advance(self, num_positions: int) -> None:
        """Add ``num_positions`` to the length of every active row."""
        self.lengths += num_positions * self.active.long()
