"""read_wav on the WAV variants audio tools write: IEEE float (Audacity's default export),
WAVE_FORMAT_EXTENSIBLE (ffmpeg's for 24-bit or more than two channels), extra chunks before the
data, an odd-sized chunk, a truncated data chunk; and clear errors for what it cannot read."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from talk3d.audio import read_wav

#: PCM16 quantisation: half a step of 1/32768.
PCM16_ATOL = 0.5 / 32768
#: 24-bit: half a step of 2^-23.
PCM24_ATOL = 0.5 / 2**23

# KSDATAFORMAT_SUBTYPE_PCM / _IEEE_FLOAT: the tag, then the fixed GUID tail.
_GUID_TAIL = bytes.fromhex("000000001000800000aa00389b71")


def _wav(samples: np.ndarray, *, rate=16000, tag=1, bits=16, extensible=False, extra=b"", channels=None) -> bytes:
    """A WAV file's bytes: samples [T, channels] already in the storage dtype (or its bytes, with
    ``channels`` given)."""
    channels = channels or samples.shape[1]
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 0xFFFE if extensible else tag, channels, rate, rate * block, block, bits)
    if extensible:
        fmt += struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", tag) + _GUID_TAIL
    data = samples.tobytes()
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + extra + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _tone(n=1600, channels=1) -> np.ndarray:
    t = np.arange(n) / 16000
    return np.stack([0.5 * np.sin(2 * np.pi * 220 * (c + 1) * t) for c in range(channels)], axis=1)


def test_float32_and_float64(tmp_path):
    x = _tone(channels=2)
    for dtype, bits in ((np.float32, 32), (np.float64, 64)):
        path = tmp_path / f"f{bits}.wav"
        path.write_bytes(_wav(x.astype(dtype), tag=3, bits=bits))
        got, rate = read_wav(path)
        assert rate == 16000
        np.testing.assert_allclose(got, x.mean(axis=1), atol=1e-6, rtol=0)  # float32 rounding of the mean


def test_extensible_pcm24_with_a_list_chunk(tmp_path):
    x = _tone(channels=3)
    ints = np.round(x * (2**23 - 1)).astype("<i4")
    packed = np.stack([(ints >> s) & 0xFF for s in (0, 8, 16)], axis=-1).astype(np.uint8)  # little-endian 24 bit
    odd = b"LIST" + struct.pack("<I", 5) + b"INFOx" + b"\x00"  # odd size, padded to even
    path = tmp_path / "ext24.wav"
    path.write_bytes(_wav(packed, tag=1, bits=24, extensible=True, extra=odd, channels=3))
    got, _ = read_wav(path)
    np.testing.assert_allclose(got, (ints / 2**23).mean(axis=1), atol=PCM24_ATOL, rtol=0)


def test_extensible_float_and_truncated_data(tmp_path):
    x = _tone()
    path = tmp_path / "extf.wav"
    path.write_bytes(_wav(x.astype(np.float32), tag=3, bits=32, extensible=True))
    np.testing.assert_allclose(read_wav(path)[0], x[:, 0], atol=1e-7, rtol=0)
    pcm = np.round(x * 32767).astype("<i2")
    full = _wav(pcm)
    path.write_bytes(full[:-1001])  # cut mid-sample: the whole samples that are there are read
    got, _ = read_wav(path)
    assert got.shape == ((pcm.nbytes - 1001) // 2,)
    np.testing.assert_allclose(got, x[: got.shape[0], 0], atol=PCM16_ATOL + 0.5 / 32767, rtol=0)


@pytest.mark.parametrize("content, said", [
    (b"not a wav at all", "no RIFF/WAVE header"),
    (b"RIFF\x04\x00\x00\x00WAVE", "no valid 'fmt ' chunk"),
    (_wav(np.zeros((4, 1), np.uint8), tag=2, bits=8), "format 0x2"),  # ADPCM
])
def test_unreadable_files_are_named(tmp_path, content, said):
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=said):
        read_wav(path)


def test_preprocess_refuses_zero_length_audio(tmp_path):
    from talk3d.preprocess import PreprocessError
    from talk3d.preprocess.video import load_audio_file

    path = tmp_path / "empty.wav"
    path.write_bytes(_wav(np.zeros((0, 1), "<i2")))
    with pytest.raises(PreprocessError, match="zero-length audio"):
        load_audio_file(path)
