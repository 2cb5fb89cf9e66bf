"""Representation alignment: REPA and REG as a part of any objective (flow matching, EDM) and any backbone.

REPA (Yu et al. 2025, "Representation Alignment for Generation: Training Diffusion Transformers Is Easier Than You
Think"; sihyun-yu/REPA loss.py, models/sit.py): the backbone's tokens after block ``depth`` (1-indexed) go through a
projector ``Linear(D, 2048) -> SiLU -> Linear(2048, 2048) -> SiLU -> Linear(2048, d_enc)`` and are pulled towards the
frozen encoder's patch tokens of the *clean* image: ``L_REPA = -mean_tokens cos(h_phi(h_n), y_n)``, added with weight
``lambda = 0.5``. The projector starts with xavier-uniform weights and zero biases, as in both official repositories.

REG (Wu et al. 2025, "Representation Entanglement for Generation"; Martinser/REG loss.py, models/sit.py): the
encoder's class token ``c`` is noised with the image's ``t`` and its own noise, ``c_t = alpha_t c + sigma_t eps_c``,
and fed to the backbone as its extra token; the loss adds ``beta = 0.03`` times the token's velocity error
``mean_D (v_c_hat - v_c)^2`` and aligns all ``1 + N`` tokens (the class slot with ``c``, the patches with the patch
tokens). At sampling the token is generated with the image (``samplers.Streams``) and dropped.

The encoder reads the batch's uint8 pixels (``batch["image"]``), so the backbone may train on latents. It is built by
the config (``eval.encoders.AlignmentEncoder``), held frozen (never optimised, never saved; its identity is checked
on resume) and run under ``no_grad`` in the step's autocast. The projector is trained with the backbone and saved in
training states, never in snapshots.

Token grids: the backbone's ``g x g`` grid and the encoder's ``e x e`` grid of the same image are matched by area:
when ``e`` is a multiple of ``g`` the encoder tokens are averaged over each backbone patch, when ``g`` is a multiple of
``e`` each encoder token covers ``(g/e)^2`` backbone tokens; other ratios have no exact correspondence and are refused.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gen.paths import Path
from gen.utils.frozen import hold_frozen
from gen.utils.seed import Randomness


def build_projector(dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """REPA's ``build_mlp``: ``Linear(D, H) -> SiLU -> Linear(H, H) -> SiLU -> Linear(H, d_enc)``.

    Initialised as both official models initialise it: the projectors live inside the SiT, whose
    ``initialize_weights`` applies ``_basic_init`` to every ``nn.Linear`` (xavier-uniform weights, zero biases) in
    module order (sihyun-yu/REPA models/sit.py; Martinser/REG models/sit.py), not PyTorch's default init.
    """
    proj = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, out_dim))
    for layer in proj:
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    return proj


def negative_cosine(pred: Tensor, target: Tensor) -> Tensor:
    """``-mean_n cos(pred_n, target_n)`` per sample: (B, N, D), (B, N, D) -> (B,) (REPA's loss, sihyun-yu/REPA loss.py)."""
    return -F.cosine_similarity(pred.float(), target.float(), dim=-1).mean(dim=1)


def match_grid(tokens: Tensor, grid: int) -> Tensor:
    """Encoder tokens (B, e*e, D) on the backbone's ``grid x grid`` token grid, matched by area (module docstring)."""
    B, n, D = tokens.shape
    e = round(n**0.5)
    if e * e != n:
        raise ValueError(f"the encoder's {n} tokens do not form a square grid")
    if e == grid:
        return tokens
    x = tokens.transpose(1, 2).reshape(B, D, e, e)
    if e % grid == 0:
        x = F.avg_pool2d(x, e // grid)
    elif grid % e == 0:
        x = x.repeat_interleave(grid // e, dim=2).repeat_interleave(grid // e, dim=3)
    else:
        raise ValueError(f"the encoder's {e}x{e} token grid cannot be matched to the backbone's {grid}x{grid}")
    return x.flatten(2).transpose(1, 2)


class Alignment(nn.Module):
    """REPA (and with ``reg=True`` REG) for an objective; see the module docstring.

    Args:
        encoder: the frozen encoder ``encoder(uint8 images) -> (patch tokens (B, N, d), class token (B, d))`` with
            ``.dim`` and ``.grid(resolution)`` (``eval.encoders.AlignmentEncoder``).
        depth: 1-indexed block whose output tokens are aligned (REPA: 8 for L/XL, 4 for B).
        weight: lambda of the alignment loss.
        projector_dim: hidden width of the projector (2048 in REPA and REG).
        reg: also entangle the encoder's class token as the backbone's extra token (REG).
        reg_weight: beta of the class token's velocity loss.

    The projector is created by :meth:`bind`, when the backbone is known (its width and token grid).
    """

    def __init__(
        self,
        encoder: nn.Module,
        depth: int,
        weight: float = 0.5,
        projector_dim: int = 2048,
        reg: bool = False,
        reg_weight: float = 0.03,
    ) -> None:
        super().__init__()
        for name, value in (("depth", depth), ("projector_dim", projector_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:  # 2.5: refused, never truncated
                what = "a block number, an integer >= 1" if name == "depth" else "an integer >= 1"
                raise ValueError(f"align.{name}={value!r} must be {what}")
        if weight < 0 or reg_weight < 0:
            raise ValueError(f"align weights must be >= 0, got weight={weight}, reg_weight={reg_weight}")
        hold_frozen(self, "encoder", encoder)
        self.depth, self.weight, self.projector_dim = int(depth), float(weight), int(projector_dim)
        self.reg, self.reg_weight = bool(reg), float(reg_weight)
        self.projector: nn.Module | None = None
        self.grid: int | None = None

    def bind(self, net: nn.Module, image_resolution: int | None = None) -> None:
        """Check the backbone against the alignment and create the projector (its init uses the global RNG)."""
        depth = int(getattr(net, "depth", 0))
        if self.depth > depth:
            raise ValueError(f"align depth {self.depth} is beyond the backbone's {depth} blocks; set the align "
                             f"depth to at most {depth}")
        extra = int(getattr(net, "extra_token_dim", 0))
        if self.reg and extra != self.encoder.dim:
            raise ValueError(f"REG needs the backbone's extra token of the encoder's width: set model.extra_token_dim="
                             f"{self.encoder.dim} (it is {extra})")
        if not self.reg and extra:
            raise ValueError(f"the backbone has an extra token (extra_token_dim={extra}) but alignment is REPA; "
                             "use REG or set model.extra_token_dim=0")
        self.grid = int(net.grid)
        if image_resolution is not None:  # refuse grids that cannot be matched before any training
            e = self.encoder.grid(image_resolution)
            if not (e % self.grid == 0 or self.grid % e == 0):
                raise ValueError(f"the encoder's {e}x{e} token grid at {image_resolution} px cannot be matched to the "
                                 f"backbone's {self.grid}x{self.grid}: choose a patch size or resolution whose grid "
                                 "divides or is a multiple of the encoder's")
        if self.projector is None:
            self.projector = build_projector(int(net.hidden_size), self.projector_dim, self.encoder.dim)

    def targets(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Encoder tokens of the clean images on the backbone's grid, and the class token: (B, N, d), (B, d)."""
        if "image" not in batch:
            raise ValueError("representation alignment needs the batch's uint8 pixels ('image'); store them with the "
                             "latents (the extraction option) or train on pixels")
        if self.grid is None:
            raise RuntimeError("Alignment.bind(net) was not called; build the objective through a training method")
        patches, cls = self.encoder(batch["image"])
        return match_grid(patches, self.grid).float(), cls.float()

    def extra_token(self, cls: Tensor, t: Tensor, path: Path, rng: Randomness) -> tuple[Tensor, Tensor]:
        """REG's noisy class token and its velocity target: ``(c_t, v_c)``, each (B, d); draws ``eps_c`` from rng."""
        eps_c = rng.randn(cls.shape[1]).to(cls.device)
        return path.sample(cls, eps_c, t), path.velocity(cls, eps_c, t)

    def loss(self, features: list[Tensor], cls: Tensor, patches: Tensor) -> Tensor:
        """Per-sample alignment loss of the block's tokens (B, n_extra + N, D): (B,)."""
        projected = self.projector(features[0])
        target = torch.cat([cls[:, None], patches], dim=1) if self.reg else patches
        return negative_cosine(projected, target)

    def extra_repr(self) -> str:
        return f"depth={self.depth}, weight={self.weight}, reg={self.reg}, reg_weight={self.reg_weight}"


def align_terms(
    align: Alignment, net: nn.Module, x_t: Tensor, t: Tensor, y: Tensor | None, batch: dict[str, Tensor],
    path: Path, rng: Randomness, call: Any,
) -> tuple[Any, dict[str, Tensor]]:
    """Run the backbone through ``call(net, x_t, t, y, **kw)`` with what alignment needs; returns its output and the
    per-sample terms to add: ``{"repa": ...}`` (and ``{"reg": ...}``), each (B,), already weighted in ``"total"``."""
    patches, cls = align.targets(batch)
    kw: dict[str, Any] = {"return_features": [align.depth]}
    v_c = None
    if align.reg:
        kw["extra_token"], v_c = align.extra_token(cls, t, path, rng)
    res = call(net, x_t, t, y, **kw)
    terms = {"repa": align.loss(res.features, cls, patches)}
    total = align.weight * terms["repa"]
    if v_c is not None:
        terms["reg"] = (res.extra.float() - v_c).square().mean(dim=1)
        total = total + align.reg_weight * terms["reg"]
    terms["total"] = total
    return res, terms
