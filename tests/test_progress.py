"""Progress bars throttle their redraws when their stream is not a terminal (talk3d.progress)."""
from __future__ import annotations

import io
import os
import subprocess
import sys

from talk3d.progress import NON_TTY_INTERVAL, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_redraw_interval_follows_the_stream(monkeypatch):
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    to_file = progress_bar(total=3, file=io.StringIO())
    to_terminal = progress_bar(total=3, file=_Terminal())
    asked = progress_bar(total=3, file=io.StringIO(), mininterval=0.5)
    try:
        assert to_file.mininterval == NON_TTY_INTERVAL
        assert to_terminal.mininterval < 1.0
        assert asked.mininterval == 0.5
    finally:
        for bar in (to_file, to_terminal, asked):
            bar.close()


def test_a_redirected_bar_writes_few_redraws(monkeypatch):
    """1,000 quick updates to a file: the first draw and the last, not a redraw per update."""
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    out = io.StringIO()
    with progress_bar(total=1000, file=out, desc="work") as bar:
        for _ in range(1000):
            bar.update(1)
    assert out.getvalue().count("work") <= 3 and "1000/1000" in out.getvalue()


def test_tqdm_environment_setting_wins():
    """tqdm reads TQDM_MININTERVAL when it is imported: a process started with it keeps it."""
    code = ("import io; from talk3d.progress import progress_bar; "
            "print(progress_bar(total=3, file=io.StringIO()).mininterval)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "TQDM_MININTERVAL": "2"}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.strip()) == 2.0
