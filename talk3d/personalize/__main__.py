"""``python -m talk3d.personalize``: a personalised generator and refined cameras from a prior and a dataset.

    python -m talk3d.personalize --prior talk3d-prior.safetensors --data DATASET --out personal.safetensors
    python -m talk3d.personalize --prior P.safetensors --data D --out O.safetensors --frame-ids 0,10,50
    python -m talk3d.personalize --data D --out O.safetensors --generator ffhq    # no prior: from scratch

Steps (Talk3D section 3.2): joint inversion of M frames, pivotal tuning of the generator, then a
per-frame inversion of the whole clip on the tuned generator, whose cameras are written back into
DATASET as the cameras training uses (the tracked ones are kept; see talk3d.personalize.cameras).
Without --prior, the generator is trained from random weights on the clip instead of the first two
steps (much longer; the log says so).

Writes OUT (the tuned weights; the identity latent and the M frames' cameras in its config) and,
beside it, named after OUT's stem:

- ``.identity.safetensors``: the identity triplane P_ID ``[1, 3, C, R, R]`` and w_ID, what the
  deltaplane stage starts from;
- ``.invert.png`` (after the inversion: target | prior at w_avg | inverted), ``.preview.png`` (after
  tuning: + tuned), ``.track.png`` (sample frames: target | tracked camera | refined camera);
- ``.log.txt`` (what was printed, timestamped; every attempt appends) and ``.log.json`` (every
  step's losses and the per-frame results);
- ``.state.pt`` / ``.track.npz``: progress, for ``--resume``.

Existing outputs are kept unless ``--overwrite``; ``--resume`` continues an interrupted run from its
last finished phase or batch of frames.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

#: LPIPS's AlexNet needs images at least this large (its deepest tap is empty below).
LPIPS_MIN_SIZE = 32
#: Frames shown in the per-frame inversion preview.
TRACK_PREVIEW_FRAMES = 6


def _parser() -> argparse.ArgumentParser:
    from .core import PersonalizeConfig
    from .track import TrackConfig

    d, t = PersonalizeConfig(), TrackConfig()
    p = argparse.ArgumentParser(prog="python -m talk3d.personalize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prior", default=None, help="our generator checkpoint (python -m talk3d.prior convert); "
                   "without it the generator is trained from random weights on the clip")
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
    g = p.add_argument_group("without a prior")
    g.add_argument("--generator", choices=("ffhq", "tiny"), default="ffhq", help="architecture to train")
    g.add_argument("--generator-config", default=None, help="JSON GeneratorConfig (overrides --generator)")
    g.add_argument("--scratch-steps", type=int, default=20000, help="training steps from random weights")
    g.add_argument("--scratch-batch", type=int, default=4)
    k = p.add_argument_group("per-frame inversion of the whole clip")
    k.add_argument("--track", action=argparse.BooleanOptionalAction, default=True,
                   help="refine every frame's camera and write them into the dataset (default: on)")
    k.add_argument("--track-steps", type=int, default=t.max_steps, help="most steps per batch of frames")
    k.add_argument("--track-first-steps", type=int, default=t.first_steps, help="most steps for the first batch")
    k.add_argument("--track-batch", type=int, default=t.batch, help="consecutive frames solved together")
    k.add_argument("--track-offsets", action=argparse.BooleanOptionalAction, default=t.refine_offsets,
                   help="also fit a latent offset per frame (absorbs expression; competes with the pose)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--impl", default="auto", help="render back end: auto, torch, cpu, cuda, triton")
    p.add_argument("--lpips-weights", default=None, help="folder with LPIPS weights (default: the usual search)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (and refined cameras)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run with the same --out")
    p.add_argument("--no-progress", "--quiet", dest="quiet", action="store_true", help="no progress bars")
    return p


def _outputs(out: str) -> dict:
    stem = os.path.splitext(out)[0]
    return {"checkpoint": out, "preview": stem + ".preview.png", "invert_preview": stem + ".invert.png",
            "track_preview": stem + ".track.png", "log": stem + ".log.json", "state": stem + ".state.pt",
            "identity": stem + ".identity.safetensors", "log_txt": stem + ".log.txt",
            "track_state": stem + ".track.npz"}


def _to_uint8(img: torch.Tensor):
    """[3, S, S] in [-1, 1] -> numpy [S, S, 3] uint8."""
    return ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def write_preview(path: str, columns: list) -> None:
    """columns: tensors ``[M, 3, S, S]`` in [-1, 1] -> one PNG, a row per frame."""
    import numpy as np
    from PIL import Image

    rows = [np.concatenate([_to_uint8(col[i]) for col in columns], axis=1) for i in range(columns[0].shape[0])]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def _check_args(args, outs: dict) -> None:
    """Clear errors before any work: missing inputs, outputs that would be overwritten."""
    # The text log is appended to, never replaced: a failed attempt's lines stay for the next one.
    existing = [p for k, p in outs.items() if k != "log_txt" and os.path.exists(p)]
    if existing and not (args.overwrite or args.resume):
        raise FileExistsError(f"{', '.join(existing)} already exist(s); pass --overwrite to replace "
                              "or --resume to continue")
    if args.prior is not None and not os.path.isfile(args.prior):
        raise FileNotFoundError(f"prior checkpoint not found: {args.prior}")
    if not os.path.isdir(args.data):
        raise FileNotFoundError(f"dataset folder not found: {args.data}")
    if args.track and not args.overwrite:  # the tracking step would refuse only after inversion and tuning
        from ..data import load_manifest
        from .cameras import is_refined

        if is_refined(load_manifest(args.data)):
            raise FileExistsError(f"{args.data} already has refined cameras; pass --overwrite to replace them "
                                  "(or --no-track to skip this step)")
    for name in ("track_steps", "track_first_steps", "track_batch", "scratch_steps", "scratch_batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.overwrite and not args.resume:  # start over: old progress must not be picked up
        for key in ("state", "track_state"):
            if os.path.exists(outs[key]):
                os.remove(outs[key])


def _lpips_for(args, size: int, device, log):
    from ..losses import LPIPS, find_lpips_weights, lpips_status

    lpips, status = None, lpips_status(args.lpips_weights)
    weights = find_lpips_weights(args.lpips_weights)
    if weights is not None and size >= LPIPS_MIN_SIZE:
        lpips = LPIPS(weights).to(device).eval()
    elif weights is not None:
        status = f"LPIPS off: images of {size}px are below its {LPIPS_MIN_SIZE}px minimum"
    log(status + ("" if lpips is not None else "; using L1 only"))
    return lpips, status


def _scratch_generator(args):
    from ..models import GeneratorConfig, TriplaneGenerator

    if args.generator_config is not None:
        try:
            cfg = GeneratorConfig.from_dict(json.loads(Path(args.generator_config).read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"--generator-config {args.generator_config}: not a readable GeneratorConfig JSON ({e})") from None
    else:
        cfg = GeneratorConfig.ffhq() if args.generator == "ffhq" else GeneratorConfig.tiny()
    torch.manual_seed(args.seed)
    return TriplaneGenerator(cfg)


def _with_prior(args, gen, cfg, lpips, device, outs, log) -> tuple:
    """Steps 1-2 (joint inversion, pivotal tuning) -> (result, frame ids, L1 summary)."""
    from .core import personalize, render_frames
    from .frames import load_frames

    ids = None
    if args.frame_ids is not None:
        try:
            ids = [int(s) for s in args.frame_ids.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--frame-ids must be comma-separated integers, got {args.frame_ids!r}") from None
    frames = load_frames(args.data, frames=args.frames, frame_ids=ids, image_size=gen.cfg.sr_resolution)
    frames = {k: v.to(device) for k, v in frames.items()}
    # The cameras orbit the dataset rig's pivot when refined, here as in the per-frame tracking.
    from ..data import load_manifest
    from ..data.format import dataset_rig

    pivot = dataset_rig(load_manifest(args.data)).pivot
    log(f"frames {frames['index'].tolist()} (yaw/pitch deg: "
        + ", ".join(f"{y:.1f}/{p:.1f}" for y, p in torch.rad2deg(frames['pose'][:, :2]).tolist()) + ")")
    m = frames["image"].shape[0]
    with torch.no_grad():
        w_avg = gen.backbone.mapping.w_avg[None, None].expand(m, gen.num_ws, -1)
        prior_avg = render_frames(gen, w_avg, frames["camera"], impl=args.impl)["image"]

    inverted = None
    if args.resume and os.path.exists(outs["state"]):
        state = torch.load(outs["state"], map_location=device, weights_only=True)
        if state.get("frame_ids") != frames["index"].tolist():
            raise ValueError(f"{outs['state']}: saved for frames {state.get('frame_ids')}, not "
                             f"{frames['index'].tolist()}; delete it or pass the same --frames/--frame-ids")
        inverted = (state["w_id"], state["offsets"], state["deltas"])

    def save_inversion(res):
        from .core import refine_cameras

        w_id, offsets, deltas = res
        torch.save({"frame_ids": frames["index"].tolist(), "w_id": w_id, "offsets": offsets, "deltas": deltas},
                   outs["state"])
        with torch.no_grad():
            cams = refine_cameras(frames["camera"], deltas, pivot)
            img = render_frames(gen, w_id + offsets, cams, impl=args.impl)["image"]
        write_preview(outs["invert_preview"], [frames["image"], prior_avg, img])
        log(f"wrote {outs['invert_preview']} (target | prior at w_avg | inverted)")

    res = personalize(gen, frames, invert_steps=cfg.invert_steps, tune_steps=cfg.tune_steps, lpips=lpips,
                      progress=not args.quiet, log=log, inverted=inverted, on_inverted=save_inversion, pivot=pivot,
                      **{k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("invert_steps", "tune_steps")})
    with torch.no_grad():
        pivots = res.w_id + res.offsets
        inverted_img = render_frames(gen, pivots, res.cameras, impl=args.impl)["image"]
        tuned = render_frames(res.generator, pivots, res.cameras, impl=args.impl)["image"]
    write_preview(outs["preview"], [frames["image"], prior_avg, inverted_img, tuned])
    l1 = {name: float((img - frames["image"]).abs().mean()) for name, img in
          (("prior_w_avg", prior_avg), ("inverted", inverted_img), ("tuned", tuned))}
    log(f"L1 on the frames: prior at w_avg {l1['prior_w_avg']:.4f}, inverted {l1['inverted']:.4f}, "
        f"tuned {l1['tuned']:.4f}")
    return res, frames["index"].tolist(), l1


def _from_scratch(args, cfg, lpips, device, outs, log) -> tuple:
    """No prior: train a generator from random weights on the training frames -> (result, None, L1 summary)."""
    from ..data import TalkingHeadDataset
    from .cameras import preprocessed_cameras
    from .core import PersonalizationResult, render_frames
    from .scratch import train_from_scratch

    gen = _scratch_generator(args).to(device)
    log(f"no prior given: training the generator ({gen.cfg.sr_resolution}px output) from random weights on the "
        f"clip for {args.scratch_steps} steps. This takes far longer than personalising a prior and extrapolates "
        "less well to unseen views; convert an EG3D prior with `python -m talk3d.prior convert` for the paper's setup")
    ds = TalkingHeadDataset(args.data, "train", image_size=gen.cfg.sr_resolution)
    cams, _ = preprocessed_cameras(args.data)

    def load(idx):
        items = [ds[i] for i in idx]
        return {"image": torch.stack([it["image"] for it in items]).to(device),
                "camera": torch.from_numpy(cams[[int(it["index"]) for it in items]]).to(device),
                "face_mask": torch.stack([it["face_mask"] for it in items]).to(device)}

    history: list = []
    gen, w_id = train_from_scratch(gen, load, len(ds), cfg, steps=args.scratch_steps, batch=args.scratch_batch,
                                   lpips=lpips, progress=not args.quiet, history=history)
    show = load([int(i) for i in torch.linspace(0, len(ds) - 1, min(4, len(ds))).long()])
    with torch.no_grad():
        img = render_frames(gen, w_id.expand(show["image"].shape[0], -1, -1), show["camera"], impl=args.impl)["image"]
    write_preview(outs["preview"], [show["image"], img])
    l1 = {"first_step": history[0]["l1"], "trained": float((img - show["image"]).abs().mean())}
    log(f"from scratch: L1 {l1['first_step']:.4f} at the first step, {l1['trained']:.4f} after training")
    empty = torch.zeros(0, gen.num_ws, gen.cfg.w_dim)
    res = PersonalizationResult(gen, w_id, empty, torch.zeros(0, 25), torch.zeros(0, 2), history)
    return res, None, l1


def _track(args, gen, w_id, cfg, lpips, device, outs, log) -> dict:
    """Step 3: per-frame inversion of the whole clip; writes the refined cameras into the dataset."""
    import numpy as np

    from ..data import TalkingHeadDataset, load_manifest
    from ..data.format import dataset_rig
    from .cameras import is_refined, preprocessed_cameras, refined_pose, write_refined_cameras
    from .core import refine_cameras, render_frames
    from .track import TrackConfig, TrackState, track_video

    manifest = load_manifest(args.data)
    if is_refined(manifest) and not args.overwrite:
        raise FileExistsError(f"{args.data} already has refined cameras; pass --overwrite to replace them "
                              "(or --no-track to skip this step)")
    pivot = dataset_rig(manifest).pivot
    ds = TalkingHeadDataset(args.data, "all", image_size=gen.cfg.sr_resolution)
    cams, pose = preprocessed_cameras(args.data)
    n = len(ds)

    def load(s, e):
        items = [ds[i] for i in range(s, e)]
        return {"image": torch.stack([it["image"] for it in items]).to(device),
                "camera": torch.from_numpy(cams[s:e]).to(device),
                "face_mask": torch.stack([it["face_mask"] for it in items]).to(device)}

    tcfg = TrackConfig(max_steps=args.track_steps, first_steps=args.track_first_steps, batch=args.track_batch,
                       refine_offsets=args.track_offsets)
    settings = {"track": dataclasses.asdict(tcfg), "loss": dataclasses.asdict(cfg)}
    state = None
    if args.resume and os.path.exists(outs["track_state"]):
        state = TrackState.load(outs["track_state"], n, settings)
        log(f"per-frame inversion: resuming at frame {state.done} of {n}")
    log(f"per-frame inversion of {n} frames ({tcfg.batch} at a time, at most {tcfg.max_steps} steps each)")
    state = track_video(gen, w_id, load, n, cfg, tcfg, pivot=pivot, lpips=lpips, state=state,
                        state_path=outs["track_state"], progress=not args.quiet)
    refined = refine_cameras(torch.from_numpy(cams), torch.from_numpy(state.deltas), pivot).numpy()
    deg = np.degrees(np.abs(state.deltas))
    record = {"checkpoint": os.path.abspath(args.out), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "frames": n, "mean_abs_delta_deg": deg.mean(0).tolist(), "max_abs_delta_deg": deg.max(0).tolist(),
              "mean_loss_tracked": float(state.loss_first.mean()), "mean_loss_refined": float(state.loss_best.mean()),
              "settings": settings}
    write_refined_cameras(args.data, refined, refined_pose(pose, state.deltas), record, overwrite=args.overwrite)
    show = [int(i) for i in np.linspace(0, n - 1, min(TRACK_PREVIEW_FRAMES, n)).round()]
    batch = {k: torch.cat([load(i, i + 1)[k] for i in show]) for k in ("image", "camera")}
    with torch.no_grad():
        ws = w_id.expand(len(show), -1, -1)
        before = render_frames(gen, ws, batch["camera"], impl=args.impl)["image"]
        after = render_frames(gen, ws, torch.from_numpy(refined[show]).to(device), impl=args.impl)["image"]
    write_preview(outs["track_preview"], [batch["image"], before, after])
    log(f"per-frame inversion: loss {record['mean_loss_tracked']:.4f} at the tracked cameras -> "
        f"{record['mean_loss_refined']:.4f} refined; mean |delta| yaw {record['mean_abs_delta_deg'][0]:.2f} deg, "
        f"pitch {record['mean_abs_delta_deg'][1]:.2f} deg; cameras written to {args.data} "
        "(the tracked ones kept as cameras_preprocessed.npy / pose_preprocessed.npy)")
    return {k: v for k, v in record.items() if k != "settings"} | {
        "per_frame": {"deltas": state.deltas.tolist(), "loss_tracked": state.loss_first.tolist(),
                      "loss_refined": state.loss_best.tolist(), "steps": state.steps.tolist()}}


def _save_identity(path: str, gen, w_id: torch.Tensor) -> None:
    """P_ID = G_ID(w_ID) ``[1, 3, C, R, R]`` and w_ID, computed once (``train --prior OUT`` recomputes the same)."""
    from safetensors.torch import save_file

    with torch.no_grad():
        planes = gen.planes(w_id)
    save_file({"identity_planes": planes.float().contiguous().cpu(), "w_id": w_id.float().contiguous().cpu()}, path)


def _logged(log, path: str):
    """``log`` that also appends each line, timestamped, to ``path`` (a log a person can read)."""
    with open(path, "a") as f:
        f.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] python -m talk3d.personalize {' '.join(sys.argv[1:])}\n")

    def both(line: str) -> None:
        log(line)
        with open(path, "a") as f:
            f.write(f"[{time.strftime('%H:%M:%S')}] {line}\n")

    return both


def run(args, log=print) -> dict:
    from ..prior import load_generator
    from .core import PersonalizeConfig
    from .io import load_personalized, save_personalized

    outs = _outputs(args.out)
    _check_args(args, outs)
    log = _logged(log, outs["log_txt"])
    from ..devices import resolve_device

    device = resolve_device(args.device)
    if device.type == "cpu":
        # Inversion gradients underflow to denormals, which slow CPU kernels by 10x or more.
        torch.set_flush_denormal(True)
    cfg = PersonalizeConfig(invert_steps=args.invert_steps, tune_steps=args.tune_steps, lr_invert=args.lr_invert,
                            lr_tune=args.lr_tune, locality_weight=args.locality_weight, impl=args.impl,
                            seed=args.seed)
    summary: dict = {}
    if args.resume and os.path.exists(outs["checkpoint"]):
        gen, w_id = load_personalized(outs["checkpoint"], device=device)
        log(f"resuming: {outs['checkpoint']} is done, so inversion and tuning are skipped")
        lpips, status = _lpips_for(args, gen.cfg.sr_resolution, device, log)
        if os.path.exists(outs["log"]):
            summary = json.loads(Path(outs["log"]).read_text())
    else:
        prior_gen = load_generator(args.prior, device=device) if args.prior is not None else None
        size = prior_gen.cfg.sr_resolution if prior_gen is not None else _scratch_generator(args).cfg.sr_resolution
        lpips, status = _lpips_for(args, size, device, log)
        if prior_gen is not None:
            res, frame_ids, l1 = _with_prior(args, prior_gen, cfg, lpips, device, outs, log)
        else:
            res, frame_ids, l1 = _from_scratch(args, cfg, lpips, device, outs, log)
        save_personalized(args.out, res, source=None if args.prior is None else os.path.basename(args.prior),
                          frame_ids=frame_ids, settings=cfg, lpips=status, overwrite=True)
        gen, w_id = res.generator, res.w_id
        _save_identity(outs["identity"], gen, w_id)
        summary = {"frame_ids": frame_ids, "lpips": status, "l1": l1, "history": res.history,
                   "from_scratch": args.prior is None}
        with open(outs["log"], "w") as f:
            json.dump(summary, f)
    if args.track:
        summary["track"] = _track(args, gen, w_id, cfg, lpips, device, outs, log)
        with open(outs["log"], "w") as f:
            json.dump(summary, f)
    written = [p for p in outs.values() if os.path.exists(p)]
    log(f"wrote {', '.join(written)}")
    return {"outputs": outs, "l1": summary.get("l1"), "track": summary.get("track")}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        run(args, log=lambda s: print(s, file=sys.stderr))
    except (FileNotFoundError, FileExistsError, ValueError) as e:  # DatasetError is a ValueError
        print(f"talk3d.personalize: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
