"""``python -m talk3d.personalize``: a personalised generator from a prior and a dataset.

    python -m talk3d.personalize --prior talk3d-prior.safetensors --data DATASET --out personal.safetensors
    python -m talk3d.personalize --prior P.safetensors --data D --out O.safetensors --frame-ids 0,10,50

Writes OUT (the tuned weights; the identity latent and refined cameras in its config, see
``talk3d.personalize.io``), OUT's stem + ``.preview.png`` (rows: frames; columns: target | prior at
w_avg | inverted | tuned) and + ``.log.json`` (every step's losses). Existing outputs are kept
unless ``--overwrite``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

#: LPIPS's AlexNet needs images at least this large (its deepest tap is empty below).
LPIPS_MIN_SIZE = 32


def _parser() -> argparse.ArgumentParser:
    from .core import PersonalizeConfig

    d = PersonalizeConfig()
    p = argparse.ArgumentParser(prog="python -m talk3d.personalize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prior", required=True, help="our generator checkpoint (python -m talk3d.prior convert)")
    p.add_argument("--data", required=True, help="dataset folder (python -m talk3d.preprocess / talk3d.data)")
    p.add_argument("--out", required=True, help="output checkpoint, .safetensors (preferred) or .pt")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--frames", type=int, default=4, help="M frames picked by pose (default 4)")
    sel.add_argument("--frame-ids", default=None, help="explicit training-frame numbers, e.g. 0,10,50")
    p.add_argument("--invert-steps", type=int, default=d.invert_steps)
    p.add_argument("--tune-steps", type=int, default=d.tune_steps)
    p.add_argument("--lr-invert", type=float, default=d.lr_invert)
    p.add_argument("--lr-tune", type=float, default=d.lr_tune)
    p.add_argument("--locality-weight", type=float, default=d.locality_weight)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--impl", default="auto", help="render back end: auto, torch, cpu, cuda, triton")
    p.add_argument("--lpips-weights", default=None, help="folder with LPIPS weights (default: the usual search)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _outputs(out: str) -> dict:
    stem = os.path.splitext(out)[0]
    return {"checkpoint": out, "preview": stem + ".preview.png", "log": stem + ".log.json"}


def _to_uint8(img: torch.Tensor):
    """[3, S, S] in [-1, 1] -> numpy [S, S, 3] uint8."""
    return ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def write_preview(path: str, columns: list) -> None:
    """columns: tensors ``[M, 3, S, S]`` in [-1, 1] -> one PNG, a row per frame."""
    import numpy as np
    from PIL import Image

    rows = [np.concatenate([_to_uint8(col[i]) for col in columns], axis=1) for i in range(columns[0].shape[0])]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def run(args, log=print) -> dict:
    from ..losses import LPIPS, find_lpips_weights, lpips_status
    from ..prior import load_generator
    from .core import PersonalizeConfig, personalize, render_frames
    from .frames import load_frames
    from .io import save_personalized

    outs = _outputs(args.out)
    if not args.overwrite:
        existing = [p for p in outs.values() if os.path.exists(p)]
        if existing:
            raise FileExistsError(f"{', '.join(existing)} already exist(s); pass --overwrite to replace")
    if not os.path.isfile(args.prior):
        raise FileNotFoundError(f"prior checkpoint not found: {args.prior}")
    if not os.path.isdir(args.data):
        raise FileNotFoundError(f"dataset folder not found: {args.data}")
    device = torch.device(args.device)
    if device.type == "cpu":
        # Inversion gradients underflow to denormals, which slow CPU kernels by 10x or more.
        torch.set_flush_denormal(True)
    gen = load_generator(args.prior, device=device)
    ids = None
    if args.frame_ids is not None:
        try:
            ids = [int(s) for s in args.frame_ids.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--frame-ids must be comma-separated integers, got {args.frame_ids!r}") from None
    frames = load_frames(args.data, frames=args.frames, frame_ids=ids, image_size=gen.cfg.sr_resolution)
    frames = {k: v.to(device) for k, v in frames.items()}
    log(f"frames {frames['index'].tolist()} (yaw/pitch deg: "
        + ", ".join(f"{y:.1f}/{p:.1f}" for y, p in torch.rad2deg(frames['pose'][:, :2]).tolist()) + ")")

    lpips, status = None, lpips_status(args.lpips_weights)
    weights = find_lpips_weights(args.lpips_weights)
    if weights is not None and gen.cfg.sr_resolution >= LPIPS_MIN_SIZE:
        lpips = LPIPS(weights).to(device).eval()
    elif weights is not None:
        status = f"LPIPS off: images of {gen.cfg.sr_resolution}px are below its {LPIPS_MIN_SIZE}px minimum"
    log(status + ("" if lpips is not None else "; using L1 only"))

    cfg = PersonalizeConfig(invert_steps=args.invert_steps, tune_steps=args.tune_steps, lr_invert=args.lr_invert,
                            lr_tune=args.lr_tune, locality_weight=args.locality_weight, impl=args.impl,
                            seed=args.seed)
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("invert_steps", "tune_steps")}
    res = personalize(gen, frames, invert_steps=cfg.invert_steps, tune_steps=cfg.tune_steps, lpips=lpips,
                      progress=not args.quiet, log=log, **settings)
    save_personalized(args.out, res, source=os.path.basename(args.prior), frame_ids=frames["index"].tolist(),
                      settings=cfg, lpips=status, overwrite=args.overwrite)
    with torch.no_grad():
        m = frames["image"].shape[0]
        w_avg = gen.backbone.mapping.w_avg[None, None].expand(m, gen.num_ws, -1)
        pivots = res.w_id + res.offsets
        prior_avg = render_frames(gen, w_avg, frames["camera"], impl=args.impl)["image"]
        inverted = render_frames(gen, pivots, res.cameras, impl=args.impl)["image"]
        tuned = render_frames(res.generator, pivots, res.cameras, impl=args.impl)["image"]
    write_preview(outs["preview"], [frames["image"], prior_avg, inverted, tuned])
    l1 = {name: float((img - frames["image"]).abs().mean()) for name, img in
          (("prior_w_avg", prior_avg), ("inverted", inverted), ("tuned", tuned))}
    with open(outs["log"], "w") as f:
        json.dump({"frame_ids": frames["index"].tolist(), "lpips": status, "l1": l1, "history": res.history}, f)
    log(f"L1 on the frames: prior at w_avg {l1['prior_w_avg']:.4f}, inverted {l1['inverted']:.4f}, "
        f"tuned {l1['tuned']:.4f}")
    log(f"wrote {outs['checkpoint']}, {outs['preview']}, {outs['log']}")
    return {"outputs": outs, "l1": l1}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        run(args, log=lambda s: print(s, file=sys.stderr))
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"talk3d.personalize: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
