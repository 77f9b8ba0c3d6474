"""Cameras and rays for the EG3D triplane renderer.

Conventions (EG3D's, so that its checkpoints and dataset labels work unchanged):

- World: right-handed, +y up. The face sits near the origin looking towards +z, inside the cube
  [-box_warp/2, box_warp/2]^3.
- Camera axes (OpenCV): +x right, +y down, +z forward (the viewing direction).
- Camera label: 25 numbers per camera = the 4x4 cam2world matrix row-major (16), then the 3x3
  intrinsics normalised by image size (9): fx, fy, cx, cy are fractions of the image side, so
  the same label serves every resolution.
- Pixel (row, col) of a ``res`` x ``res`` image has its centre at normalised image coordinates
  ``u = (col + 0.5) / res``, ``v = (row + 0.5) / res``; ray index ``row * res + col``.

Everything here runs in float32 or float64 (the dtype of the inputs) on any device. Half
precision is refused: with cameras 2.7 units away, bfloat16's 8-bit mantissa would misplace the
camera by ~0.01, a tenth of a triplane texel at 256^2.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "LABEL_SIZE",
    "ROTATION_TOL",
    "ROW_TOL",
    "AIM_TOL",
    "CameraRig",
    "FFHQ_RIG",
    "TALK3D_RIG",
    "FFHQ_DEPTH_RANGE",
    "check_cameras",
    "make_camera_label",
    "split_camera_label",
    "normalized_intrinsics",
    "look_at_camera",
    "camera_to_yaw_pitch",
    "euler_to_rotation",
    "rotation_to_euler",
    "generate_rays",
    "ray_box_limits",
]

#: Numbers per camera label: 16 (cam2world, row-major) + 9 (normalised intrinsics).
LABEL_SIZE = 25

#: Largest accepted entry of |R^T R - I| for the rotation block of a camera. Labels stored as
#: float32 are orthonormal to ~1e-7; 1e-3 still admits labels rounded to 4 decimals, while a
#: rotation scaled by 1 % (|R^T R - I| ~ 0.02) is refused.
ROTATION_TOL = 1e-3

#: Largest accepted deviation of the fixed rows, (0, 0, 0, 1) of cam2world and (0, 0, 1) of the
#: intrinsics, and of the intrinsics' structural zero K[1, 0]. They are exact in any real label.
ROW_TOL = 1e-6

#: How far (world units) the optical axis may pass from the rig's pivot in
#: :func:`camera_to_yaw_pitch`. The head box is 1 unit wide; float32 rounding gives ~3e-7.
AIM_TOL = 1e-4

#: FFHQ's fixed depth range (ray_start, ray_end) along each (unit) ray, in world units.
FFHQ_DEPTH_RANGE = (2.25, 3.3)

_FLOAT_DTYPES = (torch.float32, torch.float64)
_WORLD_UP = (0.0, 1.0, 0.0)


# --------------------------------------------------------------------------------------------
# Input checks shared by the public functions
# --------------------------------------------------------------------------------------------


def _check_float_tensor(caller: str, name: str, t) -> None:
    """TypeError unless ``t`` is a float32/float64 tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{caller}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{caller}: {name} must be float32 or float64, got {t.dtype} "
            "(integer and half-precision cameras are not supported)"
        )


def _check_shape(caller: str, name: str, t: Tensor, tail: tuple[int, ...], shape: str) -> None:
    """ValueError unless ``t`` is ``[B, *tail]``."""
    if t.dim() != 1 + len(tail) or tuple(t.shape[1:]) != tail:
        raise ValueError(f"{caller}: {name} must have shape {shape}, got {tuple(t.shape)}")


def _raise_first(caller: str, what: str, bad: Tensor, describe: Callable[[int], str]) -> None:
    """Raise a ValueError naming the first item flagged in ``bad`` and how many are flagged.

    bad: [B] bool. ``describe(i)`` says what is wrong with item ``i``.
    """
    if not bool(bad.any()):
        return
    index = int(bad.nonzero()[0, 0])
    count = int(bad.sum())
    also = f" ({count} of {bad.numel()} {what}s fail this check)" if count > 1 else ""
    raise ValueError(f"{caller}: {what} {index} {describe(index)}{also}")


class _Checks:
    """Per-item checks whose results are read back from the device together: one wait for a GPU
    per validation, not one per check (a render validates its cameras every frame).

    ``add`` takes what :func:`_raise_first` takes, each ``bad`` ``[B]`` bool of one batch;
    ``raise_first`` raises for the first check (in the order added) that flags an item.
    """

    def __init__(self, caller: str):
        self.caller = caller
        self.items: list[tuple[str, Tensor, Callable[[int], str]]] = []

    def add(self, what: str, bad: Tensor, describe: Callable[[int], str]) -> None:
        self.items.append((what, bad, describe))

    def raise_first(self) -> None:
        if not self.items:
            return
        flagged = torch.stack([bad for _, bad, _ in self.items]).any(dim=1).tolist()  # the one wait
        for (what, bad, describe), failed in zip(self.items, flagged):
            if failed:
                _raise_first(self.caller, what, bad, describe)


def _rotation_errors(rotation: Tensor) -> tuple[Tensor, Tensor]:
    """Per-matrix orthonormality error and determinant.

    rotation: [B, 3, 3]. Returns (max |R^T R - I| [B], det R [B]).
    """
    eye = torch.eye(3, dtype=rotation.dtype, device=rotation.device)
    gram = rotation.transpose(-1, -2) @ rotation
    ortho_err = (gram - eye).abs().amax(dim=(-2, -1))
    # det = c0 . (c1 x c2) on the columns: cheap, and exact enough once R is near-orthonormal.
    cols = rotation.unbind(dim=-1)
    det = (cols[0] * torch.linalg.cross(cols[1], cols[2], dim=-1)).sum(dim=-1)
    return ortho_err, det


def _check_rotations(checks: _Checks, what: str, rotation: Tensor, tol: float) -> None:
    """Add the checks that flag rotation blocks that are scaled, sheared or a reflection.

    rotation: [B, 3, 3].
    """
    ortho_err, det = _rotation_errors(rotation)
    checks.add(
        what, ortho_err > tol,
        lambda i: (
            f"has a rotation block that is not orthonormal: max |R^T R - I| = "
            f"{float(ortho_err[i]):.3g} > ROTATION_TOL = {tol:g} (scaled or sheared rotation)"
        ),
    )
    # Once R^T R ~ I, det is ~+1 or ~-1; the sign is what distinguishes a reflection.
    checks.add(
        what, det <= 0,
        lambda i: (
            f"has a rotation block with det = {float(det[i]):.4g}, it must be +1 "
            "(a reflection: the camera axes are left-handed)"
        ),
    )


def _fmt_row(row: Tensor) -> str:
    return "(" + ", ".join(f"{float(x):.4g}" for x in row) + ")"


def _check_cameras(caller: str, cameras, rotation_tol: float = ROTATION_TOL) -> None:
    """Every check of :func:`check_cameras`, with errors prefixed by ``caller``; the device is
    waited on once (:class:`_Checks`)."""
    _check_float_tensor(caller, "cameras", cameras)
    _check_shape(caller, "cameras", cameras, (LABEL_SIZE,), f"[B, {LABEL_SIZE}]")
    # In the cameras' own precision: under a caller's bf16 autocast, R^T R would be off by 4e-3.
    with torch.autocast(cameras.device.type, enabled=False):
        _camera_checks(caller, cameras, rotation_tol).raise_first()


def _camera_checks(caller: str, cameras: Tensor, rotation_tol: float) -> _Checks:
    """Every camera check, computed and not yet read back."""
    checks = _Checks(caller)
    finite = torch.isfinite(cameras)
    checks.add(
        "camera", ~finite.all(dim=-1),
        lambda i: f"contains NaN or inf at label entries "
        f"{finite[i].logical_not().nonzero().flatten().tolist()}",
    )
    cam2world, intrinsics = _split(cameras)
    _check_cam2world(checks, cam2world, rotation_tol)
    _check_intrinsics(checks, intrinsics)
    return checks


def _check_cam2world(checks: _Checks, cam2world: Tensor, rotation_tol: float) -> None:
    """cam2world: [B, 4, 4]. Last row (0, 0, 0, 1), rotation block a proper rotation."""
    last = cam2world[:, 3, :]
    expected = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=last.dtype, device=last.device)
    checks.add(
        "camera", (last - expected).abs().amax(dim=-1) > ROW_TOL,
        lambda i: f"has cam2world last row {_fmt_row(last[i])}, it must be (0, 0, 0, 1)",
    )
    _check_rotations(checks, "camera", cam2world[:, :3, :3], rotation_tol)


def _check_intrinsics(checks: _Checks, intrinsics: Tensor) -> None:
    """intrinsics: [B, 3, 3]. Upper triangular, last row (0, 0, 1), fx > 0, fy > 0."""
    last = intrinsics[:, 2, :]
    expected = torch.tensor([0.0, 0.0, 1.0], dtype=last.dtype, device=last.device)
    checks.add(
        "camera", (last - expected).abs().amax(dim=-1) > ROW_TOL,
        lambda i: f"has intrinsics last row {_fmt_row(last[i])}, it must be (0, 0, 1)",
    )
    # The unprojection in generate_rays assumes K = [[fx, skew, cx], [0, fy, cy], [0, 0, 1]].
    k10 = intrinsics[:, 1, 0]
    checks.add(
        "camera", k10.abs() > ROW_TOL,
        lambda i: f"has intrinsics K[1, 0] = {float(k10[i]):.4g}, it must be 0",
    )
    for name, value in (("fx", intrinsics[:, 0, 0]), ("fy", intrinsics[:, 1, 1])):
        checks.add(
            "camera", value <= 0,
            lambda i, name=name, value=value: (
                f"has focal length {name} = {float(value[i]):.4g}, it must be > 0"
            ),
        )


def _as_batch(caller: str, **values) -> list[Tensor]:
    """Bring floats, 0-d tensors and [B] tensors to [B] tensors of one dtype and device.

    The dtype is the promotion of the tensor arguments (float32 when all are Python numbers,
    EG3D's choice). Returns the values in argument order, each [B].
    """
    tensors = []
    for name, value in values.items():
        if isinstance(value, torch.Tensor):
            _check_float_tensor(caller, name, value)
            if value.dim() > 1:
                raise ValueError(
                    f"{caller}: {name} must be a float, a 0-d or a [B] tensor, "
                    f"got shape {tuple(value.shape)}"
                )
            tensors.append((name, value))
        elif isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(
                f"{caller}: {name} must be a float or a [B] tensor, got {type(value).__name__}"
            )
    sizes = {name: t.shape[0] for name, t in tensors if t.dim() == 1}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{caller}: batch sizes differ: {sizes}")
    devices = {t.device for _, t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{caller}: tensors are on different devices: {sorted(map(str, devices))}")
    batch = next(iter(sizes.values()), 1)
    dtype = torch.float32
    for _, t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    device = devices.pop() if devices else torch.device("cpu")
    out = []
    for name, value in values.items():
        t = torch.as_tensor(value, dtype=dtype, device=device).reshape(-1).expand(batch)
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{caller}: {name} contains NaN or inf")
        out.append(t)
    return out


def _check_positive(caller: str, name: str, value) -> float:
    """A finite real number > 0, as float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{caller}: {name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{caller}: {name} must be finite and > 0, got {value}")
    return float(value)


# --------------------------------------------------------------------------------------------
# The 25-number label
# --------------------------------------------------------------------------------------------


def _split(cameras: Tensor) -> tuple[Tensor, Tensor]:
    """cameras: [B, 25] -> (cam2world [B, 4, 4], intrinsics [B, 3, 3]), no checks."""
    batch = cameras.shape[0]
    return cameras[:, :16].reshape(batch, 4, 4), cameras[:, 16:].reshape(batch, 3, 3)


def check_cameras(cameras, *, rotation_tol: float = ROTATION_TOL) -> None:
    """Raise if ``cameras`` is not a batch of valid EG3D camera labels.

    Args:
        cameras: [B, 25] float32/float64 labels (see the module docstring).
        rotation_tol: the largest accepted entry of |R^T R - I| (default :data:`ROTATION_TOL`).

    Raises:
        TypeError: not a tensor, or not float32/float64.
        ValueError: wrong shape; NaN/inf; a rotation block that is scaled, sheared or a
            reflection (det <= 0); a cam2world last row other than (0, 0, 0, 1); an intrinsics
            last row other than (0, 0, 1) or K[1, 0] != 0; fx <= 0 or fy <= 0. The message names
            the first offending camera's index and how many cameras fail the same check.
    """
    _check_cameras("check_cameras", cameras, rotation_tol)


def make_camera_label(cam2world, intrinsics) -> Tensor:
    """Pack poses and normalised intrinsics into EG3D's 25-number camera labels.

    Args:
        cam2world: [B, 4, 4] camera-to-world matrices (OpenCV camera axes).
        intrinsics: [B, 3, 3] intrinsics normalised by image size, same dtype and device.

    Returns:
        [B, 25]: cam2world row-major, then intrinsics row-major. Checked by
        :func:`check_cameras`.
    """
    caller = "make_camera_label"
    _check_float_tensor(caller, "cam2world", cam2world)
    _check_float_tensor(caller, "intrinsics", intrinsics)
    _check_shape(caller, "cam2world", cam2world, (4, 4), "[B, 4, 4]")
    _check_shape(caller, "intrinsics", intrinsics, (3, 3), "[B, 3, 3]")
    if cam2world.shape[0] != intrinsics.shape[0]:
        raise ValueError(
            f"{caller}: batch sizes differ: cam2world has {cam2world.shape[0]}, "
            f"intrinsics has {intrinsics.shape[0]}"
        )
    # Refuse rather than promote: a silent float64 -> float32 cast would lose precision.
    if cam2world.dtype != intrinsics.dtype or cam2world.device != intrinsics.device:
        raise TypeError(
            f"{caller}: cam2world ({cam2world.dtype}, {cam2world.device}) and intrinsics "
            f"({intrinsics.dtype}, {intrinsics.device}) must share dtype and device"
        )
    batch = cam2world.shape[0]
    cameras = torch.cat([cam2world.reshape(batch, 16), intrinsics.reshape(batch, 9)], dim=1)
    _check_cameras(caller, cameras)
    return cameras


def split_camera_label(cameras) -> tuple[Tensor, Tensor]:
    """Unpack EG3D camera labels (checked by :func:`check_cameras`).

    Args:
        cameras: [B, 25] labels.

    Returns:
        (cam2world [B, 4, 4], intrinsics [B, 3, 3]); views of ``cameras`` when it is contiguous.
    """
    _check_cameras("split_camera_label", cameras)
    return _split(cameras)


def normalized_intrinsics(focal, cx=0.5, cy=0.5, skew=0.0) -> Tensor:
    """Intrinsics normalised by image size: [[focal, skew, cx], [0, focal, cy], [0, 0, 1]].

    A normalised focal f means a field of view of 2 * atan(0.5 / f) across the image side.

    Args:
        focal: float or [B] tensor, > 0 (fx = fy = focal).
        cx, cy: principal point as fractions of the image side; floats or [B] tensors.
        skew: float or [B] tensor.

    Returns:
        [B, 3, 3] (B = 1 when every argument is a Python number; float32 unless a tensor
        argument is float64).
    """
    caller = "normalized_intrinsics"
    focal, cx, cy, skew = _as_batch(caller, focal=focal, cx=cx, cy=cy, skew=skew)
    _raise_first(
        caller, "camera", focal <= 0,
        lambda i: f"has focal = {float(focal[i]):.4g}, it must be > 0",
    )
    zero, one = torch.zeros_like(focal), torch.ones_like(focal)
    rows = [
        torch.stack([focal, skew, cx], dim=-1),
        torch.stack([zero, focal, cy], dim=-1),
        torch.stack([zero, zero, one], dim=-1),
    ]
    return torch.stack(rows, dim=-2)


# --------------------------------------------------------------------------------------------
# Rigs and look-at cameras
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CameraRig:
    """Where look-at cameras sit and what lens they use.

    Attributes:
        radius: distance of the camera from the WORLD ORIGIN (not from the pivot), as in
            EG3D's LookAtPoseSampler.
        pivot: (x, y, z) world point the camera looks at.
        focal: normalised focal length (fx = fy, principal point at the image centre).
    """

    radius: float
    pivot: tuple[float, float, float]
    focal: float

    def __post_init__(self) -> None:
        # Frozen dataclass: normalise fields through object.__setattr__.
        object.__setattr__(self, "radius", _check_positive("CameraRig", "radius", self.radius))
        object.__setattr__(self, "focal", _check_positive("CameraRig", "focal", self.focal))
        pivot = tuple(self.pivot)
        if len(pivot) != 3 or not all(
            isinstance(p, numbers.Real) and not isinstance(p, bool) and math.isfinite(p)
            for p in pivot
        ):
            raise ValueError(f"CameraRig: pivot must be 3 finite numbers, got {self.pivot!r}")
        object.__setattr__(self, "pivot", tuple(float(p) for p in pivot))


#: EG3D's FFHQ rig (avg_camera_radius, avg_camera_pivot, focal 4.2647 = 18.837 deg FOV).
FFHQ_RIG = CameraRig(2.7, (0.0, 0.0, 0.2), 4.2647)
#: Talk3D's release: only yaw and pitch vary, wider lens, pivot slightly higher.
TALK3D_RIG = CameraRig(2.7, (0.0, 0.05, 0.2), 3.6)


def _sphere_position(yaw: Tensor, pitch: Tensor, radius: float) -> Tensor:
    """Camera position on EG3D's sphere about the world origin.

    yaw, pitch: [B]. Returns [B, 3].

    EG3D takes h = pi/2 + yaw, v = pi/2 + pitch, phi = arccos(1 - 2 v / pi) and puts the camera
    at radius * (sin(phi) cos(pi - h), cos(phi), sin(phi) sin(pi - h)). Substituting h and v:
    cos(pi - h) = sin(yaw), sin(pi - h) = cos(yaw) and cos(phi) = -2 pitch / pi. We evaluate the
    simplified form, which is exact at yaw = pitch = 0 (cos(pi/2) is not 0 in floating point).
    """
    cos_phi = -2.0 * pitch / math.pi
    sin_phi = torch.sqrt((1.0 - cos_phi * cos_phi).clamp_min(0.0))
    x = radius * sin_phi * torch.sin(yaw)
    y = radius * cos_phi
    z = radius * sin_phi * torch.cos(yaw)
    return torch.stack([x, y, z], dim=-1)


def _look_at_rotation(caller: str, position: Tensor, target: Tensor) -> Tensor:
    """Rotation whose columns are the camera's right, down and forward axes in world space.

    position, target: [B, 3]. Returns [B, 3, 3]. No roll: right is horizontal (world +y up).
    """
    offset = target - position
    distance = offset.norm(dim=-1)
    _raise_first(
        caller, "camera", distance <= 0,
        lambda i: "sits exactly at the pivot, so it has no viewing direction",
    )
    forward = offset / distance[:, None]
    up = torch.tensor(_WORLD_UP, dtype=position.dtype, device=position.device).expand_as(forward)
    side = torch.linalg.cross(forward, up, dim=-1)
    side_norm = side.norm(dim=-1)
    # forward x up vanishes when looking straight up or down: right is then undefined.
    _raise_first(
        caller, "camera", side_norm < 1e-6,
        lambda i: "looks straight up or down (along world y), so its right axis is undefined",
    )
    right = side / side_norm[:, None]
    # right, down, forward must be right-handed: down = forward x right.
    down = torch.linalg.cross(forward, right, dim=-1)
    return torch.stack([right, down, forward], dim=-1)


def _pose(rotation: Tensor, position: Tensor) -> Tensor:
    """rotation [B, 3, 3], position [B, 3] -> homogeneous cam2world [B, 4, 4]."""
    batch = rotation.shape[0]
    top = torch.cat([rotation, position[:, :, None]], dim=-1)
    bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=rotation.dtype, device=rotation.device)
    return torch.cat([top, bottom.expand(batch, 1, 4)], dim=1)


def look_at_camera(yaw, pitch, *, rig: CameraRig = FFHQ_RIG, roll=0.0) -> Tensor:
    """EG3D look-at camera labels (LookAtPoseSampler semantics, without its random jitter).

    The camera sits on the sphere of radius ``rig.radius`` CENTRED AT THE WORLD ORIGIN (this is
    what EG3D does: the pivot only sets where the camera looks, not where it sits) and looks at
    ``rig.pivot`` with world +y up and no roll; then ``roll`` turns it about its viewing axis.

    - yaw = pitch = 0: camera at (0, 0, radius), looking down -z; its +x is world +x and its +y
      (image down) is world -y.
    - Positive yaw moves the camera towards world +x (x = r cos(e) sin(yaw), z = r cos(e)
      cos(yaw), e the elevation), i.e. it swings to the right of the frontal view.
    - Positive pitch moves the camera DOWN (world -y): camera y = -radius * 2 * pitch / pi.
      Note pitch is EG3D's "uniform on the sphere" parameter, not the elevation angle: the
      elevation e satisfies sin(e) = -2 pitch / pi.
    - Positive roll turns the camera's +x axis towards its +y axis (clockwise seen from behind the
      camera, so the picture turns anticlockwise).

    Args:
        yaw: radians, float or [B] tensor.
        pitch: radians, float or [B] tensor, |pitch| < pi/2 (EG3D clamps there; we refuse).
        rig: sphere radius, pivot and focal (:data:`FFHQ_RIG` by default).
        roll: radians, float or [B] tensor.

    Returns:
        [B, 25] labels (B = 1 for Python numbers; float32 unless a tensor argument is float64).
    """
    caller = "look_at_camera"
    if not isinstance(rig, CameraRig):
        raise TypeError(f"{caller}: rig must be a CameraRig, got {type(rig).__name__}")
    yaw, pitch, roll = _as_batch(caller, yaw=yaw, pitch=pitch, roll=roll)
    _raise_first(
        caller, "camera", pitch.abs() >= math.pi / 2,
        lambda i: f"has pitch = {float(pitch[i]):.4g}, it must satisfy |pitch| < pi/2",
    )
    position = _sphere_position(yaw, pitch, rig.radius)
    pivot = torch.tensor(rig.pivot, dtype=position.dtype, device=position.device)
    rotation = _look_at_rotation(caller, position, pivot.expand_as(position))
    # Roll acts in the camera's own frame, hence on the right.
    rotation = rotation @ _rot_z(roll)
    focal = torch.full_like(yaw, rig.focal)
    return make_camera_label(_pose(rotation, position), normalized_intrinsics(focal))


def camera_to_yaw_pitch(cameras, rig: CameraRig = FFHQ_RIG, *, check_aim: bool = True):
    """Invert :func:`look_at_camera`: the yaw and pitch of each camera's position.

    The position alone is used: radius = |t| (about the world origin, like EG3D),
    yaw = atan2(t_x, t_z), pitch = -(pi/2) * t_y / radius. This is exact for look-at cameras of
    any rig and roll. ``rig`` is only used to check that each camera looks at ``rig.pivot``
    (its optical axis passes within :data:`AIM_TOL` of it, in front of the camera): a camera of
    another rig would have no meaningful yaw/pitch in this one. Tracked cameras that only
    roughly aim at the pivot can pass ``check_aim=False``.

    Args:
        cameras: [B, 25] labels.
        rig: the rig whose pivot the cameras should look at.
        check_aim: raise ValueError for a camera that does not look at ``rig.pivot``.

    Returns:
        (yaw [B], pitch [B], radius [B]) in the cameras' dtype; yaw in (-pi, pi],
        pitch in [-pi/2, pi/2].
    """
    caller = "camera_to_yaw_pitch"
    _check_cameras(caller, cameras)
    if not isinstance(rig, CameraRig):
        raise TypeError(f"{caller}: rig must be a CameraRig, got {type(rig).__name__}")
    cam2world, _ = _split(cameras)
    position = cam2world[:, :3, 3]
    radius = position.norm(dim=-1)
    _raise_first(
        caller, "camera", radius <= 0,
        lambda i: "sits at the world origin, so it has no direction on the sphere",
    )
    if check_aim:
        _check_aim(caller, cam2world, rig.pivot)
    yaw = torch.atan2(position[:, 0], position[:, 2])
    # Clamp guards |t_y| / |t| creeping past 1 by an ulp.
    pitch = (-(math.pi / 2) * position[:, 1] / radius).clamp(-math.pi / 2, math.pi / 2)
    return yaw, pitch, radius


def _check_aim(caller: str, cam2world: Tensor, pivot: tuple[float, float, float]) -> None:
    """ValueError for a camera whose optical axis misses ``pivot``. cam2world: [B, 4, 4]."""
    forward = cam2world[:, :3, 2]
    target = torch.tensor(pivot, dtype=cam2world.dtype, device=cam2world.device)
    to_pivot = target - cam2world[:, :3, 3]
    # forward is a unit vector, so |forward x to_pivot| is the pivot's distance from the axis.
    miss = torch.linalg.cross(forward, to_pivot, dim=-1).norm(dim=-1)
    ahead = (forward * to_pivot).sum(dim=-1)
    _raise_first(
        caller, "camera", (miss > AIM_TOL) | (ahead <= 0),
        lambda i: (
            f"does not look at the rig's pivot {pivot}: its optical axis passes "
            f"{float(miss[i]):.3g} from it (AIM_TOL = {AIM_TOL:g}) with the pivot "
            f"{'in front' if float(ahead[i]) > 0 else 'behind'}; pass check_aim=False "
            "to skip this check"
        ),
    )


# --------------------------------------------------------------------------------------------
# Euler angles
# --------------------------------------------------------------------------------------------


def _rot_x(angle: Tensor) -> Tensor:
    """angle [B] -> [B, 3, 3], anticlockwise about +x seen from +x."""
    c, s, o, i = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle), torch.ones_like(angle)
    return torch.stack([i, o, o, o, c, -s, o, s, c], dim=-1).reshape(-1, 3, 3)


def _rot_y(angle: Tensor) -> Tensor:
    """angle [B] -> [B, 3, 3], anticlockwise about +y seen from +y (+z turns towards +x)."""
    c, s, o, i = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle), torch.ones_like(angle)
    return torch.stack([c, o, s, o, i, o, -s, o, c], dim=-1).reshape(-1, 3, 3)


def _rot_z(angle: Tensor) -> Tensor:
    """angle [B] -> [B, 3, 3], anticlockwise about +z seen from +z (+x turns towards +y)."""
    c, s, o, i = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle), torch.ones_like(angle)
    return torch.stack([c, -s, o, s, c, o, o, o, i], dim=-1).reshape(-1, 3, 3)


def euler_to_rotation(yaw, pitch, roll=0.0) -> Tensor:
    """Rotation matrices from intrinsic yaw-pitch-roll angles.

    Convention: R = R_y(yaw) @ R_x(pitch) @ R_z(roll), each a right-handed (anticlockwise seen
    from the positive axis) rotation about a world axis; equivalently yaw about +y first, then
    pitch about the turned x axis, then roll about the twice-turned z axis. The angles are
    independent of :func:`look_at_camera`'s yaw/pitch, which are positions on a sphere.

    Args:
        yaw, pitch, roll: radians, floats or [B] tensors.

    Returns:
        [B, 3, 3] (B = 1 for Python numbers; float32 unless a tensor argument is float64).
    """
    yaw, pitch, roll = _as_batch("euler_to_rotation", yaw=yaw, pitch=pitch, roll=roll)
    return _rot_y(yaw) @ _rot_x(pitch) @ _rot_z(roll)


def rotation_to_euler(rotation) -> tuple[Tensor, Tensor, Tensor]:
    """Invert :func:`euler_to_rotation`.

    With R = R_y(a) R_x(b) R_z(c): R[1, 2] = -sin b, (R[0, 2], R[2, 2]) = cos b (sin a, cos a)
    and (R[1, 0], R[1, 1]) = cos b (sin c, cos c). At gimbal lock (cos b below sqrt(eps) of
    the dtype) only a combination of yaw and roll is determined; we then return roll = 0 and
    put the whole turn in yaw, so that euler_to_rotation still reproduces R.

    Args:
        rotation: [B, 3, 3] float32/float64 rotation matrices (checked against ROTATION_TOL).

    Returns:
        (yaw [B], pitch [B], roll [B]) in radians; yaw, roll in (-pi, pi], pitch in
        [-pi/2, pi/2].
    """
    caller = "rotation_to_euler"
    _check_float_tensor(caller, "rotation", rotation)
    _check_shape(caller, "rotation", rotation, (3, 3), "[B, 3, 3]")
    checks = _Checks(caller)
    checks.add("rotation", ~torch.isfinite(rotation).flatten(1).all(dim=-1), lambda i: "contains NaN or inf")
    _check_rotations(checks, "rotation", rotation, ROTATION_TOL)
    checks.raise_first()
    r = rotation
    cos_pitch = torch.hypot(r[:, 1, 0], r[:, 1, 1])
    # atan2 with the hypot keeps pitch accurate near +-pi/2, where asin(-R[1, 2]) is not.
    pitch = torch.atan2(-r[:, 1, 2], cos_pitch)
    locked = cos_pitch < torch.finfo(r.dtype).eps ** 0.5
    yaw = torch.atan2(r[:, 0, 2], r[:, 2, 2])
    roll = torch.atan2(r[:, 1, 0], r[:, 1, 1])
    # At cos b = 0, sin b = s: R[0, 0] = cos(a - s c), R[0, 1] = s sin(a - s c); with c = 0
    # the yaw is atan2(s R[0, 1], R[0, 0]).
    sin_pitch = -r[:, 1, 2]
    locked_yaw = torch.atan2(torch.sign(sin_pitch) * r[:, 0, 1], r[:, 0, 0])
    yaw = torch.where(locked, locked_yaw, yaw)
    roll = torch.where(locked, torch.zeros_like(roll), roll)
    return yaw, pitch, roll


# --------------------------------------------------------------------------------------------
# Rays
# --------------------------------------------------------------------------------------------


def _check_resolution(caller: str, resolution) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, numbers.Integral):
        raise TypeError(f"{caller}: resolution must be an int, got {type(resolution).__name__}")
    if resolution < 1:
        raise ValueError(f"{caller}: resolution must be >= 1, got {resolution}")
    return int(resolution)


def generate_rays(cameras, resolution: int, *, check: bool = True) -> tuple[Tensor, Tensor]:
    """One ray through the centre of every pixel of a ``resolution`` x ``resolution`` image.

    Pixel (row, col) sits at normalised image coordinates u = (col + 0.5) / res,
    v = (row + 0.5) / res and is unprojected with the full intrinsics, skew included, onto the
    camera's z = 1 plane: y_cam = (v - cy) / fy, x_cam = (u - cx - skew * y_cam) / fx (the same
    as (u - cx + cy sk / fy - sk v / fy) / fx), then rotated to world space and normalised.

    Args:
        cameras: [B, 25] labels, checked by :func:`check_cameras`.
        resolution: image side in pixels, >= 1.
        check: False skips :func:`check_cameras`, for callers that checked these cameras already
            (reading the checks back from a GPU waits for it; inside ``torch.compile`` it would
            split the graph).

    Returns:
        (origins [B, R, 3], directions [B, R, 3]) with R = resolution^2 and ray index
        row * resolution + col; origins are the camera positions, directions unit vectors;
        both in the cameras' dtype and on their device.
    """
    caller = "generate_rays"
    if check:
        _check_cameras(caller, cameras)
    else:  # the cheap host-side checks stay
        _check_float_tensor(caller, "cameras", cameras)
        _check_shape(caller, "cameras", cameras, (LABEL_SIZE,), f"[B, {LABEL_SIZE}]")
    res = _check_resolution(caller, resolution)
    cam2world, intrinsics = _split(cameras)
    batch = cameras.shape[0]
    centres = (torch.arange(res, dtype=cameras.dtype, device=cameras.device) + 0.5) / res
    # 'ij' indexing: the first grid varies with the row, so flattening gives row * res + col.
    v, u = torch.meshgrid(centres, centres, indexing="ij")
    u, v = u.reshape(1, -1), v.reshape(1, -1)  # [1, R]
    fx, fy = intrinsics[:, 0, 0, None], intrinsics[:, 1, 1, None]  # [B, 1]
    cx, cy = intrinsics[:, 0, 2, None], intrinsics[:, 1, 2, None]
    skew = intrinsics[:, 0, 1, None]
    y_cam = (v - cy) / fy  # [B, R]
    x_cam = (u - cx - skew * y_cam) / fx
    points = torch.stack([x_cam, y_cam, torch.ones_like(x_cam)], dim=-1)  # [B, R, 3]
    # Directions are free vectors: only the rotation block applies, not the translation.
    directions = points @ cam2world[:, :3, :3].transpose(1, 2)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    # Materialised, not expanded, so callers may write into it.
    origins = cam2world[:, None, :3, 3].expand(batch, res * res, 3).contiguous()
    return origins, directions


def ray_box_limits(origins, directions, box_side: float) -> tuple[Tensor, Tensor, Tensor]:
    """Where each ray enters and leaves the cube [-box_side/2, box_side/2]^3 (slab method).

    This is the depth range EG3D uses when ray_start and ray_end are both 'auto'. The segment is
    clipped to the part in front of the origin (t >= 0), so a ray starting inside the box gets
    t_start = 0. A ray hits when that clipped segment has positive length; a ray that misses
    (or only grazes an edge or corner) gets t_start = t_end = 0 and hit = False.

    Args:
        origins: [B, R, 3] ray origins.
        directions: [B, R, 3] non-zero directions, same dtype and device (need not be unit; t
            is then in multiples of the direction's length).
        box_side: the cube's side (EG3D's box_warp), > 0.

    Returns:
        (t_start [B, R, 1], t_end [B, R, 1], hit [B, R, 1] bool).
    """
    caller = "ray_box_limits"
    _check_float_tensor(caller, "origins", origins)
    _check_float_tensor(caller, "directions", directions)
    if origins.dim() != 3 or origins.shape[-1] != 3:
        raise ValueError(
            f"{caller}: origins must have shape [B, R, 3], got {tuple(origins.shape)}"
        )
    if directions.shape != origins.shape:
        raise ValueError(
            f"{caller}: directions must have the shape of origins {tuple(origins.shape)}, "
            f"got {tuple(directions.shape)}"
        )
    if directions.dtype != origins.dtype or directions.device != origins.device:
        raise TypeError(f"{caller}: origins and directions must share dtype and device")
    half = _check_positive(caller, "box_side", box_side) / 2
    if not bool(torch.isfinite(origins).all() & torch.isfinite(directions).all()):
        raise ValueError(f"{caller}: origins or directions contain NaN or inf")
    if bool((directions == 0).all(dim=-1).any()):
        raise ValueError(f"{caller}: some directions are zero vectors")
    return _slab_limits(origins, directions, half)


def _slab_limits(origins: Tensor, directions: Tensor, half: float):
    """origins, directions [B, R, 3] -> (t_start, t_end, hit), each [B, R, 1]."""
    parallel = directions == 0
    # Axes the ray runs parallel to: no crossing, so the slab either holds the whole line
    # (origin inside it) or none of it. Dividing by 1 there keeps NaN (0/0) out of the math.
    safe = torch.where(parallel, torch.ones_like(directions), directions)
    t_low = (-half - origins) / safe
    t_high = (half - origins) / safe
    inf = torch.full_like(origins, math.inf)
    inside = origins.abs() <= half
    enter = torch.where(parallel, torch.where(inside, -inf, inf), torch.minimum(t_low, t_high))
    leave = torch.where(parallel, torch.where(inside, inf, -inf), torch.maximum(t_low, t_high))
    t_start = enter.amax(dim=-1, keepdim=True).clamp_min(0.0)
    t_end = leave.amin(dim=-1, keepdim=True)
    hit = t_end > t_start
    zero = torch.zeros_like(t_start)
    return torch.where(hit, t_start, zero), torch.where(hit, t_end, zero), hit
