"""tome_jax: Token Merging (ToMe) and DTEM for Vision Transformers in JAX/Flax."""

from tome_jax.attention import Attention, proportional_attention
from tome_jax.convert import (
    from_timm,
    pretrained_data_config,
    resample_pos_embed,
    save_metric_layers,
    to_timm_state_dict,
)
from tome_jax.dtem import (
    SoftMerge,
    dtem_soft_merge,
    merge_assigned,
    soft_khot,
    soft_merge_scores,
)
from tome_jax.merge import (
    MERGE_IMPLEMENTATIONS,
    MergePlan,
    bipartite_soft_merge,
    default_merge_implementation,
    effective_schedule,
    initial_source,
    kth_bipartite_merge,
    merge_source,
    merge_sum,
    merge_wavg,
    parse_r,
    random_bipartite_merge,
    schedule_for_token_budget,
    source_matrix,
    tokens_per_layer,
    unmerge,
)
from tome_jax.vit import MODEL_CONFIGS, MergeState, SoftMergeSettings, ViT, create_model, model_config
from tome_jax.budget import RChoice, choose_r  # noqa: E402 (builds on the model)

__version__ = "0.1.0"
