"""The VAE posterior: a diagonal Gaussian over latents, with the reference's attribute names."""
from __future__ import annotations

import torch


class DiagonalGaussianDistribution:
    """N(mean, diag(exp(logvar))) from the encoder's moments (B, 2C, h, w) = cat([mean, logvar], 1)."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)  # (B, C, h, w) each
        # The reference clamps so that exp() neither overflows nor collapses to an exact zero.
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps. eps is drawn in float32 on the generator's device (CPU without one, as the
        reference does) and then moved, so a seeded CPU generator gives the same latent on every device."""
        device = generator.device if generator is not None else torch.device("cpu")
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=torch.float32)
        return self.mean + self.std * eps.to(device=self.mean.device, dtype=self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other) summed over (C, h, w), per batch item; other=None means N(0, I)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        if other is None:
            return 0.5 * torch.sum(self.mean**2 + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum(
            (self.mean - other.mean) ** 2 / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=[1, 2, 3],
        )

    def nll(self, sample: torch.Tensor, dims=(1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of `sample`, summed over `dims`."""
        if self.deterministic:
            return torch.zeros(sample.shape[0], device=sample.device)
        log_two_pi = torch.log(torch.tensor(2.0 * torch.pi, device=sample.device, dtype=sample.dtype))
        return 0.5 * torch.sum(log_two_pi + self.logvar + (sample - self.mean) ** 2 / self.var, dim=list(dims))
