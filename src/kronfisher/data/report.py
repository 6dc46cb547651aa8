"""Platform report for a generated set that misses its pin: `python -m kronfisher.data report`.

CURVES and FACES' augmentation are computed on the user's machine and are meant to give the same
bytes everywhere. When a fresh build misses its pin, the error message asks for this report: the
facts that decide floating-point results (CPU, vector extensions, library versions, thread
settings) and the checksums of small *probes* of each generator, which need no download and take
about a second, compared with their pins.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from . import curves, faces
from ._common import SplitCheck, sha256_array, sha256_bytes

PROBE_CURVES = 256
"""The curves probe is the first ``PROBE_CURVES`` rows of the train split."""
PROBE_FACE_SHAPE = (112, 92)
PROBE_VIEWS = 64

CURVES_PROBE_SHA256 = "cf2510904954506215c34b78a79af32c49f749b65f1198541948ab8c85804c2f"
"""sha256 of ``make_curves(PROBE_CURVES, curves.TRAIN_SEED)`` (float32 bytes)."""
FACES_PROBE_SHA256 = "e641c2f6466b51f9303c6d63765af0cf6d1379fcad882b029431736ad1d4b8c7"
"""sha256 of the uint8 views ``augment_faces(probe_face()[None], PROBE_VIEWS, rng(SEED))``."""

_ENV = ("ATEN_CPU_CAPABILITY", "NPY_DISABLE_CPU_FEATURES", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS")


def probe_face() -> np.ndarray:
    """A fixed uint8 test image of ORL size (112, 92): smooth ramps plus a sharp grid (integers)."""
    i, j = np.mgrid[0 : PROBE_FACE_SHAPE[0], 0 : PROBE_FACE_SHAPE[1]].astype(np.int64)
    smooth = (i * i + 3 * j * j + 2 * i * j) // 64
    grid = 60 * (((i // 7) + (j // 5)) % 2)
    return ((smooth + grid) % 256).astype(np.uint8)


def curves_probe() -> SplitCheck:
    """Checksum of the curves probe against :data:`CURVES_PROBE_SHA256`."""
    x = curves.make_curves(PROBE_CURVES, curves.TRAIN_SEED).numpy()
    return SplitCheck("curves probe", sha256_array(x), CURVES_PROBE_SHA256)


def faces_probe() -> SplitCheck:
    """Checksum of the FACES augmentation of :func:`probe_face` against its pin."""
    views = faces.augment_faces(
        probe_face()[None], PROBE_VIEWS, np.random.default_rng(faces.SEED)
    )
    return SplitCheck("faces probe", sha256_bytes(views.tobytes()), FACES_PROBE_SHA256)


def platform_facts() -> dict[str, str]:
    """What decides floating-point results here: CPU, SIMD, library versions, threads, env."""
    facts = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "numpy": np.__version__,
    }
    try:
        from numpy._core._multiarray_umath import __cpu_features__

        found = [k for k in ("SSE42", "AVX", "FMA3", "AVX2", "AVX512F", "AVX512_SKX",
                             "AVX512_ICL", "AVX512_SPR") if __cpu_features__.get(k)]
        facts["numpy simd"] = " ".join(found)
    except ImportError:  # private module moved: the rest of the report still helps
        facts["numpy simd"] = "unknown"
    try:
        import torch

        facts["torch"] = torch.__version__
        facts["torch cpu capability"] = str(torch.backends.cpu.get_cpu_capability())
        facts["torch threads"] = str(torch.get_num_threads())
    except ImportError:
        facts["torch"] = "not installed"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                facts["cpu"] = line.split(":", 1)[1].strip()
                break
    if hasattr(os, "sched_getaffinity"):
        facts["cpus available"] = str(len(os.sched_getaffinity(0)))
    for var in _ENV:
        facts[f"${var}"] = os.environ.get(var, "(unset)")
    return facts


def report(names: list[str], *, full: bool = True) -> tuple[str, bool]:
    """Text report for ``names`` (``"curves"``, ``"faces"``) and whether every check passed.

    Probes always run; with ``full``, CURVES is also rebuilt completely (a few seconds) and
    compared with its pinned split checksums (FACES' full build needs its download, so only
    the probe is run).
    """
    lines = ["kronfisher data report", ""]
    lines += [f"{k:26s} {v}" for k, v in platform_facts().items()]
    lines.append("")
    checks: list[SplitCheck] = []
    if "curves" in names:
        checks.append(curves_probe())
        if full:
            start = time.perf_counter()
            built = curves.build_curves()
            lines.append(f"full CURVES build: {time.perf_counter() - start:.1f} s")
            checks += [
                SplitCheck(f"curves {s}", sha256_array(x), curves.SHA256[s])
                for s, x in built.items()
            ]
    if "faces" in names:
        checks.append(faces_probe())
    for c in checks:
        lines.append(f"{c.split:14s} {'OK' if c.ok else 'MISMATCH'} {c.sha256}"
                     + ("" if c.ok else f" (pinned {c.pinned})"))
    ok = all(c.ok for c in checks)
    lines += ["", "all checks passed" if ok else
              "MISMATCH: please report this whole output (it holds no personal data beyond the "
              "platform string) to the kronfisher maintainers."]
    return "\n".join(lines), ok
