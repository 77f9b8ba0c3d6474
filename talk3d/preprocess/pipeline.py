"""``preprocess_video``: one video -> one talk3d dataset folder (see talk3d.data.format).

Steps, each cached in ``OUT.work/`` (see :mod:`.cache`) and shown with a progress bar:

1. probe: the file opens, has a video stream, and has audio (or ``audio=`` is given).
2. audio: 16-kHz mono, aligned to the first video frame.
3. detect: 68 landmarks on every 25-fps frame (checkpointed every CHECKPOINT_FRAMES frames, so
   an interrupted detection resumes where it stopped). Frames without a face before the first
   frame with one and after the last (the moments around pressing record) are left out, with
   the sound of those frames; the log says so.
4. track: gaps filled, landmarks smoothed; FFHQ crop squares reframed for the rig (align.rig_quads),
   smoothed; landmarks in the crop.
5. crop: frames resampled into S x S crops (a memory-mapped cache, also checkpointed).
6. pose: PnP head pose -> EG3D cameras; blink from the eye aspect ratio.
7. features: audio features (log-mel by default).
8. write: masks (mouth, face, foreground: a person segmentation where the segmenter is available,
   see :mod:`.segment`, else drawn from the landmarks), the dataset (atomically, by DatasetWriter)
   and ``contact_sheet.png``.

Bad input raises :class:`PreprocessError` and deletes the work folder, so nothing a re-run
would trust is left; other failures (a crash, Ctrl-C) keep it for ``resume=True``.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
from ..progress import progress_bar

from ..audio.features import FPS, SAMPLES_PER_FRAME, LogMelEncoder, Wav2Vec2Encoder
from ..data.format import DatasetWriter, pack_mask
from ..data.synthetic import IBUG68_INDICES, LANDMARK_NAMES
from ..render import TALK3D_RIG
from .align import crop_frames, ffhq_quads, rig_quads, smooth_quads, to_crop
from .blink import blink_au45
from .cache import WorkDir
from .errors import PreprocessError, format_frames
from .landmarks import NUM_LANDMARKS, DlibDetector, LandmarkDetector, fill_and_smooth
from .loudness import QUIET_DBFS, audio_levels
from .masks import face_masks, foreground_masks, mouth_masks
from .pose import estimate_pose
from .segment import THRESHOLD, load_segmenter
from .sheet import contact_sheet
from .video import fit_audio, iter_frames, load_audio_file, probe_video, read_audio_track

__all__ = ["preprocess_video", "MIN_SECONDS", "CHECKPOINT_FRAMES"]

#: Shortest clip accepted: 2 s = 50 frames (fewer leaves ~4 validation frames and no blink).
MIN_SECONDS = 2.0
#: Detection and cropping save their progress every this many frames (4 s of video).
CHECKPOINT_FRAMES = 100
#: Frames per crop / mask batch (bounds memory: 32 HD frames are ~200 MB as float).
CHUNK = 32
#: How the foreground mask is made: "auto" (segmentation when the segmenter is available, else
#: from the landmarks), "segmentation" (required), "landmarks" (the geometric prior only).
FOREGROUND_MODES = ("auto", "segmentation", "landmarks")


#: The cameras' rig: Talk3D's (focal 3.6, pivot (0, 0.05, 0.2)), as the dataset reader assumes
#: (talk3d.data.format.dataset_rig). The crops are framed for it (align.rig_quads).
RIG = TALK3D_RIG
#: How crops are framed; in the cache key, so that a cache of crops framed otherwise is redone.
#: Until 2026-12-06 the crops were FFHQ's squares, framed for FFHQ's camera, not the rig's: a head
#: the rig renders a head at 0.84 of the size it had in them and 7 % of the crop side lower.
CROP_FRAMING = "ffhq square reframed for the rig"


def _key(video: Path, audio, size: int, max_frames, detector, encoder: str, start_frame: int = 0) -> dict:
    st = video.stat()
    key = dict(video=str(video.resolve()), video_bytes=st.st_size, video_mtime_ns=st.st_mtime_ns,
               size=size, max_frames=max_frames, detector=detector.name, encoder=encoder, framing=CROP_FRAMING)
    if start_frame:  # (absent when 0: the caches of runs before --start stay valid)
        key.update(start_frame=start_frame)
    if audio is not None:
        a = Path(audio)
        key.update(audio=str(a.resolve()), audio_mtime_ns=a.stat().st_mtime_ns if a.exists() else 0)
    return key


def _bar(total, desc, progress):
    return progress_bar(total=total, desc=desc, unit="frame", disable=not progress, leave=False,
                file=sys.stderr)


def _detect(video, work: WorkDir, detector, max_frames, total, progress, skip: int = 0) -> dict:
    """Landmarks of every frame: dict(raw [N, 68, 2], found [N] bool, frame_shape [2]). The first
    ``skip`` frames (before --start) are decoded but not searched: found False."""
    done = work.load("detect")
    if done is not None:
        return done
    part = work.load("detect_partial")
    start = int(part["count"]) if part is not None else 0
    raw = list(part["raw"][:start]) if part is not None else []
    found = list(part["found"][:start]) if part is not None else []
    shape = None
    bar = _bar(total, "detect faces", progress)
    bar.update(start)
    for i, frame in enumerate(iter_frames(video, FPS, max_frames)):
        shape = frame.shape[:2]
        if i < start:  # decoded again only to reach the checkpoint
            continue
        lm = detector(frame, i) if i >= skip else None
        if lm is not None and np.asarray(lm).shape != (NUM_LANDMARKS, 2):
            raise ValueError(f"detector {detector.name} returned shape {np.shape(lm)}, "
                             f"expected ({NUM_LANDMARKS}, 2)")
        raw.append(np.zeros((NUM_LANDMARKS, 2)) if lm is None else np.asarray(lm, np.float64))
        found.append(lm is not None)
        bar.update(1)
        if (i + 1) % CHECKPOINT_FRAMES == 0:
            work.save("detect_partial", raw=np.array(raw), found=np.array(found), count=i + 1)
    bar.close()
    if shape is None:
        raise PreprocessError(f"{video}: the video stream has no decodable frames")
    result = dict(raw=np.array(raw), found=np.array(found, dtype=bool), frame_shape=np.array(shape))
    work.save("detect", **result)
    return result


def _crops(video, work: WorkDir, centre, axis, size, progress, offset: int = 0) -> np.ndarray:
    """Crops of video frames offset .. offset + n - 1 (n = len(centre)), cached and checkpointed."""
    n = centre.shape[0]
    path = work.path / "crops.npy"
    state = work.load_json("crops") or {}
    start = int(state.get("count", 0)) if path.is_file() else 0
    mode = "r+" if start > 0 else "w+"
    crops = np.lib.format.open_memmap(path, mode, np.uint8, (n, size, size, 3))
    if start >= n:
        return crops
    bar = _bar(n, "crop", progress)
    bar.update(start)
    batch, first = [], start
    for i, frame in enumerate(iter_frames(video, FPS, offset + n)):
        i -= offset  # the crop's row
        if i < start:
            continue
        batch.append(frame)
        if len(batch) == CHUNK or i == n - 1:
            crops[first:i + 1] = crop_frames(np.stack(batch), centre[first:i + 1],
                                              axis[first:i + 1], size)
            bar.update(len(batch))
            if (i + 1) // CHECKPOINT_FRAMES != first // CHECKPOINT_FRAMES or i == n - 1:
                crops.flush()
                work.save_json("crops", dict(count=i + 1))
            batch, first = [], i + 1
    bar.close()
    if work.load_json("crops")["count"] < n:
        raise PreprocessError(f"{video}: the second decoding pass gave fewer frames than the first")
    return crops


def _face_span(found: np.ndarray, video, log, start: int = 0) -> tuple[int, int]:
    """(first, last): the video's frames from the first with a face to the last with one, at or after
    frame ``start`` (--start; the frames before it were not searched). The frames outside (a
    recording's start and end, before the person is in view) are left out and the log says so; too
    few frames left, or none with a face, is a PreprocessError naming the frames."""
    n, hits = found.size, np.flatnonzero(found)
    searched = n - start
    missing = np.flatnonzero(~found[start:]) + start
    if hits.size == 0:
        raise PreprocessError(f"{video}: no face found in {searched} of {searched} frames; frames without a face: "
                              f"{format_frames(missing)}")
    first, last = int(hits[0]), int(hits[-1])
    kept = last - first + 1
    if kept < MIN_SECONDS * FPS:
        raise PreprocessError(
            f"{video}: no face found in {missing.size} of {searched} frames; frames without a face: "
            f"{format_frames(missing)}. The face is seen in frames {first}-{last} only "
            f"({kept / FPS:.2f} s); at least {MIN_SECONDS:g} s are needed")
    cut = [f"0-{start - 1} (before --start)"] if start > 0 else []
    cut += [f"{start}-{first - 1} ({(first - start) / FPS:.2f} s without a face)"] if first > start else []
    cut += [f"{last + 1}-{n - 1} ({(n - 1 - last) / FPS:.2f} s without a face)"] if last < n - 1 else []
    if cut:
        log(f"left out: video frames {', '.join(cut)}, with their sound; the dataset is frames {first}-{last} "
            f"({kept / FPS:.1f} s)")
    return first, last


def _encoder(name: str, wav2vec2_path, feature_dim: int):
    if name == "logmel":
        return LogMelEncoder(feature_dim)
    if name == "wav2vec2":
        if wav2vec2_path is None:
            raise ValueError("--audio-encoder wav2vec2 needs --wav2vec2-path DIR (a local model)")
        return Wav2Vec2Encoder(wav2vec2_path)
    raise ValueError(f"unknown audio encoder {name!r} (logmel or wav2vec2)")


def _segmenter(foreground: str, log):
    """(segmenter or None, settings entry) for the foreground mode, said in the log."""
    if foreground not in FOREGROUND_MODES:
        raise ValueError(f"--foreground {foreground!r}: must be one of {', '.join(FOREGROUND_MODES)}")
    if foreground == "landmarks":
        return None, None
    segmenter, where = load_segmenter()
    if segmenter is None:
        if foreground == "segmentation":
            raise PreprocessError(f"--foreground segmentation: {where}")
        log(f"foreground mask: drawn from the landmarks only, {where}")
        return None, None
    log(f"foreground mask: person segmentation ({segmenter.name}, {where})")
    return segmenter, dict(model=segmenter.name, source=where, threshold=THRESHOLD)


def preprocess_video(video, out, *, audio=None, size: int = 512, fps: int = FPS,
                     max_frames: int | None = None, start: float = 0.0, resume: bool = False,
                     overwrite: bool = False,
                     audio_encoder: str = "logmel", wav2vec2_path=None, feature_dim: int = 32,
                     detector: LandmarkDetector | None = None, keep_work: bool = False,
                     foreground: str = "auto", progress: bool = True, log=print) -> Path:
    """Turn ``video`` into the dataset folder ``out``; returns its path.

    Args:
        audio: a separate sound track (WAV or anything PyAV reads) instead of the video's.
        size: crop side S. fps: must be 25 (the dataset format's rate).
        max_frames: use at most this many frames (at 25 fps), from ``start`` on.
        start: seconds of the video to skip first (e.g. to use the part after the face is away
            for too long to bridge).
        resume: reuse the steps cached in ``OUT.work/`` by an earlier, interrupted run.
        detector: a LandmarkDetector (default :class:`DlibDetector`); its optional ``template``
            [68, 3] replaces the generic 3-D face in the pose fit.
        keep_work: keep ``OUT.work/`` after success (else it is deleted: the crop cache is as
            large as the dataset).
        foreground: the foreground mask from a person segmentation (``"segmentation"``, an error
            when the segmenter is missing), from the landmarks (``"landmarks"``), or the first
            when available (``"auto"``, the log says which).
    Raises:
        PreprocessError for unusable input (message names the problem and frames);
        FileExistsError when ``out`` exists and not ``overwrite``.
    """
    video, out = Path(video), Path(out)
    if fps != FPS:
        raise ValueError(f"--fps {fps}: the talk3d dataset format is fixed at {FPS} fps")
    if size < 64 or size % 8:
        raise ValueError(f"--size {size}: must be a multiple of 8, >= 64")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"--max-frames {max_frames}: must be >= 1")
    if not (math.isfinite(start) and start >= 0):
        raise ValueError(f"--start {start}: must be a number of seconds >= 0")
    start_frame = round(start * FPS)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    if not video.is_file():
        raise PreprocessError(f"{video}: no such file")
    if audio is not None and not Path(audio).is_file():
        raise PreprocessError(f"--audio {audio}: no such file")
    encoder = _encoder(audio_encoder, wav2vec2_path, feature_dim)
    segmenter, seg_settings = _segmenter(foreground, log)
    detector = DlibDetector() if detector is None else detector
    work = WorkDir(out.parent / f"{out.name}.work",
                   _key(video, audio, size, max_frames, detector, encoder.name, start_frame), resume, log)
    try:
        path = _run(video, out, work, detector, encoder, audio, size, max_frames, overwrite,
                    progress, log, segmenter, seg_settings, start_frame)
    except PreprocessError:
        work.remove()  # bad input: nothing for a re-run to trust
        raise
    if not keep_work:
        work.remove()
    return path


def _run(video, out, work, detector, encoder, audio, size, max_frames, overwrite, progress, log,
         segmenter, seg_settings, start_frame=0):
    info = work.load_json("probe")
    if info is None:
        info = probe_video(video).to_dict()
        if info["duration"] is not None and info["duration"] < MIN_SECONDS - 1.0 / FPS:
            raise PreprocessError(f"{video}: only {info['duration']:.2f} s long; at least "
                                  f"{MIN_SECONDS:g} s of video are needed")
        if audio is None and not info["has_audio"]:
            raise PreprocessError(f"{video}: the file has no audio stream; pass the sound "
                                  "track with --audio FILE (a WAV or any audio file)")
        work.save_json("probe", info)

    cached = work.load("audio")
    if cached is None:
        wave = (load_audio_file(audio) if audio is not None
                else read_audio_track(video, info["start_time"]))
        work.save("audio", wave=wave)
    else:
        wave = cached["wave"]

    total = None if info["duration"] is None else round(info["duration"] * FPS)
    limit = None if max_frames is None else start_frame + max_frames  # frames decoded
    if limit is not None:
        total = limit if total is None else min(total, limit)
    det = _detect(video, work, detector, limit, total, progress, skip=start_frame)
    video_frames = det["found"].size
    usable = video_frames - start_frame
    if usable < MIN_SECONDS * FPS:
        after = f" after --start {start_frame / FPS:g} s" if start_frame else ""
        raise PreprocessError(f"{video}: only {max(0, usable)} frames ({max(0, usable) / FPS:.2f} s) at {FPS} fps"
                              f"{after}; at least {MIN_SECONDS:g} s of video are needed")
    first, last = _face_span(det["found"], video, log, start_frame)
    det = dict(det, raw=det["raw"][first:last + 1], found=det["found"][first:last + 1])
    n = last - first + 1
    wave = wave[first * SAMPLES_PER_FRAME:]  # the sound of the frames kept
    if wave.size < 0.5 * n * SAMPLES_PER_FRAME:
        log(f"warning: the audio ({wave.size / 16000:.2f} s) is much shorter than the video "
            f"({n / FPS:.2f} s); the rest is silence")
    levels = audio_levels(fit_audio(wave, n, SAMPLES_PER_FRAME))
    if levels["quiet"]:
        log(f"warning: the sound track is {'silent' if levels['peak_dbfs'] <= -200 else 'nearly silent'} "
            f"(loud frames at {levels['loud_dbfs']:.0f} dBFS, peak {levels['peak_dbfs']:.0f} dBFS; speech "
            f"is above {QUIET_DBFS:.0f}): a model trained on it learns no lip sync. The dataset is "
            "still written (for the 3-D head); pass the speech with --audio FILE if it was recorded apart")

    track = work.load("track")
    if track is None:
        lm = fill_and_smooth(det["raw"], det["found"], source=str(video), first_frame=first,
                             gap_hint=". To use the video before the gap, pass --max-frames; after it, --start SECONDS")
        centre, axis = smooth_quads(*rig_quads(*ffhq_quads(lm), RIG))
        track = dict(lm=lm, centre=centre, axis=axis, lm_crop=to_crop(lm, centre, axis, size))
        work.save("track", **track)
    lm_crop = track["lm_crop"]

    crops = _crops(video, work, track["centre"], track["axis"], size, progress, offset=first)

    est = work.load("pose")
    if est is None:
        est = estimate_pose(lm_crop, size, template=getattr(detector, "template", None), rig=RIG)
        blink, calib = blink_au45(lm_crop)
        est.update(blink=blink, open_ear=np.float64(calib["open_ear"]))
        work.save("pose", **est)

    feats = work.load("features")
    if feats is None:
        feats = dict(features=encoder.encode(fit_audio(wave, n, SAMPLES_PER_FRAME), n))
        work.save("features", **feats)

    lm5 = lm_crop[:, list(IBUG68_INDICES)].astype(np.float32)
    settings = dict(video=str(video), audio=None if audio is None else str(audio), size=size,
                    max_frames=max_frames, start=start_frame / FPS, detector=detector.name,
                    template="detector's" if getattr(detector, "template", None) is not None
                    else "generic", probe=info, frames_without_face=int((~det["found"]).sum()),
                    video_frames_kept=[int(first), int(last)], video_frames=int(video_frames),
                    blink_open_ear=float(est["open_ear"]), audio_levels=levels,
                    foreground_mask=(
                        "extra file: the person (head, hair, neck, shoulders) drawn from the landmarks, "
                        "a geometric prior, not a segmentation; packed as the masks" if segmenter is None else
                        f"extra file: the person, where the segmenter's probability > {THRESHOLD}, and the "
                        "face mask; packed as the masks"),
                    segmenter=seg_settings,
                    pose_rms_px_median=float(np.median(est["rms"])))
    with DatasetWriter(out, n, size, num_landmarks=len(LANDMARK_NAMES), overwrite=overwrite) as w:
        bar = _bar(n, "write", progress)
        foreground = np.zeros((n, size, (size + 7) // 8), dtype=np.uint8)
        for s in range(0, n, CHUNK):
            e = min(n, s + CHUNK)
            chunk, face = np.asarray(crops[s:e]), face_masks(lm_crop[s:e], size)
            w.write_frames(s, chunk, face_mask=face, mouth_mask=mouth_masks(lm_crop[s:e], size))
            fg = (foreground_masks(lm_crop[s:e], size) if segmenter is None
                  else (segmenter(chunk) > THRESHOLD) | face)  # the face always counts
            foreground[s:e] = pack_mask(fg)
            bar.update(e - s)
        bar.close()
        w.add_extra("foreground_mask", foreground)
        w.set_arrays(cameras=est["cameras"], pose=est["pose"], blink=est["blink"], landmarks=lm5)
        w.set_audio(fit_audio(wave, n, SAMPLES_PER_FRAME), feats["features"], encoder)
        w.add_extra("landmarks68", lm_crop.astype(np.float32))
        w.add_extra("face_found", det["found"])
        w.add_extra("pose_rms", est["rms"])
        contact_sheet(crops, lm_crop, lm5, w.tmp / "contact_sheet.png")
        path = w.commit(source=str(video), settings=json.loads(json.dumps(settings)),
                        landmark_names=LANDMARK_NAMES, ibug68_indices=IBUG68_INDICES)
    log(f"wrote {path}: {n} frames of {size}^2 ({n / FPS:.1f} s), {settings['frames_without_face']} "
        f"frames without a face (interpolated), median pose fit error "
        f"{settings['pose_rms_px_median']:.2f} px; check {path / 'contact_sheet.png'}")
    del crops
    return path
