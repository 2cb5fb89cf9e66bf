"""EDM2's magnitude-preserving U-Net (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", Sec. 2-3, Fig. 21 and App. B; official module NVlabs/edm2 ``training/networks_edm2.py``, ``UNet``).

Every layer keeps activations, weights and updates at unit expected magnitude:

* ``MPConv``: weights normalised to unit norm per output channel and scaled by ``1/sqrt(fan_in)`` (Eq. 47), plus
  *forced* weight normalisation in training (Eq. 66): the stored weights are replaced by their normalised version
  at each training-mode call, so that the learning rate sets the relative step size;
* ``mp_silu`` (Eq. 81), ``mp_sum`` (Eq. 88), ``mp_cat`` (Eq. 103), ``MPFourier`` noise features (Eq. 75);
* the residual blocks' pixel norm, the learned gains (zero at init: ``emb_gain`` of each block's modulation,
  ``out_gain`` of the output, so the network starts at F = 0) and the optional self-attention with
  cosine-normalised q, k, v.

Dropout (``dropout``) applies in the residual branch; ``dropout_res`` limits it to levels of resolution at most
that (ECT's ImageNet-64 tuning: 0.4 at resolutions <= 16; locuslab/ect branch ``imgnet``,
``training/networks_edm2.py``). Parameter and buffer names are the official ones (``enc.64x64_block0.conv_res0.weight``,
...), so an official state dict loads as it is (``scripts/convert.py --from edm2``).

The network is a pure backbone ``F(x, c_noise, y)``: EDM's preconditioning with ``sigma_data = 0.5``
(``gen.models.precond.EDMPrecond``, the same ``c_in, c_skip, c_out`` and ``c_noise = ln(sigma) / 4`` as the
official ``Precond``) wraps it, so the time input ``t`` *is* ``c_noise``. The official ``Precond``'s uncertainty
head (``logvar_fourier``, ``logvar_linear``, EDM2 Eq. 21) is not part of the backbone: no objective here learns
u(sigma), and ECT's ImageNet branch removes it too.

Forced weight normalisation never runs under ``torch.no_grad``: it rewrites parameters in place, which in a
no-grad pass of a training step (ECT's stop-gradient target, locuslab/ect ``imgnet`` ``training/loss.py``, which
switches it off there) would change weights that the step's gradient pass has already used, and autograd refuses
that. The official ``MPConv`` normalises there as well; with weights normalised by the gradient pass just before,
the result differs by the 1e-4 epsilon of the normalisation only. ``bench/edm2_equivalence.py`` checks this module
against the official one (bench/README.md, "EDM2 U-Net against the official code").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gen.models.common import ModelOutput, batch_labels, batch_time, check_image
from gen.utils.build import capture_config


def mp_normalize(x: Tensor, dim: Sequence[int] | int | None = None, eps: float = 1e-4) -> Tensor:
    """``x / (eps + ||x|| / sqrt(n))`` over ``dim`` (default: all but the first): unit RMS per slice (EDM2 Eq. 47);
    the norm is taken in float32 whatever the dtype of ``x``."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x: Tensor) -> Tensor:
    """SiLU divided by its output magnitude for unit-normal input, 0.596 (EDM2 Eq. 81)."""
    return F.silu(x) / 0.596


def mp_sum(a: Tensor, b: Tensor, t: float = 0.5) -> Tensor:
    """``((1 - t) a + t b) / sqrt((1 - t)^2 + t^2)``: a blend that keeps unit magnitude (EDM2 Eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: Tensor, b: Tensor, dim: int = 1, t: float = 0.5) -> Tensor:
    """Concatenation along ``dim`` weighted so that each part contributes ``(1 - t)`` / ``t`` of the unit output
    magnitude whatever its width (EDM2 Eq. 103)."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([(c / math.sqrt(na) * (1 - t)) * a, (c / math.sqrt(nb) * t) * b], dim=dim)


def resample(x: Tensor, mode: str, filt: Sequence[float] = (1.0, 1.0)) -> Tensor:
    """Depthwise 2x down- or upsampling of (B, C, H, W) with the separable filter ``filt`` (box by default; EDM2
    Fig. 21); ``mode="keep"`` returns ``x``."""
    if mode == "keep":
        return x
    f = torch.tensor(list(filt), dtype=torch.float32)
    if f.ndim != 1 or len(f) % 2:
        raise ValueError(f"resample_filter must be a 1D filter of even length, got {list(filt)}")
    pad = (len(f) - 1) // 2
    f = f / f.sum()
    f2 = torch.outer(f, f)[None, None].to(device=x.device, dtype=x.dtype)  # (1, 1, k, k)
    c = x.shape[1]
    if mode == "down":
        return F.conv2d(x, f2.tile([c, 1, 1, 1]), groups=c, stride=2, padding=(pad,))
    return F.conv_transpose2d(x, (f2 * 4).tile([c, 1, 1, 1]), groups=c, stride=2, padding=(pad,))


class MPFourier(nn.Module):
    """Random Fourier features ``sqrt(2) cos(2 pi (f x + phi))`` of a scalar per sample, (B,) -> (B, C) (EDM2
    Eq. 75); ``freqs`` and ``phases`` are fixed buffers, kept in checkpoints (the official file's values)."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        y = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (kernel (k, k)) or linear layer (kernel ()) with forced weight normalisation.

    ``weight`` is (C_out, C_in, *kernel), N(0, 1) at init. The effective weight is
    ``normalize(w) * gain / sqrt(C_in prod(kernel))`` (EDM2 Eq. 47); in training mode with gradients enabled the
    stored weight is first replaced by ``normalize(w)`` (Eq. 66; module docstring for the no-grad case).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: Tensor, gain: Tensor | float = 1.0) -> Tensor:
        """(B, C_in, H, W) -> (B, C_out, H, W) with a (k, k) kernel ("same" padding), or (B, C_in) -> (B, C_out)."""
        w = self.weight.to(torch.float32)  # the parameter itself when it is float32, as in the official module
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                self.weight.copy_(mp_normalize(w))  # forced weight normalisation
        w = mp_normalize(w)
        w = (w * (gain / math.sqrt(w[0].numel()))).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=(w.shape[-1] // 2,))


class Block(nn.Module):
    """Encoder (``flavor="enc"``) or decoder (``"dec"``) residual block with optional self-attention (EDM2 Fig. 21).

    Encoder: resample, 1x1 ``conv_skip`` when the width changes, pixel norm; decoder: the skip conv after the
    residual branch. Residual branch: ``conv_res1(dropout(mp_silu(conv_res0(mp_silu(x)) * (1 + emb_linear(emb)))))``,
    joined by ``mp_sum`` with ``res_balance``; attention (``num_heads = C_out / channels_per_head``) likewise with
    ``attn_balance``; activations are clipped to ``clip_act``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        flavor: str = "enc",
        resample_mode: str = "keep",
        resample_filter: Sequence[float] = (1.0, 1.0),
        attention: bool = False,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256.0,
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.flavor, self.resample_mode, self.resample_filter = flavor, resample_mode, tuple(resample_filter)
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=(3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=())
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=(3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, kernel=(1, 1)) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=(1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=(1, 1)) if self.num_heads else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """(B, C_in, H, W), emb (B, C_emb) -> (B, C_out, H', W') (H' = H/2, H or 2H by ``resample_mode``)."""
        x = resample(x, self.resample_mode, self.resample_filter)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = mp_normalize(x, dim=1)  # pixel norm
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1  # (B, C_out) modulation, 1 at init
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            b, ch, h, w = x.shape
            # The official channel layout of qkv is (head, channel, {q, k, v}); q, k, v are normalised per pixel.
            qkv = self.attn_qkv(x).reshape(b, self.num_heads, -1, 3, h * w)
            q, k, v = mp_normalize(qkv, dim=2).unbind(3)  # (B, heads, c, N) each
            a = F.scaled_dot_product_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3))  # (B, h, N, c)
            y = self.attn_proj(a.transpose(2, 3).reshape(b, ch, h, w))
            x = mp_sum(x, y, t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x


@capture_config
class EDM2UNet(nn.Module):
    """EDM2's U-Net ``F(x, c_noise, y)`` (module docstring); wrap it in ``EDMPrecond`` (sigma_data 0.5) for D.

    Args:
        input_size: image resolution H = W (64 for ImageNet-64 pixels).
        in_channels: image channels C (the input also gets a constant ones channel, as in the official module).
        num_classes: classes; label ``num_classes`` (and ``y=None``) is the null class, a zero class vector as in
            the official ``Precond`` without labels; 0 = unconditional (no class embedding).
        model_channels: base width (192 for EDM2-S).
        channel_mult: width multipliers per level; level i has resolution ``input_size / 2^i``.
        channel_mult_noise: noise-feature width multiplier (None: ``channel_mult[0]``).
        channel_mult_emb: embedding width multiplier (None: ``max(channel_mult)``).
        num_blocks: residual blocks per encoder level (decoder: one more).
        attn_resolutions: resolutions with self-attention (the innermost decoder block ``in0`` always has it).
        label_balance: blend of noise (0) and class (1) embeddings.
        concat_balance: blend of skip (0) and main path (1) in the decoder's concatenation.
        channels_per_head: attention head width.
        dropout: dropout probability in the residual branches (training mode only).
        dropout_res: if set, dropout only at levels of resolution <= this (ECT's ImageNet-64 tuning: 16).
        res_balance, attn_balance: ``mp_sum`` blends of the residual and attention branches.
        clip_act: activation clip after each block (None: no clip).
        resample_filter: the separable resampling filter.
    """

    def __init__(
        self,
        input_size: int = 64,
        in_channels: int = 3,
        num_classes: int = 1000,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_noise: int | None = None,
        channel_mult_emb: int | None = None,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (16, 8),
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        dropout_res: int | None = None,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256.0,
        resample_filter: Sequence[float] = (1.0, 1.0),
    ) -> None:
        super().__init__()
        levels = len(channel_mult)
        if levels < 1 or input_size % (1 << (levels - 1)):
            raise ValueError(f"EDM2UNet: input_size={input_size} must be divisible by 2^(levels-1) = "
                             f"{1 << max(levels - 1, 0)} for channel_mult={list(channel_mult)}; use fewer levels")
        if not 0 <= dropout < 1:
            raise ValueError(f"EDM2UNet: dropout must be in [0, 1), got {dropout}")
        if num_classes < 0:
            raise ValueError(f"EDM2UNet: num_classes must be >= 0, got {num_classes}")
        cblock = [model_channels * m for m in channel_mult]
        for level, c in enumerate(cblock):  # levels with attention (the innermost always has it)
            if ((input_size >> level) in attn_resolutions or level == levels - 1) and c % channels_per_head:
                raise ValueError(f"EDM2UNet: width {c} at {input_size >> level}x{input_size >> level} is not divisible "
                                 f"by channels_per_head={channels_per_head}; change model_channels or channels_per_head")
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.input_size, self.in_channels, self.out_channels = input_size, in_channels, in_channels
        self.num_classes = num_classes
        self.label_balance, self.concat_balance = label_balance, concat_balance
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=())
        self.emb_label = MPConv(num_classes, cemb, kernel=()) if num_classes else None

        def block_kwargs(res: int) -> dict:
            drop = 0.0 if dropout_res and res > dropout_res else dropout
            return dict(resample_filter=resample_filter, channels_per_head=channels_per_head, dropout=drop,
                        res_balance=res_balance, attn_balance=attn_balance, clip_act=clip_act)

        self.enc = nn.ModuleDict()
        cout = in_channels + 1
        for level, channels in enumerate(cblock):
            res = input_size >> level
            kw = block_kwargs(res)
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, kernel=(3, 3))
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, cemb, flavor="enc", resample_mode="down", **kw)
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = Block(cin, cout, cemb, flavor="enc",
                                                            attention=res in attn_resolutions, **kw)
        self.dec = nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = input_size >> level
            kw = block_kwargs(res)
            if level == levels - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, flavor="dec", attention=True, **kw)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, flavor="dec", **kw)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, flavor="dec", resample_mode="up", **kw)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = Block(cin, cout, cemb, flavor="dec",
                                                            attention=res in attn_resolutions, **kw)
        self.out_conv = MPConv(cout, in_channels, kernel=(3, 3))

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
        """F(x, c_noise, y).

        Args:
            x: (B, C, H, W) preconditioned input ``c_in x``.
            t: (B,) or scalar noise input, EDM's ``c_noise = ln(sigma) / 4``.
            y: (B,) long class labels, ``num_classes`` = null; None = all null.
            return_features, extra_token, augment: not offered by this backbone (REPA, REG and ScoreAug need a
                transformer's tokens or embedding); anything but their defaults is refused.

        Returns:
            ``ModelOutput`` with ``out`` (B, C, H, W).
        """
        name = type(self).__name__
        if len(return_features) or extra_token is not None or augment is not None:
            raise ValueError(f"{name} offers no features, extra token or ScoreAug conditioning; use a DiT-family "
                             "backbone (model=dit_*) for align=repa/reg or augment=scoreaug")
        check_image(x, self.in_channels, self.input_size, 1, name)
        B = x.shape[0]
        t = batch_time(t, B, x.device, name)  # (B,)
        emb = self.emb_noise(self.emb_fourier(t))  # (B, C_emb)
        if self.emb_label is not None:
            y = batch_labels(y, B, self.num_classes, x.device, name)  # (B,)
            if bool(((y < 0) | (y > self.num_classes)).any()):
                raise ValueError(f"{name}: labels must lie in 0..{self.num_classes} ({self.num_classes} = null class)")
            # One-hot times sqrt(num_classes) as the official Precond feeds it; the null class is the zero vector.
            onehot = F.one_hot(y, self.num_classes + 1)[:, : self.num_classes].to(torch.float32)
            emb = mp_sum(emb, self.emb_label(onehot * math.sqrt(self.num_classes)), t=self.label_balance)
        emb = mp_silu(emb)
        h = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # (B, C + 1, H, W)
        skips = []
        for key, block in self.enc.items():
            h = block(h) if key.endswith("_conv") else block(h, emb)
            skips.append(h)
        for key, block in self.dec.items():
            if "block" in key:
                h = mp_cat(h, skips.pop(), t=self.concat_balance)
            h = block(h, emb)
        return ModelOutput(self.out_conv(h, gain=self.out_gain))  # (B, C, H, W)
