"""Weights stored once: ONNX graphs whose initializers live in shared, content-addressed weight files.

Every graph of a block references one external-data file, `blocks/<k>/weights.bin` (offsets and
lengths in each tensor's `external_data`, the location relative to the graph's own folder, as ONNX
requires). A tensor is stored by the sha256 of its raw bytes: equal tensors, in any graph of the
bundle, are stored once and referenced at one offset, so a further variant of a block adds only its
topology. Tensors of at most `INLINE_MAX_BYTES` (scalars, shapes, index constants) stay inside the
graph: moving them out would cost a file read each and save nothing.

The same store re-bases graphs whose tensors already sit in other external files (torch's own
per-tensor files for a graph over protobuf's 2 GB, ONNX Runtime's optimised-model initializer files),
so no step ever serialises a ModelProto holding the weights.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
from pathlib import Path

import onnx
from onnx import numpy_helper

INLINE_MAX_BYTES = 1024
# Offsets of tensors of at least ALIGN bytes are multiples of it: ONNX Runtime memory-maps external data
# whose offset is aligned to the allocation granularity (64 KiB covers every platform) instead of copying
# it. Smaller tensors are copied anyway; they are only aligned to SMALL_ALIGN (vector loads), which keeps
# the padding negligible on small models too.
ALIGN = 1 << 16
SMALL_ALIGN = 64
WEIGHTS_FILE = "weights.bin"


class WeightStore:
    """Content-addressed external data under `root`: `put` appends a tensor's bytes to the current file
    (see `target`) unless an equal tensor is already stored in any file of this store."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.index: dict[bytes, list[tuple[str, int, int]]] = {}  # sha256 -> [(file, offset, length)]
        self.bytes_written = 0
        self.bytes_deduplicated = 0
        self._rel: str | None = None
        self._file = None

    def target(self, rel: str) -> None:
        """New tensors go to `rel` (relative to the root) from now on; the file is created on the first
        tensor that is not already stored elsewhere."""
        self.close()
        self._rel = rel

    def put(self, data, graph_dir: Path | None = None) -> tuple[str, int, int]:
        """Where `data` is stored: (file, offset, length). A copy already stored is reused when the graph
        in `graph_dir` may reference it (ONNX and ONNX Runtime refuse external data outside the graph's
        folder: a block's graphs can use only their own block's file, the forward graph every file)."""
        data = memoryview(data).cast("B")
        key = hashlib.sha256(data).digest()
        for where in self.index.get(key, ()):
            if graph_dir is None or _lexically_under(self.root / where[0], graph_dir):
                self.bytes_deduplicated += len(data)
                return where
        assert self._rel is not None, "WeightStore.target() must name a file before put()"
        if self._file is None:
            (self.root / self._rel).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.root / self._rel, "ab")
        align = ALIGN if len(data) >= ALIGN else SMALL_ALIGN
        offset = -(-self._file.tell() // align) * align
        self._file.write(b"\0" * (offset - self._file.tell()))
        self._file.write(data)
        self._file.flush()  # graphs saved next are checked and loaded by path, from other handles
        self.bytes_written += len(data)
        self.index.setdefault(key, []).append((self._rel, offset, len(data)))
        return self.index[key][-1]

    def files(self) -> list[str]:
        return sorted({rel for places in self.index.values() for rel, _, _ in places})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _graphs(graph: onnx.GraphProto):
    """The graph and every subgraph in it (Loop bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            for g in attr.graphs:
                yield from _graphs(g)


def all_tensors(model: onnx.ModelProto):
    """Every initializer of the model, those of subgraphs (Loop bodies) included."""
    for graph in _graphs(model.graph):
        yield from graph.initializer


def attribute_tensors(model: onnx.ModelProto):
    """Every tensor held in a node attribute (a Constant's value), those of subgraphs included."""
    for graph in _graphs(model.graph):
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                yield from attr.tensors


def tensor_bytes(tensor: onnx.TensorProto, base_dir: Path | None, own: bool = False) -> bytes:
    """The raw little-endian bytes of a tensor, wherever they are stored (external files relative to
    `base_dir`, raw_data, or the typed fields). External data is read as the bundle's file table is
    (`external_data`): a location outside `base_dir` or a length the file cannot hold is refused before a byte
    is read. `own`: `base_dir` is sejd's own scratch of torch's export, whose per-tensor files have no length."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return external_data(tensor, base_dir, own)
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


# bytes per element of the fixed-width ONNX types (the others, strings and 4-bit types, are bounded by the file)
_ITEM_BYTES = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.FLOAT16: 2,
               onnx.TensorProto.BFLOAT16: 2, onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT8: 1,
               onnx.TensorProto.INT16: 2, onnx.TensorProto.UINT16: 2, onnx.TensorProto.INT32: 4,
               onnx.TensorProto.UINT32: 4, onnx.TensorProto.INT64: 8, onnx.TensorProto.UINT64: 8,
               onnx.TensorProto.BOOL: 1}


def external_data(tensor: onnx.TensorProto, base_dir: Path | None, own: bool = False) -> bytes:
    """The bytes of an external tensor, confined like every file a bundle names: `location` a relative,
    normalised POSIX path resolving to a regular file inside `base_dir` (the graph's folder), opened without
    following a link, `offset` and `length` integers that stay inside that file, the length that of the
    tensor's shape and type. Anything else is a BundleError naming the tensor and the rule it breaks."""
    from sejd.export.bundle import PATH_RULE, BundleError, path_rule_broken

    info = {e.key: e.value for e in tensor.external_data}
    where = f"{base_dir}: external data of tensor {tensor.name!r}"
    if base_dir is None:
        raise BundleError(f"tensor {tensor.name!r}: its data is external, but the graph's folder is unknown")
    rel = info.get("location")
    # torch names its own files after tensors; they are confined below like any other location
    broken = path_rule_broken(rel) if not own or not isinstance(rel, str) or not rel else None
    if broken:
        raise BundleError(f"{where}: location {rel!r} {broken}; {PATH_RULE}")
    offset = _count(info, "offset", where, 0)
    length = _count(info, "length", where, None)
    if length is None and not own:
        raise BundleError(f"{where}: no length (every external tensor states its offset and length)")
    root = Path(base_dir).resolve()
    try:
        real = (Path(base_dir) / rel).resolve(strict=True)
    except FileNotFoundError:
        raise BundleError(f"{where}: location {rel} does not exist") from None
    except (OSError, RuntimeError, ValueError) as e:
        raise BundleError(f"{where}: location {rel!r} cannot be resolved ({e})") from None
    if root not in real.parents:
        raise BundleError(f"{where}: location {rel} resolves to {real}, outside the graph's folder {base_dir}; "
                          f"{PATH_RULE}")
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{where}: location {rel} is not a regular file; {PATH_RULE}")
        if length is None:
            length = max(0, st.st_size - offset)
        if offset + length > st.st_size:
            raise BundleError(f"{where}: offset {offset} + length {length} is past the end of {rel} "
                              f"({st.st_size} bytes)")
        item = _ITEM_BYTES.get(tensor.data_type)
        if item is not None:
            expected = item * math.prod(tensor.dims)
            if length != expected:
                raise BundleError(f"{where}: length {length} is not the {expected} bytes of its shape "
                                  f"{list(tensor.dims)} and type")
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise BundleError(f"{where}: {rel} ended after {len(data)} of {length} bytes")
    return data


def _count(info: dict, key: str, where: str, default):
    """An external-data field that must be a non-negative decimal integer (`default` when absent)."""
    from sejd.export.bundle import BundleError

    value = info.get(key)
    if value is None:
        return default
    if not (value.isascii() and value.isdigit() and len(value) <= 20):
        raise BundleError(f"{where}: {key} {value[:40]!r} is not a non-negative integer")
    return int(value)


def externalize(model: onnx.ModelProto, graph_rel: str, store: WeightStore, base_dir: Path | None = None,
                inline_max: int = INLINE_MAX_BYTES, own: bool = False, sources: dict | None = None) -> None:
    """Point every tensor over `inline_max` bytes of `model` (to be saved at `graph_rel` under the store's
    root) into the store, in place; smaller ones are made inline. `base_dir`: where the model's current
    external data lives (`own`: sejd's scratch of torch's export, see `tensor_bytes`). `sources`: real
    tensors by initializer name, for the placeholders of a lean trace (`sejd.export.lean`), read one at a time."""
    graph_dir = (store.root / graph_rel).parent
    for t in all_tensors(model):
        data = _source_data(t, sources[t.name]) if sources and t.name in sources else tensor_bytes(t, base_dir, own)
        _clear_data(t)
        if len(data) <= inline_max:
            t.raw_data = data
            continue
        rel, offset, length = store.put(data, graph_dir)
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", os.path.relpath(store.root / rel, graph_dir)), ("offset", str(offset)),
                           ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
    # torch writes a graph over 2 GB with its Constants' values outside too (unfolded ones: a lean trace's):
    # they are small, and made inline
    for t in attribute_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            data = tensor_bytes(t, base_dir, own)
            _clear_data(t)
            t.raw_data = data


def _source_data(t: onnx.TensorProto, source) -> bytes:
    from sejd.export.lean import float32_data

    assert t.data_type == onnx.TensorProto.FLOAT and list(t.dims) == list(source.shape), \
        f"lean initializer {t.name}: {list(t.dims)} (type {t.data_type}) is not its source's {list(source.shape)}"
    return float32_data(source)


def _lexically_under(path: Path, folder: Path) -> bool:
    return not os.path.relpath(path, folder).startswith("..")


def _clear_data(t: onnx.TensorProto) -> None:
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                  "string_data", "external_data"):
        t.ClearField(field)
    t.data_location = onnx.TensorProto.DEFAULT


def save_external(model: onnx.ModelProto, graph_rel: str, store: WeightStore, base_dir: Path | None = None,
                  inline_max: int = INLINE_MAX_BYTES) -> Path:
    """Externalise `model` into the store and save its topology at root/graph_rel."""
    externalize(model, graph_rel, store, base_dir, inline_max)
    return save_topology(model, store.root / graph_rel)


def save_topology(model: onnx.ModelProto, path: Path) -> Path:
    """Save a model whose tensors are already external (or small and inline) at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, path)
    return path


def _raw(t) -> memoryview:
    """A torch tensor's bytes, any dtype (bfloat16 included), row-major."""
    import torch

    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def _sources(named: dict) -> dict[bytes, list[tuple[str, bool]]]:
    """sha256 of each tensor's bytes, and of each matrix's transpose (the exporter folds Linear weights
    into MatMul's right-hand side) -> the (name, transposed) pairs that produce them."""
    index: dict[bytes, list[tuple[str, bool]]] = {}
    for name, t in named.items():
        for transposed in ((False, True) if t.dim() == 2 else (False,)):
            index.setdefault(hashlib.sha256(_raw(t.T if transposed else t)).digest(), []).append((name, transposed))
    return index


class Retarget:
    """One block's exported graph as the template of the same variant for the other blocks: the blocks'
    graphs have one topology (the flip of odd blocks is in their position table, a buffer), so another
    block's graph is the template with each initializer taken from that block's tensor it came from
    (found by content: the same tensor or its transpose); initializers equal to no tensor are constants
    of the topology and kept. Re-tracing costs a minute per block at the published size, this a second.

    `named`: the tensors of the exported module (parameters and buffers by name) for a block."""

    def __init__(self, template: onnx.ModelProto, base_dir: Path | None, named: dict):
        self.template, self.base_dir = onnx.ModelProto(), base_dir
        self.template.CopyFrom(template)
        index = _sources(named)
        self.sources = [index.get(hashlib.sha256(tensor_bytes(t, base_dir)).digest(), [])
                        for t in all_tensors(self.template)]

    def graph(self, named: dict) -> onnx.ModelProto | None:
        """The template with `named`'s tensors, all inline; None where it cannot be told which tensor an
        initializer comes from (two tensors that were equal in the template's block differ here)."""
        model = onnx.ModelProto()
        model.CopyFrom(self.template)
        for t, sources in zip(all_tensors(model), self.sources):
            if sources:
                found = {bytes(_raw(named[n].T if tr else named[n])) for n, tr in sources}
                if len(found) != 1:
                    return None
                data = found.pop()
            else:
                data = tensor_bytes(t, self.base_dir)
            _clear_data(t)
            t.raw_data = data
        return model

    def confirm(self, traced: onnx.ModelProto, base_dir: Path, named: dict, own: bool = False) -> bool:
        """Check the template against a second block's traced graph (`named`: that block's tensors) and
        narrow each initializer's sources to those that give that graph's bytes (e.g. block 0's position
        table equals both its `pos_embed` and the permuted `pos`; block 1's tells them apart). True when
        the template, re-targeted to that block, reproduces its graph exactly: topology and every
        initializer; the proof that re-targeting holds for this variant."""
        ours, theirs = list(all_tensors(self.template)), list(all_tensors(traced))
        if len(ours) != len(theirs):
            return False
        for i, (t, u) in enumerate(zip(ours, theirs)):
            want = tensor_bytes(u, base_dir, own)
            if not self.sources[i]:
                if tensor_bytes(t, self.base_dir) != want:
                    return False  # a tensor computed from the weights in a way not re-targeted here
                continue
            self.sources[i] = [(n, tr) for n, tr in self.sources[i] if _raw(named[n].T if tr else named[n]) == want]
            if not self.sources[i]:
                return False
        return _topology(self.template) == _topology(traced)


def _topology(model: onnx.ModelProto) -> bytes:
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    for t in all_tensors(bare):
        _clear_data(t)
    return bare.SerializeToString()
