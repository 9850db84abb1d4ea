"""A copy of the tiny bundle with tuned plans (`auto`): batch 1 sequential, batch 4 Jacobi with one
GS-Jacobi block, both tuned at guidance 0, as `sejd tune` records it."""

import json
import shutil

import pytest

AUTO_PLANS = {
    1: {"name": "auto", "blocks": [{"decoder": "sequential"}] * 4, "meta": {"guidance": 0.0}},
    4: {"name": "auto", "blocks": [{"decoder": "jacobi", "tau": 0.01}] * 3 +
        [{"decoder": "gs-jacobi", "tau": 0.01, "segments": 4}], "meta": {"guidance": 0.0}},
}


def with_tuned_plans(src_bundle, dest, plans=AUTO_PLANS):
    shutil.copytree(src_bundle, dest)
    (dest / "plans").mkdir(exist_ok=True)
    for batch, plan in plans.items():
        (dest / "plans" / f"batch-{batch}.json").write_text(json.dumps(plan))
    return dest


@pytest.fixture(scope="session")
def tuned_bundle(tiny_bundle, tmp_path_factory):
    return with_tuned_plans(tiny_bundle.path, tmp_path_factory.mktemp("tuned") / "bundle")


def engine_fails_on_plan(monkeypatch, plan):
    """Engine batches sampled with `plan` raise, as a lost device would; the others run."""
    import sejd.serve.service

    real = sejd.serve.service.sample

    def flaky(*args, **kw):
        if kw.get("plan") is plan:
            raise RuntimeError("engine lost")
        return real(*args, **kw)
    monkeypatch.setattr(sejd.serve.service, "sample", flaky)
