"""The request schema of the sampling service: one pydantic model per served source, used by the HTTP
layer (FastAPI validates bodies with it and publishes it in `/openapi.json`) and by the Triton model.

Bounds depend on the source (its classes, the plans it serves, its batch_max), so the model is made per
source by `request_model`. Validation errors become `RequestError`s naming the first bad field.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import pydantic

from sejd.core.errors import SejdError
from sejd.runtime.request import GUIDANCE_MAX, SEED_MAX

FORMATS = ("base64", "npy", "png")


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


def first_error(errors, model) -> RequestError:
    """The first of pydantic's (or FastAPI's) validation errors as a RequestError naming its field and
    what the field expects. FastAPI's locations start with "body"."""
    e = errors[0]
    loc = [p for p in e.get("loc", ()) if p != "body"]
    field = str(loc[0]) if loc else "body"
    info = model.model_fields.get(field)
    expected = f"; expected {info.description}" if info is not None and info.description else ""
    if e.get("type") == "extra_forbidden":
        expected = f"; expected some of {sorted(model.model_fields)}"
    elif e.get("type") == "json_invalid":
        return RequestError("body", f"not valid JSON ({e.get('ctx', {}).get('error', e.get('msg'))})")
    got = repr(e.get("input"))[:40] if "input" in e and loc else ""
    return RequestError(field, f"{e.get('msg', 'invalid')}{expected}" + (f", got {got}" if got else ""))
