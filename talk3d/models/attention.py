"""Attention pieces of the deltaplane U-Net's bottleneck and the plane tokens' 3-D positional encoding.

- :func:`attention`: multi-head scaled dot-product attention (``F.scaled_dot_product_attention``) with
  an optional key padding mask.
- :class:`PlaneLinear` / :class:`PlaneLayerNorm`: one ``Linear`` / ``LayerNorm`` per plane, in one op.
- :class:`MultiHeadAttention`: self- (``context=None``) or cross-attention with separate q/k/v projections.
- :class:`GEGLUFeedForward`: ``Linear -> a * GELU(gate) -> Linear`` (Shazeer's GEGLU).
- :class:`TransformerBlock`: pre-norm residual self-attention within each plane, cross-attention of all
  plane tokens to the condition tokens, GEGLU feed-forward; the self-attention, norms and
  feed-forward per plane (the release's) or shared by the planes.
- :func:`plane_positions` / :func:`plane_positional_encoding`: each plane cell's 3-D world position
  under a plane convention, and its sinusoidal encoding.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.reference.triplane_field import PLANE_AXES


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention per head.

    Args:
        q: ``[B, H, L, d]`` queries.
        k: ``[B, H, S, d]`` keys.
        v: ``[B, H, S, dv]`` values.
        key_padding_mask: ``[B, S]`` bool, True where a key is padding (ignored), as
            ``nn.MultiheadAttention``'s; every row must keep at least one key.
    Returns:
        ``[B, H, L, dv]``.
    """
    mask = None
    if key_padding_mask is not None:
        # SDPA's boolean mask means "takes part": invert, and broadcast over heads and queries.
        mask = ~key_padding_mask.to(torch.bool)[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class PlaneLinear(nn.Module):
    """One ``nn.Linear(cin, cout)`` per plane: ``x [B, P, L, cin] -> [B, P, L, cout]``, plane p
    through ``weight[p]`` (``[P, cout, cin]``), each initialised as ``nn.Linear`` initialises its own."""

    def __init__(self, cin: int, cout: int, bias: bool = True, planes: int = 3):
        super().__init__()
        layers = [nn.Linear(cin, cout, bias=bias) for _ in range(planes)]
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in layers]))  # [P, cout, cin]
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in layers])) if bias else None  # [P, cout]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A batched matrix product broadcast over B (einsum permuted x first: 10-20 % slower on the CPU).
        y = torch.matmul(x, self.weight.to(x.dtype).transpose(1, 2))  # [B, P, L, cin] @ [P, cin, cout]
        return y if self.bias is None else y + self.bias.to(y.dtype)[:, None]


class PlaneLayerNorm(nn.Module):
    """One ``nn.LayerNorm(dim)`` per plane over ``x [B, P, L, dim]``."""

    def __init__(self, dim: int, planes: int = 3, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(planes, dim))  # [P, dim]
        self.bias = nn.Parameter(torch.zeros(planes, dim))  # [P, dim]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        return y * self.weight.to(y.dtype)[:, None] + self.bias.to(y.dtype)[:, None]


class MultiHeadAttention(nn.Module):
    """Multi-head attention from ``dim``-wide queries to ``context_dim``-wide keys/values (self when None).

    ``linear`` builds the projections: ``nn.Linear``, or :class:`PlaneLinear` for one set of
    projections per plane (self-attention over ``[B, 3, L, dim]`` plane tokens).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None, linear=nn.Linear):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = linear(dim, inner, bias=False)
        self.to_k = linear(context_dim or dim, inner, bias=False)
        self.to_v = linear(context_dim or dim, inner, bias=False)
        self.to_out = linear(inner, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., L, H * d]`` -> ``[N, H, L, d]`` (the leading axes flattened into N)."""
        L = x.shape[-2]
        return x.reshape(-1, L, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x ``[..., L, dim]``, context ``[..., S, context_dim]`` (None: x), mask ``[N, S]`` (N: the
        leading axes' size) -> ``[..., L, dim]``; each leading index is its own sequence."""
        ctx = x if context is None else context
        out = attention(self._split(self.to_q(x)), self._split(self.to_k(ctx)), self._split(self.to_v(ctx)),
                        key_padding_mask)  # [N, H, L, d]
        L = out.shape[2]
        return self.to_out(out.transpose(1, 2).reshape(*x.shape[:-2], L, self.heads * self.head_dim))


class GEGLUFeedForward(nn.Module):
    """``x -> W2 (a * GELU(g))`` with ``[a, g] = W1 x`` (hidden width ``mult * dim``); ``linear`` as
    :class:`MultiHeadAttention`'s."""

    def __init__(self, dim: int, mult: int = 4, linear=nn.Linear):
        super().__init__()
        self.proj_in = linear(dim, 2 * mult * dim)
        self.proj_out = linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[..., dim]`` -> ``[..., dim]``."""
        a, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(a * F.gelu(gate))


class TransformerBlock(nn.Module):
    """One of the paper's N_A attention layers (eq. 4-5), pre-norm residuals.

    Self-attention runs within each plane; cross-attention lets every plane token read the
    condition tokens. ``per_plane`` (the release's): each plane has its own self-attention, layer
    norms and feed-forward, and the cross-attention is shared; else all are shared by the three
    planes (told apart by the 3-D positional encoding alone).
    """

    def __init__(self, dim: int, head_dim: int, context_dim: int, ff_mult: int = 4, per_plane: bool = True):
        super().__init__()
        heads = dim // head_dim
        norm, linear = (PlaneLayerNorm, PlaneLinear) if per_plane else (nn.LayerNorm, nn.Linear)
        self.norm_sa, self.norm_ca, self.norm_ff = norm(dim), norm(dim), norm(dim)
        self.self_attn = MultiHeadAttention(dim, heads, head_dim, linear=linear)
        self.cross_attn = MultiHeadAttention(dim, heads, head_dim, context_dim=context_dim)
        self.ff = GEGLUFeedForward(dim, ff_mult, linear=linear)

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x ``[B, 3, L, dim]`` plane tokens, context ``[B, T, context_dim]``, mask ``[B, T]`` -> ``[B, 3, L, dim]``."""
        B, P, L, D = x.shape
        x = x + self.self_attn(self.norm_sa(x))  # each (sample, plane) is its own sequence
        # all 3L plane tokens of a sample query the same condition tokens
        x = x + self.cross_attn(self.norm_ca(x).reshape(B, P * L, D), context, key_padding_mask).view(B, P, L, D)
        return x + self.ff(self.norm_ff(x))


def plane_positions(axes: str, resolution: int) -> torch.Tensor:
    """3-D world position (normalised to [-1, 1], third coordinate 0) of every cell of the three planes.

    Plane ``j`` reads world axes ``PLANE_AXES[axes][j] = (a_w, a_h)``: its width (last tensor axis)
    indexes world axis ``a_w`` and its height indexes ``a_h``, as ``grid_sample`` reads them. Cell
    ``(h, w)`` is centred at ``(2w + 1) / r - 1`` along ``a_w`` and ``(2h + 1) / r - 1`` along ``a_h``
    (``align_corners=False`` centres, the same box as the sampler's); the axis the plane does not read is 0.

    Returns:
        ``[3, r * r, 3]`` (x, y, z) per plane, cells in row-major (h, w) order.
    """
    if axes not in PLANE_AXES:
        raise ValueError(f"axes must be one of {sorted(PLANE_AXES)}, got {axes!r}")
    centres = (2 * torch.arange(resolution, dtype=torch.float64) + 1) / resolution - 1  # [r]
    hh, ww = torch.meshgrid(centres, centres, indexing="ij")  # [r, r] each
    out = torch.zeros(3, resolution * resolution, 3, dtype=torch.float64)
    for j, (a_w, a_h) in enumerate(PLANE_AXES[axes]):
        out[j, :, a_w] = ww.reshape(-1)
        out[j, :, a_h] = hh.reshape(-1)
    return out.float()


def sinusoidal_3d(pos: torch.Tensor, dim: int, max_freq: float) -> torch.Tensor:
    """Sinusoidal encoding of 3-D points in [-1, 1].

    ``F = dim // 6`` angular frequencies per axis, log-spaced from pi (one half-period across the box,
    so the lowest band alone is injective on (-1, 1)) to ``pi * max_freq``; per axis the features are
    ``sin(w_k p), cos(w_k p)``; zero-padded to ``dim``.

    Args:
        pos: ``[..., 3]``.
    Returns:
        ``[..., dim]``.
    """
    n_freq = dim // 6
    if n_freq < 1:
        raise ValueError(f"sinusoidal_3d needs dim >= 6, got dim={dim}")
    # On pos's device explicitly: under a `torch.device(...)` context some imported libraries leave
    # factory functions on the CPU (seen with transformers imported: meta planes, CPU frequencies).
    exps = (torch.linspace(0.0, 1.0, n_freq, dtype=torch.float64, device=pos.device) if n_freq > 1
            else torch.zeros(1, dtype=torch.float64, device=pos.device))
    omega = math.pi * max(max_freq, 1.0) ** exps  # [F]
    angles = pos.to(torch.float64)[..., None] * omega  # [..., 3, F]
    feats = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # [..., 6F]
    return F.pad(feats, (0, dim - feats.shape[-1])).to(pos.dtype)


def plane_positional_encoding(axes: str, resolution: int, dim: int) -> torch.Tensor:
    """``[3, r * r, dim]`` encoding of :func:`plane_positions`; top frequency at the grid's Nyquist (r / 2)."""
    return sinusoidal_3d(plane_positions(axes, resolution), dim, max_freq=resolution / 2)
