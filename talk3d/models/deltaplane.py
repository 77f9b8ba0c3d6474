"""Talk3D's audio-guided attention U-Net: identity triplane + condition tokens -> deltaplane.

Layout. Inside the network the three planes live side by side in the channel axis, plane-major:
``[B, 3 * c, H, W]`` with plane ``j`` at channels ``j*c .. (j+1)*c``. Every convolution is a grouped
convolution with ``groups=3`` (the paper's split convolution: one branch, with its own weights, per
plane, in one kernel launch), and every GroupNorm has ``3 * norm_groups`` groups so no group straddles
two planes. Planes therefore only meet in :class:`RollOut` (and not at all when ``cfg.rollout`` is off:
self-attention runs within each plane and cross-attention reads only the condition tokens).

Roll-out blending (Rodin's 3D-aware convolution, derived for our plane conventions). Plane ``j`` reads
the world axes ``PLANE_AXES[axes][j] = (a_w, a_h)``: its width (last tensor axis) indexes world axis
``a_w`` and its height indexes ``a_h``. For each other plane ``k`` and each world axis ``a`` that both
planes read, plane ``k`` is averaged over its image axis that does *not* index ``a`` (the axis plane
``j`` has no notion of), giving a vector along ``a``; that vector is laid along plane ``j``'s image
axis indexing ``a`` and repeated along the other one. Writing ``k:H`` for "average plane k over its
height", ``->W`` for "lay along plane j's width":

- ``fixed`` ((x,y), (x,z), (z,y)): every pair shares exactly one world axis.
  plane 0 (W=x, H=y): from 1 (W=x, H=z) share x: ``1:H -> W``; from 2 (W=z, H=y) share y: ``2:W -> H``.
  plane 1 (W=x, H=z): from 0 share x: ``0:H -> W``; from 2 share z: ``2:H`` (a vector along z, 2's width)
  ``-> H`` (z is plane 1's height: the roll-out transposes it).
  plane 2 (W=z, H=y): from 0 share y: ``0:W -> H``; from 1 share z: ``1:W`` (along z, 1's height) ``-> W``.
- ``eg3d`` ((x,y), (x,z), (z,x)): planes 1 and 2 both read x and z (the release's third plane re-reads x
  and no plane reads (y, z)), so that pair shares *two* axes and contributes the sum of two broadcasts.
  plane 0 (W=x, H=y): from 1 share x: ``1:H -> W``; from 2 (W=z, H=x) share x: ``2:W`` (along x) ``-> W``.
  plane 1 (W=x, H=z): from 0 share x: ``0:H -> W``; from 2 share x and z: ``2:W -> W`` plus ``2:H -> H``.
  plane 2 (W=z, H=x): from 0 share x: ``0:H`` (along x, 0's width) ``-> H``; from 1 share x and z:
  ``1:H -> H`` plus ``1:W -> W``.

Each block's input for plane ``j`` is then ``[own c channels, from k1, from k2]`` (``k1 < k2`` the other
two planes), ``3 * c`` channels, so every plane's branch has the same shape under both conventions.
:class:`RollOut` builds it; the blocks never do: :class:`RolledConv` computes the block's first
convolution of it from the plane's own channels and 1-D convolutions of the pooled vectors.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.reference.triplane_field import PLANE_AXES
from .attention import TransformerBlock, plane_positional_encoding
from .tokens import ConditionEncoder
from .unet_config import DeltaplaneConfig

#: Image axes of a plane, as indices into its (H, W) shape.
H_AXIS, W_AXIS = 0, 1


def rollout_plan(axes: str) -> tuple[tuple[tuple[int, tuple[tuple[int, int], ...]], ...], ...]:
    """The roll-out wiring derived in the module docstring.

    Returns:
        ``plan[j]`` = ``((k, ((pool_axis, lay_axis), ...)), ...)`` for the two other planes ``k`` in
        ascending order: average plane ``k`` over its image axis ``pool_axis`` and lay the resulting
        vector along plane ``j``'s image axis ``lay_axis`` (:data:`H_AXIS` / :data:`W_AXIS`).
    """
    if axes not in PLANE_AXES:
        raise ValueError(f"axes must be one of {sorted(PLANE_AXES)}, got {axes!r}")
    pairs = PLANE_AXES[axes]

    def image_axis(pair: tuple[int, int], world: int) -> int:
        return W_AXIS if pair[0] == world else H_AXIS  # (width, height) order, as grid_sample reads it

    plan = []
    for j, pj in enumerate(pairs):
        sources = []
        for k, pk in enumerate(pairs):
            if k == j:
                continue
            shared = [a for a in pk if a in pj]
            if not shared:  # two distinct planes of three world axes always share one; guard new conventions
                raise ValueError(f"axes {axes!r}: planes {j} and {k} share no world axis, roll-out undefined")
            # Pool k over the image axis that does not index the shared world axis.
            sources.append((k, tuple((1 - image_axis(pk, a), image_axis(pj, a)) for a in shared)))
        plan.append(tuple(sources))
    return tuple(plan)


class RollOut(nn.Module):
    """``[B, 3 * c, R, R]`` -> ``[B, 3 * 3c, R, R]``: each plane's features followed by the axis-pooled
    features of the other two, broadcast along the world axis they share (see the module docstring)."""

    def __init__(self, axes: str):
        super().__init__()
        self.plan = rollout_plan(axes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[B, 3 * c, R, R]`` (square planes) -> ``[B, 9 * c, R, R]``."""
        B, C3, H, W = x.shape
        planes = x.view(B, 3, C3 // 3, H, W)
        # means[k][pool_axis]: plane k averaged over H -> [B, c, W], over W -> [B, c, H].
        means = [(planes[:, k].mean(dim=-2), planes[:, k].mean(dim=-1)) for k in range(3)]
        out = []
        for j in range(3):
            parts = [planes[:, j]]
            for k, links in self.plan[j]:
                blended = 0
                for pool_axis, lay_axis in links:
                    vec = means[k][pool_axis]  # [B, c, R] along the shared world axis
                    blended = blended + (vec[:, :, None, :] if lay_axis == W_AXIS else vec[:, :, :, None])
                parts.append(blended.expand(B, C3 // 3, H, W))
            out.append(torch.cat(parts, dim=1))  # [B, 3c, H, W]
        return torch.cat(out, dim=1)


class RolledConv(nn.Module):
    """``conv(RollOut(x))`` for a per-plane 3x3 convolution, without building the roll-out.

    Each plane's input is ``[own c, from k1, from k2]`` and the convolution is linear, so it splits
    into a convolution of the plane's own channels plus the convolution of each broadcast part. A
    part is a vector ``v`` repeated along one image axis, and so is its convolution, but for the
    zero padding: laid along the width, output row ``h`` sums the kernel rows ``dy`` that land
    inside the image, ``sum_dy [0 <= h + dy - 1 < H] conv1d_w(v, K[dy])``. That is the full sum
    (every ``dy``) broadcast along the height, minus ``K[0]``'s term on the first row and ``K[2]``'s
    on the last; likewise along the height with ``dx`` and columns.

    What that saves: the roll-out triples the convolution's input (``3 c`` channels a plane), so the
    ``[B, 9c, H, W]`` concatenation (302 MB at the decoder's 256^2 level, batch 2, fp32), its copy
    saved for the backward, and 2/3 of the convolution's work go; the broadcast parts cost 1-D
    convolutions of length R. The weight is the block's own ``plane_conv(3 cin, cout)``'s (or a
    slice of it), so the parameters and checkpoints are those of ``RollOut`` + conv.
    """

    def __init__(self, axes: str):
        super().__init__()
        # The broadcast parts of every plane j: (j, source plane k, the part's slot in j's input (1 or
        # 2), the axis k is averaged over, the axis of j the vector is laid along).
        self.links = [(j, k, slot, pool, lay) for j, sources in enumerate(rollout_plan(axes))
                      for slot, (k, links) in enumerate(sources, start=1) for pool, lay in links]
        L = len(self.links)
        # Gathers and sums as products with 0/1 matrices: a handful of operations (the training step
        # is partly host-bound on a GPU), and deterministic (index_add_, the backward of a gather,
        # is atomic on CUDA).
        #   pick_vec [L, 6]: link n's vector among (pool axis, plane k);
        #   pick_taps [L, 18]: its kernel slice among (lay axis, plane j, slot);
        #   plane_sums [6, L]: which links each (lay axis, plane j) adds up.
        pick_vec, pick_taps, plane_sums = torch.zeros(L, 6), torch.zeros(L, 18), torch.zeros(6, L)
        for n, (j, k, slot, pool, lay) in enumerate(self.links):
            lay_i = 0 if lay == W_AXIS else 1
            pick_vec[n, (0 if pool == H_AXIS else 1) * 3 + k] = 1.0
            pick_taps[n, lay_i * 9 + j * 3 + slot] = 1.0
            plane_sums[lay_i * 3 + j, n] = 1.0
        for name, t in (("_pick_vec", pick_vec), ("_pick_taps", pick_taps), ("_plane_sums", plane_sums)):
            self.register_buffer(name, t, persistent=False)
        self._masks: dict = {}

    def _padding_masks(self, H: int, W: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[H, 3]`` and ``[3, W]`` of 0/1: whether kernel row dy (column dx) lands inside the image
        for output row h (column w), i.e. ``0 <= h + dy - 1 < H``. Cached per size, device, dtype."""
        key = (H, W, like.device, like.dtype)
        if key not in self._masks:
            def mask(n):
                m = torch.ones(n, 3)
                m[0, 0] = 0.0
                m[n - 1, 2] = 0.0
                return m.to(like.device, like.dtype)
            # Plain tensors even when first made under inference_mode, so that training can use them.
            with torch.inference_mode(False):
                self._masks[key] = (mask(H), mask(W).t().contiguous())
        return self._masks[key]

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x ``[B, 3 * cin, R, R]``, the convolution's weight ``[3 * cout, 3 * cin, 3, 3]`` (groups = 3)
        and bias ``[3 * cout]`` -> ``[B, 3 * cout, R, R]``, equal to ``conv2d(RollOut(x), weight, bias)``."""
        B, _, H, W = x.shape
        co, ci, L = weight.shape[0] // 3, weight.shape[1] // 3, len(self.links)
        weight = weight.view(3, co, 3, ci, 3, 3)  # [plane j, out, slot, in, dy, dx]
        own = F.conv2d(x, weight[:, :, 0].reshape(3 * co, ci, 3, 3), bias, padding=1, groups=3)
        planes = x.view(B, 3, ci, H, W)
        # Every plane's two pooled vectors, [B, 6 (pool axis, plane), ci * R], then each link's.
        means = torch.stack([planes.mean(dim=-2), planes.mean(dim=-1)], dim=1).reshape(B, 6, -1)
        vecs = torch.matmul(self._pick_vec.to(x.dtype), means).view(B, L * ci, -1)  # [B, L * ci, R]
        # Laid along the width, a part convolves along w with one row of taps per dy; along the
        # height, along h with one column per dx: [2 (lay axis), j, slot, 3 (dy | dx), co, ci, 3].
        taps = torch.stack([weight.permute(0, 2, 4, 1, 3, 5), weight.permute(0, 2, 5, 1, 3, 4)])
        taps = torch.matmul(self._pick_taps.to(weight.dtype), taps.reshape(18, -1))  # [L, 3 * co * ci * 3]
        g = F.conv1d(vecs, taps.view(L * 3 * co, ci, 3).to(vecs.dtype), padding=1, groups=L)  # [B, L * 3 * co, R]
        # Each plane's parts laid along the width (rows) and along the height (cols), summed:
        # [B, 6 (lay axis, plane), 3 (dy | dx) * co * R].
        sums = torch.matmul(self._plane_sums.to(g.dtype), g.view(B, L, -1)).view(B, 2, 3, 3, co, -1)
        mh, mw = self._padding_masks(H, W, g)
        # Row h of a width-laid part sums the dy whose kernel row lands inside the image (mh), and
        # column w of a height-laid one the dx (mw).
        rows = torch.matmul(mh, sums[:, 0].permute(0, 1, 3, 2, 4))  # [B, 3, co, H, W]
        cols = torch.matmul(sums[:, 1].permute(0, 1, 3, 4, 2), mw)  # [B, 3, co, H, W]
        return (own.view(B, 3, co, H, W) + rows + cols).view(B, 3 * co, H, W)


def plane_conv(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Conv2d:
    """Per-plane convolution ``[B, 3 * cin, H, W] -> [B, 3 * cout, H / stride, W / stride]`` (groups = 3)."""
    return nn.Conv2d(3 * cin, 3 * cout, kernel, stride=stride, padding=kernel // 2, groups=3)


#: ``TALK3D_FEW_OPS=1`` / ``0`` forces :func:`few_ops` either way (to time both forms on one machine).
FEW_OPS_ENV = os.environ.get("TALK3D_FEW_OPS", "")


def few_ops(x: torch.Tensor) -> bool:
    """Whether to prefer fewer PyTorch operations over fewer multiply-adds: on a GPU.

    The release-size training step on an H200 was partly host-bound (55 ms of device time in 64,
    2026-12-04), each operation costing host time whatever its size; the CPU is compute-bound.
    Where a cheaper form needs more operations (the phase-split upsampling convolution, the
    decoder's skip convolved apart in training), the GPU keeps the plain one. Both forms are exact
    and tested; which is faster on a GPU is still to be measured (``TALK3D_FEW_OPS``).
    """
    if FEW_OPS_ENV in ("0", "1"):
        return FEW_OPS_ENV == "1"
    return x.is_cuda


def _phase_taps(k: torch.Tensor, dim: int) -> torch.Tensor:
    """3 taps along ``dim`` of ``k`` -> ``[2 (phase), ..., 2 (taps), ...]``: after a 2x nearest
    upsampling, output phase 0 reads the low-resolution rows (i - 1, i) with taps (k0, k1 + k2), and
    phase 1 the rows (i, i + 1) with taps (k0 + k1, k2)."""
    k0, k1, k2 = k.unbind(dim)
    return torch.stack([torch.stack([k0, k1 + k2], dim), torch.stack([k0 + k1, k2], dim)])


def upsample_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(interpolate(x, scale_factor=2, mode="nearest"))`` for a 3x3, padding-1 ``conv`` (any groups).

    x ``[B, Cin, H, W]`` -> ``[B, Cout, 2H, 2W]``. Each of the four output phases ``(a, b)`` (row
    parity, column parity) sees every low-resolution pixel twice along each axis, so it is a 2x2
    convolution of ``x`` whose taps are sums of the 3x3 kernel's (:func:`_phase_taps`). All four run as
    one 2x2 convolution with ``4 Cout`` outputs over ``x`` padded by one, phase ``(a, b)`` read at offset
    ``(a, b)``: 16 multiply-adds an input pixel and output channel instead of 36, and no 4x-sized
    upsampled copy of the input. On a GPU (:func:`few_ops`) the plain form: 11 operations forward and
    backward against 78.
    """
    if few_ops(x):
        return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    B, _, H, W = x.shape
    g = conv.groups
    O, I = conv.weight.shape[0] // g, conv.weight.shape[1]
    k = conv.weight.view(g, O, I, 3, 3)
    k2 = _phase_taps(_phase_taps(k, -2), -1)  # [b, a, g, O, I, 2, 2]: phase (a, b)'s 2x2 kernel
    k2 = k2.permute(2, 1, 0, 3, 4, 5, 6).reshape(g * 4 * O, I, 2, 2)  # output channels (g, a, b, O)
    bias = None if conv.bias is None else conv.bias.view(g, 1, O).expand(g, 4, O).reshape(-1)
    y = F.conv2d(x, k2.to(x.dtype), None if bias is None else bias.to(x.dtype), padding=1, groups=g)
    y = y.view(B, g, 2, 2, O, H + 1, W + 1)
    # Interleave: output (2i + a, 2j + b) is phase (a, b) at (i + a, j + b). [B, g, O, H, 2 (a), W, 2 (b)]
    out = torch.stack([torch.stack([y[:, :, a, b, :, a:a + H, b:b + W] for b in (0, 1)], dim=-1) for a in (0, 1)],
                      dim=-3)
    return out.reshape(B, g * O, 2 * H, 2 * W)


def plane_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm over ``[B, 3 * channels, H, W]`` whose groups stay within one plane."""
    return nn.GroupNorm(3 * groups, 3 * channels)


def cat_planes(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-plane channel concat: a ``[B, 3 * ca, H, W]``, b ``[B, 3 * cb, H, W]`` -> ``[B, 3 * (ca + cb), H, W]``."""
    B, _, H, W = a.shape
    return torch.cat([a.view(B, 3, -1, H, W), b.view(B, 3, -1, H, W)], dim=2).view(B, -1, H, W)


class PlaneBlock(nn.Module):
    """Residual block per plane: [roll-out] -> conv -> GN -> SiLU -> conv -> GN, + skip, -> SiLU.

    A decoder block's input is the per-plane concatenation of the upsampled features and the
    encoder's skip (:func:`cat_planes`). It is never built: the first convolution and the 1x1 skip
    convolution are linear in their input, so each part is convolved with its slice of the weights
    and the results added. At inference the encoder's skip is one ``[1, ...]`` tensor for every
    frame, so its share is computed once at batch 1 and broadcast.
    """

    def __init__(self, cin: int, cout: int, norm_groups: int, axes: str, rollout: bool):
        super().__init__()
        self.rollout = RolledConv(axes) if rollout else None  # applied with conv1: conv1(RollOut(x))
        self.conv1 = plane_conv(3 * cin if rollout else cin, cout)
        self.norm1 = plane_norm(cout, norm_groups)
        self.conv2 = plane_conv(cout, cout)
        self.norm2 = plane_norm(cout, norm_groups)
        self.skip = nn.Identity() if cin == cout else plane_conv(cin, cout, kernel=1)

    @staticmethod
    def _split(weight: torch.Tensor, widths: list[int], slots: int) -> list[torch.Tensor]:
        """A per-plane conv weight ``[3 cout, slots * sum(widths), k, k]`` (its per-plane input:
        ``slots`` copies of the parts' channels) -> one weight ``[3 cout, slots * w, k, k]`` per part."""
        co3, _, kh, kw = weight.shape
        w = weight.view(co3, slots, sum(widths), kh, kw)
        return [t.reshape(co3, slots * t.shape[2], kh, kw) for t in w.split(widths, dim=2)]

    def _conv1_part(self, part: torch.Tensor, n: int, widths: list[int]) -> torch.Tensor:
        """Input ``n``'s share of the first convolution (with the roll-out; the bias goes with input 0)."""
        slots = 3 if self.rollout is not None else 1  # the roll-out adds two planes' worth of channels
        weight = self._split(self.conv1.weight, widths, slots)[n]
        bias = self.conv1.bias if n == 0 else None
        if self.rollout is not None:
            return self.rollout(part, weight, bias)
        return F.conv2d(part, weight, bias, padding=1, groups=3)

    def _skip_part(self, part: torch.Tensor, n: int, widths: list[int]) -> torch.Tensor:
        """Input ``n``'s share of the 1x1 skip convolution (the bias goes with input 0)."""
        weight = self._split(self.skip.weight, widths, 1)[n]
        return F.conv2d(part, weight, self.skip.bias if n == 0 else None, groups=3)

    def _widths(self, cx: int, skip: torch.Tensor | None, with_skip: bool) -> list[int]:
        """Channels a plane of the block's inputs (the upsampled features, then the skip's, if any)."""
        cin = self.conv1.weight.shape[1] // (3 if self.rollout is not None else 1)
        widths = [cx, cin - cx] if with_skip else [cx]
        if widths[-1] < 1 or (not with_skip and cx != cin) or (skip is not None and skip.shape[1] // 3 != widths[1]):
            got = [cx] + ([] if skip is None else [skip.shape[1] // 3])
            raise ValueError(f"PlaneBlock: inputs of {got} channels a plane do not add up to the block's {cin}")
        return widths

    def skip_share(self, x_channels: int, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder skip's share of a decoder block (see :meth:`forward`'s ``share``), for an
        upsampled input of ``x_channels`` channels a plane: two ``[1 or B, 3 * cout, H, W]``."""
        if isinstance(self.skip, nn.Identity):
            raise ValueError("PlaneBlock: a block without a skip convolution has no separable skip share")
        widths = self._widths(x_channels, skip, True)
        return self._conv1_part(skip, 1, widths), self._skip_part(skip, 1, widths)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None,
                share: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x ``[B, 3 * cx, H, W]``, skip ``[B or 1, 3 * cs, H, W]`` or None (then cx = cin, else
        cx + cs = cin: the block reads ``cat_planes(x, skip)``) -> ``[B, 3 * cout, H, W]``.

        ``share``: :meth:`skip_share` of the skip, computed earlier (inference computes it once for
        every frame), in place of ``skip``.
        """
        identity = isinstance(self.skip, nn.Identity)
        if skip is not None and (identity or skip.shape[0] == x.shape[0] or (few_ops(x) and torch.is_grad_enabled())):
            # A skip of the batch's size, training on a GPU, or a block whose residual is its input:
            # one convolution of the concatenation (half the operations of convolving the parts
            # apart; the batch-1 skip's share, computed once, is what inference caches).
            x, skip = cat_planes(x, skip.expand(x.shape[0], -1, -1, -1)), None
        if skip is not None:
            share = self.skip_share(x.shape[1] // 3, skip)
        if share is not None and identity:
            raise ValueError("PlaneBlock: a block without a skip convolution takes no skip share")
        widths = self._widths(x.shape[1] // 3, None, share is not None)
        h = self._conv1_part(x, 0, widths)
        residual = x if identity else self._skip_part(x, 0, widths)
        if share is not None:
            h, residual = h + share[0], residual + share[1]
        h = F.silu(self.norm1(h))
        return F.silu(self.norm2(self.conv2(h)) + residual)


class DeltaplanePredictor(nn.Module):
    """The U-Net F: ``ΔP = F(P_ID, t)``; the caller renders ``P_ID + ΔP``.

    Encoder: level 0 is a :class:`PlaneBlock` ``C -> channels[0]`` at R^2; level i halves the resolution
    (stride-2 per-plane conv) and maps ``channels[i-1] -> channels[i]``. Bottleneck: ``attention_blocks``
    :class:`TransformerBlock` on the ``3 * r^2`` plane tokens (``channels[-1]`` wide, 3-D sinusoidal
    positions added once, eq. 4). Decoder: nearest upsampling + conv back to each level, concat with the
    encoder's skip, a :class:`PlaneBlock`; a zero-initialised per-plane conv to C channels, so the
    deltaplane is exactly 0 at initialisation.
    """

    def __init__(self, cfg: DeltaplaneConfig):
        super().__init__()
        self.cfg = cfg
        ch, g, axes, ro = cfg.channels, cfg.norm_groups, cfg.axes, cfg.rollout
        self.enc = nn.ModuleList([PlaneBlock(cfg.plane_channels, ch[0], g, axes, ro)])
        self.down = nn.ModuleList()
        for i in range(1, len(ch)):
            self.down.append(plane_conv(ch[i - 1], ch[i - 1], stride=2))
            self.enc.append(PlaneBlock(ch[i - 1], ch[i], g, axes, ro))
        self.attn = nn.ModuleList([TransformerBlock(ch[-1], cfg.head_dim, cfg.token_dim, cfg.ff_mult,
                                                    per_plane=cfg.per_plane_attention)
                                   for _ in range(cfg.attention_blocks)])
        r = cfg.bottleneck_resolution
        self.register_buffer("pos_enc", plane_positional_encoding(axes, r, ch[-1]), persistent=False)  # [3, r*r, D]
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in reversed(range(len(ch) - 1)):
            self.up.append(plane_conv(ch[i + 1], ch[i]))
            self.dec.append(PlaneBlock(2 * ch[i], ch[i], g, axes, ro))
        self.out_norm = plane_norm(ch[0], g)
        self.out_conv = plane_conv(ch[0], cfg.plane_channels)
        # Zero init: training starts from the identity triplane itself (P_ID + 0).
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    def _check(self, planes: torch.Tensor, tokens: torch.Tensor, key_padding_mask: torch.Tensor | None):
        cfg = self.cfg
        C, R = cfg.plane_channels, cfg.plane_resolution
        ok5 = planes.dim() == 5 and tuple(planes.shape[1:]) == (3, C, R, R)
        ok4 = planes.dim() == 4 and tuple(planes.shape[1:]) == (3 * C, R, R)
        if not (ok5 or ok4) or not planes.is_floating_point():
            raise ValueError(f"planes: expected a float [B, 3, {C}, {R}, {R}] or [B, {3 * C}, {R}, {R}] tensor, "
                             f"got {planes.dtype} {tuple(planes.shape)}")
        B = planes.shape[0]
        if tokens.dim() != 3 or tokens.shape[0] != B or tokens.shape[2] != cfg.token_dim or tokens.shape[1] < 1:
            raise ValueError(f"tokens: expected [B={B}, T>=1, {cfg.token_dim}], got {tuple(tokens.shape)}")
        if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                             or tuple(key_padding_mask.shape) != tuple(tokens.shape[:2])):
            raise ValueError(f"key_padding_mask: expected a bool [{B}, {tokens.shape[1]}] tensor, "
                             f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")

    def encode(self, planes: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The encoder half, which depends on P_ID alone (so inference can compute it once).

        planes ``[B, 3C, R, R]`` -> (bottleneck ``[B, 3 D, r, r]``, skips: one ``[B, 3 c_i, R_i, R_i]``
        per decoder level, shallowest first).
        """
        x = self.enc[0](planes)
        skips = [x]
        for down, block in zip(self.down, self.enc[1:]):
            x = block(down(x))
            skips.append(x)
        skips.pop()  # the bottleneck has no skip of its own
        return x, skips

    def skip_shares(self, skips: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each decoder block's share of its encoder skip (:meth:`PlaneBlock.skip_share`), in the
        decoder's order: what :meth:`decode` takes as ``shares`` when the skips are fixed (inference
        on one P_ID), so each block convolves only the upsampled features per frame."""
        ch = self.cfg.channels
        return [block.skip_share(ch[i], skip) for block, i, skip in
                zip(self.dec, reversed(range(len(ch) - 1)), reversed(skips))]

    def decode(self, x: torch.Tensor, skips: list[torch.Tensor], tokens: torch.Tensor,
               key_padding_mask: torch.Tensor | None = None,
               shares: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """Attention at the bottleneck (where the tokens enter) and the decoder.

        x, skips: :meth:`encode`'s output with batch B or 1 (broadcast over the tokens' B);
        tokens ``[B, T, token_dim]`` -> ΔP ``[B, 3C, R, R]``. ``shares``: :meth:`skip_shares` of
        ``skips``, when computed earlier.
        """
        B = tokens.shape[0]
        x = x.expand(B, -1, -1, -1)
        _, C3, r, _ = x.shape
        seq = x.reshape(B, 3, C3 // 3, r * r).transpose(2, 3) + self.pos_enc.to(x.dtype)  # [B, 3, r*r, D]
        for block in self.attn:
            seq = block(seq, tokens, key_padding_mask)
        x = seq.transpose(2, 3).reshape(B, C3, r, r)
        skips = list(skips)
        for n, (up, block) in enumerate(zip(self.up, self.dec)):
            x = upsample_conv(x, up)  # = up(nearest 2x upsampling of x)
            skip = skips.pop()
            # the block of cat_planes(x, skip); a batch-1 skip (or its share) is broadcast
            x = block(x, share=shares[n]) if shares is not None else block(x, skip)
        return self.out_conv(F.silu(self.out_norm(x)))  # [B, 3C, R, R]

    def forward(self, planes: torch.Tensor, tokens: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None,
                encoded: tuple[torch.Tensor, list[torch.Tensor]] | None = None) -> torch.Tensor:
        """Predict the deltaplane.

        Args:
            planes: ``[B, 3, C, R, R]`` or ``[B, 3 * C, R, R]`` identity triplane P_ID (one P_ID
                expanded along the batch is encoded once).
            tokens: ``[B, T, token_dim]`` condition tokens (:class:`ConditionEncoder`).
            key_padding_mask: optional ``[B, T]`` bool, True for tokens to ignore.
            encoded: :meth:`encode` of these planes (batch B or 1), computed earlier, optionally
                with :meth:`skip_shares` of its skips as a third item; skips the encoder.
        Returns:
            ΔP, the same shape as ``planes``.
        """
        self._check(planes, tokens, key_padding_mask)
        B, R = planes.shape[0], self.cfg.plane_resolution
        if encoded is None:
            flat = planes.reshape(B, -1, R, R)
            # Talk3D feeds every frame the same P_ID, expanded (stride 0 along the batch): the encoder
            # sees it once and the decoder broadcasts it, in training too (autograd sums the frames'
            # gradients through the broadcast, as it would over B copies).
            encoded = self.encode(flat[:1] if B > 1 and flat.stride(0) == 0 else flat)
        delta = self.decode(encoded[0], encoded[1], tokens, key_padding_mask,
                            shares=encoded[2] if len(encoded) > 2 else None)
        return delta.view(planes.shape)


class DeltaplaneModel(nn.Module):
    """:class:`ConditionEncoder` + :class:`DeltaplanePredictor`: ``(P_ID, batch) -> ΔP``."""

    def __init__(self, cfg: DeltaplaneConfig):
        super().__init__()
        self.cfg = cfg
        self.condition = ConditionEncoder(cfg)
        self.predictor = DeltaplanePredictor(cfg)

    def forward(self, planes: torch.Tensor, batch: Mapping[str, torch.Tensor],
                encoded: tuple[torch.Tensor, list[torch.Tensor]] | None = None) -> torch.Tensor:
        """planes ``[B, 3, C, R, R]`` or ``[B, 3C, R, R]``, batch as :meth:`ConditionEncoder.forward`;
        ``encoded``: the predictor's :meth:`DeltaplanePredictor.encode` of P_ID, when cached.

        Returns ΔP, the shape of ``planes``.
        """
        return self.predictor(planes, self.condition(batch), encoded=encoded)
