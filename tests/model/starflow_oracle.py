"""An independent, functional statement of apple/ml-starflow's image `Model` (transformer_flow.py), reading a
state dict in ml-starflow's exact key layout and a config dict that mirrors `Model(**kwargs)` (see STARFLOW_3B).
Used only as a test oracle for sejd's STARFlow support: it imports nothing from sejd, and favours plain maths
(explicit softmax, explicit masks) over speed.

Shapes: B batch, H x W latent grid after patchify, T = H*W image tokens, Ci = in_channels * patch**2,
C = channels, D = head_dim, L = number of text tokens, Dt = txt_dim.

Supported: RoPE (3-D with a text axis when txt_size > 0, else 2-D), SOS token, softplus or exp scale, soft_clip,
final RMSNorm, LayerNorm pre-norm blocks with GELU MLP and biases, text prefix on the blocks that own
`proj_txt` (the deep one only when cond_top_only), guidance on a doubled batch, L2R / R2L block orders,
zero-layer shallow blocks (identity). Everything else raises NotImplementedError.
"""

import math

import torch
import torch.nn.functional as F

INV_SOFTPLUS_1 = math.log(math.e - 1)  # softplus(0 + this) == 1: a zero proj_out is the identity flow

# Model kwargs of configs/starflow_3B_t2i_256x256.yaml as sample.py builds them (img_size 256 // VAE factor 8,
# txt_dim = flan-t5-xl hidden size); the keys not listed keep Model's defaults (see _check).
STARFLOW_3B = {"in_channels": 4, "img_size": 32, "patch_size": 1, "channels": 3072, "num_blocks": 6,
               "layers_per_block": [2, 2, 2, 2, 2, 24], "head_dim": 64, "rope": True, "sos": True, "txt_size": 128,
               "txt_dim": 2048, "cond_top_only": True, "use_softplus": True, "use_final_norm": True, "soft_clip": 4.0,
               "seq_order": "L2R"}

_UNSUPPORTED = {"num_heads": None, "num_kv_heads": None, "use_swiglu": False, "use_bias": True, "use_qk_norm": False,
                "use_post_norm": False, "hf_style_rope": False, "norm_type": "layer_norm", "use_pretrained_lm": None,
                "use_mm_attn": False, "learnable_self_denoiser": False, "temporal_causal": 0,
                "top_block_channels": None, "shallow_block_local": False, "local_attn_window": None, "expansion": 4}


def _check(cfg):
    for k, default in _UNSUPPORTED.items():
        v = cfg.get(k, default)
        if v != default and not (k == "top_block_channels" and v == cfg["channels"]):
            raise NotImplementedError(f"starflow oracle: {k}={cfg[k]!r} is not the image t2i path (default {default!r})")
    if not cfg.get("rope") or not cfg.get("sos"):
        raise NotImplementedError("starflow oracle: only rope=1, sos=1 (learned pos_embed / shifted no-SOS blocks "
                                  "are not what the released image model uses, and Apple's Jacobi needs both)")
    if cfg["head_dim"] % 4 or (cfg.get("txt_size", 0) and cfg["head_dim"] // 2 <= 8):
        raise NotImplementedError("starflow oracle: head_dim must split into rope pairs (and leave room for 8 text dims)")


# --------------------------------------------------------------------------------------------- small pieces
def _lin(x, sd, p):
    return F.linear(x, sd[p + ".weight"], sd.get(p + ".bias"))


def _rms_norm(x, w, eps=1e-6):  # ml-starflow RMSNorm: weight is an offset from 1 (zeros at init)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + w)


def _flips(cfg, i):  # PermutationIdentity / PermutationFlip alternate; L2R starts the alternation one later
    return (i + (cfg.get("seq_order", "R2L") == "L2R")) % 2 == 1


def _has_text(cfg, i):  # which blocks own proj_txt and a text prefix
    return cfg.get("txt_dim", 0) > 0 and (i == cfg["num_blocks"] - 1 or not cfg.get("cond_top_only", False))


def _layers(cfg, i):
    lpb = cfg["layers_per_block"]
    return lpb[0] if len(lpb) == 1 else lpb[i]


def patchify(x, p):  # (B, c, H*p, W*p) -> (B, H, W, p*p*c), channel fastest, like einops '(p1 p2 c)'
    B, c, Hp, Wp = x.shape
    return x.reshape(B, c, Hp // p, p, Wp // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, Hp // p, Wp // p, p * p * c)


def unpatchify(x, p):  # inverse of patchify
    B, H, W, ci = x.shape
    return x.reshape(B, H, W, p, p, ci // (p * p)).permute(0, 5, 1, 3, 2, 4).reshape(B, -1, H * p, W * p)


def rope_angles(cfg, H, W, n_text=0):
    """(n_text + H*W, D) rotation angles, one per sequence slot (text slots first). Angles index *slots*, not the
    token that sits there: a flipped block rotates the token in slot j by grid position (j // W, j % W)."""
    half, pt = cfg["head_dim"] // 2, cfg.get("pt_seq_len") or cfg["img_size"] // cfg["patch_size"]
    spatial = half - 8 if cfg.get("txt_size", 0) > 0 else half  # 8 rotary pairs are kept for the text axis
    f = 10000.0 ** (-torch.arange(0, spatial, 2, dtype=torch.float64) / spatial)  # spatial//2 per axis
    mean_len = math.sqrt(H * W)
    row = (torch.arange(H, dtype=torch.float64) / mean_len * pt).repeat_interleave(W)
    col = (torch.arange(W, dtype=torch.float64) / mean_len * pt).repeat(H)
    ang = [row[:, None] * f, col[:, None] * f]
    if cfg.get("txt_size", 0) > 0:  # 3-D rope: third axis 0 for image slots, i/L*pt for text slot i
        f2 = 10000.0 ** (-torch.arange(8, dtype=torch.float64) / 8)  # note: k/8, not 2k/8
        t = torch.cat([torch.arange(n_text, dtype=torch.float64) / max(n_text, 1) * pt, torch.zeros(H * W, dtype=torch.float64)])
        ang = [torch.cat([torch.zeros(n_text, a.shape[1], dtype=a.dtype), a]) for a in ang] + [t[:, None] * f2]
    return torch.cat(ang, -1).repeat_interleave(2, -1)  # each angle drives an adjacent (even, odd) pair


def _rope(x, ang):  # x (B, h, n, D), ang (n, D): pairs (2m, 2m+1) rotate by ang[2m]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    rot = torch.stack([-x2, x1], -1).flatten(-2)
    return x * ang.cos().to(x.dtype) + rot * ang.sin().to(x.dtype)


# ------------------------------------------------------------------------------------------- one MetaBlock
def _run_layers(sd, cfg, i, h, cache, ang, attn_temp=1.0):
    """The block's attention layers on new tokens h (B, n, C) after `cache` (per layer (k, v), each
    (B, heads, n_old, D), k already rotated; None = empty). Causal over cache + new. Returns h, the new cache."""
    B, n, C = h.shape
    D = cfg["head_dim"]
    n_old = 0 if cache is None else cache[0][0].shape[2]
    a_new = ang[n_old:n_old + n]
    # key slot kk is visible to new query qq iff kk <= n_old + qq (the text prefix is causal among itself too)
    mask = torch.arange(n_old + n)[None, :] <= n_old + torch.arange(n)[:, None]
    out_cache = []
    for j in range(_layers(cfg, i)):
        p = f"blocks.{i}.attn_blocks.{j}"
        a = F.layer_norm(h, (C,), sd[p + ".attention.norm.weight"], sd[p + ".attention.norm.bias"])  # eps 1e-5
        q, k, v = (t.reshape(B, n, C // D, D).transpose(1, 2) for t in _lin(a, sd, p + ".attention.qkv").split(C, -1))
        q, k = _rope(q, a_new), _rope(k, a_new)
        if cache is not None:
            k, v = torch.cat([cache[j][0], k], 2), torch.cat([cache[j][1], v], 2)
        out_cache.append((k, v))
        s = (q @ k.transpose(-1, -2)) * (D ** -0.5 / attn_temp)  # (B, heads, n, n_old + n)
        o = s.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        h = h + _lin(o.transpose(1, 2).reshape(B, n, C), sd, p + ".attention.proj")
        m = F.layer_norm(h, (C,), sd[p + ".mlp.norm.weight"], sd[p + ".mlp.norm.bias"])
        h = h + _lin(F.gelu(_lin(m, sd, p + ".mlp.main.0")), sd, p + ".mlp.main.2")  # exact (erf) GELU
    return h, out_cache


def _scale_shift(sd, cfg, i, h):
    """Hidden (B, n, C) -> (scale, shift), each (B, n, Ci): x = z * scale + shift (scale is sigma)."""
    if cfg.get("use_final_norm"):
        h = _rms_norm(h, sd[f"blocks.{i}.final_norm.weight"])
    out = _lin(h, sd, f"blocks.{i}.proj_out")
    if cfg.get("soft_clip", 0) > 0:
        out = cfg["soft_clip"] * torch.tanh(out / cfg["soft_clip"])
    a, b = out.chunk(2, -1)  # first Ci channels drive the scale, last Ci the shift
    return (F.softplus(a + INV_SOFTPLUS_1) if cfg.get("use_softplus") else a.exp()), b


def _guide(scale, shift, w):
    """Rows [:B] conditional, [B:] unconditional. Both halves get the same guided (sigma, mu), so the two halves
    of the sample stay equal; only their text prefixes (and so their caches) differ."""
    sc, su = scale.chunk(2)
    mc, mu = shift.chunk(2)
    r = (sc / su).clamp(max=1.0).square()
    den = 1 + w - w * r
    s, m = sc / den.sqrt(), ((1 + w) * mc - w * r * mu) / den
    return torch.cat([s, s]), torch.cat([m, m])


def block_forward(sd, cfg, i, x, text=None):
    """Data -> noise through blocks[i]. x (B, H, W, Ci); text (B, L, Dt) when the block owns proj_txt.
    Returns z (B, H, W, Ci) and the elementwise log|dz/dx| (B, T, Ci) in the block's *permuted* order (as Apple)."""
    B, H, W, ci = x.shape
    if _layers(cfg, i) == 0 and i != cfg["num_blocks"] - 1:
        return x, x.new_zeros(B, H * W, ci)  # IdentityBlock
    p = f"blocks.{i}"
    xs = x.reshape(B, H * W, ci)
    xs = xs.flip(1) if _flips(cfg, i) else xs
    inp = torch.cat([sd[p + ".sos_embed"].expand(B, 1, ci), xs[:, :-1]], 1)  # slot t sees tokens < t
    h = _lin(inp, sd, p + ".proj_in")
    n_text = 0
    if _has_text(cfg, i):
        n_text = text.shape[1]
        h = torch.cat([_lin(text, sd, p + ".proj_txt"), h], 1)  # prefix: [text ; image]
    h, _ = _run_layers(sd, cfg, i, h, None, rope_angles(cfg, H, W, n_text))
    scale, shift = _scale_shift(sd, cfg, i, h[:, n_text:])
    z = (xs - shift) / scale
    z = z.flip(1) if _flips(cfg, i) else z
    return z.reshape(B, H, W, ci), -scale.log()


def forward(sd, cfg, x, text=None):
    """Latents (B, c, H*p, W*p) -> (z in the same layout, total log|det| per sample (B,)). Bottom blocks first,
    deep block blocks[-1] last (the one with the text prefix)."""
    _check(cfg)
    h = patchify(x, cfg["patch_size"])
    logdet = x.new_zeros(x.shape[0])
    for i in range(cfg["num_blocks"]):
        h, ld = block_forward(sd, cfg, i, h, text if _has_text(cfg, i) else None)
        logdet = logdet + ld.flatten(1).sum(1)
    return unpatchify(h, cfg["patch_size"]), logdet


# ------------------------------------------------------------------------------------------------ inverses
def _prepare_reverse(sd, cfg, i, z, text, guidance, attn_temp=1.0):
    """Shared by both samplers: permuted (possibly doubled) noise, rope table, and the text-prefix cache."""
    B, H, W, ci = z.shape
    guided = guidance > 0 and _has_text(cfg, i)
    if guided:
        assert text.shape[0] == 2 * B, "guidance needs text rows [cond (B) ; uncond (B)]"
        z = torch.cat([z, z])
    zs = z.reshape(z.shape[0], H * W, ci)
    zs = zs.flip(1) if _flips(cfg, i) else zs
    cache, n_text = None, 0
    if _has_text(cfg, i):
        n_text = text.shape[1]
        ang = rope_angles(cfg, H, W, n_text)
        _, cache = _run_layers(sd, cfg, i, _lin(text, sd, f"blocks.{i}.proj_txt"), None, ang, attn_temp)
    else:
        ang = rope_angles(cfg, H, W)
    return zs, ang, cache, guided


def _finish_reverse(cfg, i, xs, B, H, W):
    xs = xs[:B]  # drop the (identical) unconditional half
    xs = xs.flip(1) if _flips(cfg, i) else xs
    return xs.reshape(B, H, W, -1)


def reverse_block(sd, cfg, i, z, text=None, guidance=0.0, attn_temp=1.0):
    """Exact sequential inverse of blocks[i] (MetaBlock.reverse): one token per step through a KV cache.
    z (B, H, W, Ci); text (B or 2B, L, Dt). Guidance is applied only when the block owns a text prefix."""
    B, H, W, ci = z.shape
    if _layers(cfg, i) == 0 and i != cfg["num_blocks"] - 1:
        return z
    zs, ang, cache, guided = _prepare_reverse(sd, cfg, i, z, text, guidance, attn_temp)
    xs = zs.clone()
    sos = sd[f"blocks.{i}.sos_embed"].expand(zs.shape[0], 1, ci)
    for t in range(H * W):
        tok = sos if t == 0 else xs[:, t - 1:t]  # the token decoded at the previous step feeds this one
        h, cache = _run_layers(sd, cfg, i, _lin(tok, sd, f"blocks.{i}.proj_in"), cache, ang, attn_temp)
        scale, shift = _scale_shift(sd, cfg, i, h)
        if guided:
            scale, shift = _guide(scale, shift, guidance)
        xs[:, t] = zs[:, t] * scale[:, 0] + shift[:, 0]
    return _finish_reverse(cfg, i, xs, B, H, W)


def jacobi_block(sd, cfg, i, z, text=None, guidance=0.0, block_size=16, threshold=1e-3, max_iters=32):
    """MetaBlock.jacobi for an image: windows of block_size tokens, each iterated to a fixed point.
    The window's guess starts at the noise z itself. Per iteration: run the window's *inputs* (the slot before
    it .. its second-last token, slot 0 = SOS) after the committed cache, set every window token from the
    outputs at once, and stop when mean((new - old)^2) / mean(new^2) (one scalar over the whole batch, both
    guidance halves and the whole window) < threshold, or at the last iteration. On stopping, the cache keeps
    the K/V of that last iteration's inputs (computed before the final update); otherwise it is rewound."""
    B, H, W, ci = z.shape
    if _layers(cfg, i) == 0 and i != cfg["num_blocks"] - 1:
        return z
    zs, ang, cache, guided = _prepare_reverse(sd, cfg, i, z, text, guidance)
    T = H * W
    x_full = torch.cat([sd[f"blocks.{i}.sos_embed"].expand(zs.shape[0], 1, ci), zs.clone()], 1)  # (B', T+1, Ci)
    start = 0
    while start < T:
        n = min(block_size, T - start)
        for it in range(max_iters):
            h, new_cache = _run_layers(sd, cfg, i, _lin(x_full[:, start:start + n], sd, f"blocks.{i}.proj_in"),
                                       cache, ang)
            scale, shift = _scale_shift(sd, cfg, i, h)
            if guided:
                scale, shift = _guide(scale, shift, guidance)
            new = shift + scale * zs[:, start:start + n]
            diff = (new - x_full[:, start + 1:start + 1 + n]).square().mean() / new.square().mean()
            x_full[:, start + 1:start + 1 + n] = new
            if diff < threshold or it == max_iters - 1:
                cache = new_cache  # commit this window
                break
        start += n
    return _finish_reverse(cfg, i, x_full[:, 1:], B, H, W)


def _sample(sd, cfg, noise, text, guidance, step):
    """Model.reverse: deep block first (with text, guided), then blocks[-2] .. blocks[0] unguided; with
    cond_top_only the shallow blocks see no text at all."""
    _check(cfg)
    h = patchify(noise, cfg["patch_size"])
    nb = cfg["num_blocks"]
    h = step(nb - 1, h, text, guidance)
    if guidance > 0 and cfg.get("cond_top_only", False):
        guidance, text = 0.0, text[: text.shape[0] // 2]
    for i in reversed(range(nb - 1)):
        h = step(i, h, text if _has_text(cfg, i) else None, guidance)
    return unpatchify(h, cfg["patch_size"])


def reverse_sample(sd, cfg, noise, text=None, guidance=0.0, attn_temp=1.0):
    """Noise (B, c, H*p, W*p) -> latents with the sequential sampler. text rows: [cond ; uncond] when guided."""
    return _sample(sd, cfg, noise, text, guidance, lambda i, z, y, g: reverse_block(sd, cfg, i, z, y, g, attn_temp))


def jacobi_sample(sd, cfg, noise, text=None, guidance=0.0, block_size=16, threshold=1e-3, max_iters=32):
    """Noise -> latents with Apple's block-wise Jacobi sampler on every block (sample.py --jacobi 1)."""
    return _sample(sd, cfg, noise, text, guidance,
                   lambda i, z, y, g: jacobi_block(sd, cfg, i, z, y, g, block_size, threshold, max_iters))


def self_denoise(sd, cfg, x, text=None, noise_std=0.3):
    """sample.py's last step for the image model (no learnable denoiser, --finetuned_vae none): one Tweedie step
    x + sigma^2 * grad log p(x), with -log p = 0.5*|z|^2 - log|det| per sample; text = conditional rows only."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        z, logdet = forward(sd, cfg, x, text)
        nll = 0.5 * z.pow(2).flatten(1).sum(1) - logdet
        (g,) = torch.autograd.grad(nll.sum(), x)
    return (x - noise_std ** 2 * g).detach()


# ------------------------------------------------------------------------------------------- state dicts
def state_dict_shapes(cfg):
    """Every key of Apple's Model.state_dict() for this config and its shape (buffers included)."""
    _check(cfg)
    ci, C, D = cfg["in_channels"] * cfg["patch_size"] ** 2, cfg["channels"], cfg["head_dim"]
    n = (cfg.get("pt_seq_len") or cfg["img_size"] // cfg["patch_size"]) ** 2
    txt = cfg.get("txt_size", 0)
    shapes = {"var": (n, ci),  # deprecated buffer of ones
              "feat_rope.freqs_cos": (txt + n, D), "feat_rope.freqs_sin": (txt + n, D)}  # deprecated zeros
    for i in range(cfg["num_blocks"]):
        if _layers(cfg, i) == 0 and i != cfg["num_blocks"] - 1:
            continue
        p = f"blocks.{i}."
        shapes.update({p + "proj_in.weight": (C, ci), p + "proj_in.bias": (C,), p + "proj_out.weight": (2 * ci, C),
                       p + "proj_out.bias": (2 * ci,), p + "sos_embed": (1, 1, ci), p + "attn_mask": (n + txt, n + txt)})
        if _has_text(cfg, i):
            shapes.update({p + "proj_txt.weight": (C, cfg["txt_dim"]), p + "proj_txt.bias": (C,)})
        for j in range(_layers(cfg, i)):
            q = f"{p}attn_blocks.{j}."
            for norm in ("attention.norm", "mlp.norm"):
                shapes.update({q + norm + ".weight": (C,), q + norm + ".bias": (C,)})
            for name, (o, k) in {"attention.qkv": (3 * C, C), "attention.proj": (C, C),
                                 "mlp.main.0": (4 * C, C), "mlp.main.2": (C, 4 * C)}.items():
                shapes.update({q + name + ".weight": (o, k), q + name + ".bias": (o,)})
        if cfg.get("use_final_norm"):
            shapes[p + "final_norm.weight"] = (C,)
    return shapes


def random_state_dict(cfg, seed=0, dtype=torch.float32):
    """Small random weights under Apple's keys, with non-zero proj_out so every block really transforms."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in state_dict_shapes(cfg).items():
        if k.endswith("attn_mask"):
            t = torch.ones(shape).tril()
        elif k == "var":
            t = torch.ones(shape)
        elif k.startswith("feat_rope."):
            t = torch.zeros(shape)
        elif k.endswith("norm.weight") and "final_norm" not in k:
            t = 1 + 0.1 * torch.randn(shape, generator=g)  # LayerNorm gain around 1
        elif k.endswith("sos_embed"):
            t = torch.randn(shape, generator=g)
        else:
            fan_in = shape[1] if len(shape) == 2 else 25
            std = 0.3 if k.endswith("proj_out.weight") else 1.0
            t = std * torch.randn(shape, generator=g) / math.sqrt(fan_in)
        sd[k] = t.to(dtype)
    return sd
