"""``python -m talk3d.preprocess VIDEO --out DIR [--audio FILE] [--size 512] [--start S] [--max-frames N]
[--resume] [--audio-encoder logmel|wav2vec2 --wav2vec2-path P] [--foreground auto|segmentation|landmarks]``: a video of one talking person
-> a talk3d dataset folder (see talk3d.data.format), plus DIR/contact_sheet.png to check by eye."""
from __future__ import annotations

import argparse
import sys
import time

from .errors import PreprocessError
from .pipeline import preprocess_video


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m talk3d.preprocess", description=__doc__)
    p.add_argument("video", help="input video (any container/codec FFmpeg reads)")
    p.add_argument("--out", required=True, help="dataset folder to create")
    p.add_argument("--audio", help="separate sound track (WAV or any audio file) to use instead "
                                   "of the video's")
    p.add_argument("--size", type=int, default=512, help="crop side in pixels")
    p.add_argument("--start", type=float, default=0.0,
                   help="seconds of the video to skip (e.g. to use the part after the face is away too long)")
    p.add_argument("--max-frames", type=int, help="use at most N frames (at 25 fps), from --start on")
    p.add_argument("--resume", action="store_true",
                   help="reuse the steps cached in OUT.work/ by an interrupted run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    p.add_argument("--keep-work", action="store_true", help="keep OUT.work/ after success")
    p.add_argument("--audio-encoder", default="logmel", choices=("logmel", "wav2vec2"),
                   help="audio features the model reads: log-mel bands (default) or a local wav2vec2 "
                        "model's (--wav2vec2-path)")
    p.add_argument("--wav2vec2-path", help="local wav2vec2 model folder (never downloaded)")
    p.add_argument("--feature-dim", type=int, default=32, help="log-mel bands")
    p.add_argument("--foreground", default="auto", choices=("auto", "segmentation", "landmarks"),
                   help="foreground mask: a person segmentation (MediaPipe's selfie model run by "
                        "ai-edge-litert; see TALK3D_SELFIE_SEGMENTER), drawn from the landmarks, or "
                        "the first where available (default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    start = time.time()
    try:
        preprocess_video(args.video, args.out, audio=args.audio, size=args.size,
                         max_frames=args.max_frames, start=args.start, resume=args.resume,
                         overwrite=args.overwrite, audio_encoder=args.audio_encoder,
                         wav2vec2_path=args.wav2vec2_path, feature_dim=args.feature_dim,
                         keep_work=args.keep_work, foreground=args.foreground,
                         progress=not args.no_progress)
    except (PreprocessError, ValueError, FileExistsError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2  # as the other commands (and argparse) for a refused input
    print(f"done in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
