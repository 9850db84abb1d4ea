"""The native CPU step (sejd/engines/native.py, native/step.c) against the PyTorch reference.

Tolerance: 1e-4 absolute, the `step_rows` graph's contract (the C code sums in another order and uses its
own exp/erf, each within a few float32 ulps)."""

import logging
import os
import shutil

import numpy as np
import pytest
import torch

from sejd import sample
from sejd.core.errors import BackendUnavailable, InputError
from sejd.engines import native, native_lib
from sejd.engines.ort import OrtBlockRunner, ort_runners
from sejd.export.graphs import StepRowsGraph
from sejd.runtime.decoders import sequential
from sejd.runtime.runner import Conditioning
from sejd.runtime.torch_runner import torch_runners
from tests.conftest import OTHER_BLOCKS, make_model, rms_norm_spec

ATOL = 1e-4

# the install builds the step wherever a C compiler is (the project's machines have one): there, a missing
# library fails these tests rather than skipping them
if native.available() is not None and not (shutil.which("cc") or shutil.which("gcc")):
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
    **OTHER_BLOCKS,  # another MLP width, no biases (zeros packed for them)
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


def test_a_block_step_c_does_not_run_keeps_the_onnx_step_with_the_reason():
    """The packing reads the declared layer program: one step.c does not implement is refused, saying why
    (the runners then keep the ONNX step: `native_step_reason`)."""
    model = make_model()
    spec = rms_norm_spec(model.config.block_spec)
    reason = native.unsupported(spec)
    assert reason.startswith("step.c runs layers of (layer_norm, linear, attention, linear + residual")
    assert "this block's layer is (rms_norm, linear, attention" in reason
    assert native.unsupported(model.config.block_spec) is None
    for kind in OTHER_BLOCKS.values():
        assert native.unsupported(make_model(**kind).config.block_spec) is None
    block = model.blocks[0]
    block.spec = spec
    with pytest.raises(BackendUnavailable, match="native CPU step: step.c runs layers of"):
        native.NativeBlock(block, model.config.num_tokens)


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


def _library_folder(monkeypatch, folder):
    """Load the step from `folder` instead of the package's (undone, and loaded again, by `_restore`)."""
    monkeypatch.setattr(native_lib, "LIB_DIR", folder)
    native.forget()


def _restore(monkeypatch):
    monkeypatch.undo()  # before the library is loaded again: later tests must get the package's build
    native.forget()
    native.set_threads(None)


def test_without_a_built_library_the_runners_keep_the_onnx_step_and_warn_once(tiny_bundle, monkeypatch,
                                                                                caplog, tmp_path):
    from sejd.engines import ort

    _library_folder(monkeypatch, tmp_path)  # an install without a C compiler built nothing
    monkeypatch.setattr(ort, "_WARNED", set())
    try:
        with caplog.at_level(logging.INFO, logger="sejd.ort"):
            runners, again = ort_runners(tiny_bundle), ort_runners(tiny_bundle)
        assert type(runners[0]) is OrtBlockRunner and type(again[0]) is OrtBlockRunner
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "not built for" in warnings[0].getMessage()
        assert "native" not in runners[0].single_token_path
    finally:
        _restore(monkeypatch)


def _copy_of_the_build(folder, level):
    """The package's built library of `level`, written anew into `folder` (so under the umask in force)."""
    built = native_lib.library_file(level)
    folder.mkdir(exist_ok=True)
    (folder / built.name).write_bytes(built.read_bytes())
    (folder / "step.c").write_bytes(native_lib.SOURCE.read_bytes())
    return folder / built.name


def test_under_umask_002_the_native_step_runs(tiny_bundle, monkeypatch, tmp_path):
    """umask 002 (many distributions' default) makes the installed library group-writable; in the user's
    own group that is still private, and the native step must run (it had fallen back silently)."""
    old = os.umask(0o002)
    try:
        lib = _copy_of_the_build(tmp_path / "site", native_lib.supported_levels()[0])
    finally:
        os.umask(old)
    assert lib.stat().st_mode & 0o020 and lib.parent.stat().st_mode & 0o020
    _library_folder(monkeypatch, lib.parent)
    try:
        private = native_lib._private_group(lib.stat().st_gid)
        assert (native.available() is None) == private, native.available()
        if private:
            assert type(ort_runners(tiny_bundle)[0]) is native.NativeStepRunner
    finally:
        _restore(monkeypatch)


def test_a_planted_library_falls_back_with_the_reason_and_sample_still_works(tiny_bundle, monkeypatch, tmp_path,
                                                                             capsys):
    """A file with the step library's name but not built from sejd's step.c (no sejd symbols) is a reason
    to keep the ONNX step, not an error (it had made every ort-cpu command exit 3)."""
    from sejd.cli import main

    level = native_lib.supported_levels()[0]
    folder = tmp_path / "site"
    lib = _copy_of_the_build(folder, level)
    lib.unlink()
    (folder / "planted.c").write_text("int unrelated(void) { return 1; }\n")
    import subprocess

    subprocess.run([shutil.which("cc") or "gcc", "-shared", "-fPIC", "-o", str(lib), str(folder / "planted.c")],
                   check=True)
    _library_folder(monkeypatch, folder)
    try:
        assert "lacks sejd_build_id" in native.available()
        assert type(ort_runners(tiny_bundle)[0]) is OrtBlockRunner
        assert main(["sample", str(tiny_bundle.path), "-n", "1", "--plan", "sequential"]) == 0
    finally:
        _restore(monkeypatch)


def test_native_step_can_be_turned_off(tiny_bundle, monkeypatch):
    monkeypatch.setenv("SEJD_NATIVE_STEP", "0")
    assert type(ort_runners(tiny_bundle)[0]) is OrtBlockRunner


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
        native.set_threads(1)  # replaces the parent's pool (whose workers do not exist here): freed, not joined
        native.set_threads(2)  # a pool of the child's own
        queue.put((native.threads(), nb.sequential(z, random_caches(model, 1, 0), None, ones, None)))

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=child, args=(queue,))
    proc.start()
    threads_there, got = queue.get(timeout=60)
    proc.join(timeout=60)
    assert proc.exitcode == 0
    assert threads_there == 2
    np.testing.assert_array_equal(got, want)
    native.set_threads(None)


@pytest.mark.parametrize("level", native_lib.supported_levels())
def test_every_instruction_set_level_this_processor_runs_matches_pytorch(monkeypatch, level):
    """Wheels carry one build per x86-64 level and the best one runs; the others (plain C where the
    AVX-512 paths are not compiled, no FMA in the baseline) must agree as well."""
    monkeypatch.setenv("SEJD_NATIVE_ISA", level)
    native.forget()
    try:
        native.set_threads(2)
        assert native.level() == level
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
    finally:
        _restore(monkeypatch)
    assert native.level() == native_lib.supported_levels()[0]


def test_check_with_graphs_none_packs_no_block(tiny_bundle):
    from sejd.workflows.check import CheckOptions, check_source
    from sejd.workflows.source import open_source

    src = open_source(tiny_bundle.path, "ort-cpu")
    report = check_source(src, src.model, CheckOptions(plans=(), graphs="none", show_progress=False))
    assert not [c for c in report.checks if c.name.endswith("native step")]
    assert all(r._native is None for r in src.runners)  # nothing packed for checks that do not run


# ---------------------------------------------------------------- pools (step.c's thread pools) ----------

def _on_pool(pool, nb, z, caches, temps, labels=None, guidance=None):
    """nb's sequential inversion of z on an explicit pool (the NativeBlock methods use the process pool)."""
    out = np.empty_like(z)
    rc = nb._lib.sejd_block_sequential(pool.handle, nb.handle, z.shape[0], temps.shape[0], z.ctypes.data,
                                       out.ctypes.data, nb.cache_pointers(caches), native._ptr(labels),
                                       temps.ctypes.data, native._ptr(guidance))
    assert rc == 0
    return out


def _step_on(pool, nb, x, pos, caches, temps):
    out = np.empty((2, x.shape[0], nb.D), np.float32)
    rc = nb._lib.sejd_block_step(pool.handle, nb.handle, x.shape[0], temps.shape[0], pos, x.ctypes.data,
                                 out.ctypes.data, nb.cache_pointers(caches), None, temps.ctypes.data, None)
    assert rc == 0
    return out


def _uncond_block(img_size=8, seed=0):
    """An unconditional model's block 1 packed for step.c, a batch of 2 noise sequences and its reference."""
    model = make_model(num_classes=0, img_size=img_size)
    cfg = model.config
    z = torch.randn(2, cfg.num_tokens, cfg.token_dim, generator=torch.Generator().manual_seed(seed))
    runner = torch_runners(model)[1]
    runner.begin(2, Conditioning.build(2, cfg.num_tokens))
    want = sequential(runner, z).x.numpy()
    return model, native.NativeBlock(model.blocks[1], cfg.num_tokens), z.numpy(), want


def test_pools_of_different_sizes_give_the_same_bits():
    """Tasks do not depend on the thread count (only on the rows), so neither do the results."""
    model, nb, z, want = _uncond_block()
    temps = np.ones(2, np.float32)
    pools = [native.Pool(n, nb._lib) for n in (1, 2, 3)]
    assert [p.threads for p in pools] == [1, 2, 3]
    got = [_on_pool(p, nb, z, random_caches(model, 2, 0), temps) for p in pools + pools[::-1]]  # they coexist
    np.testing.assert_allclose(got[0], want, atol=ATOL, rtol=0)
    for g in got[1:]:
        np.testing.assert_array_equal(g, got[0])


def test_a_parked_pool_wakes_for_the_next_call():
    model, nb, z, want = _uncond_block()
    temps = np.ones(2, np.float32)
    pool = native.Pool(3, nb._lib)
    pool.park()  # before any job, twice, and between jobs: idle workers sleep; a call wakes them
    pool.park()
    first = _on_pool(pool, nb, z, random_caches(model, 2, 0), temps)
    pool.park()
    caches = random_caches(model, 2, 0)
    steps = [_step_on(pool, nb, np.ascontiguousarray(first[:, pos]), pos, caches, temps) for pos in range(4)]
    pool.park()
    np.testing.assert_allclose(first, want, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(_on_pool(pool, nb, z, random_caches(model, 2, 0), temps), first)
    one = native.Pool(1, nb._lib)
    caches = random_caches(model, 2, 0)
    for pos, got in enumerate(steps):  # the same tokens stepped on a one-thread pool
        np.testing.assert_array_equal(got, _step_on(one, nb, np.ascontiguousarray(first[:, pos]), pos, caches, temps))


def test_more_threads_than_cores_with_a_competing_process():
    """8 threads on this machine's 2 cores, next to a CPU-bound process: threads are preempted inside jobs
    (the others sleep until they run again, and the pool narrows), and every result stays exact."""
    import subprocess
    import sys
    import time

    model, nb, z, want = _uncond_block(img_size=16)  # 64 tokens: jobs long enough to be preempted in
    temps = np.ones(2, np.float32)
    many = native.Pool(8, nb._lib)
    assert many.threads == 8
    reference = _on_pool(native.Pool(1, nb._lib), nb, z, random_caches(model, 2, 0), temps)
    np.testing.assert_allclose(reference, want, atol=ATOL, rtol=0)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.1)  # running before the calls
        for _ in range(5):
            np.testing.assert_array_equal(_on_pool(many, nb, z, random_caches(model, 2, 0), temps), reference)
        caches = random_caches(model, 2, 0)
        one, ref_caches = native.Pool(1, nb._lib), random_caches(model, 2, 0)
        for pos in range(model.config.num_tokens - 1):
            x = np.ascontiguousarray(reference[:, pos])
            np.testing.assert_array_equal(_step_on(many, nb, x, pos, caches, temps),
                                          _step_on(one, nb, x, pos, ref_caches, temps))
    finally:
        hog.kill()
        hog.wait()


def test_two_pools_on_one_block_from_two_threads():
    """A block's scratch is shared: calls on it queue (its own mutex) whichever pool they run on."""
    import threading

    model, nb, z, want = _uncond_block()
    temps = np.ones(2, np.float32)
    pools = [native.Pool(2, nb._lib), native.Pool(3, nb._lib)]
    first = _on_pool(pools[0], nb, z, random_caches(model, 2, 0), temps)
    got = [[None] * 15 for _ in pools]

    def run(k):
        for i in range(15):
            got[k][i] = _on_pool(pools[k], nb, z, random_caches(model, 2, 0), temps)

    workers = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in workers)
    np.testing.assert_allclose(first, want, atol=ATOL, rtol=0)
    for results in got:
        for result in results:
            np.testing.assert_array_equal(result, first)


def _in_a_forked_child(fn, timeout=60):
    """fn() run in an os.fork() child (numpy and ctypes only there); its pickled result, or a failure when it
    raised, crashed or hung."""
    import os
    import pickle
    import select
    import signal

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        code = 1
        try:
            os.write(write, pickle.dumps(fn()))
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    data = b""
    try:
        while True:
            ready, _, _ = select.select([read], [], [], timeout)
            if not ready:
                os.kill(pid, signal.SIGKILL)
                pytest.fail(f"the forked child did not finish within {timeout} s")
            chunk = os.read(read, 1 << 16)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(read)
        _, status = os.waitpid(pid, 0)
    assert status == 0 and data, f"the forked child failed (status {status})"
    return pickle.loads(data)


def test_a_forked_child_runs_on_the_inherited_pool_alone():
    """The child keeps the parent's pool, whose workers do not exist there: its calls run on the calling
    thread (and say so), with the same bits."""
    model, nb, z, want = _uncond_block(img_size=4)
    temps = np.ones(2, np.float32)
    native.set_threads(3)
    try:
        parent = nb.sequential(z, random_caches(model, 2, 0), None, temps, None)
        threads_there, got = _in_a_forked_child(
            lambda: (native.threads(), nb.sequential(z, random_caches(model, 2, 0), None, temps, None)))
        assert native.threads() == 3 and threads_there == 1
        np.testing.assert_allclose(parent, want, atol=ATOL, rtol=0)
        np.testing.assert_array_equal(got, parent)
        np.testing.assert_array_equal(nb.sequential(z, random_caches(model, 2, 0), None, temps, None), parent)
    finally:
        native.set_threads(None)


def test_fork_while_another_thread_is_inside_a_job():
    """fork() waits for running jobs (the fork handlers hold every pool's job mutex around it): the child
    never inherits a pool or a block locked by a thread it does not have."""
    import threading
    import time

    model, nb, z, want = _uncond_block()
    temps = np.ones(2, np.float32)
    native.set_threads(2)
    stop, seen = threading.Event(), []

    def busy():
        while not stop.is_set():
            seen.append(nb.sequential(z, random_caches(model, 2, 0), None, temps, None))

    worker = threading.Thread(target=busy)
    worker.start()
    try:
        time.sleep(0.05)
        got = [_in_a_forked_child(lambda: nb.sequential(z, random_caches(model, 2, 0), None, temps, None))
               for _ in range(3)]
    finally:
        stop.set()
        worker.join(timeout=60)
        native.set_threads(None)
    assert not worker.is_alive() and seen
    for result in got + seen:
        np.testing.assert_allclose(result, want, atol=ATOL, rtol=0)
        np.testing.assert_array_equal(result, seen[0])


def test_an_idle_pool_takes_no_cpu():
    """Workers spin only briefly after a job, then sleep in the kernel: an idle process uses no CPU."""
    import time

    model, nb, z, _ = _uncond_block()
    pool = native.Pool(3, nb._lib)
    _on_pool(pool, nb, z, random_caches(model, 2, 0), np.ones(2, np.float32))
    time.sleep(0.05)  # past the idle spin
    used = time.process_time()
    time.sleep(0.3)
    used = time.process_time() - used
    assert used < 0.05, f"the process used {used:.3f} s of CPU in 0.3 s while idle"


def test_set_threads_makes_one_pool_and_keeps_it():
    native.set_threads(2)
    try:
        first = native.pool()
        assert native.threads() == 2 and first.threads == 2
        native.set_threads(2)
        assert native.pool() is first  # the same count: the same pool (no threads recreated)
        native.set_threads(3)
        assert native.pool() is not first and native.threads() == 3
    finally:
        native.set_threads(None)
    assert native.threads() == native.default_threads()


def test_the_build_says_what_it_is():
    build = native.library().sejd_build_id()
    assert isinstance(build, bytes) and build


def test_the_runner_parks_the_native_workers_before_onnx_runtime_passes(tiny_bundle, monkeypatch):
    runners = ort_runners(tiny_bundle)
    assert runners[0].single_token_path == f"native CPU step ({native.level()}, {native.threads()} threads)"
    parks = []
    real_park = native.park
    monkeypatch.setattr(native, "park", lambda: (parks.append(1), real_park()))
    model = runners[0].model
    noise = torch.randn(2, 16, 12, generator=torch.Generator().manual_seed(6))
    sample(model, noise, plan="sequential", runners=runners, progress=False)
    assert not parks  # token by token: the native step only, nothing for ONNX Runtime
    sample(model, noise, plan="ujd", runners=runners, progress=False)
    assert parks  # Jacobi passes run on ONNX Runtime
