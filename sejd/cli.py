"""The `sejd` command line: thin wrappers over the library.

Results go to stdout; logs (Python `logging`, the "sejd" logger), progress bars and errors to stderr.
Every failure is one line, and the exit status says which kind it was (EXIT_* below).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shlex
import sys
from pathlib import Path

from sejd.core.errors import SejdError
from sejd.core.extras import require as require_extra

EXIT_OK, EXIT_CHECKS_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
EPILOG = """exit status:
  0  success
  1  checks failed (`sejd check`: an engine does not match the PyTorch reference)
  2  usage or input error (one line: `sejd: error: ...`)
  3  internal error (a bug in sejd or a library it uses; -v prints the traceback)"""
log = logging.getLogger("sejd")


class UsageError(SejdError):
    """The command line itself is wrong (argparse's complaint, as a one-line error)."""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown on every option; the epilog's table keeps its lines."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage and exits; sejd errors are one line
        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


# ---------------------------------------------------------------------------------------------- values


def _config_arg(text):
    """--config: inline JSON or a JSON file of TarFlowConfig fields (for .pth files without a telling name)."""
    if text is None:
        return None
    from sejd.core.errors import ConfigError
    from sejd.core.files import read_json

    if text.endswith((".yaml", ".yml")):  # ml-starflow's own config file: its loader parses it
        if not Path(text).is_file():
            raise ConfigError(f"--config {text}: no such YAML file")
        return text
    # inline JSON is never taken for a path (a long one is no valid file name)
    if not text.lstrip().startswith("{") and Path(text).is_file():
        value = read_json(text, "--config file", ConfigError)
    else:
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise ConfigError(f"--config must be JSON or a JSON file of model config fields: {e}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--config must be a JSON object of model config fields, got {type(value).__name__}")
    return value


def _numbers(text: str, kind, what: str, positive: bool = True) -> list:
    """Comma-separated numbers from a CLI option, or a one-line error naming the option."""
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        raise SejdError(f"{what} must be comma-separated {kind.__name__}s, got {text!r}") from None
    if positive and any(not v > 0 or not math.isfinite(v) for v in values):
        raise SejdError(f"{what} values must be > 0 and finite, got {values}")
    return values


def _positive(value: int, what: str) -> int:
    if value < 1:
        raise SejdError(f"{what} must be >= 1, got {value}")
    return value


def _finite(value: float, what: str, low: float = -math.inf, low_ok: bool = True) -> float:
    """A finite number above `low` (or at it, when `low_ok`), else a one-line error naming the option."""
    if not math.isfinite(value) or value < low or (value == low and not low_ok):
        bound = "" if low == -math.inf else f" {'>=' if low_ok else '>'} {low:g}"
        raise SejdError(f"{what} must be a finite number{bound}, got {value}")
    return value


def _seed(value: int, what: str = "--seed") -> int:
    from sejd.runtime.request import check_seed
    try:
        return check_seed(value)
    except SejdError as e:
        raise SejdError(f"{what}: {e}") from None


def _guidance(value: float) -> float:
    from sejd.runtime.request import GUIDANCE_MAX

    if not (math.isfinite(value) and 0.0 <= value <= GUIDANCE_MAX):
        raise SejdError(f"--guidance must be a finite number from 0 to {GUIDANCE_MAX:g}, got {value:g}")
    return value


def _outputs(a, source, outputs, plan_file: bool = False, writes_inside=()) -> None:
    """The one output rule (`sejd.export.outputs.check_outputs`) for a command reading `source` (and its --config, and
    --plan when `plan_file`): called before any model is loaded. `outputs`: (option, path[, kind])."""
    from sejd.export.outputs import (
        Output,
        check_outputs,
        file_input,
        source_inputs,
    )

    inputs = [] if source is None else source_inputs(source)
    inputs = [dataclasses.replace(i, writes_inside=writes_inside) for i in inputs]
    inputs += file_input("--config", getattr(a, "config", None))
    if plan_file:
        inputs += file_input("--plan", a.plan)
    check_outputs(inputs, [Output(*o) for o in outputs])


def _open(source, backend: str, config_text):
    from sejd.workflows.source import open_source

    config = _config_arg(config_text)
    log.debug("opening %s on backend %s", source, backend)
    return open_source(source, backend, config=config)


def _show_progress(a) -> bool:
    return not (a.no_progress or a.quiet)


# -------------------------------------------------------------------------------------------- commands


def _train(a):
    from sejd.workflows.data import DATASET_PACKAGES

    _positive(a.steps, "--steps")
    _positive(a.batch_size, "--batch-size")
    _finite(a.lr, "--lr", 0.0, low_ok=False)
    _finite(a.noise_std, "--noise-std", 0.0)
    _seed(a.seed)
    _outputs(a, None, [("--out", a.out, "into")])
    from sejd.workflows.train import check_train_out

    check_train_out(a.out, a.force)  # before the data is read or a step is taken
    require_extra(DATASET_PACKAGES[a.dataset], f"`sejd train --dataset {a.dataset}`")
    from sejd.model.tarflow import TarFlowConfig
    from sejd.workflows.train import train

    shapes = {"digits": (1, 16, 10), "textures": (3, 32, 0)}[a.dataset]
    cfg = TarFlowConfig(in_channels=shapes[0], img_size=a.img_size or shapes[1], patch_size=a.patch_size,
                        channels=a.channels, num_blocks=a.blocks, layers_per_block=a.layers_per_block,
                        head_dim=a.head_dim, nvp=a.nvp, num_classes=shapes[2])
    train(a.dataset, cfg, a.out, steps=a.steps, batch_size=a.batch_size, lr=a.lr, noise_std=a.noise_std,
          drop_label=a.drop_label, ema_decay=a.ema, seed=a.seed, threads=a.threads,
          command="sejd " + shlex.join(a.argv), force=a.force)


def _sample(a):
    import numpy as np

    from sejd.core.files import atomic_write, write_json
    from sejd.core.util import save_grid
    from sejd.runtime.request import per_sample_plan, seeded_labels, seeded_noise
    from sejd.runtime.sampler import sample

    _seed(a.seed)
    _positive(a.n, "-n")
    _guidance(a.guidance)
    _finite(a.attn_temp, "--attn-temp", 0.0, low_ok=False)
    if a.tau is not None:
        _finite(a.tau, "--tau", 0.0)
    _outputs(a, a.source, [("--out", a.out), ("--npy", a.npy), ("--json", a.json)], plan_file=True)
    _refuse_above_batch_max(a.source, a.backend, a.n)
    src = _open(a.source, a.backend, a.config)
    cfg = src.model.config
    if hasattr(cfg, "text_block"):  # a StarFlow: text in, latents (or images through a VAE) out
        return _sample_starflow(a, src)
    for flag in ("text_embeddings", "uncond_text_embeddings", "prompt", "text_encoder", "vae"):
        if getattr(a, flag) is not None:
            raise SejdError(f"--{flag.replace('_', '-')} is for STARFlow models; {a.source} is a TarFlow")
    noise = seeded_noise(a.n, a.seed, cfg.num_tokens, cfg.token_dim)
    labels = seeded_labels(a.n, a.label, cfg.num_classes)
    plan = src.plan(a.plan, a.n)
    if a.per_sample:
        plan = per_sample_plan(plan)
    result = sample(src.model, noise, labels=labels, plan=plan, tau=a.tau, guidance=a.guidance,
                    guide_what=a.guide_what, attn_temp=a.attn_temp, annealed_guidance=a.annealed_guidance,
                    denoise=a.denoise, runners=src.runners, progress=_show_progress(a))
    print(f"backend {src.backend} ({src.precision})")
    print(result.stats.table())
    print(f"peak resident memory {result.stats.peak_rss_bytes / 2**30:.2f} GiB")
    if a.out:
        save_grid(result.images, a.out, scale=max(1, 128 // cfg.img_size))
        print(f"wrote {a.out}")
    if a.npy:
        with atomic_write(a.npy) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, result.images.numpy())
        print(f"wrote {a.npy}")
    if a.json:
        from sejd.workflows.bench import REFERENCE_PATH

        path = REFERENCE_PATH if str(plan) == "reference" else src.single_token_path
        write_json(a.json, dict(result.stats.to_dict(), single_token_path=path))
        print(f"wrote {a.json}")


def _sample_starflow(a, src):
    """`sejd sample` on a STARFlow: text embeddings (a file, or prompts through a local T5 encoder), the
    unconditional text for guidance, then latents, decoded to images when a local VAE is given."""
    import numpy as np

    from sejd.core.files import atomic_write, write_json
    from sejd.core.util import save_grid
    from sejd.runtime.request import seeded_noise
    from sejd.runtime.sampler import sample
    from sejd.workflows.text import TextEncoder, load_text_embeddings, unconditional_embedding
    from sejd.workflows.vae import latents_or_images

    model, cfg = src.model, src.model.config
    for flag, default in (("label", None), ("per_sample", False), ("denoise", False), ("guide_what", "ab"),
                          ("annealed_guidance", False), ("attn_temp", 1.0)):
        if getattr(a, flag) != default:
            raise SejdError(f"--{flag.replace('_', '-')} is for TarFlow models; STARFlow samples from text "
                            f"(ml-starflow has no such option)")
    if a.out and a.vae is None:  # before any work
        raise SejdError("--out writes images: give --vae DIR (a local SD-VAE folder; pip install 'sejd[vae]'), "
                        "or --npy to keep the latents")
    Lt, Dt = cfg.txt_size, cfg.txt_dim
    if cfg.text_block is None:
        text = uncond = None
        if a.text_embeddings or a.prompt:
            raise SejdError(f"{a.source} has no text block: it takes no text")
    else:
        if (a.text_embeddings is None) == (not a.prompt):
            raise SejdError("a STARFlow samples from text: give --text-embeddings FILE.npy (n or 1 rows of "
                            f"({Lt}, {Dt})) or --prompt TEXT with --text-encoder DIR (a local T5 encoder)")
        encoder = None
        if a.prompt:
            if a.text_encoder is None:
                raise SejdError("--prompt needs --text-encoder DIR: a local T5 encoder folder (sejd never "
                                "downloads); or give --text-embeddings FILE.npy")
            encoder = TextEncoder(a.text_encoder)
            text = encoder.encode(list(a.prompt), Lt)
        else:
            text = load_text_embeddings(a.text_embeddings, Lt, Dt)
        if text.shape[-1] != Dt:
            raise SejdError(f"the text embeddings are {text.shape[-1]} wide; this model's text block takes {Dt}")
        if text.shape[0] not in (1, a.n):
            raise SejdError(f"{text.shape[0]} text rows for -n {a.n}: give one row per sample, or one for all")
        text = text.expand(a.n, -1, -1) if text.shape[0] == 1 else text
        if a.uncond_text_embeddings is not None:
            uncond = load_text_embeddings(a.uncond_text_embeddings, Lt, Dt)[0]  # (Lt, Dt): every sample's
        else:  # Apple's unconditional text is the encoding of "": the encoder's when there is one, else zeros
            uncond = unconditional_embedding(Lt, Dt, encoder)[0]
            if a.guidance > 0 and encoder is None:
                log.warning("guidance without --uncond-text-embeddings: the unconditional text is zeros, not "
                            "the encoder's encoding of \"\" (ml-starflow's); pass it for Apple's results")
    noise = seeded_noise(a.n, a.seed, cfg.num_tokens, cfg.token_dim)
    plan = src.plan(a.plan, a.n)
    result = sample(model, noise, plan=plan, tau=a.tau, guidance=a.guidance, runners=src.runners, text=text,
                    uncond_text=uncond, progress=_show_progress(a))
    print(f"backend {src.backend} ({src.precision})")
    print(result.stats.table())
    latents = result.images
    images = latents_or_images(latents, a.vae)
    if a.out:
        save_grid(images, a.out, scale=1)
        print(f"wrote {a.out}")
    if a.npy:
        with atomic_write(a.npy) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, (images if a.vae else latents).numpy())
        print(f"wrote {a.npy} ({'images' if a.vae else 'latents'} {tuple((images if a.vae else latents).shape)})")
    if a.json:
        write_json(a.json, dict(result.stats.to_dict(), single_token_path=src.single_token_path))
        print(f"wrote {a.json}")


def _refuse_above_batch_max(source, backend: str, n: int) -> None:
    """A bundle's engines take at most its batch_max samples per call: more is refused before any engine is
    opened or any noise drawn (the manifest is read unverified here; opening the bundle verifies it)."""
    from sejd.engines.backends import backend as find_backend
    from sejd.export.bundle import load_bundle
    from sejd.workflows.source import is_bundle

    if not is_bundle(source) or (backend != "auto" and not find_backend(backend)[0].needs_build):
        return
    batch_max = load_bundle(source, verify=False).batch_max
    if n > batch_max:
        raise SejdError(f"-n {n} is above the bundle's batch_max {batch_max} (the largest batch its engines "
                        f"serve); sample at most {batch_max} at a time, or re-export with a larger --batch-max")


def _config_kwargs(text) -> dict:
    """--config as a keyword argument, only when given: the model config reaches load_checkpoint there."""
    config = _config_arg(text)
    return {} if config is None else {"config": config}


def _tune(a):
    from sejd.workflows.source import is_bundle
    from sejd.workflows.tune import TAU_GRID, tune

    _positive(a.batch, "--batch")
    _finite(a.psnr, "--psnr", 0.0, low_ok=False)
    _guidance(a.guidance)
    taus = _numbers(a.tau, float, "--tau") if a.tau else TAU_GRID
    out = a.out or (Path(a.bundle) / "plan.json" if is_bundle(a.bundle) else "plan.json")
    # tune writes a bundle's plan.json and plans/batch-N.json by design, nothing else inside any input
    _outputs(a, a.bundle, [("--out", out)], writes_inside=("plan.json", "plans") if is_bundle(a.bundle) else ())
    src = _open(a.bundle, a.backend, a.config)
    text = None
    if a.text_embeddings is not None:
        cfg = src.model.config
        if getattr(cfg, "text_block", None) is None:
            raise SejdError(f"--text-embeddings is for text-conditioned STARFlow models; {a.bundle} takes no text")
        from sejd.workflows.text import load_text_embeddings

        text = load_text_embeddings(a.text_embeddings, cfg.txt_size, cfg.txt_dim)
    plan = tune(src, batch=a.batch, target_db=a.psnr, taus=taus, guidance=a.guidance, out=out, text=text)
    for k, b in enumerate(plan.blocks):
        extra = "" if b.decoder == "sequential" else f" tau={b.tau}" + (" freeze" if b.freeze else "")
        print(f"block {k}: {b.decoder} [{b.variant}]{extra}")
    m = plan.meta
    print(f"calibration {m['calibration']['seconds'] * 1e3:.1f} ms, {m['calibration']['psnr_db']:.1f} dB; "
          f"hold-out {m['holdout']['psnr_db']:.1f} dB (target {a.psnr} dB); wrote {out}")


def _export_triton(a):
    _positive(a.max_batch, "--max-batch")
    _positive(a.instances, "--instances")
    require_extra("tritonclient", "`sejd export-triton`")
    from sejd.serve.triton import export_triton

    d = export_triton(a.bundle, a.out, name=a.name, backend=a.backend, plan=a.plan,
                      max_batch=_positive(a.max_batch, "--max-batch"), instances=_positive(a.instances, "--instances"),
                      queue_delay_us=a.queue_delay_us, force=a.force)
    print(f"wrote Triton model {d} (tritonserver --model-repository {a.out})")


def _serve(a):
    _positive(a.replicas, "--replicas")
    _positive(a.max_batch, "--max-batch")
    if not 1 <= a.port <= 65535:  # argument checking, before Ray is imported (preflight also binds it)
        raise SejdError(f"--port must be a TCP port 1..65535, got {a.port}")
    _finite(a.batch_wait_ms, "--batch-wait-ms", 0.0)
    _finite(a.deadline_s, "--deadline-s", 0.0, low_ok=False)
    config = _config_kwargs(a.config)  # for the replicas' open_source
    _outputs(a, a.source, [])  # a builtin: name that is no shipped model is refused before Ray starts
    from sejd.serve.app import serve_forever

    serve_forever(a.source, a.backend, a.replicas, a.max_batch, a.batch_wait_ms, a.host, a.port, a.deadline_s,
                  a.address, dashboard=a.dashboard, read_timeout_s=a.read_timeout_s, text_encoder=a.text_encoder,
                  vae=a.vae, **config)


def _bench(a):
    from sejd.core.files import write_json
    from sejd.workflows.bench import DECODERS, bench, plot, table

    unknown = sorted(set(a.decoders.split(",")) - set(DECODERS))
    if unknown:
        raise SejdError(f"unknown decoders {unknown}; expected a subset of {list(DECODERS)}")
    _positive(a.runs, "--runs")
    if a.warmup < 0:
        raise SejdError(f"--warmup must be >= 0, got {a.warmup}")
    batches = _numbers(a.batch, int, "--batch")
    _seed(a.seed)
    _guidance(a.guidance)
    _outputs(a, a.source, [("--json", a.json), ("--plot", a.plot)])
    src = _open(a.source, a.backend, a.config)
    def log(line):  # the table ends with the warnings: not printed twice
        if not line.startswith("bench: warning: "):
            print(line)

    result = bench(src, batches, a.decoders.split(","), runs=a.runs, warmup=a.warmup, seed=a.seed, guidance=a.guidance,
                   log=log)
    print(table(result))
    if a.json:
        write_json(a.json, result)
        print(f"wrote {a.json}")
    if a.plot:
        plot(result, a.plot)
        print(f"wrote {a.plot}")


def _analyze(a):
    from sejd.core.files import write_json
    from sejd.workflows.analyze import analyze, json_safe, table

    _positive(a.batch, "--batch")
    _seed(a.seed)
    _finite(a.psnr, "--psnr", 0.0, low_ok=False)
    _finite(a.nll_tol, "--nll-tol", 0.0, low_ok=False)
    if a.pass_cost is not None:
        _finite(a.pass_cost, "--pass-cost", 0.0, low_ok=False)
    plots = []
    if a.plot:  # plot_all writes PLOT and, beside it, PLOT_redundancy.png and PLOT_profile.png
        stem = Path(a.plot).with_suffix("")
        plots = [("--plot", a.plot)] + [("--plot", Path(f"{stem}_{kind}.png")) for kind in ("redundancy", "profile")]
    _outputs(a, a.source, [("--json", a.json)] + plots, plan_file=True)
    if a.plan is not None and str(a.plan).endswith(".json"):
        from sejd.workflows.source import read_plan_file
        read_plan_file(a.plan)  # refused now, not after the redundancy sweep
    src = _open(a.source, a.backend, a.config)
    result = json_safe(analyze(src, str(a.source), batch=a.batch, quick=a.quick, psnr=a.psnr, nll_tol=a.nll_tol,
                               plan=a.plan, seed=a.seed, pass_in_steps=a.pass_cost))
    print(table(result))
    if a.json:
        write_json(a.json, result)
        print(f"wrote {a.json}")
    if a.plot:
        from sejd.workflows.analysis.plots import plot_all
        print("wrote " + ", ".join(str(p) for p in plot_all(result, a.plot)))


def _export(a):
    from sejd.export.contracts import VARIANTS
    from sejd.export.exporter import export_bundle

    variants = None if not a.variants else VARIANTS if a.variants == "all" else a.variants.split(",")
    _outputs(a, a.source, [("-o", a.out, "folder")])
    b = export_bundle(a.source, a.out, variants=variants, unroll=a.unroll, opset=a.opset, batch_max=a.batch_max,
                      force=a.force, show_progress=_show_progress(a), **_config_kwargs(a.config))
    print(f"wrote bundle {b.path}: {len(b.manifest['graphs'])} graphs ({', '.join(b.variants())}), "
          f"opset {b.manifest['opset']}")


def _build(a):
    from sejd.engines.backends import backend as find_backend
    from sejd.export.bundle import load_bundle

    for option, given in (("--workspace", a.workspace is not None), ("--strip-weights", a.strip_weights)):
        if given and a.backend != "tensorrt":
            raise SejdError(f"{option} applies to --backend tensorrt only, not {a.backend}")
    if a.threads is not None:
        _positive(a.threads, "--threads")
    out = find_backend(a.backend)[0].build(load_bundle(a.bundle), precision=a.precision, threads=a.threads,
                                           workspace=a.workspace, strip_weights=a.strip_weights)
    print(f"built {a.backend} engines in {out}")


def _check(a):
    import copy

    from sejd.core.files import write_json
    from sejd.workflows.check import CheckOptions, check_bundle, check_source
    from sejd.workflows.source import is_bundle

    options = CheckOptions(atol=None if a.atol is None else _finite(a.atol, "--atol", 0.0),
                           rtol=None if a.rtol is None else _finite(a.rtol, "--rtol", 0.0), seed=_seed(a.seed),
                           plans=None if a.plans is None else _list_or_none(a.plans), graphs=a.graphs, quick=a.quick,
                           save_failures=a.save_failures, polygraphy_log=a.verbose > 0,
                           show_progress=_show_progress(a))
    _outputs(a, a.source, [("--json", a.json), ("--save-failures", a.save_failures, "into")])
    if is_bundle(a.source):
        from sejd.export.bundle import load_bundle
        from sejd.workflows.source import refuse_config_for_bundle

        refuse_config_for_bundle(a.source, _config_arg(a.config))
        report = check_bundle(load_bundle(a.source), "ort-cpu" if a.backend == "auto" else a.backend,
                              options=options)
    else:  # a checkpoint: the PyTorch reference or torch-cuda's graph modules
        src = _open(a.source, a.backend, a.config)
        reference = copy.deepcopy(src.model).cpu() if src.runners is not None else src.model
        report = check_source(src, reference, options, engine_model=src.model)
    print(report.summary())
    if a.json:
        write_json(a.json, report.to_dict())
        print(f"wrote {a.json}")
    return EXIT_OK if report else EXIT_CHECKS_FAILED


def _list_or_none(text: str) -> tuple:
    return () if text == "none" else tuple(p.strip() for p in text.split(","))


# ---------------------------------------------------------------------------------------------- parser

BACKEND_HELP = ("torch | ort-cpu | ort-cuda | ort-trt | tensorrt | torch-cuda[:fp16|:bf16] "
                "(auto: ort-cpu for a bundle, torch for a checkpoint)")
CONFIG_HELP = ("model config for a .pth checkpoint: TarFlowConfig fields as JSON or a JSON file, e.g. "
               "'{\"head_dim\": 64}' (bundles carry their own)")


def _option(p, *flags, aliases=(), **kw):
    """An option, plus ml-tarflow's spellings of it as hidden aliases (same destination)."""
    action = p.add_argument(*flags, **kw)
    if aliases:
        hidden = {k: v for k, v in kw.items() if k in ("type", "action", "choices", "nargs")}
        p.add_argument(*aliases, dest=action.dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **hidden)
    return action


def _global_options(p, at_top: bool) -> None:
    """-v/-q/--no-progress, before the command (`sejd -v check`) or after it (`sejd check -v`). After the
    command their defaults are SUPPRESS, so they do not overwrite what was given before it."""
    def default(value):
        return {"default": value} if at_top else {"default": argparse.SUPPRESS}
    shown = "" if at_top else " (default: off)"
    p.add_argument("-v", "--verbose", action="count", help="more detail on stderr: debug logs, Polygraphy's log in "
                   "`check`, the traceback of an internal error" + shown, **default(0))
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr, no progress "
                   "bars" + shown, **default(False))
    p.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bars (they are off "
                   "anyway when stderr is not a terminal)" + shown, **default(False))


def _command(sub, name: str, help: str, func):
    p = sub.add_parser(name, help=help, description=help, formatter_class=_Formatter)
    _global_options(p, at_top=False)
    p.set_defaults(func=func)
    return p


def _add_sample(sub):
    s = _command(sub, "sample", "sample images from a checkpoint, builtin model or bundle", _sample)
    s.add_argument("source", help="ml-tarflow .pth, sejd checkpoint folder, builtin:NAME, or a bundle folder")
    s.add_argument("--backend", default="auto", help=BACKEND_HELP)
    s.add_argument("--config", default=None, help=CONFIG_HELP)
    s.add_argument("-n", type=int, default=16, help="number of samples")
    s.add_argument("--seed", type=int, default=0, help="noise seed (0..2**63-1): the same seed gives the same images")
    s.add_argument("--plan", default=None, help="sequential | ujd | sjd | gs-jacobi | reference | auto | plan.json "
                   "(None: the bundle's tuned plan, else sjd)")
    s.add_argument("--tau", type=float, default=None, help="Jacobi tolerance (infinity norm) for every Jacobi block "
                   "(None: the plan's)")
    s.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance weight")
    s.add_argument("--guide-what", dest="guide_what", default="ab", choices=["a", "b", "ab"],
                   help="which affine parameters guidance applies to, as in ml-tarflow: a (shift), b (scale), ab")
    s.add_argument("--attn-temp", dest="attn_temp", type=float, default=1.0,
                   help="attention temperature of the unconditional guidance rows (ml-tarflow's attn_temp)")
    s.add_argument("--annealed-guidance", dest="annealed_guidance", action="store_true",
                   help="ramp the guidance weight up over the tokens (ml-tarflow's annealed_guidance)")
    s.add_argument("--label", type=int, default=None, help="class label for conditional models (-1: unconditional; "
                   "None: classes in turn)")
    s.add_argument("--denoise", action="store_true", help="apply TarFlow's self-denoising step")
    s.add_argument("--per-sample", dest="per_sample", action="store_true",
                   help="every Jacobi block stops per sample (what the service runs: results match it bit for bit)")
    st = s.add_argument_group("STARFlow (text to image)")
    st.add_argument("--text-embeddings", dest="text_embeddings", default=None,
                    help="the prompts' text-encoder embeddings, .npy of (n or 1, txt_size, txt_dim)")
    st.add_argument("--uncond-text-embeddings", dest="uncond_text_embeddings", default=None,
                    help="guidance's unconditional text, .npy of (txt_size, txt_dim): ml-starflow uses the "
                    "encoding of \"\" (default: the --text-encoder's, else zeros)")
    st.add_argument("--prompt", action="append", default=None, help="a prompt (repeat per sample), encoded "
                    "with --text-encoder")
    st.add_argument("--text-encoder", dest="text_encoder", default=None,
                    help="local folder of a T5 encoder + tokenizer (pip install 'sejd[text]'; never downloads)")
    st.add_argument("--vae", default=None, help="local SD-VAE folder to decode latents into images "
                    "(pip install 'sejd[vae]'); without it STARFlow writes latents")
    s.add_argument("--out", default=None, help="PNG grid to write")
    s.add_argument("--npy", default=None, help="write the images (N, C, H, W) in [-1, 1] as .npy (STARFlow "
                   "without --vae: the latents)")
    s.add_argument("--json", default=None, help="write per-block statistics as JSON")


def _add_tune(sub):
    tu = _command(sub, "tune", "choose per block the fastest decoder that keeps PSNR >= target; write plan.json", _tune)
    tu.add_argument("bundle", help="bundle folder (or a checkpoint / builtin:NAME for the PyTorch backend)")
    tu.add_argument("--backend", default="auto", help=BACKEND_HELP)
    tu.add_argument("--config", default=None, help=CONFIG_HELP)
    tu.add_argument("--batch", type=int, default=1, help="batch size the plan is tuned for")
    tu.add_argument("--psnr", type=float, default=40.0, help="quality target in dB against exact sequential "
                    "decoding (finite, > 0)")
    tu.add_argument("--tau", default=None, help="comma-separated tolerance grid to search (None: 0.5 ... 0.001)")
    tu.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance weight to tune at")
    tu.add_argument("--out", default=None, help="plan file (None: BUNDLE/plan.json, or plan.json for a checkpoint)")
    tu.add_argument("--text-embeddings", dest="text_embeddings", default=None,
                    help="STARFlow: calibration text embeddings, .npy of (n, txt_size, txt_dim), used in turn "
                    "(None: seeded random stand-ins; your prompts' embeddings tune for your prompts)")


def _add_export_triton(sub):
    tr = _command(sub, "export-triton", "write a Triton Inference Server model repository serving a bundle",
                  _export_triton)
    tr.add_argument("bundle", help="bundle folder")
    tr.add_argument("-o", "--out", required=True, help="model repository folder")
    tr.add_argument("--name", default=None, help="model name (None: sejd_<bundle folder name>)")
    tr.add_argument("--backend", default="ort-cpu", help="sejd backend inside Triton's Python backend")
    tr.add_argument("--plan", default=None, help="served plan (None: the tuned plan, else sjd)")
    tr.add_argument("--max-batch", dest="max_batch", type=int, default=16, help="Triton's max_batch_size")
    tr.add_argument("--instances", type=int, default=1, help="model instances (Triton instance_group count)")
    tr.add_argument("--queue-delay-us", dest="queue_delay_us", type=int, default=10000,
                    help="Triton's dynamic batcher max_queue_delay_microseconds")
    tr.add_argument("--force", action="store_true", help="replace an existing model folder, only one sejd "
                    "exported")


def _add_serve(sub):
    sv = _command(sub, "serve", "serve sampling over HTTP on Ray Serve (POST /sample, GET /healthz, /metrics)", _serve)
    sv.add_argument("source", help="bundle folder (engines), checkpoint or builtin:NAME")
    sv.add_argument("--backend", default="auto", help=BACKEND_HELP)
    sv.add_argument("--config", default=None, help=CONFIG_HELP)
    sv.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (each builds its own engines)")
    sv.add_argument("--max-batch", dest="max_batch", type=int, default=16, help="requests batched together at most")
    sv.add_argument("--batch-wait-ms", dest="batch_wait_ms", type=float, default=10.0,
                    help="how long a batch waits for more requests")
    sv.add_argument("--deadline-s", dest="deadline_s", type=float, default=60.0, help="per-request deadline (504)")
    sv.add_argument("--read-timeout-s", dest="read_timeout_s", type=float, default=10.0,
                    help="seconds a client may take to send a request's headers, then its body (408)")
    sv.add_argument("--host", default="127.0.0.1", help="interface the HTTP proxy binds to")
    sv.add_argument("--port", type=int, default=8000, help="HTTP port (1..65535)")
    sv.add_argument("--address", default=None, help="Ray cluster address (None: start Ray locally)")
    sv.add_argument("--dashboard", action="store_true", help="start Ray's dashboard (bound to --host)")
    sv.add_argument("--text-encoder", dest="text_encoder", default=None, help="STARFlow: local folder of a T5 "
                    "encoder + tokenizer, for requests with a prompt (pip install 'sejd[text]'; never downloads)")
    sv.add_argument("--vae", default=None, help="STARFlow: local SD-VAE folder, for format png (images decoded "
                    "from the latents; pip install 'sejd[vae]'; never downloads)")


def _add_bench(sub):
    from sejd.workflows.bench import DECODERS

    be = _command(sub, "bench", "time every decoder side by side in interleaved rounds (median, min, spread; "
                  "warns when rows are noisy or the machine was loaded)", _bench)
    be.add_argument("source", help="bundle folder (engines), checkpoint or builtin:NAME (PyTorch)")
    be.add_argument("--backend", default="auto", help=BACKEND_HELP)
    be.add_argument("--config", default=None, help=CONFIG_HELP)
    be.add_argument("--batch", default="1,16", help="comma-separated batch sizes")
    be.add_argument("--decoders", default=",".join(DECODERS), help="comma-separated subset of " + ", ".join(DECODERS))
    be.add_argument("--runs", type=int, default=5, help="timed rounds per batch; each round runs every decoder "
                    "once, starting one decoder later than the round before (median, min and spread are reported)")
    be.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    be.add_argument("--seed", type=int, default=0, help="noise seed")
    be.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance weight")
    be.add_argument("--json", default=None, help="write the runs as JSON")
    be.add_argument("--plot", default=None, help="write a PNG: residual per iteration per block, time per block")


def _add_analyze(sub):
    from sejd.workflows.analyze import NLL_TOL, PSNR_TARGET

    an = _command(sub, "analyze", "per block: dependency redundancy (attention window), Jacobi convergence "
                  "profile, and the decoder they predict next to the tuned plan", _analyze)
    an.add_argument("source", help="ml-tarflow .pth, sejd checkpoint folder, builtin:NAME, or a bundle folder")
    an.add_argument("--backend", default="auto", help="backend of the Jacobi profile (redundancy runs on PyTorch: "
                    "engines have no attention-window input)")
    an.add_argument("--config", default=None, help=CONFIG_HELP)
    an.add_argument("--batch", type=int, default=1, help="images decoded per measurement; the tuned plan for the "
                    "nearest batch is compared")
    an.add_argument("--quick", action="store_true", help="window grid 1, 4, 16, ..., T and 16 NLL images")
    an.add_argument("--psnr", type=float, default=PSNR_TARGET, help="PSNR tolerance / target in dB")
    an.add_argument("--nll-tol", dest="nll_tol", type=float, default=NLL_TOL, help="NLL tolerance, nats/dim")
    an.add_argument("--plan", default=None, help="plan file to compare with (None: the bundle's tuned plan)")
    an.add_argument("--pass-cost", dest="pass_cost", type=float, default=None, help="cost of a Jacobi pass in "
                    "sequential steps (None: measured here; e.g. another machine's ratio)")
    an.add_argument("--seed", type=int, default=0, help="noise and data seed")
    an.add_argument("--json", default=None, help="write every measurement as JSON")
    an.add_argument("--plot", default=None, help="summary PNG (and PLOT_redundancy.png, PLOT_profile.png)")


def _add_export(sub):
    from sejd.export.contracts import DEFAULT_VARIANTS, VARIANTS

    e = _command(sub, "export", "export the block graphs to ONNX: a verified bundle folder", _export)
    e.add_argument("source", help="checkpoint, sejd folder or builtin:NAME")
    e.add_argument("-o", "--out", required=True, help="bundle folder to write")
    e.add_argument("--config", default=None, help=CONFIG_HELP)
    e.add_argument("--variants", default=None, help=f"comma-separated subset of: {', '.join(VARIANTS)}, or 'all' "
                   f"(default: {','.join(DEFAULT_VARIANTS)}, the graphs tuned plans run)")
    e.add_argument("--unroll", type=int, default=8, help="iterations unrolled in jacobi_k")
    e.add_argument("--opset", type=int, default=18, help="ONNX opset (17..21)")
    e.add_argument("--batch-max", dest="batch_max", type=int, default=64, help="largest batch engines must serve")
    e.add_argument("--force", action="store_true", help="replace an existing bundle, only one whose manifest "
                   "verifies")


def _add_build(sub):
    b = _command(sub, "build", "build a bundle's graphs into engines for a backend", _build)
    b.add_argument("bundle", help="bundle folder")
    b.add_argument("--backend", default="ort-cpu", help="ort-cpu | ort-cuda | ort-trt | tensorrt")
    b.add_argument("--threads", type=int, default=None, help="intra-op threads (ONNX Runtime; None: its default)")
    b.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="fp16/bf16: weights and matrix products in that type, LayerNorm/softmax/exp in fp32")
    b.add_argument("--workspace", type=int, default=None, help="TensorRT workspace in MiB (None: TensorRT's default)")
    b.add_argument("--strip-weights", dest="strip_weights", action="store_true",
                   help="TensorRT: weight-stripped plans, refitted from the bundle's weights when loaded")


def _add_check(sub):
    from sejd.workflows.check import PLAN_CHOICES, QUICK_GRAPHS, QUICK_PLANS

    c = _command(sub, "check", "compare every graph and every plan of a backend against the PyTorch reference "
                 "(exit status 1 when one does not match)", _check)
    c.add_argument("source", help="bundle folder (or a checkpoint / builtin:NAME for torch and torch-cuda)")
    c.add_argument("--backend", default="auto", help=BACKEND_HELP)
    c.add_argument("--config", default=None, help=CONFIG_HELP)
    c.add_argument("--atol", type=float, default=None, help="absolute tolerance for every graph output (None: each "
                   "graph contract's tolerance at the engines' precision)")
    c.add_argument("--rtol", type=float, default=None, help="relative tolerance (None: 0; an element passes when "
                   "within atol or rtol)")
    c.add_argument("--seed", type=int, default=0, help="seed of the graph inputs and of the plans' noise")
    c.add_argument("--plans", default=None, help=f"comma list of {', '.join(PLAN_CHOICES)} to sample end to end, or "
                   "none for graphs only (None: sequential, ujd, sjd, gs-jacobi, and auto when tuned; with --quick: "
                   f"{', '.join(QUICK_PLANS)} and auto)")
    c.add_argument("--graphs", default=None, help="all, none (plans only), or a comma list of selectors: VARIANT "
                   "(step_rows,jacobi), block:K, block:K:VARIANT (None: all; with --quick: "
                   f"{', '.join(QUICK_GRAPHS)})")
    c.add_argument("--quick", action="store_true", help="for published-size models: graphs on batch 1 with and "
                   "without guidance rows, one seed, single-pass graphs only; plans at batch 1")
    c.add_argument("--save-failures", dest="save_failures", default=None, help="folder for a failing graph's inputs "
                   "and outputs (Polygraphy JSON) (None: a new temporary folder, named in the output)")
    c.add_argument("--json", default=None, help="write every check with its figures as JSON")


def _add_train(sub):
    t = _command(sub, "train", "train a TarFlow on data bundled with installed packages (pip install 'sejd[train]')",
                 _train)
    t.add_argument("--dataset", choices=["digits", "textures"], required=True, help="training data")
    t.add_argument("--out", required=True, help="output folder (resumed if it holds a training state)")
    _option(t, "--img-size", dest="img_size", type=int, default=None, aliases=("--img_size",),
            help="image side (None: the dataset's)")
    _option(t, "--patch-size", dest="patch_size", type=int, default=2, aliases=("--patch_size",), help="patch side")
    t.add_argument("--channels", type=int, default=128, help="transformer width")
    t.add_argument("--blocks", type=int, default=4, help="flow blocks")
    _option(t, "--layers-per-block", dest="layers_per_block", type=int, default=2, aliases=("--layers_per_block",),
            help="transformer layers per flow block")
    _option(t, "--head-dim", dest="head_dim", type=int, default=64, aliases=("--head_dim",),
            help="attention head width")
    t.add_argument("--nvp", action=argparse.BooleanOptionalAction, default=True,
                   help="affine (scale and shift) coupling; --no-nvp: shift only")
    _option(t, "--noise-std", dest="noise_std", type=float, default=0.05, aliases=("--noise_std",),
            help="Gaussian noise added to the training data")
    _option(t, "--batch-size", dest="batch_size", type=int, default=64, aliases=("--batch_size",),
            help="training batch size")
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW, warm-up then cosine)")
    t.add_argument("--steps", type=int, default=2000, help="optimiser steps")
    _option(t, "--drop-label", dest="drop_label", type=float, default=0.1, aliases=("--drop_label",),
            help="label dropout probability (classifier-free guidance)")
    t.add_argument("--ema", type=float, default=0.999, help="EMA decay of the shipped weights")
    t.add_argument("--seed", type=int, default=0, help="training seed")
    t.add_argument("--threads", type=int, default=None, help="PyTorch CPU threads (None: its default)")
    t.add_argument("--force", action="store_true", help="replace the checkpoint in --out, only one sejd saved "
                   "(training resumes from its train_state.pt if there is one)")


def build_parser() -> argparse.ArgumentParser:
    from sejd.core.version import VERSION

    p = _Parser(prog="sejd", description="Fast verified sampling of TarFlow normalizing flows.", epilog=EPILOG,
                formatter_class=_Formatter)
    p.add_argument("--version", action="version", version=f"sejd {VERSION}", help="print the version")
    _global_options(p, at_top=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of:")
    for add in (_add_sample, _add_tune, _add_export_triton, _add_serve, _add_bench, _add_analyze, _add_export,
                _add_build, _add_check, _add_train):
        add(sub)
    return p


# ------------------------------------------------------------------------------------------------ main


def _configure(a) -> None:
    """Logs of the "sejd" logger on stderr (results stay on stdout); progress bars off on request."""
    level = logging.WARNING if a.quiet else logging.DEBUG if a.verbose > 0 else logging.INFO
    for h in [h for h in log.handlers if getattr(h, "sejd_cli", False)]:
        log.removeHandler(h)  # main() may run more than once in a process (tests)
    handler = logging.StreamHandler(sys.stderr)
    handler.sejd_cli = True
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    if a.no_progress or a.quiet:
        os.environ["SEJD_PROGRESS"] = "0"


def _os_error(e: OSError) -> str:
    paths = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    return f"{e.strerror or e}: {paths}" if paths else str(e)


# ONNX Runtime's exception types (onnxruntime.capi.onnxruntime_pybind11_state) for a graph it cannot load: the
# graph comes from the user's bundle, so it is an input error (a sejd-made graph it refuses fails sejd's tests)
_ORT_GRAPH_REFUSED = ("InvalidProtobuf", "InvalidGraph", "NoModel")


def _input_fault(e: BaseException) -> str | None:
    """The one-line message for a failure that a library raised in its own type but that the user's input
    caused (exit 2, not 3): a graph ONNX Runtime refuses to load, a write the file system refused."""
    from sejd.core.files import library_write_fault

    kind, text = type(e), str(e).splitlines()[0][:300] if str(e) else ""
    if kind.__module__.startswith("onnxruntime") and (kind.__name__ in _ORT_GRAPH_REFUSED or
                                                      "Load model from" in text):
        return (f"ONNX Runtime refuses a graph of the bundle: {text} (re-export the bundle, or rebuild its "
                f"engines with `sejd build`)")
    reason = library_write_fault(e)
    return f"a write failed: {reason} ({text})" if reason else None


def _out_of_memory(e: BaseException) -> bool:
    # PyTorch reports a failed allocation as a RuntimeError (torch.OutOfMemoryError on CUDA)
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and
                                          ("can't allocate memory" in str(e) or "out of memory" in str(e)))


# what a command can give up when memory runs out: a smaller batch where it samples, else nothing of its own
MEMORY_ADVICE = {"sample": "use a smaller batch (-n)", "bench": "use a smaller batch (--batch)",
                 "tune": "use a smaller batch (--batch)", "serve": "serve a smaller --max-batch"}


def _memory_message(e: BaseException, command: str | None = None) -> str:
    import re

    advice = MEMORY_ADVICE.get(command, "the model needs more memory than this machine has free")
    asked = re.search(r"tried to allocate (\d+) bytes", str(e))
    if asked:
        return f"not enough memory: an allocation of {int(asked[1]):,} bytes failed; {advice}"
    return f"not enough memory ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = 0
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv  # what this command was called with (recorded by `train`)
        verbose = args.verbose
        _configure(args)
        return args.func(args) or EXIT_OK
    except SejdError as e:
        print(f"sejd: error: {e}", file=sys.stderr)
    except OSError as e:  # a path the user gave cannot be read or written
        print(f"sejd: error: {_os_error(e)}", file=sys.stderr)
    except KeyboardInterrupt:
        print("sejd: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place that turns any failure into one line
        if _out_of_memory(e):
            command = next((a for a in argv if a in MEMORY_ADVICE or a == "export"), None)
            print(f"sejd: error: {_memory_message(e, command)}", file=sys.stderr)
            return EXIT_USAGE
        fault = _input_fault(e)
        if fault:
            if verbose:
                import traceback
                traceback.print_exc()
            print(f"sejd: error: {fault}", file=sys.stderr)
            return EXIT_USAGE
        if verbose:
            import traceback
            traceback.print_exc()
        print(f"sejd: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              f"(run with -v for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
