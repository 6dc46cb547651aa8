"""The generated data sets give the same bytes under other CPU code paths and thread counts.

Each configuration runs the generators in a fresh interpreter, because the vector code path is
chosen once per process: torch reads ``ATEN_CPU_CAPABILITY`` and NumPy reads
``NPY_DISABLE_CPU_FEATURES`` at import. The generators do not use torch kernels at all, so the
torch setting guards against one creeping back in; the NumPy setting drops its AVX2/AVX-512
loops to the baseline (SSE) ones, the closest this machine gets to an older CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kronfisher.data import report

CHILD = r"""
import json, sys
import numpy as np
import torch

from kronfisher.data import build_faces, report
from kronfisher.data._common import sha256_array

try:
    from skimage.data import lfw_subset
except ImportError:
    lfw_subset = None

results = {}
for threads in (1, 2):  # the thread pools exist once per process: switch them in place
    torch.set_num_threads(threads)
    out = {
        "torch_capability": str(torch.backends.cpu.get_cpu_capability()),
        "torch_threads": torch.get_num_threads(),
        "curves": report.curves_probe().sha256,
        "faces_probe": report.faces_probe().sha256,
        "faces_stand_in": None,
    }
    if lfw_subset is not None:
        raw = np.rint(lfw_subset()[:100] * 255).astype(np.uint8).reshape(10, 10, 25, 25)
        split = {"train": 6, "valid": 2, "test": 2}
        built = build_faces(raw, per_person=40, split_persons=split)
        out["faces_stand_in"] = {s: sha256_array(x) for s, x in built.items()}
    results[threads] = out
print(json.dumps(results))
"""


def _numpy_dispatch_targets() -> str | None:
    """NumPy's optional SIMD targets on this build (valid names for NPY_DISABLE_CPU_FEATURES)."""
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    except ImportError:
        return None
    found = [t for t in __cpu_dispatch__ if __cpu_features__.get(t)]
    return " ".join(found) or None


def _run(**env_changes: str) -> dict[str, dict]:
    """Run CHILD with OMP/MKL at 2 threads plus ``env_changes``; its results per thread count."""
    env = dict(os.environ)
    for var in ("ATEN_CPU_CAPABILITY", "NPY_DISABLE_CPU_FEATURES"):
        env.pop(var, None)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = "2"
    env.update(env_changes)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_generators_identical_across_cpu_capabilities_and_threads():
    runs = {"native": _run(), "ATEN default": _run(ATEN_CPU_CAPABILITY="default")}
    targets = _numpy_dispatch_targets()
    if targets:
        runs["ATEN default + NumPy baseline SIMD"] = _run(
            ATEN_CPU_CAPABILITY="default", NPY_DISABLE_CPU_FEATURES=targets
        )
    assert {r["torch_capability"] for r in runs["ATEN default"].values()} == {"DEFAULT"}
    assert [r["torch_threads"] for r in runs["native"].values()] == [1, 2]
    results = {
        f"{name}, {threads} thread(s)": {k: v for k, v in r.items() if not k.startswith("torch")}
        for name, per_thread in runs.items()
        for threads, r in per_thread.items()
    }
    assert len(results) >= 4
    first = next(iter(results.values()))
    for name, got in results.items():
        assert got == first, f"{name} differs: {got} vs {first}"
    # ...and equal to the pins made on the development machine.
    assert first["curves"] == report.CURVES_PROBE_SHA256
    assert first["faces_probe"] == report.FACES_PROBE_SHA256
    if first["faces_stand_in"] is None:
        pytest.skip("scikit-image missing: FACES stand-in not compared")
    from test_data import LFW_FACES_SHA256

    assert first["faces_stand_in"] == LFW_FACES_SHA256
