"""Talk3D's talking head: identity triplane + audio-guided deltaplane, rendered by the prior's
decoder and super-resolution (paper section 3).

    planes = P_ID + DeltaplaneModel(P_ID, conditions);  image = SR(render(planes, decoder, camera), w_ID)
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..render.cameras import check_cameras as check_cameras_fn
from .deltaplane import DeltaplaneModel
from .generator import TriplaneGenerator
from .layers import refresh_binomial_flags
from .unet_config import DeltaplaneConfig

__all__ = ["TalkingHead"]


class TalkingHead(nn.Module):
    """The trainable talking head.

    Args:
        generator: the prior (decoder and super-resolution are used; its backbone is not run here).
        deltaplane: sizes of the deltaplane predictor; its plane sizes and convention must match the
            generator's.
        identity_planes: ``[1, 3, C, R, R]`` the person's triplane P_ID.
        w_id: ``[1, num_ws, w_dim]`` the latent that conditions the super-resolution.
        learn_identity: P_ID and w_ID are trained (no personalised prior) or kept fixed (buffers).
    """

    def __init__(self, generator: TriplaneGenerator, deltaplane: DeltaplaneConfig, identity_planes: torch.Tensor,
                 w_id: torch.Tensor, *, learn_identity: bool):
        super().__init__()
        g = generator.cfg
        want = (1, 3, g.plane_channels, g.plane_resolution, g.plane_resolution)
        if tuple(identity_planes.shape) != want:
            raise ValueError(f"TalkingHead: identity_planes must be {list(want)}, got {list(identity_planes.shape)}")
        if (deltaplane.plane_channels, deltaplane.plane_resolution, deltaplane.axes) != (
                g.plane_channels, g.plane_resolution, g.axes):
            raise ValueError("TalkingHead: deltaplane config (plane_channels, plane_resolution, axes) = "
                             f"{(deltaplane.plane_channels, deltaplane.plane_resolution, deltaplane.axes)} does not "
                             f"match the generator's {(g.plane_channels, g.plane_resolution, g.axes)}")
        self.generator = generator
        self.deltaplane = DeltaplaneModel(deltaplane)
        self.learn_identity = learn_identity
        self.cache_encoder = True  # inference reuses the U-Net encoder's features of P_ID (see _cached_encoding)
        self._encoding = None  # (key, those features)
        if learn_identity:
            self.identity_planes = nn.Parameter(identity_planes.detach().clone())
            self.w_id = nn.Parameter(w_id.detach().clone())
        else:
            self.register_buffer("identity_planes", identity_planes.detach().clone())
            self.register_buffer("w_id", w_id.detach().clone())

    def _encoding_key(self) -> tuple:
        """What the cached encoding depends on: P_ID, the encoder's weights and the decoder blocks'
        (their skip shares; in-place version counters move with every optimiser step or load), the
        device and the autocast dtype."""
        enc = self.deltaplane.predictor
        versions = tuple(p._version for m in (enc.enc, enc.down, enc.dec) for p in m.parameters())
        amp = torch.get_autocast_dtype(self.identity_planes.device.type) if torch.is_autocast_enabled(
            self.identity_planes.device.type) else None
        return (self.identity_planes.data_ptr(), self.identity_planes._version, versions, amp)

    def _cached_encoding(self):
        """The U-Net encoder's features of P_ID and the decoder blocks' shares of them, computed once
        for inference (None while training).

        The encoder sees only P_ID, never a frame's conditions, so at inference every frame shares
        them, and so does each decoder block's convolution of its encoder skip: caching leaves the
        attention and the decoder's convolutions of the upsampled features as the per-frame U-Net
        work (CPU, release sizes, medians of 5: decoding one frame 407 -> 332 ms with the shares
        cached, 8 frames 3.80 -> 3.74 s). Not used with gradients on (training needs the encoder in
        the graph).
        """
        if self.training or torch.is_grad_enabled() or not self.cache_encoder:
            return None
        key = self._encoding_key()
        if self._encoding is None or self._encoding[0] != key:
            pred, p = self.deltaplane.predictor, self.identity_planes
            x, skips = pred.encode(p.reshape(1, -1, *p.shape[-2:]))
            self._encoding = (key, (x, skips, pred.skip_shares(skips)))
        return self._encoding[1]

    def train(self, mode: bool = True):
        self._encoding = None
        return super().train(mode)

    @torch.no_grad()
    def occupancy_grid(self, batches, *, resolution: int | None = None, box: float = 1.6, dilation: int = 1,
                       seed: int = 0):
        """An occupancy grid of the talking head over the conditions of ``batches``, for inference.

        The deltaplane moves density (the mouth opens and closes), so no single triplane's grid
        holds for every frame: the grid is the union over the given frames' triplanes (e.g. a
        sample of the training clip, which spans the mouth's range), grown by ``dilation`` cells
        for the frames in between.

        Args:
            batches: iterable of condition dicts as :meth:`forward` takes (``camera`` is not used).
            resolution, box: see :class:`talk3d.render.OccupancyGrid`. ``resolution=None``: about one
                cell per coarse sample spacing (:func:`talk3d.render.grid_resolution_for`; 72 at
                EG3D's 48 coarse samples), since finer cells skip little more and cost cubically more
                field evaluations to build.
            dilation: cells added around every occupied cell.
            seed: of the generator that draws each cell's probe point: the same frames give the same
                grid (and so the same skipping render) whatever torch's random state.

        Returns:
            an :class:`talk3d.render.OccupancyGrid` on the model's device.
        """
        import torch.nn.functional as F

        from ..render import OccupancyGrid, Renderer, grid_resolution_for

        was = self.training
        self.eval()
        cfg = self.generator.cfg.render_config()
        if resolution is None:
            resolution = grid_resolution_for(cfg, box)
        grid = OccupancyGrid(resolution, box, ema_decay=1.0).to(self.identity_planes.device)  # decay 1: the max
        decoder = self.generator.decoder.effective_weights(torch.float32)
        rng = torch.Generator(device=self.identity_planes.device).manual_seed(seed)
        for batch in batches:
            planes = self._planes_and_delta(batch, self._cached_encoding())[0].float()
            grid.update(0, Renderer(cfg).density(planes, decoder), cfg.coarse_step,  # step 0: every cell, max
                        generator=rng)
        occ = grid.occupied[None, None].float()  # [1, 1, r, r, r]
        if dilation > 0:
            occ = F.max_pool3d(occ, 2 * dilation + 1, stride=1, padding=dilation)
        self.train(was)
        return grid.set_occupied(occ[0, 0] > 0)

    def _planes_and_delta(self, batch: Mapping[str, torch.Tensor], encoded) -> tuple[torch.Tensor, torch.Tensor]:
        """The frames' triplanes ``P_ID + ΔP`` and ``ΔP``, both ``[B, 3, C, R, R]``; ``encoded``:
        :meth:`_cached_encoding`'s features of P_ID, or None to encode it."""
        B = batch["camera"].shape[0]  # every frame has a camera; "audio" is absent when its token is off
        base = self.identity_planes.expand(B, -1, -1, -1, -1)
        delta = self.deltaplane(base, batch, encoded=encoded)
        return base + delta.to(base.dtype), delta

    @torch.compiler.disable
    def _prologue(self, cams: torch.Tensor, check_cameras: bool):
        """What a call does before its tensor work, outside any ``torch.compile`` graph: checks the
        cameras (one read-back from the device), refreshes the SR's filter flags
        (:func:`talk3d.models.layers.refresh_binomial_flags`) and looks up the cached encoding.
        Compiled, :meth:`forward` is one graph after this (CUDA graphs under reduce-overhead)."""
        if check_cameras:  # in fp32 at least, as the render uses them
            check_cameras_fn(cams if cams.dtype == torch.float64 else cams.float())
        refresh_binomial_flags(self.generator.superresolution)
        return self._cached_encoding()

    def forward(self, batch: Mapping[str, torch.Tensor], *, impl: str = "auto", deterministic: bool = False,
                resolution: int | None = None, grid=None, early_stop: float = 0.0,
                check_cameras: bool = True) -> dict[str, torch.Tensor]:
        """batch: the dataset's dict (``camera`` ``[B, 25]``, ``audio``, ``blink``, ``pose``, ``landmarks``).
        ``grid``, ``early_stop``: inference only, see :meth:`occupancy_grid` and :func:`talk3d.render.render`.
        ``check_cameras``: False for cameras checked already (a dataset's, when it loaded; a camera
        track, once on the host): on a GPU the check reads its result back, waiting for the device.

        Returns the generator's synthesis dict (``image`` ``[B, 3, S, S]``, ``image_raw``
        ``[B, 3, h, h]``, ...) plus ``delta`` ``[B, 3, C, R, R]``.
        """
        cams = batch["camera"]
        encoded = self._prologue(cams, check_cameras)
        planes, delta = self._planes_and_delta(batch, encoded)
        if planes.is_cuda and torch.is_autocast_enabled("cuda") and not torch.is_grad_enabled():
            # Inference under autocast on a GPU renders the planes in its half dtype (the CUDA field
            # kernel accumulates in fp32): its texel gathers, the largest memory traffic, halve.
            # Training keeps fp32 planes, whose gradients bf16 would round away; the CPU kernels take
            # fp32 only (half planes would go to the reference or be widened back).
            planes = planes.to(torch.get_autocast_dtype("cuda"))
        ws = self.w_id.expand(cams.shape[0], -1, -1)
        out = self.generator.synthesis(ws, cams, impl=impl, deterministic=deterministic, planes=planes,
                                       neural_rendering_resolution=resolution, grid=grid, early_stop=early_stop,
                                       check_cameras=False)  # checked in the prologue
        out["delta"] = delta
        return out
