"""The `torch-cuda` backend: the export graph modules (`sejd.export.graphs`) run directly in PyTorch on
the GPU, with CUDA graphs, through the device runner (`sejd.engines.device_runner`).

The modules index the KV cache with position *tensors* and keep every shape static, which is exactly
what CUDA-graph capture needs. This is the baseline a GPU user would otherwise write by hand.
"""

from __future__ import annotations

from sejd.engines.backends import Backend, cuda_device_reason, model_of, register
from sejd.engines.device_runner import GraphModuleRunner, cuda_graphs_default
from sejd.export.graphs import precision_dtype
from sejd.model.tarflow import TarFlow
from sejd.runtime.runner import KVCachePool


def graph_runners(model: TarFlow, cuda_graphs: bool | None = None, precision: str = "fp32") -> list[GraphModuleRunner]:
    """One runner per block. CUDA graphs are on unless `cuda_graphs=False` or SEJD_CUDA_GRAPHS=0
    (eager CUDA: what the graphs save is measured against it). `precision`: fp32, fp16 or bf16."""
    cuda_graphs = cuda_graphs_default() if cuda_graphs is None else cuda_graphs
    dtype = precision_dtype(precision)
    pool = KVCachePool()  # one per set of runners: freed with them, shared by their blocks
    return [GraphModuleRunner(model, k, cuda_graphs, dtype, pool=pool) for k in range(model.config.num_blocks)]


class TorchCudaBackend(Backend):
    """`torch-cuda[:PRECISION]`: the export graph modules in PyTorch on the GPU, with CUDA graphs
    (sejd/engines/torch_cuda.py); `sejd check` compares the modules (rerun as the bundle's ONNX graphs)."""

    name = "torch-cuda"
    reference = False
    takes_precision = True

    def available(self):
        return cuda_device_reason()

    def _runners(self, source, precision, threads):
        return graph_runners(model_of(source).to("cuda"), precision=precision)

    def checked_graphs(self, bundle, config):
        from sejd.engines.polygraphy_runners import MODULE_VARIANTS
        from sejd.export.contracts import ALL_VARIANTS, block_variants

        every = bundle.manifest["graphs"] if bundle is not None else \
            [{"block": k, "variant": v} for k in range(config.num_blocks) for v in block_variants(config, k, ALL_VARIANTS)]
        return every, [g for g in every if g["variant"] in MODULE_VARIANTS]

    def polygraphy_runner(self, bundle, model=None, precision="fp32"):
        """`model`: the model on the device (the runners'), else the bundle's, moved there."""
        from sejd.engines.polygraphy_runners import module_runner

        self.require()
        model = bundle.load_model().to("cuda") if model is None else model
        return lambda g, c: module_runner(model, g["block"], c, precision)


register(TorchCudaBackend())
