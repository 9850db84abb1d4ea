import pickle

import pytest
import torch

from sejd import (
    CheckpointError,
    ConfigError,
    TarFlowConfig,
    load_checkpoint,
    save_checkpoint,
)
from tests.conftest import OTHER_BLOCKS, data_like, make_model


def save_pth(model, path):
    torch.save(model.state_dict(), path)  # what ml-tarflow writes: a plain state dict
    return path


def assert_same_model(a, b):
    x = data_like(a, 2)
    y = torch.tensor([2, -1]) if a.config.num_classes else None
    torch.testing.assert_close(a(x, y)[0], b(x, y)[0], atol=0, rtol=0)


def test_ml_tarflow_pth_with_filename_convention_loads(tmp_path):
    model = make_model()
    path = save_pth(model, tmp_path / "toy_model_2_64_4_2_0.07.pth")
    loaded = load_checkpoint(path, config={"head_dim": 32})
    assert loaded.config == model.config
    assert loaded.noise_std == pytest.approx(0.07)
    assert_same_model(model, loaded)


def test_pth_config_inferred_from_shapes_or_given(tmp_path):
    model = make_model(nvp=False, num_classes=0)
    path = save_pth(model, tmp_path / "weights.pth")
    assert load_checkpoint(path, config={"head_dim": 32}).config == model.config
    assert load_checkpoint(path, config=model.config).config == model.config


@pytest.mark.parametrize("kind", OTHER_BLOCKS)
def test_other_blocks_load_with_their_width_and_biases_read_from_the_tensors(tmp_path, kind):
    overrides = {k: v for k, v in OTHER_BLOCKS[kind].items() if k != "seed"}
    model = make_model(**OTHER_BLOCKS[kind])
    path = save_pth(model, tmp_path / "weights.pth")
    loaded = load_checkpoint(path, config={"head_dim": model.config.head_dim})
    assert loaded.config == model.config and {k: getattr(loaded.config, k) for k in overrides} == overrides
    assert_same_model(model, loaded)
    assert_same_model(model, load_checkpoint(save_checkpoint(loaded, tmp_path / "sejd")))  # sejd's format too
    flipped = {"bias": not model.config.bias}
    with pytest.raises(ConfigError, match=r"bias=.* contradicts the checkpoint's tensors, which say bias="):
        load_checkpoint(path, config={"head_dim": model.config.head_dim, **flipped})


def test_ddp_module_prefix_is_stripped(tmp_path):
    model = make_model()
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "m.pth")
    assert_same_model(model, load_checkpoint(tmp_path / "m.pth", config=model.config))


@pytest.mark.parametrize("layout", ["folder", "pair"])
def test_sejd_format_round_trips(tmp_path, layout):
    model = make_model()
    model.noise_std = 0.05
    folder = save_checkpoint(model, tmp_path / "ckpt", note="hello")
    if layout == "pair":
        (folder / "model.safetensors").rename(tmp_path / "m.safetensors")
        (folder / "config.json").rename(tmp_path / "m.json")
        src = tmp_path / "m.safetensors"
    else:
        src = folder
    loaded = load_checkpoint(src)
    assert loaded.config == model.config and loaded.noise_std == 0.05 and loaded.meta["note"] == "hello"
    assert_same_model(model, loaded)
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave nothing behind


def test_missing_key_is_named(tmp_path):
    sd = make_model().state_dict()
    del sd["blocks.1.attn_blocks.0.mlp.norm.weight"]
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match=r"missing \['blocks\.1\.attn_blocks\.0\.mlp\.norm\.weight'\]"):
        load_checkpoint(tmp_path / "m.pth", config={"head_dim": 32})


def test_unexpected_key_is_named(tmp_path):
    sd = make_model().state_dict()
    sd["blocks.0.extra"] = torch.zeros(1)
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match="unexpected.*blocks.0.extra"):
        load_checkpoint(tmp_path / "m.pth", config={"head_dim": 32})


def test_config_contradicting_weights_names_key_and_both_shapes(tmp_path):
    model = make_model()
    save_pth(model, tmp_path / "m.pth")
    wrong = TarFlowConfig(**{**model.config.to_dict(), "expansion": 2})
    with pytest.raises(CheckpointError, match=r"mlp\.main\.0\.weight has shape \(256, 64\).*expects \(128, 64\)"):
        load_checkpoint(tmp_path / "m.pth", config=wrong)


def test_filename_contradicting_config_is_refused(tmp_path):
    model = make_model()
    path = save_pth(model, tmp_path / "toy_model_2_64_4_2_0.07.pth")
    with pytest.raises(ConfigError, match="channels=128 contradicts the file name"):
        load_checkpoint(path, config={"channels": 128, "head_dim": 32})


def test_filename_contradicting_weights_is_refused(tmp_path):
    model = make_model()
    path = save_pth(model, tmp_path / "toy_model_2_64_6_2_0.07.pth")  # says 6 blocks, has 4
    with pytest.raises(CheckpointError, match="missing.*blocks.4"):
        load_checkpoint(path, config={"head_dim": 32})


def test_truncated_file_is_refused(tmp_path):
    model = make_model()
    path = save_pth(model, tmp_path / "m.pth")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_checkpoint(path)


def test_non_checkpoint_file_is_refused(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello, I am not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.pth"):
        load_checkpoint(path)


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_code_is_never_executed(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"blocks.0.pos_embed": Evil()}, path, _use_new_zipfile_serialization=True)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(path)
    assert "must never run" not in capsys.readouterr().out


def test_pickle_of_non_tensors_is_refused(tmp_path):
    path = tmp_path / "odd.pth"
    with open(path, "wb") as f:
        pickle.dump([1, 2, 3], f)
    with pytest.raises(CheckpointError, match="odd.pth"):
        load_checkpoint(path)
    torch.save({"a": "string"}, tmp_path / "str.pth")
    with pytest.raises(CheckpointError, match="expected a state dict of name -> tensor"):
        load_checkpoint(tmp_path / "str.pth")


def test_truncated_safetensors_is_refused(tmp_path):
    folder = save_checkpoint(make_model(), tmp_path / "ckpt")
    w = folder / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(folder)


def test_unknown_paths_and_builtins(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="unknown builtin model 'nope'"):
        load_checkpoint("builtin:nope")


def test_malformed_layouts_are_checkpoint_errors(tmp_path):
    sd = make_model().state_dict()
    sd["blocks.extra.foo"] = torch.zeros(1)
    torch.save(sd, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="cannot read its layout"):
        load_checkpoint(tmp_path / "odd.pth")
    torch.save({"blocks.0.pos_embed": torch.zeros(16, 64)}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "partial.pth")
    model = make_model()
    torch.save(model.state_dict(), tmp_path / "toy_model_2_64_4_2_1-2.pth")  # not a number: not the convention
    assert load_checkpoint(tmp_path / "toy_model_2_64_4_2_1-2.pth", config={"head_dim": 32}).noise_std == 0.0


def test_config_contradicting_a_sejd_checkpoint_is_refused(tmp_path):
    folder = save_checkpoint(make_model(), tmp_path / "ckpt")
    with pytest.raises(ConfigError, match="head_dim=64 contradicts the checkpoint's own config"):
        load_checkpoint(folder, config={"head_dim": 64})
    (folder / "config.json").write_text('{"config": 5}')
    with pytest.raises(CheckpointError, match="expected an object with a 'config' object"):
        load_checkpoint(folder)
