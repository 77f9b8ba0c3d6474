"""``TalkingHeadDataset``: lazy, memory-mapped random access to a dataset folder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..audio.features import FEATURES_PER_FRAME, windows
from .format import FILES, DatasetError, unpack_mask, validate_dataset

__all__ = ["TalkingHeadDataset"]

_SPLITS = ("train", "val", "all")


class TalkingHeadDataset(Dataset):
    """Frames of one clip with their camera, pose, blink, landmarks, masks and audio window.

    Args:
        root: dataset folder (validated on open by :func:`validate_dataset`).
        split: 'train' (first N - N//11 frames), 'val' (the last N//11) or 'all'.
        image_size: resize images and masks to this side on the fly (None: stored size).
        audio_window: frames per audio window (see :func:`talk3d.audio.windows`).
        audio_steps: feature rows per window frame, centred on it (the model's ``audio_steps``).
        expected_audio_encoder: refuse a dataset whose features come from another encoder
            (name, e.g. 'logmel32'), since a model's audio layers only fit one.

    Items (S = image_size or the stored size, K landmarks, W = audio_window, D feature dim):
        image [3, S, S] float32 in [-1, 1]; camera [25] float32; pose [3] (yaw, pitch, roll rad);
        blink [1] (AU45 scale); landmarks [K, 2] in [-1, 1] (x, y; -1/+1 the image's outer
        edges, as grid_sample with align_corners=False); audio [W, audio_steps, D] float32
        (frames n - W//2 .. n + W - W//2 - 1, edge-padded); mouth_mask, face_mask [1, S, S] float32 in
        [0, 1] (fractional only after resizing); index: int, the frame in the clip.
    """

    def __init__(self, root, split: str = "train", image_size: int | None = None,
                 audio_window: int = 8, expected_audio_encoder: str | None = None, audio_steps: int = 16):
        if split not in _SPLITS:
            raise ValueError(f"TalkingHeadDataset: split must be one of {_SPLITS}, got {split!r}")
        self.root = Path(root)
        self.manifest = validate_dataset(self.root)
        encoder = self.manifest["audio"]["encoder"]
        if expected_audio_encoder is not None and encoder != expected_audio_encoder:
            raise DatasetError(
                f"{self.root}: audio features come from {encoder!r} but {expected_audio_encoder!r} "
                "was expected; re-encode the audio (or train with that encoder)")
        n = int(self.manifest["num_frames"])
        lo, hi = (0, n) if split == "all" else self.manifest["split"][split]
        self.frame_indices = np.arange(lo, hi)
        self.split, self.image_size, self.audio_window = split, image_size, int(audio_window)
        self.audio_steps = int(audio_steps)
        self.stored_size = int(self.manifest["image_size"])
        self.audio_encoder = encoder
        self._arrays: dict | None = None

    def _open(self) -> dict:
        # Opened lazily (and dropped when pickled) so DataLoader workers map the files
        # themselves instead of receiving copies.
        if self._arrays is None:
            files = self.manifest["files"]
            self._arrays = {key: np.load(self.root / files[key], mmap_mode="r")
                            for key in FILES if key != "audio"}
        return self._arrays

    def audio_rows(self) -> np.ndarray:
        """The audio feature rows of this split's frames (2 a frame), ``[2 len(self), A]`` float32."""
        lo, hi = int(self.frame_indices[0]), int(self.frame_indices[-1]) + 1
        return np.array(self._open()["audio_features"][FEATURES_PER_FRAME * lo:FEATURES_PER_FRAME * hi],
                          dtype=np.float32)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arrays"] = None
        return state

    def __len__(self) -> int:
        return len(self.frame_indices)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} {self.split} frames")
        n = int(self.frame_indices[i])
        a, s = self._open(), self.stored_size
        image = torch.from_numpy(np.array(a["frames"][n])).permute(2, 0, 1).float() / 127.5 - 1
        masks = torch.from_numpy(np.stack([unpack_mask(a["mouth_mask"][n], s),
                                           unpack_mask(a["face_mask"][n], s)])).float()
        if self.image_size is not None and self.image_size != s:
            size = (self.image_size, self.image_size)
            image = F.interpolate(image[None], size, mode="bilinear", antialias=True,
                                  align_corners=False)[0].clamp(-1, 1)
            # Area averaging keeps masks in [0, 1] with soft edges when shrinking.
            mode = "area" if self.image_size < s else "bilinear"
            masks = F.interpolate(masks[None], size, mode=mode)[0].clamp(0, 1)
        landmarks = torch.from_numpy(np.array(a["landmarks"][n])) / s * 2 - 1
        return dict(
            image=image,
            camera=torch.from_numpy(np.array(a["cameras"][n])),
            pose=torch.from_numpy(np.array(a["pose"][n])),
            blink=torch.from_numpy(np.array(a["blink"][n : n + 1])),
            landmarks=landmarks,
            audio=torch.from_numpy(windows(a["audio_features"], n, self.audio_window, self.audio_steps)),
            mouth_mask=masks[0:1],
            face_mask=masks[1:2],
            index=n,
        )
