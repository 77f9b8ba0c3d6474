"""From a release pickle (or our checkpoint) to a :class:`~talk3d.models.TriplaneGenerator`.

Our modules carry EG3D's state-dict names, so the mapping of a release ``G_ema`` onto them is the
identity; what this module adds is the configuration (read from the constructor arguments that the
release recorded), the plane convention, and a strict check that reports every parameter left
unmapped, missing or of the wrong shape before anything is written.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from ..models import GeneratorConfig, TriplaneGenerator
from .checkpoint import check_state_dict, load_checkpoint, save_checkpoint
from .persistent_pickle import read_release_pickle

__all__ = ["config_from_release", "sizes_from_weights", "guess_plane_convention", "convert_release", "load_generator",
           "checkpoint_config"]


def guess_plane_convention(path) -> str:
    """``'fixed'`` for Talk3D's fixed-triplane release (its file name says so), else ``'eg3d'``."""
    return "fixed" if "fixed" in os.path.basename(os.fspath(path)).lower() else "eg3d"


def _get(d: Any, key: str, default=None):
    return d.get(key, default) if isinstance(d, dict) else default


#: The super-resolution network talk3d's generator implements (EG3D's, for 512^2 from 128^2).
SR_MODULE = "SuperresolutionHybrid8XDC"


def sizes_from_weights(state_dict) -> dict[str, Any]:
    """The sizes EG3D hard-codes rather than records (triplane, decoder, SR widths), read off tensors."""
    over: dict[str, Any] = {}
    res = [int(k.split(".")[2][1:]) for k in state_dict if k.startswith("backbone.synthesis.b") and k.endswith(".torgb.bias")]
    if res:
        over["plane_resolution"] = max(res)
        over["plane_channels"] = int(state_dict[f"backbone.synthesis.b{max(res)}.torgb.bias"].shape[0]) // 3
    if "decoder.net.0.weight" in state_dict and "decoder.net.2.weight" in state_dict:
        over["decoder_hidden"] = int(state_dict["decoder.net.0.weight"].shape[0])
        over["decoder_features"] = int(state_dict["decoder.net.2.weight"].shape[0]) - 1
    widths = [state_dict.get(f"superresolution.block{i}.conv0.weight") for i in (0, 1)]
    if all(w is not None for w in widths):
        over["sr_channels"] = tuple(int(w.shape[0]) for w in widths)
    return over


def config_from_release(init_kwargs: dict, attributes: dict | None = None, *, axes: str,
                        state_dict=None) -> GeneratorConfig:
    """The generator configuration from EG3D's ``TriPlaneGenerator`` constructor arguments.

    init_kwargs: ``z_dim, c_dim, w_dim, img_resolution, img_channels, mapping_kwargs,
    rendering_kwargs, sr_kwargs`` and the synthesis kwargs (``channel_base``, ``channel_max``, ...),
    as recorded by the release's persistence wrapper. attributes: the network's other recorded
    attributes (``neural_rendering_resolution``). state_dict: the release's tensors, for the sizes
    EG3D fixes in code (see :func:`sizes_from_weights`). Anything absent keeps the FFHQ default,
    except what EG3D itself defaults otherwise when absent (``c_scale`` 0, the SR's clamp off
    without ``sr_num_fp16_res``). A super-resolution module other than EG3D's
    ``SuperresolutionHybrid8XDC`` is refused.
    """
    base = GeneratorConfig.ffhq(axes=axes)
    kw = dict(init_kwargs or {})
    rk = _get(kw, "rendering_kwargs", {}) or {}
    mk = _get(kw, "mapping_kwargs", {}) or {}
    if _get(rk, "ray_start") == "auto":  # EG3D's ShapeNet settings: not a portrait prior
        raise ValueError("this release renders with ray_start='auto' (not an FFHQ portrait prior); unsupported")
    over: dict[str, Any] = {}

    def take(name, value, cast):
        if value is not None:
            over[name] = cast(value)

    take("z_dim", kw.get("z_dim"), int)
    take("c_dim", kw.get("c_dim"), int)
    take("w_dim", kw.get("w_dim"), int)
    take("sr_resolution", kw.get("img_resolution"), int)
    take("img_channels", kw.get("img_channels"), int)
    take("channel_base", kw.get("channel_base"), int)
    take("channel_max", kw.get("channel_max"), int)
    take("mapping_layers", _get(mk, "num_layers"), int)
    take("coarse_samples", _get(rk, "depth_resolution"), int)
    take("importance_samples", _get(rk, "depth_resolution_importance"), int)
    take("ray_start", _get(rk, "ray_start"), float)
    take("ray_end", _get(rk, "ray_end"), float)
    take("box_warp", _get(rk, "box_warp"), float)
    take("camera_radius", _get(rk, "avg_camera_radius"), float)
    # EG3D multiplies the mapping's camera input by rendering_kwargs.get('c_scale', 0): a release
    # that does not record it conditions on zeros.
    if isinstance(rk, dict) and rk:
        over["c_scale"] = float(rk.get("c_scale", 0.0))
    take("mapping_lr_multiplier", _get(mk, "lr_multiplier"), float)
    take("decoder_lr_multiplier", _get(rk, "decoder_lr_mul"), float)
    if "conv_clamp" in kw:  # the backbone's (EG3D: 256 when it runs layers in fp16, else None)
        over["conv_clamp"] = None if kw["conv_clamp"] is None else float(kw["conv_clamp"])
    if kw:  # EG3D's SR clamps at 256 when it runs in fp16 (sr_num_fp16_res > 0; default 0), else not at all
        over["sr_conv_clamp"] = 256.0 if int(kw.get("sr_num_fp16_res") or 0) > 0 else None
    sr_module = _get(rk, "superresolution_module")
    if sr_module is not None and not str(sr_module).endswith(SR_MODULE):
        raise ValueError(f"this release's super-resolution is {sr_module!r}; talk3d builds EG3D's {SR_MODULE} "
                         "(the FFHQ 512^2 portrait priors' and Talk3D's) only")
    take("c_conditioning_zero", _get(rk, "c_gen_conditioning_zero"), bool)
    take("sr_antialias", _get(rk, "sr_antialias"), bool)
    take("sr_noise_mode", _get(rk, "superresolution_noise_mode"), str)
    pivot = _get(rk, "avg_camera_pivot")
    if pivot is not None:
        over["camera_pivot"] = tuple(float(x) for x in pivot)
    nrr = _get(attributes, "neural_rendering_resolution")
    if nrr is not None:
        over["neural_rendering_resolution"] = int(nrr)
    if state_dict is not None:
        over.update(sizes_from_weights(state_dict))
    return dataclasses.replace(base, **over)


def checkpoint_config(cfg: GeneratorConfig, *, source: str | None = None) -> dict:
    """Our checkpoint's JSON config for a generator."""
    arch = cfg.to_dict()
    return {
        "architecture": arch,
        "plane_convention": cfg.axes,
        "rendering": {k: arch[k] for k in ("neural_rendering_resolution", "ray_start", "ray_end", "box_warp",
                                            "coarse_samples", "importance_samples")},
        "camera": {k: arch[k] for k in ("camera_radius", "camera_fov_degrees", "camera_pivot")},
        "source": source,
    }


def convert_release(in_path, out_path, *, axes: str | None = None, key: str = "G_ema",
                    allow_unmapped: bool = False, overwrite: bool = False, log=print) -> dict:
    """Convert an EG3D/Talk3D release pickle to our checkpoint; returns the written config.

    Raises ``ValueError`` listing the parameters that are missing, of the wrong shape or (unless
    ``allow_unmapped``) present in the release but unknown to our generator.
    """
    axes = axes or guess_plane_convention(in_path)
    release = read_release_pickle(in_path, key=key)
    attributes = {}
    state = getattr(release.record, "state", None)
    if isinstance(state, dict):
        attributes = {k: v for k, v in state.items() if isinstance(v, (int, float, str, bool))}
    cfg = config_from_release(release.init_kwargs, attributes, axes=axes, state_dict=release.state_dict)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in TriplaneGenerator(cfg).state_dict().items()}
    report = check_state_dict(expected, release.state_dict)
    log(f"{in_path}: {release.class_name} '{key}', {len(release.state_dict)} tensors; plane convention {axes!r}")
    if report.unexpected and allow_unmapped:
        log(f"ignoring {len(report.unexpected)} unmapped tensors: {sorted(report.unexpected)[:20]}")
        report = dataclasses.replace(report, unexpected=[])
    if not report.ok:
        raise ValueError(f"{in_path} does not match the generator built from its own settings:\n{report.describe()}")
    weights = {k: v for k, v in release.state_dict.items() if k in expected}
    config = checkpoint_config(cfg, source=os.path.basename(os.fspath(in_path)))
    save_checkpoint(out_path, weights, config, overwrite=overwrite)
    log(f"wrote {out_path}")
    return config


def load_generator(path, *, device="cpu") -> TriplaneGenerator:
    """A :class:`TriplaneGenerator` from our checkpoint, every tensor checked (names and shapes)."""
    weights, config = load_checkpoint(path)
    try:
        cfg = GeneratorConfig.from_dict(config["architecture"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad architecture in the checkpoint's config: {e}") from e
    if cfg.axes != config["plane_convention"]:
        cfg = dataclasses.replace(cfg, axes=config["plane_convention"])
    gen = TriplaneGenerator(cfg)
    report = check_state_dict(gen, weights)
    if not report.ok:
        raise ValueError(f"{path}: weights do not match the generator of its config:\n{report.describe()}")
    gen.load_state_dict(weights, strict=True)
    return gen.to(device).eval().requires_grad_(False)
