"""Shared network building blocks for the backbones in :mod:`gen.models`."""

from gen.nn.attention import Attention
from gen.nn.embed import LabelEmbedder, PatchEmbed, TimestepEmbedder, timestep_features
from gen.nn.mlp import Mlp, SwiGLU, swiglu_hidden
from gen.nn.modulate import gated_residual, modulate
from gen.nn.norm import RMSNorm
from gen.nn.pos_embed import sincos_1d, sincos_2d
from gen.nn.rope import apply_rope, rope_2d_axial, rope_2d_mixed, rope_prepend_identity, rotate_pairs

__all__ = [
    "Attention",
    "LabelEmbedder",
    "Mlp",
    "PatchEmbed",
    "RMSNorm",
    "SwiGLU",
    "TimestepEmbedder",
    "apply_rope",
    "gated_residual",
    "modulate",
    "rope_2d_axial",
    "rope_2d_mixed",
    "rope_prepend_identity",
    "rotate_pairs",
    "sincos_1d",
    "sincos_2d",
    "swiglu_hidden",
    "timestep_features",
]
