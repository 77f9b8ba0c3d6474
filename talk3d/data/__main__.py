"""``python -m talk3d.data synth --out DIR [--seconds 10 --size 128 --seed 0]`` and
``python -m talk3d.data validate DIR``."""
from __future__ import annotations

import argparse
import sys
import time

from .format import validate_dataset
from .synthetic import make_synthetic_dataset


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m talk3d.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    synth = sub.add_parser("synth", help="write the built-in synthetic talking-head clip")
    synth.add_argument("--out", required=True, help="dataset folder to create")
    synth.add_argument("--seconds", type=float, default=10.0)
    synth.add_argument("--size", type=int, default=128, help="image side in pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--feature-dim", type=int, default=32, help="log-mel features per slot")
    synth.add_argument("--supersample", type=int, default=1, help="anti-aliasing factor")
    synth.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    check = sub.add_parser("validate", help="check a dataset folder against its manifest")
    check.add_argument("dir")
    args = parser.parse_args(argv)
    try:
        if args.command == "synth":
            start = time.time()
            path = make_synthetic_dataset(args.out, args.seconds, args.size, args.seed,
                                          feature_dim=args.feature_dim,
                                          supersample=args.supersample, overwrite=args.overwrite)
            print(f"wrote {path} in {time.time() - start:.1f} s")
        else:
            m = validate_dataset(args.dir)
            print(f"{args.dir}: valid, {m['num_frames']} frames of {m['image_size']}^2, audio "
                  f"{m['audio']['encoder']} (D={m['audio']['feature_dim']}), split {m['split']}")
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
