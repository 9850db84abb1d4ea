"""The `sejd` command line: thin wrappers over the library."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from sejd.errors import SejdError


def _config_arg(text):
    """--config: inline JSON or a JSON file of TarFlowConfig fields (for .pth files without a telling name)."""
    if text is None:
        return None
    from pathlib import Path

    from sejd.errors import ConfigError
    try:
        value = json.loads(Path(text).read_text() if Path(text).is_file() else text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config must be JSON or a JSON file of TarFlowConfig fields: {e}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--config must be a JSON object of TarFlowConfig fields, got {type(value).__name__}")
    return value


def _numbers(text: str, kind, what: str, positive: bool = True) -> list:
    """Comma-separated numbers from a CLI option, or a one-line error naming the option."""
    from sejd.errors import SejdError
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        raise SejdError(f"{what} must be comma-separated {kind.__name__}s, got {text!r}") from None
    if positive and any(v <= 0 for v in values):
        raise SejdError(f"{what} values must be > 0, got {values}")
    return values


def _positive(value: int, what: str) -> int:
    from sejd.errors import SejdError
    if value < 1:
        raise SejdError(f"{what} must be >= 1, got {value}")
    return value


def _train(a):
    from sejd.model.tarflow import TarFlowConfig
    from sejd.train import train

    shapes = {"digits": (1, 16, 10), "textures": (3, 32, 0)}[a.dataset]
    cfg = TarFlowConfig(in_channels=shapes[0], img_size=a.img_size or shapes[1], patch_size=a.patch_size,
                        channels=a.channels, num_blocks=a.blocks, layers_per_block=a.layers_per_block,
                        head_dim=a.head_dim, nvp=a.nvp, num_classes=shapes[2])
    train(a.dataset, cfg, a.out, steps=a.steps, batch_size=a.batch_size, lr=a.lr, noise_std=a.noise_std,
          drop_label=a.drop_label, ema_decay=a.ema, seed=a.seed, threads=a.threads,
          command="sejd " + shlex.join(a.argv))


def _sample(a):
    import numpy as np
    import torch

    from sejd.runtime.sampler import sample
    from sejd.source import open_source
    from sejd.util import atomic_write, save_grid, write_json

    _positive(a.n, "-n")
    src = open_source(a.source, a.backend, config=_config_arg(a.config))
    cfg = src.model.config
    g = torch.Generator().manual_seed(a.seed)
    noise = torch.randn(a.n, cfg.num_tokens, cfg.token_dim, generator=g)
    labels = None
    if a.label is not None:
        labels = torch.full((a.n,), a.label, dtype=torch.long)
    elif cfg.num_classes:
        labels = torch.arange(a.n) % cfg.num_classes
    plan = src.plan(a.plan, a.n)
    if a.per_sample and plan != "reference":
        for b in plan.blocks:
            if b.decoder == "jacobi":
                b.variant, b.freeze, b.per_sample = "host", False, True
    result = sample(src.model, noise, labels=labels, plan=plan, tau=a.tau,
                    guidance=a.guidance, denoise=a.denoise, runners=src.runners, progress=True)
    print(f"backend {src.backend} ({src.precision})")
    print(result.stats.table())
    if a.out:
        save_grid(result.images, a.out, scale=max(1, 128 // cfg.img_size))
        print(f"wrote {a.out}")
    if a.npy:
        with atomic_write(a.npy, binary=True) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, result.images.numpy())
        print(f"wrote {a.npy}")
    if a.json:
        write_json(a.json, result.stats.to_dict())


def _tune(a):
    from pathlib import Path

    from sejd.source import is_bundle, open_source
    from sejd.tune import TAU_GRID, tune

    src = open_source(a.bundle, a.backend)
    taus = _numbers(a.tau, float, "--tau") if a.tau else TAU_GRID
    _positive(a.batch, "--batch")
    out = a.out or (Path(a.bundle) / "plan.json" if is_bundle(a.bundle) else "plan.json")
    plan = tune(src, batch=a.batch, target_db=a.psnr, taus=taus, guidance=a.guidance, out=out)
    for k, b in enumerate(plan.blocks):
        extra = "" if b.decoder == "sequential" else f" tau={b.tau}" + (" freeze" if b.freeze else "")
        print(f"block {k}: {b.decoder} [{b.variant}]{extra}")
    m = plan.meta
    print(f"calibration {m['calibration']['seconds'] * 1e3:.1f} ms, {m['calibration']['psnr_db']:.1f} dB; "
          f"hold-out {m['holdout']['psnr_db']:.1f} dB (target {a.psnr} dB); wrote {out}")


def _export_triton(a):
    from sejd.serve.triton import export_triton

    d = export_triton(a.bundle, a.out, name=a.name, backend=a.backend, plan=a.plan, max_batch=a.max_batch,
                      instances=a.instances, queue_delay_us=a.queue_delay_us, force=a.force)
    print(f"wrote Triton model {d} (tritonserver --model-repository {a.out})")


def _serve(a):
    from sejd.serve.app import serve_forever

    _positive(a.replicas, "--replicas")
    _positive(a.max_batch, "--max-batch")
    serve_forever(a.source, a.backend, a.replicas, a.max_batch, a.batch_wait_ms, a.host, a.port, a.deadline_s,
                  a.address)


def _bench(a):
    from sejd.bench import bench, plot, table
    from sejd.source import open_source
    from sejd.util import write_json

    src = open_source(a.source, a.backend, config=_config_arg(a.config))
    from sejd.bench import DECODERS
    from sejd.errors import SejdError
    unknown = sorted(set(a.decoders.split(",")) - set(DECODERS))
    if unknown:
        raise SejdError(f"unknown decoders {unknown}; expected a subset of {list(DECODERS)}")
    _positive(a.runs, "--runs")
    result = bench(src, _numbers(a.batch, int, "--batch"), a.decoders.split(","), runs=a.runs,
                   warmup=a.warmup, seed=a.seed, guidance=a.guidance)
    print(table(result))
    if a.json:
        write_json(a.json, result)
        print(f"wrote {a.json}")
    if a.plot:
        plot(result, a.plot)
        print(f"wrote {a.plot}")


def _export(a):
    from sejd.export.exporter import export_bundle

    variants = a.variants.split(",") if a.variants else None
    b = export_bundle(a.source, a.out, variants=variants, unroll=a.unroll, opset=a.opset, batch_max=a.batch_max,
                      force=a.force)
    print(f"wrote bundle {b.path}: {len(b.manifest['graphs'])} graphs ({', '.join(b.variants())}), "
          f"opset {b.manifest['opset']}")


def _build(a):
    from sejd.bundle import load_bundle
    from sejd.engines import build_engines
    from sejd.errors import SejdError

    if a.backend != "tensorrt" and a.workspace is not None:
        raise SejdError(f"--workspace applies to --backend tensorrt only, not {a.backend}")
    out = build_engines(load_bundle(a.bundle), a.backend, a)
    print(f"built {a.backend} engines in {out}")


def _check(a):
    from sejd.bundle import load_bundle
    from sejd.check import check_bundle
    from sejd.util import write_json

    report = check_bundle(load_bundle(a.bundle), a.backend)
    print(report.summary())
    if a.json:
        write_json(a.json, report.to_dict())
    if not report:
        raise SystemExit(1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sejd", description="Fast verified sampling of TarFlow normalizing flows.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="sample images from a checkpoint, builtin model or bundle")
    s.add_argument("source", help="ml-tarflow .pth, sejd checkpoint folder, builtin:NAME, or a bundle folder")
    s.add_argument("--backend", default="auto", help="torch | ort-cpu | ort-cuda | ort-trt | tensorrt | "
                   "torch-cuda[:fp16|:bf16] (auto: ort-cpu for a bundle, torch for a checkpoint)")
    s.add_argument("--config", default=None, help="TarFlowConfig fields as JSON or a JSON file, e.g. '{\"head_dim\": 64}'")
    s.add_argument("-n", type=int, default=16, help="number of samples")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--plan", default=None, help="sequential | ujd | sjd | gs-jacobi | reference | auto | plan.json "
                   "(default: the bundle's tuned plan, else sjd)")
    s.add_argument("--tau", type=float, default=None, help="Jacobi tolerance (infinity norm) for every Jacobi block")
    s.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance weight")
    s.add_argument("--label", type=int, default=None, help="class label for conditional models (-1: unconditional)")
    s.add_argument("--denoise", action="store_true", help="apply TarFlow's self-denoising step")
    s.add_argument("--per-sample", dest="per_sample", action="store_true",
                   help="every Jacobi block stops per sample (what the service runs: results match it bit for bit)")
    s.add_argument("--out", default=None, help="PNG grid to write")
    s.add_argument("--npy", default=None, help="write the images (N, C, H, W) in [-1, 1] as .npy")
    s.add_argument("--json", default=None, help="write per-block statistics as JSON")
    s.set_defaults(func=_sample)

    tu = sub.add_parser("tune", help="choose per block the fastest decoder that keeps PSNR >= target; write plan.json")
    tu.add_argument("bundle", help="bundle folder (or a checkpoint / builtin:NAME for the PyTorch backend)")
    tu.add_argument("--backend", default="auto")
    tu.add_argument("--batch", type=int, default=1)
    tu.add_argument("--psnr", type=float, default=40.0, help="quality target in dB against exact sequential decoding")
    tu.add_argument("--tau", default=None, help="comma-separated tolerance grid to search (default 0.5 ... 0.001)")
    tu.add_argument("--guidance", type=float, default=0.0)
    tu.add_argument("--out", default=None, help="plan file (default BUNDLE/plan.json)")
    tu.set_defaults(func=_tune)

    tr = sub.add_parser("export-triton", help="write a Triton Inference Server model repository serving a bundle")
    tr.add_argument("bundle")
    tr.add_argument("-o", "--out", required=True, help="model repository folder")
    tr.add_argument("--name", default=None, help="model name (default sejd_<bundle folder name>)")
    tr.add_argument("--backend", default="ort-cpu", help="sejd backend inside Triton's Python backend")
    tr.add_argument("--plan", default=None, help="served plan (default: the tuned plan, else sjd)")
    tr.add_argument("--max-batch", dest="max_batch", type=int, default=16)
    tr.add_argument("--instances", type=int, default=1)
    tr.add_argument("--queue-delay-us", dest="queue_delay_us", type=int, default=10000)
    tr.add_argument("--force", action="store_true")
    tr.set_defaults(func=_export_triton)

    sv = sub.add_parser("serve", help="serve sampling over HTTP on Ray Serve (POST /sample, GET /healthz, /metrics)")
    sv.add_argument("source", help="bundle folder (engines), checkpoint or builtin:NAME")
    sv.add_argument("--backend", default="auto")
    sv.add_argument("--replicas", type=int, default=1)
    sv.add_argument("--max-batch", dest="max_batch", type=int, default=16, help="requests batched together at most")
    sv.add_argument("--batch-wait-ms", dest="batch_wait_ms", type=float, default=10.0)
    sv.add_argument("--deadline-s", dest="deadline_s", type=float, default=60.0, help="per-request deadline (504)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--address", default=None, help="Ray cluster address (default: start Ray locally)")
    sv.set_defaults(func=_serve)

    be = sub.add_parser("bench", help="time every decoder side by side (warm-up, median of runs)")
    be.add_argument("source", help="bundle folder (engines), checkpoint or builtin:NAME (PyTorch)")
    be.add_argument("--backend", default="auto")
    be.add_argument("--config", default=None, help=argparse.SUPPRESS)
    be.add_argument("--batch", default="1,16", help="comma-separated batch sizes")
    be.add_argument("--decoders", default=",".join(("reference", "sequential", "ujd", "sjd", "gs-jacobi", "auto")))
    be.add_argument("--runs", type=int, default=5)
    be.add_argument("--warmup", type=int, default=1)
    be.add_argument("--seed", type=int, default=0)
    be.add_argument("--guidance", type=float, default=0.0)
    be.add_argument("--json", default=None, help="write the runs as JSON")
    be.add_argument("--plot", default=None, help="write a PNG: residual per iteration per block, time per block")
    be.set_defaults(func=_bench)

    e = sub.add_parser("export", help="export every block variant to ONNX: a verified bundle folder")
    e.add_argument("source", help="checkpoint, sejd folder or builtin:NAME")
    e.add_argument("-o", "--out", required=True, help="bundle folder to write")
    e.add_argument("--variants", default=None, help="comma-separated subset of: " + ", ".join(_variants()))
    e.add_argument("--unroll", type=int, default=8, help="iterations unrolled in jacobi_k")
    e.add_argument("--opset", type=int, default=18)
    e.add_argument("--batch-max", dest="batch_max", type=int, default=64, help="largest batch engines must serve")
    e.add_argument("--force", action="store_true", help="replace an existing bundle")
    e.set_defaults(func=_export)

    b = sub.add_parser("build", help="build a bundle's graphs into engines for a backend")
    b.add_argument("bundle")
    b.add_argument("--backend", default="ort-cpu", help="ort-cpu | ort-cuda | ort-trt | tensorrt")
    b.add_argument("--threads", type=int, default=None, help="intra-op threads (ONNX Runtime)")
    b.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="fp16/bf16: weights and matrix products in that type, LayerNorm/softmax/exp in fp32")
    b.add_argument("--workspace", type=int, default=None, help="TensorRT workspace in MiB")
    b.set_defaults(func=_build)

    c = sub.add_parser("check", help="compare every graph and every named plan against the PyTorch reference")
    c.add_argument("bundle")
    c.add_argument("--backend", default="ort-cpu")
    c.add_argument("--json", default=None, help="write every check with its figures as JSON")
    c.set_defaults(func=_check)

    t = sub.add_parser("train", help="train a TarFlow on data bundled with installed packages")
    t.add_argument("--dataset", choices=["digits", "textures"], required=True)
    t.add_argument("--out", required=True, help="output folder (resumed if it holds a training state)")
    t.add_argument("--img_size", type=int, default=None)
    t.add_argument("--patch_size", type=int, default=2)
    t.add_argument("--channels", type=int, default=128)
    t.add_argument("--blocks", type=int, default=4)
    t.add_argument("--layers_per_block", type=int, default=2)
    t.add_argument("--head_dim", type=int, default=64)
    t.add_argument("--nvp", action=argparse.BooleanOptionalAction, default=True)
    t.add_argument("--noise_std", type=float, default=0.05)
    t.add_argument("--batch_size", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--drop_label", type=float, default=0.1)
    t.add_argument("--ema", type=float, default=0.999)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=None)
    t.set_defaults(func=_train)
    return p


def _variants():
    from sejd.export.contracts import VARIANTS
    return VARIANTS


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # what this command was called with (recorded by `train`)
    try:
        args.func(args)
    except SejdError as e:
        print(f"sejd: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
