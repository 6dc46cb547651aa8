"""The examples run, the loss falls, and the preconditioners skip only what each documents."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def transformer():
    return _load("char_transformer")


@pytest.fixture(scope="module")
def cnn():
    return _load("cnn_batchnorm")


def _mean(xs):
    return sum(xs) / len(xs)


def test_corpus_is_arithmetic(transformer):
    ids = transformer.make_corpus(50, seed=3)
    text = "".join(transformer.VOCAB[i] for i in ids.tolist())
    lines = text.strip("\n").split("\n")
    assert len(lines) == 50
    for line in lines:
        lhs, c = line.split("=")
        a, b = lhs.split("+")
        assert int(a) + int(b) == int(c)
    assert torch.equal(ids, transformer.make_corpus(50, seed=3))


@pytest.mark.parametrize("method", ["kpsvd", "kfac_corrected", "adamw"])
def test_transformer_trains(transformer, method):
    torch.set_num_threads(1)
    s = transformer.Settings(batch=16, seq=32, d=32, update_freq=2, curvature_examples=8,
                             damping=1e-2)
    tokens = transformer.make_corpus(400)
    t = transformer.train(method, s, steps=40, tokens=tokens)
    # from the uniform guess ln 13 = 2.56 towards the character frequencies (≈ 2.2)
    assert _mean(t.losses[-6:]) < 0.92 * _mean(t.losses[:3])
    assert set(t.skipped) == set(transformer.DOCUMENTED_SKIPS)


@pytest.mark.parametrize("method", ["kfac", "kpsvd", "sgd"])
def test_cnn_trains(cnn, method):
    torch.set_num_threads(1)
    x, y = cnn.synthetic_digits(256)
    s = cnn.Settings(batch=32, update_freq=2, curvature_examples=16)
    t = cnn.train(method, s, x, y, steps=24)
    assert _mean(t.losses[-6:]) < 0.8 * _mean(t.losses[:3])
    assert set(t.skipped) == set(cnn.DOCUMENTED_SKIPS)
