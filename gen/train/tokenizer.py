"""Training KL autoencoders (LDM tokenizers, VA-VAE) as a training method: reconstruction, KL, GAN and VF losses.

The losses are those of the LDM autoencoder ("High-Resolution Image Synthesis with Latent Diffusion Models",
Rombach et al., 2022; CompVis/latent-diffusion, ldm/modules/losses/contperceptual.py ``LPIPSWithDiscriminator``)
plus the vision-foundation alignment loss of VA-VAE ("Reconstruction vs. Generation: Taming Optimization Dilemma in
Latent Diffusion Models", Yao et al., 2025; hustvl/LightningDiT, vavae/ldm/modules/losses/contperceptual.py and
vavae/ldm/models/autoencoder.py). For an image x, its reconstruction x̂ = D(z), z ~ q(z|x) = N(mu, sigma²):

    rec   = |x - x̂| + w_p · LPIPS(x, x̂)                    per pixel (LPIPS broadcast over the pixels, as LDM)
    nll   = Σ_pixels rec / exp(s) + s                        s: a learned log-variance scalar (LDM's ``logvar``)
    kl    = Σ 0.5 (mu² + sigma² - 1 - log sigma²)           per image
    g     = -mean D_φ(x̂)                                    PatchGAN generator term (hinge GAN)
    L_vf  = w_dm · L_mdms + w_cos · L_mcos                   VF loss (below) of z' = W z against frozen features F
    L_AE  = nll + w_kl · kl + λ_d · f_d · g + λ_vf · L_vf
    L_D   = 0.5 (mean relu(1 - D_φ(x)) + mean relu(1 + D_φ(x̂)))

with the adaptive weights (Esser et al., 2021, "Taming Transformers", eq. 7; VA-VAE §3.2)

    λ_d  = w_d  · clamp(‖∇_{W_dec} nll‖ / (‖∇_{W_dec} g‖ + 1e-4), 0, 1e4)       W_dec: decoder's last conv weight
    λ_vf = w_vf · clamp(‖∇_{W_enc} nll‖ / (‖∇_{W_enc} L_vf‖ + 1e-4), 0, 1e8)    W_enc: encoder's last conv weight

both detached, and f_d = 0 before ``disc_start_kimg`` thousand training images, 1 after. The VF loss, at every latent
position i of one image (N positions), with z' = W z (a learnable 1x1 convolution without bias to the foundation
width) and the foundation tokens F matched to the latent grid:

    L_mcos = mean_i relu(1 - m1 - cos(z'_i, F_i))                                   margin m1 (0.5)
    L_mdms = mean_{i,j} relu(|cos(z'_i, z'_j) - cos(F_i, F_j)| - m2)                margin m2 (0.25)

Reductions follow the official code: ``nll`` and ``kl`` are summed over an image's elements and averaged over the
batch (here: per-sample sums, which the loop averages), the GAN and VF terms are means; the adaptive weights are
computed on the micro-batch means.

The method owns: ``autoencoder`` (diffusers ``AutoencoderKL`` of an ``AutoencoderKLTokenizer``; EMA and snapshots),
``projection`` (the VF loss's 1x1 convolution, trained with the autoencoder, never snapshotted), ``logvar`` and
``discriminator`` (taming's ``NLayerDiscriminator``). Two optimizers are stepped in turn at every step,
``autoencoder`` (autoencoder, projection, logvar) then ``discriminator`` (from ``disc_start_kimg`` on; before it the
discriminator phase is skipped, which equals the official code's zero-weighted update up to BatchNorm running
statistics that train-mode BatchNorm never reads). The discriminator judges the reconstructions of the autoencoder
phase of the same step (detached), as the official step does. Frozen: ``lpips`` (``gen.nn.lpips.LPIPS``) and
``foundation`` (``eval.encoders.AlignmentEncoder``: DINOv2, or the yardstick's foundation network), held with
``hold_frozen``: never optimised, never in training states; the loop records and checks their identities.

Differences from the official code, on purpose:

* ``learn_logvar``: the official optimizers leave ``logvar`` out (hustlv/LightningDiT, vavae/ldm/models/autoencoder.py
  ``configure_optimizers``), so it stays at ``logvar_init``; ``learn_logvar: false`` reproduces that, ``true`` trains
  it with the autoencoder as LDM's formulation of a learned output variance intends.
* Token grids that differ from the latent grid are matched by area, as REPA's alignment does (``match_grid``);
  VA-VAE's grids are equal (16x16), and VA-VAE's code admits no other.

The foundation encoder reads the uint8 images through ``AlignmentEncoder(preprocess="vavae")`` (the method preset
sets it), which feeds DINOv2 as VA-VAE does: the [-1, 1] image resized bilinearly to 224 px at 256 px, without
ImageNet normalisation (hustvl/LightningDiT, vavae/ldm/models/foundation_models.py).

Snapshots hold the EMA of the autoencoder in diffusers' layout, the state dict an ``AutoencoderKLTokenizer`` loads
from ``weights``; their metadata carries the tokenizer's ``_target_`` spec (``"tokenizer"``, with ``weights: null``)
and ``"tokenizer_weights": "snapshot"``, meaning "these tensors are its weights". ``python -m eval recon --tokenizer
<snapshot>`` fills ``weights`` with the snapshot's path; a diffusion run uses the same tokenizer preset with
``tokenizer.weights=<snapshot>``.

Layering: this is a training method beside the others in ``gen.train``; it never imports ``tokenizers`` (the
autoencoder arrives built from its spec and is checked by what it offers), and ``tokenizers`` never imports
``gen.train`` (tests/test_layering.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gen.train.method import Batch, Method, OptimizerFactory, OptimizerSpec, Progress
from gen.utils.frozen import hold_frozen
from gen.utils.seed import Randomness

# ----------------------------------------------------------------------------------------------------------
# Discriminator and loss terms


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator of pix2pix as taming-transformers builds it (CompVis/taming-transformers,
    taming/modules/discriminator/model.py): a 4x4 stride-2 convolution with LeakyReLU(0.2), ``layers - 1`` more
    stride-2 convolutions and one stride-1 convolution (channels ``width * min(2**k, 8)``, BatchNorm, no bias,
    LeakyReLU), then a 4x4 stride-1 convolution to one logit per patch.

    Weights are initialised as taming's ``weights_init``: convolutions N(0, 0.02), BatchNorm scales N(1, 0.02),
    BatchNorm shifts 0 (drawn from torch's global generator, which train.py seeds).

    Args:
        in_channels: image channels.
        width: channels of the first convolution (taming's ``ndf``, 64).
        layers: stride-2 stages (taming's ``n_layers``, 3).
    """

    def __init__(self, in_channels: int = 3, width: int = 64, layers: int = 3) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"discriminator layers must be >= 1, got {layers}")
        seq: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1  # the last stage keeps the resolution (taming's extra stride-1 conv)
            seq += [nn.Conv2d(width * prev, width * mult, 4, stride=stride, padding=1, bias=False),
                    nn.BatchNorm2d(width * mult), nn.LeakyReLU(0.2)]
        seq.append(nn.Conv2d(width * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*seq)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) in [-1, 1] -> patch logits (B, 1, h, w)."""
        return self.main(x)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss per sample: ``0.5 (mean relu(1 - real) + mean relu(1 + fake))`` over each sample's
    patch logits (B, ...) -> (B,); its batch mean is taming's ``hinge_d_loss``."""
    real = F.relu(1.0 - logits_real.float()).flatten(1).mean(1)
    fake = F.relu(1.0 + logits_fake.float()).flatten(1).mean(1)
    return 0.5 * (real + fake)


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Generator term per sample: ``-mean D(x̂)`` over the sample's patch logits (B, ...) -> (B,)."""
    return -logits_fake.float().flatten(1).mean(1)


def match_grid(features: Tensor, grid: int) -> Tensor:
    """Foundation tokens (B, e*e, D) -> a (B, D, grid, grid) map on the latent grid, matched by area.

    ``e == grid``: as they are (VA-VAE: DINOv2's 16x16 tokens on the f16 latents of 256 px images); ``e`` a multiple
    of ``grid``: averaged over each latent cell; ``grid`` a multiple of ``e``: each token repeated over the latent
    positions it covers. Other ratios have no exact correspondence and are refused.
    """
    B, n, D = features.shape
    e = round(n**0.5)
    if e * e != n:
        raise ValueError(f"the foundation encoder's {n} tokens do not form a square grid")
    x = features.transpose(1, 2).reshape(B, D, e, e)
    if e == grid:
        return x
    if e % grid == 0:
        return F.avg_pool2d(x, e // grid)
    if grid % e == 0:
        return x.repeat_interleave(grid // e, dim=2).repeat_interleave(grid // e, dim=3)
    raise ValueError(
        f"the foundation encoder's {e}x{e} token grid cannot be matched to the {grid}x{grid} latent grid; choose an "
        "encoder or image size whose grid divides or is a multiple of the latent grid"
    )


def vf_loss_terms(z_proj: Tensor, features: Tensor, cos_margin: float, distmat_margin: float) -> tuple[Tensor, Tensor]:
    """The two VF-loss terms per sample (VA-VAE §3.2; hustvl/LightningDiT contperceptual.py).

    Args:
        z_proj: projected latents z' (B, D, h, w).
        features: foundation features on the same grid (B, D, h, w).
        cos_margin: m1 of the marginal cosine term.
        distmat_margin: m2 of the marginal distance-matrix term.

    Returns:
        ``(mcos, mdms)``, each (B,): ``mean_i relu(1 - m1 - cos(z'_i, F_i))`` and
        ``mean_{i,j} relu(|cos(z'_i, z'_j) - cos(F_i, F_j)| - m2)`` over the h*w positions of each sample.
    """
    if z_proj.shape != features.shape:
        raise ValueError(f"projected latents {tuple(z_proj.shape)} and features {tuple(features.shape)} differ in shape")
    z = F.normalize(z_proj.float().flatten(2), dim=1)  # (B, D, N), unit vectors along the channels
    f = F.normalize(features.float().flatten(2), dim=1)
    cos = (z * f).sum(1)  # (B, N)
    mcos = F.relu(1.0 - cos_margin - cos).mean(1)
    k_z = torch.einsum("bdi,bdj->bij", z, z)  # (B, N, N)
    k_f = torch.einsum("bdi,bdj->bij", f, f)
    mdms = F.relu((k_z - k_f).abs() - distmat_margin).flatten(1).mean(1)
    return mcos, mdms


def adaptive_weight(reference: Tensor, term: Tensor, layer: Tensor, max_weight: float) -> Tensor:
    """``clamp(‖∇_layer reference‖ / (‖∇_layer term‖ + 1e-4), 0, max_weight)``, detached (Taming Transformers eq. 7).

    Both arguments are scalars whose graphs stay alive (``retain_graph``); the gradients are not accumulated.
    """
    g_ref = torch.autograd.grad(reference, layer, retain_graph=True)[0]
    g_term = torch.autograd.grad(term, layer, retain_graph=True)[0]
    return (g_ref.norm() / (g_term.norm() + 1e-4)).clamp(0.0, max_weight).detach()


class LogVariance(nn.Module):
    """The learned scalar log-variance ``s`` of the reconstruction likelihood (LDM's ``logvar``)."""

    def __init__(self, init: float = 0.0, learn: bool = True) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.tensor(float(init)), requires_grad=learn)


# ----------------------------------------------------------------------------------------------------------
# The method


class KLAutoencoderTraining(Method):
    """An ``AutoencoderKLTokenizer`` trained with the LDM losses and, optionally, VA-VAE's VF loss (module docstring).

    Args:
        autoencoder: the tokenizer to train (``tokenizers.kl.AutoencoderKLTokenizer``, built from its spec; random
            initialisation unless it names weights, which are then fine-tuned). Its spec (``config``) goes into the
            snapshots.
        optimizer: the autoencoder phase's optimizer factory (Adam, lr 1e-4, betas (0.5, 0.9) in the recipe).
        disc_optimizer: the discriminator's optimizer factory.
        image_channels: channels of the training images (from the data; checked against the autoencoder).
        lpips: frozen ``gen.nn.lpips.LPIPS`` network, or None (``perceptual_weight`` must then be 0).
        foundation: frozen encoder ``uint8 images -> (tokens (B, N, D), class token)`` with ``.dim``
            (``eval.encoders.AlignmentEncoder``), or None for no VF loss.
        perceptual_weight: w_p.
        kl_weight: w_kl (1e-6).
        logvar_init: initial s; learn_logvar: train s (see the module docstring).
        disc_weight: w_d (0.5); disc_start_kimg: training images (thousands) before the GAN terms start.
        disc_width, disc_layers: the discriminator's ``ndf`` and ``n_layers``.
        vf_weight: w_vf (0.1 in the recipe; 0.5 in the long recipe's first stage).
        cos_margin, distmat_margin: m1 and m2 (0.5, 0.25); cos_weight, distmat_weight: w_cos and w_dm (1, 1).
        adaptive_vf: the adaptive VF weight (as the recipe); False uses ``vf_weight`` as a plain weight.
    """

    trainable = ("autoencoder", "projection", "logvar", "discriminator")
    ema_modules = ("autoencoder",)
    snapshot_module = "autoencoder"

    produces = "reconstructions"  # train.py previews and evaluates reconstructions (self.reconstruct)

    def __init__(
        self,
        autoencoder: Any,
        optimizer: OptimizerFactory,
        disc_optimizer: OptimizerFactory,
        image_channels: int | None = None,
        lpips: nn.Module | None = None,
        foundation: nn.Module | None = None,
        perceptual_weight: float = 1.0,
        kl_weight: float = 1e-6,
        logvar_init: float = 0.0,
        learn_logvar: bool = True,
        disc_weight: float = 0.5,
        disc_start_kimg: float = 0.0,
        disc_width: int = 64,
        disc_layers: int = 3,
        vf_weight: float = 0.1,
        cos_margin: float = 0.5,
        distmat_margin: float = 0.25,
        cos_weight: float = 1.0,
        distmat_weight: float = 1.0,
        adaptive_vf: bool = True,
    ) -> None:
        super().__init__()
        lacking = [a for a in ("vae", "config", "image_channels", "latent_channels", "posterior")
                   if not hasattr(autoencoder, a)]
        if lacking:  # duck-typed: gen.train sits below tokenizers and does not import it
            raise TypeError(f"method.autoencoder must build a tokenizers.kl.AutoencoderKLTokenizer (a KL autoencoder "
                            f"tokenizer), got {type(autoencoder).__name__}, which lacks {lacking}")
        if image_channels is not None and int(image_channels) != autoencoder.image_channels:
            raise ValueError(
                f"the data has {image_channels}-channel images but the autoencoder takes {autoencoder.image_channels}; "
                f"set method.autoencoder.image_channels={image_channels}"
            )
        if perceptual_weight > 0 and lpips is None:
            raise ValueError("method.perceptual_weight > 0 needs method.lpips (gen.nn.lpips.LPIPS); or set it to 0")
        for name, value in (("kl_weight", kl_weight), ("disc_weight", disc_weight), ("vf_weight", vf_weight),
                            ("perceptual_weight", perceptual_weight), ("disc_start_kimg", disc_start_kimg)):
            if not (isinstance(value, (int, float)) and value >= 0 and value == value and value != float("inf")):
                raise ValueError(f"method.{name}={value!r} must be a finite number >= 0")
        # The tokenizer wrapper is kept for its spec and encode/decode, unregistered: the trainable module is the
        # bare AutoencoderKL, whose state dict (diffusers layout) is exactly what AutoencoderKLTokenizer loads.
        object.__setattr__(self, "tokenizer", autoencoder)
        self.autoencoder = autoencoder.vae.train()
        self.logvar = LogVariance(logvar_init, learn_logvar)
        self.discriminator = NLayerDiscriminator(autoencoder.image_channels, disc_width, disc_layers)
        latent = autoencoder.latent_channels
        if foundation is not None:
            hold_frozen(self, "foundation", foundation)
            self.projection: nn.Module = nn.Conv2d(latent, int(foundation.dim), 1, bias=False)
        else:
            self.foundation = None
            self.projection = nn.Identity()  # no parameters: nothing to optimise or store
        if lpips is not None:
            hold_frozen(self, "lpips", lpips)
        else:
            self.lpips = None
        self._optimizers = (optimizer, disc_optimizer)
        self.perceptual_weight, self.kl_weight = float(perceptual_weight), float(kl_weight)
        self.disc_weight, self.disc_start_nimg = float(disc_weight), int(round(disc_start_kimg * 1000))
        self.vf_weight, self.adaptive_vf = float(vf_weight), bool(adaptive_vf)
        self.cos_margin, self.distmat_margin = float(cos_margin), float(distmat_margin)
        self.cos_weight, self.distmat_weight = float(cos_weight), float(distmat_weight)

    # --- the Method interface --------------------------------------------------------------------------
    def optimizers(self) -> list[OptimizerSpec]:
        ae = ("autoencoder", "logvar") + (("projection",) if self.foundation is not None else ())
        return [OptimizerSpec("autoencoder", ae, self._optimizers[0]),
                OptimizerSpec("discriminator", ("discriminator",), self._optimizers[1])]

    def gan_active(self, progress: Progress) -> bool:
        """True once ``disc_start_kimg`` thousand images were seen (f_d = 1)."""
        return progress.nimg >= self.disc_start_nimg

    def phases(self, progress: Progress) -> list[str]:
        return ["autoencoder", "discriminator"] if self.gan_active(progress) else ["autoencoder"]

    def loss(self, phase: str, batch: Batch, rng: Randomness, progress: Progress) -> dict[str, Tensor]:
        if phase == "autoencoder":
            return self._autoencoder_loss(batch, rng, progress)
        if phase == "discriminator":
            return self._discriminator_loss(batch, rng)
        raise ValueError(f"unknown phase {phase!r}")

    def snapshot_config(self) -> dict[str, Any]:
        spec = {**self.tokenizer.config, "weights": None}
        return {"tokenizer": spec, "tokenizer_weights": "snapshot", "kind": "tokenizer"}

    # --- pieces ------------------------------------------------------------------------------------------
    def _images(self, batch: Batch) -> Tensor:
        x = batch["x0"].float()
        if x.ndim != 4 or x.shape[1] != self.tokenizer.image_channels:
            raise ValueError(
                f"tokenizer training needs pixel batches (B, {self.tokenizer.image_channels}, H, W) in [-1, 1] "
                f"(tokenizer=pixels), got x0 of shape {tuple(x.shape)}"
            )
        return x

    def _autoencoder_loss(self, batch: Batch, rng: Randomness, progress: Progress) -> dict[str, Tensor]:
        x = self._images(batch)
        B = x.shape[0]
        ae = self.autoencoder
        posterior = ae.encode(x).latent_dist
        eps = rng.randn(*posterior.mean.shape[1:]).to(posterior.mean)  # each sample's own stream
        z = posterior.mean + posterior.std * eps
        x_hat = ae.decode(z).sample.float()

        l1 = (x - x_hat).abs()  # (B, C, H, W)
        rec = l1
        lpips = torch.zeros(B, device=x.device)
        if self.perceptual_weight > 0:
            lpips = self.lpips(x, x_hat)  # (B,)
            rec = rec + self.perceptual_weight * lpips.view(B, 1, 1, 1)  # broadcast over the pixels, as LDM
        s = self.logvar.value
        nll = (rec / torch.exp(s) + s).flatten(1).sum(1)  # (B,)
        kl = posterior.kl().float()  # (B,), summed over the latent's elements
        loss = nll + self.kl_weight * kl
        nll_mean = nll.mean()
        out: dict[str, Tensor] = {"l1": l1.flatten(1).mean(1).detach(), "nll": nll.detach(), "kl": kl.detach(),
                                  "logvar": s.detach().expand(B)}
        if self.perceptual_weight > 0:
            out["lpips"] = lpips.detach()

        if self.gan_active(progress):
            logits_fake = self.discriminator(x_hat)
            g = hinge_g_loss(logits_fake)
            d_weight = self.disc_weight * adaptive_weight(nll_mean, g.mean(), ae.decoder.conv_out.weight, 1e4)
            loss = loss + d_weight * g
            out.update(g_loss=g.detach(), d_weight=d_weight.expand(B))
            self.shared.put("fake", x_hat)  # for the discriminator phase of this step

        if self.foundation is not None:
            tokens, _ = self.foundation(batch["image"])
            feats = match_grid(tokens.float(), z.shape[-1])
            mcos, mdms = vf_loss_terms(self.projection(z), feats, self.cos_margin, self.distmat_margin)
            vf = self.distmat_weight * mdms + self.cos_weight * mcos
            if self.adaptive_vf:
                w_vf = self.vf_weight * adaptive_weight(nll_mean, vf.mean(), ae.encoder.conv_out.weight, 1e8)
            else:
                w_vf = torch.tensor(self.vf_weight, device=x.device)
            loss = loss + w_vf * vf
            out.update(vf_loss=vf.detach(), mcos=mcos.detach(), mdms=mdms.detach(), vf_weight=w_vf.expand(B))
        return {"loss": loss, **out}

    def _discriminator_loss(self, batch: Batch, rng: Randomness) -> dict[str, Tensor]:
        x = self._images(batch)
        fake = self.shared.get("fake") if self.shared.has("fake") else None
        if fake is None:  # phases reordered or run alone: reconstruct with the current autoencoder
            with torch.no_grad():
                posterior = self.autoencoder.encode(x).latent_dist
                z = posterior.mean + posterior.std * rng.randn(*posterior.mean.shape[1:]).to(posterior.mean)
                fake = self.autoencoder.decode(z).sample.float()
        logits_real = self.discriminator(x)
        logits_fake = self.discriminator(fake)
        return {"loss": hinge_d_loss(logits_real, logits_fake),
                "logits_real": logits_real.detach().float().flatten(1).mean(1),
                "logits_fake": logits_fake.detach().float().flatten(1).mean(1)}

    # --- previews ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, autoencoder: nn.Module, images: Tensor, generators: Any = None) -> Tensor:
        """uint8 images (B, C, H, W) -> reconstructions in [-1, 1] through ``autoencoder`` (e.g. the EMA copy),
        with posterior samples drawn from ``generators`` (one per image) as the tokenizer encodes."""
        tok = self.tokenizer
        x = images.to(next(autoencoder.parameters()).device).float() / 127.5 - 1.0
        posterior = autoencoder.encode(x).latent_dist
        if tok.posterior == "mean":
            z = posterior.mean
        else:
            z = posterior.sample(generator=list(generators) if generators is not None else None)
        return autoencoder.decode(z).sample.float()
