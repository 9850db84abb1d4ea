"""The optional text and image ends of STARFlow: prompt embeddings (.npy or a local T5 encoder) and the VAE decoder.
Tiny random models built in tmp folders only; nothing is ever downloaded."""

from __future__ import annotations

import io
import json
import os
import sys

import numpy as np
import pytest
import torch

from sejd.core.errors import CheckpointError, InputError, SejdError
from sejd.core.extras import MissingExtra
from sejd.workflows.text import TextEncoder, load_text_embeddings, unconditional_embedding
from sejd.workflows.vae import LatentDecoder, latents_or_images

SENTENCES = ["a photo of a cat", "a dog on the grass", "the quick brown fox jumps over the lazy dog",
             "an astronaut riding a horse on the moon", "red blue green yellow orange purple"] * 3
LENGTH, WIDTH = 12, 16


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and text
    return text


# ------------------------------------------------------------------------------------ load_text_embeddings


def _npy(tmp_path, array, name="emb.npy", **kw):
    path = tmp_path / name
    np.save(path, array, **kw)
    return path


def test_embeddings_file_of_one_or_many_prompts(tmp_path):
    many = np.random.default_rng(0).standard_normal((3, LENGTH, WIDTH)).astype(np.float32)
    out = load_text_embeddings(_npy(tmp_path, many), LENGTH, WIDTH)
    assert out.dtype == torch.float32 and out.shape == (3, LENGTH, WIDTH) and torch.equal(out, torch.from_numpy(many))
    one = load_text_embeddings(_npy(tmp_path, many[0].astype(np.float16), "one.npy"), LENGTH, WIDTH)
    assert one.dtype == torch.float32 and one.shape == (1, LENGTH, WIDTH)
    assert torch.equal(one[0], torch.from_numpy(many[0].astype(np.float16).astype(np.float32)))


@pytest.mark.parametrize("shape", [(2, LENGTH, WIDTH + 1), (2, LENGTH - 1, WIDTH), (LENGTH, WIDTH + 1), (WIDTH,),
                                   (1, 1, LENGTH, WIDTH), (0, LENGTH, WIDTH)])
def test_embeddings_of_the_wrong_shape_are_refused_naming_expected_and_got(tmp_path, shape):
    with pytest.raises(InputError) as e:
        load_text_embeddings(_npy(tmp_path, np.zeros(shape, np.float32)), LENGTH, WIDTH)
    text = _one_line(e)
    assert f"(n, {LENGTH}, {WIDTH})" in text and str(tuple(shape)) in text


def test_non_float_and_non_finite_embeddings_are_refused(tmp_path):
    with pytest.raises(InputError, match=r"dtype int64.*expected a float array") as e:
        load_text_embeddings(_npy(tmp_path, np.zeros((LENGTH, WIDTH), np.int64)), LENGTH, WIDTH)
    _one_line(e)
    bad = np.zeros((2, LENGTH, WIDTH), np.float32)
    bad[1, 3, 4] = np.nan
    with pytest.raises(InputError, match=r"1 non-finite") as e:
        load_text_embeddings(_npy(tmp_path, bad), LENGTH, WIDTH)
    _one_line(e)
    huge = np.full((LENGTH, WIDTH), 1e300)  # finite as float64, inf as float32
    with pytest.raises(InputError, match=r"non-finite"):
        load_text_embeddings(_npy(tmp_path, huge), LENGTH, WIDTH)


def test_pickled_object_arrays_are_never_loaded(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = _npy(tmp_path, np.array([Boom(), 1], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match=r"pickled") as e:
        load_text_embeddings(path, LENGTH, WIDTH)
    _one_line(e)
    assert not (tmp_path / "pwned").exists()


def test_not_npy_npz_fifo_missing_and_oversize_files_are_refused(tmp_path):
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"not an array at all")
    with pytest.raises(InputError, match=r"not a \.npy array") as e:
        load_text_embeddings(junk, LENGTH, WIDTH)
    _one_line(e)
    truncated = tmp_path / "cut.npy"
    buf = io.BytesIO()
    np.save(buf, np.zeros((LENGTH, WIDTH), np.float32))
    truncated.write_bytes(buf.getvalue()[:-10])
    with pytest.raises(InputError) as e:
        load_text_embeddings(truncated, LENGTH, WIDTH)
    _one_line(e)
    forged = tmp_path / "forged.npy"  # a header claiming 2**40 prompts over a few bytes: refused, never allocated
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (1 << 40, LENGTH, WIDTH)})
    forged.write_bytes(header.getvalue() + b"\0" * 64)
    with pytest.raises(InputError, match=r"truncated: its header says \(1099511627776, 12, 16\) float32") as e:
        load_text_embeddings(forged, LENGTH, WIDTH)
    _one_line(e)
    npz = tmp_path / "e.npz"
    np.savez(npz, a=np.zeros((LENGTH, WIDTH), np.float32))
    with pytest.raises(InputError, match=r"\.npz") as e:
        load_text_embeddings(npz, LENGTH, WIDTH)
    _one_line(e)
    fifo = tmp_path / "fifo.npy"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match=r"FIFO") as e:  # refused at once, not waited on
        load_text_embeddings(fifo, LENGTH, WIDTH)
    _one_line(e)
    with pytest.raises(InputError, match=r"does not exist"):
        load_text_embeddings(tmp_path / "absent.npy", LENGTH, WIDTH)
    with pytest.raises(InputError, match=r"a directory"):
        load_text_embeddings(tmp_path, LENGTH, WIDTH)
    good = _npy(tmp_path, np.zeros((LENGTH, WIDTH), np.float32))
    with pytest.raises(InputError, match=r"896 bytes, more than the 100 ") as e:
        load_text_embeddings(good, LENGTH, WIDTH, limit=100)
    _one_line(e)


# ------------------------------------------------------------------------------------------ TextEncoder


def _train_sentencepiece(path):
    sentencepiece = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES), model_writer=model, vocab_size=40, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    path.write_bytes(model.getvalue())


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    """A tiny random T5 encoder (d_model 16, 2 layers) and a sentencepiece T5 tokenizer (vocab 40), saved the way
    flan-t5 folders are (config.json, weights, spiece.model, tokenizer_config.json)."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("t5")
    _train_sentencepiece(folder / "spiece.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0,
                                                              "model_max_length": 512}))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    config = transformers.T5Config(vocab_size=len(tokenizer), d_model=WIDTH, d_kv=4, d_ff=32, num_layers=2,
                                   num_heads=4, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    transformers.T5EncoderModel(config).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def encoder(t5_folder):
    return TextEncoder(t5_folder)


def _reference(folder, prompts, length):
    """ml-starflow's text path written out with transformers directly."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = transformers.T5EncoderModel.from_pretrained(str(folder), local_files_only=True).eval()
    tokens = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    return hidden * tokens.attention_mask[..., None], tokens.attention_mask


def test_encode_shape_padding_and_agreement_with_transformers(encoder, t5_folder):
    prompts = ["a photo of a cat", "a dog", "a photo of a cat", "the quick brown fox jumps over the lazy dog"]
    out = encoder.encode(prompts, LENGTH)
    assert out.shape == (4, LENGTH, WIDTH) and out.dtype == torch.float32 and encoder.width == WIDTH
    ref, mask = _reference(t5_folder, prompts, LENGTH)
    torch.testing.assert_close(out, ref)
    assert 0 < int(mask[1].sum()) < LENGTH  # "a dog" is padded
    padded = mask == 0
    assert torch.all(out[padded] == 0)  # exactly zero, not just small
    assert torch.all(out[~padded].abs().sum(-1) > 0)
    assert torch.equal(out[0], out[2])  # the same prompt, the same rows
    torch.testing.assert_close(encoder.encode(["a photo of a cat"], LENGTH)[0], out[0])  # batch-independent


def test_a_long_prompt_is_truncated_to_the_length(encoder, t5_folder):
    long = " ".join(SENTENCES[:5])
    out = encoder.encode([long], LENGTH)
    assert out.shape == (1, LENGTH, WIDTH)
    ref, mask = _reference(t5_folder, [long], LENGTH)
    assert bool(mask.all())  # no padding: every position a token
    torch.testing.assert_close(out, ref)
    assert encoder.encode([long], 4).shape == (1, 4, WIDTH)
    # the batch is encoded in chunks of batch_size with the same result
    chunked = TextEncoder(t5_folder, batch_size=1).encode(["a cat", long, ""], LENGTH)
    torch.testing.assert_close(chunked, encoder.encode(["a cat", long, ""], LENGTH))


def test_the_empty_prompt_is_the_unconditional_embedding(encoder):
    uncond = unconditional_embedding(LENGTH, WIDTH, encoder)
    assert uncond.shape == (1, LENGTH, WIDTH)
    assert torch.equal(uncond, encoder.encode([""], LENGTH))
    assert torch.equal(uncond, encoder.unconditional(LENGTH))
    assert uncond[0, 0].abs().sum() > 0 and torch.all(uncond[0, 1:] == 0)  # the end-of-sequence token, then padding
    assert torch.equal(unconditional_embedding(LENGTH, WIDTH), torch.zeros(1, LENGTH, WIDTH))  # no encoder: zeros
    with pytest.raises(InputError, match=rf"width {WIDTH}.*expects {WIDTH + 1}"):
        unconditional_embedding(LENGTH, WIDTH + 1, encoder)


def test_bad_prompts_are_refused(encoder):
    for prompts in ("a cat", [], ["a cat", 3]):
        with pytest.raises(InputError) as e:
            encoder.encode(prompts, LENGTH)
        _one_line(e)
    with pytest.raises(InputError, match="at least 1"):
        encoder.encode(["a cat"], 0)


def test_a_path_that_is_not_a_model_folder_is_one_error(tmp_path, t5_folder):
    with pytest.raises(CheckpointError, match="does not exist.*never downloads") as e:
        TextEncoder(tmp_path / "google" / "flan-t5-xl")
    _one_line(e)
    with pytest.raises(CheckpointError, match="does not exist"):
        TextEncoder("google/flan-t5-xl")  # a hub name is not looked up
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is not a folder") as e:
        TextEncoder(tmp_path / "file")
    _one_line(e)
    with pytest.raises(CheckpointError, match="no config.json") as e:
        TextEncoder(tmp_path)
    _one_line(e)

    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((t5_folder / name).read_bytes())
    with pytest.raises(CheckpointError, match="no tokenizer") as e:
        TextEncoder(no_tokenizer)
    _one_line(e)

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    for name in ("config.json", "spiece.model", "tokenizer_config.json"):
        (no_weights / name).write_bytes((t5_folder / name).read_bytes())
    with pytest.raises(CheckpointError, match="cannot load the T5 encoder") as e:
        TextEncoder(no_weights).encode(["a cat"], LENGTH)
    _one_line(e)


def test_without_transformers_the_error_names_the_text_extra(monkeypatch, t5_folder):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingExtra, match=r"needs transformers, which is not installed.*pip install 'sejd\[text\]'"):
        TextEncoder(t5_folder).encode(["a cat"], LENGTH)


def test_without_sentencepiece_a_spiece_only_folder_names_the_text_extra(monkeypatch, t5_folder):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(MissingExtra, match=r"needs sentencepiece.*pip install 'sejd\[text\]'"):
        TextEncoder(t5_folder).load()


# ------------------------------------------------------------------------------------------------- VAE


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    folder = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16,
                                  scaling_factor=0.5)
    vae.save_pretrained(str(folder))
    return folder


def test_decode_is_the_vae_decode_of_the_unscaled_latents_clamped(vae_folder):
    import diffusers

    latents = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(1)) * 3
    decoder = LatentDecoder(vae_folder, batch_size=2)
    images = decoder.decode(latents)
    assert decoder.scaling_factor == 0.5 and decoder.shift_factor is None and decoder.downsample == 2
    assert images.shape == (3, 3, 10, 12) and images.dtype == torch.float32
    vae = diffusers.AutoencoderKL.from_pretrained(str(vae_folder), local_files_only=True).eval()
    with torch.no_grad():
        expected = vae.decode(latents / 0.5).sample.clamp(-1, 1)
    torch.testing.assert_close(images, expected)
    assert images.min() >= -1 and images.max() <= 1
    torch.testing.assert_close(latents_or_images(latents, vae_folder), expected)


def test_a_shift_factor_in_the_config_is_applied(tmp_path, vae_folder):
    import diffusers

    folder = tmp_path / "shifted"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(
        (vae_folder / "diffusion_pytorch_model.safetensors").read_bytes())
    config = json.loads((vae_folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "shift_factor": 0.25}))
    latents = torch.randn(1, 4, 3, 3)
    vae = diffusers.AutoencoderKL.from_pretrained(str(vae_folder), local_files_only=True).eval()
    with torch.no_grad():
        expected = vae.decode(latents / 0.5 + 0.25).sample.clamp(-1, 1)
    torch.testing.assert_close(LatentDecoder(folder).decode(latents), expected)


def test_without_a_vae_the_latents_come_back_unchanged_with_a_hint(monkeypatch):
    import sejd.workflows.vae as vae_module

    class Keep:  # the module's logger, replaced: a library's logging set-up elsewhere in the suite may disable it
        def __init__(self):
            self.lines = []

        def info(self, message, *args):
            self.lines.append(message % args if args else message)

    keep = Keep()
    monkeypatch.setattr(vae_module, "log", keep)
    latents = torch.randn(2, 4, 3, 3)
    out = latents_or_images(latents, None)
    assert out is latents
    (line,) = keep.lines
    assert "--vae PATH" in line and "sejd[vae]" in line
    assert "\n" not in line


def test_bad_latents_and_folders_are_one_error(tmp_path, vae_folder):
    decoder = LatentDecoder(vae_folder)
    for latents in (torch.randn(2, 3, 4, 4), torch.randn(4, 4, 4), torch.zeros(1, 4, 2, 2, dtype=torch.int64),
                    torch.full((1, 4, 2, 2), float("nan"))):
        with pytest.raises(InputError) as e:
            decoder.decode(latents)
        _one_line(e)
    with pytest.raises(CheckpointError, match="does not exist.*never downloads"):
        LatentDecoder("stabilityai/sd-vae-ft-ema")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        LatentDecoder(empty)
    (empty / "config.json").write_bytes((vae_folder / "config.json").read_bytes())
    with pytest.raises(CheckpointError, match="cannot load the VAE") as e:
        LatentDecoder(empty).decode(torch.zeros(1, 4, 2, 2))
    _one_line(e)


def test_without_diffusers_the_error_names_the_vae_extra(monkeypatch, vae_folder):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(MissingExtra, match=r"needs diffusers, which is not installed.*pip install 'sejd\[vae\]'"):
        latents_or_images(torch.zeros(1, 4, 2, 2), vae_folder)
    assert issubclass(MissingExtra, SejdError)
