"""The authors' stored curves and the side-by-side tables built from them."""

import numpy as np
import pytest

from kronfisher.bench.io import write_csv
from kronfisher.bench.reference import (
    authors_at,
    authors_curve,
    iteration_table,
    plateau_exit,
    window_mean,
)
from kronfisher.cli import _demo_versus_authors

LENGTHS = {"curves": 12600, "mnist": 19600, "faces": 16200}  # 200 epochs × 63 / 98 / 81


@pytest.mark.parametrize("problem", list(LENGTHS))
def test_every_stored_curve_is_present_and_complete(problem):
    for name in ["kfac", "kpsvd", "deflation", "kfac_corrected", "lanczos", "adam", "sgd"]:
        curve = authors_curve(problem, name)
        its = [p.iteration for p in curve]
        assert its[0] == 10 and its[-1] == LENGTHS[problem] and its == sorted(its)
        assert all(0 < p.loss_pixel < 1 for p in curve)
        times = [p.wall_time for p in curve]
        assert all(b >= a for a, b in zip(times, times[1:]))
    assert authors_curve(problem, "identity_kfac") is None
    assert authors_curve(problem, "kfac+variant") == authors_curve(problem, "kfac")


def test_authors_at_picks_the_nearest_stored_point():
    assert authors_at("mnist", "kfac", 103).iteration == 100
    assert authors_at("mnist", "kfac", 3030).iteration == 3050  # every 50th after 3000
    assert authors_at("mnist", "kfac", 30000) is None


def test_window_mean_matches_numpy():
    rng = np.random.default_rng(0)
    losses = rng.random(50).tolist()
    assert window_mean(losses, 20) == pytest.approx(np.mean(losses[9:30]))
    assert window_mean(losses, 3) == pytest.approx(np.mean(losses[0:13]))  # clipped
    assert window_mean(losses, 50) == pytest.approx(np.mean(losses[39:50]))
    assert window_mean(losses, 51) is None


def test_plateau_exit_and_identity_control_note():
    flat = [0.2] * 60 + [0.1] * 60
    assert plateau_exit(flat, 0.2) == 60 - 10 + 5  # the ±10 mean falls to 0.18 there
    assert plateau_exit([0.2] * 100, 0.2) is None
    table = iteration_table("mnist", {"kfac": flat, "identity_kfac": list(flat)}, 0.2)
    assert "kfac matches its identity control" in table
    other = [0.15] * 120
    table = iteration_table("mnist", {"kfac": flat, "identity_kfac": other}, 0.2)
    assert "matches" not in table and "differs from its identity control" in table
    ref = authors_at("mnist", "kfac", 100).loss_pixel
    assert f"0.1000 / {ref:.4f}" in table  # window mean at 100 = 0.1


def test_demo_summary_prints_the_authors_loss_at_our_last_iteration(tmp_path):
    runs = tmp_path / "runs"
    rows = [{"iteration": i, "wall_time": 0.1 * i, "minibatch_loss_pixel": 0.2}
            for i in range(1, 301)]
    write_csv(runs / "kfac.iterations.csv", rows)
    text = _demo_versus_authors(tmp_path, ["kfac", "sgd"])
    ref = authors_at("curves", "kfac", 300)
    line = next(s for s in text.splitlines() if s.startswith("kfac"))
    assert "300" in line and "0.2000" in line and f"{ref.loss_pixel:.4f}" in line
    assert f"{0.2 / ref.loss_pixel:.2f}" in line
    assert not any(s.startswith("sgd") for s in text.splitlines())  # no run, no row
    write_csv(runs / "adam.iterations.csv", [dict(r, minibatch_loss_pixel=0.3) for r in rows])
    text = _demo_versus_authors(tmp_path, ["kfac", "adam"])
    assert "best natural-gradient method kfac 0.2000, best first-order adam 0.3000" in text
    assert text.rstrip().endswith("natural gradient ahead.")


def test_authors_plateau_is_where_their_sgd_sits_on_curves():
    from kronfisher.bench.reference import authors_plateau

    vals = [p.loss_pixel for p in authors_curve("curves", "sgd") if 100 <= p.iteration <= 1000]
    p = authors_plateau("curves")
    assert sum(v <= p for v in vals) >= len(vals) // 2 and sum(v >= p for v in vals) >= len(
        vals) // 2
    assert max(vals) - min(vals) < 0.01  # it is a plateau: flat to 1e-2
    assert authors_plateau("mnist") is None
