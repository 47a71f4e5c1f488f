"""whymatch.search (a gallery index and the explanation of a top-k list) and `whymatch search-explain`."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import whymatch
from whymatch import cli, saliency, search
from whymatch.io import FileFormatError

faiss = pytest.importorskip("faiss")

SIZE = 32


def _model(seed: int = 0) -> whymatch.SimilarityModel:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(32, 16))
    return whymatch.SimilarityModel(net.eval())


@pytest.fixture()
def gallery(tmp_path):
    root = tmp_path / "gallery"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(9):
        where = root / "sub" if i % 3 == 0 else root
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(where / f"im{i}.png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_index_is_built_saved_and_reused(gallery, tmp_path, monkeypatch):
    sim, src = _model(), search.DirectoryImages(gallery, SIZE)
    assert len(src) == 9 and "sub/im0.png" in src.names and "notes.txt" not in src.names
    path = tmp_path / "g.faiss"
    built, first = search.GalleryIndex.open(path, sim, src)
    assert first and path.is_file() and (tmp_path / "g.faiss.json").is_file()
    calls = []
    monkeypatch.setattr(search.GalleryIndex, "build", classmethod(lambda cls, *a, **k: calls.append(1)))
    again, second = search.GalleryIndex.open(path, sim, src)
    assert not second and not calls  # reused, not embedded again
    assert again.names == built.names
    torch.testing.assert_close(again.embeddings, built.embeddings)
    # the index ranks each gallery image first for itself
    s, ids = again.search(sim.embed(torch.stack([src.load(i) for i in range(len(src))])), 3)
    assert ids[:, 0].tolist() == list(range(len(src)))
    assert torch.all(s[:, :-1] >= s[:, 1:])


def test_index_loads_after_faiss_torch_utils_import(gallery, tmp_path):
    """pytorch-metric-learning imports faiss.contrib.torch_utils, which makes faiss return tensors."""
    pytest.importorskip("faiss.contrib.torch_utils")
    sim, src = _model(), search.DirectoryImages(gallery, SIZE)
    path = tmp_path / "g.faiss"
    built = search.GalleryIndex.build(sim, src)
    built.save(path)
    again = search.GalleryIndex.load(path, sim, src)
    torch.testing.assert_close(again.embeddings, built.embeddings)


def test_stale_index_is_refused_naming_what_changed(gallery, tmp_path):
    sim, src = _model(), search.DirectoryImages(gallery, SIZE)
    path = tmp_path / "g.faiss"
    search.GalleryIndex.build(sim, src).save(path)
    with pytest.raises(search.StaleIndexError, match="another model or other weights"):
        search.GalleryIndex.load(path, _model(seed=1), src)
    with pytest.raises(search.StaleIndexError, match="image size 32, asked 48"):
        search.GalleryIndex.load(path, sim, search.DirectoryImages(gallery, 48))
    Image.new("RGB", (8, 8)).save(gallery / "new.png")
    os.utime(gallery / "im1.png", ns=(10**9, 10**9))
    (gallery / "im2.png").unlink()
    with pytest.raises(search.StaleIndexError) as e:
        search.GalleryIndex.load(path, sim, search.DirectoryImages(gallery, SIZE))
    msg = str(e.value)
    assert "\n" not in msg and "added" in msg and "new.png" in msg and "removed" in msg and "im2.png" in msg
    assert "changed" in msg and "im1.png" in msg and "--rebuild-index" in msg


def test_files_that_are_not_an_index_give_one_line(gallery, tmp_path, monkeypatch):
    sim, src = _model(), search.DirectoryImages(gallery, SIZE)
    path = tmp_path / "g.faiss"
    search.GalleryIndex.build(sim, src).save(path)
    manifest = json.loads((tmp_path / "g.faiss.json").read_text())

    def forge(data: bytes):
        """Replace the index file and make its manifest agree on byte count and sha256."""
        import hashlib

        path.write_bytes(data)
        (tmp_path / "g.faiss.json").write_text(json.dumps(dict(manifest, index_bytes=len(data),
                                                               index_sha256=hashlib.sha256(data).hexdigest())))

    good = path.read_bytes()
    path.write_bytes(good[:-4])  # truncated, manifest untouched
    with pytest.raises(FileFormatError, match="bytes, its manifest says"):
        search.GalleryIndex.load(path, sim, src)
    forge(b"\x00" * len(good))  # right size, not an index: refused from its header
    with pytest.raises(FileFormatError, match="not a faiss flat index"):
        search.GalleryIndex.load(path, sim, src)
    # faiss.read_index itself on a file that is not an index: one line, no crash
    monkeypatch.setattr(search, "_check_flat_header", lambda p, man: None)
    forge(b"this is not a faiss index at all")
    with pytest.raises(FileFormatError) as e:
        search.GalleryIndex.load(path, sim, src)
    assert "cannot read gallery index" in str(e.value) and "\n" not in str(e.value)
    # a manifest that is not JSON
    (tmp_path / "g.faiss.json").write_text("{")
    with pytest.raises(FileFormatError, match="not valid JSON"):
        search.GalleryIndex.load(path, sim, src)


def test_one_rise_pass_explains_all_k_results(gallery, monkeypatch):
    sim, src = _model(), search.DirectoryImages(gallery, SIZE)
    gi = search.GalleryIndex.build(sim, src)
    passes = []
    original = saliency.RISE._perturbed_embeddings

    def counted(self, *a, **k):
        passes.append(1)
        return original(self, *a, **k)

    monkeypatch.setattr(saliency.RISE, "_perturbed_embeddings", counted)
    query = src.load(4)
    res = search.explain_search(sim, query, gi, src, k=5, n_masks=48, batch_size=48)
    assert len(passes) == 1
    assert res.ids[0] == 4 and res.names[0] == src.names[4] and res.scores[0] == pytest.approx(1.0, abs=1e-5)
    assert res.maps.shape == (5, SIZE, SIZE) and res.references.shape == (5, 3, SIZE, SIZE)
    assert set(res.seconds) == {"embed", "search", "load", "explain"}
    # the maps from the index's embeddings are RISE's maps of the retrieved images themselves
    want = saliency.RISE(sim, n_masks=48, batch_size=48, seed=0).attribute(query, res.references)
    torch.testing.assert_close(res.maps, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res.scores, sim.pairwise(sim.embed(query[None]), sim.embed(res.references))[0],
                               rtol=1e-5, atol=1e-5)


def test_dataset_and_callable_sources():
    sim = _model()
    imgs = torch.rand(6, 3, SIZE, SIZE)
    ds = search.DatasetImages([(imgs[i], i) for i in range(6)])
    fn = search.CallableImages(lambda i: imgs[i], 6)
    for src in (ds, fn):
        gi = search.GalleryIndex.build(sim, src)
        res = search.explain_search(sim, imgs[2], gi, src, k=3, n_masks=16, batch_size=16)
        assert res.ids[0] == 2 and res.maps.shape == (3, SIZE, SIZE)
    with pytest.raises(TypeError, match="gallery dataset"):
        search.DatasetImages(42)


def test_cli_search_explain_builds_then_reuses_the_index(gallery, tmp_path, capsys):
    q = str(gallery / "im4.png")
    index, out = tmp_path / "g.faiss", tmp_path / "report"
    argv = ["search-explain", q, "--gallery", str(gallery), "--index", str(index), "-k", "3", "--out", str(out),
            "--model", "toy_models:tiny_cnn", "--size", str(SIZE), "--n-masks", "32", "--device", "cpu", "--quiet"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "embedded, saved to" in text and "latency on cpu" in text and "im4.png" in text
    assert (out / "index.html").is_file() and index.is_file()
    assert cli.main(argv) == 0
    assert "reused" in capsys.readouterr().out
    # a stale index is one line on stderr, and --rebuild-index rebuilds it
    os.utime(gallery / "im1.png", ns=(10**9, 10**9))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stale" in err and "im1.png" in err
    assert cli.main(argv + ["--rebuild-index"]) == 0
    # a file that is not an index
    bad = tmp_path / "bad.faiss"
    bad.write_bytes(b"garbage")
    assert cli.main([*argv[:4], str(bad), *argv[5:]]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_faiss_gpu_choice_falls_back_to_the_cpu():
    from whymatch.evaluation import faiss_gpu_device

    class GpuFaiss:  # faiss-gpu's surface: GPU resources and a GPU count
        StandardGpuResources = object

        def __init__(self, n):
            self.n = n

        def get_num_gpus(self):
            return self.n

    class CpuFaiss:  # faiss-cpu has no GPU resources
        pass

    assert faiss_gpu_device("cpu", GpuFaiss(1)) is None            # CPU tensors: the CPU index
    assert faiss_gpu_device("cuda:0", CpuFaiss()) is None          # faiss-cpu: the CPU index
    assert faiss_gpu_device("cuda:0", GpuFaiss(0)) is None         # faiss-gpu without a GPU: the CPU index
    assert faiss_gpu_device("cuda:1", GpuFaiss(2)) == 1            # faiss-gpu with GPUs: that GPU
    assert faiss_gpu_device("cuda:3", GpuFaiss(2)) is None         # a device faiss does not see
    assert faiss_gpu_device("cpu") is None                         # the installed faiss


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0,
                    reason="needs a CUDA device and faiss-gpu")
def test_retrieval_evaluator_uses_gpu_faiss_for_cuda_tensors(monkeypatch):
    from whymatch.evaluation import RetrievalEvaluator, faiss_gpu_device, retrieval

    assert faiss_gpu_device("cuda:0") == 0
    moved = []
    original = faiss.index_cpu_to_gpu
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda *a: moved.append(1) or original(*a))
    g = torch.Generator().manual_seed(0)
    emb, labels = torch.randn(300, 32, generator=g), torch.randint(0, 10, (300,), generator=g)
    gpu = RetrievalEvaluator(backend="faiss").get_accuracy(emb.cuda(), labels.cuda())
    cpu = RetrievalEvaluator(backend="torch").get_accuracy(emb, labels)
    assert moved and retrieval._gpu_resources
    assert gpu == pytest.approx(cpu)
