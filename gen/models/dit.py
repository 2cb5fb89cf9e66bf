"""DiT and LightningDiT: one class-conditional Diffusion Transformer with injected parts.

DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers", Sec. 3.2, Fig. 3; facebookresearch/DiT
models.py) and LightningDiT (Yao et al. 2025, "Reconstruction vs. Generation: Taming Optimization Dilemma in
Latent Diffusion Models", Sec. 4 and Table 1; hustvl/LightningDiT models/lightningdit.py) are one architecture:
patch embedding plus a frozen 2D sincos table, adaLN(-Zero) blocks conditioned on ``SiLU(t_emb + y_emb)``, a
modulated final layer. LightningDiT is the configuration ``norm="rms", ffn="swiglu", rope="axial"``
(RMSNorm with fp32 statistics, SwiGLU with hidden ``int(2/3 int(4D))`` and biases, EVA-02-style 2D RoPE on q, k
added to the absolute table), optionally ``qk_norm`` (the paper's remedy for loss spikes) and ``wo_shift``
(its four-vector adaLN variant); ``learn_sigma`` is off there. Both use DiT's initialisation. The presets (sizes
and options) are the YAML files in ``configs/model/``.

Forward contract (docs/architecture.md)::

    net(x, t, y, *, return_features=(), extra_token=None) -> ModelOutput(out, extra, features)

``C_out = 2 C`` when ``learn_sigma`` (epsilon and DiT's variance interpolation values), else ``C``.
``features[i]`` is the token output (B, N, D) of block ``return_features[i]`` (1-indexed); with REG's extra
token (B, D_extra) the sequence holds it at index 0, so features are (B, 1 + N, D) and ``extra`` is its
prediction (B, D_extra). The time embedder multiplies t by ``time_scale`` (1000: t in [0, 1] spans DiT's
integer-step range; the official LightningDiT feeds t in [0, 1] unscaled: ``time_scale=1`` reproduces it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gen.models.common import (
    ModelOutput,
    augment_embedding,
    batch_labels,
    batch_time,
    check_image,
    embed_extra_token,
    feature_indices,
    init_augment_embedder,
    init_extra_token,
    make_augment_embedder,
    make_extra_token,
    unpatchify,
)
from gen.nn import (
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    rope_2d_axial,
    rope_prepend_identity,
    sincos_2d,
)
from gen.nn.block import AdaLNBlock, FfnKind, FinalLayer, NormKind
from gen.nn.mlp import swiglu_hidden
from gen.utils.build import capture_config


@capture_config
class DiT(nn.Module):
    """Class-conditional DiT-family backbone.

    Args:
        input_size: spatial size H = W of the input (latent) image.
        patch_size: p; H must be divisible by it.
        in_channels: C.
        hidden_size: width D.
        depth: number of blocks.
        num_heads: attention heads (head dim divisible by 4 with RoPE).
        mlp_ratio: FFN width ratio r (GELU MLP hidden int(D r); SwiGLU hidden int(2/3 int(D r))).
        num_classes: real classes; label ``num_classes`` is the null class (0 = unconditional).
        learn_sigma: output 2C channels (epsilon and DiT's learned-variance values) instead of C.
        norm: ``"layer"`` (LayerNorm without affine, DiT) or ``"rms"`` (RMSNorm, LightningDiT).
        ffn: ``"gelu"`` (DiT) or ``"swiglu"`` (LightningDiT).
        rope: ``None`` or ``"axial"`` (LightningDiT's 2D RoPE; the absolute sincos table is kept as well).
        rope_theta: RoPE frequency base.
        qk_norm: normalise q and k per head (with the block's norm kind) before RoPE.
        wo_shift: LightningDiT's adaLN variant with four modulation vectors per block (no shift).
        time_scale: t is multiplied by this before the sinusoid.
        max_period: slowest sinusoid period of the timestep features.
        extra_token_dim: D_extra > 0 adds REG's extra-token input projection and output head.
        augment_dim: D_aug > 0 adds ScoreAug's transform-parameter embedding (added to the time embedding).
        compile: ``torch.compile`` each block in place (default off; eager is the reference).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        learn_sigma: bool = False,
        norm: NormKind = "layer",
        ffn: FfnKind = "gelu",
        rope: Literal["axial"] | None = None,
        rope_theta: float = 10000.0,
        qk_norm: bool = False,
        wo_shift: bool = False,
        time_scale: float = 1000.0,
        max_period: float = 10000.0,
        extra_token_dim: int = 0,
        augment_dim: int = 0,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if rope not in (None, "axial"):
            raise ValueError(f"rope must be null or 'axial', got {rope!r}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_classes = num_classes
        self.grid = input_size // patch_size

        self.x_embedder = PatchEmbed(in_channels, hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size, max_period=max_period, time_scale=time_scale)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        # Frozen table stored as a non-trainable Parameter so state dicts match the reference layout.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid**2, hidden_size), requires_grad=False)
        # Not persistent: the tables are a function of the config, so checkpoints need not carry them.
        cos, sin = rope_2d_axial(hidden_size // num_heads, self.grid, self.grid, rope_theta) if rope else (None, None)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        hidden = swiglu_hidden(hidden_size, mlp_ratio) if ffn == "swiglu" else int(hidden_size * mlp_ratio)
        self.blocks = nn.ModuleList(
            [
                AdaLNBlock(hidden_size, num_heads, hidden, norm=norm, ffn=ffn, qk_norm=qk_norm, shift=not wo_shift)
                for _ in range(depth)
            ]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size * patch_size * self.out_channels, norm=norm)
        make_extra_token(self, extra_token_dim, hidden_size)
        make_augment_embedder(self, augment_dim, hidden_size)
        self.initialize_weights()
        if compile:
            for block in self.blocks:
                block.compile()

    def initialize_weights(self) -> None:
        """DiT's init: Xavier Linears, sincos pos-embed, N(0, .02) embeddings, zeroed adaLN and output."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.pos_embed.data.copy_(sincos_2d(self.hidden_size, self.grid).unsqueeze(0))
        self.x_embedder.init_xavier()
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        self.t_embedder.init_normal(0.02)
        # adaLN-Zero: every block starts as the identity and the network outputs 0.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        self.final_layer.zero_()
        init_extra_token(self)
        init_augment_embedder(self)

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        y: Tensor | None = None,
        *,
        return_features: Sequence[int] = (),
        extra_token: Tensor | None = None,
        augment: Tensor | None = None,
    ) -> ModelOutput:
        """Predict the network output for noisy x at noise level t and class y.

        Args:
            x: (B, C, H, W) noisy input.
            t: (B,) or scalar noise-conditioning value (multiplied by ``time_scale``).
            y: (B,) long class labels, ``num_classes`` = null; None = all null.
            return_features: 1-indexed block numbers whose token outputs are returned.
            extra_token: (B, D_extra) REG extra token (needs ``extra_token_dim > 0``).
            augment: (B, D_aug) ScoreAug transform parameters (needs ``augment_dim > 0``); None = identity.

        Returns:
            ``ModelOutput``: ``out`` (B, C_out, H, W), ``extra`` (B, D_extra) with an extra token, ``features``.
        """
        name = type(self).__name__
        check_image(x, self.in_channels, self.input_size, self.patch_size, name)
        B = x.shape[0]
        want = feature_indices(return_features, self.depth, name)
        t = batch_time(t, B, x.device, name)  # (B,)
        y = batch_labels(y, B, self.num_classes, x.device, name)  # (B,)
        h = self.x_embedder(x) + self.pos_embed  # (B, N, D), N = (H/p)^2
        t_emb = self.t_embedder(t) + augment_embedding(self, augment, B)  # (B, D)
        c_act = F.silu(t_emb + self.y_embedder(y))  # (B, D), shared SiLU of every adaLN input
        rope = None if self.rope_cos is None else (self.rope_cos, self.rope_sin)  # (N, d_h) each
        n_extra = 0
        if extra_token is not None:
            h = torch.cat([embed_extra_token(self, extra_token, B), h], dim=1)  # (B, 1 + N, D), zero position
            rope = None if rope is None else rope_prepend_identity(*rope)  # (1 + N, d_h) each
            n_extra = 1
        feats: list[Tensor] = [h] * len(want)
        for i, block in enumerate(self.blocks, start=1):
            h = block(h, c_act, rope)  # (B, n_extra + N, D)
            if i in want:
                feats[want[i]] = h
        h = self.final_layer.modulated(h, c_act)  # (B, n_extra + N, D)
        out = self.final_layer.linear(h[:, n_extra:])  # (B, N, p·p·C_out)
        out = unpatchify(out, self.patch_size, self.out_channels, self.grid)  # (B, C_out, H, W)
        extra = self.extra_head(h[:, 0]) if n_extra else None  # (B, D_extra)
        return ModelOutput(out, extra, feats)
