import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_curves(monkeypatch):
    """A few hundred generated CURVES images in place of the cached data sets."""
    import kronfisher.data as data

    sets = {"train": data.make_curves(160, seed=1), "test": data.make_curves(64, seed=2)}

    def fake_load(name, split="train", **kw):
        assert name == "curves"
        return sets[split]

    monkeypatch.setattr(data, "load_dataset", fake_load)
    return sets
