"""Pruning: unstructured and N:M (magnitude, Wanda, SparseGPT) and structured (heads, MLP
channels, whole layers), with recovery fine-tuning and honest accounting of size and speed."""

from edgellm.prune.layers import prunable_linears, sparsity_stats
from edgellm.prune.magnitude import apply_magnitude, magnitude_prune, magnitude_scores
from edgellm.prune.masks import (
                    PruneError,
                    check_nm,
                    check_sparsity,
                    global_masks,
                    is_nm,
                    nm_mask,
                    nm_storage_bytes,
                    parse_nm,
                    select_mask,
                    sparsity_of,
                    unstructured_mask,
)
from edgellm.prune.sparsegpt import apply_sparsegpt, sparsegpt_prune
from edgellm.prune.structured import (
                    apply_structured,
                    block_influence,
                    drop_layers,
                    prune_channels,
                    prune_heads,
                    prune_layers,
)
from edgellm.prune.wanda import apply_wanda, input_norms, wanda_prune, wanda_scores

__all__ = [
    "PruneError", "apply_magnitude", "apply_sparsegpt", "apply_structured", "block_influence",
    "drop_layers", "prune_channels", "prune_heads", "prune_layers", "apply_wanda", "check_nm",
    "check_sparsity", "global_masks", "input_norms", "is_nm", "magnitude_prune",
    "magnitude_scores", "nm_mask", "nm_storage_bytes", "parse_nm", "prunable_linears",
    "select_mask", "sparsegpt_prune", "sparsity_of", "sparsity_stats", "unstructured_mask",
    "wanda_prune", "wanda_scores",
]
