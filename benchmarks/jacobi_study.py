"""Jacobi iterations per block, in sampling order, at tau = 0.5 and at the tau that reaches a PSNR target.

For each tau on a grid (largest first), UJD (Jacobi on every block, from zeros) and SJD are sampled
from the same seeded noise as exact sequential decoding; the first tau whose PSNR against sequential
reaches the target is reported. Output: JSON on stdout (and --json FILE), a table on stderr.

    python benchmarks/jacobi_study.py builtin:textures --batch 16 --json docs/study_textures.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from sejd import load_checkpoint, sample
from sejd.core.files import write_json
from sejd.workflows.quality import psnr_db

TAUS = (0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001, 0.0005, 0.0002, 0.0001)


def study(source: str, batch: int = 16, seed: int = 0, target_db: float = 40.0, guidance: float = 0.0) -> dict:
    model = load_checkpoint(source)
    cfg = model.config
    noise = torch.randn(batch, cfg.num_tokens, cfg.token_dim, generator=torch.Generator().manual_seed(seed))
    labels = torch.arange(batch) % cfg.num_classes if cfg.num_classes else None
    kw = dict(labels=labels, guidance=guidance, progress=False)
    exact = sample(model, noise, plan="sequential", **kw).images
    out = {"source": source, "batch": batch, "seed": seed, "target_psnr_db": target_db, "guidance": guidance,
           "config": cfg.to_dict(), "plans": {}}
    for plan in ("ujd", "sjd"):
        rows = []
        for tau in TAUS:
            r = sample(model, noise, plan=plan, tau=tau, **kw)
            rows.append({"tau": tau, "psnr_db": psnr_db(r.images, exact),
                         "iterations": [b.iterations for b in r.stats.blocks],
                         "blocks": [b.block for b in r.stats.blocks]})
            print(f"{plan} tau={tau:<7} psnr={rows[-1]['psnr_db']:6.2f} dB  iterations (sampling order) "
                  f"{rows[-1]['iterations']}", file=sys.stderr)
            if tau < 0.5 and rows[-1]["psnr_db"] >= target_db:
                break
        reached = next((r for r in rows if r["psnr_db"] >= target_db), None)
        out["plans"][plan] = {"at_tau_0.5": rows[0], "at_target": reached, "grid": rows}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, default=40.0)
    p.add_argument("--guidance", type=float, default=0.0)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    result = study(a.source, a.batch, a.seed, a.target, a.guidance)
    print(json.dumps(result, indent=1))
    if a.json:
        write_json(a.json, result)


if __name__ == "__main__":
    main()
