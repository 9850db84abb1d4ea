"""Decoding plans: which decoder inverts which block, with which parameters.

Blocks are indexed as in the model (`blocks[i]`); sampling runs them in reverse, so the first
block applied at sampling time is `blocks[-1]`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from pathlib import Path

from sejd.core.errors import PlanError

DECODERS = ("sequential", "jacobi", "gs-jacobi", "block-jacobi")
INITS = ("zeros", "noise", "previous")
VARIANTS = {"sequential": ("host", "loop"), "jacobi": ("host", "chunk", "loop"), "gs-jacobi": ("host",),
            "block-jacobi": ("host",)}
NAMED_PLANS = ("sequential", "ujd", "sjd", "gs-jacobi")
# Named plans that are not in NAMED_PLANS (the plans every workflow measures and serves): "starflow", ml-starflow's
# own sampler (sample.py --jacobi 1 as scripts/test_sample_image.sh runs it) on every block. It decodes any
# block, TarFlow's too.
EXTRA_PLANS = ("starflow",)
STARFLOW_BLOCK_SIZE = 16  # test_sample_image.sh's --jacobi_block_size
STARFLOW_THRESHOLD = 1e-3  # --jacobi_th (relative MSE over a window)
STARFLOW_WINDOW_ITERS = 32  # jacobi_max_iter's default
SJD_TAU = 0.5  # the published SJD tolerance on data in [-1, 1]
GS_SEGMENTS = 8
TIMING_ONLY = "timing only (not converged by design)"  # how runs of fixed_iters plans are marked


def is_int(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def is_tau(value) -> bool:
    """A finite number >= 0 (not a bool: true would read as tau 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


@dataclasses.dataclass
class BlockPlan:
    decoder: str = "sequential"
    tau: float = SJD_TAU  # Jacobi stopping tolerance on max |x^t - x^(t-1)|
    init: str = "zeros"  # Jacobi initial guess: zeros | noise (the prior sample) | previous (this block's input)
    segments: int = 1  # GS-Jacobi segments
    max_iters: int | None = None  # cap below T-1; the rest is then finished exactly by sequential steps
    variant: str = "host"  # engine variant: sequential: host | loop; jacobi: host | chunk | loop
    chunk: int = 8  # Jacobi iterations per engine call for variant "chunk" (the bundle's jacobi_k unroll)
    freeze: bool = False  # Jacobi (host variant): keep the converged prefix in the KV cache, iterate the rest
    per_sample: bool = False  # Jacobi (host variant): each sample leaves the batch once its residual < tau
    fixed_iters: int | None = None  # Jacobi: exactly this many iterations, no convergence test, no exact finish
    # block-jacobi (ml-starflow's MetaBlock.jacobi): windows of block_size tokens, each iterated until the
    # relative MSE mean((new - old)^2) / mean(new^2) over the window < threshold, or window_iters iterations
    block_size: int = STARFLOW_BLOCK_SIZE
    threshold: float = STARFLOW_THRESHOLD
    window_iters: int = STARFLOW_WINDOW_ITERS

    def validate(self, where: str) -> None:
        # JSON types are checked strictly: "per_sample": "no" is a truthy string, and true == 1 in Python
        for name in ("decoder", "init", "variant"):
            if not isinstance(getattr(self, name), str):
                raise PlanError(f"{where}: {name} must be a string, got {getattr(self, name)!r}")
        for name in ("freeze", "per_sample"):
            if not isinstance(getattr(self, name), bool):
                raise PlanError(f"{where}: {name} must be true or false, got {getattr(self, name)!r}")
        if self.decoder not in DECODERS:
            raise PlanError(f"{where}: unknown decoder {self.decoder!r}; expected one of {DECODERS}")
        if self.init not in INITS:
            raise PlanError(f"{where}: unknown init {self.init!r}; expected one of {INITS}")
        if not is_tau(self.tau):
            raise PlanError(f"{where}: tau must be a number >= 0 and finite (0 = iterate to the exact result), "
                            f"got {self.tau!r}")
        if not is_int(self.segments, 1):
            raise PlanError(f"{where}: segments must be an int >= 1, got {self.segments!r}")
        allowed = VARIANTS[self.decoder]
        if self.variant not in allowed:
            raise PlanError(f"{where}: unknown variant {self.variant!r} for decoder {self.decoder!r}; "
                            f"expected one of {allowed}")
        if self.per_sample and (self.variant != "host" or self.freeze):
            raise PlanError(f"{where}: per_sample needs variant 'host' without freeze")
        if self.freeze and self.variant != "host":
            raise PlanError(f"{where}: freeze needs variant 'host' (the window shrinks between engine calls)")
        if not is_int(self.chunk, 1):
            raise PlanError(f"{where}: chunk must be an int >= 1, got {self.chunk!r}")
        if self.max_iters is not None and not is_int(self.max_iters, 1):
            raise PlanError(f"{where}: max_iters must be an int >= 1 or null, got {self.max_iters!r}")
        if not is_int(self.block_size, 1):
            raise PlanError(f"{where}: block_size must be an int >= 1, got {self.block_size!r}")
        if not is_tau(self.threshold):
            raise PlanError(f"{where}: threshold must be a number >= 0 and finite (a relative MSE), got {self.threshold!r}")
        if not is_int(self.window_iters, 1):
            raise PlanError(f"{where}: window_iters must be an int >= 1, got {self.window_iters!r}")
        if self.fixed_iters is not None:  # for timing only: the result is whatever N iterations give
            if not is_int(self.fixed_iters, 1):
                raise PlanError(f"{where}: fixed_iters must be an int >= 1 or null, got {self.fixed_iters!r}")
            if self.decoder != "jacobi" or self.variant == "loop" or self.freeze or self.per_sample:
                raise PlanError(f"{where}: fixed_iters needs decoder 'jacobi' with variant 'host' or 'chunk' and "
                                f"neither freeze nor per_sample, got decoder {self.decoder!r} variant {self.variant!r}")


@dataclasses.dataclass
class Plan:
    name: str
    blocks: list[BlockPlan]  # one per model block, blocks[i] decodes model.blocks[i]
    meta: dict = dataclasses.field(default_factory=dict)  # e.g. the measurements that chose it

    def validate(self, num_blocks: int) -> "Plan":
        if not isinstance(self.name, str):
            raise PlanError(f"plan name must be a string, got {self.name!r}")
        if not isinstance(self.meta, dict):
            raise PlanError(f"plan {self.name!r}: meta must be an object, got {type(self.meta).__name__}")
        if len(self.blocks) != num_blocks:
            raise PlanError(f"plan {self.name!r} has {len(self.blocks)} blocks, the model has {num_blocks}")
        for i, b in enumerate(self.blocks):
            b.validate(f"plan {self.name!r} block {i}")
        return self

    def to_dict(self) -> dict:
        return {"name": self.name, "blocks": [dataclasses.asdict(b) for b in self.blocks], "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict, where: str = "plan") -> "Plan":
        if not isinstance(d, dict) or not isinstance(d.get("blocks"), list):
            raise PlanError(f"{where}: expected an object with a 'blocks' list")
        fields = {f.name for f in dataclasses.fields(BlockPlan)}
        blocks = []
        for i, b in enumerate(d["blocks"]):
            unknown = set(b) - fields if isinstance(b, dict) else {"<not an object>"}
            if unknown:
                raise PlanError(f"{where} block {i}: unknown fields {sorted(unknown)}; expected {sorted(fields)}")
            blocks.append(BlockPlan(**b))
        return cls(d.get("name", where), blocks, d.get("meta", {}))


def named_plan(name: str, num_blocks: int, tau: float = SJD_TAU) -> Plan:
    first = num_blocks - 1  # blocks[-1] is applied first at sampling time
    if name == "sequential":
        blocks = [BlockPlan("sequential") for _ in range(num_blocks)]
    elif name == "ujd":
        blocks = [BlockPlan("jacobi", tau=tau) for _ in range(num_blocks)]
    elif name == "sjd":
        blocks = [BlockPlan("sequential" if i == first else "jacobi", tau=tau) for i in range(num_blocks)]
    elif name == "gs-jacobi":
        blocks = [BlockPlan("gs-jacobi", tau=tau, segments=GS_SEGMENTS) if i == first else BlockPlan("jacobi", tau=tau)
                  for i in range(num_blocks)]
    elif name == "starflow":
        blocks = [BlockPlan("block-jacobi") for _ in range(num_blocks)]
    else:
        raise PlanError(f"unknown plan {name!r}; expected one of {NAMED_PLANS + EXTRA_PLANS} or a plan.json path")
    return Plan(name, blocks)


def resolve_plan(plan: "str | os.PathLike | Plan", num_blocks: int, tau: float | None = None) -> Plan:
    """A Plan from a Plan, a named plan, or a JSON file; `tau` overrides every Jacobi block's tolerance."""
    if isinstance(plan, Plan):
        plan = Plan(plan.name, [dataclasses.replace(b) for b in plan.blocks], copy.copy(plan.meta))  # validated below
    elif str(plan).endswith(".json"):
        path = Path(plan)
        try:
            plan = Plan.from_dict(json.loads(path.read_text()), str(path))
        except FileNotFoundError:
            raise PlanError(f"plan file {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise PlanError(f"plan file {path} is not valid JSON: {e}") from None
    else:
        plan = named_plan(str(plan), num_blocks, SJD_TAU)
    if tau is not None:
        if not is_tau(tau):
            raise PlanError(f"tau must be a number >= 0 and finite, got {tau!r}")
        for b in plan.blocks:
            b.tau = tau
    return plan.validate(num_blocks)
