"""The ``paper`` preset follows the authors' protocol; per-iteration records; the
identity control (dense checks on tiny models)."""

import csv
import math

import pytest
import torch
import torch.nn.functional as F

import kronfisher.data as data
from kronfisher.bench import problems
from kronfisher.bench.optimizers import IdentityCurvature, make_optimizers
from kronfisher.bench.problems import (
    PROBLEMS,
    build_model,
    constant_loss,
    hyper,
    per_example_loss,
    per_pixel_loss,
)
from kronfisher.bench.runner import ITERATION_FIELDS, RunConfig, split_train, train
from kronfisher.cli import main
from kronfisher.linalg import KroneckerSum
from kronfisher.losses import sampled_nll
from kronfisher.preconditioner import KFAC


@pytest.fixture
def tiny_curves(monkeypatch):
    sets = {"train": data.make_curves(160, seed=1), "test": data.make_curves(40, seed=2)}
    monkeypatch.setattr(data, "load_dataset", lambda name, split="train", **kw: sets[split])
    return sets


@pytest.mark.parametrize("problem", ["curves", "mnist", "faces"])
def test_paper_preset_resolves_to_the_authors_settings(problem):
    p = PROBLEMS[problem]
    for name in ["kfac", "kpsvd", "deflation", "kfac_corrected", "lanczos"]:
        h = hyper(problem, name, "paper")
        assert (h.damping_scheme, h.kl_clip_mode, h.kl_clip) == ("authors", "authors", 0.01)
        assert (h.momentum, h.nesterov, h.weight_decay) == (0.9, False, 1e-3)
        assert (h.cov_update_freq, h.inv_update_freq, h.curvature_fraction) == (100, 100, 0.25)
        assert h.reseed_layers and h.partial_last_batch
        assert h.ema_counter == "steps"  # the authors' decay: k counts optimizer steps
        # KPSVD: tr A₁ = tr A_KFAC (its first steps then track KFAC's, as in the authors'
        # stored runs); the two-term methods keep the authors' balanced split
        assert h.factor_balance == ("kfac_trace" if name == "kpsvd" else "sqrt_sigma")
    assert hyper(problem, "sgd", "paper").nesterov
    assert hyper(problem, "sgd", "paper").momentum == 0.9
    assert hyper(problem, "adam", "paper").momentum == 0.0
    assert hyper(problem, "adam", "paper").weight_decay == 0.0  # see problems.hyper
    assert hyper(problem, "sgd", "paper").weight_decay == 0.0
    size = {"curves": 16000, "mnist": 50000, "faces": 82800}[problem]
    h = hyper(problem, "kfac", "paper")
    assert h.train_size == size
    # the authors' stored runs have 63 / 98 / 81 iterations per epoch
    assert math.ceil(size / h.batch_size) == {"curves": 63, "mnist": 98, "faces": 81}[problem]
    assert hyper(problem, "kfac", "paper").loss_scale == pytest.approx(
        (2.0 if p.likelihood == "gaussian" else 1.0) / p.encoder[0])
    classic = hyper(problem, "kfac", "classic")
    assert classic.damping_scheme == "tikhonov" and classic.train_size is None
    assert classic.ema_counter == "updates"
    pc = make_optimizers("kfac", build_model(problem), hyper(problem, "kfac")).preconditioner
    assert pc is not None and pc.ema_counter == "steps"


def test_identity_control_uses_its_methods_settings():
    for m in ["kfac", "kfac_corrected"]:
        assert hyper("mnist", f"identity_{m}") == hyper("mnist", m)


def test_faces_paper_loss_is_the_full_mean_squared_error():
    torch.manual_seed(0)
    out, x = torch.randn(6, 625, dtype=torch.float64), torch.rand(6, 625, dtype=torch.float64)
    h = hyper("faces", "kfac", "paper")
    objective = per_example_loss(out, x, "gaussian").mean() * h.loss_scale
    assert float(objective) == pytest.approx(float(F.mse_loss(out, x)), rel=1e-12)
    assert float(per_pixel_loss(out, x, "gaussian").mean()) == pytest.approx(
        float(F.mse_loss(out, x)), rel=1e-12)
    # the sampled curvature loss is nn.MSELoss against targets y ~ N(out, 1)
    gen = torch.Generator().manual_seed(5)
    curv = sampled_nll(out, "gaussian", generator=gen) * h.loss_scale
    y = out + torch.randn(out.shape, generator=torch.Generator().manual_seed(5),
                          dtype=out.dtype)
    assert float(curv) == pytest.approx(float(F.mse_loss(out, y)), rel=1e-12)


def test_nesterov_flag_reaches_the_torch_optimizer():
    model = build_model("curves", "paper")
    sgd = make_optimizers("sgd", model, hyper("curves", "sgd", "paper"))
    assert sgd.optimizer.param_groups[0]["nesterov"] and sgd.preconditioner is None
    kfac = make_optimizers("kfac", model, hyper("curves", "kfac", "paper"))
    g = kfac.optimizer.param_groups[0]
    assert not g["nesterov"] and g["momentum"] == 0.9 and g["lr"] == 0.1
    assert kfac.preconditioner.damping_scheme == "authors"
    assert kfac.preconditioner.kl_clip_mode == "authors"


def test_split_is_a_fixed_subset_and_partial_batches_count(tiny_curves, monkeypatch):
    x = torch.arange(50.0)[:, None]
    s = split_train(x, 20)
    assert len(s) == 20 and len(set(s[:, 0].tolist())) == 20
    assert torch.equal(s, split_train(x, 20))  # same for every call (fixed seed)
    assert split_train(x, None) is x and split_train(x, 80) is x
    monkeypatch.setitem(problems.PAPER_TRAIN_SIZE, "curves", 100)
    cfg = RunConfig("curves", "sgd", epochs=1, batch_size=32)
    res = train(cfg, tiny_curves["train"], tiny_curves["test"], progress=False)
    assert res["train_examples"] == 100
    assert res["steps_per_epoch"] == 4 and len(res["iterations"]) == 4  # 32+32+32+4
    assert res["history"][-1]["train_loss_pixel_minibatch_mean"] == pytest.approx(
        sum(r["minibatch_loss_pixel"] for r in res["iterations"]) / 4)


def test_reseeded_layers_share_their_leading_draws():
    lin = [m for m in build_model("curves", "paper", reseed_layers=True)
           if isinstance(m, torch.nn.Linear)]
    # 784→400 and 400→784 have the same Xavier bound: the same draws, the same weights
    w0, w11 = lin[0].weight.flatten(), lin[-1].weight.flatten()
    assert torch.equal(w0[:1000], w11[:1000])
    lin = [m for m in build_model("curves", "paper", reseed_layers=False)
           if isinstance(m, torch.nn.Linear)]
    assert not torch.equal(lin[0].weight.flatten()[:1000], lin[-1].weight.flatten()[:1000])


def test_iterations_option_gives_exactly_n_rows(tiny_curves, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--optimizer", "kfac", "--iterations", "7", "--batch-size", "32",
                 "--out", str(out), "--no-progress"]) == 0
    lines = (out / "iterations.csv").read_text().splitlines()
    assert lines[0] == "iteration,wall_time,minibatch_loss_pixel"
    rows = list(csv.DictReader(lines))
    assert [int(r["iteration"]) for r in rows] == list(range(1, 8))
    times = [float(r["wall_time"]) for r in rows]
    assert all(b >= a for a, b in zip(times, times[1:]))
    # row 1: the initial model's per-pixel loss on the first minibatch (before the update)
    torch.manual_seed(0)
    model = build_model("curves", "paper", seed=0, reseed_layers=True)
    perm = torch.randperm(160, generator=torch.Generator().manual_seed(1))
    x = tiny_curves["train"][perm[:32]]
    with torch.no_grad():
        first = float(per_pixel_loss(model(x), x, "bernoulli").mean())
    assert float(rows[0]["minibatch_loss_pixel"]) == pytest.approx(first, rel=1e-5)
    assert float(rows[1]["minibatch_loss_pixel"]) != pytest.approx(first, rel=1e-6)


def test_compare_writes_iterations_per_optimizer(tiny_curves, tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "--optimizers", "sgd,identity_kfac,kfac", "--iterations", "3",
                 "--batch-size", "32", "--out", str(out), "--no-progress"]) == 0
    for name in ["sgd", "identity_kfac", "kfac"]:
        text = (out / "runs" / f"{name}.iterations.csv").read_text().splitlines()
        assert text[0] == ",".join(ITERATION_FIELDS) and len(text) == 4
    summary = (out / "summary.md").read_text()
    assert "next to the authors' stored runs" in summary and "| identity_kfac |" in summary


def test_compare_runs_an_optimizer_at_another_lr_as_its_own_row(tiny_curves, tmp_path):
    """"adam,adam@3e-3": two runs that differ only in the lr (the tuned baseline beside the
    preset's), each with its own files and row; a malformed lr or a repeat is refused."""
    import json

    out = tmp_path / "cmp"
    assert main(["compare", "--optimizers", "adam,adam@3e-3", "--iterations", "3",
                 "--batch-size", "32", "--out", str(out), "--no-progress"]) == 0
    preset = json.loads((out / "runs" / "adam.json").read_text())
    tuned = json.loads((out / "runs" / "adam@3e-3.json").read_text())
    assert preset["hyper"]["lr"] == hyper("curves", "adam").lr
    assert tuned["hyper"]["lr"] == 3e-3 and tuned["config"]["optimizer"] == "adam"
    first = [float(r["minibatch_loss_pixel"]) for r in
             csv.DictReader(open(out / "runs" / "adam@3e-3.iterations.csv"))]
    other = [float(r["minibatch_loss_pixel"]) for r in
             csv.DictReader(open(out / "runs" / "adam.iterations.csv"))]
    assert first[0] == other[0] and first[2] != other[2]  # same start, other steps
    assert "| adam@3e-3 |" in (out / "summary.md").read_text()
    for bad in ("adam@fast", "adam@-1", "adam,adam"):
        assert main(["compare", "--optimizers", bad, "--iterations", "1",
                     "--out", str(tmp_path / "x"), "--no-progress"]) == 2


def _tiny_model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
                               torch.nn.Linear(4, 2)).double()


def _grads_after_step(model, pc, x, y):
    with pc.collect():
        F.mse_loss(model(x), y).backward()
    model.zero_grad()
    F.mse_loss(model(x), y).backward()
    raw = [torch.cat([m.weight.grad, m.bias.grad[:, None]], 1).clone()
           for m in model if isinstance(m, torch.nn.Linear)]
    pc.step()
    out = [torch.cat([m.weight.grad, m.bias.grad[:, None]], 1)
           for m in model if isinstance(m, torch.nn.Linear)]
    return raw, out


@pytest.mark.parametrize("method,terms", [("kfac", 1), ("kpsvd", 1), ("kfac_corrected", 2),
                                          ("lanczos", 2)])
def test_identity_control_is_the_pipeline_with_identity_curvature(method, terms):
    lam, kappa = 0.04, 1e-4
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    model = _tiny_model()
    pc = IdentityCurvature(model, method=method, damping=lam, kl_clip=kappa,
                           kl_clip_mode="authors", damping_scheme="authors")
    raw, got = _grads_after_step(model, pc, x, y)
    # dense: Δ = (I⊗I damped by the authors' formula)⁻¹ vec(∇), then the authors' KL clip
    deltas = []
    for V in raw:
        dg, da = V.shape
        ks = KroneckerSum([(torch.eye(da, dtype=V.dtype), torch.eye(dg, dtype=V.dtype))]
                          + [(torch.zeros(da, da, dtype=V.dtype),
                              torch.zeros(dg, dg, dtype=V.dtype))] * (terms - 1))
        dense = ks.to_dense(lam, "authors")
        d = torch.linalg.solve(dense, V.mT.reshape(-1)).reshape(da, dg).mT
        shift = math.sqrt(lam) if terms == 1 else lam
        torch.testing.assert_close(d, V / (1 + shift) ** 2, rtol=1e-12, atol=1e-14)
        deltas.append(d)
    nu = min(1.0, math.sqrt(kappa / sum(float((d * V).sum().abs()) for d, V in
                                        zip(deltas, raw))))
    assert nu < 1.0  # the clip is active in this test
    for d, g in zip(deltas, got):
        torch.testing.assert_close(g, nu * d, rtol=1e-10, atol=1e-14)


def test_identity_control_equals_kfac_with_its_curvature_set_to_identity():
    lam = 0.01
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    a, b = _tiny_model(), _tiny_model()
    kw = dict(damping=lam, kl_clip=1e-3, kl_clip_mode="authors", damping_scheme="authors")
    _, want = _grads_after_step(a, IdentityCurvature(a, method="kfac", **kw), x, y)
    kfac = KFAC(b, **kw)
    with kfac.collect():
        F.mse_loss(b(x), y).backward()
    kfac._fold_in_captures()
    for s in kfac.layers.values():
        da, dg = s.curvature.terms[0][0].shape[0], s.curvature.terms[0][1].shape[0]
        s.curvature = KroneckerSum([(torch.eye(da, dtype=torch.float64),
                                     torch.eye(dg, dtype=torch.float64))])
    b.zero_grad()
    F.mse_loss(b(x), y).backward()
    kfac.step()
    got = [torch.cat([m.weight.grad, m.bias.grad[:, None]], 1)
           for m in b if isinstance(m, torch.nn.Linear)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-15)


def test_constant_loss_is_the_loss_of_the_mean_image():
    x = data.make_curves(50, seed=4).double()
    p = x.mean(0, keepdim=True).clamp(1e-6, 1 - 1e-6)
    logits = (p / (1 - p)).log().expand_as(x)
    want = float(F.binary_cross_entropy_with_logits(logits, x))
    assert constant_loss(x, "bernoulli") == pytest.approx(want, rel=1e-4)
    y = torch.randn(30, 7, dtype=torch.float64)
    assert constant_loss(y, "gaussian") == pytest.approx(float(y.var(0, unbiased=False).mean()))


def test_kfac_trace_split_keeps_the_product_and_matches_kfacs_trace():
    from kronfisher.bench.optimizers import kfac_trace_split
    from kronfisher.curvature import approximate

    torch.manual_seed(1)
    a = torch.cat([torch.randn(20, 4, dtype=torch.float64) * 3,
                   torch.ones(20, 1, dtype=torch.float64)], 1)
    g = torch.randn(20, 3, dtype=torch.float64) * 1e-3
    for method in ["kpsvd", "lanczos"]:
        ks = approximate(a, g, method)
        split = kfac_trace_split(ks, a)
        torch.testing.assert_close(split.to_dense(), ks.to_dense(), rtol=1e-12, atol=1e-18)
        A_kfac = approximate(a, g, "kfac").terms[0][0]
        assert float(split.terms[0][0].trace()) == pytest.approx(float(A_kfac.trace()),
                                                                 rel=1e-12)
        for (A2, G2), (B2, H2) in zip(split.terms[1:], ks.terms[1:]):
            assert torch.equal(A2, B2) and torch.equal(G2, H2)


def test_factor_balance_option_reaches_the_preconditioner():
    from dataclasses import replace

    model = _tiny_model()
    h = replace(hyper("curves", "kpsvd", "paper"), factor_balance="kfac_trace")
    pc = make_optimizers("kpsvd", model, h).preconditioner
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    with pc.collect():
        F.mse_loss(model(x), y).backward()
    pc._fold_in_captures()
    first = model[0]
    a = torch.cat([x, torch.ones(6, 1, dtype=torch.float64)], 1)
    A = pc.layers["0"].curvature.terms[0][0]
    assert float(A.trace()) == pytest.approx(float(a.square().sum(1).mean()), rel=1e-10)
    assert first is pc.layers["0"].module
    with pytest.raises(ValueError, match="factor_balance"):
        make_optimizers("kpsvd", model, replace(h, factor_balance="nope"))


@pytest.mark.parametrize("preset, names", [
    ("paper", ["kfac", "kpsvd", "deflation", "kfac_corrected", "lanczos", "adam", "sgd",
               "adam@0.003"]),
    (None, ["kfac", "kpsvd", "deflation", "kfac_corrected", "lanczos", "adam@0.003"]),
])
def test_demo_end_to_end_prints_the_authors_column(tiny_curves, tmp_path, capsys, preset,
                                                   names):
    argv = ["demo", "--time-budget", "0.2", "--out", str(tmp_path / "demo"), "--no-progress"]
    assert main(argv + (["--preset", preset] if preset else [])) == 0
    out = capsys.readouterr().out
    assert "next to the authors' stored run at the same iteration" in out
    assert "best natural-gradient method" in out and "best first-order" in out
    assert ("adaptive preset" in out) == (preset is None)
    runs = sorted(p.name for p in (tmp_path / "demo" / "runs").glob("*.iterations.csv"))
    assert runs == sorted(f"{name}.iterations.csv" for name in names)
