"""The synthetic talking head, the dataset folder format and TalkingHeadDataset."""
from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from talk3d.audio import FEATURES_PER_FRAME, SAMPLES_PER_FRAME, read_wav
from talk3d.data import (DatasetError, DatasetWriter, HeadState, TalkingHeadDataset,
                         make_synthetic_dataset, render_frame, unpack_mask, validate_dataset)
from talk3d.data.format import FILES, MANIFEST
from talk3d.data.synthetic import (HEAD, LANDMARK_NAMES, MAX_PITCH, MAX_YAW, head_cameras, landmarks_3d,
                                   project_points)
from talk3d.render.cameras import TALK3D_RIG, look_at_camera

SECONDS, SIZE = 2.2, 64  # 55 frames: 50 train, 5 val
N = 55
# Masks of a novel view: the same head seen 0.3 rad to the side keeps its silhouette area within
# this fraction (an ellipsoid's outline changes little) ...
AREA_TOL = 0.1
# ... and its centroid stays within this many pixels (of 128) of the projected head centre (an
# ellipsoid's outline is centred on it up to perspective, ~0.2 px here; the nose adds ~0.3 px).
CENTROID_TOL_PX = 1.5
# Pixels outside the mouth region may change by nothing at all when only the mouth opens.
EXACT = 0
# Mouth opening (the envelope's frame mean) against the audio's frame RMS: proportional but for each
# vowel's crest factor (scaled to its peak, not its RMS), the envelope's change within a frame and the
# 0.003 noise floor. Measured 0.993 (CPU VM).
MOUTH_RMS_MIN_CORR = 0.9
# Landmark pixels to [-1, 1] in float32: x / S * 2 - 1 rounds differently in another order by an ulp
# or two of 1 (1.2e-7 each). Measured 0 (CPU VM, every frame).
LANDMARK_NORM_ATOL = 1e-6
# An 8-bit level as float32 v / 127.5 - 1 against 2 v / 255 - 1 in float64: float32 rounding of values
# up to 1 (6e-8); a loader dividing by 128 would be 0.008 off at 255.
IMAGE_LEVEL_ATOL = 1e-6


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "clip", SECONDS, SIZE, seed=1)


def frontal(size=128):
    return head_cameras(np.zeros((1, 3)))[0], size


def copy_clip(clip, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(clip, dst)
    return dst


# --------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------


def test_generator_is_deterministic_per_seed(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", 0.4, 32, seed=3)
    b = make_synthetic_dataset(tmp_path / "b", 0.4, 32, seed=3)
    c = make_synthetic_dataset(tmp_path / "c", 0.4, 32, seed=4)
    for name in list(FILES.values()) + ["mouth_opening.npy"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "audio.wav").read_bytes() != (c / "audio.wav").read_bytes()
    assert not np.array_equal(np.load(a / "cameras.npy"), np.load(c / "cameras.npy"))


def test_clip_is_valid_and_complete(clip):
    m = validate_dataset(clip)
    assert m["num_frames"] == N and m["image_size"] == SIZE and m["fps"] == 25
    assert m["split"] == {"train": [0, 50], "val": [50, 55]}
    assert m["source"] == "synthetic" and m["camera"]["convention"] == "eg3d"
    assert m["audio"]["encoder"] == "logmel32" and m["audio"]["features_per_frame"] == 2
    assert m["landmarks"]["names"] == list(LANDMARK_NAMES)
    assert np.load(clip / "frames.npy", mmap_mode="r").shape == (N, SIZE, SIZE, 3)
    assert np.load(clip / "audio_features.npy").shape == (2 * N, 32)
    wave, _ = read_wav(clip / "audio.wav")
    assert wave.size == N * SAMPLES_PER_FRAME
    pose = np.load(clip / "pose.npy")
    assert np.abs(pose[:, 0]).max() <= MAX_YAW and np.abs(pose[:, 1]).max() <= MAX_PITCH
    # Nothing is left behind next to the dataset (temporary folders renamed or removed).
    assert sorted(p.name for p in clip.parent.iterdir()) == ["clip"]


def test_mouth_follows_audio_loudness(clip):
    mouth = np.load(clip / "mouth_opening.npy")
    wave, _ = read_wav(clip / "audio.wav")
    rms = np.sqrt((wave.reshape(N, SAMPLES_PER_FRAME) ** 2).mean(1))
    assert mouth.min() == 0 and mouth.max() > 0.6  # both pauses and open syllables occur
    assert np.corrcoef(mouth, rms)[0, 1] > MOUTH_RMS_MIN_CORR
    feats = np.load(clip / "audio_features.npy").reshape(N, FEATURES_PER_FRAME, -1).mean((1, 2))
    assert feats[mouth > 0.4].mean() > feats[mouth == 0].mean() + 2


def test_mouth_opening_changes_only_mouth_pixels():
    cam, size = frontal()
    closed, face, region = render_frame(HeadState(mouth=0.0), cam, size)
    opened, face2, region2 = render_frame(HeadState(mouth=1.0), cam, size)
    diff = np.abs(closed.astype(int) - opened.astype(int)).sum(-1) > 0
    assert np.array_equal(face, face2) and np.array_equal(region, region2)
    assert diff[region].sum() > 30  # the cavity opens over many pixels
    assert diff[~region].sum() == EXACT


def test_blink_changes_only_eye_pixels():
    cam, size = frontal()
    open_, _, _ = render_frame(HeadState(blink=0.0), cam, size)
    shut, _, _ = render_frame(HeadState(blink=2.5), cam, size)
    diff = np.abs(open_.astype(int) - shut.astype(int)).sum(-1) > 0
    rows, cols = np.nonzero(diff)
    assert rows.size > 20
    # Every changed pixel lies within the eyes' boxes, spanned by the projected eye corners.
    corners = project_points(landmarks_3d(), cam[None], size)[0, 1:]  # [4, 2] (x, y)
    margin = 4
    inside = ((cols >= corners[:, 0].min() - margin) & (cols <= corners[:, 0].max() + margin)
              & (np.abs(rows - corners[:, 1].mean()) < 8 + margin))
    assert inside.all()
    assert ((cols < size / 2).sum() > 5) and ((cols > size / 2).sum() > 5)  # both eyes


def test_novel_view_shows_the_same_head():
    cam, size = frontal()
    views = [cam, look_at_camera(0.3, 0.0, rig=TALK3D_RIG)[0],
             look_at_camera(-0.1, 0.25, rig=TALK3D_RIG)[0]]
    images, areas = [], []
    for view in views:
        img, face, _ = render_frame(HeadState(), view, size)
        images.append(img.astype(int))
        areas.append(face.sum())
        centre = project_points(np.array([HEAD.center]), view[None], size)[0, 0]  # (x, y)
        centroid = np.argwhere(face).mean(0)[::-1] + 0.5  # pixel centres, as (x, y)
        assert np.linalg.norm(centroid - centre) < CENTROID_TOL_PX
    assert max(areas) / min(areas) - 1 < AREA_TOL
    assert np.abs(images[0] - images[1]).mean() > 2  # but the view does change the picture
    # Positive head yaw turns the face towards world +x = image +x: the nose tip moves right of
    # the head's centre (by ~0.27 sin(0.3) world units, ~14 px).
    turned = head_cameras(np.array([[0.3, 0.0, 0.0]]))
    points = np.stack([landmarks_3d()[0], np.array(HEAD.center)])
    nose, centre = project_points(points, np.stack([cam, turned[0]]), size).transpose(1, 0, 2)
    offset = nose[:, 0] - centre[:, 0]
    assert abs(offset[0]) < 0.5 and offset[1] > 10


def test_landmarks_fall_inside_the_face_mask(clip):
    lm = np.load(clip / "landmarks.npy")  # [N, K, 2]
    face = unpack_mask(np.load(clip / "face_mask.npy"), SIZE)  # [N, S, S]
    cols, rows = np.floor(lm[..., 0]).astype(int), np.floor(lm[..., 1]).astype(int)
    assert face[np.arange(N)[:, None], rows, cols].all()
    # Order: subject's right eye (image left) before the left eye.
    assert (np.diff(lm[:, 1:, 0], axis=1) > 0).all()


# --------------------------------------------------------------------------------------------
# Validation and writing
# --------------------------------------------------------------------------------------------


def test_validate_catches_truncated_array(clip, tmp_path):
    d = copy_clip(clip, tmp_path)
    np.save(d / "pose.npy", np.load(d / "pose.npy")[:-1])
    with pytest.raises(ValueError, match=r"pose\.npy.*shape \(54, 3\)"):
        validate_dataset(d)


def test_validate_catches_cut_file(clip, tmp_path):
    d = copy_clip(clip, tmp_path)
    data = (d / "frames.npy").read_bytes()
    (d / "frames.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"frames\.npy"):
        validate_dataset(d)


def test_validate_catches_nan_camera(clip, tmp_path):
    d = copy_clip(clip, tmp_path)
    cams = np.load(d / "cameras.npy")
    cams[7, 3] = np.nan
    np.save(d / "cameras.npy", cams)
    with pytest.raises(ValueError, match=r"cameras\.npy.*NaN.*\[7, 3\]"):
        validate_dataset(d)


def test_validate_checks_extra_files(clip, tmp_path):
    d = copy_clip(clip, tmp_path)
    extra = json.loads((d / MANIFEST).read_text())["extra_files"]
    name, rel = next(iter(extra.items()))
    arr = np.load(d / rel)
    np.save(d / rel, arr[:-1])  # one row short of the clip
    with pytest.raises(ValueError, match=rf"{rel}.*expected \(55, \.\.\.\)"):
        validate_dataset(d)
    np.save(d / rel, np.stack([arr, arr], axis=1))  # extra trailing dimensions are fine
    validate_dataset(d)
    (d / rel).unlink()
    with pytest.raises(ValueError, match=rf"{rel}: missing file \(the manifest lists it as 'extra {name}'\)"):
        validate_dataset(d)


def test_validate_catches_missing_files(clip, tmp_path):
    d = copy_clip(clip, tmp_path)
    (d / "blink.npy").unlink()
    with pytest.raises(ValueError, match=r"blink\.npy: missing file"):
        validate_dataset(d)
    (d / MANIFEST).unlink()
    with pytest.raises(ValueError, match="not a talk3d dataset folder"):
        validate_dataset(d)


def test_validate_catches_bad_manifest_and_audio(clip, tmp_path):
    d = copy_clip(clip, tmp_path)
    m = json.loads((d / MANIFEST).read_text())
    m["audio"]["feature_dim"] = 44
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"audio_features\.npy.*expected \(110, 44\)"):
        validate_dataset(d)
    d2 = copy_clip(clip, tmp_path / "x")
    wave, _ = read_wav(d2 / "audio.wav")
    from talk3d.audio import write_wav

    write_wav(d2 / "audio.wav", wave[: 40 * SAMPLES_PER_FRAME])
    with pytest.raises(ValueError, match=r"audio\.wav.*samples"):
        validate_dataset(d2)


def test_overwrite_is_refused_unless_asked(clip, tmp_path):
    d = copy_clip(clip, tmp_path)
    with pytest.raises(FileExistsError, match="overwrite"):
        make_synthetic_dataset(d, 0.4, 32)
    assert validate_dataset(d)["num_frames"] == N  # untouched
    make_synthetic_dataset(d, 0.4, 32, overwrite=True)
    assert validate_dataset(d)["num_frames"] == 10
    other = tmp_path / "not_a_dataset"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a talk3d dataset"):
        make_synthetic_dataset(other, 0.4, 32, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"


def test_a_crash_leaves_no_folder(tmp_path):
    with pytest.raises(RuntimeError):
        with DatasetWriter(tmp_path / "out", 4, 8) as w:
            w.write_frames(0, np.zeros((4, 8, 8, 3), np.uint8), face_mask=np.zeros((4, 8, 8)),
                           mouth_mask=np.zeros((4, 8, 8)))
            raise RuntimeError("preprocessing died")
    assert list(tmp_path.iterdir()) == []


def test_commit_refuses_incomplete_writes(tmp_path):
    with DatasetWriter(tmp_path / "out", 4, 8) as w:
        with pytest.raises(ValueError, match="nothing written"):
            w.commit(source="x", settings={}, landmark_names=LANDMARK_NAMES)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# TalkingHeadDataset
# --------------------------------------------------------------------------------------------


def test_dataset_splits(clip):
    train, val = TalkingHeadDataset(clip, "train"), TalkingHeadDataset(clip, "val")
    assert len(train) == 50 and len(val) == 5 and len(TalkingHeadDataset(clip, "all")) == N
    assert val[0]["index"] == 50 and train[-1]["index"] == 49
    with pytest.raises(IndexError):
        val[5]
    with pytest.raises(ValueError, match="split"):
        TalkingHeadDataset(clip, "test")


def test_dataset_item_shapes_and_ranges(clip):
    ds = TalkingHeadDataset(clip, "all", audio_window=8)
    item = ds[20]
    expected = dict(image=(3, SIZE, SIZE), camera=(25,), pose=(3,), blink=(1,), landmarks=(5, 2),
                    audio=(8, 16, 32), mouth_mask=(1, SIZE, SIZE), face_mask=(1, SIZE, SIZE))
    for key, shape in expected.items():
        assert tuple(item[key].shape) == shape, key
        assert item[key].dtype == torch.float32, key
    assert item["index"] == 20
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    assert item["image"].min() < -0.5 and item["image"].max() > 0.5
    assert item["landmarks"].abs().max() < 1
    for key in ("mouth_mask", "face_mask"):
        assert set(item[key].unique().tolist()) == {0.0, 1.0}
    np.testing.assert_array_equal(item["camera"].numpy(), np.load(clip / "cameras.npy")[20])
    feats = np.load(clip / "audio_features.npy")
    np.testing.assert_array_equal(item["audio"][4].numpy(), feats[33:49])  # 16 rows centred on the frame (40, 41)
    own = TalkingHeadDataset(clip, "all", audio_window=8, audio_steps=2)[20]["audio"]
    np.testing.assert_array_equal(own[4].numpy(), feats[40:42])  # the frame's own rows
    # Pixel coordinates map to [-1, 1] as x / S * 2 - 1.
    lm = np.load(clip / "landmarks.npy")[20]
    np.testing.assert_allclose(item["landmarks"].numpy(), lm / SIZE * 2 - 1, atol=LANDMARK_NORM_ATOL)


def test_dataset_resizes_on_the_fly(clip):
    item = TalkingHeadDataset(clip, "val", image_size=32)[0]
    assert item["image"].shape == (3, 32, 32) and item["face_mask"].shape == (1, 32, 32)
    assert 0 <= item["face_mask"].min() and item["face_mask"].max() <= 1
    full = TalkingHeadDataset(clip, "val")[0]
    small = torch.nn.functional.avg_pool2d(full["face_mask"][None], 2)[0]
    torch.testing.assert_close(item["face_mask"], small)
    torch.testing.assert_close(item["landmarks"], full["landmarks"])


def test_dataset_errors_and_pickling(clip, tmp_path):
    with pytest.raises(DatasetError, match="not a talk3d dataset folder"):
        TalkingHeadDataset(tmp_path)
    with pytest.raises(DatasetError, match="logmel32.*wav2vec2"):
        TalkingHeadDataset(clip, expected_audio_encoder="wav2vec2-logits-base")
    ds = TalkingHeadDataset(clip, expected_audio_encoder="logmel32")
    first = ds[0]
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers receive no memory maps
    assert clone._arrays is None
    torch.testing.assert_close(clone[0]["image"], first["image"])


def test_audio_rows_are_the_splits_own(clip):
    """audio_rows() holds the split's own feature rows (2 a frame), not the whole clip's: the trainer
    standardises the audio with the training split's rows, and the clip's would leak the validation
    frames' audio into that statistic."""
    feats = np.load(clip / "audio_features.npy")  # [2N, D]
    for split, (lo, hi) in (("train", (0, 50)), ("val", (50, 55)), ("all", (0, N))):
        rows = TalkingHeadDataset(clip, split).audio_rows()
        assert rows.dtype == np.float32 and rows.shape == (FEATURES_PER_FRAME * (hi - lo), feats.shape[1]), split
        np.testing.assert_array_equal(rows, feats[FEATURES_PER_FRAME * lo:FEATURES_PER_FRAME * hi], err_msg=split)


def test_dataset_rig_is_the_one_the_clip_was_made_with(tmp_path):
    """A clip made with a rig other than TALK3D_RIG reads that rig back from its manifest (which
    inference and evaluation use to place novel-view cameras), not the default: its cameras are that
    rig's, so a default rig would turn the head about the wrong pivot at the wrong distance."""
    from talk3d.data import load_manifest
    from talk3d.data.format import dataset_rig
    from talk3d.infer.render import load_training_clip
    from talk3d.render.cameras import CameraRig

    rig = CameraRig(3.1, (0.02, 0.08, 0.15), 4.2)
    assert rig != TALK3D_RIG
    d = make_synthetic_dataset(tmp_path / "clip", 0.4, 32, seed=2, rig=rig)
    assert dataset_rig(load_manifest(d)) == rig
    assert load_training_clip({"data": str(d)}).rig == rig
    # The clip's cameras are the rig's own: its pose 0 is head_cameras(pose 0, rig) exactly.
    pose = np.load(d / "pose.npy")
    np.testing.assert_array_equal(np.load(d / "cameras.npy")[:1], head_cameras(pose[:1], rig).numpy())


# --------------------------------------------------------------------------------------------
# Mutation audit: splits and on-the-fly resizing against hand computations
# --------------------------------------------------------------------------------------------

# Resized pixels against the float64 filter written out: float32 interpolation of values in
# [-1, 1] (measured 8e-7 at 64 -> 24 on random images).
RESIZE_ATOL = 1e-5


def test_split_ranges_by_hand():
    """The last floor(N / 11) frames (at least one) validate: by hand at the edges of the rule."""
    from talk3d.data.format import split_ranges

    for n, n_val in ((2, 1), (11, 1), (21, 1), (22, 2), (55, 5), (56, 5), (65, 5), (66, 6)):
        assert split_ranges(n) == dict(train=[0, n - n_val], val=[n - n_val, n]), n


def _triangle_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """Antialiased bilinear downscaling as a matrix: output i averages the inputs under a triangle of
    half-width n_in / n_out centred on its own centre (PIL's and torch's antialias), normalised."""
    k = n_in / n_out
    a = torch.tensor([[max(0.0, 1 - abs(j + 0.5 - (i + 0.5) * k) / k) for j in range(n_in)]
                      for i in range(n_out)], dtype=torch.float64)
    return a / a.sum(1, keepdim=True)


@pytest.mark.parametrize("size", [16, 24])
def test_dataset_shrinks_images_antialiased_and_masks_by_area(clip, size):
    """Shrinking: the image through an antialiased (triangle) filter, not a 2-tap bilinear that
    aliases; the masks by area averaging (at 4x, the mean of each 4 x 4 block), not bilinear."""
    full = TalkingHeadDataset(clip, "val")[0]
    item = TalkingHeadDataset(clip, "val", image_size=size)[0]
    a = _triangle_matrix(SIZE, size)
    expected = a @ full["image"].double() @ a.T
    torch.testing.assert_close(item["image"].double(), expected, atol=RESIZE_ATOL, rtol=0)
    if SIZE % size == 0:
        blocks = torch.nn.functional.avg_pool2d(full["face_mask"][None], SIZE // size)[0]
        torch.testing.assert_close(item["face_mask"], blocks)


def test_validate_catches_nan_blink(clip, tmp_path):
    """Every per-frame float array is checked for NaN/inf, blink too (a NaN blink would reach the
    model's AU input and poison the loss)."""
    d = copy_clip(clip, tmp_path)
    blink = np.load(d / "blink.npy")
    blink[3] = np.inf
    np.save(d / "blink.npy", blink)
    with pytest.raises(ValueError, match=r"blink\.npy.*NaN or inf.*\[3\]"):
        validate_dataset(d)


def test_validate_accepts_audio_exactly_one_frame_off(clip, tmp_path):
    """audio.wav may be up to one frame (640 samples) longer or shorter than 640 N, inclusive
    (AUDIO_LENGTH_TOL_FRAMES); one sample more is refused."""
    from talk3d.audio import write_wav

    d = copy_clip(clip, tmp_path)
    wave, _ = read_wav(d / "audio.wav")
    assert wave.shape[0] == N * SAMPLES_PER_FRAME
    for frames in (N - 1, N + 1):
        write_wav(d / "audio.wav", np.resize(wave, frames * SAMPLES_PER_FRAME))
        validate_dataset(d)
    write_wav(d / "audio.wav", np.resize(wave, (N + 1) * SAMPLES_PER_FRAME + 1))
    with pytest.raises(ValueError, match=r"audio\.wav.*samples"):
        validate_dataset(d)


def test_dataset_images_map_8_bit_levels_onto_minus_one_to_one(clip):
    """A stored 8-bit level v is served as 2 v / 255 - 1: 0 is -1, 255 is +1 (the model's and the
    metrics' data range 2), written here independently of the loader's v / 127.5 - 1."""
    frames = np.load(clip / "frames.npy", mmap_mode="r")
    image = TalkingHeadDataset(clip, "all")[20]["image"].numpy()  # [3, S, S]
    want = 2 * np.asarray(frames[20], np.float64).transpose(2, 0, 1) / 255 - 1
    np.testing.assert_allclose(image, want, rtol=0, atol=IMAGE_LEVEL_ATOL)
