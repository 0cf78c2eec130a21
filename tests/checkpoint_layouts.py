"""Checkpoints written by hand in their sources' layouts (random tensors, no download, no torch)."""

import numpy as np

# Small towers: 64 px in 16 px patches (a 4 x 4 grid), width 128 in 2 heads, 2 blocks.
WIDTH, HEADS, DEPTH, PATCH, GRID, EMBED = 128, 2, 2, 16, 4, 32
SMALL = dict(depth=DEPTH, embed_dim=WIDTH, num_heads=HEADS, img_size=PATCH * GRID)


def random_arrays(shapes, seed=0):
    """name -> shape: float32 noise; LayerNorm scales near 1 (names in `scale`/`ln` weights)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        value = 0.05 * rng.standard_normal(shape)
        if name.endswith("/scale") or (".ln_" in f".{name}" and name.endswith(".weight")):
            value += 1
        out[name] = np.asarray(value, np.float32)
    return out


def openai_clip_state(seed=0):
    """A whole CLIP state dict in OpenAI's layout: the visual tower under `visual.`
    (the names and shapes of OpenAI's and OpenCLIP's `VisionTransformer`), and a few
    text-tower entries that a reader of the image tower must leave out."""
    w = WIDTH
    shapes = {
        "visual.conv1.weight": (w, 3, PATCH, PATCH),
        "visual.class_embedding": (w,),
        "visual.positional_embedding": (GRID * GRID + 1, w),
        "visual.ln_pre.weight": (w,), "visual.ln_pre.bias": (w,),
        "visual.ln_post.weight": (w,), "visual.ln_post.bias": (w,),
        "visual.proj": (w, EMBED),
        "token_embedding.weight": (100, w),
        "transformer.resblocks.0.attn.in_proj_weight": (3 * w, w),
        "text_projection": (w, EMBED),
        "logit_scale": (),
    }
    for i in range(DEPTH):
        block = f"visual.transformer.resblocks.{i}."
        shapes.update({
            block + "ln_1.weight": (w,), block + "ln_1.bias": (w,),
            block + "attn.in_proj_weight": (3 * w, w), block + "attn.in_proj_bias": (3 * w,),
            block + "attn.out_proj.weight": (w, w), block + "attn.out_proj.bias": (w,),
            block + "ln_2.weight": (w,), block + "ln_2.bias": (w,),
            block + "mlp.c_fc.weight": (4 * w, w), block + "mlp.c_fc.bias": (4 * w,),
            block + "mlp.c_proj.weight": (w, 4 * w), block + "mlp.c_proj.bias": (w,),
        })
    return random_arrays(shapes, seed)
