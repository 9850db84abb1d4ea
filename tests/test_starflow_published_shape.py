"""A slim STARFlow of the published 3B layout's depth and token count (six blocks of 2,2,2,2,2,24 layers, the
24-layer deep block sampled first and conditioned on 128 text tokens of width 2048; T = 1024 latent tokens of
width 4; RoPE, start token, softplus scale, final RMSNorm, soft clip) at width 128, in ml-starflow's own
checkpoint layout with random weights: export -> build (ort-cpu) -> check -> sample with text embeddings and
guidance, through the command line as a user runs it.

Tolerances: engines against the PyTorch path 1e-4 absolute on latents (fp32 round-off through 34 layers);
Apple's sampler (`starflow` plan) on ort-cpu against the same plan in PyTorch."""

import json

import numpy as np
import pytest
import torch

from sejd.cli import main
from sejd.export.bundle import load_bundle
from sejd.model.starflow_checkpoint import load_starflow
from sejd.runtime.request import seeded_noise
from sejd.runtime.sampler import sample
from tests.model import starflow_oracle as so

SLIM_3B = {"in_channels": 4, "img_size": 32, "patch_size": 1, "channels": 128, "num_blocks": 6,
           "layers_per_block": [2, 2, 2, 2, 2, 24], "head_dim": 64, "rope": True, "sos": True, "txt_size": 128,
           "txt_dim": 2048, "cond_top_only": True, "use_softplus": True, "use_final_norm": True, "soft_clip": 4.0,
           "seq_order": "L2R"}  # published: 3072 channels
GUIDANCE, SEED = 3.6, 11


@pytest.fixture(scope="module")
def slim(tmp_path_factory):
    root = tmp_path_factory.mktemp("starflow_published_shape")
    torch.save(so.random_state_dict(SLIM_3B, seed=0), root / "starflow.pth")
    g = torch.Generator().manual_seed(3)
    np.save(root / "text.npy", (0.2 * torch.randn(1, 128, 2048, generator=g)).numpy())
    np.save(root / "null.npy", (0.2 * torch.randn(128, 2048, generator=g)).numpy())
    config = json.dumps(SLIM_3B)
    assert main(["export", str(root / "starflow.pth"), "--config", config, "-o", str(root / "bundle"),
                 "--no-progress"]) == 0
    assert main(["build", str(root / "bundle"), "--backend", "ort-cpu", "--no-progress"]) == 0
    return root


def test_the_bundle_holds_every_block_with_its_own_depth_and_the_text_prefix(slim):
    bundle = load_bundle(slim / "bundle")
    variants = {(g["block"], g["variant"]) for g in bundle.manifest["graphs"]}
    assert (5, "prefix") in variants and not any(v == "prefix" for k, v in variants if k != 5)
    model = bundle.load_model()
    assert [len(b.attn_blocks) for b in model.blocks] == [2, 2, 2, 2, 2, 24]
    assert model.config.num_tokens == 1024 and model.config.txt_size == 128


def test_check_passes_on_every_graph_and_plan(slim):
    assert main(["check", str(slim / "bundle"), "--backend", "ort-cpu", "--quick", "--no-progress",
                 "--json", str(slim / "check.json")]) == 0
    report = json.loads((slim / "check.json").read_text())
    assert report["passed"] is True


def test_sample_on_engines_with_text_and_guidance_equals_the_pytorch_path(slim, tmp_path):
    out = tmp_path / "latents.npy"
    assert main(["sample", str(slim / "bundle"), "--backend", "ort-cpu", "--text-embeddings", str(slim / "text.npy"),
                 "--uncond-text-embeddings", str(slim / "null.npy"), "--guidance", str(GUIDANCE), "--plan",
                 "starflow", "-n", "1", "--seed", str(SEED), "--npy", str(out), "--no-progress"]) == 0
    got = torch.from_numpy(np.load(out))
    model = load_starflow(slim / "starflow.pth", config=SLIM_3B)
    noise = seeded_noise(1, SEED, 1024, 4)
    ref = sample(model, noise, plan="starflow", text=torch.from_numpy(np.load(slim / "text.npy")),
                 uncond_text=torch.from_numpy(np.load(slim / "null.npy")), guidance=GUIDANCE, progress=False).images
    assert got.shape == (1, 4, 32, 32) and torch.isfinite(got).all()
    assert (got - ref).abs().max().item() <= 1e-4
