"""StyleGAN2's mapping network: (z, camera label c) -> ws, with a tracked average w for truncation."""
from __future__ import annotations

import torch
from torch import nn

from .layers import FullyConnected

#: Added to the mean square before normalising latents (EG3D's value).
NORMALIZE_EPS = 1e-8


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = NORMALIZE_EPS) -> torch.Tensor:
    """Scale ``x`` ``[B, D]`` to unit mean square along ``dim``."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


class MappingNetwork(nn.Module):
    """``normalize(z) ++ normalize(embed(c))`` -> ``mapping_layers`` lrelu FCs -> w, broadcast to ``num_ws``.

    Submodules ``embed`` (when c_dim > 0) and ``fc0 .. fc{L-1}``; buffer ``w_avg`` ``[w_dim]``.
    """

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, num_ws: int, *, num_layers: int = 2,
                 lr_multiplier: float = 0.01, w_avg_beta: float = 0.998):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, c_dim, w_dim, num_ws
        self.num_layers, self.w_avg_beta = num_layers, w_avg_beta
        embed = w_dim if c_dim > 0 else 0
        features = [z_dim + embed] + [w_dim] * num_layers
        if c_dim > 0:
            self.embed = FullyConnected(c_dim, embed)
        for i in range(num_layers):
            setattr(self, f"fc{i}", FullyConnected(features[i], features[i + 1], activation="lrelu",
                                                   lr_multiplier=lr_multiplier))
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z: torch.Tensor, c: torch.Tensor, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, update_emas: bool = False) -> torch.Tensor:
        """z ``[B, z_dim]``, c ``[B, c_dim]`` -> ws ``[B, num_ws, w_dim]`` (float32).

        ``update_emas`` moves ``w_avg`` towards the batch mean (``lerp`` with ``w_avg_beta``);
        ``truncation_psi`` pulls the first ``truncation_cutoff`` ws (all when None) towards ``w_avg``.
        Runs in float32 under autocast too: it is tiny, and its w feeds every layer (EG3D keeps it fp32).
        """
        with torch.autocast(z.device.type, enabled=False):
            return self._forward(z, c, truncation_psi, truncation_cutoff, update_emas)

    def _forward(self, z, c, truncation_psi, truncation_cutoff, update_emas) -> torch.Tensor:
        parts = []
        if self.z_dim > 0:
            parts.append(normalize_2nd_moment(z.float()))
        if self.c_dim > 0:
            parts.append(normalize_2nd_moment(self.embed(c.float())))
        x = torch.cat(parts, dim=1)
        for i in range(self.num_layers):
            x = getattr(self, f"fc{i}")(x)
        if update_emas:
            with torch.no_grad():
                self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        ws = x[:, None].expand(-1, self.num_ws, -1)
        if truncation_psi != 1:
            cutoff = self.num_ws if truncation_cutoff is None else truncation_cutoff
            truncated = self.w_avg.lerp(ws[:, :cutoff], truncation_psi)
            ws = torch.cat([truncated, ws[:, cutoff:]], dim=1)
        return ws.contiguous()

    def extra_repr(self) -> str:
        return f"z_dim={self.z_dim}, c_dim={self.c_dim}, w_dim={self.w_dim}, num_ws={self.num_ws}"
