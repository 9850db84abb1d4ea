"""The Triton Inference Server Python-backend model that `sejd export-triton` repositories run (their
`model.py` imports this class).

One batch row is one sample: SEED (int64), optional LABEL (int64, -1 = unconditional) and GUIDANCE (fp32)
-> IMAGE (fp32, C x H x W in [-1, 1]). Rows are validated with the HTTP service's schema and sampled by the
same `SampleService`, so a row's image equals `sejd sample -n 1 --seed SEED --per-sample` bit for bit.
`triton_python_backend_utils` exists only inside Triton's Python backend (the tests stub it).
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from sejd.serve.service import SamplingFailed


class TritonPythonModel:
    def initialize(self, args):
        from sejd.serve.service import SampleService
        from sejd.workflows.source import open_source

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        bundle = Path(args["model_repository"]) / args["model_version"] / "bundle"
        self.service = SampleService(open_source(str(bundle), params["sejd_backend"]))
        self.plan = params["sejd_plan"]

    def rows(self, request) -> list:
        """A Triton request's rows as validated SampleRequests (RequestError names the bad field)."""
        seeds = pb_utils.get_input_tensor_by_name(request, "SEED").as_numpy().reshape(-1)
        label_t = pb_utils.get_input_tensor_by_name(request, "LABEL")
        guide_t = pb_utils.get_input_tensor_by_name(request, "GUIDANCE")
        labels = label_t.as_numpy().reshape(-1) if label_t is not None else [None] * len(seeds)
        guides = guide_t.as_numpy().reshape(-1) if guide_t is not None else [0.0] * len(seeds)
        rows = []
        for seed, label, guidance in zip(seeds, labels, guides):
            body = {"n": 1, "seed": int(seed), "guidance": float(guidance), "plan": self.plan}
            if label is not None:
                body["label"] = int(label)
            rows.append(self.service.parse(body))
        return rows

    def execute(self, requests):
        responses, rows, owners = [], [], []
        for r, request in enumerate(requests):
            try:
                mine = self.rows(request)
            except Exception as e:  # a bad request fails alone
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
                continue
            rows += mine
            owners += [r] * len(mine)
            responses.append(None)
        images: dict[int, list] = {}
        failed: dict[int, str] = {}
        for owner, result in zip(owners, self.service.run_batch(rows) if rows else []):
            if isinstance(result, SamplingFailed):  # the engine batch of this row failed: so does its request
                failed[owner] = str(result)
            else:
                images.setdefault(owner, []).append(result.images.numpy())
        for r, response in enumerate(responses):
            if response is not None:
                continue
            if r in failed:
                responses[r] = pb_utils.InferenceResponse(error=pb_utils.TritonError(failed[r]))
            else:
                out = pb_utils.Tensor("IMAGE", np.concatenate(images[r]).astype(np.float32))
                responses[r] = pb_utils.InferenceResponse(output_tensors=[out])
        return responses

    def finalize(self):
        self.service = None
