"""Release pickle -> our checkpoint -> generator, and `python -m talk3d.prior convert/sample`.

The pickles are written in the release's persistent-object record format by the tests themselves
(fake ``torch_utils.persistence`` only while writing; see test_prior_import.py): most from talk3d's
own generator (a round trip), one set from an EG3D written apart from it (eg3d_reference.py).
"""
from __future__ import annotations

import dataclasses
import functools
import pickle
import sys

import eg3d_reference as eg3d
import numpy as np
import pytest
import torch
from test_prior_import import fake_eg3d_code

from talk3d.models import GeneratorConfig, TriplaneGenerator
from talk3d.prior import config_from_release, convert_release, load_generator
from talk3d.prior.__main__ import main
from talk3d.render import look_at_camera

# The converted generator against eg3d_reference.py: max |talk3d - reference| <= TOL * max |reference|
# (float32 rounding grows with the values summed, so the bound scales with the output; the loud SR
# input reaches ~3000). Measured: the worst ratio over the six cases of
# test_converted_release_matches_an_independent_eg3d (2-core CPU); the bounds leave ~10x for other BLAS builds.
MAPPING_TOL = 2e-6  # 3.3e-7 (<= 7.2e-7 on |w| <= 4.7): the same layers, the products summed in another order
# 1.1e-6 (<= 6.4e-6 on |planes| <= 8.3): transposed conv vs zero insertion, grouped vs per-sample convs, 7 layers
PLANES_TOL = 1e-5
DECODER_TOL = 1e-6  # 0: the same two matrix products
SR_TOL = 1e-5  # 7.1e-7 (<= 5.3e-6 on |image| <= 8.1; 1.3e-3 on the loud input's ~3100)

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
        mapping_kwargs=dict(num_layers=cfg.mapping_layers, lr_multiplier=cfg.mapping_lr_multiplier),
        conv_clamp=cfg.conv_clamp, sr_num_fp16_res=4 if cfg.sr_conv_clamp == 256 else 0,
        rendering_kwargs=dict(depth_resolution=cfg.coarse_samples, depth_resolution_importance=cfg.importance_samples,
                              decoder_lr_mul=cfg.decoder_lr_multiplier,
                              superresolution_module="training.superresolution.SuperresolutionHybrid8XDC",
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


def test_ffhq_config_is_eg3ds_ffhq_release():
    """GeneratorConfig.ffhq()'s settings that no weight records, against the FFHQ release's
    rendering_kwargs as eg3d_reference writes them (independent of talk3d's defaults): the SR's
    input resize is antialiased and its noise is off, the camera conditions the mapping at scale 1,
    the decoder's lr multiplier is 1, and the scene box and camera rig are FFHQ's."""
    rk, cfg = eg3d.ffhq_rendering_kwargs(), GeneratorConfig.ffhq()
    assert cfg.sr_antialias is rk["sr_antialias"] is True
    assert cfg.sr_noise_mode == rk["superresolution_noise_mode"] == "none"
    assert cfg.c_conditioning_zero is rk["c_gen_conditioning_zero"] is False
    assert (cfg.c_scale, cfg.decoder_lr_multiplier) == (rk["c_scale"], rk["decoder_lr_mul"]) == (1.0, 1.0)
    assert (cfg.ray_start, cfg.ray_end, cfg.box_warp) == (rk["ray_start"], rk["ray_end"], rk["box_warp"])
    assert (cfg.camera_radius, list(cfg.camera_pivot)) == (rk["avg_camera_radius"], rk["avg_camera_pivot"])
    assert (cfg.mapping_lr_multiplier, cfg.w_avg_beta, cfg.sr_conv_clamp) == (0.01, 0.998, 256.0)


def test_config_from_release_reads_the_numerics_eg3d_records_and_its_own_defaults():
    """The settings that change the numbers (gains, clamps, the mapping's camera scale) are read
    from the release; where it records none, EG3D's own defaults apply, not the FFHQ release's."""
    cfg = dataclasses.replace(GeneratorConfig.ffhq(axes="eg3d"), decoder_lr_multiplier=0.5, conv_clamp=256.0,
                              sr_conv_clamp=None, mapping_lr_multiplier=0.02, c_scale=0.5)
    assert config_from_release(_release_kwargs(cfg), {"neural_rendering_resolution": 128}, axes="eg3d") == cfg
    kwargs = _release_kwargs(GeneratorConfig.ffhq())
    del kwargs["rendering_kwargs"]["c_scale"], kwargs["sr_num_fp16_res"]
    got = config_from_release(kwargs, axes="eg3d")
    assert got.c_scale == 0.0 and got.sr_conv_clamp is None  # rendering_kwargs.get('c_scale', 0); fp32 SR
    kwargs["rendering_kwargs"]["superresolution_module"] = "training.superresolution.SuperresolutionHybrid4X"
    with pytest.raises(ValueError, match="SuperresolutionHybrid4X.*SuperresolutionHybrid8XDC"):
        config_from_release(kwargs, axes="eg3d")


def _planes(gen: TriplaneGenerator, ws, noise_mode="const", training=False) -> torch.Tensor:
    """``gen.planes`` in training or inference mode (talk3d's modulated convs differ: scaled
    activations in training, one grouped convolution at inference), leaving ``gen`` in eval mode."""
    gen.train(training)
    try:
        return gen.planes(ws, noise_mode)
    finally:
        gen.eval()


def _eg3d_comparisons(G: eg3d.TriPlaneGenerator, decoder_features: int):
    """(what, tolerance, the reference's output, talk3d's as a function of a converted generator),
    over the parts of the generator with weights. Each reference output is computed once."""
    g = torch.Generator().manual_seed(1)
    z, c = torch.randn(2, G.z_dim, generator=g), torch.randn(2, G.c_dim, generator=g)
    for psi, cutoff in ((1, None), (0.7, None), (0.5, 4)):
        yield (f"mapping psi={psi} cutoff={cutoff}", MAPPING_TOL, G.mapping(z, c, psi, cutoff),
               lambda gen, psi=psi, cutoff=cutoff: gen.mapping(z, c, psi, cutoff))
    ws = G.mapping(z, c, 0.7)
    one = ws[:1].expand_as(ws)  # one latent for the batch (Talk3D's identity): talk3d's shared-weight conv
    for training in (False, True):
        for noise in ("const", "none"):
            yield (f"planes noise={noise} training={training}", PLANES_TOL, G.planes(ws, noise),
                   functools.partial(_planes, ws=ws, noise_mode=noise, training=training))
    yield "planes of one latent", PLANES_TOL, G.planes(one), functools.partial(_planes, ws=one)
    sampled = 3 * torch.randn(2, 3, 50, G.decoder.net[0].in_features, generator=g)  # [N, planes, M, C]
    ref = G.decoder(sampled)
    # talk3d's decoder takes the planes' mean (its renderer averages); EG3D's averages itself.
    yield "decoder sigma", DECODER_TOL, ref["sigma"], lambda gen: gen.decoder(sampled.mean(1))[0]
    yield "decoder features", DECODER_TOL, ref["rgb"], lambda gen: gen.decoder(sampled.mean(1))[1]
    # Each side's own recorded noise mode; the loud input drives activations past 256, where EG3D's
    # fp16 SR clamps.
    mode = G.rendering_kwargs["superresolution_noise_mode"]
    for what, x in (("16^2", torch.randn(2, decoder_features, 16, 16, generator=g)),
                    ("24^2, resized", torch.randn(2, decoder_features, 24, 24, generator=g)),
                    ("16^2 loud", 1000 * torch.randn(2, decoder_features, 16, 16, generator=g))):
        yield (f"superresolution {what}", SR_TOL, G.superresolution(x[:, :3], x, ws, mode),
               lambda gen, x=x: gen.superresolution(x[:, :3], x, ws, gen.cfg.sr_noise_mode))
    x = torch.randn(2, decoder_features, 16, 16, generator=g)
    yield ("superresolution of one latent, noise const", SR_TOL, G.superresolution(x[:, :3], x, one, "const"),
           lambda gen: gen.superresolution(x[:, :3], x, one, "const"))


def _eg3d_mismatches(G: eg3d.TriPlaneGenerator, *gens: TriplaneGenerator) -> list[list[str]]:
    """For each converted generator, its outputs further from the reference ``G``'s than their tolerance."""
    bad = [[] for _ in gens]
    with torch.no_grad():
        for what, tol, ref, talk3d in _eg3d_comparisons(G, gens[0].cfg.decoder_features):
            peak = float(ref.abs().max())
            for gen, found in zip(gens, bad):
                diff = float((talk3d(gen) - ref).abs().max())
                if not diff <= tol * peak:
                    found.append(f"{what}: max |diff| {diff:.2e} > {tol:g} * {peak:.3g}")
    return bad


_NO_C_SCALE = {k: v for k, v in eg3d.ffhq_rendering_kwargs().items() if k != "c_scale"}


@pytest.mark.parametrize("release, misread", [
    # release: what it records (eg3d.tiny_generator's arguments); misread: that setting read wrong,
    # which must fail the comparison (else the case would pass without the converter reading it).
    pytest.param({}, dict(sr_conv_clamp=None), id="ffhq-like"),
    pytest.param(dict(rendering_kwargs=eg3d.ffhq_rendering_kwargs(decoder_lr_mul=0.5)),
                 dict(decoder_lr_multiplier=1.0), id="decoder_lr_mul"),
    pytest.param(dict(conv_clamp=0.5), dict(conv_clamp=None), id="conv_clamp"),  # layer outputs reach ~1-3
    pytest.param(dict(sr_num_fp16_res=0), dict(sr_conv_clamp=256.0), id="sr_fp32"),
    pytest.param(dict(rendering_kwargs=_NO_C_SCALE), dict(c_scale=1.0), id="no_c_scale"),
    pytest.param(dict(mapping_lr_multiplier=0.05), dict(mapping_lr_multiplier=0.01), id="mapping_lr_multiplier"),
    pytest.param(dict(rendering_kwargs=eg3d.ffhq_rendering_kwargs(c_gen_conditioning_zero=True)),
                 dict(c_conditioning_zero=False), id="c_gen_conditioning_zero"),
])
def test_converted_release_matches_an_independent_eg3d(tmp_path, release, misread):
    """A release written from eg3d_reference.py (EG3D's formulas, not talk3d's code), converted and
    loaded, computes what the reference does: mapping (with truncation), planes, decoder, SR. The
    same weights under the case's setting misread must not, or the case would not test that setting."""
    G = eg3d.tiny_generator(**release)
    eg3d.perturb_(G, torch.Generator().manual_seed(0))
    eg3d.write_release(tmp_path / "release.pkl", G)
    convert_release(tmp_path / "release.pkl", tmp_path / "prior.safetensors", axes="eg3d", log=lambda *_: None)
    gen = load_generator(tmp_path / "prior.safetensors")
    other = TriplaneGenerator(dataclasses.replace(gen.cfg, **misread)).eval()
    other.load_state_dict(gen.state_dict())
    converted, misread_bad = _eg3d_mismatches(G, gen, other)
    assert converted == []
    assert misread_bad, f"the case passes with {misread}: it does not test that setting"


def test_w_plus_latents_match_an_independent_eg3d(tmp_path):
    """Personalisation can invert into W+ (a w per layer), where the rows of ws differ: block b{r}
    reads its rows from where the previous block's convolutions stopped, and its ToRGB reads the one
    after its convolutions' (shared with the next block's conv0); the SR reads the last row. The
    mapping's ws have equal rows, so the comparison above cannot see a row read in place of another:
    here every row is drawn apart."""
    G = eg3d.tiny_generator()
    eg3d.perturb_(G, torch.Generator().manual_seed(0))
    eg3d.write_release(tmp_path / "release.pkl", G)
    convert_release(tmp_path / "release.pkl", tmp_path / "prior.safetensors", axes="eg3d", log=lambda *_: None)
    gen = load_generator(tmp_path / "prior.safetensors")
    g = torch.Generator().manual_seed(2)
    ws = torch.randn(2, gen.num_ws, gen.cfg.w_dim, generator=g)  # [B, num_ws, w_dim], rows independent
    x = torch.randn(2, gen.cfg.decoder_features, 16, 16, generator=g)
    with torch.no_grad():
        for what, tol, ref, got in (
                ("planes", PLANES_TOL, G.planes(ws), lambda: _planes(gen, ws)),
                ("planes, training", PLANES_TOL, G.planes(ws), lambda: _planes(gen, ws, training=True)),
                ("superresolution", SR_TOL, G.superresolution(x[:, :3], x, ws, "none"),
                 lambda: gen.superresolution(x[:, :3], x, ws, "none"))):
            peak = float(ref.abs().max())
            assert float((got() - ref).abs().max()) <= tol * peak, what


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
    err = capsys.readouterr().err
    assert "random weights" in err and "seeds:" in err  # the warning, and the bar
    assert main(["sample", "--random-init", "tiny", "--seeds", "3", "--orbit", "2", "--impl", "torch",
                 "--device", "cpu", "--out", str(tmp_path / "q"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "random weights" in err and "seeds:" not in err and "orbit seed" not in err


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


def test_plane_convention_guess_ignores_case():
    """A release whose file name says 'fixed' in any case is Talk3D's fixed-triplane one."""
    from talk3d.prior.convert import guess_plane_convention

    assert guess_plane_convention("/x/Talk3D_FIXED_triplane.pkl") == "fixed"
    assert guess_plane_convention("/x/ffhq-Fixed.pkl") == "fixed"
    assert guess_plane_convention("/fixed/ffhqrebalanced512-128.pkl") == "eg3d"  # the name, not the folder


def test_load_generator_follows_the_recorded_plane_convention(tmp_path):
    """A checkpoint's ``plane_convention`` decides the generator's axes, also when its
    architecture block says otherwise (the convention is the checkpoint's own statement of the
    layout its weights assume)."""
    from talk3d.prior.checkpoint import save_checkpoint
    from talk3d.prior.convert import checkpoint_config

    cfg = dataclasses.replace(GeneratorConfig.tiny(), axes="eg3d")
    gen = TriplaneGenerator(cfg)
    config = checkpoint_config(cfg, source="test")
    assert config["architecture"]["axes"] == "eg3d"
    config["plane_convention"] = "fixed"
    save_checkpoint(tmp_path / "g.safetensors", gen.state_dict(), config)
    assert load_generator(tmp_path / "g.safetensors").cfg.axes == "fixed"
