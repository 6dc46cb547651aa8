"""Issue 17, items 2, 7, 8 (docs/reliability.md, classes 10 and 11): results of the
fisher-error study are never lost, no plot path is printed for a plot that was not written,
and the unclear errors are clear ones."""

import csv
import errno
import os
import sys
import warnings

import pytest
import torch
from torch import nn

import kronfisher as kf
import kronfisher.data as data
from kronfisher.bench import fisher_error as fe_mod
from kronfisher.cli import main
from kronfisher.data import _common, curves

D = torch.float64


@pytest.fixture
def tiny_curves(monkeypatch):
    sets = {"train": data.make_curves(96, seed=1), "test": data.make_curves(32, seed=2)}
    monkeypatch.setattr(data, "load_dataset", lambda name, split="train", **kw: sets[split])
    return sets


def _fisher_argv(out, steps="4"):
    return ["fisher-error", "--layer", "5", "--steps", steps, "--every", "2", "--batch", "32",
            "--out", str(out)]


# ------------------------------------------------------- 2: fisher-error --out
@pytest.mark.parametrize("where", ["file", "below_file"])
def test_fisher_error_bad_out_fails_before_the_study(where, tiny_curves, tmp_path, monkeypatch,
                                                      capsys):
    monkeypatch.setattr(fe_mod, "fisher_error_study", lambda *a, **k: pytest.fail("ran"))
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if where == "file" else tmp_path / "f" / "sub"
    assert main(_fisher_argv(out)) == 2
    err = capsys.readouterr().err
    assert "kronfisher fisher-error:" in err and str(tmp_path / "f") in err
    assert "Traceback" not in err


def test_fisher_error_rows_are_on_disk_as_they_are_computed(tiny_curves, tmp_path, monkeypatch,
                                                            capsys):
    real = fe_mod.fisher_errors
    calls = []

    def interrupted_at_the_third(a, g, *args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(a, g, *args, **kw)

    monkeypatch.setattr(fe_mod, "fisher_errors", interrupted_at_the_third)
    assert main(_fisher_argv(tmp_path, steps="6")) == 130
    rows = list(csv.DictReader(open(tmp_path / "fisher_error.csv")))
    assert sorted({int(r["step"]) for r in rows}) == [0, 2] and len(rows) == 2 * 5
    assert "the 2 measurement(s) made are in" in capsys.readouterr().err


def test_fisher_error_without_matplotlib_says_so(tiny_curves, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    assert main(_fisher_argv(tmp_path, steps="2")) == 0
    out = capsys.readouterr().out
    assert "plots need matplotlib" in out and "kronfisher[bench]" in out and ".png" not in out
    assert not (tmp_path / "fisher_error.png").exists()


# ----------------------------------------------------------- 7: compare plots
def test_compare_without_matplotlib_prints_no_plot_path(tiny_curves, tmp_path, monkeypatch,
                                                        capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    argv = ["compare", "--optimizers", "sgd", "--iterations", "2", "--batch-size", "32",
            "--out", str(tmp_path / "c"), "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "no plots: they need matplotlib (pip install 'kronfisher[bench]')" in out
    assert ".png" not in out
    assert not list((tmp_path / "c").glob("*.png"))


def test_compare_with_matplotlib_prints_the_plots_it_wrote(tiny_curves, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    argv = ["compare", "--optimizers", "sgd", "--iterations", "2", "--batch-size", "32",
            "--out", str(tmp_path / "c"), "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("plots:"))
    paths = line[len("plots: "):].split(", ")
    assert len(paths) == 2 and all(os.path.exists(p) for p in paths)


# ---------------------------------------------------------- 8: clear errors
@pytest.mark.parametrize("argv, match", [
    (["train", "--epochs", "inf"], "--epochs: must be a finite number"),
    (["train", "--epochs", "nan"], "--epochs: must be"),
    (["train", "--epochs", "1e300"], "--epochs: must be a finite number in"),
    (["train", "--optimizer", "sgd", "--lr", "1e300"], "--lr: must be at most 3.4e"),
    (["compare", "--optimizers", "sgd", "--lr", "1e39"], "--lr: must be at most"),
    (["fisher-error", "--lr", "1e300", "--steps", "1"], "--lr: must be at most"),
    (["train", "--damping", "inf"], "--damping: must be at most"),
])
def test_cli_numbers_out_of_range_are_usage_errors(argv, match, tiny_curves, tmp_path, capsys):
    # (the limits make a wrongly accepted value end quickly instead of training for ever)
    limits = [] if argv[0] == "fisher-error" else ["--iterations", "1", "--batch-size", "32",
                                                   "--no-progress", "--threads", "1"]
    with pytest.raises(SystemExit) as e:
        main(argv + limits + ["--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_largest_float32_lr_trains_to_a_diverged_status_not_a_traceback(tiny_curves, capsys):
    argv = ["train", "--optimizer", "sgd", "--lr", "3e38", "--iterations", "3",
            "--batch-size", "32", "--no-progress", "--threads", "1"]
    assert main(argv) == 1
    assert "sgd on curves: diverged" in capsys.readouterr().out


def test_read_only_data_cache_fails_before_building_with_a_clear_error(tmp_path, monkeypatch):
    """An empty read-only KRONFISHER_DATA: EROFS on create and (even for a missing file)
    on unlink, as a read-only mount does."""
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setenv("KRONFISHER_DATA", str(ro))

    def erofs(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: erofs() if str(p).startswith(str(ro))
                        else real_open(p, *a, **k))
    monkeypatch.setattr(os, "unlink", lambda *a, **k: erofs())
    monkeypatch.setattr(curves, "build_curves", lambda: pytest.fail("built anyway"))
    with pytest.raises(data.DatasetError, match=r"cannot write the data cache directory.*"
                       r"Read-only file system.*nothing was built.*KRONFISHER_DATA"):
        data.load_dataset("curves", "train")


def test_failed_cache_write_is_reported_even_if_the_cleanup_fails(tmp_path, monkeypatch):
    import builtins

    def erofs(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: erofs()
                        if str(p).startswith(str(tmp_path)) else real_open(p, *a, **k))
    monkeypatch.setattr(os, "unlink", lambda *a, **k: erofs())
    with pytest.raises(data.DatasetError, match="cannot write the data cache.*Read-only"):
        _common.save_npz(tmp_path / "x.npz", {"train": torch.zeros(2, 2).numpy()})


def test_to_dense_with_negative_damping_names_the_damping():
    a, g = torch.randn(6, 4, dtype=D), torch.randn(6, 3, dtype=D)
    ks = kf.approximate(a, g, "kfac")
    for scheme in ("tikhonov", "factored", "factored_pi1", "authors"):
        with pytest.raises(ValueError, match="damping must be a finite number >= 0, got -5"):
            ks.to_dense(-5, scheme)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()


@pytest.mark.parametrize("cls", [kf.KFAC, kf.KPSVD, kf.ExactNG])
def test_empty_curvature_batch_is_a_clear_error_naming_the_layers(cls):
    model = _mlp()
    pc = cls(model)
    x = torch.randn(8, 4, dtype=D)
    with pc.collect(reduction="sum"):
        model(x[:0]).square().sum().backward()
    model.zero_grad()
    model(x).square().sum().backward()
    with pytest.raises(ValueError, match=r"no examples for layer\(s\) \['0', '2'\]"):
        pc.step()
    assert all(not s.captures for s in pc.layers.values())  # nothing left pending


def test_two_image_sizes_in_one_collect_are_refused_and_leave_nothing_pending():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 3)).double()
    pc = kf.KFAC(model, damping=1e-2, ema_decay=0.0)
    small, big = torch.randn(4, 2, 5, 5, dtype=D), torch.randn(4, 2, 7, 7, dtype=D)
    with pc.collect():
        for x in (small, big):
            model(x).square().sum(dim=(1, 2, 3)).mean().backward()
    with pytest.raises(ValueError, match=r"different spatial sizes in layer\(s\) \{'0': "
                                         r"\[\(5, 5\), \(7, 7\)\], '2': \[\(3, 3\), \(5, 5\)\]\}"):
        pc.step()
    assert all(not s.captures for s in pc.layers.values())
    assert all(s.curvature is None for s in pc.layers.values())
    # the next curvature batch is exactly that batch, nothing of the refused one
    model.zero_grad()
    with pc.collect():
        model(big).square().sum(dim=(1, 2, 3)).mean().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pc.step()
    ref = kf.KFAC(model, damping=1e-2, ema_decay=0.0)
    model.zero_grad()
    with ref.collect():
        model(big).square().sum(dim=(1, 2, 3)).mean().backward()
    ref.step()
    for m in (model[0], model[2]):
        for (A, G), (Ar, Gr) in zip(pc.curvature(m).terms, ref.curvature(m).terms):
            torch.testing.assert_close(A, Ar, rtol=1e-12, atol=0)
            torch.testing.assert_close(G, Gr, rtol=1e-12, atol=0)
