"""The one exception type of talk3d.preprocess."""
from __future__ import annotations

__all__ = ["PreprocessError", "format_frames"]


class PreprocessError(ValueError):
    """Input that cannot become a dataset (no video or audio, too short, no face, unreadable).

    The message says what is wrong with the input and, where it applies, which frames.
    """


def format_frames(indices, limit: int = 12) -> str:
    """[M] sorted frame indices -> '3-7, 12, 40-41 (and 5 more ranges)' (ranges compress it)."""
    ranges, start, prev = [], None, None
    for i in (int(i) for i in indices):
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            ranges.append((start, prev))
            start = prev = i
    if start is not None:
        ranges.append((start, prev))
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in ranges[:limit])
    if len(ranges) > limit:
        text += f" (and {len(ranges) - limit} more ranges)"
    return text
