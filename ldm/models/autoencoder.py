"""AutoencoderKL: the first stage of Stable Diffusion (image <-> latent), as an inference container."""
from __future__ import annotations

import torch
from torch import nn

from ldm.errors import SDError
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution


class AutoencoderKL(nn.Module):
    """encoder -> quant_conv -> posterior over z; z -> post_quant_conv -> decoder.

    The constructor takes the reference's parameters so its YAML configs build this class unchanged.
    Training-only parts are deliberately not built: the loss (`lossconfig`, torch.nn.Identity in the
    inference configs) belongs to a training module, and `colorize_nlabels`, `ema_decay`, `learn_logvar`
    only matter for logging and training, so they are recorded and otherwise ignored.
    """

    def __init__(self, ddconfig: dict, embed_dim: int, lossconfig=None, ckpt_path: str | None = None,
                 ignore_keys=(), image_key: str = "image", colorize_nlabels: int | None = None,
                 monitor: str | None = None, ema_decay: float | None = None, learn_logvar: bool = False,
                 **ignored):
        super().__init__()
        if ckpt_path is not None:
            # The reference would load this file with strict=False and silently skip mismatches.
            raise SDError(
                f"first_stage_config sets ckpt_path={ckpt_path!r}, but the VAE weights come from the main "
                "checkpoint (first_stage_model.*); remove ckpt_path from the config")
        if not ddconfig.get("double_z", True):
            raise SDError("AutoencoderKL needs ddconfig.double_z: true (the encoder predicts mean and log-variance)")
        z_channels = ddconfig["z_channels"]
        self.image_key = image_key
        self.monitor = monitor
        self.embed_dim = embed_dim
        self.learn_logvar = learn_logvar
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Image (B, 3, H, W) in [-1, 1] -> posterior over z (B, embed_dim, H/f, W/f)."""
        moments = self.quant_conv(self.encoder(x))  # (B, 2*embed_dim, H/f, W/f)
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (B, embed_dim, h, w) (without scale_factor) -> image (B, 3, h*f, w*f), about [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Reconstruction round trip, as the reference: (decoded image, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
