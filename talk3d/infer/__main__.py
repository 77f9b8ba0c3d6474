"""``python -m talk3d.infer --run RUN --audio SPEECH.wav --out OUT.mp4``: render new speech.

``SPEECH`` is a WAV or any audio or video file FFmpeg reads (MP3, M4A, FLAC, a video's sound track).
Prints a progress bar (frames/s) and, at the end, the frame count, the seconds of audio, the wall
time and the real-time factor (wall time / audio duration: below 1 is faster than real time).

``--stream`` renders live through :class:`talk3d.Talker` as the audio arrives (from the file in
chunks, in real time with ``--realtime``, or raw PCM on stdin with ``--audio -``), writes each frame
as it comes out (to the mp4, or raw RGB24 to stdout with ``--out -``) and reports the latency; see
:mod:`talk3d.infer.live`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

from ..audio.features import SAMPLE_RATE
from ..devices import resolve_device
from .render import IMPLS, PRECISIONS, SOURCES, InferenceError, PoseRangeWarning, compile_for_inference, \
    load_training_clip, num_frames_for, read_speech, render_speech
from .video import StreamingVideoWriter


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m talk3d.infer", description=__doc__.splitlines()[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="run folder of python -m talk3d.train (its checkpoints/latest.pt, or "
                                     "--checkpoint)")
    which.add_argument("--ckpt", help="a checkpoint file in a run folder (RUN/checkpoints/NAME.pt): that run, that "
                                      "checkpoint")
    p.add_argument("--audio", required=True,
                   help="speech: a WAV, or any audio or video file FFmpeg reads (MP3, M4A, FLAC, a video's sound "
                        "track; through PyAV); any rate, any channels")
    p.add_argument("--out", required=True, help="output video (.mp4)")
    p.add_argument("--checkpoint", default="latest.pt", help="file in RUN/checkpoints (default latest.pt)")
    p.add_argument("--camera", default="gt",
                   help="gt (training cameras), orbit (yaw +-30, pitch +-20 deg), fixed:YAW,PITCH (deg), or a "
                        "JSON file with one [yaw, pitch] or 25-number label per frame (default gt)")
    p.add_argument("--size", default="sr",
                   help="sr: the super-resolved image; raw: the volume render; or either's pixel size (512 or 128 "
                        "at the release's sizes)")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32")
    p.add_argument("--batch", type=int, default=4, help="frames per forward pass")
    p.add_argument("--eye", choices=SOURCES, default="train", help="blinks: the training clip's, or none")
    p.add_argument("--pose", choices=SOURCES, default="train",
                   help="pose/landmark conditions: the training clip's, or frontal/mean")
    p.add_argument("--impl", default="auto", choices=IMPLS, help="field op back end (default auto: the fastest here)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--skip-empty", action="store_true",
                   help="skip empty space (occupancy grid of the render's frames) and stop opaque rays early")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the per-frame work: U-Net, render and SR in one graph (with --skip-empty, "
                        "whose sample counts vary, the U-Net alone); on CUDA in reduce-overhead mode, i.e. CUDA "
                        "graphs")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the summary line is still printed)")
    live = p.add_argument_group("live rendering")
    live.add_argument("--stream", action="store_true",
                      help="render as the audio arrives (talk3d.Talker) and report the latency; --audio - reads "
                           "raw 16-kHz mono s16le PCM from stdin, --out - writes raw RGB24 frames to stdout")
    live.add_argument("--realtime", action="store_true",
                      help="with --stream and an audio file: hand the audio over no faster than it would be spoken")
    live.add_argument("--chunk-ms", type=float, default=40.0, help="with --stream: audio chunk length (default 40)")
    return p


#: Containers the H.264 writer can fill (PyAV picks the muxer from the name).
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv")


def _check_out(out: Path, overwrite: bool) -> str | None:
    """Why ``out`` cannot take the video, checked before the model loads; None when it can."""
    if out.is_dir():
        return f"--out {out} is a folder; name the video file, e.g. {out / 'talk.mp4'}"
    if out.suffix.lower() not in VIDEO_SUFFIXES:
        return f"--out {out}: the video needs one of the suffixes {', '.join(VIDEO_SUFFIXES)} (H.264 with audio)"
    if out.exists() and not overwrite:
        return f"{out} exists; pass --overwrite to replace it"
    parent = next((p for p in [out.parent, *out.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        return f"--out {out}: {parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"--out {out}: cannot write into {parent}"
    return None


def soundtrack(path, wave16k) -> tuple:
    """The video's sound: the speech file as it sounds (its rate, mono or stereo), or, where PyAV
    cannot read it, the 16-kHz mono wave the model heard."""
    from ..audio.files import AudioFileError, read_soundtrack
    from .video import AAC_RATES

    try:
        track, rate = read_soundtrack(path, rates=AAC_RATES)
    except AudioFileError:
        return wave16k, SAMPLE_RATE
    if track.shape[1] == 0:
        return wave16k, SAMPLE_RATE
    return track, rate


def run_of_checkpoint(path) -> tuple[Path, str]:
    """--ckpt RUN/checkpoints/NAME.pt -> (RUN, NAME.pt): a checkpoint is read with its run's
    config.json (the model's sizes, the training data's place)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt {path}: no such file")
    run = path.resolve().parent.parent
    if path.resolve().parent.name != "checkpoints" or not (run / "config.json").is_file():
        raise FileNotFoundError(f"--ckpt {path}: not inside a run folder (RUN/checkpoints/{path.name} next to "
                                "RUN/config.json, which holds the model's sizes and where its training data is): "
                                "keep checkpoints in their run's checkpoints/ folder")
    return run, path.name


def main(argv=None) -> int:
    # PoseRangeWarning prints as one 'warning: ...' line (its source file and line mean nothing to
    # a user of the command); other warnings as Python shows them. Restored on return.
    with warnings.catch_warnings():
        show = warnings.showwarning

        def _show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, PoseRangeWarning):
                print(f"warning: {message}", file=sys.stderr)
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = _show
        return _main(argv)


def _main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.ckpt is not None:
        if args.checkpoint != "latest.pt":
            print("error: --ckpt names the checkpoint itself; --checkpoint goes with --run", file=sys.stderr)
            return 2
        try:
            run, args.checkpoint = run_of_checkpoint(args.ckpt)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        args.run = str(run)
    from ..progress import progress_bar

    from ..train import load_talking_head

    if args.stream:
        return _main_stream(args)
    if "-" in (args.audio, args.out):
        print("error: --audio - and --out - need --stream", file=sys.stderr)
        return 2
    out = Path(args.out)
    if problem := _check_out(out, args.overwrite):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        device = resolve_device(args.device)
        wave = read_speech(args.audio)
        model, info = load_talking_head(args.run, checkpoint=args.checkpoint, device=device)
        if args.compile:
            compile_for_inference(model, backend=args.compile_backend, skip_empty=args.skip_empty)
        clip = load_training_clip(info)
        frames = render_speech(model, info, wave, camera=args.camera, size=args.size, precision=args.precision,
                               batch=args.batch, eye=args.eye, pose=args.pose, impl=args.impl, clip=clip,
                               skip_empty=args.skip_empty, whole_batches=args.compile)
    except (InferenceError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = num_frames_for(wave)
    track, track_rate = soundtrack(args.audio, wave)
    bar = progress_bar(total=n, unit="frame", desc="render", file=sys.stderr, disable=args.no_progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = None
    try:
        for frame in frames:
            if writer is None:  # the size is known from the first frame
                writer = StreamingVideoWriter(out, frame.shape[1], frame.shape[0], track, sample_rate=track_rate)
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


def _main_stream(args) -> int:
    from .live import ArrivalLog, Mp4Sink, RawSink, pcm_chunks, run_live, wave_chunks
    from .talker import Talker

    to_stdout = args.out == "-"
    out = None if to_stdout else Path(args.out)
    if out is not None and (problem := _check_out(out, args.overwrite)):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.realtime and args.audio == "-":
        print("error: --realtime paces an audio file; audio from stdin arrives at its own pace", file=sys.stderr)
        return 2
    if args.skip_empty or args.compile:
        print("error: --skip-empty and --compile are offline options (a stream renders a few frames at a time)",
              file=sys.stderr)
        return 2
    if not (args.chunk_ms > 0):
        print(f"error: --chunk-ms must be positive, got {args.chunk_ms}", file=sys.stderr)
        return 2
    chunk = max(1, round(args.chunk_ms * SAMPLE_RATE / 1000))
    log = ArrivalLog()
    try:
        if args.audio == "-":
            chunks = pcm_chunks(sys.stdin.buffer, chunk, log)
        else:
            chunks = wave_chunks(read_speech(args.audio), chunk, log, realtime=args.realtime)
        talker = Talker(args.run, device=args.device, precision=args.precision, camera=args.camera, eye=args.eye,
                        pose=args.pose, size=args.size, impl=args.impl, batch=args.batch,
                        checkpoint=args.checkpoint)
        print(talker, file=sys.stderr)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
        report = run_live(talker, chunks, log, RawSink() if to_stdout else Mp4Sink(out))
    except (InferenceError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if report.delays.size == 0:
        print("error: no audio arrived; nothing was written", file=sys.stderr)
        return 2
    where = "stdout" if to_stdout else str(out)
    print(f"wrote {where}: {report.summary()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
