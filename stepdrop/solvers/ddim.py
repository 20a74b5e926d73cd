"""DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12): the fused step
itself; deterministic for η = 0, η = 1 draws the DDPM posterior's variance."""

from stepdrop.solvers.base import Solver


class DDIM(Solver):
    name = "ddim"
    update = "ddim"
    takes_eta = True
    summary = "DDIM, first order; eta in [0, 1] adds noise (eta=1: ancestral)"

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.eta > 0
