"""Datasets: the preprocessed folder format, the built-in synthetic talking head, the loader."""
from .dataset import TalkingHeadDataset
from .format import (DatasetError, DatasetWriter, load_manifest, pack_mask, split_ranges,
                     unpack_mask, validate_dataset)
from .synthetic import HeadState, make_synthetic_dataset, render_frame, render_frames

__all__ = [
    "TalkingHeadDataset", "DatasetError", "DatasetWriter", "load_manifest", "pack_mask",
    "split_ranges", "unpack_mask", "validate_dataset", "HeadState", "make_synthetic_dataset",
    "render_frame", "render_frames",
]
