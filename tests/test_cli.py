"""The CLI and benchmark runners end to end on tiny stand-in data (no downloads)."""

import csv
import json

import pytest
import torch

import kronfisher.data as data
from kronfisher.bench import compare as compare_mod
from kronfisher.bench.fisher_error import capture_layer_stats, fisher_errors
from kronfisher.bench.problems import PROBLEMS, build_model
from kronfisher.cli import build_parser, main


def test_help_lists_every_command_and_option(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ["train", "compare", "fisher-error", "demo", "data"]:
        assert cmd in out
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["compare", "--help"])
    out = capsys.readouterr().out
    for opt in ["--time-budget", "--optimizers", "--out", "--epochs", "--preset"]:
        assert opt in out


def test_compare_end_to_end_and_resume(tiny_curves, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    names = "kfac,kpsvd,deflation,kfac_corrected,adam"
    argv = ["compare", "--problem", "curves", "--optimizers", names,
            "--epochs", "2", "--batch-size", "32", "--cov-update-freq", "2",
            "--inv-update-freq", "2", "--out", str(out), "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    for name in ["kfac", "kpsvd", "deflation", "kfac_corrected", "adam"]:
        rec = json.loads((out / "runs" / f"{name}.json").read_text())
        assert rec["status"] == "complete"
        assert [r["epoch"] for r in rec["history"]] == [0.0, 1.0, 2.0]
        rows = list(csv.DictReader(open(out / "runs" / f"{name}.csv")))
        assert len(rows) == 3 and float(rows[-1]["train_loss"]) > 0
        assert set(rec["phase_seconds"]) >= {"forward_backward", "curvature", "inverse",
                                             "precondition", "optimizer"}
    assert rec["hyper"]["batch_size"] == 32
    kfac = json.loads((out / "runs" / "kfac.json").read_text())
    assert kfac["phase_seconds"]["curvature"] > 0
    summary = (out / "summary.md").read_text()
    assert "| kpsvd |" in summary and "time to reach" in summary
    assert (out / "loss_vs_epoch.png").stat().st_size > 1000
    assert (out / "loss_vs_time.png").stat().st_size > 1000
    # a second run keeps finished results instead of training again
    monkeypatch.setattr(compare_mod, "train", lambda *a, **k: pytest.fail("retrained"))
    capsys.readouterr()
    assert main(argv) == 0
    assert "finished earlier, kept" in capsys.readouterr().out


def test_killed_compare_resumes_only_missing_runs(tiny_curves, tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    argv = ["compare", "--optimizers", "sgd,adam", "--epochs", "1", "--batch-size", "32",
            "--out", str(out), "--no-progress"]
    real_train = compare_mod.train
    calls = []

    def dying_train(cfg, *a, **k):
        calls.append(cfg.optimizer)
        if cfg.optimizer == "adam":
            raise KeyboardInterrupt  # killed during the second run
        return real_train(cfg, *a, **k)

    monkeypatch.setattr(compare_mod, "train", dying_train)
    assert main(argv) == 130  # Ctrl-C: a message and exit status 130, not a traceback
    assert (out / "runs" / "sgd.json").exists() and not (out / "runs" / "adam.json").exists()
    assert not list((out / "runs").glob(".*"))  # no half-written temporary files left
    calls.clear()
    monkeypatch.setattr(compare_mod, "train", lambda cfg, *a, **k: (calls.append(
        cfg.optimizer), real_train(cfg, *a, **k))[1])
    assert main(argv) == 0
    assert calls == ["adam"]


def test_train_command_with_time_budget(tiny_curves, tmp_path, capsys):
    assert main(["train", "--optimizer", "kfac_corrected", "--time-budget", "0.5",
                 "--batch-size", "16", "--out", str(tmp_path), "--no-progress"]) == 0
    rec = json.loads((tmp_path / "run.json").read_text())
    assert rec["status"] == "complete" and rec["final"]["wall_time"] >= 0.5
    assert "train" in capsys.readouterr().out


def test_fisher_error_command_and_orderings(tiny_curves, tmp_path):
    assert main(["fisher-error", "--layer", "5", "--steps", "4", "--every", "2", "--batch", "48",
                 "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "fisher_error.csv")))
    assert len(rows) == 3 * 5 and all(r["violations"] == "" for r in rows)
    by = {(int(r["step"]), r["method"]): float(r["frobenius_error"]) for r in rows}
    for step in (0, 2, 4):
        assert by[step, "deflation"] <= by[step, "kpsvd"] <= by[step, "kfac"]
        assert by[step, "kfac_corrected"] <= by[step, "kfac"]
    assert (tmp_path / "fisher_error.png").exists()
    assert main(["fisher-error", "--layer", "1", "--steps", "1", "--out", str(tmp_path)]) == 2


def test_captured_stats_give_the_per_example_fisher():
    torch.manual_seed(0)
    model = build_model("curves", "paper").double()
    x = data.make_curves(12, seed=3).double()
    lin = [m for m in model if isinstance(m, torch.nn.Linear)][4]
    a, g = capture_layer_stats(model, lin, x, PROBLEMS["curves"].likelihood)
    assert a.shape == (12, 51) and g.shape == (12, 25)
    assert torch.equal(a[:, -1], torch.ones(12, dtype=a.dtype))
    errs = fisher_errors(a, g)
    assert errs["lanczos"]["frobenius"] == pytest.approx(errs["deflation"]["frobenius"],
                                                          rel=1e-8)
    assert errs["kpsvd"]["frobenius"] < errs["kfac"]["frobenius"]
