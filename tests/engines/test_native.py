"""The native CPU step (sejd/engines/native.py, native/step.c) against the PyTorch reference.

Tolerance: 1e-4 absolute, the `step_rows` graph's contract (the C code sums in another order and uses its
own exp/erf, each within a few float32 ulps)."""

import numpy as np
import pytest
import torch

from sejd import sample
from sejd.engines import native
from sejd.engines.ort import OrtBlockRunner, ort_runners
from sejd.errors import BackendUnavailable, InputError
from sejd.export.graphs import StepRowsGraph
from sejd.runtime.decoders import sequential
from sejd.runtime.runner import Conditioning
from sejd.runtime.torch_runner import torch_runners
from tests.conftest import make_model

ATOL = 1e-4

if native.available() is not None:  # the project's machines have a C compiler: this must not skip there
    pytest.skip(f"native step unavailable: {native.available()}", allow_module_level=True)


@pytest.fixture(params=[1, 2, 3], ids=lambda n: f"{n}threads")
def threads(request):
    native.set_threads(request.param)
    yield request.param
    native.set_threads(None)


def conditioning(model, batch, guidance, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(-1, model.config.num_classes, (batch,), generator=g) if model.config.num_classes else None
    return Conditioning.build(batch, model.config.num_tokens, labels, guidance=guidance, attn_temp=0.8)


def random_caches(model, rows, pos, seed=0):
    cfg = model.config
    g = np.random.default_rng(seed)
    caches = [np.zeros((rows, cfg.num_heads, cfg.num_tokens, cfg.head_dim), np.float32)
              for _ in range(2 * cfg.layers_per_block)]
    for c in caches:
        c[:, :, :pos] = g.standard_normal((rows, cfg.num_heads, pos, cfg.head_dim)) * 0.5
    return caches


MODELS = {
    "conditional": dict(),
    "unconditional": dict(seed=3, num_classes=0),
    "volume-preserving, head_dim 24": dict(seed=5, nvp=False, channels=48, head_dim=24, num_classes=0),
    "one layer, 8 tokens": dict(seed=7, img_size=4, layers_per_block=1, num_classes=3),
}


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("batch,guidance", [(1, 0.0), (5, 0.0), (3, 1.5)])
def test_step_matches_the_step_rows_graph_module(kind, batch, guidance, threads):
    model = make_model(**MODELS[kind])
    cfg = model.config
    cond = conditioning(model, batch, guidance)
    R = cond.rows
    for k in (0, cfg.num_blocks - 1):
        block = model.blocks[k]
        nb = native.NativeBlock(block, cfg.num_tokens)
        ref = StepRowsGraph(block, cfg.num_tokens, bool(cfg.num_classes))
        for pos in (0, cfg.num_tokens // 2, cfg.num_tokens - 1):
            caches = random_caches(model, R, pos, seed=pos)
            x = torch.randn(batch, 1, cfg.token_dim, generator=torch.Generator().manual_seed(pos))
            guidance_w = cond.guidance if cond.guidance is not None else torch.zeros(2, cfg.num_tokens)
            args = [x, torch.tensor(pos), *[torch.from_numpy(c.copy()) for c in caches]]
            args += ([cond.labels] if cfg.num_classes else []) + [cond.temps, guidance_w]
            with torch.no_grad():
                xa, xb, *news = ref(*args)
            got_a, got_b = nb.step(x[:, 0].numpy(), pos, caches, cond.labels.numpy() if cfg.num_classes else None,
                                   cond.temps.numpy(), None if cond.guidance is None else cond.guidance.numpy())
            np.testing.assert_allclose(got_a, xa[:, 0].numpy(), atol=ATOL, rtol=0)
            np.testing.assert_allclose(got_b, xb[:, 0].numpy(), atol=ATOL, rtol=0)
            for cache, new in zip(caches, news):  # the token's keys/values written in place at pos
                np.testing.assert_allclose(cache[:, :, pos], new[:, :, 0].numpy(), atol=ATOL, rtol=0)
            if pos + 1 < cfg.num_tokens:  # and nothing after it
                assert not cache[:, :, pos + 1:].any()


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("batch,guidance", [(1, 0.0), (4, 2.0)])
def test_sequential_block_matches_the_pytorch_decoder(kind, batch, guidance, threads):
    model = make_model(**MODELS[kind])
    cfg = model.config
    cond = conditioning(model, batch, guidance, seed=1)
    z = torch.randn(batch, cfg.num_tokens, cfg.token_dim, generator=torch.Generator().manual_seed(2))
    for k, runner in enumerate(torch_runners(model)):
        runner.begin(batch, cond)
        want = sequential(runner, z).x
        nb = native.NativeBlock(model.blocks[k], cfg.num_tokens)
        caches = random_caches(model, cond.rows, 0)
        got = nb.sequential(z.numpy(), caches, cond.labels.numpy() if cfg.num_classes else None, cond.temps.numpy(),
                            None if cond.guidance is None else cond.guidance.numpy())
        np.testing.assert_allclose(got, want.numpy(), atol=ATOL, rtol=0)


def test_ort_cpu_runners_take_the_native_step_and_match_pytorch(tiny_bundle):
    runners = ort_runners(tiny_bundle)
    assert all(isinstance(r.native, native.NativeBlock) for r in runners)  # packed on first use
    model = runners[0].model  # the runners carry the bundle's model: the Source does not load it twice
    noise = torch.randn(3, 16, 12, generator=torch.Generator().manual_seed(4))
    for plan in ("sequential", "sjd", "gs-jacobi"):
        kw = dict(labels=torch.tensor([0, -1, 4]), plan=plan, guidance=1.0, progress=False)
        ref = sample(model, noise, **kw)
        got = sample(model, noise, runners=runners, **kw)
        torch.testing.assert_close(got.images, ref.images, atol=ATOL, rtol=0)


def test_the_native_step_checks_its_inputs_before_the_call(tiny_bundle):
    runner = ort_runners(tiny_bundle)[0]
    runner.begin(2, Conditioning.build(2, 16))
    with pytest.raises(InputError, match="must be float32, got float64"):
        runner.step(torch.zeros(2, 12, dtype=torch.float64), 0)
    with pytest.raises(InputError, match="must have shape"):
        runner.step(torch.zeros(2, 11), 0)
    with pytest.raises(InputError, match=r"position must be in \[0, 16\), got 16"):
        runner.step(torch.zeros(2, 12), 16)
    with pytest.raises(InputError, match="must have shape"):
        runner.sequential_loop(torch.zeros(2, 15, 12))


def test_without_a_compiler_the_runners_keep_the_onnx_step(tiny_bundle, monkeypatch, caplog):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CC", raising=False)
    assert "no C compiler" in native.disabled_reason()
    native.library.cache_clear()
    try:
        with caplog.at_level("INFO", logger="sejd.ort"):
            runners = ort_runners(tiny_bundle)
        assert type(runners[0]) is OrtBlockRunner
        assert "no C compiler" in caplog.text
    finally:
        native.library.cache_clear()


def test_native_step_can_be_turned_off(tiny_bundle, monkeypatch):
    monkeypatch.setenv("SEJD_NATIVE_STEP", "0")
    assert type(ort_runners(tiny_bundle)[0]) is OrtBlockRunner


def test_a_failing_compile_is_one_clear_error(monkeypatch, tmp_path):
    bad = tmp_path / "cc"
    bad.write_text("#!/bin/sh\necho 'cc: fatal error: broken on purpose' >&2\nexit 1\n")
    bad.chmod(0o755)
    monkeypatch.setenv("CC", str(bad))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    native.library.cache_clear()
    try:
        with pytest.raises(BackendUnavailable, match="broken on purpose"):
            native.library()
        assert not list((tmp_path / "cache" / "sejd" / "native").iterdir())  # nothing half-written left
    finally:
        native.library.cache_clear()


def test_the_library_is_compiled_once_per_source_into_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native.library.cache_clear()
    try:
        native.library()
        built = list((tmp_path / "sejd" / "native").glob("step-*.so"))
        assert len(built) == 1
        mtime = built[0].stat().st_mtime_ns
        native.library.cache_clear()
        native.library()  # the same source, compiler and processor: reused, not rebuilt
        assert built[0].stat().st_mtime_ns == mtime
    finally:
        native.library.cache_clear()


def test_blocks_are_packed_for_the_native_step_only_when_they_step(tiny_bundle):
    runners = ort_runners(tiny_bundle)
    assert all(r._native is None for r in runners)  # nothing packed up front
    noise = torch.randn(1, 16, 12, generator=torch.Generator().manual_seed(5))
    result = sample(runners[0].model, noise, plan="sjd", runners=runners, progress=False)
    first = result.stats.blocks[0].block  # SJD: only the first sampling block is decoded token by token
    assert [r._native is not None for r in runners] == [k == first for k in range(4)]


def test_bad_inputs_to_the_native_block_are_refused_before_the_call():
    model = make_model(num_classes=0)
    cfg = model.config
    nb = native.NativeBlock(model.blocks[0], cfg.num_tokens)
    caches = random_caches(model, 2, 0)
    ones = np.ones(2, np.float32)
    x = np.zeros((2, cfg.token_dim), np.float32)
    with pytest.raises(InputError, match="temps must be float32 of shape"):
        nb.step(np.zeros((3, cfg.token_dim), np.float32), 0, caches, None, ones, None)  # 2 rows for 3 samples
    with pytest.raises(InputError, match="x must have shape"):
        nb.step(np.zeros((2, 5), np.float32), 0, caches, None, ones, None)
    with pytest.raises(InputError, match="pos be in"):
        nb.step(x, cfg.num_tokens, caches, None, ones, None)
    with pytest.raises(InputError, match="expected 4 caches"):
        nb.step(x, 0, caches[:3], None, ones, None)
    with pytest.raises(InputError, match="caches must be contiguous float32"):
        nb.step(x, 0, [c[:, :, ::2] for c in caches], None, ones, None)
    with pytest.raises(InputError, match="guidance must be"):
        nb.step(x[:1], 0, caches, None, ones, np.zeros((2, 3), np.float32))
    with pytest.raises(InputError, match="z must have shape"):
        nb.sequential(np.zeros((2, 5, cfg.token_dim), np.float32), caches, None, ones, None)


def test_two_python_threads_stepping_at_once_get_their_own_results():
    """ctypes releases the GIL: the library runs one job at a time, so concurrent callers queue."""
    import threading

    model = make_model(num_classes=0)
    cfg = model.config
    native.set_threads(2)
    blocks = [native.NativeBlock(model.blocks[k], cfg.num_tokens) for k in range(2)]
    z = torch.randn(2, cfg.num_tokens, cfg.token_dim, generator=torch.Generator().manual_seed(9)).numpy()
    ones = np.ones(2, np.float32)
    want = [nb.sequential(z, random_caches(model, 2, 0), None, ones, None) for nb in blocks]
    got = [[None] * 20 for _ in blocks]

    def run(k):
        for i in range(20):
            got[k][i] = blocks[k].sequential(z, random_caches(model, 2, 0), None, ones, None)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    for k in range(2):
        for result in got[k]:
            np.testing.assert_array_equal(result, want[k])
    native.set_threads(None)


def test_a_forked_child_runs_the_native_step():
    """A fork keeps the pool's state but none of its worker threads: the child starts with its own."""
    import multiprocessing

    model = make_model(num_classes=0, img_size=4)
    cfg = model.config
    native.set_threads(2)
    nb = native.NativeBlock(model.blocks[0], cfg.num_tokens)
    z = np.random.default_rng(0).standard_normal((1, cfg.num_tokens, cfg.token_dim)).astype(np.float32)
    ones = np.ones(1, np.float32)
    want = nb.sequential(z, random_caches(model, 1, 0), None, ones, None)

    def child(queue):
        native.set_threads(1)  # would join the parent's worker threads without the fork handler
        native.set_threads(2)
        queue.put(nb.sequential(z, random_caches(model, 1, 0), None, ones, None))

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=child, args=(queue,))
    proc.start()
    got = queue.get(timeout=60)
    proc.join(timeout=60)
    assert proc.exitcode == 0
    np.testing.assert_array_equal(got, want)
    native.set_threads(None)


def _file_in_the_way(root):
    (root / "cache").write_text("")  # sejd/native cannot be created under a file
    return root / "cache", "cannot create its cache folder"


def _shared_folder(root):
    folder = root / "cache" / "sejd" / "native"
    folder.mkdir(parents=True)
    folder.chmod(0o777)  # anyone could swap the library in it
    return root / "cache", "writable by others"


@pytest.mark.parametrize("make_cache", [_file_in_the_way, _shared_folder], ids=["unwritable", "shared"])
def test_a_cache_folder_that_cannot_be_used_keeps_the_onnx_step(tiny_bundle, monkeypatch, tmp_path, make_cache):
    cache, reason = make_cache(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    native.library.cache_clear()
    try:
        assert reason in native.available()
        assert type(ort_runners(tiny_bundle)[0]) is OrtBlockRunner
    finally:
        native.library.cache_clear()


def test_scratch_of_a_killed_compile_is_removed_by_the_next(monkeypatch, tmp_path):
    import os

    folder = tmp_path / "sejd" / "native"
    stale = folder / ".sejd-tmp-native-dead"
    stale.mkdir(parents=True, mode=0o700)
    folder.chmod(0o700)
    os.utime(stale, (0, 0))  # long ago
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native.library.cache_clear()
    try:
        native.library()
        assert not stale.exists() and len(list(folder.glob("step-*.so"))) == 1
    finally:
        native.library.cache_clear()


@pytest.mark.skipif(__import__("platform").machine() not in ("x86_64", "AMD64"), reason="x86 instruction sets")
def test_the_portable_build_without_avx512_matches_pytorch_too(monkeypatch, tmp_path):
    """This machine has AVX-512; many do not: the same source built for AVX2 (x86-64-v3) takes the plain-C
    paths (dot products, kernels vectorized by the compiler) and must agree as well."""
    monkeypatch.setenv("SEJD_NATIVE_MARCH", "x86-64-v3")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native.library.cache_clear()
    try:
        native.set_threads(2)
        for kind in ("conditional", "volume-preserving, head_dim 24"):
            model = make_model(**MODELS[kind])
            cfg = model.config
            cond = conditioning(model, 3, 1.5)
            z = torch.randn(3, cfg.num_tokens, cfg.token_dim, generator=torch.Generator().manual_seed(2))
            runner = torch_runners(model)[1]
            runner.begin(3, cond)
            want = sequential(runner, z).x
            nb = native.NativeBlock(model.blocks[1], cfg.num_tokens)
            got = nb.sequential(z.numpy(), random_caches(model, cond.rows, 0),
                                cond.labels.numpy() if cfg.num_classes else None, cond.temps.numpy(),
                                cond.guidance.numpy())
            np.testing.assert_allclose(got, want.numpy(), atol=ATOL, rtol=0)
        assert "-march=x86-64-v3" in native._flags()
    finally:
        monkeypatch.undo()  # before the library is loaded again: later tests must get this machine's build
        native.library.cache_clear()
        native.set_threads(None)
    assert "-march=native" in native._flags()


def test_check_with_graphs_none_packs_no_block(tiny_bundle):
    from sejd.check import CheckOptions, check_source
    from sejd.source import open_source

    src = open_source(tiny_bundle.path, "ort-cpu")
    report = check_source(src, src.model, CheckOptions(plans=(), graphs="none", show_progress=False))
    assert not [c for c in report.checks if c.name.endswith("native step")]
    assert all(r._native is None for r in src.runners)  # nothing packed for checks that do not run
