"""tome_jax: Token Merging (ToMe) and DTEM for Vision Transformers in JAX/Flax."""

from tome_jax.attention import Attention, proportional_attention
from tome_jax.convert import (
    from_hf,
    from_timm,
    pretrained_data_config,
    resample_pos_embed,
    save_checkpoint,
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
from tome_jax.features import TokenFeatures, patch_features, token_features
from tome_jax.merge import (
    MERGE_IMPLEMENTATIONS,
    MergePlan,
    bipartite_soft_merge,
    default_merge_implementation,
    initial_source,
    kth_bipartite_merge,
    merge_source,
    merge_sum,
    merge_wavg,
    random_bipartite_merge,
    source_matrix,
    unmerge,
)
from tome_jax.schedules import effective_schedule, parse_r, schedule_for_token_budget, tokens_per_layer
from tome_jax.vit import SoftMergeSettings, ViT, init_params
from tome_jax.registry import MODEL_CONFIGS, create_model, model_config
from tome_jax.tokens import TokenField, Tokens
from tome_jax.budget import RChoice, choose_r

__version__ = "0.1.0"
