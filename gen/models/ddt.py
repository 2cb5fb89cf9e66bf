"""DDT: Decoupled Diffusion Transformer (Wang et al. 2025, "DDT: Decoupled Diffusion Transformer", Sec. 3).

One stack of ``depth`` identical blocks split into a *condition encoder* (the first ``num_encoder_blocks``)
and a *velocity decoder* (the rest). Both read the same patchified noisy input through separate linear
embedders. The encoder is conditioned on ``c = SiLU(t_emb + y_emb)`` (B, D) and yields the per-token
self-condition ``z_t = SiLU(t_emb + s)`` (B, N, D); the decoder sees t and y only through ``z_t``, from
which every block computes its adaLN modulation per token. Blocks: RMSNorm, attention without qkv bias with
RMS qk-norm and DDT's 2D RoPE (shared frequencies, normalised positions), SwiGLU without biases, adaLN as a
single Linear (its input is already SiLU'd). No absolute position embedding.

The blocks are the DiT family's ``AdaLNBlock`` with DDT's parts injected (``gen/nn/block.py``).

Forward contract (docs/architecture.md, plus the encoder cache)::

    net(x, t, y, *, return_features=(), extra_token=None, encoder_out=None)
      -> ModelOutput(out, extra, features, encoder_out=z_t)

Passing a cached ``encoder_out`` (= the ``encoder_out`` of an earlier call) skips the encoder (DDT's encoder
sharing during sampling); t and y are then unused. Block numbers in ``return_features`` count encoder blocks first
(1..num_encoder_blocks), then decoder blocks. With REG's extra token, the same embedded token is prepended
at index 0 to the encoder and decoder sequences (identity RoPE rotation), ``z_t`` and features then have
1 + N tokens.

Time: the reference feeds t in [0, 1] to a sinusoid with ``max_period = 10``; our defaults keep that
(``time_scale = 1``), since scaling t by 1000 would push every frequency far above one cycle per unit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
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
)
from gen.nn import LabelEmbedder, TimestepEmbedder, rope_2d_mixed, rope_prepend_identity, swiglu_hidden
from gen.nn.block import AdaLNBlock, FinalLayer
from gen.utils.build import capture_config


@capture_config
class DDT(nn.Module):
    """Class-conditional DDT.

    Args:
        input_size: spatial size H = W of the input latent.
        patch_size: p.
        in_channels: C (output has C channels too).
        hidden_size: width D.
        depth: total blocks (encoder + decoder).
        num_encoder_blocks: blocks in the condition encoder (1 <= E < depth).
        num_heads: attention heads (head dim divisible by 4 for 2D RoPE).
        mlp_ratio: SwiGLU hidden = int(2/3 · int(mlp_ratio · D)).
        num_classes: real classes; label ``num_classes`` is the null class.
        rope_theta: RoPE frequency base.
        rope_extent: RoPE coordinates span [0, rope_extent] at every resolution.
        time_scale: t is multiplied by this before the sinusoid (reference: 1, t in [0, 1]).
        max_period: slowest sinusoid period (reference: 10).
        extra_token_dim: D_extra > 0 adds REG's extra-token projection and head.
        augment_dim: D_aug > 0 adds ScoreAug's transform-parameter embedding (added to the time embedding).
        compile: ``torch.compile`` each block in place (default off).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_encoder_blocks: int = 22,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        rope_theta: float = 10000.0,
        rope_extent: float = 16.0,
        time_scale: float = 1.0,
        max_period: float = 10.0,
        extra_token_dim: int = 0,
        augment_dim: int = 0,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if not 1 <= num_encoder_blocks < depth:
            raise ValueError(f"num_encoder_blocks must be in [1, depth - 1] = [1, {depth - 1}], got {num_encoder_blocks}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_encoder_blocks = num_encoder_blocks
        self.num_classes = num_classes
        self.grid = input_size // patch_size
        patch_dim = in_channels * patch_size * patch_size

        self.x_embedder = nn.Linear(patch_dim, hidden_size)  # decoder input
        self.s_embedder = nn.Linear(patch_dim, hidden_size)  # encoder input
        self.t_embedder = TimestepEmbedder(hidden_size, max_period=max_period, time_scale=time_scale)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        cos, sin = rope_2d_mixed(hidden_size // num_heads, self.grid, self.grid, rope_theta, rope_extent)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # DDT's parts in the shared block: RMSNorm, RMS qk-norm, no qkv bias, SwiGLU without biases, adaLN as a
        # single Linear on the already-activated (per-token in the decoder) condition.
        self.blocks = nn.ModuleList(
            [
                AdaLNBlock(
                    hidden_size, num_heads, swiglu_hidden(hidden_size, mlp_ratio), norm="rms", ffn="swiglu",
                    ffn_bias=False, qkv_bias=False, qk_norm=True, silu_in_layout=False,
                )
                for _ in range(depth)
            ]
        )
        self.final_layer = FinalLayer(hidden_size, patch_dim, norm="layer", silu_in_layout=False)
        make_extra_token(self, extra_token_dim, hidden_size)
        make_augment_embedder(self, augment_dim, hidden_size)
        self.initialize_weights()
        if compile:
            for block in self.blocks:
                block.compile()

    def initialize_weights(self) -> None:
        """DDT's init: Xavier embedders, N(0, .02) label table and t-MLP, zeroed final layer.

        Block Linears keep PyTorch's default init and the block adaLN is not zeroed (as the reference).
        """
        for lin in (self.x_embedder, self.s_embedder) + ((self.extra_embed,) if self.extra_token_dim > 0 else ()):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        self.t_embedder.init_normal(0.02)
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
        encoder_out: Tensor | None = None,
    ) -> ModelOutput:
        """Predict the output for noisy x; see the module docstring.

        Args:
            x: (B, C, H, W) noisy input.
            t: (B,) or scalar noise-conditioning value.
            y: (B,) long labels (``num_classes`` = null); None = all null.
            return_features: 1-indexed block numbers (encoder blocks first) whose token outputs are returned.
            extra_token: (B, D_extra) REG extra token.
            augment: (B, D_aug) ScoreAug transform parameters; None = identity (sampling).
            encoder_out: cached self-condition z_t (B, n_extra + N, D) from an earlier call; skips the encoder.

        Returns:
            ``ModelOutput`` with ``encoder_out`` = z_t (B, n_extra + N, D), computed or passed through.
        """
        name = type(self).__name__
        check_image(x, self.in_channels, self.input_size, self.patch_size, name)
        B, _, H, W = x.shape
        want = feature_indices(return_features, self.depth, name)
        p, E = self.patch_size, self.num_encoder_blocks
        tokens = rearrange(x, "b c (h p) (w q) -> b (h w) (c p q)", p=p, q=p)  # (B, N, C·p·p)
        rope = (self.rope_cos, self.rope_sin)  # (N, d_h) each
        e = None
        if extra_token is not None:
            e = embed_extra_token(self, extra_token, B)  # (B, 1, D)
            rope = rope_prepend_identity(*rope)  # (1 + N, d_h) each
        n_extra = 0 if e is None else 1
        feats: list[Tensor] = [tokens] * len(want)
        if encoder_out is None:
            t = batch_time(t, B, x.device, name)  # (B,)
            y = batch_labels(y, B, self.num_classes, x.device, name)  # (B,)
            t_emb = self.t_embedder(t) + augment_embedding(self, augment, B)  # (B, D)
            c = F.silu(t_emb + self.y_embedder(y))  # (B, D)
            s = self.s_embedder(tokens)  # (B, N, D)
            if e is not None:
                s = torch.cat([e, s], dim=1)  # (B, 1 + N, D)
            for i in range(E):
                s = self.blocks[i](s, c, rope)  # (B, n_extra + N, D)
                if i + 1 in want:
                    feats[want[i + 1]] = s
            z = F.silu(t_emb.unsqueeze(1) + s)  # (B, n_extra + N, D): per-token self-condition
        else:
            z = encoder_out
            expected = (B, n_extra + self.grid**2, self.hidden_size)
            if tuple(z.shape) != expected:
                raise ValueError(f"{name}: encoder_out must have shape {expected}, got {tuple(z.shape)}")
            if any(k <= E for k in want):
                raise ValueError(
                    f"{name}: return_features asks for encoder blocks (<= {E}) but encoder_out skips the encoder"
                )
        h = self.x_embedder(tokens)  # (B, N, D)
        if e is not None:
            h = torch.cat([e, h], dim=1)  # (B, 1 + N, D)
        for i in range(E, self.depth):
            h = self.blocks[i](h, z, rope)  # (B, n_extra + N, D)
            if i + 1 in want:
                feats[want[i + 1]] = h
        h = self.final_layer.modulated(h, z)  # (B, n_extra + N, D)
        out = self.final_layer.linear(h[:, n_extra:])  # (B, N, C·p·p), channel-major patches
        out = rearrange(out, "b (h w) (c p q) -> b c (h p) (w q)", h=H // p, p=p, q=p)  # (B, C, H, W)
        extra = self.extra_head(h[:, 0]) if e is not None else None  # (B, D_extra)
        return ModelOutput(out, extra, feats, encoder_out=z)
