"""Text conditioning for STARFlow text-to-image: prompt embeddings from a `.npy` file, or from a local T5 encoder.

STARFlow (apple/ml-starflow) conditions on the `last_hidden_state` of the flan-t5-xl encoder (width 2048): the
prompt is tokenized with padding to `max_length` = the model's `txt_size` (128) and truncation, and the rows of
padded positions are multiplied by the attention mask, i.e. are exactly zero. Classifier-free guidance uses the
encoding of the empty prompt "" as the unconditional text.

Two ways in, neither of which ever downloads anything:
- `load_text_embeddings(path, length, width)`: embeddings computed elsewhere, saved with `numpy.save`;
- `TextEncoder(folder)`: a T5 encoder and its tokenizer saved in a local folder (`save_pretrained`), loaded on
  first use with `local_files_only=True`. Needs the `text` extra (`pip install 'sejd[text]'`).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch

from sejd.core.errors import CheckpointError, InputError
from sejd.core.extras import MissingExtra, require
from sejd.core.files import read_regular
from sejd.core.npy import NPY_MAGIC, npy_header

EMBEDDINGS_MAX_BYTES = 4 << 30  # a .npy of prompt embeddings is read whole: ~2000 prompts of 128 x 2048 float32
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")  # a T5 tokenizer: the fast one's file or sentencepiece's model
_FLOAT_KINDS = ("f",)  # float16/32/64 are accepted and converted to float32


def load_text_embeddings(path: str | os.PathLike, length: int, width: int,
                         limit: int = EMBEDDINGS_MAX_BYTES) -> torch.Tensor:
    """Prompt embeddings (n, length, width) float32 from a `.npy` file holding a float array of shape
    (length, width) (one prompt) or (n, length, width). The file must be a regular file of at most `limit`
    bytes (a FIFO or device is refused, not waited on); pickled (object) arrays are never loaded. A wrong
    shape, dtype or a non-finite value is an `InputError` naming what was expected and what came."""
    what = "the text-embeddings file"
    if Path(path).is_dir():  # read_regular's os.fdopen raises IsADirectoryError for a folder before it checks
        raise InputError(f"{path}: {what} is a directory; expected a regular file")
    data = read_regular(path, what, limit, InputError)
    if data.startswith(b"PK"):
        raise InputError(f"{path}: {what} is a .npz (zip) archive; expected a single array saved with numpy.save")
    if not data.startswith(NPY_MAGIC):  # numpy.load would take anything else for a pickle
        raise InputError(f"{path}: {what} is not a .npy array (no NPY header); expected a float array saved "
                         f"with numpy.save")
    expected = f"(n, {length}, {width}) or ({length}, {width})"
    # the header first: its dtype and shape are checked, and the data's size against them, before numpy
    # allocates the array the header claims (a forged shape must not ask for terabytes)
    try:
        shape, _, dtype, start = npy_header(data)
    except ValueError as e:
        raise InputError(f"{path}: {what} is not a readable .npy array ({e})") from None
    if dtype.hasobject:
        raise InputError(f"{path}: {what} holds a pickled (object) array, which sejd never loads; "
                         f"expected a float array saved with numpy.save")
    if dtype.kind not in _FLOAT_KINDS or dtype.fields is not None:
        raise InputError(f"{path}: {what} has dtype {dtype}; expected a float array of shape {expected}")
    got = tuple(shape)
    if len(got) not in (2, 3):
        raise InputError(f"{path}: {what} has shape {got} ({len(got)} dimensions); expected {expected}")
    if got[-2:] != (length, width) or (len(got) == 3 and got[0] < 1):
        raise InputError(f"{path}: {what} has shape {got}; expected {expected} with n >= 1 "
                         f"(length = the model's text length, width = its text width)")
    need = int(np.prod(got, dtype=np.int64)) * dtype.itemsize
    if len(data) - start < need:
        raise InputError(f"{path}: {what} is truncated: its header says {got} {dtype} ({need:,} bytes of data), "
                         f"the file holds {len(data) - start:,}")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise InputError(f"{path}: {what} is not a readable .npy array ({e})") from None
    if array.ndim == 2:
        array = array[None]
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, refused just below
        out = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if not torch.isfinite(out).all():
        bad = int((~torch.isfinite(out)).sum())
        raise InputError(f"{path}: {what} holds {bad} non-finite value(s) (NaN or inf, as float32); "
                         f"expected finite embeddings")
    return out


def _model_folder(path: str | os.PathLike, what: str) -> Path:
    """`path` as an existing folder holding a `config.json`, or a one-line CheckpointError."""
    folder = Path(path)
    if not folder.is_dir():
        state = "does not exist" if not folder.exists() else "is not a folder"
        raise CheckpointError(f"{folder}: {what} {state}; expected a local folder saved with save_pretrained "
                              f"(sejd never downloads)")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: {what} has no config.json; expected a folder saved with save_pretrained")
    return folder


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


class TextEncoder:
    """A T5 encoder and its tokenizer from a local folder, loaded on first use (never downloaded).

    `encode(prompts, length)` follows apple/ml-starflow: tokens padded to `length` and truncated to it, the
    encoder's `last_hidden_state`, the rows of padded positions multiplied by the attention mask (zero)."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = 32):
        self.path = _model_folder(path, "the text-encoder folder")
        if not any((self.path / name).is_file() for name in TOKENIZER_FILES):
            # checked here: given no tokenizer file, transformers may build a placeholder tokenizer silently
            raise CheckpointError(f"{self.path}: the text-encoder folder has no tokenizer "
                                  f"({' or '.join(TOKENIZER_FILES)}); expected the T5 tokenizer saved beside the encoder")
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, max(1, int(batch_size))
        self._model = self._tokenizer = None

    def load(self) -> TextEncoder:
        """Load the tokenizer and encoder (once); a missing package names the `text` extra."""
        if self._model is not None:
            return self
        what = "encoding text prompts (a T5 encoder folder)"
        transformers = require("transformers", what)
        if not (self.path / "tokenizer.json").is_file():  # only a sentencepiece model: its reader is needed
            require("sentencepiece", what)
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        except ImportError as e:
            raise MissingExtra(f"{self.path}: the tokenizer needs a package that is not installed "
                               f"({_one_line(e)}); pip install 'sejd[text]'") from None
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{self.path}: cannot load the tokenizer: {_one_line(e)}") from None
        try:
            model = transformers.T5EncoderModel.from_pretrained(str(self.path), local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{self.path}: cannot load the T5 encoder: {_one_line(e)}") from None
        self._tokenizer, self._model = tokenizer, model.to(device=self.device, dtype=self.dtype).eval()
        return self

    @property
    def width(self) -> int:
        """The encoder's output width (d_model: 2048 for flan-t5-xl)."""
        return int(self.load()._model.config.d_model)

    @torch.inference_mode()
    def encode(self, prompts: list[str], length: int) -> torch.Tensor:
        """(n, length, width) float32 on this encoder's device: one row of embeddings per token position,
        zeros where the tokenizer padded."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise InputError(f"prompts must be a list of strings, got {type(prompts).__name__}"
                             + ("" if isinstance(prompts, str) else
                                f" holding {sorted({type(p).__name__ for p in prompts})}"))
        if not prompts:
            raise InputError("no prompts to encode; expected at least one (\"\" is the unconditional prompt)")
        if int(length) < 1:
            raise InputError(f"text length must be at least 1, got {length}")
        self.load()
        rows = []
        for start in range(0, len(prompts), self.batch_size):
            batch = self._tokenizer(list(prompts[start:start + self.batch_size]), padding="max_length",
                                    max_length=int(length), truncation=True, return_tensors="pt")
            ids = batch["input_ids"].to(self.device)
            mask = batch["attention_mask"].to(self.device)
            hidden = self._model(input_ids=ids, attention_mask=mask).last_hidden_state
            rows.append((hidden * mask[..., None].to(hidden.dtype)).float())
        return torch.cat(rows)

    def unconditional(self, length: int) -> torch.Tensor:
        """(1, length, width): the encoding of "" (ml-starflow's null text for guidance)."""
        return self.encode([""], length)


def unconditional_embedding(length: int, width: int, encoder: TextEncoder | None = None) -> torch.Tensor:
    """The unconditional text (1, length, width) float32 for classifier-free guidance.

    With an `encoder`: its encoding of "" — what ml-starflow uses. Without one: zeros, an approximation used
    when only precomputed prompt embeddings are given (the encoding of "" is zero only at its padded
    positions: its first row, the end-of-sequence token's, is not), so guided samples then differ from
    ml-starflow's; save the encoding of "" with the prompts' to match them."""
    if encoder is None:
        return torch.zeros(1, int(length), int(width))
    if encoder.width != width:
        raise InputError(f"the text encoder at {encoder.path} has width {encoder.width}; the model expects {width}")
    return encoder.unconditional(length)
