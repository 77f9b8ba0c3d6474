"""Progress bars for every long-running command: tqdm, throttled when nobody watches.

On a terminal a bar redraws about ten times a second. Redirected to a file (a batch job, ``nohup``,
CI), each redraw is appended: the 3.5-minute demo training run wrote 3,789 of them (400 KB).
So when the bar's stream is not a terminal it redraws every :data:`NON_TTY_INTERVAL` seconds.
tqdm's own ``TQDM_MININTERVAL`` environment variable, when set, wins.
"""
from __future__ import annotations

import os
import sys

from tqdm import tqdm

__all__ = ["progress_bar", "NON_TTY_INTERVAL"]

#: Seconds between redraws of a bar whose stream is not a terminal.
NON_TTY_INTERVAL = 30.0


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)``, redrawing every NON_TTY_INTERVAL s off a terminal."""
    stream = kwargs.get("file") or sys.stderr
    if "mininterval" not in kwargs and "TQDM_MININTERVAL" not in os.environ and not _is_terminal(stream):
        kwargs["mininterval"] = NON_TTY_INTERVAL
    return tqdm(iterable, **kwargs)
