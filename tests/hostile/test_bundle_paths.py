"""Hostile bundles: every path a manifest names stays inside the bundle, is listed and hashed; malformed
manifests and engine manifests are one BundleError naming the file and field, never a traceback."""

import hashlib
import json
import os
import shutil

import pytest

import sejd.engines.ort as ort_engines
from sejd.cli import main
from sejd.engines import backend, engine_file, read_engine_manifest
from sejd.export.bundle import SCHEMA_VERSION, Bundle, BundleError, load_bundle
from sejd.workflows.source import open_source, tuned_plans

JACOBI = "blocks/0/jacobi.onnx"


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def copy_bundle(tiny_bundle, dst, engines=False):
    """A private copy to tamper with (the shared fixture stays intact); without engines unless asked."""
    shutil.copytree(tiny_bundle.path, dst, symlinks=True)
    if not engines:
        shutil.rmtree(dst / "engines")
    return dst


def read_manifest(bundle_dir) -> dict:
    return json.loads((bundle_dir / "manifest.json").read_text())


def write_manifest(bundle_dir, manifest) -> None:
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))


def graph_entry(manifest, variant="jacobi", block=0) -> dict:
    return next(g for g in manifest["graphs"] if g["variant"] == variant and g["block"] == block)


def listing(folder) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.fixture
def builds(monkeypatch):
    """Records every engine build that starts: a refused bundle must never reach one."""
    calls = []
    real = ort_engines.build_ort
    monkeypatch.setattr(ort_engines, "build_ort", lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


def refused_before_build(bundle_dir, builds, match):
    with pytest.raises(BundleError, match=match):
        backend("ort-cpu")[0].build(load_bundle(bundle_dir), threads=1)
    assert builds == [] and not (bundle_dir / "engines").exists()


# --- defect 1: path traversal --------------------------------------------------------------------------

@pytest.mark.parametrize("listed", [False, True], ids=["unlisted", "listed-with-its-hash"])
def test_graph_file_outside_the_bundle_is_refused_and_nothing_is_written_outside(tiny_bundle, tmp_path, builds,
                                                                                 listed):
    dst = copy_bundle(tiny_bundle, tmp_path / "a" / "b" / "bundle")
    evil = tmp_path / "x" / "evil.onnx"  # bundle/../../../x/evil.onnx
    evil.parent.mkdir()
    shutil.copy(dst / JACOBI, evil)
    m = read_manifest(dst)
    graph_entry(m)["file"] = "../../../x/evil.onnx"
    if listed:  # an attacker also pins the hash: still not inside the bundle
        m["files"]["../../../x/evil.onnx"] = sha256(evil)
    write_manifest(dst, m)
    before = listing(tmp_path)
    refused_before_build(dst, builds, r"\.\./\.\./\.\./x/evil\.onnx' is not normalised .* inside the bundle")
    assert listing(tmp_path) == before  # in particular no <bundle's parent>/x/evil.onnx
    assert not (dst.parent / "x").exists()


def test_cli_build_of_a_traversing_bundle_is_a_one_line_error(tiny_bundle, tmp_path, capsys):
    dst = copy_bundle(tiny_bundle, tmp_path / "a" / "bundle")
    m = read_manifest(dst)
    graph_entry(m)["file"] = "../x/evil.onnx"
    write_manifest(dst, m)
    assert main(["build", str(dst), "--backend", "ort-cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sejd: error: ") and "graphs[" in err and "../x/evil.onnx" in err
    assert "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "a" / "x").exists() and not (dst / "engines").exists()


def test_absolute_graph_file_is_refused_and_creates_nothing(tiny_bundle, tmp_path, builds):
    dst = copy_bundle(tiny_bundle, tmp_path / "bundle")
    target = tmp_path / "abs" / "evil.onnx"
    m = read_manifest(dst)
    graph_entry(m)["file"] = str(target)
    m["files"][str(target)] = m["files"][JACOBI]
    write_manifest(dst, m)
    refused_before_build(dst, builds, "is absolute")
    assert not (tmp_path / "abs").exists()


@pytest.mark.parametrize("rel,rule", [("../../outside.onnx", "is not normalised"), ("/etc/hostname", "is absolute"),
                                      ("blocks/./0/jacobi.onnx", "is not normalised"),
                                      ("blocks//0/jacobi.onnx", "is not normalised"),
                                      ("blocks\\0\\jacobi.onnx", "contains a backslash"),
                                      ("C:/evil.onnx", "names a drive"), ("", "is empty")])
def test_files_entries_must_be_relative_normalised_posix_paths(tiny_bundle, tmp_path, rel, rule):
    dst = copy_bundle(tiny_bundle, tmp_path / "a" / "bundle")
    (tmp_path / "outside.onnx").write_bytes(b"outside")
    m = read_manifest(dst)
    m["files"][rel] = sha256(tmp_path / "outside.onnx")  # with a matching hash where the file exists
    write_manifest(dst, m)
    with pytest.raises(BundleError) as refused:
        load_bundle(dst)
    assert f"manifest.json: files entry {rel!r} {rule}" in str(refused.value)
    assert "a manifest names only regular files inside the bundle" in str(refused.value)


def test_graph_file_must_be_listed_in_files(tiny_bundle, tmp_path):
    dst = copy_bundle(tiny_bundle, tmp_path / "bundle")
    m = read_manifest(dst)
    shutil.copy(dst / JACOBI, dst / "blocks/0/unpinned.onnx")
    graph_entry(m)["file"] = "blocks/0/unpinned.onnx"
    write_manifest(dst, m)
    with pytest.raises(BundleError, match=r"graphs\[\d+\]\.file blocks/0/unpinned\.onnx is not listed"):
        load_bundle(dst)


def test_graph_path_confines_a_hand_made_bundle_too(tiny_bundle, tmp_path):
    m = json.loads(json.dumps(tiny_bundle.manifest))
    graph_entry(m)["file"] = "../evil.onnx"
    with pytest.raises(BundleError, match=r"'\.\./evil\.onnx' is not normalised"):
        Bundle(tiny_bundle.path, m).graph_path("jacobi", 0)


# --- symlinks ------------------------------------------------------------------------------------------

def test_directory_symlink_leaving_the_bundle_is_refused(tiny_bundle, tmp_path):
    dst = copy_bundle(tiny_bundle, tmp_path / "bundle")
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", dst / "blocks" / "9")
    with pytest.raises(BundleError, match=r"symlink blocks/9 resolves to .*elsewhere, outside"):
        load_bundle(dst)


def test_dangling_symlink_is_refused(tiny_bundle, tmp_path):
    dst = copy_bundle(tiny_bundle, tmp_path / "bundle")
    os.symlink(tmp_path / "nowhere.onnx", dst / "blocks" / "0" / "ghost.onnx")
    with pytest.raises(BundleError, match=r"symlink blocks/0/ghost\.onnx is dangling"):
        load_bundle(dst)


def test_symlink_loop_is_refused(tiny_bundle, tmp_path):
    dst = copy_bundle(tiny_bundle, tmp_path / "bundle")
    os.symlink("b.onnx", dst / "blocks/0/a.onnx")
    os.symlink("a.onnx", dst / "blocks/0/b.onnx")
    with pytest.raises(BundleError, match=r"symlink blocks/0/[ab]\.onnx is dangling .* or loops"):
        load_bundle(dst)


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_listed_path_that_is_not_a_regular_file_is_refused_without_reading_it(tiny_bundle, tmp_path, kind):
    dst = copy_bundle(tiny_bundle, tmp_path / "bundle")
    (dst / JACOBI).unlink()
    if kind == "fifo":  # opening it to hash it would block forever
        os.mkfifo(dst / JACOBI)
    else:
        (dst / JACOBI).mkdir()
    with pytest.raises(BundleError, match=r"file blocks/0/jacobi\.onnx is not a regular file"):
        load_bundle(dst)


def test_listed_file_replaced_by_a_symlink_to_an_identical_copy_outside_is_refused(tiny_bundle, tmp_path):
    dst = copy_bundle(tiny_bundle, tmp_path / "bundle")
    outside = tmp_path / "copy.onnx"
    shutil.move(dst / JACOBI, outside)  # same bytes, same hash: only the location is wrong
    os.symlink(outside, dst / JACOBI)
    with pytest.raises(BundleError, match=r"symlink blocks/0/jacobi\.onnx resolves to .*copy\.onnx, outside"):
        load_bundle(dst)


def test_symlinks_resolving_inside_the_bundle_are_accepted(tiny_bundle, tmp_path):
    dst = copy_bundle(tiny_bundle, tmp_path / "bundle")
    os.rename(dst / JACOBI, dst / "blocks/0/real.onnx")
    os.symlink("real.onnx", dst / JACOBI)  # a listed graph file that is a link to another file inside
    os.symlink("blocks", dst / "blocks_link")  # a folder link that stays inside
    m = read_manifest(dst)
    m["files"]["blocks/0/real.onnx"] = m["files"][JACOBI]
    write_manifest(dst, m)
    bundle = load_bundle(dst)
    assert bundle.graph_path("jacobi", 0) == dst / JACOBI


@pytest.mark.parametrize("how", ["entry", "link"])
def test_a_graph_entry_pointing_at_another_graph_is_refused(tiny_bundle, tmp_path, how):
    """Audit (issue 20, item 8): the jacobi entry naming step_rows' graph ran it and failed inside ONNX
    Runtime (exit 3); by the entry, or by a link from its own file name."""
    dst = copy_bundle(tiny_bundle, tmp_path / "bundle")
    m = read_manifest(dst)
    if how == "entry":
        graph_entry(m)["file"] = "blocks/0/step_rows.onnx"
    else:
        os.unlink(dst / JACOBI)
        os.symlink("step_rows.onnx", dst / JACOBI)
        m["files"][JACOBI] = m["files"]["blocks/0/step_rows.onnx"]
    write_manifest(dst, m)
    with pytest.raises(BundleError, match="step_rows.onnx"):
        load_bundle(dst)


def test_tuned_plan_symlink_leaving_the_bundle_is_refused(tiny_bundle, tmp_path):
    dst = copy_bundle(tiny_bundle, tmp_path / "bundle")
    bundle = load_bundle(dst)
    (tmp_path / "secret.json").write_text("{}")
    (dst / "plans").mkdir(exist_ok=True)
    os.symlink(tmp_path / "secret.json", dst / "plans" / "batch-3.json")
    with pytest.raises(BundleError, match=r"symlink plans/batch-3\.json resolves to .*secret\.json, outside"):
        load_bundle(dst)
    with pytest.raises(BundleError, match=r"tuned plan plans/batch-3\.json resolves to .*secret\.json, outside"):
        tuned_plans(bundle)


# --- defect 8 and issue 11: malformed manifests --------------------------------------------------------

def _set(key, value):
    def mutate(m):
        m[key] = value
    return mutate


def _drop(key):
    return lambda m: m.pop(key)


def _graph(key, value):
    def mutate(m):
        graph_entry(m)[key] = value
    return mutate


def _config(**changes):
    return lambda m: m["config"].update(changes)


MALFORMED = [
    (lambda m: m.clear() or m.update(schema=SCHEMA_VERSION), "no files table"),
    (_drop("files"), "no files table"),
    (_set("files", ["model/config.json"]), "files must be an object mapping each file to its sha256, got a list"),
    (lambda m: m["files"].update({JACOBI: "beef"}), r"files entry blocks/0/jacobi\.onnx: expected a sha256"),
    (lambda m: m["files"].update({JACOBI: None}), r"files entry blocks/0/jacobi\.onnx: expected a sha256 .*got None"),
    (_set("graphs", {"0": "jacobi"}), "graphs must be a list of graph entries, got an object"),
    (_drop("graphs"), "graphs must be a list of graph entries, got null"),
    (lambda m: m["graphs"].append("blocks/0/jacobi.onnx"), r"graphs\[\d+\] must be an object, got a string"),
    (_graph("block", -1), r"graphs\[\d+\]\.block must be null .* from 0 to 3, got -1"),
    (_graph("block", 4), r"graphs\[\d+\]\.block .*got 4"),
    (_graph("block", "0"), r"graphs\[\d+\]\.block .*got '0'"),
    (_graph("block", True), r"graphs\[\d+\]\.block .*got True"),
    (_graph("variant", 7), r"graphs\[\d+\]\.variant must be a string, got 7"),
    (_graph("variant", "step_present"), r"graphs\[\d+\] repeats the 'step_present' graph of block 0"),
    (lambda m: graph_entry(m).pop("file"), r"graphs\[\d+\]\.file None is null, not a path string"),
    (_graph("file", ["a"]), r"graphs\[\d+\]\.file \['a'\] is a list, not a path string"),
    (_drop("config"), "config must be an object, got null"),
    (_config(channels=0), "config: TarFlowConfig.channels must be a positive int, got 0"),
    (_config(magic=1), r"config: unknown TarFlowConfig fields \['magic'\]"),
    (_config(head_dim=16), r"config contradicts model/config\.json .* in head_dim \(16 vs 32\)"),
    (_config(num_classes=3, expansion=2), r"config contradicts .* in expansion \(2 vs 4\), num_classes \(3 vs 5\)"),
    (_set("unroll", "4"), "unroll must be an int from 1 to 1024, got '4'"),
    (_set("unroll", 0), "unroll must be an int from 1 to 1024, got 0"),
    (_set("batch_max", 10**9), "batch_max must be an int from 1 to 4096, got 1000000000"),
    (_set("batch_max", True), "batch_max must be an int .*got True"),
    (_drop("opset"), "opset must be an int from 17 to 21, got None"),
    (_set("opset", 99), "opset must be an int from 17 to 21, got 99"),
]


@pytest.mark.parametrize("mutate,message", MALFORMED, ids=[m for _, m in MALFORMED])
def test_malformed_manifest_is_one_bundle_error_naming_the_field(tiny_bundle, tmp_path, builds, mutate, message):
    dst = copy_bundle(tiny_bundle, tmp_path / "bundle")
    m = read_manifest(dst)
    mutate(m)
    write_manifest(dst, m)
    refused_before_build(dst, builds, "manifest.json: " + message)


@pytest.mark.parametrize("text,message", [("[1, 2]", "must be a JSON object, got a list"),
                                          ("{", "is not valid JSON"), ('"x"', "must be a JSON object, got a string"),
                                          ("[" * 100_000 + "]" * 100_000, "is nested too deeply")])
def test_manifest_that_is_not_a_json_object_is_refused(tiny_bundle, tmp_path, text, message):
    dst = copy_bundle(tiny_bundle, tmp_path / "bundle")
    (dst / "manifest.json").write_text(text)
    with pytest.raises(BundleError, match=f"manifest.json: the bundle manifest {message}"):
        load_bundle(dst)


def test_cli_one_line_errors_for_malformed_manifests(tiny_bundle, tmp_path, capsys):
    dst = copy_bundle(tiny_bundle, tmp_path / "bundle")
    m = read_manifest(dst)
    m["graphs"] = "all of them"
    write_manifest(dst, m)
    assert main(["build", str(dst), "--backend", "ort-cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sejd: error: ") and "graphs must be a list" in err and "\n" not in err


# --- engine manifests ----------------------------------------------------------------------------------

def _engine_files(value):
    def mutate(m):
        m["files"] = value
    return mutate


ENGINE_MALFORMED = [
    ("{ not json", "is not valid JSON"),
    ("[]", "must be a JSON object, got a list"),
    (lambda m: m.pop("files"), "no files table"),
    (_engine_files("blocks/0/jacobi.onnx"), "files must be an object .*got a string"),
    (lambda m: m["files"].update({"../../../evil.onnx": "0" * 64}), r"'\.\./\.\./\.\./evil\.onnx' is not normalised"),
    (lambda m: m["files"].update({"/etc/hostname": "0" * 64}), r"'/etc/hostname' is absolute"),
    (lambda m: m["files"].update({JACOBI: "xyz"}), "expected a sha256"),
    (lambda m: m["files"].update({"blocks/0/gone.onnx": "0" * 64}), r"engines/ort-cpu/blocks/0/gone\.onnx is missing"),
]


@pytest.mark.parametrize("change,message", ENGINE_MALFORMED, ids=[m for _, m in ENGINE_MALFORMED])
def test_malformed_engine_manifest_is_one_bundle_error_naming_the_file(tiny_bundle, tmp_path, change, message):
    dst = copy_bundle(tiny_bundle, tmp_path / "bundle", engines=True)
    mf = dst / "engines/ort-cpu/manifest.json"
    if isinstance(change, str):
        mf.write_text(change)
    else:
        m = json.loads(mf.read_text())
        change(m)
        mf.write_text(json.dumps(m))
    bundle = load_bundle(dst)
    with pytest.raises(BundleError, match="engines/ort-cpu/manifest.json: .*" + message):
        read_engine_manifest(bundle, "ort-cpu", lambda m: None)
    with pytest.raises(BundleError, match=message):
        open_source(dst, "ort-cpu")


def test_engine_precision_of_a_corrupt_engine_manifest_is_a_bundle_error(tiny_bundle, tmp_path):
    dst = copy_bundle(tiny_bundle, tmp_path / "bundle", engines=True)
    (dst / "engines/ort-cpu/manifest.json").write_text("nope")
    with pytest.raises(BundleError, match="ort-cpu engine manifest is not valid JSON"):
        backend("ort-cpu")[0].precision(load_bundle(dst), "fp32")


def test_engine_file_symlinked_outside_the_bundle_is_refused(tiny_bundle, tmp_path):
    dst = copy_bundle(tiny_bundle, tmp_path / "bundle", engines=True)
    bundle = load_bundle(dst)
    engine = dst / "engines/ort-cpu" / JACOBI
    shutil.move(engine, tmp_path / "engine.onnx")
    os.symlink(tmp_path / "engine.onnx", engine)  # same bytes, same hash, outside the bundle
    with pytest.raises(BundleError, match=r"engine file engines/ort-cpu/blocks/0/jacobi\.onnx resolves to .*outside"):
        read_engine_manifest(bundle, "ort-cpu", lambda m: None)


def test_engine_file_not_in_the_engine_manifest_is_refused(tiny_bundle, tmp_path):
    dst = copy_bundle(tiny_bundle, tmp_path / "bundle", engines=True)
    bundle = load_bundle(dst)
    m = read_engine_manifest(bundle, "ort-cpu", lambda m: None)
    shutil.copy(dst / "engines/ort-cpu" / JACOBI, dst / "engines/ort-cpu/blocks/0/planted.onnx")
    assert engine_file(bundle, "ort-cpu", JACOBI, m) == dst / "engines/ort-cpu" / JACOBI
    with pytest.raises(BundleError, match=r"engine file blocks/0/planted\.onnx is not listed in the engine manifest"):
        engine_file(bundle, "ort-cpu", "blocks/0/planted.onnx", m)


# --- tuned plans ---------------------------------------------------------------------------------------

def test_stray_names_in_plans_are_ignored(tiny_bundle, tmp_path):
    dst = copy_bundle(tiny_bundle, tmp_path / "bundle")
    plans = dst / "plans"
    plans.mkdir(exist_ok=True)
    for name in ("batch-x.json", "batch-0.json", "batch-.json", "batch-01.json", "batch--2.json",
                 "batch-" + "9" * 200 + ".json"):
        (plans / name).write_text("{}")
    bundle = load_bundle(dst)
    assert tuned_plans(bundle) == {}
    (dst / "plan.json").write_text("{}")
    assert tuned_plans(bundle) == {0: dst / "plan.json"}
    (plans / "batch-2.json").write_text("{}")
    assert tuned_plans(bundle) == {2: plans / "batch-2.json"}


# --- issue 11, bad input: a listed file missing, truncated or altered, whatever its kind ---------------

@pytest.mark.parametrize("rel", ["blocks/0/weights.bin", JACOBI, "model/model.safetensors"])
@pytest.mark.parametrize("damage,message", [("missing", "listed in the manifest is missing"),
                                            ("truncated", "has changed since export"),
                                            ("altered", "has changed since export")])
def test_damaged_file_is_refused_by_name_before_any_engine_is_built(tiny_bundle, tmp_path, builds, rel, damage,
                                                                   message):
    dst = copy_bundle(tiny_bundle, tmp_path / "bundle")
    if rel.endswith(".bin"):  # a shared external-data weights file, pinned like any other file
        (dst / rel).write_bytes(os.urandom(4096))
        m = read_manifest(dst)
        m["files"][rel] = sha256(dst / rel)
        write_manifest(dst, m)
        load_bundle(dst)  # intact: accepted
    f = dst / rel
    if damage == "missing":
        f.unlink()
    elif damage == "truncated":
        f.write_bytes(f.read_bytes()[:-1])
    else:
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 1
        f.write_bytes(bytes(data))
    refused_before_build(dst, builds, rf"{rel.replace('.', chr(92) + '.')} {message}")
