"""Audio I/O, resampling, log-mel features, audio windows and the wav2vec2 encoder."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from talk3d.audio import (FEATURES_PER_FRAME, SAMPLE_RATE, SAMPLES_PER_FRAME, LogMelEncoder,
                          Wav2Vec2Encoder, read_wav, resample, window_reach, windows, write_wav)

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
# PCM16 round trip: write_wav rounds to steps of 1/32767 (half a step off at most), read_wav divides
# by 32768 (another 1/32768 of relative scale on values up to 1): one step bounds both.
PCM16_TOL = 1.0 / 32767
# Frequency resolution of the FFT peak test: one bin of a 1-s signal is 1 Hz.
FREQ_TOL_HZ = 1.0
# 44.1 -> 16 kHz, a 0.5-amplitude 440-Hz tone away from the edges: the windowed sinc's pass-band
# gain and where the samples fall on the peaks. Measured 1.0e-5 off 0.5 (CPU VM).
RESAMPLE_AMPLITUDE_TOL = 0.01
# A 10-kHz tone (amplitude 0.5) resampled to 16 kHz: what leaks through the stop band; aliasing would
# leave a 6-kHz tone of 0.5. Measured 4.3e-5 (-81 dB against the tone; CPU VM).
STOPBAND_MAX = 0.01
# Log-mel of a tone at 10x the amplitude: log(mel + eps) rises by log(100) but for the eps = 1e-6
# floor, negligible next to a tone's band power. Measured 4.1e-7 off log(100) (CPU VM).
LOUDNESS_LOG_TOL = 0.1
# A 40-ms 1-kHz burst in silence: the features reading it rise from log(eps) = -13.8 by this much at
# least. Measured 8.6 (features 10, 11; 9 and 12, whose STFT windows overlap it, 8.4; CPU VM).
BURST_MIN_RISE = 5.0


def tone(freq, seconds, rate, amp=0.5):
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_frequency(wave, rate):
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(wave.size)))
    return np.argmax(spectrum) * rate / wave.size


def test_wav_round_trip(tmp_path):
    wave = tone(440, 0.5, SAMPLE_RATE)
    write_wav(tmp_path / "a.wav", wave)
    back, rate = read_wav(tmp_path / "a.wav")
    assert rate == SAMPLE_RATE and back.dtype == np.float32 and back.shape == wave.shape
    np.testing.assert_allclose(back, wave, atol=PCM16_TOL)


def test_read_wav_stereo_is_downmixed(tmp_path):
    import wave as w

    left, right = tone(300, 0.2, SAMPLE_RATE), tone(300, 0.2, SAMPLE_RATE, amp=0.1)
    ints = np.round(np.stack([left, right], 1) * 32767).astype("<i2")
    with w.open(str(tmp_path / "s.wav"), "wb") as f:
        f.setnchannels(2), f.setsampwidth(2), f.setframerate(SAMPLE_RATE)
        f.writeframes(ints.tobytes())
    mono, _ = read_wav(tmp_path / "s.wav")
    np.testing.assert_allclose(mono, (left + right) / 2, atol=2 * PCM16_TOL)


def test_resample_keeps_frequency(tmp_path):
    wave = tone(440, 1.0, 44100)
    write_wav(tmp_path / "cd.wav", wave, 44100)
    out, rate = read_wav(tmp_path / "cd.wav")  # resampled to 16 kHz on read
    assert rate == SAMPLE_RATE and out.size == SAMPLE_RATE
    assert abs(peak_frequency(out, SAMPLE_RATE) - 440) <= FREQ_TOL_HZ
    # Amplitude is preserved away from the zero-padded edges.
    mid = out[2000:-2000]
    assert abs(np.abs(mid).max() - 0.5) < RESAMPLE_AMPLITUDE_TOL


def test_resample_removes_frequencies_above_new_nyquist():
    # 10 kHz cannot exist at 16 kHz (Nyquist 8 kHz): it must be filtered, not aliased to 6 kHz.
    out = resample(tone(10000, 1.0, 44100), 44100, SAMPLE_RATE)
    assert np.abs(out[1000:-1000]).max() < STOPBAND_MAX


def test_logmel_shape_and_determinism():
    enc = LogMelEncoder(32)
    wave = np.random.default_rng(0).standard_normal(SAMPLES_PER_FRAME * 10).astype(np.float32)
    a, b = enc.encode(wave), enc.encode(wave.copy())
    assert a.shape == (10 * FEATURES_PER_FRAME, 32) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    # num_frames pads or crops.
    assert enc.encode(wave, num_frames=12).shape == (24, 32)
    assert enc.encode(wave, num_frames=7).shape == (14, 32)
    assert LogMelEncoder(44).encode(wave).shape == (20, 44)


def test_logmel_responds_to_loudness_and_frequency():
    enc = LogMelEncoder(32)
    quiet, loud = tone(440, 0.4, SAMPLE_RATE, 0.05), tone(440, 0.4, SAMPLE_RATE, 0.5)
    fq, fl = enc.encode(quiet), enc.encode(loud)
    # Power scales by 100, so log-mel rises by log(100) in the bands holding the tone.
    band = fl.mean(0).argmax()
    assert abs((fl[:, band] - fq[:, band]).mean() - np.log(100)) < LOUDNESS_LOG_TOL
    high = enc.encode(tone(3000, 0.4, SAMPLE_RATE, 0.5))
    assert high.mean(0).argmax() > band


def test_logmel_is_local_in_time():
    # A burst in frame 5 only: features 10 and 11 react, features of far frames do not.
    wave = np.zeros(SAMPLES_PER_FRAME * 10, np.float32)
    wave[5 * SAMPLES_PER_FRAME:6 * SAMPLES_PER_FRAME] = tone(1000, 0.04, SAMPLE_RATE)
    f = LogMelEncoder(32).encode(wave).mean(1)
    assert f[10] > f[0] + BURST_MIN_RISE and f[11] > f[0] + BURST_MIN_RISE
    assert f[6] == pytest.approx(f[0]) and f[15] == pytest.approx(f[0])


def test_windows_shape_and_edge_padding():
    n, d = 6, 3
    feats = np.arange(2 * n * d, dtype=np.float32).reshape(2 * n, d)
    w = windows(feats, 0, 8)
    assert w.shape == (8, 2, d)
    # Frames -4..3 clamp to 0,0,0,0,0,1,2,3.
    np.testing.assert_array_equal(w[:, 0, 0] // (2 * d), [0, 0, 0, 0, 0, 1, 2, 3])
    np.testing.assert_array_equal(w[5], feats[2:4])
    end = windows(torch.from_numpy(feats), n - 1, 8)
    assert isinstance(end, torch.Tensor)
    np.testing.assert_array_equal(end[:, 1, 0].numpy() // (2 * d), [1, 2, 3, 4, 5, 5, 5, 5])
    with pytest.raises(IndexError):
        windows(feats, n, 8)


def test_windows_with_a_context_of_feature_rows_and_their_reach():
    """steps rows per window frame, centred on the frame (the release's 16 = 320 ms); 2 rows are
    the frame's own, as before; window_reach bounds exactly what frame n reads (streaming keeps
    those frames and waits for them)."""
    n, d = 40, 2
    feats = np.arange(2 * n * d, dtype=np.float32).reshape(2 * n, d)
    rows = lambda w: w[..., 0] // d  # noqa: E731  the row each entry came from
    np.testing.assert_array_equal(rows(windows(feats, 20, 8, 2)), np.arange(32, 48).reshape(8, 2))
    w = windows(feats, 20, 8, 16)
    assert w.shape == (8, 16, d)
    # window frame f = 16 + i: rows 2f - 7 .. 2f + 8, centred on the frame's middle (rows 2f, 2f + 1)
    np.testing.assert_array_equal(rows(w), (2 * np.arange(16, 24))[:, None] - 7 + np.arange(16))
    np.testing.assert_array_equal(rows(windows(feats, 0, 8, 16))[0], np.clip(np.arange(-7, 9), 0, None))
    np.testing.assert_array_equal(rows(windows(feats, n - 1, 8, 16))[-1], np.clip(np.arange(71, 87), None, 79))
    for steps in (1, 2, 3, 4, 16):
        back, ahead = window_reach(8, steps)
        read = np.unique(rows(windows(feats, 20, 8, steps))) // 2  # frames whose rows frame 20 reads
        assert (read.min(), read.max()) == (20 - back, 20 + ahead), steps
    with pytest.raises(ValueError, match="steps"):
        windows(feats, 0, 8, 0)


def test_wav2vec2_missing_path_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained|huggingface-cli"):
        Wav2Vec2Encoder(tmp_path / "nope")


def save_tiny_wav2vec2(path) -> None:
    """A tiny random Wav2Vec2ForCTC saved with save_pretrained at ``path`` (the real folder format)."""
    import transformers

    config = transformers.Wav2Vec2Config(
        vocab_size=12, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, conv_dim=(8, 8, 8, 8, 8, 8, 8), num_feat_extract_layers=7,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    torch.manual_seed(0)
    transformers.Wav2Vec2ForCTC(config).save_pretrained(path)


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed in this venv")
def test_wav2vec2_tiny_random_model(tmp_path):
    save_tiny_wav2vec2(tmp_path / "w2v")
    wave = np.random.default_rng(0).standard_normal(SAMPLES_PER_FRAME * 7).astype(np.float32)
    enc = Wav2Vec2Encoder(tmp_path / "w2v")
    out = enc.encode(wave)
    assert enc.dim == 12 and out.shape == (14, 12) and np.isfinite(out).all()
    np.testing.assert_array_equal(out, enc.encode(wave))
    hidden = Wav2Vec2Encoder(tmp_path / "w2v", layer=1, use_logits=False)
    assert hidden.encode(wave).shape == (14, 16)


def test_default_frame_count_rounds_to_the_nearest_frame():
    """Without num_frames, encode covers round(T / 640) frames (the module's contract: N = T / 640,
    a shorter wave zero-padded, a longer one cropped): 1.5 frames of samples give 2 frames (padded),
    1.4 give 1 (cropped), and 0.6 of a frame still gives one frame rather than none."""
    enc = LogMelEncoder(8)
    wave = np.random.default_rng(0).standard_normal(3 * SAMPLES_PER_FRAME).astype(np.float32)
    for frames, want in ((1.5, 2), (1.6, 2), (1.4, 1), (2.4, 2), (0.6, 1)):
        part = wave[:int(frames * SAMPLES_PER_FRAME)]
        got = enc.encode(part)
        assert got.shape == (FEATURES_PER_FRAME * want, 8), frames
        np.testing.assert_array_equal(got, enc.encode(part, num_frames=want), err_msg=str(frames))


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed in this venv")
def test_wav2vec2_pads_the_wave_so_output_k_is_slot_k(tmp_path):
    """The encoder feeds the model the normalised wave with _RECEPTIVE_PAD = 40 zeros each side, on
    which wav2vec2's front end (stride 320, 400-sample receptive field) gives exactly 2N outputs, the
    k-th centred on slot k's 320 samples; encode returns those outputs as they are. Any other padding
    shifts every feature off its slot (and the length guard would hide a missing row)."""
    save_tiny_wav2vec2(tmp_path / "w2v")
    enc = Wav2Vec2Encoder(tmp_path / "w2v")
    hidden = Wav2Vec2Encoder(tmp_path / "w2v", layer=1, use_logits=False)
    assert Wav2Vec2Encoder._RECEPTIVE_PAD == 40 and enc.normalize
    for n in (3, 7):
        wave = np.random.default_rng(n).standard_normal(SAMPLES_PER_FRAME * n).astype(np.float32)
        w = torch.from_numpy(wave)
        w = (w - w.mean()) / torch.sqrt(w.var(unbiased=False) + 1e-7)
        x = torch.nn.functional.pad(w, (40, 40))[None]  # [1, 640 n + 80]
        with torch.no_grad():
            logits = enc.model(x).logits[0]
            states = hidden.model(x, output_hidden_states=True).hidden_states[1][0]
        assert logits.shape[0] == FEATURES_PER_FRAME * n  # exactly 2N rows, nothing to crop or repeat
        np.testing.assert_array_equal(enc.encode(wave), logits.numpy())
        np.testing.assert_array_equal(hidden.encode(wave), states.numpy())



#: Piecewise against one pass on a model whose outputs depend on nearby audio alone: equal up to
#: the float sums of convolutions over inputs of other lengths (measured 4.8e-7).
PIECES_ATOL = 1e-5


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed in this venv")
def test_wav2vec2_long_waves_are_encoded_in_aligned_pieces(tmp_path):
    """A wave longer than a piece and its context is encoded piece by piece, each piece's slots
    seen with context_seconds of audio either side. On a model without attention and with a
    per-frame norm (each output depends on the audio within its positional convolution's reach,
    8 slots) the pieces give the one pass's features: every slot on its own row. Without context
    they do not (the edges lose their neighbours), so the comparison sees where pieces meet.
    The settings travel in the dataset's manifest."""
    import transformers

    from talk3d.audio.features import encoder_from_manifest

    config = transformers.Wav2Vec2Config(
        vocab_size=12, hidden_size=16, num_hidden_layers=0, num_attention_heads=2, intermediate_size=32,
        conv_dim=(8,) * 7, num_feat_extract_layers=7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer")
    torch.manual_seed(0)
    transformers.Wav2Vec2ForCTC(config).save_pretrained(tmp_path / "local")
    wave = np.random.default_rng(0).standard_normal(SAMPLES_PER_FRAME * 50 + 123).astype(np.float32)
    whole = Wav2Vec2Encoder(tmp_path / "local").encode(wave, 50)  # 100 slots: one pass
    pieces = Wav2Vec2Encoder(tmp_path / "local", chunk_seconds=0.14, context_seconds=0.2)  # 7 slots, 10 each side
    assert (pieces.chunk_slots, pieces.context_slots) == (7, 10)
    got = pieces.encode(wave, 50)
    assert got.shape == whole.shape == (100, 12)
    np.testing.assert_allclose(got, whole, rtol=0, atol=PIECES_ATOL)
    blind = Wav2Vec2Encoder(tmp_path / "local", chunk_seconds=0.14, context_seconds=0.0).encode(wave, 50)
    assert np.abs(blind - whole).max() > 100 * PIECES_ATOL
    settings = pieces.settings()
    assert settings["chunk_seconds"] == pytest.approx(0.14) and settings["context_seconds"] == pytest.approx(0.2)
    again = encoder_from_manifest(dict(encoder=pieces.name, feature_dim=12, encoder_settings=settings))
    assert (again.chunk_slots, again.context_slots) == (7, 10)
    with pytest.raises(ValueError, match="chunk_seconds must be > 0"):
        Wav2Vec2Encoder(tmp_path / "local", chunk_seconds=0)

def test_resample_returns_the_rounded_length():
    """resample gives round(T * dst / src) samples (its docstring's, what a clip's frame count is
    read from): lengths whose exact count ends in .5 or more must not lose their last sample."""
    for n, src, dst in ((11, 44100, 16000), (1000, 44100, 16000), (44120, 44100, 16000), (5, 16000, 44100),
                        (7, 48000, 16000)):
        want = round(n * dst / src)  # 3.99 -> 4, 362.8 -> 363, 16007.3 -> 16007, 13.8 -> 14, 2.33 -> 2
        assert resample(np.zeros(n, np.float32), src, dst).shape == (want,), (n, src, dst)


def test_mel_filters_sit_on_htk_mel_edges():
    """LogMelEncoder's bank (32 bands, 55-7600 Hz, 1024-point FFT at 16 kHz): filter m is a triangle
    that is zero outside (edge m, edge m + 2) and peaks at the FFT bin nearest edge m + 1, the edges
    evenly spaced from fmin to fmax on HTK's mel scale, 2595 log10(1 + f / 700); FFT bin k is
    k * 16000 / 1024 Hz (0 to Nyquist). Edges and bins written out here, independently."""
    from talk3d.audio.features import mel_filterbank

    enc = LogMelEncoder(32)
    bank = mel_filterbank(32, enc.n_fft, SAMPLE_RATE, enc.fmin, enc.fmax).numpy()  # [32, 513]
    assert (enc.fmin, enc.fmax) == (55.0, 7600.0) and bank.shape == (32, enc.n_fft // 2 + 1)
    mel_lo, mel_hi = 2595 * np.log10(1 + 55.0 / 700), 2595 * np.log10(1 + 7600.0 / 700)
    edges = 700 * (10 ** (np.linspace(mel_lo, mel_hi, 34) / 2595) - 1)  # [34] Hz
    bin_hz = SAMPLE_RATE / enc.n_fft
    hz = np.arange(bank.shape[1]) * bin_hz
    for m in range(32):
        inside = hz[bank[m] > 0]
        assert edges[m] < inside.min() and inside.max() < edges[m + 2], m
        assert abs(hz[bank[m].argmax()] - edges[m + 1]) <= bin_hz, m
