"""Generated corruption: every mutated manifest, engine manifest, plan and config ends either in success or
in a SejdError (one clear message), never another exception, never a hang, and nothing is written outside
the bundle or left behind. (HTTP bodies: tests/serve/test_api.py feeds 200 of them to the service.)"""

import copy
import json
import random
import shutil
import time
from pathlib import Path

import pytest

from sejd.core.errors import SejdError
from tests.conftest import make_model

SECONDS_EACH = 20  # generous on a loaded 2-core machine; a hang or a runaway allocation takes far longer
JUNK = [None, True, -1, 0, 2**63, 10**30, 1e308, float("nan"), "", "x", "../../outside.onnx", "/etc/hostname",
        "blocks/0/../../../x", "a\\b", "\x00", "é" * 3, "ab" * 2000, [], [1, "a"], {}, {"k": "v"}, 0.5, "64", "sjd"]


def paths(value, prefix=()):
    """Every (path to a value) in a JSON tree, the root excluded."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield prefix + (k,)
            yield from paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield prefix + (i,)
            yield from paths(v, prefix + (i,))


def mutate(doc, rng: random.Random):
    """One to three random edits: replace a value with junk, delete a key or item, add an unknown key."""
    doc = copy.deepcopy(doc)
    for _ in range(rng.randint(1, 3)):
        where = rng.choice(list(paths(doc)))
        parent = doc
        for key in where[:-1]:
            parent = parent[key]
        last = where[-1]
        action = rng.random()
        if action < 0.7:
            parent[last] = rng.choice(JUNK)
        elif action < 0.85:
            del parent[last]
        elif isinstance(parent, dict):
            parent[f"unknown_{rng.randint(0, 99)}"] = rng.choice(JUNK)
        else:
            parent.append(rng.choice(JUNK))
        if not list(paths(doc)):
            break
    return doc


def outcome(fn) -> str:
    """'ok' or the SejdError's class name; any other exception fails the test (with the input shown)."""
    t0 = time.monotonic()
    try:
        fn()
        result = "ok"
    except SejdError as e:
        assert str(e) and "\n" not in str(e).strip(), f"not a one-line message: {e!r}"
        result = type(e).__name__
    assert time.monotonic() - t0 < SECONDS_EACH, "took too long"
    return result


def listing(folder: Path) -> set:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    shutil.copytree(tiny_bundle.path, root / "b", symlinks=True)
    return root / "b"


def _fuzz_json(path: Path, count: int, seed: int, use):
    good = json.loads(path.read_text())
    rng = random.Random(seed)
    outcomes = {}
    for i in range(count):
        bad = mutate(good, rng)
        path.write_text(json.dumps(bad))
        try:
            outcomes[i] = outcome(use)
        except AssertionError as e:
            raise AssertionError(f"{path.name} mutation {i}: {json.dumps(bad)[:400]}: {e}") from None
        except Exception as e:
            raise AssertionError(f"{path.name} mutation {i} raised {type(e).__name__}: {e}\n"
                                 f"{json.dumps(bad)[:400]}") from None
    path.write_text(json.dumps(good))
    return outcomes


def test_a_hundred_corrupt_manifests_end_in_a_bundle_error(bundle_copy):
    from sejd.export.bundle import MANIFEST, load_bundle
    from sejd.workflows.source import open_source

    outside = listing(bundle_copy.parent.parent)

    def use():
        open_source(load_bundle(bundle_copy).path, "ort-cpu")

    outcomes = _fuzz_json(bundle_copy / MANIFEST, 100, seed=1, use=use)
    assert listing(bundle_copy.parent.parent) == outside  # nothing written anywhere, nothing left behind
    # the engines are pinned to the unchanged manifest: no mutation may be accepted silently
    assert "ok" not in outcomes.values(), [i for i, o in outcomes.items() if o == "ok"]


def test_forty_corrupt_engine_manifests_end_in_a_bundle_error(bundle_copy):
    from sejd.engines import backend
    from sejd.export.bundle import load_bundle
    from sejd.workflows.source import open_source

    def use():
        bundle = load_bundle(bundle_copy)
        backend("ort-cpu")[0].precision(bundle, "fp32")
        open_source(bundle.path, "ort-cpu")

    before = listing(bundle_copy.parent.parent)
    outcomes = _fuzz_json(bundle_copy / "engines" / "ort-cpu" / "manifest.json", 40, seed=2, use=use)
    assert listing(bundle_copy.parent.parent) == before
    assert set(outcomes.values()) - {"ok"}, "no mutation was refused: the fuzzer reached nothing"


def test_sixty_corrupt_plans_end_in_a_plan_error(tmp_path):
    from sejd.runtime.plan import named_plan, resolve_plan

    rng = random.Random(3)
    outcomes = []
    for name in ("sjd", "gs-jacobi", "ujd"):
        plan = named_plan(name, 4).to_dict()
        plan["meta"] = {"guidance": 0.0, "trials": [{"seconds": 0.1}]}
        for i in range(20):
            bad = mutate(plan, rng)
            f = tmp_path / f"{name}-{i}.json"
            f.write_text(json.dumps(bad))
            try:
                outcomes.append(outcome(lambda: resolve_plan(str(f), 4)))
            except Exception as e:
                raise AssertionError(f"plan mutation {json.dumps(bad)[:400]} raised {type(e).__name__}: {e}") from None
    assert outcomes.count("PlanError") >= 30, outcomes


def test_sixty_corrupt_configs_end_in_a_config_or_checkpoint_error(tmp_path):
    """Configs given with a checkpoint (`--config`) and written into its config.json."""
    from sejd import load_checkpoint, save_checkpoint

    model = make_model()
    save_checkpoint(model, tmp_path / "ckpt")
    good = model.config.to_dict()
    rng = random.Random(4)
    outcomes = []
    for i in range(30):
        bad = mutate(good, rng)
        try:
            outcomes.append(outcome(lambda: load_checkpoint(tmp_path / "ckpt", config=bad)))
        except Exception as e:
            raise AssertionError(f"config mutation {bad} raised {type(e).__name__}: {e}") from None
    stored = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    for i in range(30):
        bad = mutate(stored, rng)
        (tmp_path / "ckpt" / "config.json").write_text(json.dumps(bad))
        try:
            outcomes.append(outcome(lambda: load_checkpoint(tmp_path / "ckpt")))
        except Exception as e:
            raise AssertionError(f"config.json mutation {json.dumps(bad)[:300]} raised {type(e).__name__}: {e}") from None
    assert sum(o != "ok" for o in outcomes) >= 40, outcomes
