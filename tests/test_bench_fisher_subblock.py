"""Fisher-accuracy study on a sub-block of a layer; SOAP/Shampoo baselines build and step."""

import csv

import pytest
import torch

import kronfisher.data as data
from kronfisher.bench.optimizers import make_optimizers
from kronfisher.bench.problems import build_model, hyper, per_example_loss
from kronfisher.cli import main
from kronfisher.linalg import exact_fisher_block


def test_sub_block_statistics_give_the_sub_matrix_of_the_exact_block():
    torch.manual_seed(0)
    m, d_in, d_g, k_in, k_out = 9, 5, 4, 2, 3
    a = torch.cat([torch.randn(m, d_in, dtype=torch.float64), torch.ones(m, 1,
                                                                         dtype=torch.float64)], 1)
    g = torch.randn(m, d_g, dtype=torch.float64)
    full = exact_fisher_block(a, g)
    sub = exact_fisher_block(torch.cat([a[:, :k_in], a[:, -1:]], 1), g[:, :k_out])
    # vec of the d_g × d_a gradient matrix stacks columns: index = i_a · d_g + i_g
    cols = [*range(k_in), d_in]
    idx = torch.tensor([i_a * d_g + i_g for i_a in cols for i_g in range(k_out)])
    torch.testing.assert_close(sub, full[idx][:, idx], rtol=1e-12, atol=1e-14)


@pytest.fixture
def tiny_curves(monkeypatch):
    sets = {"train": data.make_curves(96, seed=1), "test": data.make_curves(16, seed=2)}
    monkeypatch.setattr(data, "load_dataset", lambda name, split="train", **kw: sets[split])


def test_fisher_error_command_on_a_sub_block(tiny_curves, tmp_path):
    argv = ["fisher-error", "--layer", "1", "--steps", "2", "--every", "2", "--batch", "32",
            "--out", str(tmp_path)]
    assert main(argv) == 2  # the whole 784→400 layer is far too big for a dense Fisher
    assert main([*argv, "--sub-block", "4,300"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "fisher_error.csv")))
    assert len(rows) == 2 * 5 and all(r["violations"] == "" for r in rows)
    assert main([*argv, "--sub-block", "500,300"]) == 2  # does not fit the layer


@pytest.mark.parametrize("name", ["soap", "shampoo"])
def test_pytorch_optimizer_baselines_step(name):
    pytest.importorskip("pytorch_optimizer")
    torch.manual_seed(0)
    model = build_model("curves", "paper")
    h = hyper("curves", name, "paper")
    opt = make_optimizers(name, model, h).optimizer
    assert opt.param_groups[0]["lr"] == h.lr == {"soap": 1e-2, "shampoo": 1e-3}[name]
    x = data.make_curves(16, seed=3)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(10 if name == "shampoo" else 2):  # Shampoo: first update at step 10
        opt.zero_grad()
        (per_example_loss(model(x), x, "bernoulli").mean() * h.loss_scale).backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
