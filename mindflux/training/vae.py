"""VAE training loss: reconstruction through a sampled latent, plus a small KL term."""

from __future__ import annotations

from mindspore import Tensor, nn, ops


class VAEReconstructionLoss(nn.Cell):
    """mean((decode(mean + std * noise) - x)^2) + kl_weight * KL(q(z|x) || N(0, 1)), per element.

    `noise` comes from the host (like the flow-matching noise), so a step is deterministic. The
    small KL weight (diffusers' VAE example uses 1e-6) keeps latents near unit scale without
    blurring; the pipeline's scaling/shift factors are then measured from the trained encoder.
    """

    def __init__(self, vae: nn.Cell, kl_weight: float = 1e-6):
        super().__init__()
        self.vae = vae
        self.kl_weight = kl_weight

    def construct(self, images: Tensor, noise: Tensor) -> Tensor:
        mean, logvar = ops.chunk(self.vae.encoder(images), 2, 1)
        logvar = ops.clamp(logvar, -30.0, 20.0)
        latents = mean + ops.exp(0.5 * logvar) * noise
        reconstruction = self.vae.decoder(latents)
        mse = ops.mean(ops.square(reconstruction.astype(images.dtype) - images))
        kl = 0.5 * ops.mean(ops.square(mean) + ops.exp(logvar) - 1.0 - logvar)
        return mse + self.kl_weight * kl
