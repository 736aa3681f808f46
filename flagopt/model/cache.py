"""A preallocated key/value cache for the whole generation, written in place.

One tensor per kind for all layers, shaped ``(layers, batch, heads, capacity, head_dim)``, so a
decoding step only writes the new positions (no ``torch.cat`` per step) and static shapes let
``torch.compile`` capture the step. ``length`` counts the positions filled so far; the model
advances it once per forward pass.
"""

from __future__ import annotations

import torch

from flagopt.model.config import OPTConfig


class KVCache:
    """Keys and values of every layer, preallocated to ``capacity`` positions.

    API: ``update`` (write one layer's new keys/values, get the filled prefix back),
    ``advance`` (count the positions a forward pass added), ``reset``, ``reorder`` (beam
    search: gather rows by index, in place) and ``copy_rows_from`` (copy each prompt's cache
    into N consecutive rows).
    """

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, capacity: int,
                 head_dim: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        shape = (num_layers, batch_size, num_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @classmethod
    def for_model(cls, config: OPTConfig, batch_size: int, capacity: int, *,
                  dtype: torch.dtype, device: torch.device | str) -> "KVCache":
        """A cache shaped for ``config`` holding ``capacity`` positions per row."""
        return cls(config.num_hidden_layers, batch_size, config.num_attention_heads, capacity,
                   config.head_dim, dtype=dtype, device=device)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k_new``/``v_new`` (B, H, T, D) after the filled positions of ``layer``.

        Returns the keys and values of all positions so far, (B, H, length + T, D), as views.
        """
        start, end = self.length, self.length + k_new.shape[2]
        if end > self.capacity:
            self._grow(end)
        self.k[layer, :, :, start:end] = k_new
        self.v[layer, :, :, start:end] = v_new
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, num_positions: int) -> None:
        """Count ``num_positions`` new positions as filled (once per forward pass)."""
        self.length += num_positions

    def reset(self) -> None:
        """Forget every position (the memory is kept for reuse)."""
        self.length = 0

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

    def _grow(self, needed: int) -> None:
        # Only for callers that did not size the cache up front (e.g. forward(use_cache=True)).
        capacity = max(needed, 2 * self.capacity)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[:3] + (capacity,) + old.shape[4:])
            new[:, :, :, :self.length] = old[:, :, :, :self.length]
            setattr(self, name, new)
