"""The training loop of stages ``deltaplane`` and ``sr``: a run folder with the config, a readable
log, CSV scalars, preview images and checkpoints (every N steps, at the end, and on Ctrl-C)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..progress import progress_bar

from ..audio.features import FPS
from ..data import TalkingHeadDataset, load_manifest
from ..models import DeltaplaneConfig, GeneratorConfig, TalkingHead, TriplaneGenerator
from .config import TrainConfig, generator_config
from .draws import FrameDraws, StepBatches
from .scalars import append_row
from .losses import (identity_network, loss_status, mouth_l1, perceptual_network, reconstruction_losses,
                     sync_network)

__all__ = ["Trainer", "build_model", "load_talking_head"]

CHECKPOINT_VERSION = 1


class RunLog:
    """Lines to the terminal (rank 0) and to run_dir/log.txt."""

    def __init__(self, path: Path | None):
        self.path = path

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        tqdm.write(line, file=sys.stderr)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(line + "\n")


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


#: Real footage shorter than this (training frames, 1 minute at 25 fps) gets a note in the run's log:
#: Talk3D's paper trains on 3-5 minutes of video a person. Measured (thirteenth session, CPU): on
#: psychopy's 7.8-s testMovie.mp4 (180 training frames, --preset small, 2000 steps) the mouth used
#: the audio on the frames trained on (mouth L1 0.0645 with each frame's own audio, 0.0762 with
#: another's) but not on the 17 held-out frames (0.0550 either way); with the pose and landmark
#: tokens off, no better on those (fourteenth session; docs/log.md).
SHORT_CLIP_FRAMES = 60 * FPS


#: Data-loading processes beside each GPU when the config leaves num_workers unset. Reading a step's
#: 512^2 frames in the training loop's own process takes 2.1 ms (2 frames), 8.6 ms with the lip-sync
#: window (7 frames), and a frame's first read from a long clip ~6 ms (benchmarks/test_bench_data.py
#: and the fifteenth session's log, one core of the 2-core VM), against 50 ms a step at 20 steps/s.
MAX_AUTO_WORKERS = 4


def auto_workers(device: torch.device) -> int:
    """DataLoader workers for ``num_workers = None``: none on a CPU (its cores are the training's,
    and the demo's two would be shared), else up to MAX_AUTO_WORKERS, at most half of this
    machine's cores split over the processes torchrun started on it (LOCAL_WORLD_SIZE)."""
    if device.type != "cuda":
        return 0
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(1, min(MAX_AUTO_WORKERS, (os.cpu_count() or 2) // (2 * local)))


def short_clip_note(train_frames: int, fps: int) -> str:
    """The log's one line for a real clip of ``train_frames`` training frames under SHORT_CLIP_FRAMES."""
    return (f"note: the training split holds {train_frames} frames ({train_frames / fps:.1f} s) of real video; "
            f"Talk3D's paper trains on 3-5 minutes. On a clip this short the mouth may follow the audio on "
            f"the frames trained on and not on others (measured on a 7.8-s clip): check it with "
            f"`python -m talk3d.evaluate` on the held-out frames, and record more video if you can")


#: The [generator] settings a run may change on a prior: how it is rendered, not what it holds.
PRIOR_RENDER_SETTINGS = ("neural_rendering_resolution", "coarse_samples", "importance_samples", "ray_start",
                         "ray_end")


def build_model(cfg: TrainConfig, audio_dim: int, *, prior: str | None, log) -> TalkingHead:
    """The talking head: from a converted prior (``python -m talk3d.prior convert``) or from scratch."""
    if prior is not None:
        from ..personalize import load_personalized
        from ..prior import load_checkpoint, load_generator

        personalized = bool(load_checkpoint(prior)[1].get("personalized"))
        if personalized:  # python -m talk3d.personalize: the person's w_ID and tuned generator
            gen, w_id = load_personalized(prior)
        else:
            gen = load_generator(prior)
            w_id = gen.backbone.mapping.w_avg[None, None].expand(1, gen.num_ws, -1).clone()
        gen.requires_grad_(False)
        if cfg.generator:  # the prior fixes the architecture; how it is rendered can change
            fixed = sorted(set(cfg.generator) - set(PRIOR_RENDER_SETTINGS))
            if fixed:
                raise ValueError(f"train config: with --prior the generator is the prior's: [generator] {fixed} cannot "
                                 f"change it (what can: {', '.join(PRIOR_RENDER_SETTINGS)})")
            gen.cfg = dataclasses.replace(gen.cfg, **cfg.generator)
            log(f"prior {prior}: rendered with " + ", ".join(f"{k} {v}" for k, v in cfg.generator.items()))
        with torch.no_grad():
            planes = gen.planes(w_id)
        # A generic prior's mean face is not the person: its triplane is fine-tuned unless told otherwise.
        learn = (not personalized) if cfg.learn_identity is None else cfg.learn_identity
        source = "the personalised w_ID" if personalized else "its mean latent (not personalised)"
        log(f"prior {prior}: identity triplane from {source}, " + ("fine-tuned" if learn else "kept fixed"))
        if not cfg.freeze_prior:
            gen.decoder.requires_grad_(True)
            gen.superresolution.requires_grad_(True)
    else:
        gcfg = generator_config(cfg)
        gen = TriplaneGenerator(gcfg)
        gen.backbone.requires_grad_(False)  # P_ID is learned directly; the backbone is not used
        g = torch.Generator().manual_seed(cfg.seed)
        planes = 0.1 * torch.randn(1, 3, gcfg.plane_channels, gcfg.plane_resolution, gcfg.plane_resolution, generator=g)
        w_id = torch.randn(1, gen.num_ws, gcfg.w_dim, generator=g)
        learn = True
        log("no prior given: the identity triplane, decoder and super-resolution are learned from scratch "
            "with the deltaplane predictor")
    gcfg = gen.cfg
    dcfg = dataclasses.replace(_deltaplane_base(cfg), plane_channels=gcfg.plane_channels,
                               plane_resolution=gcfg.plane_resolution, axes=gcfg.axes, audio_dim=audio_dim)
    return TalkingHead(gen, dcfg, planes, w_id, learn_identity=learn)


def _sr_stage_model(source: Path, audio_encoder: str, prior: str | None, log) -> tuple[TalkingHead, dict]:
    """Stage sr's starting point: the trained :class:`TalkingHead` of the deltaplane run ``source``
    (its latest checkpoint, frozen; :meth:`Trainer._set_stage` unfreezes the SR) and its model spec."""
    if prior is not None:
        raise ValueError(f"stage sr starts from the whole trained model of {source}: a prior ({prior}) has no "
                         "place there")
    model, info = load_talking_head(source)
    if info.get("audio_encoder") != audio_encoder:
        raise ValueError(f"init_from {source} was trained on audio features {info.get('audio_encoder')!r}, but "
                         f"this run's data has {audio_encoder!r}")
    log(f"stage sr: the model of {source} (checkpoints/latest.pt); its super-resolution is fine-tuned, the rest "
        "stays as trained")
    return model, info["model"]


def _deltaplane_base(cfg: TrainConfig) -> DeltaplaneConfig:
    """The deltaplane config the run asks for, before the generator's and the data's sizes are
    filled in: the preset, its ``[deltaplane]`` overrides, and ``blink_noise`` when given."""
    base = DeltaplaneConfig.tiny() if cfg.deltaplane_size == "tiny" else DeltaplaneConfig.release()
    over = dict(cfg.deltaplane)
    if cfg.blink_noise is not None:
        over["eye_noise"] = cfg.blink_noise
    return dataclasses.replace(base, **over)


def sr_input_note(resolution: int, gcfg) -> str:
    """The log line for a render larger than the super-resolution's input. The SR first resizes the
    render to its input size (EG3D's design, so that the render's size can change during training),
    so whatever the render holds beyond that size is computed and then averaged away. (The CPU demo
    rendered 32^2 into a 16^2 SR input until 2026-12-06: its renders showed the eyes, its outputs not.)"""
    sr_in = gcfg.sr_input_resolution
    return (f"note: the render ({resolution}^2) is larger than the super-resolution's input ({sr_in}^2 = "
            f"sr_resolution {gcfg.sr_resolution} / 2^{len(gcfg.sr_channels)} blocks): the SR shrinks it first, "
            f"losing its finer detail. Render at {sr_in}^2, or give the SR an input of {resolution}^2 "
            f"(generator.sr_resolution = {resolution} * 2^len(generator.sr_channels))")


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _image_grid(rows: list[list[torch.Tensor]]) -> np.ndarray:
    """rows of ``[3, H, W]`` images in [-1, 1] (same size) -> ``[H * rows, W * cols, 3]`` uint8."""
    strips = [torch.cat([im.float().clamp(-1, 1) for im in row], dim=2) for row in rows]
    grid = torch.cat(strips, dim=1)
    return ((grid + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def _check_new_run_dir(run_dir: Path, data_dir: Path) -> None:
    """A new run writes config.json, log.txt, scalars.csv, checkpoints/ and previews/ into run_dir:
    only into a folder that does not exist yet or is empty, never over what a user keeps there."""
    if run_dir.resolve() == data_dir.resolve():
        raise ValueError(f"run folder {run_dir} is the dataset folder: choose another --out")
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run folder {run_dir} is a file: choose another --out")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not _never_checkpointed(run_dir):
        what = ("holds a run: continue it with --resume, or choose another --out"
                if (run_dir / "config.json").exists() else "is not empty: choose another --out (a run never "
                "writes over files it did not make)")
        raise ValueError(f"run folder {run_dir} {what}")


#: What a run writes before its first checkpoint (a run stopped then may simply start again).
RUN_FILES = ("config.json", "log.txt", "scalars.csv", "val_scalars.csv", "checkpoints", "previews")


#: A log.txt line as RunLog writes it.
_LOG_LINE = re.compile(r"\[\d\d:\d\d:\d\d\] ")


def _never_checkpointed(run_dir: Path) -> bool:
    """run_dir holds a run that was refused or stopped before its first checkpoint, and only that
    run's files: an empty checkpoints/ folder, previews/ with only its val_step*.png, a log.txt in
    RunLog's format, and config.json (a run's) with any scalars. A new run may then start over there.
    Anything else, or a file that does not look like the run's own, keeps the folder refused."""
    names = {p.name for p in run_dir.iterdir()}
    if not names <= set(RUN_FILES):
        return False
    ck, pv = run_dir / "checkpoints", run_dir / "previews"
    if ck.exists() and (not ck.is_dir() or any(ck.iterdir())):
        return False
    if pv.exists() and (not pv.is_dir() or any(not f.match("val_step*.png") for f in pv.iterdir())):
        return False
    if "log.txt" in names:
        try:
            with open(run_dir / "log.txt") as f:
                if not _LOG_LINE.match(f.readline()):
                    return False
        except (OSError, UnicodeDecodeError):
            return False
    if "config.json" in names:
        try:
            return "train" in json.loads((run_dir / "config.json").read_text())
        except (json.JSONDecodeError, TypeError, OSError, UnicodeDecodeError):
            return False
    return not ({"scalars.csv", "val_scalars.csv"} & names)  # scalars come after a run's config.json


def _clear_failed_attempt(run_dir: Path) -> None:
    """A run starting over: the failed attempt's scalars and previews go (its log is continued)."""
    for name in ("scalars.csv", "val_scalars.csv"):
        (run_dir / name).unlink(missing_ok=True)
    for f in (run_dir / "previews").glob("val_step*.png"):
        f.unlink()


def _worker_ignores_stop_signals(worker_id: int) -> None:
    """A terminal's Ctrl-C reaches the DataLoader's workers too, and so does a scheduler's SIGTERM
    sent to the whole process group (Slurm, ``kill -- -PGID``): they must not die of either (the
    main process would fail with "worker exited unexpectedly" at its next batch instead of saving a
    checkpoint). They still leave: when the trainer closes the loader, or when their parent dies
    (PyTorch's workers watch it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _TerminationRequest:
    """Notes a SIGTERM or a first Ctrl-C (SIGINT) while training instead of stopping at once, so that
    the loop stops between two steps and saves a checkpoint of a whole step (a KeyboardInterrupt in
    the middle of one could save weights already updated under the old step count). A second
    Ctrl-C stops at once, as usual. Only the main thread can handle signals; elsewhere (a trainer
    driven from another thread) both keep their default actions."""

    def __init__(self, say=None):
        self.requested = None  # "SIGTERM" / "Ctrl-C" once asked
        self._say = say or (lambda msg: None)
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                if signal.getsignal(sig) is signal.SIG_IGN:  # e.g. SIGINT of a background job: ignored, as asked
                    continue
                self._previous[sig] = signal.signal(sig, self._note)

    def _note(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested == "Ctrl-C":
            raise KeyboardInterrupt  # the second Ctrl-C: now
        self.requested = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
        if signum == signal.SIGINT:
            self._say("Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to stop now)")

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


def checkpoint_error(path: Path, reason: str) -> str:
    """The message for a checkpoint that cannot be used, naming the others in its folder."""
    others = sorted(p.name for p in path.parent.glob("*.pt") if p != path)
    hint = f"; other checkpoints there: {', '.join(others[-3:])}" if others else ""
    return f"{path}: {reason}{hint}"


def _read_checkpoint(path: Path, map_location) -> dict:
    """torch.load of a checkpoint this code wrote, as plain data only (weights_only), with one clear
    error for every way a file can be damaged (empty, truncated, not a checkpoint at all)."""
    if path.stat().st_size == 0:
        raise ValueError(checkpoint_error(path, "empty file (0 bytes)"))
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types (pickle, zip, EOF) for a damaged file
        # torch's own text may suggest weights_only=False, which would run arbitrary code from the
        # file: that advice is never passed on; otherwise its first sentence is.
        text = str(e).strip()
        if "weights_only" in text:
            first = "it holds Python objects a checkpoint does not; refused unread, as loading them could run code"
        else:
            first = f"{type(e).__name__}: {text.splitlines()[0].split('. ')[0][:200]}" if text else type(e).__name__
        raise ValueError(checkpoint_error(path, f"not a readable talk3d checkpoint (damaged or another "
                                                f"kind of file: {first})")) from None
    if not isinstance(state, dict):
        raise ValueError(checkpoint_error(path, "not a talk3d checkpoint (no state dictionary inside)"))
    return state


class Trainer:
    """Trains a :class:`TalkingHead` on a preprocessed dataset. See ``python -m talk3d.train --help``."""

    def __init__(self, cfg: TrainConfig, data_dir, run_dir, *, prior: str | None = None, device=None,
                 resume: bool = False, progress: bool = True):
        self.cfg, self.data_dir, self.run_dir = cfg, Path(data_dir), Path(run_dir)
        self.progress = progress  # the step bar (the log and scalars are written either way)
        self.rank, self.world = _dist_info()
        self.main = self.rank == 0
        if device is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.loader_workers = cfg.num_workers if cfg.num_workers is not None else auto_workers(self.device)
        from ..ops.backends import check_impl

        check_impl(cfg.impl, self.device, "train config: impl")
        for name in ("lpips_weights", "face_id_weights", "syncnet_weights"):  # named by the user: must exist
            given = getattr(cfg, name)
            if given is not None and not Path(given).exists():
                raise FileNotFoundError(f"train config: {name} {given}: no such file or folder (leave it unset to "
                                        "train without that loss; the log then says how to enable it)")
        # The dataset is checked before anything is written: a wrong --data leaves no run folder.
        manifest = load_manifest(self.data_dir)
        self.audio_encoder = manifest["audio"]["encoder"]
        base = _deltaplane_base(cfg)  # the audio window each item carries: frames, feature rows per frame
        audio = dict(audio_window=base.audio_window, audio_steps=base.audio_steps)
        self.train_set = TalkingHeadDataset(self.data_dir, "train", **audio)
        self.val_set = TalkingHeadDataset(self.data_dir, "val", **audio)
        restarted = False
        if not resume:
            _check_new_run_dir(self.run_dir, self.data_dir)
            restarted = self.run_dir.is_dir() and any(self.run_dir.iterdir())
            if self.world > 1:  # every rank has looked before rank 0 creates it
                dist.barrier()
        if self.main:
            (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            (self.run_dir / "previews").mkdir(exist_ok=True)
        self.log = RunLog(self.run_dir / "log.txt") if self.main else (lambda msg: None)
        if restarted:
            if self.main:
                _clear_failed_attempt(self.run_dir)
            self.log(f"starting over in {self.run_dir}: the run there stopped before its first checkpoint (its "
                     "scalars and previews removed, its log continued)")
        torch.manual_seed(cfg.seed + self.rank)
        if cfg.stage == "sr":  # the trained model of init_from (of this run itself when resuming)
            source = self.run_dir if resume else Path(cfg.init_from)  # resumed: its own checkpoint
            self.model, spec = _sr_stage_model(source, self.audio_encoder, prior, self.log)
            self.model.to(self.device).train()
            default_resolution = int(spec["render_resolution"])
        else:
            self.model = build_model(cfg, int(manifest["audio"]["feature_dim"]), prior=prior, log=self.log)
            audio_net = self.model.deltaplane.condition.audio
            if audio_net is not None:  # the input's statistics (a resumed run's checkpoint then loads its own)
                audio_net.set_feature_statistics(self.train_set.audio_rows())
            self.model.to(self.device)
            default_resolution = self.model.generator.cfg.neural_rendering_resolution
        gcfg = self.model.generator.cfg
        self.resolution = cfg.render_resolution or default_resolution
        if cfg.coarse_samples is not None or cfg.importance_samples is not None:  # 0 importance samples is a choice
            self.model.generator.cfg = dataclasses.replace(
                gcfg, coarse_samples=cfg.coarse_samples or gcfg.coarse_samples,
                importance_samples=cfg.importance_samples if cfg.importance_samples is not None else gcfg.importance_samples)
        self._set_stage()
        if self.resolution > gcfg.sr_input_resolution:
            self.log(sr_input_note(self.resolution, gcfg))
        stored = int(manifest["image_size"])
        if stored < gcfg.sr_resolution:
            self.log(f"note: the dataset's frames are {stored}^2, smaller than the {gcfg.sr_resolution}^2 output: the "
                     f"output is trained against upsampled frames (no detail past {stored}^2). Preprocess the video "
                     f"at --size {gcfg.sr_resolution}, or train a smaller output (generator.sr_resolution)")
        if cfg.compile == "unet":
            # In place (nn.Module.compile): parameter names, checkpoints and DDP are unchanged. The
            # renderer is left eager: its hot path is already our fused kernels.
            self.model.deltaplane.predictor.compile(backend=cfg.compile_backend)
        elif cfg.compile == "model":
            # The whole forward (U-Net, render around the fused kernels, SR) and its backward: the
            # elementwise work between the kernels (dtype and layout copies, scalings) fuses. One
            # graph behind the model's prologue (tests/test_train.py).
            self.model.compile(backend=cfg.compile_backend)
        params = [p for p in self.model.parameters() if p.requires_grad]
        # Adam's fused kernel (one pass over all parameters; CUDA and CPU), and on a GPU cuDNN
        # autotuning (every step has the same shapes). On an H200 at the release's sizes: 76.3 ms a
        # step with neither, 74.0 with both; on this 2-core CPU at the demo's sizes, fused Adam alone:
        # 103 -> 101 ms (medians of 15, interleaved; benchmarks/profile_train.py, 2026-12-04).
        self.optimizer = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999), fused=True)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.steps_per_epoch = max(1, math.ceil(len(self.train_set) / (cfg.batch_size * self.world)))
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, cfg.lr_decay_epochs * self.steps_per_epoch,
                                                         gamma=cfg.lr_decay)
        self.net = self.model
        if self.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)  # e.g. SR noise strengths when its noise mode is "none"
        self.step = 0
        self.history: list[dict] = []
        n_train = sum(p.numel() for p in params)
        self.trained_parameters = n_train
        self.log(f"run {self.run_dir}: stage {cfg.stage}, {len(self.train_set)} train / {len(self.val_set)} val frames, "
                 f"{n_train / 1e6:.2f} M trained parameters, device {self.device}, {self.world} process(es), "
                 f"{self.loader_workers} data worker(s) each")
        if manifest.get("source") != "synthetic" and len(self.train_set) < SHORT_CLIP_FRAMES:
            self.log(short_clip_note(len(self.train_set), int(manifest["fps"])))
        sr_size = self.model.generator.cfg.sr_resolution
        # Stage sr trains with L1 + LPIPS on the SR output alone (the release's SR fine-tuning): the
        # render's losses cannot reach the SR, and the identity and lip-sync losses are not used.
        weights = cfg.loss if cfg.stage != "sr" else dataclasses.replace(
            cfg.loss, l1_raw=0.0, lpips_raw=0.0, mouth=0.0, mouth_lpips=0.0, identity=0.0, sync=0.0)
        if cfg.stage == "sr":
            self.log(f"stage sr: losses L1 x{weights.l1_sr:g} + LPIPS x{weights.lpips_sr:g} on the SR output")
        for line in loss_status(weights, cfg.lpips_weights, cfg.face_id_weights, sr_size, cfg.syncnet_weights,
                                render_size=self.resolution):
            self.log(line)
        self.lpips = perceptual_network(weights, cfg.lpips_weights, self.device)
        self.identity = identity_network(weights, cfg.face_id_weights, sr_size, self.device)
        self.sync = sync_network(weights, cfg.syncnet_weights, self.resolution, self.device)
        self.wave = None
        from ..losses.syncnet import SYNC_FRAMES

        if self.sync is not None and len(self.train_set) < SYNC_FRAMES:
            self.log(f"lip-sync loss off: it scores {SYNC_FRAMES} consecutive frames, the training split has "
                     f"{len(self.train_set)}")
            self.sync = None
        if self.sync is not None:  # the clip's speech, cut into the windows the sync loss scores
            from ..audio.features import read_wav

            self.wave = torch.from_numpy(read_wav(self.data_dir / manifest["files"]["audio"])[0])
        # Last: a resumed run must continue torch's random stream from the checkpoint, and building
        # the loss networks above draws from it (their layers initialise before the weights load).
        if resume:
            self._load(self.run_dir / "checkpoints" / "latest.pt")
            if self.main:  # the settings it continues with (--set steps, lr, ...), for the next --resume
                saved = json.loads((self.run_dir / "config.json").read_text())
                tmp = self.run_dir / "config.json.tmp"
                tmp.write_text(json.dumps({**saved, "train": cfg.to_dict()}, indent=2))
                os.replace(tmp, self.run_dir / "config.json")
        elif self.main:
            (self.run_dir / "config.json").write_text(json.dumps(
                {"train": cfg.to_dict(), "data": str(self.data_dir.resolve()), "prior": prior,
                 "audio_encoder": self.audio_encoder, "model": self.model_spec()}, indent=2))

    def model_spec(self) -> dict:
        """What rebuilds the model without the prior file or the dataset (see load_talking_head)."""
        m = self.model
        return {"generator": m.generator.cfg.to_dict(), "deltaplane": m.deltaplane.cfg.to_dict(),
                "learn_identity": m.learn_identity, "render_resolution": self.resolution}

    def _set_stage(self) -> None:
        """deltaplane: the predictor (and what is learned from scratch); sr: the super-resolution only."""
        if self.cfg.stage == "sr":
            self.model.requires_grad_(False)
            self.model.generator.superresolution.requires_grad_(True)

    @property
    def headline(self) -> tuple[str, str]:
        """The validation score that says whether the stage learns, and its name: the render's L1
        (stage deltaplane) or the SR output's (stage sr, where the render does not change)."""
        return ("val_l1_sr", "SR output") if self.cfg.stage == "sr" else ("val_l1_raw", "render")

    @property
    def amp_dtype(self):
        if self.cfg.amp == "bf16" or (self.cfg.amp == "auto" and self.device.type == "cuda"):
            return torch.bfloat16
        return None

    def _forward(self, batch, *, deterministic=False):
        dt = self.amp_dtype
        ctx = torch.autocast(self.device.type, dtype=dt) if dt else torch.autocast(self.device.type, enabled=False)
        with ctx:
            # The dataset's cameras were all checked when it loaded (validate_dataset): no per-step
            # check, whose read-back would stall a GPU's queue once a step.
            return self.net(batch, impl=self.cfg.impl, deterministic=deterministic, resolution=self.resolution,
                            check_cameras=False)

    # -- checkpoints -------------------------------------------------------------------------------
    def _state(self) -> dict:
        return {"version": CHECKPOINT_VERSION, "step": self.step, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "config": self.cfg.to_dict(), "audio_encoder": self.audio_encoder, "history": self.history,
                "rng": self._rng_state()}

    def _rng_state(self) -> dict:
        """torch's generators (render jitter, eye and SR noise draw from them): CPU, and the device's."""
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def save(self, name: str | None = None) -> Path | None:
        if not self.main:
            return None
        ckdir = self.run_dir / "checkpoints"
        path = ckdir / (name or f"step_{self.step:07d}.pt")
        tmp = path.with_suffix(".tmp")
        torch.save(self._state(), tmp)
        os.replace(tmp, path)
        latest = ckdir / "latest.pt"
        if path != latest:
            tmp = latest.with_suffix(".tmp")
            torch.save(self._state(), tmp)
            os.replace(tmp, latest)
        return path

    def _load(self, path: Path) -> None:
        if not path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {path} (the run stopped before its first "
                                    "checkpoint: start it again)")
        state = _read_checkpoint(path, self.device)
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(checkpoint_error(path, f"not a talk3d training checkpoint of version {CHECKPOINT_VERSION}"))
        if state["audio_encoder"] != self.audio_encoder:
            raise ValueError(f"{path} was trained on audio features {state['audio_encoder']!r}, but {self.data_dir} "
                             f"has {self.audio_encoder!r}")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:  # a model setting changed with --set: name it, no traceback
            raise ValueError(checkpoint_error(path, "its weights do not fit the model this config builds (was a "
                                                    "model setting changed with --set on --resume?): "
                                                    + str(e).strip().splitlines()[0][:300])) from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.history = int(state["step"]), list(state["history"])
        self._apply_schedule(dict(state.get("config", {})))
        rng = state["rng"]
        if self.world == 1:
            torch.set_rng_state(rng["torch"].cpu())
            if self.device.type == "cuda" and "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"].cpu(), self.device)
        else:  # one checkpoint holds rank 0's streams: every rank restarts its own from (seed, rank, step)
            torch.manual_seed(self.cfg.seed + self.rank + self.world * self.step)
            self.log("data-parallel resume: the frame order continues exactly; the random streams (render jitter, "
                     "noise) restart from the seed and the step")
        self.log(f"resumed from {path} at step {self.step}")

    def _apply_schedule(self, saved: dict) -> None:
        """--set lr / lr_decay / lr_decay_epochs on --resume: the loaded scheduler would keep the old
        ones; the new schedule applies from the current step on (lr = lr * decay^(step // period))."""
        keys = ("lr", "lr_decay", "lr_decay_epochs")
        changed = {k: (saved.get(k), getattr(self.cfg, k)) for k in keys if saved.get(k, getattr(self.cfg, k))
                   != getattr(self.cfg, k)}
        if not changed:
            return
        sch = self.scheduler
        sch.base_lrs = [self.cfg.lr for _ in sch.base_lrs]
        sch.gamma, sch.step_size = self.cfg.lr_decay, self.cfg.lr_decay_epochs * self.steps_per_epoch
        lr = self.cfg.lr * self.cfg.lr_decay ** (sch.last_epoch // sch.step_size)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sch._last_lr = [lr for _ in self.optimizer.param_groups]
        self.log("schedule changed on resume: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
                 + f"; lr now {lr:.3g}")

    # -- evaluation --------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean losses over ``val_frames`` validation frames spread evenly over the split (deterministic render)."""
        was = self.model.training
        self.model.eval()
        batch = _to(torch.utils.data.default_collate([self.val_set[i] for i in self.val_indices]), self.device)
        n = len(self.val_indices)
        out = self._forward(batch, deterministic=True)
        # Its total is that of a training batch (LPIPS summed over batch_size frames, as in training).
        losses = reconstruction_losses(out, batch, self.cfg.loss, self.lpips, self.identity,
                                       lpips_frames=self.cfg.batch_size)
        terms = {f"val_{k}": float(v) for k, v in losses.items()}
        if "audio" in batch and n > 1:
            # Does the mouth follow the audio? The same frames with each other's audio windows: a
            # model that uses the audio gets its mouth wrong there (mouth error above val_mouth).
            # Each frame takes the window of the frame half the batch away, about half the split
            # later: a neighbour's window (40 ms on) would share most of its audio.
            shuffled = dict(batch, audio=batch["audio"].roll(n // 2, dims=0))
            wrong = self._forward(shuffled, deterministic=True)["image_raw"]
            terms["val_mouth_wrong_audio"] = float(mouth_l1(wrong, batch))  # the mouth term alone: no LPIPS, no face net
        self.model.train(was)
        self._preview(out, batch)
        return terms

    @property
    def val_indices(self) -> list[int]:
        """The validation frames scored: ``val_frames`` of the split, evenly spaced, first and last included."""
        n, k = len(self.val_set), min(self.cfg.val_frames, len(self.val_set))
        return sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)})

    def _preview(self, out, batch) -> None:
        if not self.main:
            return
        from PIL import Image

        S = out["image"].shape[-1]
        tgt = torch.nn.functional.interpolate(batch["image"], size=(S, S), mode="area")
        raw = torch.nn.functional.interpolate(out["image_raw"].float(), size=(S, S), mode="nearest")
        k = min(4, tgt.shape[0])
        grid = _image_grid([[tgt[i], out["image"][i], raw[i]] for i in range(k)])
        Image.fromarray(grid).save(self.run_dir / "previews" / f"val_step{self.step:07d}.png")

    # -- training ----------------------------------------------------------------------------------
    @property
    def sync_from_step(self) -> int | None:
        """The first step with the lip-sync term (None: the run has none)."""
        return None if self.sync is None else self.cfg.loss.sync_start_epoch * self.steps_per_epoch

    def _loader(self):
        # One seeded sequence of draws for the whole run: a resumed run continues it where the
        # finished steps left it (draws.py); ranks take interleaved draws of the same sequence.
        # Once the lip-sync term is on, each step's batch also carries its window of consecutive
        # frames (StepBatches), read by the workers beside the batch instead of by the training loop.
        from ..losses.syncnet import SYNC_FRAMES

        draws = FrameDraws(len(self.train_set), self.cfg.seed, start=self.step * self.cfg.batch_size * self.world,
                           rank=self.rank, world=self.world)
        steps = StepBatches(draws, self.cfg.batch_size, first_step=self.step, window=SYNC_FRAMES,
                            window_from=self.sync_from_step, seed=self.cfg.seed, rank=self.rank)
        # Pinned batches: a copy from pageable memory waits for the GPU's queue to drain (one stall a
        # step); from pinned memory, non_blocking copies are queued behind the running step.
        # Its own generator: iter(DataLoader) draws the workers' base seed from it, which from torch's
        # global generator would shift a resumed run's random streams (render jitter, noise) by one.
        workers = self.loader_workers
        return DataLoader(self.train_set, batch_sampler=steps, generator=torch.Generator().manual_seed(self.cfg.seed + self.rank),
                          worker_init_fn=_worker_ignores_stop_signals,
                          num_workers=workers, persistent_workers=workers > 0,
                          pin_memory=self.device.type == "cuda")

    def _sync_term(self, window: dict | None = None) -> torch.Tensor:
        """Wav2Lip's expert sync loss on 5 consecutive training frames rendered with their audio
        (on the render, as the release: its gradient reaches the deltaplane without the SR).

        The lip-sync network scores a window of frames against its 0.2 s of speech, which random
        training batches do not form, so each step past ``sync_start_epoch`` renders one extra window:
        ``window``, the 5 frames collated on the host (the loader's, in :meth:`fit`), else 5 read here.
        """
        from ..losses.syncnet import SAMPLES_PER_FRAME, SYNC_FRAMES

        if window is None:
            start = int(torch.randint(len(self.train_set) - SYNC_FRAMES + 1, (1,)))
            window = torch.utils.data.default_collate([self.train_set[i] for i in range(start, start + SYNC_FRAMES)])
        first = int(window["index"][0]) * SAMPLES_PER_FRAME  # on the host: no wait for the device
        frames = self._forward(_to(window, self.device))["image_raw"].float()  # [5, 3, s, s]: the render
        wave = self.wave[first:first + SYNC_FRAMES * SAMPLES_PER_FRAME]
        wave = torch.nn.functional.pad(wave, (0, SYNC_FRAMES * SAMPLES_PER_FRAME - wave.shape[0]))
        return self.sync(frames[None], wave[None].to(self.device)).mean()

    def train_step(self, batch, window: dict | None = None) -> dict[str, torch.Tensor]:
        """One optimisation step on ``batch`` (on the device); ``window``: the lip-sync term's frames
        (see :meth:`_sync_term`), used from ``sync_start_epoch`` on. Returns the loss terms and the
        gradient norm as detached 0-d tensors on the device: reading one (``float()``) waits for
        the step to finish on a GPU, and with nothing to wait on the host queues the next step
        while this one runs, so :meth:`fit` reads them only on the steps it logs."""
        self.model.train()
        out = self._forward(batch)
        terms = reconstruction_losses(out, batch, self.cfg.loss, self.lpips, self.identity,
                                      sr_only=self.cfg.stage == "sr")
        if self.sync is not None and self.step // self.steps_per_epoch >= self.cfg.loss.sync_start_epoch:
            terms["sync"] = self._sync_term(window)
            terms["total"] = terms["total"] + self.cfg.loss.sync * terms["sync"]
        self.optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        gnorm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return {**{k: v.detach() for k, v in terms.items()}, "grad_norm": gnorm.detach()}

    def _scalars(self, row: dict, file: str = "scalars.csv") -> None:
        """A row of training (scalars.csv) or validation (val_scalars.csv) values: see scalars.py."""
        if self.main:
            append_row(self.run_dir / file, row)

    def _stop_now(self, stop: "_TerminationRequest") -> bool:
        """Whether to stop after this step. One process: as soon as asked. Data-parallel: the ranks
        agree (a rank that went on alone would wait in the next all-reduce), on logging steps only
        (the agreement reads a value back, which the other steps avoid)."""
        if self.world == 1:
            return stop.requested is not None
        if self.step % self.cfg.log_every:
            return False
        device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        flag = torch.tensor([1.0 if stop.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        asked = flag.item() > 0
        if asked and stop.requested is None:
            stop.requested = "peer"  # another rank was told
        return asked

    def fit(self) -> dict:
        """Train to ``cfg.steps``; returns the first and last validation scores."""
        cfg = self.cfg
        if self.step >= cfg.steps and self.history:
            self.log(f"run already finished: step {self.step} of steps = {cfg.steps}; to train further, resume with "
                     f"--set steps=N (N > {self.step})")
            return {"first": self.history[0], "last": self.history[-1], "checkpoint": None}
        if self.step == 0:
            first = self.evaluate()
            self.history.append({"step": 0, **first})
            self._scalars({"step": 0, **first}, "val_scalars.csv")  # the curve's starting point
            self.log("step 0: " + ", ".join(f"{k} {v:.4f}" for k, v in first.items()))
        loader = self._loader()
        batches = iter(loader)
        bar = progress_bar(total=cfg.steps, initial=self.step, desc=f"train {cfg.stage}", unit="step",
                   disable=not (self.main and self.progress), dynamic_ncols=True)
        stop = _TerminationRequest(say=self.log if self.main else None)
        try:
            while self.step < cfg.steps:
                batch = next(batches)  # endless (StepBatches)
                window = None
                if len(batch["index"]) > cfg.batch_size:  # the lip-sync term's frames came along
                    b = cfg.batch_size
                    batch, window = {k: v[:b] for k, v in batch.items()}, {k: v[b:] for k, v in batch.items()}
                terms = self.train_step(_to(batch, self.device), window)
                if self.step % cfg.log_every == 0:  # the only steps whose values are read (train_step)
                    values = {k: float(v) for k, v in terms.items()}
                    self._scalars({"step": self.step, "lr": self.scheduler.get_last_lr()[0], **values})
                    # refresh=False: the update redraws, at the bar's own pace (progress.py)
                    bar.set_postfix(loss=f"{values['total']:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.1e}",
                                    refresh=False)
                bar.update(1)
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    scores = self.evaluate()
                    self.history.append({"step": self.step, **scores})
                    self._scalars({"step": self.step, **scores}, "val_scalars.csv")
                    self.log(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
                if self.step % cfg.checkpoint_every == 0:
                    self.save()
                if self._stop_now(stop):  # SIGTERM (kill, timeout, pre-emption) or Ctrl-C: stop between steps
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            path = self.save()
            why = {"SIGTERM": "terminated (SIGTERM)", "Ctrl-C": "stopped (Ctrl-C)",
                   "peer": "stopped with the other ranks"}.get(stop.requested, "interrupted")
            self.log(f"{why} at step {self.step}; saved {path}; continue with --resume {self.run_dir}")
            raise
        finally:
            stop.close()
            bar.close()
        path = self.save()
        first, last = self.history[0], self.history[-1]
        key, what = self.headline
        self.log(f"done: {self.step} steps; val L1 ({what}) {first[key]:.4f} -> {last[key]:.4f}, "
                 f"mouth {first['val_mouth']:.4f} -> {last['val_mouth']:.4f}; checkpoint {path}")
        return {"first": first, "last": last, "checkpoint": str(path) if path else None}


def load_talking_head(run_dir, *, checkpoint: str = "latest.pt", device="cpu") -> tuple[TalkingHead, dict]:
    """A trained :class:`TalkingHead` from a run folder, in eval mode without gradients.

    Returns ``(model, info)``; info is the run's config.json (``data``, ``audio_encoder``,
    ``model`` with ``render_resolution``, ...). Needs neither the prior file nor the dataset.
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is a file; a run is the folder python -m talk3d.train wrote")
    try:
        info = json.loads((run_dir / "config.json").read_text())
        spec = info["model"]
    except FileNotFoundError:
        runs = sorted(p.parent for p in run_dir.glob("*/config.json"))
        hint = f"; it holds the runs {', '.join(r.name for r in runs)}: pass one, e.g. {runs[-1]}" if runs else ""
        raise FileNotFoundError(f"{run_dir}: no config.json (not a talk3d run folder){hint}") from None
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{run_dir}/config.json is not a talk3d run config ({e})") from None
    gen = TriplaneGenerator(GeneratorConfig.from_dict(spec["generator"]))
    dcfg = DeltaplaneConfig.from_dict(spec["deltaplane"])
    g = gen.cfg
    planes = torch.zeros(1, 3, g.plane_channels, g.plane_resolution, g.plane_resolution)
    model = TalkingHead(gen, dcfg, planes, torch.zeros(1, gen.num_ws, g.w_dim), learn_identity=spec["learn_identity"])
    path = run_dir / "checkpoints" / checkpoint
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no checkpoint {path.name} (train first, or name one in checkpoints/)")
    state = _read_checkpoint(path, "cpu")
    if "model" not in state:
        raise ValueError(checkpoint_error(path, "not a talk3d training checkpoint (no model weights inside)"))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:  # another model's weights: torch lists every key and shape
        lines = str(e).strip().splitlines()
        raise ValueError(checkpoint_error(path, "holds weights of another model than this run's config.json "
                                                f"({' '.join(lines[1:2]).strip()[:300]} ...)")) from None
    return model.to(device).eval().requires_grad_(False), info
