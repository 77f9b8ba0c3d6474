"""Finding the network file (explicit path, environment variable, the installed package)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .common import ENV_VAR, FaceIDWeightsNotFound, PACKAGE, WEIGHTS_FILE


def _package_file() -> Path | None:
    """face_recognition_models' copy of the network, located without importing the package (its
    ``__init__`` needs pkg_resources, which setuptools >= 81 no longer ships)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "models" / WEIGHTS_FILE
        if candidate.is_file():
            return candidate
    return None


def _as_file(path: str | os.PathLike) -> Path | None:
    """path itself if a file, ``path/<WEIGHTS_FILE>`` if a folder holding it, else None."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / WEIGHTS_FILE
    return p if p.is_file() else None


def find_face_id_weights(path: str | os.PathLike | None = None) -> Path | None:
    """The dlib face-recognition network file, or None.

    Search order: ``path`` (a file, or a folder holding ``dlib_face_recognition_resnet_model_v1.dat``);
    else ``$TALK3D_FACE_ID_WEIGHTS`` (same); else the file inside an installed
    ``face-recognition-models``. A path given explicitly (argument or variable) that does not
    exist gives None rather than another file: the caller asked for that one.
    """
    if path is not None:
        return _as_file(path)
    if os.environ.get(ENV_VAR):
        return _as_file(os.environ[ENV_VAR])
    return _package_file()


def _requested() -> str:
    return f"${ENV_VAR}={os.environ[ENV_VAR]}" if os.environ.get(ENV_VAR) else ""


def face_id_status(path: str | os.PathLike | None = None) -> str:
    """One line: which identity network is used, or why the identity loss is off and how to fix it."""
    found = find_face_id_weights(path)
    if found is not None:
        return f"identity network: dlib ResNet from {found}"
    asked = str(path) if path is not None else _requested()
    where = f"{asked} is not the network file" if asked else f"no {WEIGHTS_FILE} found"
    return (f"identity loss off: {where}; install face-recognition-models "
            f"(pip install face-recognition-models) or set {ENV_VAR} to {WEIGHTS_FILE}")


def _require_weights(path: str | os.PathLike | None) -> Path:
    found = find_face_id_weights(path)
    if found is None:
        raise FaceIDWeightsNotFound(face_id_status(path))
    return found
