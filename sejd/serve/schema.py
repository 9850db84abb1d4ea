"""The request schema of the sampling service: one pydantic model per served source, used by the HTTP
layer (FastAPI validates bodies with it and publishes it in `/openapi.json`) and by the Triton model.

Bounds depend on the source (its classes, the plans it serves, its batch_max), so the model is made per
source by `request_model` (a TarFlow: labels) or `starflow_request_model` (a STARFlow: text embeddings as
base64 `.npy`, or prompts where the service has a text encoder). Validation errors become `RequestError`s
naming the first bad field; `decode_text` turns a base64 `.npy` field into checked embeddings.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from typing import Literal, Optional, Union

import numpy as np
import pydantic

from sejd.core.errors import SejdError
from sejd.core.npy import NPY_MAGIC, npy_header
from sejd.runtime.request import GUIDANCE_MAX, SEED_MAX

FORMATS = ("base64", "npy", "png")
TEXT_FIELDS = ("text_embeddings", "uncond_text_embeddings", "prompt")
# a field of the other family, refused with what this model takes instead (the schema forbids extra fields)
FOREIGN_FIELDS = {
    "label": "a STARFlow model is text-conditioned and takes no label; give text_embeddings (or prompt)",
    **{f: "is for STARFlow (text-to-image) models; this model is a TarFlow: give label (or omit it)"
       for f in TEXT_FIELDS},
}


class RequestError(SejdError):
    """A request that cannot be served as given (HTTP 4xx, a Triton request error); names the field."""

    def __init__(self, field: str, message: str, status: int = 400):
        super().__init__(f"{field}: {message}")
        self.field, self.status = field, status

    def to_dict(self) -> dict:
        return {"error": str(self), "field": self.field}


@dataclasses.dataclass(frozen=True)
class SampleRequest:
    n: int = 1
    seed: int = 0
    label: int | None = None
    guidance: float = 0.0
    plan: str = "auto"
    format: str = "base64"
    # STARFlow: text (k, Lt, Dt) float32, k = 1 (every sample's) or n; uncond_text (Lt, Dt) or (n, Lt, Dt);
    # prompt: k prompts for the service's text encoder (instead of text)
    text: object = None
    uncond_text: object = None
    prompt: tuple | None = None


def request_model(plans: tuple[str, ...], default_plan: str, max_n: int, num_classes: int):
    """A pydantic model of `POST /sample` bodies for a source with these plans, classes and batch bound."""
    label_max = num_classes - 1 if num_classes else -1  # -1 = unconditional, the only label of such a model
    fields = {
        "n": (int, pydantic.Field(1, ge=1, le=max_n, description=f"samples, 1..{max_n}")),
        "seed": (int, pydantic.Field(0, ge=0, le=SEED_MAX, description="noise seed, 0..2**63-1")),
        "label": (Optional[int], pydantic.Field(None, ge=-1, le=label_max, description=(
            f"class -1..{label_max} (-1 = unconditional; omitted: classes in turn)" if num_classes
            else "this model is unconditional: omit label or give -1"))),
        "guidance": (float, pydantic.Field(0.0, ge=0.0, le=GUIDANCE_MAX, allow_inf_nan=False, description=(
            f"classifier-free guidance, a finite number in 0..{GUIDANCE_MAX:g}"))),
        "plan": (Literal[plans], pydantic.Field(default_plan, description=f"one of {list(plans)}")),
        "format": (Literal[FORMATS], pydantic.Field("base64", description=(
            "base64: raw float32 with shape; npy: a .npy file; png: an image grid (all base64-encoded)"))),
    }
    # strict: "4" is not 4 and true is not 1; extra="forbid": a misspelt field is an error, not ignored
    config = pydantic.ConfigDict(extra="forbid", strict=True, title="SampleBody")
    return pydantic.create_model("SampleBody", __config__=config, **fields)


def starflow_request_model(plans: tuple[str, ...], default_plan: str, max_n: int, text_shape, prompts: bool,
                           png: bool):
    """A pydantic model of `POST /sample` bodies for a STARFlow: `text_shape` (Lt, Dt), or None for a model
    without a text block; `prompts`/`png`: the service has a text encoder / a VAE (said in the descriptions;
    a request that needs the missing one is refused by the service, naming it)."""
    if text_shape is None:
        text_desc = "this STARFlow model has no text block: omit it"
    else:
        Lt, Dt = text_shape
        text_desc = (f"the prompts' text-encoder embeddings: base64 of a float32 .npy of shape ({Lt}, {Dt}) "
                     f"(every sample's) or (n, {Lt}, {Dt})")
    fields = {
        "n": (Optional[int], pydantic.Field(None, ge=1, le=max_n, description=(
            f"samples, 1..{max_n} (omitted: one per text row or prompt)"))),
        "seed": (int, pydantic.Field(0, ge=0, le=SEED_MAX, description="noise seed, 0..2**63-1")),
        "text_embeddings": (Optional[str], pydantic.Field(None, description=text_desc)),
        "uncond_text_embeddings": (Optional[str], pydantic.Field(None, description=(
            "guidance's unconditional text, base64 .npy like text_embeddings (one row or n); omitted: "
            + ("the text encoder's encoding of \"\"" if prompts else "zeros (ml-starflow uses the encoding of \"\")")))),
        "prompt": (Optional[Union[str, list[str]]], pydantic.Field(None, description=(
            "a prompt (every sample's) or n prompts, encoded by the service's text encoder" if prompts
            else "needs a service started with --text-encoder DIR; give text_embeddings"))),
        "guidance": (float, pydantic.Field(0.0, ge=0.0, le=GUIDANCE_MAX, allow_inf_nan=False, description=(
            f"classifier-free guidance, a finite number in 0..{GUIDANCE_MAX:g}"))),
        "plan": (Literal[plans], pydantic.Field(default_plan, description=f"one of {list(plans)}")),
        "format": (Literal[FORMATS], pydantic.Field("npy", description=(
            "npy: the latents as a .npy file; base64: raw float32 latents with shape; png: an image grid "
            + ("decoded by the service's VAE" if png else "(needs a service started with --vae DIR)")
            + " (all base64-encoded)"))),
    }
    config = pydantic.ConfigDict(extra="forbid", strict=True, title="StarFlowSampleBody")
    return pydantic.create_model("StarFlowSampleBody", __config__=config, **fields)




def npy_b64_bytes(rows: int, length: int, width: int) -> int:
    """The size of base64 of a float32 .npy of (rows, length, width) (a header of at most 128 bytes)."""
    return 4 * -(-(128 + 4 * rows * length * width) // 3)


def decode_text(field: str, text: str, length: int, width: int):
    """A base64 `.npy` of a float array (length, width) or (k, length, width) -> a float32 tensor (k, length,
    width), or a RequestError naming what was expected and what came (base64, NPY header, dtype, shape:
    length and width, non-finite values). Pickled arrays are never loaded; the header's shape is checked
    against the data before any array is made."""
    import torch

    expected = f"(n, {length}, {width}) or ({length}, {width})"
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(field, f"not base64 ({e}); expected base64 of a float32 .npy of shape {expected}") \
            from None
    if not data.startswith(NPY_MAGIC):
        raise RequestError(field, f"not a .npy array (no NPY header, got {data[:8]!r}); expected base64 of "
                                  f"numpy.save of a float32 array of shape {expected}")
    try:
        shape, fortran, dtype, start = npy_header(data)
    except ValueError as e:
        raise RequestError(field, f"not a readable .npy array ({' '.join(str(e).split())[:200]})") from None
    if dtype.hasobject or dtype.kind != "f" or dtype.fields is not None:
        raise RequestError(field, f"dtype {dtype}; expected float32 (a float array of shape {expected})")
    got = tuple(shape)
    if len(got) not in (2, 3):
        raise RequestError(field, f"shape {got} ({len(got)} dimensions); expected {expected}")
    if got[-1] != width:
        raise RequestError(field, f"shape {got}: width {got[-1]}, expected {width} (the model's text width), "
                                  f"i.e. {expected}")
    if got[-2] != length:
        raise RequestError(field, f"shape {got}: length {got[-2]}, expected {length} (the model's text length, "
                                  f"padded), i.e. {expected}")
    if len(got) == 3 and got[0] < 1:
        raise RequestError(field, f"shape {got}: no rows; expected {expected} with n >= 1")
    need = int(np.prod(got, dtype=np.int64)) * dtype.itemsize
    if len(data) - start != need:
        raise RequestError(field, f"its header says {got} {dtype} ({need} bytes of data), it holds "
                                  f"{len(data) - start}")
    array = np.frombuffer(data, dtype=dtype, count=int(np.prod(got)), offset=start)
    array = array.reshape(got, order="F" if fortran else "C")
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, refused just below
        out = torch.from_numpy(np.array(array, dtype=np.float32, order="C"))
    if out.dim() == 2:
        out = out[None]
    bad = int((~torch.isfinite(out)).sum())
    if bad:
        raise RequestError(field, f"holds {bad} non-finite value(s) (NaN or inf, as float32); expected finite "
                                  f"embeddings")
    return out


def first_error(errors, model) -> RequestError:
    """The first of pydantic's (or FastAPI's) validation errors as a RequestError naming its field and
    what the field expects. FastAPI's locations start with "body"."""
    e = errors[0]
    loc = [p for p in e.get("loc", ()) if p != "body"]
    field = str(loc[0]) if loc else "body"
    info = model.model_fields.get(field)
    expected = f"; expected {info.description}" if info is not None and info.description else ""
    if e.get("type") == "extra_forbidden":
        if field in FOREIGN_FIELDS:
            return RequestError(field, FOREIGN_FIELDS[field])
        expected = f"; expected some of {sorted(model.model_fields)}"
    elif e.get("type") == "json_invalid":
        return RequestError("body", f"not valid JSON ({e.get('ctx', {}).get('error', e.get('msg'))})")
    got = repr(e.get("input"))[:40] if "input" in e and loc else ""
    return RequestError(field, f"{e.get('msg', 'invalid')}{expected}" + (f", got {got}" if got else ""))
