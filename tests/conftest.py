"""Shared fixtures: tiny seeded TarFlows whose every block does something (proj_out is not zero)."""

import pytest
import torch

from sejd.export.contracts import VARIANTS
from sejd.model.tarflow import TarFlow, TarFlowConfig

# the tiny test models run fastest on one thread, and do not fight other processes for cores
torch.set_num_threads(1)


def make_model(seed=0, **overrides) -> TarFlow:
    kw = dict(in_channels=3, img_size=8, patch_size=2, channels=64, num_blocks=4, layers_per_block=2,
              head_dim=32, num_classes=5)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = TarFlow(TarFlowConfig(**kw)).eval()
    with torch.no_grad():
        for b in model.blocks:  # ml-tarflow starts proj_out at zero (identity flow): make it non-trivial
            b.proj_out.weight.normal_(0, 0.02)
        model.var.uniform_(0.5, 1.5)
    return model.requires_grad_(False)


# Blocks other than ml-tarflow's, each one edit of the block's declaration (sejd/model/block.py, through the
# config): every backend must run them with no other change. MLP width 144 = 3 x 48 is not a multiple of the
# native step's 32-column weight panels.
OTHER_BLOCKS = {
    "mlp-width": dict(seed=9, channels=48, head_dim=24, expansion=3),
    "no-biases": dict(seed=11, bias=False),
}


def data_like(model, batch, seed=1):
    """Images in [-1, 1] and the noise the model maps them to, so decoding has a known answer."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, cfg.in_channels, cfg.img_size, cfg.img_size, generator=g) * 2 - 1
    return x


@pytest.fixture
def model():
    return make_model()


@pytest.fixture
def uncond_model():
    return make_model(seed=3, num_classes=0)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """The tiny model exported (jacobi_k unrolled 4x) and built for ort-cpu, shared by the engine tests."""
    from sejd import save_checkpoint
    from sejd.engines.ort import build_ort
    from sejd.export.exporter import export_bundle

    root = tmp_path_factory.mktemp("tiny_bundle")
    save_checkpoint(make_model(), root / "ckpt")
    bundle = export_bundle(root / "ckpt", root / "bundle", variants=VARIANTS, unroll=4, show_progress=False)
    build_ort(bundle, "ort-cpu", show_progress=False)
    return bundle


def rms_norm_spec(spec):
    """`spec` with its layer norms declared as an op kind nothing implements yet (rms_norm): for tests
    that an undeclared kind is refused, never skipped."""
    import dataclasses

    from sejd.model.block import BlockSpec

    class RmsNorm(BlockSpec):
        @property
        def layer(self):
            return tuple(dataclasses.replace(op, kind="rms_norm") if op.kind == "layer_norm" else op
                         for op in super().layer)

    return RmsNorm(**dataclasses.asdict(spec))
