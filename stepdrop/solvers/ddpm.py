"""DDPM ancestral sampling (Ho et al. 2020, eq. 7): the posterior q(x_s | x_t, x̂0), which on
a sub-plan is the Markovian skipped-step sampler (docs/DESIGN.md §4)."""

from stepdrop.solvers.base import Solver


class DDPM(Solver):
    name = "ddpm"
    update = "ddpm"
    stochastic = True
    summary = "DDPM posterior q(x_s | x_t, x0): ancestral, first order, stochastic"
