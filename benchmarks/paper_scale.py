"""Published-size TarFlow checkpoints end to end: export, build, graph latency and sampling time.

    python benchmarks/paper_scale.py afhq256 [--slim] [--json out.json] [--workdir DIR] [--keep]
    python benchmarks/paper_scale.py starflow3b [--slim] [--as-limit-gb N] [--json out.json] [--workdir DIR]

CONFIG is one of ml-tarflow's published shapes (`afhq256`, `imagenet64`, `imagenet128`); `--slim`
keeps its geometry (image size, patch, T = 1024 tokens, 8 blocks, classes) with 128 channels and one
layer per block, for a quick run. Each stage runs as a child process, so its wall time, CPU time and
peak resident memory are the kernel's figures for that stage alone:

1. make: a random-weight checkpoint of that exact shape in ml-tarflow's layout (a plain state dict
   saved with torch.save under ml-tarflow's file-name convention) in a temporary folder. ml-tarflow
   starts `proj_out` at zero (every block an identity map): it gets small random weights so that
   decoding does real work and stays finite;
2. export: `sejd export CKPT -o BUNDLE` (bundle size against the checkpoint's);
3. build: `sejd build BUNDLE --backend ort-cpu` (size of the engines);
4. measure: latency of one call of `step_present`, `step_rows` and one `jacobi` pass at each --batch (warm-up,
   then the median of --runs), and for each --sample-batch the sampling time of each plan with fixed
   iteration counts (timing only: not converged by design; `sequential` is exact) and of ml-tarflow's
   own loop (`plan="reference"`) on the first sampling block.

JSON on stdout and in --json; a table on stderr. `--backend torch` or `torch-cuda[:bf16]` skips the
build and measures stage 4 on the checkpoint itself (the block runner's `step` in place of the two
single-token graphs, cache write included);
benchmarks/gpu_scale.sh runs the stages one by one (`--stage make|measure --path P`) on a GPU.

`starflow3b` is apple/ml-starflow's published text-to-image model (configs/starflow_3B_t2i_256x256.yaml:
3,858,281,544 parameters, six blocks of depths 2,2,2,2,2,24 at 3072 channels, a 32 x 32 latent grid). Its make
stage writes a random-weight checkpoint in Apple's key layout (buffers included) in bfloat16, as Apple
released it, tensor by tensor (never an fp32 copy of the model), plus the Model kwargs as a JSON file; export is
`sejd export CKPT --config JSON -o BUNDLE`. `--slim` keeps every depth and the token count at 128 channels.
The full model's measure stage is skipped (minutes per sample on a CPU would measure nothing new: `--slim`
measures the same graphs' depth and token count); `--slim` samples with the `starflow` and `sequential` plans
on text stand-ins and guidance. A failed stage is recorded (exit status, its last error line, the kernel's peak
RSS) and ends the run with the JSON written; `--as-limit-gb` caps each stage's address space (RLIMIT_AS), so
that a stage that cannot fit fails alone instead of pushing a shared machine into its OOM killer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the other benchmark scripts beside this one
SHAPES = {  # ml-tarflow's published models (its README and training commands)
    "afhq256": dict(dataset="afhq", noise_std=0.07, in_channels=3, img_size=256, patch_size=8, channels=768,
                    num_blocks=8, layers_per_block=8, head_dim=64, num_classes=3),
    "imagenet64": dict(dataset="imagenet", noise_std=0.05, in_channels=3, img_size=64, patch_size=2, channels=768,
                       num_blocks=8, layers_per_block=8, head_dim=64, num_classes=1000),
    "imagenet128": dict(dataset="imagenet", noise_std=0.15, in_channels=3, img_size=128, patch_size=4,
                        channels=1024, num_blocks=8, layers_per_block=8, head_dim=64, num_classes=1000),
}
SLIM = dict(channels=128, layers_per_block=1)
# apple/ml-starflow's published text-to-image model: Model kwargs of configs/starflow_3B_t2i_256x256.yaml as
# sample.py builds them (img_size 256 px // VAE factor 8; txt_dim = flan-t5-xl's width).
STARFLOW_SHAPES = {
    "starflow3b": {"in_channels": 4, "img_size": 32, "patch_size": 1, "channels": 3072, "num_blocks": 6,
                   "layers_per_block": [2, 2, 2, 2, 2, 24], "head_dim": 64, "rope": True, "sos": True,
                   "txt_size": 128, "txt_dim": 2048, "cond_top_only": True, "use_softplus": True,
                   "use_final_norm": True, "soft_clip": 4.0, "seq_order": "L2R"},
}
STARFLOW_SLIM = dict(channels=128)  # every depth, the text and the 1024 tokens kept
STARFLOW_GUIDANCE = 3.6  # the slim measure stage's guidance (text stand-ins, their own null text)
# The SJD paper's mean Jacobi iterations on AFHQ-256 at tau = 0.5, in sampling order after the sequential
# first block: 6.6, 6.0, 5.2, 5.0, 5.9, 4.5, 4.0, rounded up. Used for every config (the paper reports no
# counts for the ImageNet models).
SJD_AFHQ_ITERATIONS = (7, 6, 6, 5, 6, 5, 4)
PROJ_OUT_SCALE = 0.1  # proj_out outputs ~ N(0, 0.1^2) for unit inputs: decoding moves, stays finite
LATENCY_VARIANTS = ("step_present", "step_rows", "jacobi")


def shape_of(name: str, slim: bool) -> dict:
    if name in STARFLOW_SHAPES:
        return {**STARFLOW_SHAPES[name], **(STARFLOW_SLIM if slim else {})}
    return {**SHAPES[name], **(SLIM if slim else {})}


def is_starflow_shape(shape: dict) -> bool:
    return "txt_size" in shape


def checkpoint_name(shape: dict) -> str:
    """ml-tarflow's convention: {dataset}_model_{patch}_{channels}_{blocks}_{layers}_{noise:.2f}.pth
    (STARFlow: Apple's released file is starflow_3B_t2i_256x256.pth; the channels name this one)."""
    if is_starflow_shape(shape):
        return f"starflow_{shape['channels']}ch_t2i_256x256.pth"
    return (f"{shape['dataset']}_model_{shape['patch_size']}_{shape['channels']}_{shape['num_blocks']}_"
            f"{shape['layers_per_block']}_{shape['noise_std']:.2f}.pth")


def make_checkpoint(shape: dict, path: Path, seed: int = 0) -> None:
    import torch

    from sejd.model.tarflow import TarFlow, TarFlowConfig

    torch.manual_seed(seed)
    fields = {k: v for k, v in shape.items() if k not in ("dataset", "noise_std")}
    model = TarFlow(TarFlowConfig(**fields))
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0, PROJ_OUT_SCALE / math.sqrt(shape["channels"]))
    torch.save(model.state_dict(), path)


def starflow_shapes(cfg: dict) -> dict:
    """Every key of ml-starflow's Model.state_dict() for these kwargs (its deprecated buffers included:
    `var`, `feat_rope.freqs_*`, `blocks.*.attn_mask`) -> shape, in the Model's own order."""
    ci, C, D = cfg["in_channels"] * cfg["patch_size"] ** 2, cfg["channels"], cfg["head_dim"]
    n, txt = (cfg["img_size"] // cfg["patch_size"]) ** 2, cfg.get("txt_size", 0)
    shapes = {"var": (n, ci), "feat_rope.freqs_cos": (txt + n, D), "feat_rope.freqs_sin": (txt + n, D)}
    for i, layers in enumerate(cfg["layers_per_block"]):
        p = f"blocks.{i}."
        shapes.update({p + "proj_in.weight": (C, ci), p + "proj_in.bias": (C,), p + "proj_out.weight": (2 * ci, C),
                       p + "proj_out.bias": (2 * ci,), p + "sos_embed": (1, 1, ci), p + "attn_mask": (n + txt, n + txt)})
        if cfg.get("txt_dim") and (i == cfg["num_blocks"] - 1 or not cfg.get("cond_top_only")):
            shapes.update({p + "proj_txt.weight": (C, cfg["txt_dim"]), p + "proj_txt.bias": (C,)})
        for j in range(layers):
            q = f"{p}attn_blocks.{j}."
            for norm in ("attention.norm", "mlp.norm"):
                shapes.update({q + norm + ".weight": (C,), q + norm + ".bias": (C,)})
            for name, (o, k) in {"attention.qkv": (3 * C, C), "attention.proj": (C, C),
                                 "mlp.main.0": (4 * C, C), "mlp.main.2": (C, 4 * C)}.items():
                shapes.update({q + name + ".weight": (o, k), q + name + ".bias": (o,)})
        if cfg.get("use_final_norm"):
            shapes[p + "final_norm.weight"] = (C,)
    return shapes


def make_starflow_checkpoint(cfg: dict, path: Path, seed: int = 0, dtype: str = "bfloat16") -> None:
    """A random-weight ml-starflow checkpoint (a plain state dict, torch.save) in `dtype`, made tensor by
    tensor: each is drawn in float32 (one tensor at a time) and cast at once, so memory holds the bf16 model
    and one fp32 tensor (at most 4C x C: 151 MB at 3072 channels). Small weights (std 1/sqrt(fan_in)),
    LayerNorm gains around 1, and a non-zero proj_out (Apple starts it at zero: every block the identity),
    so that every block transforms and decoding stays finite. The Model kwargs go beside it as PATH.json."""
    import torch

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    sd, params = {}, 0
    for key, shape in starflow_shapes(cfg).items():
        if key.endswith("attn_mask"):
            t = torch.ones(shape, dtype=dt).tril_()
        elif key == "var":
            t = torch.ones(shape, dtype=dt)
        elif key.startswith("feat_rope."):
            t = torch.zeros(shape, dtype=dt)
        elif key.endswith("norm.weight") and "final_norm" not in key:
            t = (1 + 0.1 * torch.randn(shape, generator=g)).to(dt)
        elif key.endswith("sos_embed"):
            t = torch.randn(shape, generator=g).to(dt)
        else:
            fan_in = shape[1] if len(shape) == 2 else 25
            std = (PROJ_OUT_SCALE if key.endswith("proj_out.weight") else 1.0) / math.sqrt(fan_in)
            t = torch.randn(shape, generator=g).mul_(std).to(dt)  # the fp32 draw is freed at once
        if not (key in ("var",) or key.startswith("feat_rope.") or key.endswith("attn_mask")):
            params += t.numel()
        sd[key] = t
    torch.save(sd, path)
    Path(str(path) + ".json").write_text(json.dumps(cfg, indent=1) + "\n")
    print(f"make: {len(sd)} tensors, {params:,} parameters (buffers aside) in {dtype} -> {path}", file=sys.stderr)


def fixed_plan(num_blocks: int, counts=SJD_AFHQ_ITERATIONS):
    """SJD with fixed Jacobi iteration counts (sampling order) after the sequential first block."""
    from sejd.runtime.plan import named_plan

    plan = named_plan("sjd", num_blocks)
    jacobi_blocks = list(reversed(range(num_blocks - 1)))  # sampling order after blocks[-1]
    for k, n in zip(jacobi_blocks, counts):
        plan.blocks[k].fixed_iters = n
    plan.name = f"sjd-fixed[{','.join(map(str, counts[:len(jacobi_blocks)]))}]"
    return plan


def runner_latency(runners, model, batches, runs: int, warmup: int) -> list:
    """`step` (one token, cache write included) and one `jacobi` pass through a block runner: for
    backends without separate graph files (torch-cuda: the captured graph modules)."""
    import torch
    from cuda_latency import timed

    from sejd.runtime.runner import Conditioning

    cfg = model.config
    k = cfg.num_blocks - 2  # a Jacobi block of the SJD plan
    rows = []
    for batch in batches:
        z = torch.randn(batch, cfg.num_tokens, cfg.token_dim, generator=torch.Generator().manual_seed(batch))
        z = z.to(model.var.device)
        x = torch.zeros_like(z)
        runners[k].begin(batch, Conditioning.build(batch, cfg.num_tokens))
        for op, fn in (("step", lambda: runners[k].step(z[:, 0], 3)), ("jacobi", lambda: runners[k].jacobi_iter(z, x))):
            median, times = timed(fn, model.var.device, runs, warmup)
            rows.append({"variant": op, "batch": batch, "ms_median": 1e3 * median, "ms_all": [1e3 * t for t in times]})
            print(f"{op:<16} batch {batch:>3}: {rows[-1]['ms_median']:9.3f} ms", file=sys.stderr)
    return rows


def measure(source: str, backend: str, batches, sample_batches, runs: int, sample_runs: int,
            warmup: int, guidance: float = 0.0, reference_precisions=("fp32",)) -> dict:
    """Stage 4 on a bundle (engine backends) or a checkpoint (torch, torch-cuda): graph latency, sampling
    time per plan, ml-tarflow's loop on the first sampling block."""
    import torch
    from cuda_latency import timed

    from sejd.runtime.mltarflow_loop import reference_block_reverse
    from sejd.runtime.runner import Conditioning, peak_rss_bytes
    from sejd.runtime.sampler import sample
    from sejd.runtime.torch_runner import torch_runners
    from sejd.workflows.source import open_source

    src = open_source(source, backend)
    model, cfg = src.model, src.model.config
    runners = src.runners or torch_runners(model)
    device = model.var.device
    if backend.startswith("ort-"):
        from variant_latency import graph_latency

        from sejd.engines.ort import OrtSessions

        sessions = OrtSessions(src.bundle, backend)
        latency = [row for v in LATENCY_VARIANTS if v in src.bundle.variants() for row in  # what was exported
                   graph_latency(sessions, v, cfg.num_blocks - 2, batches, runs, warmup)]
        del sessions  # its sessions hold their own copies of the block's weights
    else:
        latency = runner_latency(runners, model, batches, runs, warmup)
    plans = ["sequential", fixed_plan(cfg.num_blocks)]
    sampling, reference = [], []
    for batch in sample_batches:
        g = torch.Generator().manual_seed(batch)
        noise = torch.randn(batch, cfg.num_tokens, cfg.token_dim, generator=g)
        labels = torch.arange(batch) % cfg.num_classes if cfg.num_classes else None
        cond = Conditioning.build(batch, cfg.num_tokens, labels, guidance=guidance)
        z = noise.to(device)
        for r in runners:  # warm-up: every session or captured graph the plans use, without a whole sample
            r.begin(batch, cond)
            r.step(z[:, 0], 0)
            r.jacobi_iter(z, torch.zeros_like(z))
        for plan in plans:
            results = []
            median, times = timed(lambda: results.append(sample(model, noise, labels=labels, plan=plan,
                                                                 guidance=guidance, runners=runners,
                                                                 progress=False)), device, sample_runs, 0)
            stats = results[-1].stats
            sampling.append({"plan": stats.plan, "batch": batch, "seconds_median": median, "seconds_all": times,
                             "timing_only": "timing only" in stats.plan,
                             "iterations_per_block": [b.iterations for b in stats.blocks],
                             "seconds_per_block": [b.seconds for b in stats.blocks]})
            print(f"sample {stats.plan:<40} batch {batch:>3}: {median:9.3f} s", file=sys.stderr)
        x = (noise.to(device) * model.var.sqrt())
        y = None if labels is None else labels.to(device)
        for precision in reference_precisions:  # bf16: autocast, as ml-tarflow's sampling notebook runs it
            def first_block():
                with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
                    reference_block_reverse(model.blocks[-1], x, y, guidance)
            median, times = timed(first_block, device, sample_runs, 0)
            ours = next(s for s in sampling if s["plan"] == "sequential" and s["batch"] == batch)
            reference.append({"precision": precision, "batch": batch, "seconds_median": median, "seconds_all": times,
                              "sequential_first_block_seconds": ours["seconds_per_block"][0]})
            print(f"ml-tarflow loop, first block ({precision}) batch {batch:>3}: {median:9.3f} s", file=sys.stderr)
    return {"backend": backend, "latency": latency, "sampling": sampling, "reference_first_block": reference,
            "guidance": guidance, "runs": runs, "sample_runs": sample_runs, "warmup": warmup,
            "peak_rss_bytes": peak_rss_bytes()}


def measure_starflow(source: str, backend: str, sample_batches, sample_runs: int,
                     guidance: float = STARFLOW_GUIDANCE) -> dict:
    """Stage 4 for a STARFlow bundle: the sampling time of the `starflow` (Apple's sampler) and `sequential`
    plans at each batch, on seeded text stand-ins (B, Lt, Dt) and a null text, under guidance."""
    import torch
    from cuda_latency import timed

    from sejd.runtime.runner import peak_rss_bytes
    from sejd.runtime.sampler import sample
    from sejd.workflows.source import open_source

    src = open_source(source, backend)
    model, cfg = src.model, src.model.config
    sampling = []
    for batch in sample_batches:
        g = torch.Generator().manual_seed(batch)
        noise = torch.randn(batch, cfg.num_tokens, cfg.token_dim, generator=g)
        text = 0.2 * torch.randn(batch, cfg.txt_size, cfg.txt_dim, generator=g)
        null = 0.2 * torch.randn(cfg.txt_size, cfg.txt_dim, generator=g)
        for plan in ("starflow", "sequential"):
            results = []
            run = lambda: results.append(sample(model, noise, plan=plan, text=text, uncond_text=null,  # noqa: E731
                                                guidance=guidance, runners=src.runners, progress=False))
            run()  # warm-up: every session the plan uses
            median, times = timed(run, model.var.device, sample_runs, 0)
            stats, images = results[-1].stats, results[-1].images
            sampling.append({"plan": stats.plan, "batch": batch, "seconds_median": median, "seconds_all": times,
                             "iterations_per_block": [b.iterations for b in stats.blocks],
                             "seconds_per_block": [b.seconds for b in stats.blocks],
                             "finite": bool(torch.isfinite(images).all())})
            print(f"sample {stats.plan:<40} batch {batch:>3}: {median:9.3f} s", file=sys.stderr)
    return {"backend": backend, "latency": [], "sampling": sampling, "reference_first_block": [],
            "guidance": guidance, "sample_runs": sample_runs, "peak_rss_bytes": peak_rss_bytes()}


class StageFailed(Exception):
    def __init__(self, record: dict):
        super().__init__(record["error"])
        self.record = record


def _as_limit(nbytes: int | None):
    if not nbytes:
        return None

    def limit():
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (nbytes, nbytes))
    return limit


def _last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    for ln in reversed(lines):  # the exception's own line, not a progress bar's
        if "Error" in ln or "error:" in ln or "Killed" in ln or ln.startswith("sejd"):
            return ln[:500]
    return lines[-1][:500] if lines else ""


def run_stage(name: str, argv: list, timeout: float, as_limit: int | None = None, log_dir: Path | None = None) -> dict:
    """Run one stage as a child process: wall seconds, CPU seconds and peak RSS from wait4. A stage that
    fails (exit status, a signal: -9 is the kernel's OOM killer or the timeout) raises StageFailed carrying
    the same figures, its exit status and the last error line of its stderr."""
    t0 = time.perf_counter()
    log = open(log_dir / f"{name}.stderr", "w+") if log_dir else None
    child = subprocess.Popen(argv, stdout=sys.stderr, stderr=log, preexec_fn=_as_limit(as_limit))
    timed_out = False
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() - t0 > timeout:
            child.kill()
            pid, status, usage = os.wait4(child.pid, 0)
            timed_out = True
            break
        time.sleep(0.2)
    code = os.waitstatus_to_exitcode(status)
    peak = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024
    record = {"seconds": time.perf_counter() - t0, "cpu_seconds": usage.ru_utime + usage.ru_stime,
              "peak_rss_bytes": int(peak), "exit_status": code}
    if as_limit:
        record["rlimit_as_bytes"] = as_limit
    if log:
        log.seek(0)
        text = log.read()
        log.close()
        sys.stderr.write(text[-20000:])
    if timed_out or code != 0:
        error = (f"ran past {timeout:.0f} s and was stopped" if timed_out else
                 _last_error_line(text) if log else "") or f"exit status {code}"
        if code == -9 and not timed_out:
            error = f"killed by SIGKILL (the kernel's OOM killer?); {error}"
        record.update(error=error, timed_out=timed_out, argv=list(map(str, argv)))
        raise StageFailed(record)
    return record


def tree_bytes(path: Path, skip: str | None = None) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and skip not in f.relative_to(path).parts)


def table(result: dict) -> str:
    gib = 2**30
    ck = result.get("checkpoint", {}).get("bytes") or 1
    rows = [f"{result['config']}{' (slim)' if result['slim'] else ''}: checkpoint {ck / gib:.3f} GiB "
            f"({result.get('checkpoint', {}).get('file')})"]
    for stage in ("make", "export", "build", "measure"):
        s = result.get(stage)
        if s:
            rows.append(f"  {stage:<8} {s['seconds']:8.1f} s wall {s['cpu_seconds']:8.1f} s CPU  peak "
                        f"{s['peak_rss_bytes'] / gib:6.2f} GiB  exit {s.get('exit_status', 0)}"
                        + (f"  error: {s['error']}" if s.get("error") else ""))
    for stage, why in result.get("skipped", {}).items():
        rows.append(f"  {stage:<8} skipped: {why}")
    if "bundle_bytes" in result:
        rows.append(f"  bundle {result['bundle_bytes'] / gib:.3f} GiB = {result['bundle_bytes'] / ck:.2f}x the checkpoint")
    if "engines_bytes" in result:
        rows.append(f"  engines {result['engines_bytes'] / gib:.3f} GiB = {result['engines_bytes'] / ck:.2f}x")
    m = result.get("measured")
    if not m:
        return "\n".join(rows)
    for r in m.get("latency", []):
        rows.append(f"  {r['variant']:<8} batch {r['batch']:>3} {r['ms_median']:10.3f} ms")
    for r in m["sampling"]:
        rows.append(f"  sample batch {r['batch']:>3} {r['seconds_median']:9.3f} s  {r['plan']}  "
                    f"iterations {r['iterations_per_block']}")
    for r in m.get("reference_first_block", []):
        rows.append(f"  ml-tarflow loop ({r['precision']}), first sampling block, batch {r['batch']:>3}: "
                    f"{r['seconds_median']:.3f} s (sequential on {m['backend']}: {r['sequential_first_block_seconds']:.3f} s)")
    return "\n".join(rows)


def _numbers(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", choices=sorted(SHAPES) + sorted(STARFLOW_SHAPES))
    p.add_argument("--slim", action="store_true", help="128 channels, 1 layer per block (same geometry); "
                   "STARFlow: 128 channels, every depth kept")
    p.add_argument("--as-limit-gb", type=float, default=None,
                   help="RLIMIT_AS of each stage's process, in GB (a stage that cannot fit then fails alone)")
    p.add_argument("--skip-measure", action="store_true", help="no stage 4")
    p.add_argument("--backend", default="ort-cpu", help="an engine backend (built from the bundle), or torch / "
                   "torch-cuda[:bf16] (run on the checkpoint)")
    p.add_argument("--batch", default="1,16", help="batch sizes of the graph latency")
    p.add_argument("--sample-batch", default="1", help="batch sizes of the sampling runs")
    p.add_argument("--runs", type=int, default=5, help="timed calls per graph latency (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--sample-runs", type=int, default=None, help="timed samples per plan (default 3 slim, 1 full)")
    p.add_argument("--guidance", type=float, default=0.0)
    p.add_argument("--reference-precisions", default="fp32",
                   help="ml-tarflow's loop: fp32 and/or bf16 (autocast, as its sampling notebook), or none")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="PyTorch intra-op threads in the measure stage (default: PyTorch's; 1 is steadier on a "
                   "loaded machine, where a thread pool waits for descheduled threads at every op)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per stage")
    p.add_argument("--workdir", default=None, help="where the temporary folder goes (default: the system's)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and bundle")
    p.add_argument("--json", default=None)
    p.add_argument("--stage", choices=("make", "measure"), default=None,
                   help="one stage only: make (CONFIG's checkpoint at --path) or measure (the bundle or checkpoint "
                   "at --path, into --json); what the full run does in child processes")
    p.add_argument("--path", default=None, help="with --stage: the checkpoint to write, or the source to measure")
    a = p.parse_args()
    from sejd.core.files import write_json

    sample_runs = a.sample_runs or (3 if a.slim else 1)
    if a.stage == "make":
        shape = shape_of(a.config, a.slim)
        if is_starflow_shape(shape):
            return make_starflow_checkpoint(shape, Path(a.path))
        return make_checkpoint(shape, Path(a.path))
    if a.stage == "measure" and a.config in STARFLOW_SHAPES:
        if a.torch_threads:
            import torch
            torch.set_num_threads(a.torch_threads)
        return write_json(a.json, measure_starflow(a.path, a.backend, _numbers(a.sample_batch), sample_runs,
                                                   a.guidance or STARFLOW_GUIDANCE))
    if a.stage == "measure":
        if a.torch_threads:
            import torch
            torch.set_num_threads(a.torch_threads)
        result = measure(a.path, a.backend, _numbers(a.batch), _numbers(a.sample_batch), a.runs, sample_runs,
                         a.warmup, a.guidance, [r for r in a.reference_precisions.split(",") if r != "none"])
        return write_json(a.json, result)
    if a.config is None:
        p.error("CONFIG is required")
    shape = shape_of(a.config, a.slim)
    starflow = is_starflow_shape(shape)
    if starflow and a.backend.startswith("torch"):
        p.error("starflow3b runs the bundle's engines (ort-cpu)")
    work = Path(tempfile.mkdtemp(prefix="paper_scale-", dir=a.workdir))
    me = [sys.executable, str(Path(__file__).resolve())]
    sejd_cli = [sys.executable, "-m", "sejd.cli"]
    as_limit = int(a.as_limit_gb * 1e9) if a.as_limit_gb else None
    result = {"config": a.config, "slim": a.slim, "shape": shape, "backend": a.backend,
              "torch_threads": a.torch_threads, "skipped": {},
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "python": platform.python_version(), "mem_total_bytes": _meminfo("MemTotal"),
                          "mem_available_bytes_at_start": _meminfo("MemAvailable")}}
    failed = None

    def stage(name, argv):
        result[name] = run_stage(name, argv, a.timeout, as_limit, work)
        return result[name]

    try:
        ckpt, bundle = work / checkpoint_name(shape), work / "bundle"
        stage("make", me + [a.config, "--stage", "make", "--path", str(ckpt)] + (["--slim"] if a.slim else []))
        result["checkpoint"] = {"file": ckpt.name, "bytes": ckpt.stat().st_size}
        config = ["--config", str(ckpt) + ".json"] if starflow else []
        stage("export", sejd_cli + ["export", str(ckpt), *config, "-o", str(bundle)])
        result["bundle_bytes"] = tree_bytes(bundle, skip="engines")
        result["bundle_files"] = {f.relative_to(bundle).as_posix(): f.stat().st_size
                                  for f in sorted(bundle.rglob("*")) if f.is_file() and f.stat().st_size > 1e6}
        if not a.backend.startswith("torch"):  # torch and torch-cuda run the checkpoint: no engines to build
            stage("build", sejd_cli + ["build", str(bundle), "--backend", a.backend])
            result["engines_bytes"] = tree_bytes(bundle / "engines")
        measured = work / "measured.json"
        if a.skip_measure or (starflow and not a.slim):
            result["skipped"]["measure"] = (
                "--skip-measure" if a.skip_measure else "the full 3B is not sampled on a CPU (a 24-layer block of "
                "3072 channels per token, minutes per sample); --slim measures the same depths and token count")
        else:
            stage("measure", me + ([a.config] if starflow else []) + [
                "--stage", "measure", "--path", str(ckpt if a.backend.startswith("torch") else bundle), "--backend",
                a.backend, "--batch", a.batch, "--sample-batch", a.sample_batch, "--runs", str(a.runs), "--warmup",
                str(a.warmup), "--sample-runs", str(sample_runs), "--guidance", str(a.guidance),
                "--reference-precisions", a.reference_precisions, "--json", str(measured)]
                + (["--torch-threads", str(a.torch_threads)] if a.torch_threads else []))
            result["measured"] = json.loads(measured.read_text())
    except StageFailed as e:
        name = next(n for n in ("make", "export", "build", "measure") if n not in result)
        result[name] = e.record
        failed = f"stage {name} failed: {e.record['error']}"
        result["failed"] = failed
    finally:
        if a.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(table(result), file=sys.stderr)
    print(json.dumps(result, indent=1))
    if a.json:
        write_json(a.json, result)
    if failed:
        raise SystemExit(f"paper_scale: {failed}")


def _meminfo(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


if __name__ == "__main__":
    main()
