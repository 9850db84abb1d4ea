"""STARFlow side by side: Apple's block-wise Jacobi sampler against sejd's plans, on the same noise and text.

    python benchmarks/starflow_vs_apple.py [--shape slim3b|slim-small] [--backend torch|ort-cpu] [--batch 1]
        [--rounds 5] [--guidance 3.6] [--tune] [--torch-threads N] [--json out.json] [--workdir DIR]

The model: random weights in ml-starflow's layout (tests/model/starflow_oracle.py's `random_state_dict`,
non-zero output projections so every block does work), written as a `.pth` and read back with sejd's
loader. `slim3b`: the published 3B layout's depth and token count (six blocks of 2,2,2,2,2,24 layers,
T = 1024 latent tokens of width 4, 128 text tokens of width 2048, RoPE, start token, softplus, final norm,
soft clip) at width 128; `slim-small`: width 128, blocks of 1,1,1,1,1,4 layers, 16 text tokens.

Candidates, timed in interleaved rounds (every candidate once per round, the order rotating) after one
warm-up run each, at `--batch` with guidance on a doubled batch:
- `apple`: ml-starflow's Jacobi sampler (window 16, relative-MSE threshold 1e-3, <= 32 iterations per
  window, every block) as stated by the test oracle: eager PyTorch, fp32, one scalar read back per
  iteration. Apple's code itself cannot be installed here; the oracle is an independent statement of it
  (sejd's `starflow` plan equals it within 1e-4 in the test suite). Apple's own code also re-rotates its
  whole KV cache at every read and calls a collective per iteration, which the oracle does not.
- `starflow`: the same algorithm through sejd's runtime on `--backend`;
- `sequential`: exact decoding (the quality reference) on `--backend`;
- `sjd`: the first sampling block exact, the others Jacobi (tau 0.5 as named);
- `sjd@TAU` (`--sjd-taus`): sjd at other tolerances (a hand sweep where tuning costs too long here);
- `auto` (`--tune`): `sejd tune` at `--batch`, target 40 dB against exact decoding.
PSNR on latents: 20 log10(range of the exact latents / RMSE). JSON on stdout and in --json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the oracle lives in tests/

SHAPES = {
    "slim3b": {"in_channels": 4, "img_size": 32, "patch_size": 1, "channels": 128, "num_blocks": 6,
               "layers_per_block": [2, 2, 2, 2, 2, 24], "head_dim": 64, "rope": True, "sos": True, "txt_size": 128,
               "txt_dim": 2048, "cond_top_only": True, "use_softplus": True, "use_final_norm": True,
               "soft_clip": 4.0, "seq_order": "L2R"},
    "slim-small": {"in_channels": 4, "img_size": 32, "patch_size": 1, "channels": 128, "num_blocks": 6,
                   "layers_per_block": [1, 1, 1, 1, 1, 4], "head_dim": 64, "rope": True, "sos": True, "txt_size": 16,
                   "txt_dim": 2048, "cond_top_only": True, "use_softplus": True, "use_final_norm": True,
                   "soft_clip": 4.0, "seq_order": "L2R"},
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="slim3b")
    p.add_argument("--backend", default="torch", help="torch, or ort-cpu (exports and builds a bundle first)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--guidance", type=float, default=3.6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tune", action="store_true", help="also tune a plan (sejd tune) and time it as `auto`")
    p.add_argument("--sjd-taus", dest="sjd_taus", default="",
                   help="comma-separated extra sjd tolerances to time (sjd@TAU), e.g. 0.1,0.02")
    p.add_argument("--torch-threads", dest="torch_threads", type=int, default=None,
                   help="PyTorch intra-op threads for every candidate (None: PyTorch's default)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    from sejd.core.machine import machine_info
    from sejd.runtime.request import seeded_noise, seeded_text
    from sejd.runtime.sampler import sample
    from sejd.workflows.bench import Candidate, rounds, timing
    from sejd.workflows.quality import psnr_latents_db
    from sejd.workflows.source import open_source
    from tests.model import starflow_oracle as so

    cfg = SHAPES[a.shape]
    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    work = Path(tempfile.mkdtemp(prefix="starflow_bench_", dir=a.workdir))
    ckpt = work / "starflow.pth"
    log(f"making a random-weight {a.shape} checkpoint in ml-starflow's layout: {ckpt}")
    sd = so.random_state_dict(cfg, seed=0)
    torch.save(sd, ckpt)
    config = json.dumps(cfg)
    source = str(ckpt)
    if a.backend != "torch":
        sejd = str(Path(sys.executable).with_name("sejd"))
        for cmd in (["export", source, "--config", config, "-o", str(work / "bundle")],
                    ["build", str(work / "bundle"), "--backend", a.backend]):
            log("$ sejd " + " ".join(cmd))
            subprocess.run([sejd, *cmd], check=True)
        source = str(work / "bundle")
    src = open_source(source, a.backend, config=None if a.backend != "torch" else cfg)
    model = src.model
    T, D = model.config.num_tokens, model.config.token_dim
    noise = seeded_noise(a.batch, a.seed, T, D)
    text = seeded_text(a.batch, a.seed, cfg["txt_size"], cfg["txt_dim"])
    null = torch.zeros(cfg["txt_size"], cfg["txt_dim"])
    latents_noise = model.unpatchify(noise)

    def sejd_plan(plan):
        return lambda: sample(model, noise, plan=plan, text=text, uncond_text=null, guidance=a.guidance,
                              runners=src.runners, progress=False).images

    def apple():
        both = torch.cat([text, null.expand(a.batch, -1, -1)]) if a.guidance else text
        return so.jacobi_sample(sd, cfg, latents_noise, both, a.guidance, block_size=16, threshold=1e-3,
                                max_iters=32)

    log("exact reference (sequential) ...")
    t0 = time.perf_counter()
    exact = sejd_plan("sequential")()
    log(f"  {time.perf_counter() - t0:.1f} s")
    candidates = [Candidate("apple", "Apple's Jacobi sampler (oracle, eager PyTorch)", apple),
                  Candidate("starflow", f"starflow plan on {a.backend}", sejd_plan("starflow")),
                  Candidate("sequential", f"sequential on {a.backend}", sejd_plan("sequential")),
                  Candidate("sjd", f"sjd on {a.backend}", sejd_plan("sjd"))]
    for tau in filter(None, a.sjd_taus.split(",")):
        from sejd.runtime.plan import resolve_plan

        candidates.append(Candidate(f"sjd@{tau}", f"sjd, tau {tau}, on {a.backend}",
                                    sejd_plan(resolve_plan("sjd", model.config.num_blocks, float(tau)))))
    tuned = None
    if a.tune:
        from sejd.workflows.tune import tune

        log(f"tuning at batch {a.batch}, 40 dB ...")
        t0 = time.perf_counter()
        tuned = tune(src, batch=a.batch, target_db=40.0, guidance=a.guidance, log=log)
        log(f"  tuned in {time.perf_counter() - t0:.0f} s")
        candidates.append(Candidate("auto", f"tuned plan on {a.backend}", sejd_plan(tuned)))
    info_before = machine_info()
    log(f"{a.rounds} interleaved rounds of {[c.decoder for c in candidates]} ...")
    rounds(candidates, a.rounds, warmup=1)
    rows = []
    apple_median = statistics.median(candidates[0].times)
    for c in candidates:
        psnr = psnr_latents_db(c.result.cpu(), exact.cpu())  # every candidate returns latents (B, c, H, W)
        row = {"decoder": c.decoder, "label": c.label, **timing(c.times), "psnr_db_vs_exact": psnr,
               "speedup_vs_apple": apple_median / statistics.median(c.times)}
        rows.append(row)
        log(f"  {c.decoder:<10} {row['seconds_median']:8.3f} s  x{row['speedup_vs_apple']:5.2f} vs apple  "
            f"{psnr:6.1f} dB  spread {row['spread']:.0%}")
    result = {"command": "python benchmarks/starflow_vs_apple.py " + " ".join(argv or sys.argv[1:]),
              "shape": a.shape, "config": cfg, "backend": a.backend, "batch": a.batch, "guidance": a.guidance,
              "rounds": a.rounds, "torch_threads": torch.get_num_threads(), "rows": rows, "tuned_plan": tuned.to_dict() if tuned is not None else None,
              "machine_before": info_before, "machine_after": machine_info()}
    text_out = json.dumps(result, indent=1, default=str)
    print(text_out)
    if a.json:
        Path(a.json).write_text(text_out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
