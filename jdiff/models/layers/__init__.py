"""Layers shared by the diffusion transformers and the encoders, one file per concern:

  partitioning  logical-axis sharding of activations and weights (constrain, gathered)
  lora          the LoRA spec a model carries as a field; 8-bit base kernels; merging
                adapters into kernels
  dense         Dense (with adapters), embedding lookups, MLP, CondMLP
  norms         LayerNorm, RMSNorm (QK-norm), adaLN modulation with its fused LayerNorm
  attention     attention backends (XLA, cuDNN, CPU kernel, splash), QKV, output projection
  embeddings    patches, 2D sin-cos and rotary positions, timestep embedding
  blocks        block stacks (unrolled or scanned), remat policies, layout converters

Images are NHWC. Every parameter carries logical axis names and activations are
constrained with logical names; `config.sharding.logical_rules` maps these names onto
the mesh axes (data, fsdp, tensor), so no layer mentions a mesh.

Parameter axes:   embed (model width), mlp (MLP hidden), heads (heads*head_dim),
                  kv (head_dim), modulation (n*width of adaLN), cond (conditioning
                  inputs), patch (p*p*C), vocab (token/label tables), length
                  (learned positions), norm, layers (scan).
Activation axes:  activation_batch, activation_length, activation_embed,
                  activation_heads, activation_kv, activation_mlp.

Model code imports this package as `L` and uses the names below.
"""

from jdiff.models.layers.attention import (ATTENTION_IMPLS, QKV, attention_out, check_backend, check_divisible,
                                           dot_product_attention, splash_attention)
from jdiff.models.layers.blocks import (REMAT_POLICIES, match_layout, run_blocks, stack_groups, stack_unrolled,
                                        unstack_groups, unstack_scanned)
from jdiff.models.layers.dense import MLP, CondMLP, Dense, as_dtype, dense, embed, xavier, zeros
from jdiff.models.layers.embeddings import (PatchEmbed, TimestepEmbed, apply_rope, cropped_sincos_2d, patchify,
                                            rope_tables, sincos_1d, timestep_features, unpatchify)
from jdiff.models.layers.lora import QUANTIZED, LoRA, dequantize, merge_lora, quantize_like
from jdiff.models.layers.norms import (Modulation, RMSNorm, affine_layer_norm, modulate, norm_modulate,
                                       norm_modulate_many, rms_norm)
from jdiff.models.layers.partitioning import STORAGE_ONLY_AXES, compute_rules, constrain, gathered

__all__ = [
    "ATTENTION_IMPLS", "QKV", "attention_out", "check_backend", "check_divisible", "dot_product_attention",
    "splash_attention", "REMAT_POLICIES", "match_layout", "run_blocks", "stack_groups", "stack_unrolled",
    "unstack_groups",
    "unstack_scanned", "MLP", "CondMLP", "Dense", "as_dtype", "dense", "embed", "xavier", "zeros", "PatchEmbed",
    "TimestepEmbed", "apply_rope", "cropped_sincos_2d", "patchify", "rope_tables", "sincos_1d",
    "timestep_features", "unpatchify", "QUANTIZED", "LoRA", "dequantize", "merge_lora", "quantize_like", "Modulation", "RMSNorm", "affine_layer_norm",
    "modulate", "norm_modulate", "norm_modulate_many", "rms_norm", "STORAGE_ONLY_AXES", "compute_rules",
    "constrain", "gathered",
]
