"""``python -m talk3d.evaluate --run RUN --out EVAL_DIR``: score a trained run on its held-out frames.

Writes EVAL_DIR/metrics.json (every metric per protocol and pose; ``available: false`` with the
reason where one could not run), metrics.md (the paper's Tables 2 and 1), grid_<pose>.png
(target | ours) and mouth_vs_audio.png; with OpenFace (--openface) also action_units/ (the frames
it read and the CSVs it wrote, for AUE).
"""
from __future__ import annotations

import argparse
import sys

from ..infer.render import IMPLS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m talk3d.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run folder of python -m talk3d.train")
    p.add_argument("--out", required=True, help="output folder for the report")
    p.add_argument("--split", default="val", choices=("val", "train", "all"), help="frames to score (default val)")
    p.add_argument("--max-frames", type=int, default=None, help="score only the first N frames of the split")
    p.add_argument("--impl", default="auto", choices=IMPLS, help="field op back end (default auto: the fastest here)")
    p.add_argument("--lpips-weights", default=None, help="folder with LPIPS weights (see talk3d.losses)")
    p.add_argument("--face-id-weights", default=None, help="dlib face network file for IDSIM (see talk3d.losses)")
    p.add_argument("--syncnet-weights", default=None, help="Wav2Lip lipsync_expert.pth for the Sync metric")
    p.add_argument("--inception-weights", default=None,
                   help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (file or folder) for FID; "
                        "else $TALK3D_INCEPTION_WEIGHTS or torch hub's cache")
    p.add_argument("--lse-weights", default=None,
                   help="syncnet_python's syncnet_v2.model (file or folder) for the paper's Sync (LSE-C, LSE-D); "
                        "else $TALK3D_SYNCNET_V2_WEIGHTS")
    p.add_argument("--openface", default=None,
                   help="OpenFace 2's FeatureExtraction binary (or its folder) for AUE; else $TALK3D_OPENFACE "
                        "or FeatureExtraction on the PATH")
    p.add_argument("--checkpoint", default="latest.pt", help="file in RUN/checkpoints (default latest.pt)")
    p.add_argument("--batch", type=int, default=4, help="frames per forward pass")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from .protocol import EvaluationError, evaluate_run

    if args.max_frames is not None and args.max_frames < 1:
        print("error: --max-frames must be >= 1", file=sys.stderr)
        return 2
    if args.batch < 1:
        print("error: --batch must be >= 1", file=sys.stderr)
        return 2
    try:
        result = evaluate_run(args.run, args.out, split=args.split, max_frames=args.max_frames, impl=args.impl,
                              lpips_weights=args.lpips_weights, batch=args.batch, device=args.device,
                              checkpoint=args.checkpoint, overwrite=args.overwrite,
                              face_id_weights=args.face_id_weights, syncnet_weights=args.syncnet_weights,
                              inception_weights=args.inception_weights, openface=args.openface,
                              lse_weights=args.lse_weights, progress=not args.no_progress)
    except (EvaluationError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ad = result["protocols"]["audio_driven"]["metrics"]
    shown = ", ".join(f"{k} {v['mean']:.4f}" for k, v in ad.items() if v.get("available") and v.get("mean") is not None)
    print(f"wrote {args.out}: {result['frames']} frames; audio-driven {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
