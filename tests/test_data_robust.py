"""Cache robustness (issue 10): unverified data is called so, bad values are refused, killed
builds leave nothing half-written and their temporaries are cleaned up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch

import kronfisher.data as kd
from kronfisher import cli
from kronfisher.data import curves
from kronfisher.data._common import remove_stale_temporaries, sha256_array


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Cache and HOME in tmp_path; no unpinned escape hatch unless a test sets it."""
    monkeypatch.setenv("KRONFISHER_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # cli.main fills it in when unset
    monkeypatch.delenv("KRONFISHER_DATA_UNPINNED", raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # cli.main sets it


def _small_curves(monkeypatch, n_train=48, n_test=16):
    monkeypatch.setattr(curves, "SIZES", {"train": n_train, "test": n_test})
    ref = {s: kd.make_curves(n, curves.SEEDS[s]).numpy() for s, n in curves.SIZES.items()}
    monkeypatch.setattr(curves, "SHA256", {s: sha256_array(v) for s, v in ref.items()})
    return ref


def _cache(tmp_path):
    return tmp_path / "cache" / curves.CACHE_FILE


# ----------------------------------------------------------------------------- unverified


def test_cli_data_says_verified_only_when_it_is(tmp_path, monkeypatch, capsys):
    _small_curves(monkeypatch)
    assert cli.main(["data", "curves"]) == 0
    out = capsys.readouterr().out
    assert out.count("(checksum verified)") == 2 and "UNVERIFIED" not in out


def test_cli_data_unpinned_says_unverified(tmp_path, monkeypatch, capsys):
    _small_curves(monkeypatch)
    good = dict(curves.SHA256)
    monkeypatch.setattr(curves, "SHA256", {"train": "0" * 64, "test": good["test"]})
    assert cli.main(["data", "curves"]) == 2  # pinned mismatch without the escape hatch
    assert "sha256" in capsys.readouterr().err
    assert not _cache(tmp_path).exists()
    monkeypatch.setenv("KRONFISHER_DATA_UNPINNED", "1")
    with pytest.warns(UserWarning, match="UNVERIFIED"):
        rc = cli.main(["data", "curves"])
    captured = capsys.readouterr()
    assert rc == 1
    lines = dict(line.split(":", 1) for line in captured.out.strip().splitlines())
    assert "UNVERIFIED" in lines["curves train"] and good["train"] in lines["curves train"]
    assert "(checksum verified)" in lines["curves test"]
    assert "not comparable" in captured.err


# ----------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30, -0.25, 1.5])
def test_cache_with_bad_values_is_refused_even_unpinned(tmp_path, monkeypatch, bad):
    ref = _small_curves(monkeypatch)
    kd.load_dataset("curves")
    path = _cache(tmp_path)
    corrupt = {s: v.copy() for s, v in ref.items()}
    corrupt["train"][7, 300] = bad
    np.savez(path, **corrupt)
    monkeypatch.setenv("KRONFISHER_DATA_UNPINNED", "1")
    for call in (lambda: kd.load_dataset("curves", "train"), lambda: kd.verify("curves"),
                 lambda: kd.check_cache("curves")):
        with pytest.raises(kd.DatasetError) as info:
            call()
        msg = str(info.value)
        assert str(path) in msg and "row 7, column 300" in msg and "refused" in msg
    # The other split is clean and still loads (accepted under the escape hatch).
    assert torch.equal(kd.load_dataset("curves", "test"), torch.from_numpy(ref["test"]))


def test_fresh_build_with_bad_values_is_refused_and_not_written(tmp_path, monkeypatch):
    ref = _small_curves(monkeypatch)
    bad = {s: v.copy() for s, v in ref.items()}
    bad["test"][0, 0] = np.nan
    monkeypatch.setattr(curves, "build_curves", lambda: bad)
    monkeypatch.setenv("KRONFISHER_DATA_UNPINNED", "1")
    with pytest.raises(kd.DatasetError, match=r"fresh build.*'test'.*1 invalid values"):
        kd.load_dataset("curves")
    assert not list((tmp_path / "cache").iterdir())


# ----------------------------------------------------------------------------- temporaries


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_are_removed_fresh_ones_kept(tmp_path):
    path = tmp_path / "curves-v2.npz"
    dead = tmp_path / f".curves-v2.npz.{_dead_pid()}.tmp"
    old = tmp_path / f".curves-v2.npz.{os.getppid()}.tmp"  # alive writer, but 2 h old
    live = tmp_path / f".curves-v2.npz.{os.getpid()}.tmp"  # alive and fresh: in progress
    other = tmp_path / f".mnist-v1.npz.{_dead_pid()}.tmp"  # another set's: not ours to judge
    for f in (dead, old, live, other):
        f.write_bytes(b"x" * 1000)
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    with pytest.warns(UserWarning) as record:
        removed = remove_stale_temporaries(path)
    assert sorted(removed) == sorted([dead, old])
    notes = " ".join(str(w.message) for w in record)
    assert "writer is gone" in notes and "2.0 h old" in notes
    assert not dead.exists() and not old.exists() and live.exists() and other.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert remove_stale_temporaries(path) == []  # nothing left to say


KILLED_WRITER = r"""
import os, signal, sys
import numpy as np
from kronfisher.data import curves, load_dataset
from kronfisher.data._common import sha256_array

curves.SIZES = {"train": 48, "test": 16}
curves.SHA256 = {s: sha256_array(curves.make_curves(n, curves.SEEDS[s]).numpy())
                 for s, n in curves.SIZES.items()}

def savez_then_die(f, **arrays):
    f.write(b"PK\x03\x04 half of an npz")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

np.savez = savez_then_die
load_dataset("curves")
"""


def test_killed_build_leaves_no_cache_and_its_temporary_is_cleaned(tmp_path, monkeypatch):
    ref = _small_curves(monkeypatch)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER], env=dict(os.environ), stderr=subprocess.PIPE
    )
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    root = tmp_path / "cache"
    assert not _cache(tmp_path).exists()  # never a half-written cache under the real name
    (tmp,) = root.glob(f".{curves.CACHE_FILE}.*.tmp")
    assert tmp.name == f".{curves.CACHE_FILE}.{proc.pid}.tmp"
    with pytest.warns(UserWarning, match="removed the stale temporary"):
        x = kd.load_dataset("curves", "train")
    assert torch.equal(x, torch.from_numpy(ref["train"]))
    assert sorted(p.name for p in root.iterdir()) == [curves.CACHE_FILE]
    assert kd.verify("curves") == curves.SHA256

