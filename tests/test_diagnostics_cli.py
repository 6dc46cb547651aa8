"""`kronfisher curvature-scale` end to end on a few hundred generated CURVES images."""

import re

import pytest

from kronfisher.cli import main


def run(capsys, *args):
    assert main(["curvature-scale", "--problem", "curves", "--batch", "64", "--threads", "1",
                 *args]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d+\s", line)]
    median = float(re.search(r"median ratio over layers (\S+);", out).group(1))
    return out, rows, median


def test_paper_preset_shows_the_pixel_factor_gap(tiny_curves, capsys):
    """Under `paper` the curvature batch carries loss_scale = 1/784 where √(1/784) was due:
    every layer's ratio is ≈ 1/784 (within the Kronecker approximation and the sampling
    noise of 16 curvature examples: a factor 2), after two training steps as well."""
    out, rows, median = run(capsys, "--preset", "paper", "--optimizer", "kfac", "--steps", "2")
    assert "after 2 step(s), curvature batch of 16" in out
    assert len(rows) == 12  # the 12 Linear layers of the CURVES auto-encoder
    ratios = [float(r[4]) for r in rows]
    assert all(0.5 < 784 * q < 2.0 for q in ratios), ratios
    assert 0.5 < 784 * median < 2.0
    damping_ratios = [float(r[-1]) for r in rows]
    assert min(damping_ratios) > 100  # λ = 3e-3 swamps the curvature of every layer


def test_preset_with_unit_loss_scale_shows_ratio_one(tiny_curves, capsys):
    out, rows, median = run(capsys, "--preset", "classic", "--optimizer", "kfac_corrected",
                            "--steps", "1", "--fresh")
    assert "loss_scale 1 ×" in out and "expected ≈ 1" in out and "this batch alone" in out
    assert all(0.5 < float(r[4]) < 2.0 for r in rows)
    assert 0.5 < median < 2.0


def test_first_order_optimizers_are_refused(tiny_curves, capsys):
    with pytest.raises(SystemExit):
        main(["curvature-scale", "--optimizer", "adam"])
    assert "invalid choice" in capsys.readouterr().err
