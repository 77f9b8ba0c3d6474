"""A procedural talking head with exact ground truth, rendered by analytic ray casting.

The head is fixed in the world (EG3D's frame: +y up, face towards +z) and the camera moves, as in
an EG3D dataset. It is an ellipsoid (skin with a smooth 3-D texture, hair on the top and back) plus
an ellipsoidal nose, under a light fixed to the head. Painted on its surface: two eyes whose upper
lids close with the blink signal, and lips whose opening is a known function of the audio.

The audio is speech-like: syllables (harmonic tones with vowel-like formants under a smooth
amplitude envelope) separated by pauses. The mouth opening of frame ``n`` is the mean of the
amplitude envelope (in [0, 1]) over that frame's 40 ms: the exact audio -> mouth mapping that a
model should learn, saved as ``mouth_opening.npy``.

Head motion: a smooth random head rotation (yaw within +-15 deg, pitch +-8 deg, roll +-3 deg) about
the rig's pivot, turned into the equivalent camera: rendering the fixed head from camera
``T^-1 C0`` equals rendering the moved head ``T`` from the frontal camera ``C0``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..audio.features import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, LogMelEncoder
from ..render.cameras import (TALK3D_RIG, CameraRig, euler_to_rotation, generate_rays,
                              look_at_camera, make_camera_label, split_camera_label)

__all__ = [
    "HEAD", "HeadGeometry", "HeadState", "LANDMARK_NAMES", "BLINK_CLOSED", "render_frame",
    "render_frames", "landmarks_3d", "project_points", "head_cameras", "synthesize_audio",
    "synthesize_motion", "synthesize_blinks", "make_synthetic_dataset",
]

#: AU45 intensity at which the lids are fully closed (OpenFace's AU45_r is ~0 open, 2-3 closed).
BLINK_CLOSED = 2.0

#: Landmark-token subset, in this order; iBUG-68 indices 30, 36, 39, 42, 45.
LANDMARK_NAMES = ("nose_tip", "right_eye_outer", "right_eye_inner", "left_eye_inner",
                  "left_eye_outer")
IBUG68_INDICES = (30, 36, 39, 42, 45)

MAX_YAW = math.radians(15.0)
MAX_PITCH = math.radians(8.0)
MAX_ROLL = math.radians(3.0)

BACKGROUND = (0.92, 0.93, 0.96)
SKIN = (0.86, 0.64, 0.52)
HAIR = (0.18, 0.12, 0.08)
LIP = (0.72, 0.28, 0.30)
CAVITY = (0.22, 0.04, 0.05)
TEETH = (0.93, 0.92, 0.88)
SCLERA = (0.96, 0.96, 0.96)
IRIS = (0.28, 0.17, 0.10)
LID = (0.74, 0.53, 0.43)


@dataclass(frozen=True)
class HeadGeometry:
    """Sizes in world units (the EG3D box is [-0.5, 0.5]^3). The subject's right is world -x."""

    center: tuple = (0.0, 0.05, 0.0)
    radii: tuple = (0.22, 0.29, 0.24)
    nose_center: tuple = (0.0, 0.0, 0.215)
    nose_radii: tuple = (0.032, 0.06, 0.055)
    eye_x: float = 0.085  # eye centres at x = +-eye_x
    eye_y: float = 0.085
    eye_half: tuple = (0.04, 0.022)  # half width, half height of the eye opening
    iris_radius: float = 0.017
    mouth_y: float = -0.115
    mouth_half_width: float = 0.075
    lip_thickness: float = 0.013
    max_mouth_open: float = 0.04  # half height of the cavity at opening 1
    light: tuple = (0.35, 0.5, 1.0)  # towards the light, fixed to the head


HEAD = HeadGeometry()


@dataclass(frozen=True)
class HeadState:
    """Expression of one frame: mouth opening in [0, 1], blink on AU45's scale (0 open)."""

    mouth: float = 0.0
    blink: float = 0.0


def _ellipsoid_hit(origins, dirs, center, radii):
    """Nearest ray-ellipsoid intersection of rays sharing an origin per camera.

    origins [B, 3], dirs [B, R, 3] -> t [B, R] (inf where missed). Scaling by 1/radii turns the
    ellipsoid into the unit sphere; the quadratic's terms become matrix products, which are
    much faster than reductions over a length-3 axis.
    """
    c = torch.tensor(center, dtype=dirs.dtype)
    inv_r2 = torch.tensor(radii, dtype=dirs.dtype) ** -2
    o = origins - c  # [B, 3]
    a = (dirs * dirs) @ inv_r2  # [B, R]
    b = 2 * (dirs @ (o * inv_r2)[:, :, None])[..., 0]  # [B, R]
    cc = ((o * o) @ inv_r2 - 1)[:, None]  # [B, 1]
    disc = b * b - 4 * a * cc
    t = (-b - torch.sqrt(disc.clamp_min(0))) / (2 * a)
    return torch.where((disc > 0) & (t > 0), t, torch.full_like(t, math.inf))


def _paint(rgb, color, where):
    """Set rgb [M, 3] to ``color`` (r, g, b) where ``where`` [M] bool is set (in place)."""
    rgb[where] = torch.tensor(color, dtype=rgb.dtype)


def _shade_surface(p, on_nose, mouth, blink, geo: HeadGeometry):
    """Colour of surface points. p [H, 3] on the head or nose, on_nose [H] bool, mouth and
    blink [H] (each point's frame). Returns (rgb [H, 3] in [0, 1], mouth region [H] bool)."""
    c_head, r_head = torch.tensor(geo.center), torch.tensor(geo.radii)
    c_nose, r_nose = torch.tensor(geo.nose_center), torch.tensor(geo.nose_radii)
    normal = torch.where(on_nose[:, None], (p - c_nose) / r_nose**2, (p - c_head) / r_head**2)
    light = torch.tensor(geo.light) / torch.tensor(geo.light).norm()
    shade = 0.45 + 0.55 * ((normal @ light) / normal.norm(dim=-1)).clamp_min(0)  # [H]

    q = (p - c_head) / r_head  # head-normalised coordinates, on the unit sphere for head hits
    x, y = p[:, 0], p[:, 1]
    front = (q[:, 2] > 0.3) & ~on_nose
    # Low-frequency 3-D texture so that pose and view are observable everywhere on the skin.
    tex = 1 + 0.06 * torch.sin(9 * q[:, 0] + 2) * torch.cos(7 * q[:, 1]) \
        + 0.04 * torch.sin(13 * q[:, 2] + 5 * q[:, 1]) + 0.03 * torch.cos(21 * q[:, 0] - 11 * q[:, 1])
    rgb = torch.tensor(SKIN) * tex[:, None]
    hair = ~on_nose & ((q[:, 1] > 0.55 - 0.25 * q[:, 0].abs()) | ((q[:, 2] < -0.15) & (q[:, 1] > -0.4)))
    _paint(rgb, HAIR, hair)

    # Eyes: an ellipse each; the upper lid's edge moves down from the top as blink grows.
    near = front & ((y - geo.eye_y).abs() < geo.eye_half[1]) \
        & ((x.abs() - geo.eye_x).abs() < geo.eye_half[0])
    i = near.nonzero()[:, 0]  # the few points near an eye: shade only those
    ex = x[i] - torch.sign(x[i]) * geo.eye_x
    u, v = ex / geo.eye_half[0], (y[i] - geo.eye_y) / geo.eye_half[1]
    closure = (blink[i] / BLINK_CLOSED).clamp(0, 1)
    r2 = u * u + v * v
    eye = torch.tensor(SCLERA).repeat(i.numel(), 1)
    _paint(eye, IRIS, ex**2 + (y[i] - geo.eye_y) ** 2 < geo.iris_radius**2)
    lid = v > 1 - 2 * closure
    _paint(eye, LID, lid)
    _paint(eye, (0.1, 0.06, 0.05), (r2 > 0.8) | (lid & (v < 1.15 - 2 * closure)))
    inside = r2 < 1
    rgb[i[inside]] = eye[inside]

    # Mouth: a lens-shaped cavity of half height max_open * mouth, rimmed by lips.
    reach = geo.max_mouth_open + geo.lip_thickness + 0.003
    u = x / geo.mouth_half_width
    v = y - geo.mouth_y
    # Every point the lips can reach at any opening, with a margin: a fixed region of the face.
    region = front & ((u / 1.2) ** 2 + (v / (1.3 * reach)) ** 2 < 1)
    i = region.nonzero()[:, 0]
    u, v = u[i], v[i]
    profile = torch.sqrt((1 - u * u).clamp_min(0))
    h_in = geo.max_mouth_open * mouth[i] * profile
    h_out = h_in + geo.lip_thickness * profile + 0.003 * (u.abs() < 1)
    lips = v.abs() < h_out
    cavity = v.abs() < h_in
    lip_rgb = torch.tensor(LIP).repeat(i.numel(), 1)
    _paint(lip_rgb, CAVITY, cavity)
    _paint(lip_rgb, TEETH, cavity & (v > 0.45 * h_in))
    rgb[i[lips]] = lip_rgb[lips]
    return (rgb * shade[:, None]).clamp(0, 1), region


def _shade_rays(origins, dirs, mouth, blink, geo: HeadGeometry):
    """Colour and masks of rays. origins [B, 3] (one per camera), dirs [B, R, 3]; mouth, blink
    [B] (per frame).

    Returns (rgb [B R, 3] in [0, 1], head mask [B R] bool, mouth-region mask [B R] bool).
    """
    t_head = _ellipsoid_hit(origins, dirs, geo.center, geo.radii).reshape(-1)
    t_nose = _ellipsoid_hit(origins, dirs, geo.nose_center, geo.nose_radii).reshape(-1)
    t = torch.minimum(t_head, t_nose)
    hit = torch.isfinite(t)
    i = hit.nonzero()[:, 0]  # only rays that hit are shaded (about half of them)
    frame = i // dirs.shape[1]
    p = origins[frame] + dirs.reshape(-1, 3)[i] * t[i, None]
    color, region = _shade_surface(p, t_nose[i] < t_head[i], mouth[frame], blink[frame], geo)
    rgb = torch.tensor(BACKGROUND).repeat(hit.numel(), 1)
    rgb[i] = color
    mouth_region = torch.zeros_like(hit)
    mouth_region[i] = region
    return rgb, hit, mouth_region


def render_frames(mouth, blink, cameras, size: int, *, geometry: HeadGeometry = HEAD,
                  supersample: int = 1, chunk: int = 16):
    """Render frames of the synthetic head.

    Args:
        mouth: [B] mouth opening in [0, 1].
        blink: [B] AU45-scale blink (0 open, >= BLINK_CLOSED closed).
        cameras: [B, 25] EG3D labels (any cameras, not only the dataset's).
        size: image side S.
        supersample: render at size * supersample and box-filter down (anti-aliasing).
        chunk: frames per batch of rays (bounds memory).

    Returns:
        (images [B, S, S, 3] uint8, face_mask [B, S, S] bool (head foreground), mouth_mask
        [B, S, S] bool (the region the lips can reach)).
    """
    cameras = torch.as_tensor(cameras, dtype=torch.float32).reshape(-1, 25)
    mouth = torch.as_tensor(mouth, dtype=torch.float32).reshape(-1)
    blink = torch.as_tensor(blink, dtype=torch.float32).reshape(-1)
    batch, res = cameras.shape[0], size * supersample
    images, faces, mouths = [], [], []
    for s in range(0, batch, chunk):
        cams = cameras[s:s + chunk]
        origins, dirs = generate_rays(cams, res)  # [b, R, 3]
        b = cams.shape[0]
        rgb, hit, region = _shade_rays(origins[:, 0], dirs, mouth[s:s + b], blink[s:s + b],
                                       geometry)
        planes = torch.cat([rgb, hit[:, None].float(), region[:, None].float()], dim=1)
        planes = planes.reshape(b, res, res, 5).permute(0, 3, 1, 2)
        if supersample > 1:
            planes = torch.nn.functional.avg_pool2d(planes, supersample)
        planes = planes.permute(0, 2, 3, 1)
        images.append(torch.round(planes[..., :3] * 255).to(torch.uint8))
        faces.append(planes[..., 3] >= 0.5)
        mouths.append(planes[..., 4] >= 0.5)
    return torch.cat(images).numpy(), torch.cat(faces).numpy(), torch.cat(mouths).numpy()


def render_frame(state: HeadState, camera, size: int, **kwargs):
    """One frame: camera [25] -> (image [S, S, 3] uint8, face_mask [S, S], mouth_mask [S, S])."""
    img, face, mouth = render_frames([state.mouth], [state.blink],
                                     torch.as_tensor(camera).reshape(1, 25), size, **kwargs)
    return img[0], face[0], mouth[0]


def landmarks_3d(geometry: HeadGeometry = HEAD) -> np.ndarray:
    """World positions of LANDMARK_NAMES on the head's surface: [K=5, 3]."""
    g = geometry
    pts = [(g.nose_center[0], g.nose_center[1], g.nose_center[2] + g.nose_radii[2])]
    for x in (-(g.eye_x + g.eye_half[0]), -(g.eye_x - g.eye_half[0]),
              g.eye_x - g.eye_half[0], g.eye_x + g.eye_half[0]):
        qx, qy = (x - g.center[0]) / g.radii[0], (g.eye_y - g.center[1]) / g.radii[1]
        pts.append((x, g.eye_y, g.center[2] + g.radii[2] * math.sqrt(1 - qx * qx - qy * qy)))
    return np.array(pts, dtype=np.float64)


def project_points(points, cameras, size: int) -> np.ndarray:
    """Pinhole projection. points [K, 3] world, cameras [B, 25] -> [B, K, 2] pixel (x, y).

    Pixel coordinates are continuous: pixel (row, col) covers [col, col+1) x [row, row+1), so
    its centre is (col + 0.5, row + 0.5), matching ``generate_rays``.
    """
    cam2world, k = split_camera_label(torch.as_tensor(cameras, dtype=torch.float64).reshape(-1, 25))
    pts = torch.as_tensor(points, dtype=torch.float64)
    rot, pos = cam2world[:, :3, :3], cam2world[:, :3, 3]
    local = (pts[None] - pos[:, None]) @ rot  # [B, K, 3] = R^T (p - t)
    xy = local[..., :2] / local[..., 2:3]
    u = k[:, None, 0, 0] * xy[..., 0] + k[:, None, 0, 1] * xy[..., 1] + k[:, None, 0, 2]
    v = k[:, None, 1, 1] * xy[..., 1] + k[:, None, 1, 2]
    return (torch.stack([u, v], dim=-1) * size).numpy().astype(np.float32)


def head_cameras(pose, rig: CameraRig = TALK3D_RIG):
    """Cameras equivalent to rotating the head by ``pose`` about the rig's pivot.

    pose: [N, 3] head yaw, pitch, roll (radians; R = R_y(yaw) R_x(pitch) R_z(roll), positive yaw
    turns the face towards world +x). Returns [N, 25] float32 labels: cam2world = T^-1 C0 with
    C0 the rig's frontal camera and T(x) = R (x - pivot) + pivot.
    """
    pose = torch.as_tensor(pose, dtype=torch.float64).reshape(-1, 3)
    rot = euler_to_rotation(pose[:, 0], pose[:, 1], pose[:, 2])  # [N, 3, 3]
    frontal = look_at_camera(torch.zeros(1, dtype=torch.float64),
                             torch.zeros(1, dtype=torch.float64), rig=rig)
    c0, k0 = split_camera_label(frontal)
    pivot = torch.tensor(rig.pivot, dtype=torch.float64)
    inv = torch.zeros(pose.shape[0], 4, 4, dtype=torch.float64)
    inv[:, :3, :3] = rot.transpose(1, 2)
    inv[:, :3, 3] = pivot - (rot.transpose(1, 2) @ pivot)
    inv[:, 3, 3] = 1
    cams = make_camera_label(inv @ c0, k0.expand(pose.shape[0], 3, 3))
    return cams.float()


# --------------------------------------------------------------------------------------------
# Signals: audio, mouth, blinks, head motion
# --------------------------------------------------------------------------------------------


def synthesize_audio(num_frames: int, rng: np.random.Generator):
    """Speech-like audio for ``num_frames`` frames.

    Returns (wave [640 N] float32 in [-1, 1] at 16 kHz, envelope [640 N] in [0, 1],
    mouth_opening [N] = the envelope's mean over each frame).
    """
    total = num_frames * SAMPLES_PER_FRAME
    env = np.zeros(total)
    voiced = np.zeros(total)
    pos = int(rng.uniform(0.05, 0.3) * SAMPLE_RATE)
    while pos < total:
        length = int(rng.uniform(0.12, 0.3) * SAMPLE_RATE)
        end = min(total, pos + length)
        tau = np.arange(end - pos) / length  # [L] in [0, 1)
        env[pos:end] = rng.uniform(0.7, 1.0) * np.sin(np.pi * tau) ** 0.5
        # A vowel: harmonics of a gliding f0, weighted by two formant bumps.
        f0 = rng.uniform(110, 220) * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(2, 5) * tau))
        phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
        f1, f2 = rng.uniform(300, 800), rng.uniform(900, 2300)
        sig = np.zeros(end - pos)
        for h in range(1, 16):
            fh = h * f0
            w = (np.exp(-((fh - f1) / 150) ** 2) + 0.6 * np.exp(-((fh - f2) / 250) ** 2) + 0.3 / h)
            sig += w * np.sin(h * phase) * (fh < 7600)
        voiced[pos:end] = sig / np.abs(sig).max()
        # Pauses of varied length, some long enough for the mouth to close fully.
        pos = end + int(rng.choice([rng.uniform(0.03, 0.12), rng.uniform(0.25, 0.6)],
                                   p=[0.7, 0.3]) * SAMPLE_RATE)
    wave = 0.8 * env * voiced + 0.003 * rng.standard_normal(total)
    mouth = env.reshape(num_frames, SAMPLES_PER_FRAME).mean(axis=1)
    return wave.astype(np.float32), env.astype(np.float32), mouth.astype(np.float32)


def synthesize_blinks(num_frames: int, rng: np.random.Generator) -> np.ndarray:
    """AU45-scale blink track [N]: baseline ~0.1, a ~0.3-s blink peaking at ~2.5 every 2-5 s."""
    t = np.arange(num_frames) / FPS
    blink = np.full(num_frames, 0.1)
    start = rng.uniform(0.5, 2.0)
    while start < t[-1] + 1:
        dur = rng.uniform(0.2, 0.35)
        tau = (t - start) / dur
        blink += np.where((tau > 0) & (tau < 1), rng.uniform(2.2, 2.8) * np.sin(np.pi * tau) ** 2, 0)
        start += rng.uniform(2.0, 5.0)
    return blink.astype(np.float32)


def synthesize_motion(num_frames: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth head rotation [N, 3] (yaw, pitch, roll radians) within the MAX_* limits."""
    t = np.arange(num_frames) / FPS
    out = []
    for limit in (MAX_YAW, MAX_PITCH, MAX_ROLL):
        amps = rng.uniform(0.3, 1.0, 3)
        freqs = rng.uniform(0.05, 0.35, 3)
        phases = rng.uniform(0, 2 * np.pi, 3)
        s = (amps[:, None] * np.sin(2 * np.pi * freqs[:, None] * t + phases[:, None])).sum(0)
        out.append(limit * s / amps.sum())  # |s| <= sum(amps), so within +-limit
    return np.stack(out, axis=1).astype(np.float32)


def make_synthetic_dataset(out_dir, seconds: float = 10.0, size: int = 128, seed: int = 0, *,
                           feature_dim: int = 32, supersample: int = 1, overwrite: bool = False,
                           rig: CameraRig = TALK3D_RIG, geometry: HeadGeometry = HEAD):
    """Write a synthetic talking-head clip in the dataset format (see ``talk3d.data.format``).

    Deterministic per ``seed``. Besides the standard arrays it stores ``mouth_opening.npy`` [N]
    (the exact audio -> mouth ground truth). Returns the output path.
    """
    from .format import DatasetWriter

    num_frames = int(round(seconds * FPS))
    if num_frames < 2:
        raise ValueError(f"make_synthetic_dataset: need at least 2 frames, got {seconds} s")
    rng = np.random.default_rng(seed)
    wave, _, mouth = synthesize_audio(num_frames, rng)
    blink = synthesize_blinks(num_frames, rng)
    pose = synthesize_motion(num_frames, rng)
    cameras = head_cameras(pose, rig).numpy()
    encoder = LogMelEncoder(feature_dim)
    features = encoder.encode(wave, num_frames)
    landmarks = project_points(landmarks_3d(geometry), cameras, size)
    settings = dict(seconds=seconds, seed=seed, supersample=supersample, rig=dict(
        radius=rig.radius, pivot=list(rig.pivot), focal=rig.focal),
        max_yaw_deg=math.degrees(MAX_YAW), max_pitch_deg=math.degrees(MAX_PITCH),
        max_roll_deg=math.degrees(MAX_ROLL), blink_closed=BLINK_CLOSED,
        mouth_opening="mean of the syllable amplitude envelope over each frame's 40 ms")
    with DatasetWriter(out_dir, num_frames, size, num_landmarks=len(LANDMARK_NAMES),
                       overwrite=overwrite) as w:
        chunk = 32
        for s in range(0, num_frames, chunk):
            img, face, mmask = render_frames(mouth[s:s + chunk], blink[s:s + chunk],
                                             cameras[s:s + chunk], size, supersample=supersample,
                                             geometry=geometry)
            w.write_frames(s, img, face_mask=face, mouth_mask=mmask)
        w.set_arrays(cameras=cameras, pose=pose, blink=blink, landmarks=landmarks)
        w.set_audio(wave, features, encoder)
        w.add_extra("mouth_opening", mouth)
        w.commit(source="synthetic", settings=settings, landmark_names=LANDMARK_NAMES,
                 ibug68_indices=IBUG68_INDICES)
    return w.path
