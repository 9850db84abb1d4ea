"""The files of built engines: engines/BACKEND/manifest.json, the files it lists (each confined to the
bundle and verified by hash), and what a backend checks before it runs them (built from this export of
the bundle, for this runtime and platform)."""

from __future__ import annotations


def engine_dir(bundle, backend: str):
    return bundle.path / "engines" / backend


def engine_manifest(bundle, backend: str) -> dict | None:
    """engines/BACKEND/manifest.json as a checked object (its `files` table well formed; the files themselves
    are verified by read_engine_manifest); None when no engines were built."""
    from sejd.export.bundle import check_file_table, read_json_object

    mf = engine_dir(bundle, backend) / "manifest.json"
    if not mf.exists():
        return None
    m = read_json_object(mf, f"the {backend} engine manifest", root=bundle.path)  # no link out of the bundle
    check_file_table(m, mf)
    return m


def engine_file(bundle, backend: str, rel: str, manifest: dict):
    """The engine file `rel` of engines/BACKEND, which its manifest must list, confined to the bundle."""
    from sejd.export.bundle import confined_file

    where = engine_dir(bundle, backend) / "manifest.json"
    if rel not in manifest["files"]:
        from sejd.export.bundle import BundleError
        raise BundleError(f"{where}: engine file {rel} is not listed in the engine manifest's files; "
                          f"{_rebuild(bundle, backend)}")
    # confined to the bundle, not to engines/BACKEND, so that a symlinked engines folder cannot leave it
    return confined_file(bundle.path, f"engines/{backend}/{rel}", "engine file", where,
                         remedy=_rebuild(bundle, backend))


def _rebuild(bundle, backend: str) -> str:
    return f"rebuild them with `sejd build {bundle.path} --backend {backend}`"


def read_engine_manifest(bundle, backend: str, runtime_mismatch) -> dict:
    """engines/BACKEND/manifest.json, verified: built from this export of the bundle, for a runtime that
    `runtime_mismatch(manifest)` accepts (None, else a sentence saying what differs), every file unchanged."""
    from sejd.export.bundle import BundleError, sha256_file

    rebuild = _rebuild(bundle, backend)
    mf = engine_dir(bundle, backend) / "manifest.json"
    m = engine_manifest(bundle, backend)
    if m is None:
        raise BundleError(f"{bundle.path}: no {backend} engines; build them with `sejd build {bundle.path} "
                          f"--backend {backend}`")
    if m.get("bundle_manifest_sha256") != bundle.manifest_sha256:
        raise BundleError(f"{mf}: engines were built from another export of this bundle; {rebuild}")
    mismatch = runtime_mismatch(m)
    if mismatch:
        raise BundleError(f"{mf}: {mismatch}; {rebuild}")
    for rel, digest in m["files"].items():
        if sha256_file(engine_file(bundle, backend, rel, m)) != digest:
            raise BundleError(f"{bundle.path}: engine file engines/{backend}/{rel} is missing or changed; {rebuild}")
    return m
