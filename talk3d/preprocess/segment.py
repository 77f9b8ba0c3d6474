"""Person segmentation for the foreground mask: MediaPipe's selfie-segmentation network, which ships
inside the ``mediapipe`` wheel, run by LiteRT (``ai-edge-litert``, TensorFlow Lite's runtime).
Nothing is downloaded at run time.

Where the model comes from, in this order:

1. ``TALK3D_SELFIE_SEGMENTER``: a ``.tflite`` file, a mediapipe wheel (``.whl``) holding it, or a
   folder holding one of them (``pip download --no-deps --only-binary :all: mediapipe==0.10.21 -d DIR``;
   a folder with several is refused, naming them);
2. an installed ``mediapipe`` package's copy (found by path; mediapipe itself is not imported).

When the model or the runtime is missing, :func:`load_segmenter` says which and how to get it, and
the foreground mask is drawn from the landmarks alone (:func:`talk3d.preprocess.masks.foreground_masks`).
A path that is set but unusable (missing, not a model) is an error, not a silent fallback.
"""
from __future__ import annotations

import importlib.util
import os
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import PreprocessError

__all__ = ["SelfieSegmenter", "load_segmenter", "ENV_VAR", "MODEL_MEMBER", "THRESHOLD"]

ENV_VAR = "TALK3D_SELFIE_SEGMENTER"
#: The model's path inside the mediapipe package (and wheel).
MODEL_MEMBER = "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite"
#: Person probability above which a pixel is foreground (the model's own 0.5 boundary).
THRESHOLD = 0.5
HOW_TO = (f"pip install ai-edge-litert, and set {ENV_VAR} to the mediapipe 0.10.21 wheel "
          f"(pip download --no-deps --only-binary :all: mediapipe==0.10.21 -d DIR) or install mediapipe")


class SelfieSegmenter:
    """``crops [B, S, S, 3] uint8 -> person probability [B, S, S] float32`` in [0, 1].

    The network takes 256 x 256 RGB in [0, 1]; crops are resized to it and the probability back
    to S (bilinear both ways).
    """

    name = "mediapipe-selfie-segmentation"

    def __init__(self, model: bytes, *, source: str = "model", num_threads: int = 2):
        from ai_edge_litert.interpreter import Interpreter

        try:
            self._net = Interpreter(model_content=model, num_threads=num_threads)
            self._net.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise PreprocessError(f"{source}: not a TensorFlow Lite model ({e})") from None
        inp, out = self._net.get_input_details(), self._net.get_output_details()
        if (len(inp) != 1 or len(out) != 1 or tuple(inp[0]["shape"]) != (1, 256, 256, 3)
                or tuple(out[0]["shape"]) != (1, 256, 256, 1)):
            raise PreprocessError(f"{source}: not the selfie-segmentation model (input "
                                  f"{[tuple(d['shape']) for d in inp]}, output {[tuple(d['shape']) for d in out]}; "
                                  "want [1, 256, 256, 3] -> [1, 256, 256, 1])")
        self._in, self._out = inp[0]["index"], out[0]["index"]
        self.source = source

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        crops = np.asarray(crops)
        if crops.ndim != 4 or crops.shape[-1] != 3 or crops.shape[1] != crops.shape[2]:
            raise ValueError(f"SelfieSegmenter: crops must be [B, S, S, 3], got {crops.shape}")
        size = crops.shape[1]
        probs = np.empty(crops.shape[:3], np.float32)
        for i, crop in enumerate(crops):
            x = np.asarray(Image.fromarray(crop).resize((256, 256), Image.BILINEAR), np.float32) / 255.0
            self._net.set_tensor(self._in, x[None])
            self._net.invoke()
            p = self._net.get_tensor(self._out)[0, :, :, 0]
            probs[i] = np.asarray(Image.fromarray(p, mode="F").resize((size, size), Image.BILINEAR))
        return np.clip(probs, 0.0, 1.0)


def _from_file(path: Path) -> bytes:
    if path.is_dir():
        found = sorted(path.glob("*.tflite")) + sorted(path.glob("mediapipe-*.whl"))
        if not found:
            raise PreprocessError(f"{ENV_VAR}={path}: the folder holds no .tflite file or mediapipe wheel")
        if len(found) > 1:  # no rule says which of them is the user's model: ask, rather than guess
            raise PreprocessError(f"{ENV_VAR}={path}: the folder holds {len(found)} candidate models "
                                  f"({', '.join(f.name for f in found)}); set {ENV_VAR} to one of these files")
        path = found[0]
    if not path.is_file():
        raise PreprocessError(f"{ENV_VAR}={path}: no such file")
    if path.suffix == ".whl":
        try:
            with zipfile.ZipFile(path) as z:
                return z.read(MODEL_MEMBER)
        except KeyError:
            raise PreprocessError(f"{path}: the wheel holds no {MODEL_MEMBER}") from None
        except zipfile.BadZipFile:
            raise PreprocessError(f"{path}: not a readable wheel (zip)") from None
    return path.read_bytes()


def _installed_model() -> Path | None:
    spec = importlib.util.find_spec("mediapipe")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root).parent / MODEL_MEMBER
        if path.is_file():
            return path
    return None


def load_segmenter() -> tuple[SelfieSegmenter | None, str]:
    """The segmenter and where its model came from, or ``(None, why not and how to get it)``.

    Raises :class:`PreprocessError` when ``TALK3D_SELFIE_SEGMENTER`` is set but unusable.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        model, source = _from_file(Path(env)), env
    else:
        path = _installed_model()
        if path is None:
            return None, f"no selfie-segmentation model ({HOW_TO})"
        model, source = path.read_bytes(), str(path)
    if importlib.util.find_spec("ai_edge_litert") is None:
        return None, f"the LiteRT runtime is not installed ({HOW_TO})"
    return SelfieSegmenter(model, source=source), source
