"""``python -m talk3d.prior``: convert release pickles to our checkpoints, sample faces from them.

    python -m talk3d.prior convert ffhqrebalanced512-128.pkl eg3d.safetensors
    python -m talk3d.prior convert ffhq-fixed-triplane512-128.pkl talk3d-prior.safetensors --axes fixed
    python -m talk3d.prior sample --ckpt talk3d-prior.safetensors --seeds 0-3 --yaw 20 --pitch 5 --out samples
    python -m talk3d.prior sample --random-init ffhq --seeds 0 --out random   # no weights: says so
"""
from __future__ import annotations

import argparse
import sys



def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m talk3d.prior", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="EG3D/Talk3D release pickle -> .safetensors or .pt checkpoint")
    c.add_argument("input", help="release pickle (ffhqrebalanced512-128.pkl, ffhq-fixed-triplane512-128.pkl)")
    c.add_argument("output", help="our checkpoint: .safetensors (preferred) or .pt")
    c.add_argument("--axes", choices=["eg3d", "fixed"], default=None,
                   help="plane convention; default: 'fixed' when the file name says so, else 'eg3d'")
    c.add_argument("--key", default="G_ema", help="network in the pickle (default G_ema)")
    c.add_argument("--allow-unmapped", action="store_true", help="drop release tensors our generator does not have")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    s = sub.add_parser("sample", help="images (and an orbit video) from a checkpoint")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="our checkpoint (see convert)")
    src.add_argument("--random-init", choices=["ffhq", "tiny"],
                     help="no weights: a randomly initialised generator of that size (noise images)")
    s.add_argument("--seeds", default="0-3")
    s.add_argument("--yaw", type=float, default=0.0, help="degrees")
    s.add_argument("--pitch", type=float, default=0.0, help="degrees")
    s.add_argument("--truncation", type=float, default=0.7)
    s.add_argument("--orbit", type=int, default=48,
                   help="frames of the orbit video of the first seed (mp4 with PyAV, else GIF; 0: none)")
    s.add_argument("--impl", default="auto", choices=("auto", "torch", "cpu", "cuda", "triton"),
                   help="render back end (default auto: the fastest here)")
    s.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:  # the messages name the file and the problem
        parser.exit(2, f"{parser.prog}: error: {e}\n")


def _run(args) -> int:
    if args.command == "convert":
        from pathlib import Path

        if Path(args.output).exists() and not args.overwrite:  # checked before reading the pickle
            raise FileExistsError(f"{args.output} already exists; pass --overwrite to replace it")
        from .convert import convert_release

        convert_release(args.input, args.output, axes=args.axes, key=args.key,
                        allow_unmapped=args.allow_unmapped, overwrite=args.overwrite)
        return 0
    from ..models import GeneratorConfig, TriplaneGenerator
    from .convert import load_generator
    from .sample import orbit_frames, parse_seeds, sample_images, write_outputs

    from ..devices import resolve_device

    args.device = str(resolve_device(args.device))
    seeds = parse_seeds(args.seeds)
    if args.ckpt:
        gen = load_generator(args.ckpt, device=args.device)
    else:
        print(f"WARNING: --random-init {args.random_init}: random weights, the images are noise. "
              "Convert EG3D's ffhqrebalanced512-128.pkl or Talk3D's ffhq-fixed-triplane512-128.pkl "
              "(python -m talk3d.prior convert) for faces.", file=sys.stderr)
        cfg = GeneratorConfig.ffhq() if args.random_init == "ffhq" else GeneratorConfig.tiny()
        gen = TriplaneGenerator(cfg).to(args.device).eval().requires_grad_(False)
    images = sample_images(gen, seeds, yaw=args.yaw, pitch=args.pitch, truncation=args.truncation, impl=args.impl,
                           progress=not args.no_progress)
    named = {f"seed{s:04d}_yaw{args.yaw:+.0f}_pitch{args.pitch:+.0f}": im for s, im in zip(seeds, images)}
    gifs = {}
    if args.orbit > 0:
        gifs[f"orbit_seed{seeds[0]:04d}"] = orbit_frames(gen, seeds[0], frames=args.orbit,
                                                         truncation=args.truncation, impl=args.impl,
                                                         progress=not args.no_progress)
    for path in write_outputs(named, gifs, args.out, overwrite=args.overwrite):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
