"""A slim model of the published shape (ml-tarflow's AFHQ-256: 256x256 images, patch 8, T = 1024
tokens of width 192, 8 blocks, 3 classes), with few channels and one layer per block so that it runs
in the test suite: export -> build (ort-cpu) -> check (a reduced selection) -> sample (SJD, ort-cpu,
batch 2), from an ml-tarflow `.pth` named by its file-name convention."""

import json

import numpy as np
import pytest
import torch

from sejd.cli import main
from sejd.engines import backend
from sejd.engines.ort import build_ort
from sejd.export.bundle import load_bundle
from sejd.export.exporter import export_bundle
from sejd.model.checkpoint import load_checkpoint
from sejd.runtime.runner import Conditioning
from sejd.runtime.sampler import sample
from sejd.workflows.check import check_graphs
from sejd.workflows.quality import psnr_db
from tests.conftest import make_model

SHAPE = dict(in_channels=3, img_size=256, patch_size=8, num_blocks=8, num_classes=3)  # as published
SLIM = dict(channels=128, layers_per_block=1, head_dim=64)  # published: 768 channels, 8 layers, head_dim 64
# only what sequential and SJD decoding on ort-cpu use (the other variants cost export time, not coverage)
VARIANTS = ("step_rows", "window", "jacobi")
# Weights are stored once: the bundle is the model/ copy of the checkpoint plus each block's weights once
# (shared by all its graphs) plus topology; a copy per variant would add len(VARIANTS) - 1 more.
STORED_ONCE_SLACK = 1.2
TAU = 0.01  # tight enough that SJD lands near exact decoding on this model
BATCH = 2


@pytest.fixture(scope="module")
def published_shape(tmp_path_factory):
    """The slim checkpoint under ml-tarflow's file name, exported and built for ort-cpu."""
    root = tmp_path_factory.mktemp("published_shape")
    model = make_model(**SHAPE, **SLIM)
    ckpt = root / f"afhq_model_{SHAPE['patch_size']}_{SLIM['channels']}_{SHAPE['num_blocks']}_" \
                  f"{SLIM['layers_per_block']}_0.07.pth"
    torch.save(model.state_dict(), ckpt)  # ml-tarflow's layout: a plain state dict
    bundle = export_bundle(ckpt, root / "bundle", variants=VARIANTS, batch_max=BATCH, show_progress=False)
    build_ort(bundle, "ort-cpu", show_progress=False)
    return ckpt, load_bundle(bundle.path)


def test_the_checkpoint_has_the_published_geometry(published_shape):
    ckpt, bundle = published_shape
    cfg = load_checkpoint(ckpt).config
    assert (cfg.num_tokens, cfg.token_dim, cfg.img_size, cfg.num_blocks) == (1024, 192, 256, 8)
    assert bundle.config == cfg


def test_bundle_size_against_the_checkpoint(published_shape):
    ckpt, bundle = published_shape
    size = sum(f.stat().st_size for f in bundle.path.rglob("*") if f.is_file() and "engines" not in f.parts)
    # parameters only: the checkpoint also holds every block's T x T attention mask, which graphs do not
    weights = 4 * bundle.config.num_parameters
    model_copy = sum(f.stat().st_size for f in (bundle.path / "model").iterdir())
    assert ckpt.stat().st_size * 0.9 < model_copy <= ckpt.stat().st_size * 1.01
    assert model_copy + weights < size <= model_copy + STORED_ONCE_SLACK * weights, (size, model_copy, weights)


def test_engines_match_pytorch_on_a_reduced_selection_of_graphs(published_shape):
    _, bundle = published_shape
    first = bundle.config.num_blocks - 1  # the first block at sampling time (the other blocks' graphs differ
    graphs = [g for g in bundle.manifest["graphs"] if g["block"] == first]  # only in their weights)
    checks = check_graphs(bundle, "ort-cpu", bundle.load_model(), show_progress=False, graphs=graphs)
    assert len(checks) == len(VARIANTS) and all(checks), [c.line() for c in checks]


def test_sjd_sample_on_ort_cpu_matches_pytorch_and_exact_decoding_and_shares_one_cache_pool(published_shape,
                                                                                             tmp_path):
    _, bundle = published_shape
    npy, js = tmp_path / "s.npy", tmp_path / "s.json"
    assert main(["sample", str(bundle.path), "--backend", "ort-cpu", "-n", str(BATCH), "--plan", "sjd",
                 "--tau", str(TAU), "--npy", str(npy), "--json", str(js)]) == 0
    got, stats = torch.from_numpy(np.load(npy)), json.loads(js.read_text())
    model, cfg = bundle.load_model(), bundle.config
    noise = torch.randn(BATCH, cfg.num_tokens, cfg.token_dim, generator=torch.Generator().manual_seed(0))
    kw = dict(labels=torch.arange(BATCH) % cfg.num_classes, progress=False)  # what the CLI samples at seed 0
    same = sample(model, noise, plan="sjd", tau=TAU, **kw)
    exact = sample(model, noise, plan="sequential", **kw).images
    assert psnr_db(got, same.images) >= 60  # the engines' parity floor in fp32
    assert psnr_db(got, exact) >= 40
    iterations = [b["iterations"] for b in stats["blocks"]]
    assert iterations[0] == cfg.num_tokens - 1 and all(1 <= i < 100 for i in iterations[1:]), iterations
    assert iterations == [b.iterations for b in same.stats.blocks]
    assert stats["peak_rss_bytes"] > 100 * 2**20
    runners = backend("ort-cpu")[0].runners(bundle)
    for r in runners:
        r.begin(BATCH, Conditioning.build(BATCH, cfg.num_tokens, kw["labels"]))
    pointers = {tuple(a.ctypes.data for a in r._caches[0] + r._caches[1]) for r in runners}
    assert len(pointers) == 1  # every block decodes into the same buffers (both ping-pong sets)
