"""JSON round trip shared by the frozen dataclass configs of the models."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar


class JsonConfig:
    """``to_dict`` / ``from_dict`` for a frozen dataclass: tuples become lists (and back through the
    class's ``__post_init__``), missing keys take the defaults, unknown keys raise ``ValueError``."""

    _tuple_fields: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict; :meth:`from_dict` inverts it exactly."""
        out = dataclasses.asdict(self)
        for name in self._tuple_fields:
            out[name] = list(out[name])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}.from_dict: unknown keys {unknown}")
        return cls(**data)
