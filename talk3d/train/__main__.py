"""``python -m talk3d.train``: train Talk3D's deltaplane predictor (or fine-tune the SR).

With no arguments it trains on the built-in synthetic talking head, sized to the machine (minutes
on a 2-core CPU), and prints where the results are. Otherwise:

    python -m talk3d.train --data DATASET_DIR [--prior PRIOR.safetensors] [--config run.toml]
                           [--set steps=20000 --set loss.mouth=10] [--out runs/NAME]
    python -m talk3d.train --data DATASET_DIR --preset small   # the demo's small model: minutes on a CPU
    python -m talk3d.train --resume runs/NAME          # continue an interrupted run
    torchrun --nproc-per-node 2 -m talk3d.train ...    # data-parallel (DDP)
"""
from __future__ import annotations

import argparse
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
    p.add_argument("--out", help="run folder (default runs/<data name>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--preset", choices=PRESETS,
                   help="model and schedule sizes under --config/--set: 'full' (the release's) or 'small' "
                        "(the CPU demo's tiny model, minutes on 2 cores; no --prior). Default: 'small' for "
                        "the no-argument demo on a CPU, else 'full'")
    return p


#: Sizes a run starts from (before --config and --set).
PRESETS = ("full", "small")
#: Above this many trained parameters a CPU run is told about --preset small (the full model's
#: deltaplane predictor has ~22 M; a step takes ~28 s on a 2-core CPU at the release's sizes).
CPU_HINT_PARAMS = 5_000_000


def _demo_data(root: Path, log) -> Path:
    from ..data import make_synthetic_dataset

    data = root / "data"
    if not (data / "manifest.json").exists():
        log(f"writing the built-in synthetic talking head to {data} (10 s at 128^2)")
        make_synthetic_dataset(data, seconds=10, size=128, seed=0)
    return data


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from .config import demo_config, load_config
    from .trainer import Trainer

    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    device_type = "cuda" if torch.cuda.is_available() and (args.device or "cuda").startswith("cuda") else "cpu"
    if args.resume:
        run = Path(args.resume)
        saved = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else None
        if saved is None:
            raise SystemExit(f"--resume {run}: no config.json there (not a talk3d run folder)")
        cfg = load_config(None, args.set, base=saved["train"])
        trainer = Trainer(cfg, saved["data"], run, prior=saved["prior"], device=args.device, resume=True)
    else:
        demo = args.data is None
        if args.preset == "small" and args.prior:
            raise SystemExit("--preset small is the demo's tiny generator, which cannot load a prior: "
                             "drop --prior, or use --preset full")
        if args.preset is not None:
            base = demo_config("cpu") if args.preset == "small" else None
        else:
            base = demo_config(device_type) if demo and args.config is None else None
        cfg = load_config(args.config, args.set, base=base)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        if demo:
            data = _demo_data(Path("runs") / "demo", log)
            run = Path(args.out or f"runs/demo/run-{stamp}")
        else:
            data = Path(args.data)
            run = Path(args.out or f"runs/{data.name}-{stamp}")
        if (run / "checkpoints" / "latest.pt").exists():
            raise SystemExit(f"{run} already holds a run: use --resume {run}, or another --out")
        trainer = Trainer(cfg, data, run, prior=args.prior, device=args.device)
        if trainer.main and trainer.device.type == "cpu" and trainer.trained_parameters > CPU_HINT_PARAMS:
            trainer.log(f"note: {trainer.trained_parameters / 1e6:.1f} M trained parameters on a CPU: tens of "
                        "seconds a step at the release's sizes (the bar shows the ETA); `--preset small` "
                        "trains the demo's small model in minutes")
    try:
        result = trainer.fit()
    except KeyboardInterrupt:
        return 130
    if trainer.main:
        print(f"results in {trainer.run_dir}: log.txt, scalars.csv, previews/ (target | output | render), "
              f"checkpoints/latest.pt")
        first, last = result["first"]["val_l1_raw"], result["last"]["val_l1_raw"]
        print(f"validation L1 of the render: {first:.4f} -> {last:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
