"""Evaluation of a trained run: the paper's audio-driven (Table 2) and novel-view (Table 1) protocols.

``python -m talk3d.evaluate --run RUN --out EVAL_DIR``; see :func:`evaluate_run` and
:mod:`talk3d.evaluate.metrics` for the metric definitions.
"""
from .action_units import AUTrack, OpenFaceAU, OpenFaceError, action_unit_error, find_openface, read_openface_csv
from .metrics import (IBUG_MOUTH, LandmarkDetector, LPIPSMetric, MouthMaskOracle, Unavailable, frechet_distance,
                      identity_similarity, inner_lip_opening, landmark_distance, mouth_opening_score, pearson,
                      psnr, ssim)
from .protocol import NOVEL_VIEWS_DEG, EvaluationError, Plugins, evaluate_run, pose_name

__all__ = ["AUTrack", "OpenFaceAU", "OpenFaceError", "action_unit_error", "find_openface", "read_openface_csv",
           "IBUG_MOUTH", "LandmarkDetector", "LPIPSMetric", "MouthMaskOracle", "Unavailable", "frechet_distance",
           "identity_similarity", "inner_lip_opening", "landmark_distance", "mouth_opening_score", "pearson", "psnr", "ssim",
           "NOVEL_VIEWS_DEG", "EvaluationError", "Plugins", "evaluate_run", "pose_name"]
