"""`sejd sample` on an ml-starflow checkpoint: text embeddings in, latents out, equal to Apple's block-wise
Jacobi sampler as stated by the independent oracle (tests/model/starflow_oracle.py) on the same seeded noise.
Tolerance 1e-4 absolute (float32 round-off over 3 blocks)."""

import json

import numpy as np
import pytest
import torch

from sejd import save_checkpoint
from sejd.cli import main
from sejd.runtime.request import seeded_noise
from tests.conftest import make_model
from tests.model import starflow_oracle as so
from tests.model.test_starflow import TINY

N, SEED, GUIDANCE = 2, 3, 3.6


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("starflow_cli")
    sd = so.random_state_dict(TINY, seed=0)
    torch.save(sd, root / "starflow.pth")  # Apple's layout: a plain state dict
    g = torch.Generator().manual_seed(7)
    text = torch.randn(N, TINY["txt_size"], TINY["txt_dim"], generator=g)
    null = torch.randn(TINY["txt_size"], TINY["txt_dim"], generator=g)
    np.save(root / "text.npy", text.numpy())
    np.save(root / "null.npy", null.numpy())
    np.save(root / "narrow.npy", text[..., :-1].numpy())
    return root, sd, text, null


def _args(root, *extra):
    return ["sample", str(root / "starflow.pth"), "--config", json.dumps(TINY), "-n", str(N), "--seed", str(SEED),
            "--no-progress", *extra]


def test_sample_with_the_starflow_plan_equals_apples_jacobi_sampler(files, tmp_path, capsys):
    root, sd, text, null = files
    out = tmp_path / "latents.npy"
    assert main(_args(root, "--text-embeddings", str(root / "text.npy"), "--uncond-text-embeddings",
                      str(root / "null.npy"), "--guidance", str(GUIDANCE), "--plan", "starflow",
                      "--npy", str(out))) == 0
    assert "latents (2, 4, 4, 4)" in capsys.readouterr().out
    s = TINY["img_size"]
    tokens = seeded_noise(N, SEED, s * s, TINY["in_channels"])  # (B, T, D), patch 1: channels per token
    noise = tokens.transpose(1, 2).reshape(N, TINY["in_channels"], s, s)
    ref = so.jacobi_sample(sd, TINY, noise, torch.cat([text, null.expand(N, -1, -1)]), GUIDANCE,
                           block_size=16, threshold=1e-3, max_iters=32)
    got = torch.from_numpy(np.load(out))
    assert got.shape == ref.shape and (got - ref).abs().max().item() <= 1e-4


def test_sequential_and_sjd_plans_agree_with_the_exact_reverse(files, tmp_path):
    root, sd, text, null = files
    outs = {}
    for plan in ("sequential", "sjd"):
        outs[plan] = tmp_path / f"{plan}.npy"
        assert main(_args(root, "--text-embeddings", str(root / "text.npy"), "--plan", plan, "--tau", "1e-6",
                          "--npy", str(outs[plan]))) == 0
    exact, sjd = (torch.from_numpy(np.load(outs[p])) for p in ("sequential", "sjd"))
    assert (exact - sjd).abs().max().item() <= 1e-4


@pytest.mark.parametrize("extra, message", [
    ((), "a STARFlow samples from text: give --text-embeddings"),
    (("--text-embeddings", "{root}/narrow.npy"), "expected"),
    (("--text-embeddings", "{root}/text.npy", "--label", "1"), "--label is for TarFlow models"),
    (("--text-embeddings", "{root}/text.npy", "--out", "{tmp}/x.png"), "--out writes images: give --vae DIR"),
    (("--prompt", "a cat"), "--prompt needs --text-encoder DIR"),
])
def test_bad_starflow_sample_arguments_are_one_line_errors(files, tmp_path, capsys, extra, message):
    root = files[0]
    args = [a.format(root=root, tmp=tmp_path) for a in extra]
    assert main(_args(root, *args)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_text_flags_on_a_tarflow_are_refused(files, tmp_path, capsys):
    root = files[0]
    save_checkpoint(make_model(), tmp_path / "tarflow")
    assert main(["sample", str(tmp_path / "tarflow"), "-n", "1", "--text-embeddings", str(root / "text.npy")]) == 2
    assert "--text-embeddings is for STARFlow models" in capsys.readouterr().err
