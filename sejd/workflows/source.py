"""Open what the user points at (checkpoint, builtin:NAME or bundle) as a `Session`: the model and the
block runners of one backend."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from sejd.core.errors import SejdError


@dataclasses.dataclass
class Session:
    """An opened model and the backend that runs it (`open_source`): the model, its block runners, the
    backend's name and, for a bundle, the bundle."""

    model: object  # TarFlow or StarFlow: host-side glue (prior variance, permutations, unpatchify, denoising)
    runners: list | None  # None: the PyTorch reference
    backend: str
    bundle: object | None = None  # sejd.export.bundle.Bundle when the source is a bundle

    @property
    def single_token_path(self) -> str:
        """What runs single tokens here: the runners' own account, or the PyTorch reference's."""
        from sejd.runtime.runner import BlockRunner

        return self.runners[0].single_token_path if self.runners else BlockRunner.single_token_path

    def plan(self, name, batch: int | None = None):
        """A Plan for this session: a named plan, `auto` (the plan tuned for the batch size nearest to
        `batch`) or a plan file, which must have been made for this bundle when it says which."""
        from sejd.core.errors import PlanError
        from sejd.runtime.plan import resolve_plan

        name = self.tuned_plan(batch) if name == "auto" else (name or self.default_plan(batch))
        if str(name) == "reference":
            return "reference"
        if isinstance(name, (str, os.PathLike)) and str(name).endswith(".json"):
            inside = self.bundle is not None and _lexically_in(Path(name), self.bundle.path)
            name = read_plan_file(name, root=self.bundle.path if inside else None)
        plan = resolve_plan(name, self.model.config.num_blocks)
        made_for = plan.meta.get("bundle_manifest_sha256")
        if made_for is not None and not (isinstance(made_for, str) and _SHA256.fullmatch(made_for)):
            raise PlanError(f"plan {plan.name}: meta.bundle_manifest_sha256 must be the sha256 of the bundle's "
                            f"manifest (64 lowercase hex digits), got {str(made_for)[:40]!r}")
        if made_for and self.bundle is not None and made_for != self.bundle.manifest_sha256:
            raise PlanError(f"plan {name} was tuned for another bundle (manifest sha256 {made_for[:12]}..., this "
                            f"bundle has {self.bundle.manifest_sha256[:12]}...); run `sejd tune` on this bundle")
        return plan

    def tuned_plans(self) -> dict[int, Path]:
        return tuned_plans(self.bundle)

    @property
    def precision(self) -> str:
        """What the backend computes in: the engines' build precision, or torch-cuda's suffix."""
        from sejd.engines.backends import backend as find_backend

        found, precision = find_backend(self.backend)
        return found.precision(self.bundle, precision)

    def tuned_plan(self, batch: int | None = None) -> str:
        plans = self.tuned_plans()
        if not plans:
            raise SejdError("plan 'auto' is the bundle's tuned plan: export a bundle and run `sejd tune` first")
        if batch is None:
            return str(plan_file(self.bundle, "plan.json")) if (self.bundle.path / "plan.json").exists() \
                else str(plans[min(plans)])
        nearest = min(plans, key=lambda b: (abs(b - batch), -b))
        return str(plans[nearest])

    def default_plan(self, batch: int | None = None) -> str:
        """The bundle's tuned plan when there is one, else SJD."""
        return self.tuned_plan(batch) if self.tuned_plans() else "sjd"


_SHA256 = re.compile(r"[0-9a-f]{64}")
PLAN_MAX_BYTES = 4 << 20  # a plan has one small entry per block; 1024 blocks take ~300 KB


def read_plan_file(path, root=None):
    """A plan file as a Plan: a regular UTF-8 JSON file of at most PLAN_MAX_BYTES (inside `root`, without
    following a link out of it, when given); anything else is a PlanError naming the file."""
    from sejd.core.errors import PlanError
    from sejd.core.files import read_json
    from sejd.runtime.plan import Plan

    return Plan.from_dict(read_json(path, "the plan file", PlanError, root, PLAN_MAX_BYTES), str(path))


def _lexically_in(path: Path, folder: Path) -> bool:
    return not os.path.relpath(os.path.abspath(path), os.path.abspath(folder)).startswith("..")


# what `sejd tune` writes; other names in plans/ are not tuned plans and are ignored (up to 9 digits: no
# batch is larger, and int() of a very long digit string raises)
TUNED_PLAN_NAME = re.compile(r"batch-([1-9][0-9]{0,8})\.json")


def tuned_plans(bundle) -> dict[int, Path]:
    """The plans `sejd tune` wrote into a bundle, by the batch size they were tuned for (0: unknown).
    Each must be a regular file inside the bundle (symlinks leaving it are refused)."""
    if bundle is None:
        return {}
    plans = {}
    for p in (bundle.path / "plans").glob("batch-*.json"):
        match = TUNED_PLAN_NAME.fullmatch(p.name)
        if match:
            plans[int(match.group(1))] = plan_file(bundle, f"plans/{p.name}")
    if not plans and (bundle.path / "plan.json").exists():
        plans[0] = plan_file(bundle, "plan.json")
    return plans


def plan_file(bundle, rel: str) -> Path:
    """A plan `sejd tune` wrote into `bundle` (plan.json or plans/...), confined to the bundle."""
    from sejd.export.bundle import confined_file

    return confined_file(bundle.path, rel, "tuned plan", bundle.path)


def is_bundle(source) -> bool:
    return not str(source).startswith("builtin:") and (Path(source) / "manifest.json").exists()


def refuse_config_for_bundle(source, config) -> None:
    """A model config (`--config`) is for checkpoints: a bundle carries its own, in its manifest."""
    if config is not None and is_bundle(source):
        raise SejdError(f"--config applies to checkpoints; {source} is a bundle, whose config is in its manifest.json")


def open_source(source: str | os.PathLike, backend: str = "auto", threads: int | None = None,
                config=None) -> Session:
    """backend "auto": ort-cpu for a bundle, torch for a checkpoint."""
    from sejd.engines.backends import backend as find_backend

    refuse_config_for_bundle(source, config)
    if is_bundle(source):
        from sejd.export.bundle import load_bundle

        bundle = load_bundle(source)
        backend = "ort-cpu" if backend == "auto" else backend
        found, precision = find_backend(backend)
        if found.reference:  # the bundle's model itself: no runners
            return Session(bundle.load_model(), None, backend, bundle)
        runners = found.runners(bundle, precision, threads)
        model = getattr(runners[0], "model", None)  # GPU runners carry their model, on the device
        return Session(bundle.load_model() if model is None else model, runners, backend, bundle)
    from sejd.model.checkpoint import load_checkpoint

    backend = "torch" if backend == "auto" else backend
    found, precision = find_backend(backend)
    if found.needs_build:
        raise SejdError(f"backend {backend!r} runs exported engines: export the checkpoint first "
                        f"(`sejd export {source} -o BUNDLE && sejd build BUNDLE --backend {backend}`), "
                        f"or use --backend torch")
    found.require()  # before the checkpoint is read
    from sejd.model.starflow_checkpoint import is_starflow_checkpoint, load_starflow

    if is_starflow_checkpoint(source, config):
        model = load_starflow(source, config=config)
    else:
        model = load_checkpoint(source, config=config)
    if found.reference:
        return Session(model, None, "torch")
    runners = found.runners(model, precision)  # torch-cuda: the model moves to the GPU
    return Session(runners[0].model, runners, backend)

