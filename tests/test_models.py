"""The shipped ShapesWorld model: loads, embeds, is deterministic, separates unseen classes."""

from __future__ import annotations

import pytest
import torch

import whymatch
from whymatch.data import ShapesWorld
from whymatch.models import ShapesCNN, default_weights_path, load_default_model
from whymatch.models import shapes_cnn


@pytest.fixture(scope="module")
def model() -> whymatch.SimilarityModel:
    return load_default_model()


def test_default_model_loads(model):
    assert isinstance(model, whymatch.SimilarityModel)
    assert isinstance(model.embedder, ShapesCNN)
    assert not model.training and not model.embedder.training
    assert model.similarity_fn == "cosine"
    path = default_weights_path()
    assert path.is_file() and path.stat().st_size < 2 * 1024 * 1024


def test_embedding_shape_and_determinism(model):
    x = ShapesWorld("test", 4, seed=11).images()
    e1 = model.embed(x)
    assert e1.shape == (4, 64) and e1.dtype == torch.float32
    assert torch.equal(e1, model.embed(x))
    assert torch.equal(e1, load_default_model().embed(x))
    # batching does not change the result beyond float rounding
    assert torch.allclose(e1, model.embed(x, batch_size=3), atol=1e-5)


def test_last_conv_block_exposed(model):
    net = model.embedder
    assert isinstance(net.layer4, torch.nn.Module) and net.features[-1] is net.layer4
    fmap = net.feature_maps(torch.rand(2, 3, 96, 96))
    assert fmap.shape == (2, 128, 12, 12)


def test_missing_weights_error_names_path_and_script(monkeypatch):
    monkeypatch.setattr(shapes_cnn, "WEIGHTS_RESOURCE", ("whymatch.models", "weights/no_such_file.pt"))
    with pytest.raises(FileNotFoundError) as info:
        load_default_model()
    msg = str(info.value)
    assert "no_such_file.pt" in msg and "scripts/train_shapesworld.py" in msg


def test_weights_path_loads_another_shapescnn_with_the_same_checks(model, tmp_path):
    from whymatch.io import FileFormatError
    net = ShapesCNN()
    torch.manual_seed(3)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    torch.save(net.state_dict(), tmp_path / "other.pt")
    other = load_default_model(weights=tmp_path / "other.pt")
    x = torch.rand(2, 3, 96, 96)
    assert torch.equal(other.embed(x), whymatch.SimilarityModel(net.eval(), "cosine").embed(x))
    assert not torch.equal(other.embed(x), model.embed(x))
    assert torch.equal(load_default_model(weights=str(default_weights_path())).embed(x), model.embed(x))
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "wrong.pt")
    with pytest.raises(FileFormatError, match="wrong.pt"):
        load_default_model(weights=tmp_path / "wrong.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_default_model(weights=tmp_path / "missing.pt")
    with pytest.raises(TypeError, match="weights must be a path"):
        load_default_model(weights=3)


def test_positive_pairs_of_unseen_classes_score_higher(model):
    ds = ShapesWorld("test", 240, seed=99)  # test classes: never seen in training
    p = ds.pairs(60, k_refs=1, n_negatives=1, seed=0)
    idx = torch.cat([p.query, p.references[:, 0], p.negatives[:, 0]])
    emb = model.embed(ds.images(idx))
    q, r, n = emb[:60], emb[60:120], emb[120:]
    pos = model.pairwise(q, r).diagonal()
    neg = model.pairwise(q, n).diagonal()
    assert float(pos.mean()) > float(neg.mean()) + 0.1
    assert float((pos > neg).float().mean()) > 0.8


def test_similarity_of_pairs(model):
    ds = ShapesWorld("test", 120, seed=4)
    x = ds.images([0, 60])  # same class (i and i + 60)
    s = model.similarity(x[:1], x[1:])
    assert s.shape == (1,) and -1.0 <= float(s) <= 1.0


def test_shapes_cnn_argument_errors():
    with pytest.raises(ValueError, match="embedding_dim"):
        ShapesCNN(embedding_dim=0)
    with pytest.raises(ValueError, match="widths"):
        ShapesCNN(widths=(8, 8, 8))
