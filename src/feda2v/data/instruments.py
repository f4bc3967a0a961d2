"""The FedA2V analogue: real sampled instrument notes rendered offline, as log-mel embeddings.

Notes come from Debian's fluid-soundfont-gm (FluidR3, MIT) through libfluidsynth (pyfluidsynth);
nodes with a feature skew hear the same notes from a second library (timgm6mb-soundfont), the way
two clients' microphones differ. Each clip varies pitch, velocity, onset, note length, gain and
background noise, all drawn from streams seeded by (seed, class, clip). FluidSynth keeps hidden
per-voice state between notes (a note's first block differs slightly with what played before), so
each class is rendered by a fresh synth, clips in a fixed order: a class's audio then depends only
on its own settings, in any process. Features are cached per (library, class) under
``cfg.data.instruments.cache_dir``, keyed by a hash of everything that shapes them.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
from pathlib import Path

import numpy as np

from feda2v.data import audio
from feda2v.data.source import Source
from feda2v.errors import ConfigError, DataError
from feda2v.fsutil import atomic_write_bytes
from feda2v.seeding import numpy_generator

PRIMARY_LIBRARY = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
SKEW_LIBRARY = Path("/usr/share/sounds/sf2/TimGM6mb.sf2")
RENDER_VERSION = "render-2"  # bump when the rendering recipe below changes

# (class name, General MIDI program (0-based), lowest and highest MIDI note played).
# Ordered so that any first N are varied families (cfg.data.instruments.classes picks the first N).
INSTRUMENTS: list[tuple[str, int, int, int]] = [
    ("piano", 0, 36, 84),
    ("violin", 40, 55, 91),
    ("flute", 73, 60, 93),
    ("trumpet", 56, 55, 82),
    ("acoustic_guitar", 24, 40, 76),
    ("cello", 42, 36, 69),
    ("clarinet", 71, 50, 84),
    ("marimba", 12, 45, 84),
    ("church_organ", 19, 36, 79),
    ("trombone", 57, 40, 70),
    ("harp", 46, 36, 88),
    ("alto_saxophone", 65, 49, 80),
    ("electric_guitar", 27, 40, 79),
    ("acoustic_bass", 32, 28, 55),
    ("oboe", 68, 58, 88),
    ("accordion", 21, 53, 84),
    ("french_horn", 60, 41, 72),
    ("vibraphone", 11, 53, 89),
    ("sitar", 104, 48, 77),
    ("harpsichord", 6, 41, 84),
]

# FluidSynth renders in 64-frame blocks; writing whole blocks keeps every clip independent of
# what was rendered before it (a partial block would shift the next note-on).
BLOCK = 64
SYNTH_GAIN = 0.5


def _blocks(frames: float) -> int:
    return max(1, int(round(frames / BLOCK))) * BLOCK


def clip_params(seed: int, name: str, lo: int, hi: int, clip: int, clip_frames: int) -> dict:
    rng = numpy_generator(seed, "instruments", name, clip)
    onset = _blocks(rng.uniform(0.0, 0.08) * clip_frames) if clip_frames > 4 * BLOCK else 0
    return {
        "key": int(rng.integers(lo, hi + 1)),
        "velocity": int(rng.integers(45, 128)),
        "onset": onset,
        "hold": _blocks(rng.uniform(0.2, 0.85) * clip_frames),
        "gain_db": float(rng.uniform(-12.0, 0.0)),
        "snr_db": float(rng.uniform(15.0, 40.0)),
        "noise_seed": int(rng.integers(0, 2**62)),
    }


class Renderer:
    """One FluidSynth instance with one sound library loaded; dry (no reverb/chorus state)."""

    def __init__(self, library: Path, sample_rate: int):
        try:
            import fluidsynth
        except (ImportError, OSError) as e:
            raise DataError(
                f"pyfluidsynth/libfluidsynth3 is not usable ({e}); run scripts/setup.sh"
            ) from None
        if not library.is_file():
            pkg = "fluid-soundfont-gm" if library == PRIMARY_LIBRARY else "timgm6mb-soundfont"
            raise DataError(f"sound library {library} is missing; install Debian's {pkg} (scripts/setup.sh)")
        # dynamic sample loading: sfload reads only the preset index (~50 ms instead of ~0.6 s
        # for FluidR3), which makes a fresh synth per class affordable
        settings = {"synth.reverb.active": 0, "synth.chorus.active": 0, "synth.polyphony": 64,
                    "synth.dynamic-sample-loading": 1}
        self.synth = fluidsynth.Synth(gain=SYNTH_GAIN, samplerate=sample_rate, **settings)
        self.sfid = self.synth.sfload(str(library))
        if self.sfid < 0:
            raise DataError(f"sound library {library} cannot be loaded; reinstall it")
        self.library = library
        proto = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                 ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int)
        self._write_float = proto(("fluid_synth_write_float", fluidsynth._fl))

    def _frames(self, n: int) -> np.ndarray:
        left = np.zeros(n, dtype=np.float32)
        right = np.zeros(n, dtype=np.float32)
        rc = self._write_float(self.synth.synth, n, left.ctypes.data, 0, 1, right.ctypes.data, 0, 1)
        if rc != 0:
            raise DataError(f"FluidSynth failed to render audio from {self.library}")
        return 0.5 * (left.astype(np.float64) + right.astype(np.float64))

    def render(self, program: int, p: dict, clip_frames: int) -> np.ndarray:
        total = _blocks(clip_frames) if clip_frames % BLOCK else clip_frames
        if self.synth.program_select(0, self.sfid, 0, program) != 0:
            raise DataError(f"{self.library} has no General MIDI program {program}")
        parts = []
        if p["onset"]:
            parts.append(self._frames(p["onset"]))
        self.synth.noteon(0, p["key"], p["velocity"])
        hold = min(p["hold"], total - p["onset"])
        parts.append(self._frames(hold))
        self.synth.noteoff(0, p["key"])
        rest = total - p["onset"] - hold
        if rest:
            parts.append(self._frames(rest))
        self.synth.all_sounds_off(0)  # cut the release tail so the next clip starts silent
        self._frames(BLOCK)  # flush the block that still held it
        return np.concatenate(parts)[:clip_frames]

    def close(self) -> None:
        self.synth.delete()


def _finish(sound: np.ndarray, p: dict, where: str) -> np.ndarray:
    """Gain and background noise at the drawn SNR (relative to the clip's own RMS)."""
    rms = float(np.sqrt(np.mean(sound ** 2)))
    if not rms > 0:
        raise DataError(f"{where} rendered silence; the sound library may be damaged; reinstall it")
    noise = np.random.default_rng(p["noise_seed"]).standard_normal(sound.shape)
    sound = sound + noise * rms / (10.0 ** (p["snr_db"] / 20.0))
    return sound * (10.0 ** (p["gain_db"] / 20.0))


def _cache_key(library: Path, entry: tuple, clips: int, sample_rate: int, clip_seconds: float,
               seed: int) -> str:
    st = library.stat()
    blob = json.dumps({
        "render": RENDER_VERSION, "features": audio.FEATURE_VERSION,
        "library": [library.name, st.st_size], "entry": list(entry), "clips": clips,
        "sample_rate": sample_rate, "clip_seconds": clip_seconds, "seed": seed,
        "gain": SYNTH_GAIN,
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _read_cache(path: Path, clips: int) -> np.ndarray | None:
    from safetensors.numpy import load_file

    try:
        feats = load_file(str(path))["features"]
    except Exception:  # absent, truncated or foreign: just render again
        return None
    if feats.shape != (clips, audio.EMBED_DIM) or feats.dtype != np.float64 or not np.isfinite(feats).all():
        return None
    return feats


def _write_cache(path: Path, feats: np.ndarray) -> None:
    from safetensors.numpy import save

    atomic_write_bytes(path, save({"features": np.ascontiguousarray(feats)}))


def class_features(library: Path, entry: tuple, clips: int, sample_rate: int, clip_seconds: float,
                   seed: int, cache_dir: Path) -> tuple[np.ndarray, bool]:
    """float64 [clips, 128] for one class from one library; (features, came from cache)."""
    name, program, lo, hi = entry
    key = _cache_key(library, entry, clips, sample_rate, clip_seconds, seed)
    path = cache_dir / "instruments" / library.stem / f"{name}-{key}.safetensors"
    cached = _read_cache(path, clips)
    if cached is not None:
        return cached, True
    frames = int(round(sample_rate * clip_seconds))
    r = Renderer(library, sample_rate)  # fresh per class: see the module docstring
    try:
        sounds = np.stack([
            _finish(r.render(program, p, frames), p, f"{library.name} program {program} ({name})")
            for p in (clip_params(seed, name, lo, hi, i, frames) for i in range(clips))
        ])
    finally:
        r.close()
    feats = audio.logmel_stats(sounds, sample_rate)
    _write_cache(path, feats)
    return feats, False


def instruments(cfg) -> Source:
    icfg = cfg.data.instruments
    if not 1 <= icfg.classes <= len(INSTRUMENTS):
        raise ConfigError(f"data.instruments.classes must be between 1 and {len(INSTRUMENTS)}, got {icfg.classes}")
    # load_config checked the render settings; how many instruments exist is this source's fact
    entries = INSTRUMENTS[: icfg.classes]
    clips = int(icfg.clips_per_class)
    labels = np.repeat(np.arange(len(entries), dtype=np.int64), clips)
    cache_dir = Path(icfg.cache_dir)
    sr, secs, seed = int(icfg.sample_rate), float(icfg.clip_seconds), int(cfg.seed)
    stats = {"rendered_classes": 0, "cached_classes": 0}
    per_variant: dict[int, np.ndarray] = {}

    def features(variant: int, idx: np.ndarray) -> np.ndarray:
        if variant not in per_variant:
            library = SKEW_LIBRARY if variant == 1 else PRIMARY_LIBRARY
            blocks = []
            for e in entries:
                f, hit = class_features(library, e, clips, sr, secs, seed, cache_dir)
                stats["cached_classes" if hit else "rendered_classes"] += 1
                if source.on_class is not None:
                    source.on_class(e[0], hit)
                blocks.append(f)
            per_variant[variant] = np.concatenate(blocks)
        return per_variant[variant][idx]

    info = {
        "origin": f"{PRIMARY_LIBRARY} (Debian fluid-soundfont-gm) via libfluidsynth",
        "skew_library": str(SKEW_LIBRARY) + " (Debian timgm6mb-soundfont)",
        "programs": {name: prog for name, prog, _, _ in entries},
        "clips_per_class": clips, "sample_rate": sr, "clip_seconds": secs,
        "render": RENDER_VERSION,
        "features": f"{audio.FEATURE_VERSION}: mean+std over frames of {audio.N_MELS}-band log-mel "
                    f"(n_fft={audio.N_FFT}, hop={audio.HOP}, torch.stft)",
        "cache": stats,
    }
    source = Source(  # features() reads source.on_class when it runs, after this
        name="instruments",
        classes=[e[0] for e in entries],
        descriptions=[f"the sound of a {e[0].replace('_', ' ')}" for e in entries],
        labels=labels,
        features=features,
        feature_dim=audio.EMBED_DIM,
        info=info,
        variants=2,
        reports_classes=True,
    )
    return source
