"""An independent statement of ml-tarflow's forward pass (its einsum attention path, not SDPA),
reading a state dict in ml-tarflow's key layout. Used only as a test oracle for sejd's model. A state dict
without a layer's bias (a block without biases) adds none; the MLP's width is its weights' own."""

import torch


def _layer_norm(x, sd, prefix):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd.get(prefix + ".bias"))


def _linear(x, sd, prefix):
    out = x @ sd[prefix + ".weight"].T
    return out + sd[prefix + ".bias"] if prefix + ".bias" in sd else out


def block_forward(sd, i, x, y, num_layers, head_dim, nvp, flip):
    p = f"blocks.{i}"
    perm = (lambda t, dim=1: t.flip(dim)) if flip else (lambda t, dim=1: t)
    x = perm(x)
    x_in = x
    h = _linear(x, sd, p + ".proj_in") + perm(sd[p + ".pos_embed"], 0)
    if p + ".class_embed" in sd:
        ce = sd[p + ".class_embed"]
        if y is None:
            h = h + ce.mean(dim=0)
        else:
            m = (y < 0).float().view(-1, 1, 1)
            h = h + (1 - m) * ce[y] + m * ce.mean(dim=0)
    T = x.shape[1]
    mask = sd[p + ".attn_mask"]
    for j in range(num_layers):
        q_ = f"{p}.attn_blocks.{j}"
        B, _, C = h.shape
        H = C // head_dim
        a = _layer_norm(h, sd, q_ + ".attention.norm")
        q, k, v = _linear(a, sd, q_ + ".attention.qkv").reshape(B, T, 3 * H, -1).chunk(3, dim=2)
        s = head_dim ** -0.25
        att = torch.einsum("bmhd,bnhd->bmnh", q * s, k * s)
        att = att.masked_fill(mask.unsqueeze(-1) == 0, float("-inf")).softmax(dim=-2)
        o = torch.einsum("bmnh,bnhd->bmhd", att, v).reshape(B, T, C)
        h = h + _linear(o, sd, q_ + ".attention.proj")
        m = _layer_norm(h, sd, q_ + ".mlp.norm")
        m = torch.nn.functional.gelu(_linear(m, sd, q_ + ".mlp.main.0"))
        h = h + _linear(m, sd, q_ + ".mlp.main.2")
    out = _linear(h, sd, p + ".proj_out")
    out = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)
    xa, xb = out.chunk(2, dim=-1) if nvp else (torch.zeros_like(out), out)
    return perm((x_in - xb) * torch.exp(-xa)), -xa.mean(dim=[1, 2])


def forward(sd, cfg, img, y=None):
    p = cfg["patch_size"]
    x = torch.nn.functional.unfold(img, p, stride=p).transpose(1, 2)
    outputs, logdets = [], torch.zeros(())
    for i in range(cfg["num_blocks"]):
        x, ld = block_forward(sd, i, x, y, cfg["layers_per_block"], cfg["head_dim"], cfg["nvp"], flip=bool(i % 2))
        outputs.append(x)
        logdets = logdets + ld
    return x, outputs, logdets
