"""Speech files other than WAV (talk3d.audio.read_audio): MP3, M4A/AAC, FLAC, Opus, a video's sound
track and compressed WAVs decode through PyAV to the wave they hold; unreadable files say so."""
from __future__ import annotations

import numpy as np
import pytest

av = pytest.importorskip("av")

from talk3d.audio import SAMPLE_RATE, AudioFileError, decode_audio_stream, read_audio, write_wav  # noqa: E402
from talk3d.infer import InferenceError, read_speech  # noqa: E402

SECONDS = 1.0
TONE_HZ = 440.0
# Lossy codecs pad and trim at the ends (encoder delay, frame sizes): decoded durations within this.
# Measured (CPU VM, PyAV's FFmpeg): MP3 and Opus 0, M4A 2.7 ms, the mp4's AAC track 21.7 ms.
LOSSY_DURATION_TOL_S = 0.08
# Lossy codecs move a tone's level; the RMS within this share. Measured: MP3 at PyAV's default bit
# rate -5.0 % (on each channel, mono too), AAC -0.7 %, Opus -0.04 %. What it guards against,
# FFmpeg's own stereo downmix ((L + R) / sqrt(2)) instead of the mean, is +41 %.
LEVEL_RTOL = 0.15
# mu-law keeps ~8 bits of a 0.3-amplitude tone (steps up to ~1/64 of full scale near the peaks);
# measured largest difference 7.9e-3.
MULAW_TOL = 0.02
# What is left of a tone after a lossy codec: the share of its energy at the tone's frequency (a
# 1-Hz-resolution spectrum, +-3 bins). A wrong sample rate or channel mix moves or spreads the peak.
# Measured: at least 0.997.
TONE_ENERGY_SHARE = 0.9


def _tone(rate: int, seconds: float = SECONDS, channels: int = 1) -> np.ndarray:
    """[channels, T] float32: a 440-Hz tone, quieter in each further channel."""
    t = np.arange(int(round(seconds * rate))) / rate
    mono = 0.3 * np.sin(2 * np.pi * TONE_HZ * t)
    return np.stack([mono * (1.0 - 0.25 * c) for c in range(channels)]).astype(np.float32)


def _encode(path, codec: str, rate: int, channels: int = 1, *, sample_format: str = "fltp", video: bool = False):
    """Write the tone to ``path`` with ``codec`` at ``rate`` (and a short black video if ``video``)."""
    layout = "mono" if channels == 1 else "stereo"
    wave = _tone(rate, channels=channels)
    with av.open(str(path), "w") as c:
        if video:
            v = c.add_stream("libx264", rate=25)
            v.width = v.height = 32
            v.pix_fmt = "yuv420p"
        a = c.add_stream(codec, rate=rate)
        a.layout = layout
        a.format = sample_format
        if video:
            for _ in range(int(SECONDS * 25)):
                for packet in v.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")):
                    c.mux(packet)
            for packet in v.encode(None):
                c.mux(packet)
        block = 960  # fits every codec's frame size here (Opus: 20 ms at 48 kHz)
        for s in range(0, wave.shape[1], block):
            chunk = wave[:, s:s + block]
            if sample_format == "s16":
                frame = av.AudioFrame.from_ndarray((chunk.T.reshape(1, -1) * 32767).round().astype(np.int16),
                                                   format="s16", layout=layout)
            else:
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout=layout)
            frame.sample_rate, frame.pts = rate, s
            for packet in a.encode(frame):
                c.mux(packet)
        for packet in a.encode(None):
            c.mux(packet)
    return path


def _tone_share(wave: np.ndarray) -> float:
    """Share of the wave's energy within 3 Hz of the tone (one second at 16 kHz: 1-Hz bins)."""
    spectrum = np.abs(np.fft.rfft(wave[:SAMPLE_RATE] * np.hanning(min(len(wave), SAMPLE_RATE)))) ** 2
    k = int(TONE_HZ)
    return float(spectrum[k - 3:k + 4].sum() / spectrum.sum())


@pytest.mark.parametrize("name, codec, rate, channels, sample_format", [
    ("speech.mp3", "libmp3lame", 44100, 2, "fltp"),
    ("speech.m4a", "aac", 48000, 1, "fltp"),
    ("speech.ogg", "libopus", 48000, 1, "s16"),
    ("speech.flac", "flac", SAMPLE_RATE, 2, "s16"),  # lossless, at 16 kHz: compared sample for sample
])
def test_compressed_audio_decodes_to_16k_mono(tmp_path, name, codec, rate, channels, sample_format):
    path = _encode(tmp_path / name, codec, rate, channels, sample_format=sample_format)
    wave = read_audio(path)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) / SAMPLE_RATE - SECONDS) < LOSSY_DURATION_TOL_S, len(wave)
    assert _tone_share(wave) > TONE_ENERGY_SHARE
    # Channels are averaged, as read_wav does (FFmpeg's own downmix would give (L + R) / sqrt(2)):
    # the stereo files' second channel is 0.75x the first. RMS away from the ends (codec edges).
    amplitude = 0.3 * (1.0 + 0.75) / 2 if channels == 2 else 0.3
    middle = wave[SAMPLE_RATE // 10:-SAMPLE_RATE // 10]
    assert abs(np.sqrt(np.mean(middle ** 2)) - amplitude / np.sqrt(2)) < LEVEL_RTOL * amplitude / np.sqrt(2)
    if codec == "flac":  # lossless, 16-bit samples to float as our WAV reader does: identical
        np.testing.assert_array_equal(wave, read_audio(_write_reference(tmp_path, rate, channels)))


def _write_reference(tmp_path, rate, channels):
    """The same tone as a PCM16 WAV, read by our own reader: what a lossless decode must equal."""
    import wave as _wave

    ints = (_tone(rate, channels=channels).T * 32767).round().astype("<i2")
    path = tmp_path / "reference.wav"
    with _wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(ints.tobytes())
    return path


def test_video_sound_track_and_compressed_wav(tmp_path):
    # A video's sound track (an mp4 with H.264 + AAC): the audio, with its start time.
    wave, first = decode_audio_stream(_encode(tmp_path / "clip.mp4", "aac", 44100, video=True))
    assert abs(len(wave) / SAMPLE_RATE - SECONDS) < LOSSY_DURATION_TOL_S and _tone_share(wave) > TONE_ENERGY_SHARE
    assert first is not None and abs(first) < LOSSY_DURATION_TOL_S
    # A mu-law WAV: our reader takes PCM and float only, FFmpeg reads the rest.
    path = _encode(tmp_path / "phone.wav", "pcm_mulaw", SAMPLE_RATE, sample_format="s16")
    wave = read_audio(path)
    reference = read_audio(_write_reference(tmp_path, SAMPLE_RATE, 1))
    assert wave.shape == reference.shape
    np.testing.assert_allclose(wave, reference, atol=MULAW_TOL)


def test_unreadable_files_say_what_is_wrong(tmp_path):
    garbage = tmp_path / "speech.mp3"
    garbage.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AudioFileError, match="speech.mp3: not a readable audio or video file"):
        read_audio(garbage)
    with pytest.raises(AudioFileError, match="no such file"):
        read_audio(tmp_path / "missing.m4a")
    silent_video = tmp_path / "silent.mp4"
    with av.open(str(silent_video), "w") as c:
        v = c.add_stream("libx264", rate=25)
        v.width = v.height = 32
        v.pix_fmt = "yuv420p"
        for _ in range(5):
            for packet in v.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")):
                c.mux(packet)
        for packet in v.encode(None):
            c.mux(packet)
    with pytest.raises(AudioFileError, match="silent.mp4: the file has no audio stream"):
        read_audio(silent_video)
    # A .wav that is neither a WAV our reader takes nor anything FFmpeg reads: both reasons given.
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(AudioFileError, match="not a WAV file our reader takes.*FFmpeg cannot read it either"):
        read_audio(broken)
    # Through inference's entry point: InferenceError, with the file and a way out.
    with pytest.raises(InferenceError, match="--audio .*speech.mp3: not a readable audio or video file"):
        read_speech(garbage)
    empty = tmp_path / "empty.wav"
    write_wav(empty, np.zeros(0))
    with pytest.raises(InferenceError, match="no samples"):
        read_speech(empty)
