"""Model outputs readable by attribute and by key, as Hugging Face's ``ModelOutput`` is.

FlagAI's OPT returned a dict, so FlagAI code reads ``model(**data)["logits"]``; flagopt's
outputs are dataclasses, and this base lets both forms work. Fields that are ``None`` are not
keys (``"loss" in out`` is False without labels), as in Hugging Face.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

__all__ = ["ModelOutput"]


class ModelOutput:
    """Base of the output dataclasses: ``out.logits``, ``out["logits"]``, ``out[0]``,
    ``keys()`` / ``values()`` / ``items()`` over the fields that are not ``None``."""

    def keys(self) -> list[str]:
        """Names of the fields that are set (not ``None``), in declaration order."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def values(self) -> list[Any]:
        return [getattr(self, key) for key in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        return [(key, getattr(self, key)) for key in self.keys()]

    def to_tuple(self) -> tuple[Any, ...]:
        """The set fields' values, in order (what ``out[i]`` indexes)."""
        return tuple(self.values())

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self else default

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            if key not in self:
                raise KeyError(f"{key!r} is not set in this {type(self).__name__}; "
                               f"set keys: {self.keys()}")
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())
