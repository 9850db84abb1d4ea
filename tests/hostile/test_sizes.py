"""Hostile sizes and types (issue 12, defects 3 and 10; issue 11's geometry guessing).

Absurd sizes must fail at once with a one-line SejdError, before anything is allocated. Calls that
hung or grew memory before their fix run in a fresh interpreter with a time limit and an address-space
cap, so a regression fails this test instead of taking the machine down.
"""

import json
import logging
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sejd import (
    CheckpointError,
    ConfigError,
    InputError,
    PlanError,
    TarFlowConfig,
    load_checkpoint,
    sample,
)
from sejd.core import memory
from sejd.model import checkpoint
from sejd.runtime.plan import Plan, resolve_plan
from sejd.runtime.request import seeded_noise
from tests.conftest import make_model

ROOT = Path(__file__).resolve().parents[2]
SECONDS = 90  # generous under load; a fixed run takes a few seconds, a regression hangs past it
ADDRESS_SPACE = 6 * 2**30  # the interpreter with torch maps ~0.7 GB; a regression's allocation fails


def _cap_memory():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run_bounded(code: str) -> str:
    """Run `code` in a fresh interpreter (this worktree's sejd), time- and memory-capped; returns the last
    line it printed. The code prints the caught error as `TypeName: message`."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=SECONDS, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          preexec_fn=_cap_memory)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    return lines[-1]


CATCH = """
def report(call):
    try:
        call()
        print("loaded")
    except Exception as e:
        print(f"{type(e).__name__}: {e}")
"""


@pytest.fixture
def tiny_pth(tmp_path):
    """A tiny ml-tarflow-style state dict (4 blocks, 2 layers, 64 channels, token width 12)."""
    path = tmp_path / "weights.pth"
    torch.save(make_model().state_dict(), path)
    return path


# --- defect 3: absurd sizes ---------------------------------------------------------------------------

PUBLISHED = {  # ml-tarflow's published models must stay within the bounds
    "afhq256": dict(in_channels=3, img_size=256, patch_size=8, channels=768, num_blocks=8, layers_per_block=8,
                    num_classes=3),
    "imagenet64": dict(in_channels=3, img_size=64, patch_size=2, channels=768, num_blocks=8, layers_per_block=8,
                       num_classes=1000),
    "imagenet128": dict(in_channels=3, img_size=128, patch_size=4, channels=1024, num_blocks=8,
                        layers_per_block=8, num_classes=1000),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_geometries_are_plausible(name):
    cfg = TarFlowConfig(**PUBLISHED[name])
    assert cfg.num_tokens == 1024
    assert cfg.weight_bytes < 3.5e9


def test_parameter_count_matches_the_model():
    for kw in ({}, {"nvp": False, "num_classes": 0, "expansion": 3, "layers_per_block": 1}):
        model = make_model(**kw)
        assert model.config.num_parameters == sum(p.numel() for p in model.parameters())
        assert model.config.weight_bytes == 4 * sum(t.numel() for t in model.state_dict().values())


@pytest.mark.parametrize("field, value, says", [
    ("num_blocks", 10**9, "at most 1024 are supported"),
    ("layers_per_block", 10**6, "at most 1024 are supported"),
    ("channels", 2**40, "at most 16 GiB are supported"),
    ("expansion", 10**7, "at most 16 GiB are supported"),
    ("num_classes", 10**9, "at most 16 GiB are supported"),
    ("img_size", 2**20, "at most 16384 are supported"),
])
def test_config_refuses_absurd_geometry(field, value, says):
    with pytest.raises(ConfigError, match=says):
        TarFlowConfig(**{**PUBLISHED["afhq256"], field: value})


def test_config_refuses_a_non_boolean_nvp():
    with pytest.raises(ConfigError, match="nvp must be true or false, got 'no'"):
        TarFlowConfig(**{**PUBLISHED["afhq256"], "nvp": "no"})


@pytest.mark.parametrize("how", ["file name", "config", "config.json"])
def test_a_billion_blocks_is_refused_before_building_anything(tmp_path, how):
    """Before the fix each of these built modules for 10**9 blocks (memory growing until killed)."""
    model = make_model()
    if how == "file name":
        source, config = tmp_path / "x_model_2_64_1000000000_2_0.05.pth", None
        torch.save(model.state_dict(), source)
    elif how == "config":
        source, config = tmp_path / "weights.pth", {"num_blocks": 10**9, "head_dim": 32}
        torch.save(model.state_dict(), source)
    else:  # a sejd checkpoint without the header record (as older sejd wrote): only the tensors can tell
        from safetensors.torch import save_file
        source, config = tmp_path / "ckpt", None
        source.mkdir()
        save_file(model.state_dict(), source / "model.safetensors")
        cfg = {**model.config.to_dict(), "num_blocks": 10**9}
        (source / "config.json").write_text(json.dumps({"config": cfg}))
    out = run_bounded(CATCH + f"""
from sejd import load_checkpoint
report(lambda: load_checkpoint({str(source)!r}, config={config!r}))
""")
    assert out.startswith("ConfigMismatchError: num_blocks=1000000000 (")
    assert "contradicts the checkpoint's tensors, which say num_blocks=4" in out


@pytest.mark.parametrize("field, value, evidence", [
    ("channels", 2**40, "blocks.0.pos_embed has shape (16, 64)"),
    ("expansion", 10**7, "mlp.main.0.weight has shape (256, 64)"),
    ("img_size", 2**20, "token width 12"),
])
def test_absurd_config_fields_name_the_tensors_that_contradict_them(tiny_pth, field, value, evidence):
    out = run_bounded(CATCH + f"""
from sejd import load_checkpoint
report(lambda: load_checkpoint({str(tiny_pth)!r}, config={{{field!r}: {value}, "head_dim": 32}}))
""")
    assert out.startswith(f"ConfigMismatchError: {field}={value} (given config)"), out
    assert evidence in out


def test_a_hostile_block_index_does_not_size_the_model(tmp_path):
    """A key `blocks.999999999.*` once made a 10**9-block model out of a 4-block file."""
    sd = make_model().state_dict()
    sd["blocks.999999999.pos_embed"] = torch.zeros(1)
    torch.save(sd, tmp_path / "gap.pth")
    out = run_bounded(CATCH + f"""
from sejd import load_checkpoint
report(lambda: load_checkpoint({str(tmp_path / "gap.pth")!r}, config={{"head_dim": 32}}))
""")
    assert out == ("CheckpointError: flow blocks are not numbered 0..4: found 5 with indices up to 999999999 "
                   "(no blocks.4.*)")


def test_a_billion_blocks_in_a_bundle_manifest_is_refused(tmp_path):
    """Before the fix, sampling a bundle whose manifest said 10**9 blocks made a runner per block, forever."""
    from sejd import save_checkpoint
    from sejd.export.bundle import MANIFEST
    from sejd.export.exporter import export_bundle

    save_checkpoint(make_model(), tmp_path / "ckpt")
    bundle = export_bundle(tmp_path / "ckpt", tmp_path / "b", variants=["step_rows"], show_progress=False)
    manifest = json.loads((bundle.path / MANIFEST).read_text())
    manifest["config"]["num_blocks"] = 10**9
    (bundle.path / MANIFEST).write_text(json.dumps(manifest))
    out = run_bounded(CATCH + f"""
from sejd.workflows.source import open_source
report(lambda: open_source({str(bundle.path)!r}, "ort-cpu"))
""")
    # refused while the manifest is validated, before any engine or runner exists
    assert out.startswith("BundleError: ") and "manifest.json: config: num_blocks 1000000000" in out


# --- memory estimated before allocating ---------------------------------------------------------------

def test_ten_million_samples_of_noise_are_refused_before_allocating():
    """Before the fix the noise was drawn first (7.9 TB here): an allocator traceback or the OOM killer."""
    out = run_bounded(CATCH + """
from sejd.runtime.request import seeded_noise
report(lambda: seeded_noise(10_000_000, 0, 1024, 192))
""")
    assert out.startswith("InputError: the prior noise of 10000000 samples (10000000 x 1024 x 192 float32) "
                          "needs about 7.9 TB, more than the ")
    assert "of memory available (MemAvailable); ask for fewer samples" in out


@pytest.fixture
def meminfo(tmp_path, monkeypatch):
    """Pretend the machine has `kb` kB available."""
    def set_available(kb):
        path = tmp_path / "meminfo"
        path.write_text(f"MemTotal:       99999999 kB\nMemAvailable:   {kb} kB\n")
        monkeypatch.setattr(memory, "MEMINFO", str(path))
    return set_available


def test_sampling_refuses_a_batch_that_cannot_fit(model, meminfo):
    meminfo(10)  # 10 kB: the KV caches of this tiny model alone take more
    noise = torch.randn(2, model.config.num_tokens, model.config.token_dim)
    with pytest.raises(InputError, match=r"sampling a batch of 2 with guidance \(.*KV caches of one block "
                                         r".*\) needs about .* more than the 10.2 KB of memory available"):
        sample(model, noise, labels=torch.tensor([1, 2]), guidance=2.0, progress=False)


def test_memory_check_is_skipped_where_memory_is_unknown(model, monkeypatch, tmp_path):
    """A guard, not a regression test: no /proc/meminfo (macOS, some containers) must not block sampling."""
    monkeypatch.setattr(memory, "MEMINFO", str(tmp_path / "absent"))
    noise = torch.randn(1, model.config.num_tokens, model.config.token_dim)
    assert sample(model, noise, plan="sequential", progress=False).images.shape == (1, 3, 8, 8)


def test_the_estimate_counts_one_block_of_kv_caches_doubled_by_guidance():
    cfg = TarFlowConfig(**PUBLISHED["afhq256"])
    plain, guided = memory.sampling_estimate(cfg, 16), memory.sampling_estimate(cfg, 16, guided=True)
    kv = 16 * 8 * 2 * 12 * 1024 * 64 * 4  # rows x layers x (k, v) x heads x T x head_dim x float32
    assert plain.parts["KV caches of one block"] == kv
    assert guided.parts["KV caches of one block"] == 2 * kv
    assert seeded_noise(2, 0, 4, 3).shape == (2, 4, 3)


# --- defect 10: plans, unreadable files, head_dim -----------------------------------------------------

@pytest.mark.parametrize("field, value, says", [
    ("per_sample", "no", "per_sample must be true or false, got 'no'"),
    ("freeze", 1, "freeze must be true or false, got 1"),
    ("tau", float("nan"), "tau must be a number >= 0 and finite"),
    ("tau", float("inf"), "tau must be a number >= 0 and finite"),
    ("tau", True, "tau must be a number >= 0 and finite"),
    ("segments", True, "segments must be an int >= 1, got True"),
    ("decoder", ["jacobi"], "decoder must be a string"),
])
def test_plan_fields_are_type_strict(tmp_path, field, value, says):
    block = {"decoder": "jacobi", field: value}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"name": "p", "blocks": [block] * 4}))
    with pytest.raises(PlanError, match=says.replace("(", r"\(").replace(")", r"\)")):
        resolve_plan(str(path), 4)


@pytest.mark.parametrize("plan, says", [
    ({"name": "p", "blocks": [{}] * 4, "meta": ["x"]}, "meta must be an object, got list"),
    ({"name": 5, "blocks": [{}] * 4}, "plan name must be a string, got 5"),
])
def test_plan_meta_and_name_are_type_strict(plan, says):
    with pytest.raises(PlanError, match=says):
        resolve_plan(Plan.from_dict(plan), 4)


def test_tau_override_must_be_finite():
    with pytest.raises(PlanError, match="tau must be a number >= 0 and finite, got inf"):
        resolve_plan("sjd", 4, tau=float("inf"))


@pytest.fixture
def saved(tmp_path):
    from sejd import save_checkpoint
    return save_checkpoint(make_model(), tmp_path / "ckpt")


def test_weights_that_are_a_directory_say_so(saved):
    (saved / "model.safetensors").unlink()
    (saved / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="model.safetensors: the weights file is a directory, expected a file"):
        load_checkpoint(saved)


def test_weights_that_are_a_dangling_link_say_so(saved):
    (saved / "model.safetensors").unlink()
    (saved / "model.safetensors").symlink_to(saved / "gone.safetensors")
    with pytest.raises(CheckpointError, match="the weights file is a dangling symbolic link"):
        load_checkpoint(saved)


def test_truncated_weights_say_how_short_they_are(saved):
    w = saved / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"truncated: its tensors end at byte {len(data)}, "
                                              rf"the file has {len(data) // 2}"):
        load_checkpoint(saved)


def test_unreadable_weights_say_permission_denied(saved, monkeypatch):
    w = saved / "model.safetensors"
    if os.geteuid() == 0:  # root reads any file: give the answer the kernel gives everyone else
        real_open = open

        def denying_open(path, *args, **kwargs):
            if Path(path) == w:
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)
        monkeypatch.setattr(checkpoint, "open", denying_open, raising=False)
    else:
        w.chmod(0)
    with pytest.raises(CheckpointError, match="model.safetensors: permission denied reading the weights file"):
        load_checkpoint(saved)


def test_config_json_head_dim_contradicting_the_saved_record_is_refused(saved):
    cfg_file = saved / "config.json"
    meta = json.loads(cfg_file.read_text())
    meta["config"]["head_dim"] = 16  # 64 channels: 4 heads of 16 instead of 2 of 32, same tensor shapes
    cfg_file.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"config.json says head_dim=16, but model.safetensors was saved with "
                                          r"head_dim=32"):
        load_checkpoint(saved)


def test_checkpoints_without_the_record_load_as_before(saved):
    """A guard, not a regression test: files written before the header record keep loading."""
    from safetensors.torch import load_file, save_file
    w = saved / "model.safetensors"
    save_file(load_file(w), w)  # no metadata: what sejd wrote before
    meta = json.loads((saved / "config.json").read_text())
    meta["config"]["head_dim"] = 16
    (saved / "config.json").write_text(json.dumps(meta))
    assert load_checkpoint(saved).config.head_dim == 16


# --- issue 11: geometry guessed from tensor shapes ----------------------------------------------------

def test_a_guessed_geometry_is_recorded_and_announced(tiny_pth, caplog):
    with caplog.at_level(logging.WARNING, logger="sejd"):
        model = load_checkpoint(tiny_pth, config={"head_dim": 32})
    assert (model.config.patch_size, model.config.in_channels) == (2, 3)
    assert model.meta["geometry"] == "guessed"
    [record] = [r for r in caplog.records if r.name == "sejd"]
    assert "token width 12 = patch 2 x 3 channels" in record.getMessage()
    assert "also fits patch 1 x 12 channels" in record.getMessage()


def test_an_ambiguous_geometry_is_refused_with_the_candidates(tmp_path):
    torch.save(make_model(in_channels=2).state_dict(), tmp_path / "w.pth")  # token width 8
    with pytest.raises(ConfigError, match=r"token width 8 fits patch 1 x 8 channels \(4x4 images\), patch 2 x 2 "
                                          r"channels \(8x8 images\), none with 1 or 3 image channels; pass "
                                          r"--config '\{\"patch_size\": P, \"in_channels\": C\}'"):
        load_checkpoint(tmp_path / "w.pth", config={"head_dim": 32})
    model = load_checkpoint(tmp_path / "w.pth", config={"head_dim": 32, "in_channels": 2})
    assert (model.config.patch_size, model.meta["geometry"]) == (2, "given")


def test_geometry_from_the_file_name_or_the_only_fit_is_not_a_guess(tmp_path, caplog):
    """AFHQ-shaped (256x256, patch 8, T = 1024) slim model under ml-tarflow's file-name convention."""
    model = make_model(img_size=256, patch_size=8, num_blocks=2, layers_per_block=1, head_dim=64)
    torch.save(model.state_dict(), tmp_path / "afhq_model_8_64_2_1_0.07.pth")
    torch.save(make_model(in_channels=6, patch_size=1, img_size=4).state_dict(), tmp_path / "w6.pth")
    with caplog.at_level(logging.WARNING, logger="sejd"):
        afhq = load_checkpoint(tmp_path / "afhq_model_8_64_2_1_0.07.pth")
        six = load_checkpoint(tmp_path / "w6.pth", config={"head_dim": 32})
    assert (afhq.config.num_tokens, afhq.config.patch_size, afhq.meta["geometry"]) == (1024, 8, "file name")
    assert (six.config.patch_size, six.config.in_channels, six.meta["geometry"]) == (1, 6, "tensor shapes")
    assert not [r for r in caplog.records if r.name == "sejd"]


def test_a_given_patch_size_that_does_not_fit_lists_what_does(tiny_pth):
    with pytest.raises(ConfigError, match=r"patch_size=3 \(given config\) does not fit the checkpoint's tensors.*"
                                          r"geometries that fit: patch 1 x 12 channels \(4x4 images\), patch 2 x 3"):
        load_checkpoint(tiny_pth, config={"head_dim": 32, "patch_size": 3})
