"""Release pickle -> our checkpoint -> generator, and `python -m talk3d.prior convert/sample`.

The pickles are written in the release's persistent-object record format by the tests themselves
(fake ``torch_utils.persistence`` only while writing; see test_prior_import.py).
"""
from __future__ import annotations

import dataclasses
import pickle
import sys

import numpy as np
import pytest
import torch
from test_prior_import import fake_eg3d_code

from talk3d.models import GeneratorConfig, TriplaneGenerator
from talk3d.prior import config_from_release, convert_release, load_generator
from talk3d.prior.__main__ import main
from talk3d.render import look_at_camera

SRC = "# EG3D module source would be here; it must never run\nraise SystemExit('executed')\n"


class _Persistent:
    """Pickles one module as a persistence record: state = its tensors, children, constructor kwargs."""

    def __init__(self, module: torch.nn.Module, class_name: str, init_kwargs=None, attrs=None):
        self.module, self.class_name = module, class_name
        self.init_kwargs, self.attrs = init_kwargs or {}, attrs or {}

    def __reduce__(self):
        m = self.module
        state = dict(
            _parameters=dict(m._parameters), _buffers=dict(m._buffers),
            _non_persistent_buffers_set=set(m._non_persistent_buffers_set), training=False,
            _modules={n: _Persistent(c, type(c).__name__) for n, c in m._modules.items()},
            _init_args=(), _init_kwargs=self.init_kwargs, **self.attrs)
        meta = dict(type="class", version=6, module_src=SRC, class_name=self.class_name, state=state)
        return (sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,))


def _release_kwargs(cfg: GeneratorConfig) -> dict:
    """EG3D's TriPlaneGenerator constructor arguments for a config (what the release records)."""
    return dict(
        z_dim=cfg.z_dim, c_dim=cfg.c_dim, w_dim=cfg.w_dim, img_resolution=cfg.sr_resolution,
        img_channels=cfg.img_channels, channel_base=cfg.channel_base, channel_max=cfg.channel_max,
        mapping_kwargs=dict(num_layers=cfg.mapping_layers),
        rendering_kwargs=dict(depth_resolution=cfg.coarse_samples, depth_resolution_importance=cfg.importance_samples,
                              ray_start=cfg.ray_start, ray_end=cfg.ray_end, box_warp=cfg.box_warp,
                              avg_camera_radius=cfg.camera_radius, avg_camera_pivot=list(cfg.camera_pivot),
                              c_scale=cfg.c_scale, superresolution_noise_mode=cfg.sr_noise_mode,
                              sr_antialias=cfg.sr_antialias, c_gen_conditioning_zero=cfg.c_conditioning_zero))


def _tiny_release(tmp_path, name="tiny.pkl", extra_tensor=False):
    """A tiny generator whose non-architecture settings differ from the defaults, written as a release."""
    cfg = dataclasses.replace(GeneratorConfig.tiny(), ray_start=2.2, camera_radius=2.6)
    gen = TriplaneGenerator(cfg).eval()
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(0.05 * torch.randn_like(p))  # not the initial values: the import must carry them
    if extra_tensor:
        gen.register_buffer("unknown_release_tensor", torch.ones(3))
    path = tmp_path / name
    with fake_eg3d_code():
        rec = _Persistent(gen, "TriPlaneGenerator", _release_kwargs(cfg),
                          dict(neural_rendering_resolution=cfg.neural_rendering_resolution))
        with open(path, "wb") as f:
            pickle.dump(dict(G=rec, D=None, G_ema=rec, training_set_kwargs={}), f)
    if extra_tensor:
        del gen._buffers["unknown_release_tensor"]
    return gen, cfg, path


def _render(gen, impl="torch"):
    z = torch.randn(2, gen.cfg.z_dim, generator=torch.Generator().manual_seed(0))
    cams = look_at_camera(torch.tensor([0.0, 0.3]), torch.tensor([0.0, -0.1]), rig=gen.cfg.camera_rig())
    return gen(z, cams, impl=impl, deterministic=True)["image"]


@pytest.mark.parametrize("ext", [".safetensors", ".pt"])
def test_import_round_trip_gives_identical_images(tmp_path, ext):
    gen, cfg, pkl = _tiny_release(tmp_path)
    out = tmp_path / f"prior{ext}"
    config = convert_release(pkl, out, axes="fixed", log=lambda *_: None)
    assert config["plane_convention"] == "fixed" and config["rendering"]["ray_start"] == 2.2
    loaded = load_generator(out)
    assert loaded.cfg == dataclasses.replace(cfg, axes="fixed")
    for k, v in gen.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    torch.testing.assert_close(_render(loaded), _render(gen), rtol=0, atol=0)


def test_config_from_release_reads_the_recorded_settings():
    cfg = dataclasses.replace(GeneratorConfig.ffhq(axes="eg3d"), ray_start=2.0, camera_pivot=(0.0, 0.1, 0.2),
                              coarse_samples=64)
    assert config_from_release(_release_kwargs(cfg), {"neural_rendering_resolution": 128}, axes="eg3d") == cfg


def test_unmapped_tensor_is_reported_then_allowed(tmp_path):
    _, _, pkl = _tiny_release(tmp_path, extra_tensor=True)
    with pytest.raises(ValueError, match="unknown_release_tensor"):
        convert_release(pkl, tmp_path / "a.safetensors", axes="eg3d", log=lambda *_: None)
    assert not (tmp_path / "a.safetensors").exists()
    convert_release(pkl, tmp_path / "a.safetensors", axes="eg3d", allow_unmapped=True, log=lambda *_: None)
    assert load_generator(tmp_path / "a.safetensors").cfg.axes == "eg3d"


def test_release_of_another_size_is_refused(tmp_path):
    gen, cfg, pkl = _tiny_release(tmp_path)
    kwargs = _release_kwargs(dataclasses.replace(cfg, w_dim=cfg.w_dim * 2))
    with fake_eg3d_code():
        with open(pkl, "wb") as f:
            pickle.dump(dict(G_ema=_Persistent(gen, "TriPlaneGenerator", kwargs)), f)
    with pytest.raises(ValueError, match="shape mismatch"):
        convert_release(pkl, tmp_path / "b.safetensors", log=lambda *_: None)


def test_cli_convert_and_sample(tmp_path, capsys):
    _, _, pkl = _tiny_release(tmp_path, name="ffhq-fixed-triplane-tiny.pkl")
    ckpt = tmp_path / "prior.safetensors"
    assert main(["convert", str(pkl), str(ckpt)]) == 0
    assert "plane convention 'fixed'" in capsys.readouterr().out  # guessed from the file name
    with pytest.raises(SystemExit):
        main(["convert", str(pkl), str(ckpt)])
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    out = tmp_path / "samples"
    assert main(["sample", "--ckpt", str(ckpt), "--seeds", "0-1", "--yaw", "20", "--orbit", "3",
                 "--impl", "torch", "--device", "cpu", "--out", str(out)]) == 0
    from PIL import Image

    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["seed0000_yaw+20_pitch+0.png", "seed0001_yaw+20_pitch+0.png"]
    a, b = (torch.from_numpy(np.array(Image.open(p))) for p in pngs)
    assert a.shape[-1] == 3 and not torch.equal(a, b)  # two seeds, two faces
    import av

    with av.open(str(out / "orbit_seed0000.mp4")) as video:  # PyAV is a dev dependency: mp4, not GIF
        assert sum(1 for _ in video.decode(video=0)) == 3
    with pytest.raises(SystemExit):  # the user's files are kept
        main(["sample", "--ckpt", str(ckpt), "--seeds", "0", "--orbit", "0", "--impl", "torch",
              "--device", "cpu", "--out", str(out), "--yaw", "20"])
    assert "--overwrite" in capsys.readouterr().err


def test_sample_without_weights_says_so(tmp_path, capsys):
    assert main(["sample", "--random-init", "tiny", "--seeds", "3", "--orbit", "0", "--impl", "torch",
                 "--device", "cpu", "--out", str(tmp_path / "r")]) == 0
    assert "random weights" in capsys.readouterr().err


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_generator(bad)


def test_shapenet_style_release_is_refused_clearly():
    kwargs = _release_kwargs(GeneratorConfig.ffhq())
    kwargs["rendering_kwargs"]["ray_start"] = "auto"
    with pytest.raises(ValueError, match="ray_start='auto'"):
        config_from_release(kwargs, axes="eg3d")
