"""Log-mel statistics embeddings with plain torch (torchaudio does not load with this torch build).

embedding = [mean over frames, std over frames] of the log-mel spectrogram, per mel band:
2 x N_MELS = 128 numbers per clip, a fixed-size summary of timbre and loudness envelope.
"""
from __future__ import annotations

import numpy as np
import torch

N_FFT = 1024  # 64 ms at 16 kHz: resolves harmonics of low notes
HOP = 256
N_MELS = 64
F_MIN = 40.0
EMBED_DIM = 2 * N_MELS
# Bump when anything above or below changes: cached features are keyed by it.
FEATURE_VERSION = "logmel-stats-1"


def _hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def _mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, n_fft: int = N_FFT, n_mels: int = N_MELS,
                   f_min: float = F_MIN, f_max: float | None = None) -> torch.Tensor:
    """Triangular HTK-mel filters, area-normalised, float64 [n_mels, n_fft // 2 + 1]."""
    f_max = sample_rate / 2.0 if f_max is None else f_max
    bins = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (bins[None, :] - lo) / (mid - lo)
    down = (hi - bins[None, :]) / (hi - mid)
    fb = np.maximum(0.0, np.minimum(up, down))
    fb *= (2.0 / (hi - lo))  # equal area, so wide high bands don't dominate
    return torch.from_numpy(fb)


def logmel_stats(clips: np.ndarray, sample_rate: int) -> np.ndarray:
    """clips float [n, samples] -> float64 [n, 128] embeddings (computed in float64)."""
    x = torch.from_numpy(np.ascontiguousarray(clips, dtype=np.float64))
    window = torch.hann_window(N_FFT, periodic=True, dtype=torch.float64)
    spec = torch.stft(x, n_fft=N_FFT, hop_length=HOP, window=window, center=True,
                      pad_mode="reflect", return_complex=True)
    power = torch.view_as_real(spec).square().sum(dim=-1)  # [n, bins, frames], |X|^2
    mel = torch.matmul(mel_filterbank(sample_rate), power)  # [n, mels, frames]
    logmel = 10.0 * torch.log10(mel.clamp_min(1e-12))
    emb = torch.cat([logmel.mean(dim=-1), logmel.std(dim=-1, unbiased=False)], dim=-1)
    return emb.numpy()
