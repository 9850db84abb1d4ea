"""Generated output-path collisions (issue 20, items 3, 9 and 10): every command x every output option x every
input it reads. Each must end in exit 2, one line naming both paths, before any work starts, with every input
unchanged (hashed before and after)."""

import hashlib
import itertools
import json
from pathlib import Path

import pytest
import torch

import sejd.export.exporter
import sejd.serve.triton
import sejd.workflows.check
import sejd.workflows.source
from sejd import save_checkpoint
from sejd.cli import EXIT_USAGE, main
from sejd.runtime.plan import named_plan
from tests.conftest import make_model
from tests.hostile.test_bundle_paths import copy_bundle
from tests.test_cli import keep_progress_env  # noqa: F401 - autouse: restores SEJD_PROGRESS

PTH = "toy_model_2_64_4_2_0.05.pth"


@pytest.fixture(scope="module")
def world(tiny_bundle, tmp_path_factory):
    """The inputs: a bundle (with engines and a tuned plan), an ml-tarflow .pth with a --config file, a sejd
    checkpoint folder, a plan file."""
    root = tmp_path_factory.mktemp("outputs")
    copy_bundle(tiny_bundle, root / "bundle", engines=True)
    torch.save(make_model().state_dict(), root / PTH)
    (root / "config.json").write_text('{"head_dim": 32}')
    save_checkpoint(make_model(), root / "ckpt")
    (root / "plan.json").write_text(json.dumps(named_plan("sjd", 4).to_dict()))
    (root / "out").mkdir()
    return root


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*")) if path.is_dir() else [path]
    for f in files:
        h.update(f.relative_to(path.parent).as_posix().encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


INPUTS = ["bundle", PTH, "config.json", "ckpt", "plan.json"]

# the source argument of each kind, and the inputs each kind makes a command read
SOURCES = {"bundle": (["{root}/bundle"], ["bundle"]),
           "pth": (["{root}/" + PTH, "--config", "{root}/config.json"], [PTH, "config.json"]),
           "folder": (["{root}/ckpt"], ["ckpt"])}

# command -> (arguments before the source, after it, source kinds, output options (option: kind), reads --plan)
COMMANDS = {
    "sample": (["sample"], ["-n", "1"], ["bundle", "pth", "folder"], {"--out": "file", "--npy": "file",
                                                                     "--json": "file"}, True),
    "tune": (["tune"], [], ["bundle", "pth", "folder"], {"--out": "file"}, False),
    "bench": (["bench"], ["--batch", "1"], ["bundle", "pth", "folder"], {"--json": "file", "--plot": "file"}, False),
    "analyze": (["analyze"], [], ["bundle", "pth", "folder"], {"--json": "file", "--plot": "file"}, True),
    "check": (["check"], [], ["bundle", "pth", "folder"], {"--json": "file", "--save-failures": "folder"}, False),
    "export": (["export"], [], ["pth", "folder"], {"-o": "folder"}, False),
    "export-triton": (["export-triton"], [], ["bundle"], {"-o": "repo"}, False),
}

# a place inside each folder input, and the file each input is
INSIDE = {"bundle": "bundle/manifest.json", "ckpt": "ckpt/config.json"}


def collisions():
    """(id, argv template, the input hit) for every command x output option x input x way of hitting it."""
    for name, (head, tail, kinds, options, reads_plan) in COMMANDS.items():
        for kind in kinds:
            src_args, inputs = SOURCES[kind]
            plan_args = ["--plan", "{root}/plan.json"] if reads_plan else []
            if reads_plan:
                inputs = inputs + ["plan.json"]
            for option, out_kind in options.items():
                for inp in inputs:
                    targets = {"is": inp, "contains": "."}
                    if inp in INSIDE:
                        targets["inside"] = INSIDE[inp]
                    if out_kind == "repo":  # export-triton writes REPO/NAME: the bundle, or inside it
                        targets = {"inside": "bundle", "is": "."}
                    for how, target in targets.items():
                        extra = ["--name", "bundle"] if (out_kind == "repo" and how == "is") else []
                        if name == "tune" and kind == "bundle" and how == "inside":
                            target = "bundle/model/config.json"  # plan.json and plans/ are tune's own
                        argv = head + src_args + tail + plan_args + [option, "{root}/" + target] + extra
                        yield f"{name}-{kind}-{option}-{how}-{inp}", argv, inp


CASES = list(collisions())


@pytest.fixture
def no_work(monkeypatch):
    """Any model loading, checking or copying fails the test: the refusal must come first."""
    def work(*a, **k):
        pytest.fail("work started before the output paths were checked")
    monkeypatch.setattr(sejd.workflows.source, "open_source", work)
    monkeypatch.setattr(sejd.export.exporter, "load_checkpoint", work)
    monkeypatch.setattr(sejd.workflows.check, "check_bundle", work)
    monkeypatch.setattr(sejd.serve.triton, "load_bundle", work)


def run(world, argv, capsys):
    rc = main([a.format(root=world) for a in argv] + ["--no-progress"])
    return rc, capsys.readouterr().err


def assert_refused(rc, err, *needles):
    assert rc == EXIT_USAGE, err
    assert err.startswith("sejd: error:") and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


def test_the_matrix_covers_every_output_option_of_every_command():
    from sejd.cli import build_parser
    from tests.test_cli import _walk

    writes = {"--out", "--npy", "--json", "--plot", "--save-failures", "-o"}
    for name, parser in dict(_walk(build_parser())).items():
        options = {a.option_strings[0] for a in parser._actions if writes & set(a.option_strings)}
        if name in ("sejd", "serve", "build"):
            assert not options, name
        elif name == "train":  # reads no input; its --out is tested in test_issue20
            assert options == {"--out"}
        else:
            assert options == set(COMMANDS[name][3]), name
    assert len(CASES) > 100


@pytest.mark.parametrize("argv,inp", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_an_output_naming_an_input_is_refused_before_work(world, capsys, no_work, argv, inp):
    before = {i: tree_hash(world / i) for i in INPUTS}
    rc, err = run(world, argv, capsys)
    assert_refused(rc, err)
    assert str(world / inp) in err or str(world) in err, err  # names the input (or the folder holding it)
    assert {i: tree_hash(world / i) for i in INPUTS} == before


def _pairs():
    for name, (head, tail, kinds, options, _) in COMMANDS.items():
        src_args = SOURCES[kinds[0]][0]
        for a, b in itertools.combinations(options, 2):
            if "folder" in (options[a], options[b]):  # a folder output: the file output inside it
                folder, file = (a, b) if options[a] == "folder" else (b, a)
                yield f"{name}-{a}-{b}", head + src_args + tail + [folder, "{root}/out/x", file, "{root}/out/x/f"]
            else:
                yield f"{name}-{a}-{b}", head + src_args + tail + [a, "{root}/out/same", b, "{root}/out/same"]
    yield "analyze-derived-plot", ["analyze", "{root}/bundle", "--plot", "{root}/out/p.png", "--json",
                                   "{root}/out/p_profile.png"]


PAIRS = list(_pairs())


@pytest.mark.parametrize("argv", [p[1] for p in PAIRS], ids=[p[0] for p in PAIRS])
def test_two_outputs_of_one_command_may_not_be_the_same_file(world, capsys, no_work, argv):
    rc, err = run(world, argv, capsys)
    assert_refused(rc, err, "own path")
    assert not (world / "out" / "same").exists() and not (world / "out" / "x").exists()


UNWRITABLE = [(name, option) for name, (_, _, _, options, _) in COMMANDS.items() for option in options]


@pytest.mark.parametrize("name,option", UNWRITABLE, ids=[f"{n}{o}" for n, o in UNWRITABLE])
def test_an_unwritable_output_is_refused_before_work(world, capsys, no_work, name, option):
    head, tail, kinds, _, _ = COMMANDS[name]
    # /proc takes no new files, even for root (who ignores permission bits)
    rc, err = run(world, head + SOURCES[kinds[0]][0] + tail + [option, "/proc/sejd-test/x"], capsys)
    assert_refused(rc, err, option, "/proc")


def test_tune_may_write_the_bundles_own_plan(world, capsys, monkeypatch):
    """The one place inside an input a command writes by design: tune's plan.json (and plans/)."""
    from sejd.export.outputs import Input, Output, check_outputs

    b = world / "bundle"
    check_outputs([Input("the bundle", b, ("plan.json", "plans"))], [Output("--out", b / "plan.json")])
    check_outputs([Input("the bundle", b, ("plan.json", "plans"))], [Output("--out", b / "plans" / "batch-2.json")])


def test_a_link_to_an_input_is_the_input(world, capsys, no_work):
    link = world / "out" / "link.json"
    link.symlink_to(world / "bundle" / "manifest.json")
    try:
        rc, err = run(world, ["sample", "{root}/bundle", "-n", "1", "--json", str(link)], capsys)
        assert_refused(rc, err, "lies inside the bundle")
    finally:
        link.unlink()


def test_tune_writes_inside_a_bundle_only(world, capsys, no_work):
    """plan.json is tune's own place in a bundle, not in a checkpoint folder."""
    rc, err = run(world, ["tune", "{root}/ckpt", "--out", "{root}/ckpt/plan.json"], capsys)
    assert_refused(rc, err, "lies inside the checkpoint")
    assert not (world / "ckpt" / "plan.json").exists()
