"""What the default variant set saves: export, build and check with every variant against the default set.

    python benchmarks/variant_set.py builtin:textures [--repeats 3] [--json docs/variant_set_textures.json]
    python benchmarks/variant_set.py --shape afhq256 --workdir /tmp/varset --json docs/variant_set_afhq256.json

SOURCE is anything `sejd export` takes (builtin:NAME, a checkpoint); `--shape afhq256` (or another shape of
benchmarks/paper_scale.py) makes a random-weight checkpoint of that published shape first, with
`paper_scale.py CONFIG --stage make --path P` as a child process, and deletes it at the end (unless --keep).

For each set (`all`: `sejd export SOURCE -o DIR --variants all`; `default`: the same without --variants, i.e.
sejd.export.contracts.DEFAULT_VARIANTS), one after the other, every stage a child process, each repeated
--repeats times (median reported, every run kept):

1. export: wall and CPU seconds, peak resident memory (the kernel's figures for that child, from wait4); the
   bundle's bytes on disk (engines excluded) and its number of graphs (manifest.json);
2. build: `sejd build DIR --backend BACKEND`: wall seconds, peak memory, bytes of engines/BACKEND;
3. check: `sejd check DIR --backend BACKEND` with sejd's default options; `--check-modes` runs other modes too
   (quick: `--quick`; graphs: `--plans none`, the graph comparisons alone, which is what the variant set
   changes; quick-graphs: both), `--check-args` adds flags to every one. A check is stopped after
   --check-timeout seconds (recorded as timed out, not as a failure); a non-zero exit status is recorded,
   and makes this script exit 1.

JSON on stdout and in --json: the command lines, the machine, sejd's git commit, each stage's runs and median,
and the ratios default / all side by side. Progress (and the children's output) on stderr.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # paper_scale.py beside this script (its top level imports nothing heavy)

SETS = {"all": ["--variants", "all"], "default": []}
# sejd check's flags per mode: its defaults (every graph at 6 feeds, 4 plans end to end at batch 4), --quick, and
# the graph comparisons alone (what the variant set changes; the plans run the same graphs either way)
CHECK_MODES = {"default": [], "quick": ["--quick"], "graphs": ["--plans", "none"],
               "quick-graphs": ["--quick", "--plans", "none"]}
TAIL_LINES = 15  # last lines of a child's output kept in the JSON


def log(msg: str) -> None:
    print(f"[variant_set {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_child(argv: list, timeout: float | None = None, cwd: str | None = None) -> dict:
    """Run one stage as a child process (its own process group), its output echoed to stderr. Wall and CPU
    seconds and peak RSS are wait4's figures for this child and its descendants."""
    log("$ " + " ".join(map(str, argv)))
    load_before = os.getloadavg()[0]
    tail = collections.deque(maxlen=TAIL_LINES)
    t0 = time.perf_counter()
    child = subprocess.Popen(list(map(str, argv)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd,
                             start_new_session=True, text=True, errors="replace",
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})  # progress as it happens

    def pump():
        for line in child.stdout:
            sys.stderr.write("    | " + line)
            sys.stderr.flush()
            tail.append(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        if timeout is not None and time.perf_counter() - t0 > timeout:
            log(f"ran past {timeout:.0f} s: stopping process group {child.pid}")
            timed_out = True
            os.killpg(child.pid, signal.SIGTERM)  # the group this call started, nothing else
            try:
                pid, status, usage = _wait4_within(child.pid, 30)
            except TimeoutError:
                os.killpg(child.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(child.pid, 0)
            break
        time.sleep(0.2)
    seconds = time.perf_counter() - t0
    child.returncode = code = os.waitstatus_to_exitcode(status)
    reader.join(timeout=5)
    peak = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024
    log(f"  {'timed out' if timed_out else f'exit {code}'} after {seconds:.1f} s, peak RSS {peak / 2**30:.2f} GiB")
    return {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss_bytes": int(peak),
            "exit_code": code, "timed_out": timed_out, "load_1min_before_after": [load_before, os.getloadavg()[0]],
            "output_tail": list(tail)}


def _wait4_within(pid: int, seconds: float):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        got = os.wait4(pid, os.WNOHANG)
        if got[0]:
            return got
        time.sleep(0.2)
    raise TimeoutError


def tree_bytes(path: Path, skip: str | None = None) -> int:
    if not path.exists():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*")
               if f.is_file() and (skip is None or skip not in f.relative_to(path).parts))


def median_of(runs: list, key: str):
    values = [r[key] for r in runs if not r.get("timed_out") and r.get("exit_code", 0) == 0]
    return statistics.median(values) if values else None


def summarize(runs: list) -> dict:
    return {"seconds_median": median_of(runs, "seconds"), "cpu_seconds_median": median_of(runs, "cpu_seconds"),
            "peak_rss_bytes_median": median_of(runs, "peak_rss_bytes"),
            "exit_codes": [r["exit_code"] for r in runs], "timed_out": any(r["timed_out"] for r in runs),
            "seconds_at_least": max((r["seconds"] for r in runs if r["timed_out"]), default=None), "runs": runs}


def git_commit(python: str) -> dict:
    """The commit of the sejd package the measured `sejd` imports (found without importing it)."""
    code = "import importlib.util; print(importlib.util.find_spec('sejd').origin)"
    try:
        origin = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        root = Path(origin).resolve().parent
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return {"sejd_package": str(root), "commit": head, "dirty": bool(dirty)}
    except (subprocess.CalledProcessError, OSError) as e:
        return {"error": str(e)}


def machine(python: str) -> dict:
    code = "import json; from sejd.core.machine import machine_info; print(json.dumps(machine_info()))"
    out = subprocess.run([python, "-c", code], check=False, capture_output=True, text=True)
    info = json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr[-2000:]}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return info


def bundle_graphs(bundle: Path) -> dict:
    manifest = json.loads((bundle / "manifest.json").read_text())
    graphs = manifest["graphs"]
    variants = sorted({g["variant"] for g in graphs}, key=lambda v: [g["variant"] for g in graphs].index(v))
    return {"graphs": len(graphs), "variants": variants}


def ratio(a, b):
    return None if a is None or b is None or not b else a / b


def table(result: dict) -> str:
    sets = result["sets"]
    rows = [f"{result['source']}: default / all"]
    fields = [("bundle GiB", lambda s: s["bundle_bytes"] / 2**30), ("graphs", lambda s: s["graphs"]),
              ("export s", lambda s: s["export"]["seconds_median"]),
              ("export peak GiB", lambda s: (s["export"]["peak_rss_bytes_median"] or 0) / 2**30),
              ("build s", lambda s: s["build"]["seconds_median"]),
              ("engines GiB", lambda s: s["engines_bytes"] / 2**30)]
    for mode in result["check_modes"]:
        fields.append((f"check[{mode}] s", lambda s, m=mode: s["check"][m]["seconds_median"]
                       or f">{s['check'][m]['seconds_at_least']:.0f}"))
    names = list(sets)
    rows.append(f"  {'':<18}" + "".join(f"{n:>12}" for n in names) + f"{'ratio':>10}")
    for label, get in fields:
        vals = []
        for n in names:
            try:
                vals.append(get(sets[n]))
            except (KeyError, TypeError):
                vals.append(None)
        cells = "".join(f"{'-' if v is None else f'{v:.3f}' if isinstance(v, float) else v:>12}" for v in vals)
        numbers = all(isinstance(v, (int, float)) for v in vals)
        r = ratio(vals[names.index("default")], vals[names.index("all")]) if numbers and len(vals) == 2 else None
        rows.append(f"  {label:<18}{cells}{'-' if r is None else f'{r:.3f}':>10}")
    return "\n".join(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", nargs="?", help="builtin:NAME or a checkpoint path (or use --shape)")
    p.add_argument("--shape", default=None, help="a published shape of benchmarks/paper_scale.py (afhq256, ...): "
                   "make a random-weight checkpoint of it in --workdir and use it as SOURCE")
    p.add_argument("--sets", default="all,default", help="variant sets, in order: all, default")
    p.add_argument("--repeats", type=int, default=1, help="runs of each stage (median reported)")
    p.add_argument("--backend", default="ort-cpu")
    p.add_argument("--check-modes", dest="check_modes", default="default",
                   help="comma list: default (sejd check's own defaults), quick (--quick), graphs (--plans none), "
                   "quick-graphs (--quick --plans none)")
    p.add_argument("--check-args", dest="check_args", default="", help="extra flags for every sejd check")
    p.add_argument("--check-timeout", dest="check_timeout", type=float, default=1200,
                   help="seconds before a check is stopped (recorded as timed out)")
    p.add_argument("--timeout", type=float, default=7200, help="seconds before an export or build is stopped")
    p.add_argument("--sejd", default=None, help="the sejd executable (default: the one beside this Python, "
                   "else the first on PATH)")
    p.add_argument("--workdir", default="/tmp/varset", help="where the bundles (and a --shape checkpoint) go")
    p.add_argument("--keep", action="store_true", help="keep the bundles and the checkpoint")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if (a.source is None) == (a.shape is None):
        p.error("give SOURCE or --shape, not both")
    sets = a.sets.split(",")
    if unknown := [s for s in sets if s not in SETS]:
        p.error(f"--sets: unknown {unknown}; expected {list(SETS)}")
    modes = a.check_modes.split(",")
    if unknown := [m for m in modes if m not in CHECK_MODES]:
        p.error(f"--check-modes: unknown {unknown}")
    sejd = a.sejd or (str(Path(sys.executable).parent / "sejd") if (Path(sys.executable).parent / "sejd").exists()
                      else shutil.which("sejd"))
    if not sejd:
        p.error("no sejd executable: pass --sejd")
    python = sys.executable
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    result = {"source": a.source or f"shape:{a.shape}", "backend": a.backend, "repeats": a.repeats, "sejd": sejd,
              "git": git_commit(python), "check_modes": modes, "check_timeout_s": a.check_timeout, "sets": {}}
    made = []
    try:
        source = a.source
        if a.shape:
            import paper_scale

            ckpt = work / paper_scale.checkpoint_name(paper_scale.shape_of(a.shape, False))
            made.append(ckpt)
            argv = [python, HERE / "paper_scale.py", a.shape, "--stage", "make", "--path", ckpt]
            result["make"] = run_child(argv, a.timeout)
            result["make"]["command"] = " ".join(map(str, argv))
            if result["make"]["exit_code"]:
                raise SystemExit("variant_set: making the checkpoint failed")
            source = str(ckpt)
            result["shape"] = paper_scale.shape_of(a.shape, False)
            result["checkpoint"] = {"path": source, "bytes": ckpt.stat().st_size}
        tag = (a.shape or a.source).replace(":", "_").replace("/", "_")
        for name in sets:
            bundle = work / f"{tag}-{name}"
            made.append(bundle)
            export = [sejd, "export", source, "-o", bundle] + SETS[name]
            build = [sejd, "build", bundle, "--backend", a.backend]
            checks = {m: [sejd, "check", bundle, "--backend", a.backend] + CHECK_MODES[m] + a.check_args.split()
                      for m in modes}
            commands = {"export": export, "build": build, **{f"check[{m}]": c for m, c in checks.items()}}
            s = result["sets"][name] = {"commands": {k: " ".join(map(str, v)) for k, v in commands.items()}}
            runs = []
            for i in range(a.repeats):
                log(f"{name}: export {i + 1}/{a.repeats}")
                shutil.rmtree(bundle, ignore_errors=True)
                runs.append(run_child(export, a.timeout))
                if runs[-1]["exit_code"] or runs[-1]["timed_out"]:
                    break
            s["export"] = summarize(runs)
            if runs[-1]["exit_code"] or runs[-1]["timed_out"]:
                log(f"{name}: export failed; skipping its build and check")
                continue
            s["bundle_bytes"] = tree_bytes(bundle, skip="engines")
            s.update(bundle_graphs(bundle))
            log(f"{name}: bundle {s['bundle_bytes'] / 2**30:.3f} GiB, {s['graphs']} graphs "
                f"({', '.join(s['variants'])})")
            runs = []
            for i in range(a.repeats):
                log(f"{name}: build {i + 1}/{a.repeats}")
                runs.append(run_child(build, a.timeout))
                if runs[-1]["exit_code"] or runs[-1]["timed_out"]:
                    break
            s["build"] = summarize(runs)
            s["engines_bytes"] = tree_bytes(bundle / "engines" / a.backend)
            if runs[-1]["exit_code"] or runs[-1]["timed_out"]:
                log(f"{name}: build failed; skipping its check")
                continue
            s["check"] = {}
            for mode, argv in checks.items():
                runs = []
                for i in range(a.repeats):
                    log(f"{name}: check[{mode}] {i + 1}/{a.repeats}")
                    runs.append(run_child(argv, a.check_timeout))
                    if runs[-1]["timed_out"]:  # another try would time out too
                        break
                s["check"][mode] = summarize(runs)
            if not a.keep and a.shape:  # published-size bundles: free the disk before the next set
                shutil.rmtree(bundle, ignore_errors=True)
        result["machine"] = machine(python)
    finally:
        if not a.keep:
            for path in made:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                elif path.exists():
                    path.unlink()
    if {"all", "default"} <= set(result["sets"]):
        d, al = result["sets"]["default"], result["sets"]["all"]

        def get(s, *keys):
            for k in keys:
                s = s.get(k) if isinstance(s, dict) else None
            return s

        pairs = {"bundle_bytes": ("bundle_bytes",), "graphs": ("graphs",),
                 "export_seconds": ("export", "seconds_median"),
                 "export_peak_rss_bytes": ("export", "peak_rss_bytes_median"),
                 "build_seconds": ("build", "seconds_median"),
                 "build_peak_rss_bytes": ("build", "peak_rss_bytes_median"),
                 "engines_bytes": ("engines_bytes",)}
        for m in modes:
            pairs[f"check_{m}_seconds"] = ("check", m, "seconds_median")
            pairs[f"check_{m}_peak_rss_bytes"] = ("check", m, "peak_rss_bytes_median")
        result["default_vs_all"] = {k: {"all": get(al, *path), "default": get(d, *path),
                                        "ratio": ratio(get(d, *path), get(al, *path))} for k, path in pairs.items()}
    print(table(result), file=sys.stderr)
    text = json.dumps(result, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")
    failed = [f"{n}:{stage}" for n, s in result["sets"].items() for stage, st in
              [("export", s.get("export")), ("build", s.get("build"))] + [(f"check[{m}]", c) for m, c in
                                                                         s.get("check", {}).items()]
              if st and any(r["exit_code"] and not r["timed_out"] for r in st["runs"])]
    failed += [n for n, s in result["sets"].items() if not s.get("check")]
    if failed:
        log(f"failed or missing: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
