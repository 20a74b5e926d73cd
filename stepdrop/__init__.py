"""stepdrop: fast sampling for tiny diffusion models.

Fewer model calls (step policies), cheaper calls (fused kernels), and counted costs.

    >>> from stepdrop import FusedSampler, NoiseSchedule, TinyUNet
"""

from stepdrop.ops import BACKENDS, CLEAN, available_backends, fused_plan_step, fused_step, grad_probe
from stepdrop.solvers import SOLVERS, Solver, get_solver
from stepdrop.plan import StepPlan
from stepdrop.policies import (
    POLICIES,
    Adaptive,
    Combined,
    Cosine,
    CustomTimesteps,
    GradientAware,
    Importance,
    LogSNRUniform,
    NoiseAware,
    Quadratic,
    StochasticStepDrop,
    Uniform,
    get_policy,
)
from stepdrop.optimize import Optimized
from stepdrop.sampler import CudaGraphError, FusedSampler, NonFiniteOutputError, SampleStats
from stepdrop.schedule import NoiseSchedule
from stepdrop.models import DiffusersUNetAdapter, TinyUNet, as_eps_model

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "CLEAN",
    "POLICIES",
    "SOLVERS",
    "Solver",
    "get_solver",
    "Adaptive",
    "Combined",
    "Cosine",
    "CudaGraphError",
    "CustomTimesteps",
    "DiffusersUNetAdapter",
    "FusedSampler",
    "GradientAware",
    "Importance",
    "LogSNRUniform",
    "NoiseAware",
    "Optimized",
    "NoiseSchedule",
    "NonFiniteOutputError",
    "Quadratic",
    "SampleStats",
    "StepPlan",
    "StochasticStepDrop",
    "TinyUNet",
    "Uniform",
    "as_eps_model",
    "available_backends",
    "fused_plan_step",
    "fused_step",
    "get_policy",
    "grad_probe",
]
