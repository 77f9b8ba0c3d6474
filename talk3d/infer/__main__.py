"""``python -m talk3d.infer --run RUN --audio SPEECH.wav --out OUT.mp4``: render new speech.

Prints a progress bar (frames/s) and, at the end, the frame count, the seconds of audio, the wall
time and the real-time factor (wall time / audio duration: below 1 is faster than real time).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..audio.features import SAMPLE_RATE
from .render import PRECISIONS, SIZES, SOURCES, InferenceError, load_training_clip, num_frames_for, read_speech, \
    render_speech
from .video import StreamingVideoWriter


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m talk3d.infer", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run folder of python -m talk3d.train")
    p.add_argument("--audio", required=True, help="speech, a PCM WAV file (any rate, any channels)")
    p.add_argument("--out", required=True, help="output video (.mp4)")
    p.add_argument("--checkpoint", default="latest.pt", help="file in RUN/checkpoints (default latest.pt)")
    p.add_argument("--camera", default="gt",
                   help="gt (training cameras), orbit (yaw +-30, pitch +-20 deg), fixed:YAW,PITCH (deg), or a "
                        "JSON file with one [yaw, pitch] or 25-number label per frame (default gt)")
    p.add_argument("--size", choices=SIZES, default="sr", help="sr: super-resolved image; raw: the volume render")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32")
    p.add_argument("--batch", type=int, default=4, help="frames per forward pass")
    p.add_argument("--eye", choices=SOURCES, default="train", help="blinks: the training clip's, or none")
    p.add_argument("--pose", choices=SOURCES, default="train",
                   help="pose/landmark conditions: the training clip's, or frontal/mean")
    p.add_argument("--impl", default="auto", help="field op back end: auto, torch, cpp, cuda, triton")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--skip-empty", action="store_true",
                   help="skip empty space (occupancy grid of the render's frames) and stop opaque rays early")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the per-frame U-Net (on CUDA in reduce-overhead mode, i.e. with CUDA graphs)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    import torch
    from tqdm import tqdm

    from ..train import load_talking_head

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        print(f"error: {out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    try:
        wave = read_speech(args.audio)
        model, info = load_talking_head(args.run, checkpoint=args.checkpoint, device=device)
        if args.compile:
            # The U-Net's attention + decoder is the per-frame network work (its encoder is cached):
            # compiled in place; CUDA graphs remove its many small launches on a GPU.
            mode = "reduce-overhead" if torch.device(device).type == "cuda" else None
            model.deltaplane.predictor.compile(backend=args.compile_backend, mode=mode)
        clip = load_training_clip(info)
        frames = render_speech(model, info, wave, camera=args.camera, size=args.size, precision=args.precision,
                               batch=args.batch, eye=args.eye, pose=args.pose, impl=args.impl, clip=clip,
                               skip_empty=args.skip_empty)
    except (InferenceError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = num_frames_for(wave)
    bar = tqdm(total=n, unit="frame", desc="render", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = None
    try:
        for frame in frames:
            if writer is None:  # the size is known from the first frame
                writer = StreamingVideoWriter(out, frame.shape[1], frame.shape[0], wave, sample_rate=SAMPLE_RATE)
            writer.write(frame)
            bar.update(1)
        writer.close()
    except BaseException:
        if writer is not None:  # no half-written file left behind (the writer works under a temporary name)
            writer.abort()
        raise
    finally:
        bar.close()
    wall = time.perf_counter() - start
    seconds = wave.shape[0] / SAMPLE_RATE
    print(f"wrote {out}: {n} frames, {seconds:.2f} s of audio, wall {wall:.2f} s "
          f"(real-time factor {wall / seconds:.2f}; {n / wall:.2f} frames/s incl. loading)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
