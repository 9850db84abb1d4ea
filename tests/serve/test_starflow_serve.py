"""Serving a STARFlow (text to image) in-process (no Ray): text embeddings as base64 .npy (or prompts through a
local T5 encoder) in, latents (or images through a local VAE) out, equal bit for bit to `sejd sample` with the
same seed, text and plan; every bad input a 400 naming its field, one line. A tiny STARFlow in Apple's layout
(a plain state dict) on the PyTorch backend."""

import base64
import io
import json

import numpy as np
import pytest
import torch

from sejd import save_checkpoint
from sejd.cli import main
from sejd.core.errors import SejdError
from sejd.serve import app as serve_app
from sejd.serve.api import create_api
from sejd.serve.read_limits import MAX_BODY_BYTES
from sejd.serve.schema import SampleRequest, npy_b64_bytes
from sejd.serve.service import SampleService, max_body_bytes
from sejd.workflows.source import open_source
from tests.conftest import make_model
from tests.model import starflow_oracle as so
from tests.model.test_starflow import TINY
from tests.serve.asgi import call

N, SEED, GUIDANCE = 2, 3, 3.6
LT, DT = TINY["txt_size"], TINY["txt_dim"]
LATENTS = (TINY["in_channels"], TINY["img_size"], TINY["img_size"])


def b64npy(array) -> str:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array))
    return base64.b64encode(buf.getvalue()).decode()


def latents_of(answer) -> np.ndarray:
    body = answer.json()
    assert answer.status == 200, body
    assert body["format"] == "npy" and body["content"] == "latents"
    return np.load(io.BytesIO(base64.b64decode(body["npy"])))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("starflow_serve")
    torch.save(so.random_state_dict(TINY, seed=0), root / "starflow.pth")  # Apple's layout: a plain state dict
    g = torch.Generator().manual_seed(7)
    text = torch.randn(N, LT, DT, generator=g).numpy()
    null = torch.randn(LT, DT, generator=g).numpy()
    for name, array in (("text", text), ("null", null), ("one", text[:1])):
        np.save(root / f"{name}.npy", array)
    return root, text, null


@pytest.fixture(scope="module")
def service(files):
    return SampleService(open_source(files[0] / "starflow.pth", "auto", config=TINY))


@pytest.fixture(scope="module")
def app(service):
    return create_api(service, "tiny-starflow")


def sejd_sample(root, tmp_path, n, plan, *extra) -> np.ndarray:
    out = tmp_path / "cli.npy"
    assert main(["sample", str(root / "starflow.pth"), "--config", json.dumps(TINY), "-n", str(n), "--seed",
                 str(SEED), "--plan", plan, "--no-progress", "-q", *extra, "--npy", str(out)]) == 0
    return np.load(out)


@pytest.mark.parametrize("plan", ["sjd", "starflow", "sequential"])
def test_latents_equal_sejd_sample_bit_for_bit(app, files, tmp_path, plan):
    root, text, _ = files
    got = latents_of(call(app, "POST", "/sample", {"n": N, "seed": SEED, "text_embeddings": b64npy(text),
                                                   "plan": plan}))
    assert got.shape == (N, *LATENTS)
    assert np.array_equal(got, sejd_sample(root, tmp_path, N, plan, "--text-embeddings", str(root / "text.npy")))


def test_guidance_with_uncond_embeddings_equals_sejd_sample(app, files, tmp_path):
    root, text, null = files
    body = {"seed": SEED, "text_embeddings": b64npy(text), "guidance": GUIDANCE, "plan": "starflow"}
    got = latents_of(call(app, "POST", "/sample", {**body, "uncond_text_embeddings": b64npy(null)}))
    expected = sejd_sample(root, tmp_path, N, "starflow", "--text-embeddings", str(root / "text.npy"),
                           "--uncond-text-embeddings", str(root / "null.npy"), "--guidance", str(GUIDANCE))
    assert got.shape == (N, *LATENTS) and np.array_equal(got, expected)  # n: one per text row
    zeros = latents_of(call(app, "POST", "/sample", body))  # no uncond: zeros, as sejd sample without one
    assert not np.array_equal(zeros, got)
    assert np.array_equal(zeros, sejd_sample(root, tmp_path, N, "starflow", "--text-embeddings",
                                             str(root / "text.npy"), "--guidance", str(GUIDANCE)))


def test_one_text_row_serves_every_sample_and_base64_answers_raw_latents(app, files, tmp_path):
    root, text, _ = files
    r = call(app, "POST", "/sample", {"n": 3, "seed": SEED, "text_embeddings": b64npy(text[0]), "plan": "sjd",
                                      "format": "base64"})
    body = r.json()
    assert r.status == 200 and body["shape"] == [3, *LATENTS] and body["content"] == "latents"
    got = np.frombuffer(base64.b64decode(body["data"]), np.float32).reshape(body["shape"])
    assert np.array_equal(got, sejd_sample(root, tmp_path, 3, "sjd", "--text-embeddings", str(root / "one.npy")))


def test_each_request_rides_alone_whatever_its_batch(service, files):
    text = torch.from_numpy(files[1])
    a = SampleRequest(n=2, seed=1, plan="ujd", text=text)
    b = SampleRequest(n=1, seed=5, plan="ujd", text=text[:1], guidance=2.0)
    together = service.run_batch([a, b, a])
    assert [r.batch_size for r in together] == [2, 1, 2]
    alone = service.run_batch([a])[0]
    assert torch.equal(together[0].images, alone.images) and torch.equal(together[2].images, alone.images)


def _bad(text, null):
    nan = text.copy()
    nan[0, 1, 2] = np.nan
    good = b64npy(text)
    return [
        ({"text_embeddings": b64npy(text[..., :-1])}, "text_embeddings", "width 11, expected 12"),
        ({"text_embeddings": b64npy(text[:, :-1])}, "text_embeddings", "length 4, expected 5"),
        ({"text_embeddings": b64npy(text[None])}, "text_embeddings", "(1, 2, 5, 12) (4 dimensions)"),
        ({"text_embeddings": b64npy(nan)}, "text_embeddings", "1 non-finite value(s)"),
        ({"text_embeddings": b64npy(text.astype(np.int64))}, "text_embeddings", "dtype int64; expected float32"),
        ({"text_embeddings": "not base64!"}, "text_embeddings", "not base64"),
        ({"text_embeddings": base64.b64encode(b"hello").decode()}, "text_embeddings", "not a .npy array"),
        ({"text_embeddings": 3}, "text_embeddings", "Input should be a valid string"),
        ({"n": 3, "text_embeddings": good}, "text_embeddings", "2 rows for n 3; expected 1"),
        ({"n": 65, "text_embeddings": good}, "n", "less than or equal to 64"),
        ({"text_embeddings": good, "uncond_text_embeddings": b64npy(null[:, :-2])}, "uncond_text_embeddings",
         "width 10, expected 12"),
        ({"text_embeddings": good, "uncond_text_embeddings": b64npy(np.stack([null] * 3))},
         "uncond_text_embeddings", "3 rows for n 2"),
        ({"text_embeddings": good, "label": 1}, "label", "takes no label; give text_embeddings"),
        ({"seed": 1}, "text_embeddings", "missing: a STARFlow samples from text"),
        ({"prompt": "a cat"}, "prompt", "this service has no text encoder (start it with --text-encoder DIR"),
        ({"text_embeddings": good, "format": "png"}, "format", "png needs a VAE"),
        ({"text_embeddings": good, "guidance": 1e6}, "guidance", "less than or equal to 100"),
        ({"text_embeddings": good, "plan": "reference"}, "plan", "Input should be"),
    ]


@pytest.mark.parametrize("case", range(18))
def test_each_bad_input_is_a_400_naming_its_field_in_one_line(app, files, case):
    cases = _bad(files[1], files[2])
    assert len(cases) == 18
    body, field, message = cases[case]
    r = call(app, "POST", "/sample", body)
    error = r.json()
    assert (r.status, error["field"]) == (400, field), error
    assert error["error"].startswith(field + ":") and message in error["error"], error
    assert "\n" not in error["error"]


def test_text_fields_are_refused_for_a_tarflow_and_the_extras_too(tmp_path, files):
    save_checkpoint(make_model(), tmp_path / "tarflow")
    src = open_source(tmp_path / "tarflow", "torch")
    tarflow = create_api(SampleService(src), "tarflow")
    for field in ("text_embeddings", "uncond_text_embeddings", "prompt"):
        r = call(tarflow, "POST", "/sample", {field: b64npy(files[2])})
        assert r.status == 400 and r.json()["field"] == field
        assert "is for STARFlow (text-to-image) models; this model is a TarFlow" in r.json()["error"]
    with pytest.raises(SejdError, match="--vae is for STARFlow"):
        SampleService(src, vae=tmp_path)


def test_the_body_limit_has_room_for_the_text_and_no_more(app, service, files):
    assert service.max_body_bytes == MAX_BODY_BYTES + 2 * npy_b64_bytes(64, LT, DT)
    assert len(b64npy(np.zeros((64, LT, DT), np.float32))) <= npy_b64_bytes(64, LT, DT)
    r = call(app, "POST", "/sample", [b"x"], headers={"content-length": str(service.max_body_bytes + 1)})
    assert r.status == 413 and r.json()["field"] == "body" and r.received == 0


def test_healthz_says_what_the_service_takes(app):
    body = call(app, "GET", "/healthz").json()
    assert body["family"] == "starflow" and body["text"] == [LT, DT] and body["image"] == list(LATENTS)
    assert "starflow" in body["plans"] and body["text_encoder"] is False and body["vae"] is False


# ---------------------------------------------------------------------- a local T5 encoder and SD-VAE


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    """A tiny random T5 encoder as wide as the model's text (12) and a sentencepiece tokenizer."""
    transformers = pytest.importorskip("transformers")
    from tests.workflows.test_text_vae import _train_sentencepiece

    folder = tmp_path_factory.mktemp("t5")
    _train_sentencepiece(folder / "spiece.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0,
                                                              "model_max_length": 512}))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    config = transformers.T5Config(vocab_size=len(tokenizer), d_model=DT, d_kv=3, d_ff=24, num_layers=1,
                                   num_heads=4, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    transformers.T5EncoderModel(config).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    folder = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                            latent_channels=4, norm_num_groups=8, sample_size=16,
                            scaling_factor=0.5).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def full_app(files, t5_folder, vae_folder):
    src = open_source(files[0] / "starflow.pth", "auto", config=TINY)
    return create_api(SampleService(src, text_encoder=str(t5_folder), vae=str(vae_folder)), "tiny-starflow")


def test_prompts_through_the_services_encoder_equal_sejd_sample(full_app, files, t5_folder, tmp_path):
    root = files[0]
    body = {"seed": SEED, "prompt": ["a photo of a cat", "a dog"], "guidance": GUIDANCE, "plan": "starflow"}
    got = latents_of(call(full_app, "POST", "/sample", body))
    expected = sejd_sample(root, tmp_path, N, "starflow", "--prompt", "a photo of a cat", "--prompt", "a dog",
                           "--text-encoder", str(t5_folder), "--guidance", str(GUIDANCE))
    assert got.shape == (N, *LATENTS) and np.array_equal(got, expected)  # uncond: the encoding of ""
    r = call(full_app, "POST", "/sample", {"prompt": "a cat", "text_embeddings": b64npy(files[1])})
    assert r.status == 400 and r.json()["error"] == "prompt: give text_embeddings or prompt, not both"


def test_png_is_the_vae_decode_of_the_latents(full_app, files, vae_folder):
    from sejd.workflows.vae import LatentDecoder

    body = {"n": 2, "seed": SEED, "text_embeddings": b64npy(files[1]), "plan": "sjd"}
    r = call(full_app, "POST", "/sample", {**body, "format": "png"})
    assert r.status == 200 and r.json()["content"] == "images"
    assert base64.b64decode(r.json()["png"])[:8] == b"\x89PNG\r\n\x1a\n"
    latents = latents_of(call(full_app, "POST", "/sample", body))  # npy: still the latents
    images = LatentDecoder(vae_folder).decode(torch.from_numpy(latents))
    r = call(full_app, "POST", "/sample", {**body, "format": "base64"})
    assert r.json()["content"] == "latents" and images.shape == (2, 3, 8, 8)


# ------------------------------------------------------------------------------------- sejd serve preflight


def test_sejd_serve_gives_the_proxy_a_body_limit_with_room_for_the_text(files, monkeypatch):
    from sejd.serve.read_limits import ENV

    seen = {}

    def start_ray(host, address, dashboard, runtime_env=None):
        seen.update(runtime_env["env_vars"])
        raise KeyboardInterrupt  # stop before Serve starts

    monkeypatch.setattr(serve_app, "start_ray", start_ray)
    monkeypatch.setattr(serve_app, "check_port", lambda host, port: None)
    with pytest.raises(KeyboardInterrupt):
        serve_app.serve_forever(str(files[0] / "starflow.pth"), "auto", config=TINY)
    cfg = open_source(files[0] / "starflow.pth", "auto", config=TINY).model.config
    assert json.loads(seen[ENV])["max_body_bytes"] == max_body_bytes(cfg) > MAX_BODY_BYTES


def test_sejd_serve_refuses_bad_extras_before_ray(files, tmp_path, capsys, monkeypatch):
    def started(*args, **kw):
        raise AssertionError("Ray was started")
    monkeypatch.setattr(serve_app, "start_ray", started)
    source = ["serve", str(files[0] / "starflow.pth"), "--config", json.dumps(TINY), "--port", "8799"]
    assert main([*source, "--vae", str(tmp_path / "missing")]) == 2
    assert "the VAE folder does not exist" in capsys.readouterr().err
    save_checkpoint(make_model(), tmp_path / "tarflow")
    assert main(["serve", str(tmp_path / "tarflow"), "--port", "8799", "--text-encoder", str(tmp_path)]) == 2
    assert "--text-encoder is for STARFlow" in capsys.readouterr().err


# ------------------------------------------------------------------------------ a STARFlow bundle (ort-cpu)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from sejd.engines.ort import build_ort
    from sejd.export.contracts import STARFLOW_VARIANTS
    from sejd.export.exporter import export_bundle
    from sejd.model.starflow import StarFlowConfig
    from sejd.model.starflow_checkpoint import build_starflow

    model = build_starflow(so.random_state_dict(TINY, seed=0), StarFlowConfig.from_dict(TINY))
    root = tmp_path_factory.mktemp("starflow_bundle")
    bundle = export_bundle(model, root / "bundle", variants=STARFLOW_VARIANTS, unroll=3, show_progress=False)
    build_ort(bundle, "ort-cpu", show_progress=False)
    return bundle


def test_a_bundle_serves_latents_equal_to_sejd_sample_on_ort_cpu(bundle, files, tmp_path):
    root, text, null = files
    bundle_app = create_api(SampleService(open_source(bundle.path, "ort-cpu")), "bundle")
    body = {"seed": SEED, "text_embeddings": b64npy(text), "uncond_text_embeddings": b64npy(null),
            "guidance": GUIDANCE, "plan": "sjd"}
    got = latents_of(call(bundle_app, "POST", "/sample", body))
    out = tmp_path / "cli.npy"
    assert main(["sample", str(bundle.path), "-n", str(N), "--seed", str(SEED), "--plan", "sjd", "--no-progress",
                 "-q", "--text-embeddings", str(root / "text.npy"), "--uncond-text-embeddings",
                 str(root / "null.npy"), "--guidance", str(GUIDANCE), "--npy", str(out)]) == 0
    assert got.shape == (N, *LATENTS) and np.array_equal(got, np.load(out))


def test_export_triton_refuses_a_starflow_bundle_in_one_line(bundle, tmp_path):
    from sejd.serve.triton import export_triton

    with pytest.raises(SejdError) as e:
        export_triton(bundle.path, tmp_path / "repo")
    assert "is a STARFlow (text-to-image) bundle" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "repo").exists()
