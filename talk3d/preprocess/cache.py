"""The work folder ``OUT.work/`` that caches each step so that ``--resume`` can pick up.

Every cached file is written to a temporary name and renamed into place, so a step interrupted
mid-write leaves no file that looks finished. ``key.json`` records the inputs and settings; a
resumed run with other ones starts afresh rather than mixing results.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from .errors import PreprocessError

__all__ = ["WorkDir"]


class WorkDir:
    """Cache folder. ``key``: JSON-able dict of everything the cached results depend on."""

    def __init__(self, path, key: dict, resume: bool, log=print):
        self.path = Path(path)
        self.created = False
        key_file = self.path / "key.json"
        if self.path.exists():
            old = None
            if key_file.is_file():
                try:
                    old = json.loads(key_file.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError):
                    old = None
            if not (self.path.is_dir() and isinstance(old, dict)):  # not a cache this code made: never deleted
                raise PreprocessError(f"{self.path} exists and is not a talk3d work folder (no key.json): move it "
                                      "away, or choose another --out")
            if not resume or old != json.loads(json.dumps(key)):
                if resume:
                    log(f"{self.path}: made from other inputs or settings; starting afresh")
                shutil.rmtree(self.path)
        if not self.path.exists():
            self.path.mkdir(parents=True)
            self.created = True
            self._atomic_write(key_file, (json.dumps(key, indent=2) + "\n").encode())

    def _atomic_write(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(path.name + ".partial")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def load(self, name: str) -> dict | None:
        """The arrays saved under ``name`` or None."""
        p = self.path / f"{name}.npz"
        if not p.is_file():
            return None
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def save(self, name: str, **arrays) -> None:
        tmp = self.path / f"{name}.partial.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, self.path / f"{name}.npz")

    def load_json(self, name: str) -> dict | None:
        p = self.path / f"{name}.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def save_json(self, name: str, value: dict) -> None:
        self._atomic_write(self.path / f"{name}.json", (json.dumps(value) + "\n").encode())

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
