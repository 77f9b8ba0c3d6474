"""Audio I/O (WAV, and any audio or video file through PyAV) and per-frame audio features
(50 features/s = 2 per 25-fps video frame)."""
from .features import (FEATURES_PER_FRAME, FPS, HOP, SAMPLE_RATE, SAMPLES_PER_FRAME, AudioEncoder,
                       LogMelEncoder, Wav2Vec2Encoder, encoder_from_manifest, read_wav, resample,
                       window_reach, windows, write_wav)
from .files import AudioFileError, NoAudioStreamError, decode_audio_stream, read_audio

__all__ = [
    "SAMPLE_RATE", "FPS", "FEATURES_PER_FRAME", "HOP", "SAMPLES_PER_FRAME", "AudioEncoder",
    "LogMelEncoder", "Wav2Vec2Encoder", "encoder_from_manifest", "read_wav", "write_wav",
    "resample", "windows", "window_reach", "AudioFileError", "NoAudioStreamError", "decode_audio_stream", "read_audio",
]
