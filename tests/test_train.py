import json

import torch

from sejd import load_checkpoint
from sejd.cli import main
from sejd.model.tarflow import TarFlow, TarFlowConfig
from sejd.workflows.data import HOLDOUT_FRACTION, load_dataset
from sejd.workflows.train import evaluate_bpd, train

TINY = TarFlowConfig(in_channels=1, img_size=16, patch_size=4, channels=32, num_blocks=2, layers_per_block=1,
                     head_dim=16, num_classes=10)


def test_training_lowers_the_loss_writes_a_checkpoint_and_resumes(tmp_path):
    out = tmp_path / "run"
    meta = train("digits", TINY, out, steps=30, batch_size=16, lr=3e-3, warmup=5, ckpt_every=10, threads=1)
    model = load_checkpoint(out)
    assert model.config == TINY and model.noise_std == 0.05
    recorded = json.loads((out / "config.json").read_text())["training"]
    assert recorded["steps"] == 30 and recorded["heldout_bpd"] == meta["training"]["heldout_bpd"]
    x, y = load_dataset("digits").heldout()
    torch.manual_seed(0)
    untrained = evaluate_bpd(TarFlow(TINY).eval(), x, y, 0.05)
    assert meta["training"]["heldout_bpd"] < untrained  # it learned something
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["step"] == 30
    train("digits", TINY, out, steps=40, batch_size=16, lr=3e-3, warmup=5, ckpt_every=10, threads=1)  # resumes
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 40
    assert not list(out.glob(".*.tmp"))


def test_train_cli_records_its_command(tmp_path):
    out = tmp_path / "cli"
    assert main(["train", "--dataset", "digits", "--out", str(out), "--steps", "2", "--batch-size", "4",
                 "--channels", "32", "--head-dim", "16", "--blocks", "2", "--layers-per-block", "1",
                 "--patch-size", "4", "--threads", "1"]) == 0
    cmd = json.loads((out / "config.json").read_text())["training"]["command"]
    assert cmd.startswith("sejd train --dataset digits") and "--steps 2" in cmd


def test_textures_holdout_comes_from_unseen_columns():
    data = load_dataset("textures")
    for train_part, test_part in zip(data.train, data.test):
        assert test_part.shape[2] >= 40 and train_part.shape[2] <= (train_part.shape[2] + test_part.shape[2]) * \
            (1 - HOLDOUT_FRACTION) + 1
    x, _ = data.batch(8, torch.Generator().manual_seed(0))
    assert x.shape == (8, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    hx, _ = data.heldout()
    assert hx.shape == (512, 3, 32, 32)
    torch.testing.assert_close(hx, load_dataset("textures").heldout()[0])  # fixed, seeded crops


def test_train_keeps_ml_tarflows_option_spellings_as_aliases():
    from sejd.cli import build_parser
    spelled = {"img-size": "8", "patch-size": "4", "layers-per-block": "1", "head-dim": "16", "noise-std": "0.1",
               "batch-size": "4", "drop-label": "0.2"}
    for sep in ("-", "_"):
        argv = ["train", "--dataset", "digits", "--out", "x"]
        for name, value in spelled.items():
            argv += [f"--{name.replace('-', sep)}", value]
        a = build_parser().parse_args(argv)
        assert (a.img_size, a.patch_size, a.layers_per_block, a.head_dim, a.noise_std, a.batch_size, a.drop_label) == \
            (8, 4, 1, 16, 0.1, 4, 0.2), sep
    defaults = build_parser().parse_args(["train", "--dataset", "digits", "--out", "x"])
    assert (defaults.batch_size, defaults.head_dim, defaults.img_size) == (64, 64, None)  # aliases add no defaults


def test_train_without_scikit_learn_names_the_extra(tmp_path, monkeypatch, capsys):
    import sys
    for module in ("sklearn", "sklearn.datasets"):
        monkeypatch.setitem(sys.modules, module, None)  # `import sklearn` now raises ImportError
    assert main(["train", "--dataset", "digits", "--out", str(tmp_path / "run"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sejd: error:") and "pip install 'sejd[train]'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()
