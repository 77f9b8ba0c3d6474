"""Head pose from 2-D landmarks: our own perspective-n-point fit, then EG3D camera labels.

Model: a rigid 3-D landmark template X (world frame of the dataset: +y up, face towards +z,
subject's right at -x) rotated by the head rotation R about the origin and translated, seen by the
crop's pinhole camera with the rig's intrinsics (focal ``rig.focal * S``, centre S/2):

    p_cam = M R X + t,   M = world -> camera rotation of the rig's frontal camera (about
                         diag(1, -1, -1); TALK3D_RIG's looks 1.1 deg up at its raised pivot),
    (u, v) = f (p_cam.x, p_cam.y) / p_cam.z + S/2.

R and t are fitted by Levenberg-Marquardt on the weighted reprojection error, all frames in one
batch (numpy; six parameters a frame). The head rotation R is then the pose (yaw, pitch, roll
with R = R_y R_x R_z, :func:`talk3d.render.cameras.rotation_to_euler`) and the camera label is
:func:`talk3d.data.synthetic.head_cameras` of it: the head fixed, the camera orbiting the rig's
pivot, exactly as the synthetic head's dataset is made.
"""
from __future__ import annotations

import numpy as np
import torch

from ..data.synthetic import head_cameras
from ..render.cameras import TALK3D_RIG, CameraRig, rotation_to_euler

__all__ = ["GENERIC_TEMPLATE", "POSE_WEIGHTS", "solve_pnp", "estimate_pose", "rotvec_to_matrix",
           "frontal_view"]

# A generic adult face in millimetres (world axes as above; origin between the eyes). Proportions
# from anthropometric averages: outer eye corners 92 mm apart, inner 32 mm; nose tip 34 mm below
# and 30 mm in front of the eye line; mouth corners 50 mm apart, 70 mm below; chin 118 mm below;
# the jaw line recedes to ~75 mm behind the eye plane at the ears.
_HALF = {  # subject's right half (x <= 0); the left half mirrors it
    "jaw": [(-72, -8, -75), (-71, -28, -70), (-68, -48, -63), (-63, -67, -55), (-55, -84, -43),
            (-44, -98, -30), (-31, -109, -17), (-16, -116, -8)],
    "brow": [(-58, 22, -18), (-47, 29, -6), (-34, 31, 0), (-21, 29, 3), (-10, 24, 5)],
    # 36 outer corner, 37, 38 upper lid, 39 inner corner, 40, 41 lower lid
    "eye": [(-46, 0, -10), (-37, 4, -5), (-26, 4, -4), (-16, 0, -6), (-26, -4, -5), (-37, -4, -6)],
}


def _generic_template() -> np.ndarray:
    """[68, 3] iBUG-68 template in mm."""
    pts = np.zeros((68, 3))
    jaw = np.array(_HALF["jaw"], float)
    pts[0:8] = jaw
    pts[8] = (0, -118, -5)
    pts[9:17] = (jaw * [-1, 1, 1])[::-1]
    brow = np.array(_HALF["brow"], float)
    pts[17:22] = brow
    pts[22:27] = (brow * [-1, 1, 1])[::-1]
    pts[27:31] = [(0, 2, 8), (0, -10, 15), (0, -22, 22), (0, -34, 30)]  # bridge down to the tip
    pts[31:36] = [(-14, -44, 10), (-7, -46, 15), (0, -48, 17), (7, -46, 15), (14, -44, 10)]
    eye = np.array(_HALF["eye"], float)
    pts[36:42] = eye
    # Left eye 42 inner corner, 43, 44 upper lid, 45 outer corner, 46, 47 lower lid: the mirror
    # of the right eye's 39, 38, 37, 36, 41, 40.
    pts[42:48] = eye[[3, 2, 1, 0, 5, 4]] * [-1, 1, 1]
    pts[48:60] = [(-25, -70, -3), (-16, -65, 4), (-6, -62, 8), (0, -63, 9), (6, -62, 8),
                  (16, -65, 4), (25, -70, -3), (16, -77, 3), (6, -80, 6), (0, -81, 7),
                  (-6, -80, 6), (-16, -77, 3)]
    pts[60:68] = [(-21, -70, -1), (-8, -68, 6), (0, -68, 7), (8, -68, 6), (21, -70, -1),
                  (8, -72, 6), (0, -72, 7), (-8, -72, 6)]
    return pts


#: [68, 3] generic template, mm.
GENERIC_TEMPLATE = _generic_template()


def _pose_weights() -> np.ndarray:
    """[68] weights of the landmarks in the fit: the rigid ones count most."""
    w = np.zeros(68)
    w[27:36] = 1.0  # nose: rigid and the strongest cue for yaw and pitch
    w[[36, 39, 42, 45]] = 1.0  # eye corners: rigid (the lids are not)
    w[17:27] = 0.5  # brows move with expression
    w[0:17] = 0.25  # jaw: the outline is a silhouette and the chin moves with the mouth
    w[[48, 54]] = 0.25  # mouth corners move with speech
    return w


#: [68] landmark weights of the pose fit.
POSE_WEIGHTS = _pose_weights()


def rotvec_to_matrix(w: np.ndarray) -> np.ndarray:
    """Rodrigues: rotation vectors [N, 3] -> [N, 3, 3]."""
    theta = np.linalg.norm(w, axis=-1)[:, None, None]
    k = np.zeros((w.shape[0], 3, 3))
    k[:, 0, 1], k[:, 0, 2], k[:, 1, 2] = -w[:, 2], w[:, 1], -w[:, 0]
    k = k - k.transpose(0, 2, 1)
    small = theta < 1e-8
    t = np.where(small, 1.0, theta)
    a = np.where(small, 1.0, np.sin(t) / t)
    b = np.where(small, 0.5, (1 - np.cos(t)) / t**2)
    return np.eye(3) + a * k + b * (k @ k)


def frontal_view(rig: CameraRig = TALK3D_RIG) -> np.ndarray:
    """[3, 3] world -> camera rotation of the rig's frontal camera (the one head_cameras moves)."""
    from ..render.cameras import look_at_camera, split_camera_label

    zero = torch.zeros(1, dtype=torch.float64)
    cam2world, _ = split_camera_label(look_at_camera(zero, zero, rig=rig))
    return cam2world[0, :3, :3].T.numpy()


def _project(view, rot, trans, pts, focal, centre):
    """view [3, 3], rot [N, 3, 3] head rotation, trans [N, 3], pts [K, 3] -> pixels [N, K, 2]."""
    cam = np.einsum("ij,njk,mk->nmi", view, rot, pts) + trans[:, None]
    return focal * cam[..., :2] / cam[..., 2:3] + centre


def solve_pnp(points2d: np.ndarray, template: np.ndarray, weights: np.ndarray, focal: float,
              centre: float, view: np.ndarray | None = None, iters: int = 30) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batched weighted PnP by Levenberg-Marquardt.

    Args:
        points2d: [N, K, 2] pixels.
        template: [K, 3] 3-D points (world axes, any unit).
        weights: [K] >= 0.
        focal, centre: pinhole intrinsics in pixels (square pixels, principal point (c, c)).
        view: [3, 3] world -> camera rotation at R = I (None: diag(1, -1, -1), a camera on +z).
    Returns:
        (R [N, 3, 3] head rotation, t [N, 3] in template units, rms [N] weighted reprojection
        error in pixels).
    """
    n = points2d.shape[0]
    view = np.diag([1.0, -1.0, -1.0]) if view is None else view
    sw = np.sqrt(weights)[None, :, None]  # [1, K, 1]
    # Start: frontal, at the depth where the template's spread matches the landmarks'.
    spread3 = np.sqrt((weights * ((template[:, :2] - template[:, :2].mean(0)) ** 2).sum(1)).sum())
    d2 = points2d - points2d.mean(1, keepdims=True)
    spread2 = np.sqrt((weights[None] * (d2 ** 2).sum(-1)).sum(-1))
    z = focal * spread3 / np.maximum(spread2, 1e-9)
    mean2 = points2d.mean(1)
    trans = np.stack([(mean2[:, 0] - centre) * z / focal, (mean2[:, 1] - centre) * z / focal, z], 1)
    trans -= (view @ template.mean(0))[None] * [1, 1, 0]
    rot = np.repeat(np.eye(3)[None], n, 0)
    lam = np.full(n, 1e-3)

    def residual(r, t):
        return ((_project(view, r, t, template, focal, centre) - points2d) * sw).reshape(n, -1)

    res = residual(rot, trans)
    cost = (res ** 2).sum(1)
    scale = np.concatenate([np.ones(3), z.mean() / 10 * np.ones(3)])  # step sizes per parameter
    for _ in range(iters):
        # Numerical Jacobian: 6 parameters (left-multiplied rotation vector, translation).
        jac = np.empty(res.shape + (6,))
        for j in range(6):
            d = np.zeros((n, 6))
            d[:, j] = 1e-6 * scale[j]
            r2 = rotvec_to_matrix(d[:, :3]) @ rot
            jac[..., j] = (residual(r2, trans + d[:, 3:]) - res) / d[:, j:j + 1]
        jtj = jac.transpose(0, 2, 1) @ jac
        jtr = np.einsum("nkj,nk->nj", jac, res)
        damp = lam[:, None, None] * (np.diagonal(jtj, axis1=1, axis2=2)[:, :, None]
                                     * np.eye(6) + 1e-12 * np.eye(6))
        step = -np.linalg.solve(jtj + damp, jtr[..., None])[..., 0]
        r_new = rotvec_to_matrix(step[:, :3]) @ rot
        t_new = trans + step[:, 3:]
        res_new = residual(r_new, t_new)
        cost_new = (res_new ** 2).sum(1)
        better = (cost_new < cost) & (t_new[:, 2] > 0)
        rot = np.where(better[:, None, None], r_new, rot)
        trans = np.where(better[:, None], t_new, trans)
        res = np.where(better[:, None], res_new, res)
        cost = np.where(better, cost_new, cost)
        lam = np.where(better, lam / 3, lam * 4)
    # Re-orthonormalise (numerical drift of the composed rotations).
    u, _, vt = np.linalg.svd(rot)
    rot = u @ vt
    rms = np.sqrt(cost / (weights.sum() * 2))
    return rot, trans, rms


def estimate_pose(landmarks: np.ndarray, size: int, *, template: np.ndarray | None = None,
                  weights: np.ndarray | None = None, rig: CameraRig = TALK3D_RIG):
    """Head pose and EG3D cameras from 68 crop-pixel landmarks.

    Args:
        landmarks: [N, 68, 2] crop pixels of S x S crops.
        size: S.
        template: [68, 3] 3-D landmarks (None: :data:`GENERIC_TEMPLATE`).
        weights: [68] (None: :data:`POSE_WEIGHTS`).
    Returns:
        dict(pose [N, 3] float32 yaw, pitch, roll radians; cameras [N, 25] float32 EG3D labels;
        rms [N] float32 reprojection error, pixels).
    """
    template = GENERIC_TEMPLATE if template is None else np.asarray(template, dtype=np.float64)
    weights = POSE_WEIGHTS if weights is None else np.asarray(weights, dtype=np.float64)
    rot, _, rms = solve_pnp(np.asarray(landmarks, np.float64), template, weights,
                            rig.focal * size, size / 2, frontal_view(rig))
    yaw, pitch, roll = rotation_to_euler(torch.from_numpy(rot))
    pose = torch.stack([yaw, pitch, roll], 1).numpy().astype(np.float32)
    return dict(pose=pose, cameras=head_cameras(pose, rig).numpy(), rms=rms.astype(np.float32))
