"""Direct Noise Optimization (Tang et al., ICML 2025), host-agnostic core.

Torch only; no ComfyUI import. See README.md for the five-line API.
"""
from .errors import DNOError, StopOptimization
from .gradients import EstimatorShare, hybrid_gradient, zeroth_order_gradient
from .noise import DNONoise, TrainableNoise
from .optimize import DNOConfig, DNOResult, StepInfo, StepRecord, optimize
from .regularizer import ProbabilityRegularizer, RegularizerTerms, block_log_probs
from .sampling import ddim_coefficients, ddim_step, sample
from .schedule import FLOW, FLOW_RF, VP, NoiseSchedule, get_schedule

__all__ = [
    "DNOError", "StopOptimization", "DNONoise", "TrainableNoise", "DNOConfig", "DNOResult",
    "StepInfo", "StepRecord", "optimize", "ProbabilityRegularizer", "RegularizerTerms",
    "block_log_probs", "ddim_coefficients", "ddim_step", "sample", "VP", "FLOW", "FLOW_RF",
    "NoiseSchedule", "get_schedule", "hybrid_gradient", "zeroth_order_gradient", "EstimatorShare",
]
