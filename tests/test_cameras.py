"""Cameras and rays: EG3D label layout, look-at rig, Euler angles, ray generation, ray-box limits.

Expected values are worked out by hand in the comments (FFHQ rig: camera on a sphere of radius
2.7 about the world origin, looking at the pivot (0, 0, 0.2), normalised focal 4.2647).
"""
from __future__ import annotations

import math

import pytest
import torch

from talk3d.render.cameras import (
    FFHQ_DEPTH_RANGE,
    FFHQ_RIG,
    TALK3D_RIG,
    CameraRig,
    camera_to_yaw_pitch,
    check_cameras,
    euler_to_rotation,
    generate_rays,
    look_at_camera,
    make_camera_label,
    normalized_intrinsics,
    ray_box_limits,
    rotation_to_euler,
    split_camera_label,
)

F64 = dict(dtype=torch.float64)
# float64 round trips: a handful of trig evaluations, each a few ulps (1e-16).
TIGHT = dict(atol=1e-12, rtol=0)
# float32: the same in single precision, values of order 3.
LOOSE = dict(atol=2e-6, rtol=0)


def frontal(rig=FFHQ_RIG, dtype=torch.float64):
    return look_at_camera(torch.zeros(1, dtype=dtype), torch.zeros(1, dtype=dtype), rig=rig)


def pose(rotation, position, dtype=torch.float64):
    """rotation [3, 3] and position [3] (nested lists) -> cam2world [1, 4, 4]."""
    m = torch.eye(4, dtype=dtype)
    m[:3, :3] = torch.tensor(rotation, dtype=dtype)
    m[:3, 3] = torch.tensor(position, dtype=dtype)
    return m[None]


# ---------------------------------------------------------------- label layout


def test_label_layout_and_round_trip():
    cam2world = pose([[0, 0, 1], [0, 1, 0], [-1, 0, 0]], [1.0, 2.0, 3.0])  # R_y(90 deg)
    intrinsics = normalized_intrinsics(torch.tensor([4.0], **F64), cx=0.4, cy=0.6, skew=0.1)
    label = make_camera_label(cam2world, intrinsics)
    assert label.shape == (1, 25) and label.dtype == torch.float64
    # Row-major: the translation is entries 3, 7, 11; the intrinsics follow from 16.
    assert label[0, [3, 7, 11]].tolist() == [1.0, 2.0, 3.0]
    assert label[0, 12:16].tolist() == [0.0, 0.0, 0.0, 1.0]
    assert label[0, 16:].tolist() == [4.0, 0.1, 0.4, 0.0, 4.0, 0.6, 0.0, 0.0, 1.0]
    back_pose, back_k = split_camera_label(label)
    assert torch.equal(back_pose, cam2world) and torch.equal(back_k, intrinsics)


def test_normalized_intrinsics_batches_and_defaults():
    k = normalized_intrinsics(torch.tensor([2.0, 3.0]))
    assert k.shape == (2, 3, 3) and k.dtype == torch.float32
    assert k[1].tolist() == [[3.0, 0.0, 0.5], [0.0, 3.0, 0.5], [0.0, 0.0, 1.0]]
    assert normalized_intrinsics(4.2647).shape == (1, 3, 3)


# ---------------------------------------------------------------- look-at rig


def test_frontal_ffhq_camera_hand_computed():
    label = frontal()
    cam2world, k = split_camera_label(label)
    # yaw = pitch = 0: on the sphere about the ORIGIN at (0, 0, 2.7), looking down -z.
    # Columns: right = +x, down (camera +y) = world -y, forward = -z.
    expected = torch.tensor(
        [[1, 0, 0, 0], [0, -1, 0, 0], [0, 0, -1, 2.7], [0, 0, 0, 1]], **F64
    )
    assert torch.equal(cam2world[0], expected)
    assert k[0].tolist() == [[4.2647, 0, 0.5], [0, 4.2647, 0.5], [0, 0, 1]]


def test_frontal_rays_hand_computed():
    origins, dirs = generate_rays(frontal(), 3)
    assert origins.shape == dirs.shape == (1, 9, 3)
    assert torch.equal(origins[0], torch.tensor([[0.0, 0.0, 2.7]], **F64).expand(9, 3))
    # Centre pixel (row 1, col 1) sits at (0.5, 0.5) = the principal point: straight at the
    # pivot, which is 2.5 away.
    torch.testing.assert_close(dirs[0, 4], torch.tensor([0.0, 0.0, -1.0], **F64), **TIGHT)
    pivot = torch.tensor(FFHQ_RIG.pivot, **F64)
    torch.testing.assert_close(origins[0, 4] + 2.5 * dirs[0, 4], pivot, **TIGHT)
    # Corner pixel (row 0, col 0) at u = v = 1/6: x_cam = y_cam = (1/6 - 1/2) / 4.2647. Camera +x
    # is world +x and camera +y is world -y, so the top-left ray leans to -x and +y (up).
    a = (1 / 6 - 0.5) / 4.2647
    corner = torch.tensor([a, -a, -1.0], **F64) / math.sqrt(2 * a * a + 1)
    torch.testing.assert_close(dirs[0, 0], corner, **TIGHT)
    # Ray index = row * res + col: index 2 is row 0, col 2 (top right), leaning to +x.
    assert dirs[0, 2, 0] > 0 and dirs[0, 2, 1] > 0 and dirs[0, 6, 0] < 0 and dirs[0, 6, 1] < 0


def test_skewed_intrinsics_ray_hand_computed():
    # Camera at the origin with identity rotation: world = camera coordinates.
    k = torch.tensor([[[2.0, 0.5, 0.4], [0.0, 4.0, 0.6], [0.0, 0.0, 1.0]]], **F64)
    label = make_camera_label(pose([[1, 0, 0], [0, 1, 0], [0, 0, 1]], [0, 0, 0]), k)
    _, dirs = generate_rays(label, 2)
    # Row 1, col 0 (index 2): u = 0.25, v = 0.75. y = (0.75 - 0.6) / 4 = 0.0375,
    # x = (0.25 - 0.4 + 0.6 * 0.5 / 4 - 0.5 * 0.75 / 4) / 2 = -0.084375.
    x, y = -0.084375, 0.0375
    expected = torch.tensor([x, y, 1.0], **F64) / math.sqrt(x * x + y * y + 1)
    torch.testing.assert_close(dirs[0, 2], expected, **TIGHT)
    # Every ray projects back to its own pixel centre through K.
    pixels = (dirs / dirs[..., 2:]) @ k[0].T
    centres = torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]], **F64)
    torch.testing.assert_close(pixels[0, :, :2], centres, **TIGHT)


def test_positive_yaw_moves_camera_to_plus_x_and_pitch_down():
    yaw = 0.3
    cam2world, _ = split_camera_label(look_at_camera(torch.tensor([yaw], **F64), 0.0))
    position = cam2world[0, :3, 3]
    torch.testing.assert_close(
        position, torch.tensor([2.7 * math.sin(yaw), 0.0, 2.7 * math.cos(yaw)], **F64), **TIGHT
    )
    # Positive pitch: camera below the equator, y = -2.7 * 2 * pitch / pi.
    cam2world, _ = split_camera_label(look_at_camera(0.0, torch.tensor([0.2], **F64)))
    assert cam2world[0, 1, 3].item() == pytest.approx(-2.7 * 0.4 / math.pi, abs=1e-12)
    # Still looking at the pivot, with camera +y pointing (mostly) down.
    assert cam2world[0, 1, 1] < -0.9


def test_sphere_is_centred_at_origin_not_pivot():
    # EG3D's LookAtPoseSampler: |position| = radius for every yaw and pitch; the pivot (here
    # Talk3D's, off-centre) only sets where the camera looks.
    yaw = torch.tensor([0.0, 0.4, -0.5], **F64)
    pitch = torch.tensor([0.0, -0.3, 0.2], **F64)
    cam2world, k = split_camera_label(look_at_camera(yaw, pitch, rig=TALK3D_RIG))
    torch.testing.assert_close(cam2world[:, :3, 3].norm(dim=-1), torch.full((3,), 2.7, **F64))
    to_pivot = torch.tensor(TALK3D_RIG.pivot, **F64) - cam2world[:, :3, 3]
    forward = cam2world[:, :3, 2]
    torch.testing.assert_close(forward, to_pivot / to_pivot.norm(dim=-1, keepdim=True), **TIGHT)
    assert torch.all(k[:, 0, 0] == 3.6)


def test_roll_turns_right_axis_towards_down():
    roll = torch.tensor([math.pi / 2], **F64)
    cam2world, _ = split_camera_label(look_at_camera(0.0, 0.0, roll=roll))
    # Unrolled right = +x, down = -y. Rolled by +90 deg: right becomes the old down.
    torch.testing.assert_close(cam2world[0, :3, 0], torch.tensor([0.0, -1.0, 0.0], **F64), **TIGHT)
    torch.testing.assert_close(cam2world[0, :3, 1], torch.tensor([-1.0, 0.0, 0.0], **F64), **TIGHT)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, TIGHT), (torch.float32, LOOSE)])
def test_look_at_yaw_pitch_round_trip(dtype, tol):
    n = 64
    yaw = (torch.rand(n, dtype=dtype) * 2 - 1) * math.radians(30)
    pitch = (torch.rand(n, dtype=dtype) * 2 - 1) * math.radians(20)
    roll = (torch.rand(n, dtype=dtype) * 2 - 1) * 0.1
    for rig in (FFHQ_RIG, TALK3D_RIG):
        cameras = look_at_camera(yaw, pitch, rig=rig, roll=roll)
        assert cameras.dtype == dtype
        yaw2, pitch2, radius = camera_to_yaw_pitch(cameras, rig)
        torch.testing.assert_close(yaw2, yaw, **tol)
        torch.testing.assert_close(pitch2, pitch, **tol)
        torch.testing.assert_close(radius, torch.full((n,), 2.7, dtype=dtype), **tol)


def test_camera_to_yaw_pitch_checks_the_aim():
    # A frontal TALK3D camera aims at (0, 0.05, 0.2): its axis misses FFHQ's pivot by ~0.05.
    cameras = frontal(TALK3D_RIG)
    with pytest.raises(ValueError, match=r"camera 0 does not look at the rig's pivot"):
        camera_to_yaw_pitch(cameras, FFHQ_RIG)
    yaw, pitch, radius = camera_to_yaw_pitch(cameras, FFHQ_RIG, check_aim=False)
    assert (yaw.item(), pitch.item(), radius.item()) == (0.0, 0.0, 2.7)


def test_look_at_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"pitch = 1\.571.*\|pitch\| < pi/2"):
        look_at_camera(0.0, math.pi / 2)
    with pytest.raises(ValueError, match="batch sizes differ"):
        look_at_camera(torch.zeros(2), torch.zeros(3))
    with pytest.raises(TypeError, match="yaw must be float32 or float64"):
        look_at_camera(torch.zeros(2, dtype=torch.int64), 0.0)
    with pytest.raises(ValueError, match="radius must be finite and > 0"):
        CameraRig(0.0, (0, 0, 0), 1.0)
    with pytest.raises(ValueError, match="sits exactly at the pivot"):
        look_at_camera(0.0, 0.0, rig=CameraRig(0.2, (0.0, 0.0, 0.2), 1.0))


# ---------------------------------------------------------------- Euler angles


def test_euler_convention_hand_computed():
    # R_y(90 deg) turns +z to +x; R_x(90 deg) turns +y to +z; R_z(90 deg) turns +x to +y.
    e_x, e_y, e_z = torch.eye(3, **F64).unbind(0)
    half_pi = torch.tensor([math.pi / 2], **F64)
    torch.testing.assert_close(euler_to_rotation(half_pi, 0.0, 0.0)[0] @ e_z, e_x, **TIGHT)
    torch.testing.assert_close(euler_to_rotation(0.0, half_pi, 0.0)[0] @ e_y, e_z, **TIGHT)
    torch.testing.assert_close(euler_to_rotation(0.0, 0.0, half_pi)[0] @ e_x, e_y, **TIGHT)
    # Order: R_y @ R_x @ R_z, so roll acts first on a vector. e_x -> (roll) e_y -> (pitch) e_z
    # -> (yaw) e_x.
    r = euler_to_rotation(half_pi, half_pi, half_pi)[0]
    torch.testing.assert_close(r @ e_x, e_x, **TIGHT)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, TIGHT), (torch.float32, LOOSE)])
def test_euler_round_trip(dtype, tol):
    n = 256
    yaw = (torch.rand(n, dtype=dtype) * 2 - 1) * 3.1
    pitch = (torch.rand(n, dtype=dtype) * 2 - 1) * 1.4  # away from gimbal lock at +-pi/2
    roll = (torch.rand(n, dtype=dtype) * 2 - 1) * 3.1
    rotation = euler_to_rotation(yaw, pitch, roll)
    assert rotation.shape == (n, 3, 3) and rotation.dtype == dtype
    yaw2, pitch2, roll2 = rotation_to_euler(rotation)
    torch.testing.assert_close(yaw2, yaw, **tol)
    torch.testing.assert_close(pitch2, pitch, **tol)
    torch.testing.assert_close(roll2, roll, **tol)


def test_euler_at_gimbal_lock_reproduces_rotation():
    for pitch in (math.pi / 2, -math.pi / 2):
        rotation = euler_to_rotation(torch.tensor([0.3], **F64), pitch, 0.2)
        yaw, pitch2, roll = rotation_to_euler(rotation)
        assert roll.item() == 0.0 and pitch2.item() == pytest.approx(pitch, abs=1e-12)
        torch.testing.assert_close(euler_to_rotation(yaw, pitch2, roll), rotation, **TIGHT)


def test_rotation_to_euler_rejects_non_rotations():
    with pytest.raises(ValueError, match="rotation 0 has a rotation block with det = -1"):
        rotation_to_euler(torch.diag(torch.tensor([-1.0, 1.0, 1.0]))[None])
    with pytest.raises(ValueError, match=r"must have shape \[B, 3, 3\]"):
        rotation_to_euler(torch.eye(3))


# ---------------------------------------------------------------- invalid cameras


def bad_camera(index, edit):
    """Three valid frontal cameras (float64) with camera ``index`` edited by ``edit(label)``."""
    cameras = frontal().repeat(3, 1).clone()
    edit(cameras[index])
    return cameras


def scale_rotation(label):
    label[[0, 1, 2, 4, 5, 6, 8, 9, 10]] *= 1.01


def reflect(label):
    label[[0, 4, 8]] *= -1  # flip the right axis: det = -1


def set_entry(index, value):
    return lambda label: label.__setitem__(index, value)


# (id, edit of camera 1, expected message). Entries: 5 = R[1, 1], 14 = last row z,
# 16 = fx, 19 = K[1, 0], 20 = fy, 24 = K[2, 2].
BAD_CASES = [
    ("nan", set_entry(5, math.nan), r"camera 1 contains NaN or inf at label entries \[5\]"),
    ("inf", set_entry(20, math.inf), r"camera 1 contains NaN or inf at label entries \[20\]"),
    (
        "scaled",
        scale_rotation,
        r"camera 1 has a rotation block that is not orthonormal: max \|R\^T R - I\| = 0\.0201",
    ),
    ("reflection", reflect, r"camera 1 has a rotation block with det = -1.*\(a reflection"),
    ("zero focal", set_entry(16, 0.0), r"camera 1 has focal length fx = 0, it must be > 0"),
    ("negative fy", set_entry(20, -4.0), r"camera 1 has focal length fy = -4, it must be > 0"),
    ("last row", set_entry(14, 0.5), r"camera 1 has cam2world last row \(0, 0, 0\.5, 1\)"),
    ("intrinsics row", set_entry(24, 2.0), r"camera 1 has intrinsics last row \(0, 0, 2\)"),
    ("k10", set_entry(19, 0.1), r"camera 1 has intrinsics K\[1, 0\] = 0\.1"),
]


@pytest.mark.parametrize("edit, message", [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_cameras_raise_everywhere(edit, message):
    cameras = bad_camera(1, edit)
    with pytest.raises(ValueError, match=message):
        check_cameras(cameras)
    with pytest.raises(ValueError, match="generate_rays: " + message):
        generate_rays(cameras, 4)
    with pytest.raises(ValueError, match="split_camera_label: " + message):
        split_camera_label(cameras)
    cam2world, k = cameras[:, :16].reshape(3, 4, 4), cameras[:, 16:].reshape(3, 3, 3)
    with pytest.raises(ValueError, match="make_camera_label: " + message):
        make_camera_label(cam2world, k)


def test_bad_camera_message_counts_repeat_offenders():
    cameras = frontal().repeat(4, 1)
    cameras[2:, 16] = 0.0
    with pytest.raises(ValueError, match=r"camera 2 has focal length fx = 0.*\(2 of 4 cameras"):
        check_cameras(cameras)


def test_bad_camera_reports_the_first_failed_check_in_order():
    """Every check runs before any is read back; the message is still the first check's, in the
    order a person would fix them (NaN before the rotation that NaN also spoils)."""
    cameras = frontal().repeat(3, 1)
    cameras[2, 5] = math.nan  # camera 2: NaN (and so a non-orthonormal rotation)
    cameras[1, 16] = 0.0  # camera 1: zero focal, a later check
    with pytest.raises(ValueError, match=r"camera 2 contains NaN"):
        check_cameras(cameras)


def test_cameras_are_checked_in_their_own_precision_under_autocast():
    """A model checks its cameras under the caller's autocast: a bf16 R^T R is 4e-3 off I, which
    failed valid cameras (ROTATION_TOL 1e-3)."""
    cameras = look_at_camera(torch.tensor([0.3, -0.2, 0.5]), torch.tensor([0.1, 0.0, -0.2]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        check_cameras(cameras)
        generate_rays(cameras, 4)


def test_valid_cameras_are_checked_without_reading_scalars():
    """A render validates its cameras every frame. Each read of a device tensor's value (bool(),
    int(), float()) waits for the GPU; the checks are read back together in one transfer, so
    validating good cameras reads no scalar off any tensor (each check used to read one)."""
    from scalar_reads import ScalarReads

    cameras = look_at_camera(torch.tensor([0.3, -0.2, 0.0]), torch.tensor([0.1, 0.0, -0.2]))
    with ScalarReads() as reads:
        check_cameras(cameras)
        generate_rays(cameras, 4)
    assert reads.count == 0


@pytest.mark.parametrize("shape", [(1, 24), (25,), (1, 1, 25)])
def test_wrong_shape_raises(shape):
    with pytest.raises(ValueError, match=r"cameras must have shape \[B, 25\], got"):
        check_cameras(torch.zeros(shape))
    with pytest.raises(ValueError, match=r"generate_rays: cameras must have shape \[B, 25\]"):
        generate_rays(torch.zeros(shape), 4)


def test_wrong_type_raises():
    with pytest.raises(TypeError, match="must be float32 or float64, got torch.int64"):
        check_cameras(torch.zeros(1, 25, dtype=torch.int64))
    with pytest.raises(TypeError, match="must be float32 or float64, got torch.float16"):
        check_cameras(frontal().half())
    with pytest.raises(TypeError, match="must be a torch.Tensor, got list"):
        check_cameras([0.0] * 25)
    with pytest.raises(TypeError, match="resolution must be an int"):
        generate_rays(frontal(), 4.0)
    with pytest.raises(ValueError, match="resolution must be >= 1"):
        generate_rays(frontal(), 0)


def test_rotation_tolerance_admits_rounded_labels():
    # A label rounded to 4 decimals is still a camera; ROTATION_TOL is there for this.
    cameras = look_at_camera(torch.tensor([0.37]), 0.21)
    check_cameras(torch.round(cameras, decimals=4))


# ---------------------------------------------------------------- ray-box limits


def rays(*pairs, dtype=torch.float64):
    """(origin, direction) pairs -> origins, unit directions [1, R, 3]."""
    o = torch.tensor([p[0] for p in pairs], dtype=dtype)[None]
    d = torch.tensor([p[1] for p in pairs], dtype=dtype)[None]
    return o, d / d.norm(dim=-1, keepdim=True)


def test_ray_box_limits_hand_computed():
    origins, dirs = rays(
        ((0.0, 0.0, 2.7), (0.0, 0.0, -1.0)),  # through the centre: z = 0.5 at 2.2, -0.5 at 3.2
        ((0.0, 0.0, 2.7), (1.0, 0.0, 0.0)),  # passes beside the box: miss
        ((0.0, 0.0, 2.7), (0.0, 0.0, 1.0)),  # box behind the origin: miss
        ((0.1, 0.0, 0.0), (1.0, 1.0, 0.0)),  # inside: leaves through x = 0.5 at 0.4 * sqrt 2
        ((0.5, 0.0, 2.7), (0.0, 0.0, -1.0)),  # on the x = 0.5 face plane, parallel to it
        ((0.0, 2.0, 2.0), (0.0, -1.0, -1.0)),  # enters at the edge y = z = 0.5, out at -0.5
    )
    t_start, t_end, hit = ray_box_limits(origins, dirs, 1.0)
    assert t_start.shape == t_end.shape == hit.shape == (1, 6, 1) and hit.dtype == torch.bool
    root2 = math.sqrt(2)
    torch.testing.assert_close(
        t_start[0, :, 0], torch.tensor([2.2, 0, 0, 0, 2.2, 1.5 * root2], **F64), **TIGHT
    )
    torch.testing.assert_close(
        t_end[0, :, 0], torch.tensor([3.2, 0, 0, 0.4 * root2, 3.2, 2.5 * root2], **F64), **TIGHT
    )
    assert hit[0, :, 0].tolist() == [True, False, False, True, True, True]


def test_ray_box_limits_frontal_ffhq_inside_depth_range():
    # The whole box, seen by the frontal FFHQ camera, lies within [2.2, 3.2 + a bit] in depth:
    # FFHQ's fixed range (2.25, 3.3) is this box clipped slightly in front.
    origins, dirs = generate_rays(frontal(), 8)
    t_start, t_end, hit = ray_box_limits(origins, dirs, 1.0)
    assert hit.all()
    assert t_start.min().item() == pytest.approx(2.2, abs=1e-3)
    assert t_end.max().item() < FFHQ_DEPTH_RANGE[1] and t_start.min().item() < FFHQ_DEPTH_RANGE[0]


def test_ray_box_limits_rejects_bad_input():
    origins, dirs = rays(((0.0, 0.0, 2.7), (0.0, 0.0, -1.0)))
    with pytest.raises(ValueError, match="box_side must be finite and > 0"):
        ray_box_limits(origins, dirs, 0.0)
    with pytest.raises(ValueError, match="directions are zero vectors"):
        ray_box_limits(origins, torch.zeros_like(dirs), 1.0)
    with pytest.raises(ValueError, match=r"directions must have the shape of origins"):
        ray_box_limits(origins, dirs[:, :, :2], 1.0)
    with pytest.raises(ValueError, match="NaN or inf"):
        ray_box_limits(origins * math.nan, dirs, 1.0)


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rays_keep_camera_dtype(dtype):
    cameras = look_at_camera(torch.tensor([0.2, -0.1], dtype=dtype), 0.1, rig=TALK3D_RIG)
    origins, dirs = generate_rays(cameras, 16)
    assert origins.dtype == dirs.dtype == dtype and origins.shape == (2, 256, 3)
    torch.testing.assert_close(dirs.norm(dim=-1), torch.ones(2, 256, dtype=dtype))
    t_start, t_end, hit = ray_box_limits(origins, dirs, 1.0)
    assert t_start.dtype == t_end.dtype == dtype and bool(hit.any())
    # The principal ray lands on the pivot for every camera (odd resolution: a centre pixel).
    origins, dirs = generate_rays(cameras, 5)
    to_pivot = torch.tensor(TALK3D_RIG.pivot, dtype=dtype) - origins[:, 12]
    tol = TIGHT if dtype == torch.float64 else LOOSE
    torch.testing.assert_close(dirs[:, 12], to_pivot / to_pivot.norm(dim=-1, keepdim=True), **tol)


# ---------------------------------------------------------------- mutation audit (2026-12-07)


def test_ray_box_limits_grazing_an_edge_is_a_miss():
    """A ray that only touches the cube's edge (x = z = 0.5) enters and leaves it at the same depth:
    a segment of zero length is a miss (hit False, t_start = t_end = 0), as the docstring says. A ray
    lying in the face plane z = 0.5 runs along the face for a positive length: a hit. Directions
    need not be unit here, so the crossing depths are exact binary numbers (0.5)."""
    origins = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 0.0, 0.5]]], **F64)
    dirs = torch.tensor([[[1.0, 0.0, -1.0], [1.0, 0.0, 0.0]]], **F64)
    t_start, t_end, hit = ray_box_limits(origins, dirs, 1.0)
    assert hit[0, :, 0].tolist() == [False, True]
    assert t_start[0, :, 0].tolist() == [0.0, 0.0] and t_end[0, :, 0].tolist() == [0.0, 0.5]


def test_camera_to_yaw_pitch_refuses_a_camera_facing_away_from_the_pivot():
    """The aim check wants the pivot IN FRONT of the camera: a camera at (0, 0, 2.7) looking along
    +z has FFHQ's pivot (0, 0, 0.2) on its optical axis, but behind it."""
    rotation = [[-1, 0, 0], [0, -1, 0], [0, 0, 1]]  # right -x, down -y, forward +z: a proper rotation
    away = make_camera_label(pose(rotation, [0.0, 0.0, 2.7]), normalized_intrinsics(torch.tensor([4.2647], **F64)))
    with pytest.raises(ValueError, match="with the pivot behind"):
        camera_to_yaw_pitch(away, FFHQ_RIG)
    yaw, pitch, radius = camera_to_yaw_pitch(away, FFHQ_RIG, check_aim=False)
    assert (yaw.item(), pitch.item(), radius.item()) == (0.0, 0.0, 2.7)


# float32 rotations within 1e-5 of gimbal lock, carrying the rounding of a few matrix products
# (~1e-7 per entry): the locked decomposition (roll 0, the turn in yaw) reproduces them to about
# 2 cos(pitch) = 2e-5 (measured 2.0e-5); splitting yaw and roll from those noisy O(1e-5) entries
# instead misses by about 1e-2 (measured 1.4e-2 on one draw).
NEAR_LOCK_ATOL = 1e-4


def test_euler_near_gimbal_lock_float32_reproduces_rotation():
    """Near gimbal lock in float32 (cos(pitch) = 1e-5, under sqrt(eps) = 3.5e-4), rotation_to_euler
    takes the locked branch (roll 0), so that euler_to_rotation reproduces a rotation whose entries
    carry rounding noise (here: Q^T (Q R) with a random rotation Q)."""
    n = 64
    rand = lambda lo, hi: torch.rand(n) * (hi - lo) + lo  # noqa: E731
    for sign in (1, -1):
        pitch = torch.full((n,), sign * (math.pi / 2 - 1e-5), **F64).float()
        rotation = euler_to_rotation(rand(-3, 3), pitch, rand(-3, 3))
        q = euler_to_rotation(rand(-3, 3), rand(-1.4, 1.4), rand(-3, 3))
        noisy = q.transpose(1, 2) @ (q @ rotation)
        yaw2, pitch2, roll2 = rotation_to_euler(noisy)
        torch.testing.assert_close(euler_to_rotation(yaw2, pitch2, roll2), noisy, atol=NEAR_LOCK_ATOL, rtol=0)
        assert not roll2.any()
