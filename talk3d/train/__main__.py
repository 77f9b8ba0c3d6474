"""``python -m talk3d.train``: train Talk3D's deltaplane predictor (or fine-tune the SR).

With no arguments it trains on the built-in synthetic talking head, sized to the machine (minutes
on a 2-core CPU), and prints where the results are. Otherwise:

    python -m talk3d.train --data DATASET_DIR [--prior PRIOR.safetensors] [--config run.toml]
                           [--set steps=20000 --set loss.mouth=10] [--out runs/NAME]
    python -m talk3d.train --data DATASET_DIR --preset small   # the demo's small model: minutes on a CPU
    python -m talk3d.train --resume runs/NAME          # continue an interrupted run
    python -m talk3d.train --from runs/NAME            # then fine-tune its super-resolution (stage sr)
    torchrun --nproc-per-node 2 -m talk3d.train ...    # data-parallel (DDP)
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m talk3d.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="preprocessed dataset folder (python -m talk3d.preprocess); "
                                  "default: the built-in synthetic talking head")
    p.add_argument("--prior", help="converted EG3D prior (python -m talk3d.prior convert); default: learn from scratch")
    p.add_argument("--config", help="TOML file of train settings (see talk3d/train/config.py)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting, e.g. steps=100")
    p.add_argument("--out", help="run folder (default runs/<data name>-<time>; the no-argument demo: "
                                 "runs/demo/run-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    p.add_argument("--from", dest="init_from", metavar="RUN_DIR",
                   help="stage sr: a new run that fine-tunes the super-resolution of the trained deltaplane run "
                        "RUN_DIR (its settings and data unless given; 1000 steps at lr 2e-4, as the release)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--preset", choices=PRESETS,
                   help="model and schedule sizes under --config/--set: 'full' (the release's) or 'small' "
                        "(the CPU demo's tiny model, minutes on 2 cores; no --prior). Default: 'small' for "
                        "the no-argument demo on a CPU, else 'full'")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log.txt and the scalars as usual)")
    return p


#: Sizes a run starts from (before --config and --set).
PRESETS = ("full", "small")
#: Above this many trained parameters a CPU run is told about --preset small (the full model's
#: deltaplane predictor has ~22 M; a step takes ~28 s on a 2-core CPU at the release's sizes).
CPU_HINT_PARAMS = 5_000_000


def _demo_data(root: Path, size: int, log) -> Path:
    """The built-in synthetic talking head at ``size``^2 (the SR's output size: smaller frames
    would train the SR against upsampled pixels), written once under ``root``."""
    from ..data import make_synthetic_dataset

    data = root / ("data" if size == DEMO_SIZE else f"data-{size}")
    if not (data / "manifest.json").exists():
        log(f"writing the built-in synthetic talking head to {data} (10 s at {size}^2)")
        make_synthetic_dataset(data, seconds=10, size=size, seed=0)
    return data


#: The CPU demo's frames (its SR output is 64^2; stored larger, they are area-resized like real data).
DEMO_SIZE = 128


#: What a resumed run takes from its own folder; giving these with --resume would be ignored.
RESUME_FIXED = ("data", "prior", "config", "out", "preset", "init_from")


def _trainer(args, log):
    """The Trainer the arguments ask for; ValueError (DatasetError among them) / FileNotFoundError
    name what is wrong."""
    from .config import apply_overrides, demo_config, generator_config, load_config
    from .trainer import Trainer

    from ..devices import resolve_device

    device = None if args.device is None else str(resolve_device(args.device))
    device_type = "cuda" if torch.cuda.is_available() and (device or "cuda").startswith("cuda") else "cpu"
    if args.resume:
        given = [f"--{k}" for k in RESUME_FIXED if getattr(args, k) is not None]
        if given:
            raise ValueError(f"--resume continues a run with the dataset, prior and settings saved in it: "
                             f"{', '.join(given)} cannot change them (--set can, e.g. --set steps=N)")
        run = Path(args.resume)
        if not (run / "config.json").is_file():
            raise ValueError(f"--resume {run}: no config.json there (not a talk3d run folder)")
        try:
            saved = json.loads((run / "config.json").read_text())
            train, data, prior = saved["train"], saved["data"], saved["prior"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"--resume {run}: config.json is not a talk3d run config ({e})") from None
        stage = train.get("stage", "deltaplane")
        if apply_overrides(copy.deepcopy(train), list(args.set)).get("stage", stage) != stage:
            raise ValueError(f"--resume {run}: a run's stage cannot change (it is {stage}); fine-tune the "
                             f"super-resolution of a finished deltaplane run with --from {run}")
        cfg = load_config(None, args.set, base=train)
        return Trainer(cfg, data, run, prior=prior, device=device, resume=True, progress=not args.no_progress)
    if args.init_from is not None:
        return _sr_stage_trainer(args, device, log)
    demo = args.data is None
    if args.preset == "small" and args.prior:
        raise ValueError("--preset small is the demo's tiny generator, which cannot load a prior: "
                         "drop --prior, or use --preset full")
    if args.preset is not None:
        base = demo_config("cpu") if args.preset == "small" else None
    else:
        base = demo_config(device_type) if demo and args.config is None else None
    cfg = load_config(args.config, args.set, base=base)
    if args.prior is not None and not Path(args.prior).is_file():
        raise ValueError(f"--prior {args.prior}: no such file (python -m talk3d.prior convert writes one)")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if demo:
        data = _demo_data(Path("runs") / "demo", max(DEMO_SIZE, generator_config(cfg).sr_resolution), log)
        run = Path(args.out or f"runs/demo/run-{stamp}")
    else:
        data = Path(args.data)
        run = Path(args.out or f"runs/{data.name}-{stamp}")
    trainer = Trainer(cfg, data, run, prior=args.prior, device=device, progress=not args.no_progress)
    if trainer.main and trainer.device.type == "cpu" and trainer.trained_parameters > CPU_HINT_PARAMS:
        trainer.log(f"note: {trainer.trained_parameters / 1e6:.1f} M trained parameters on a CPU: tens of "
                    "seconds a step at the release's sizes (the bar shows the ETA); `--preset small` "
                    "trains the demo's small model in minutes")
    return trainer


def _sr_stage_trainer(args, device, log):
    """``--from RUN_DIR``: stage sr on top of a deltaplane run, with its settings (the model must be
    the same), SR_STAGE's schedule, then --config and --set."""
    from .config import SR_STAGE, load_config
    from .trainer import Trainer

    source = Path(args.init_from)
    if args.prior is not None or args.preset is not None:
        raise ValueError(f"--from {source} starts from that run's whole model and settings: --prior and --preset "
                         "do not apply")
    try:
        saved = json.loads((source / "config.json").read_text())
        train, data = saved["train"], saved["data"]
    except FileNotFoundError:
        raise ValueError(f"--from {source}: no config.json there (not a talk3d run folder)") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"--from {source}: config.json is not a talk3d run config ({e})") from None
    if train.get("stage") != "deltaplane":
        raise ValueError(f"--from {source}: a stage {train.get('stage')} run; stage sr starts from a deltaplane run")
    cfg = load_config(args.config, args.set, base={**train, **SR_STAGE, "init_from": str(source)})
    data = Path(args.data or data)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = Path(args.out or f"{source}-sr-{stamp}")
    log(f"stage sr from {source}: {cfg.steps} steps at lr {cfg.lr:g} on {data}")
    return Trainer(cfg, data, run, device=device, progress=not args.no_progress)


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    try:
        trainer = _trainer(args, log)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    try:
        result = trainer.fit()
    except KeyboardInterrupt:
        return 130
    if trainer.main:
        print(f"results in {trainer.run_dir}: log.txt, scalars.csv (training), val_scalars.csv (validation), "
              "previews/ (target | output | render), "
              f"checkpoints/latest.pt")
        key, what = trainer.headline
        print(f"validation L1 of the {what}: {result['first'][key]:.4f} -> {result['last'][key]:.4f}")
        print(f"next: python -m talk3d.infer --run {trainer.run_dir} --audio SPEECH.wav --out talk.mp4 "
              f"--camera orbit\n      python -m talk3d.evaluate --run {trainer.run_dir} --out EVAL_DIR")
    return 0


if __name__ == "__main__":
    sys.exit(main())
