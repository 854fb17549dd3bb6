"""DNO on diffusers pipelines: the second host of the core (the only part of ``dno`` that imports diffusers).

    from dno.diffusers_host import optimize_pipeline
    from dno.rewards import BuiltinReward
    out = optimize_pipeline(pipe, "a photo of a cat", BuiltinReward("brightness"), steps=30, opt_steps=20)
    out.images[0].save("cat.png"); out.history; out.latents

Install with ``pip install -r requirements-diffusers.txt`` (or the ``diffusers`` extra).
"""
from .noise import comfyui_noise, diffusers_noise, generators_for
from .pipelines import FAMILIES, PipelineParts, build_parts, pipeline_family
from .run import MEMORY_MODES, PipelineResult, memory_checkpoint, optimize_pipeline, to_pil
from .schedulers import PipelineSchedule, SamplingPlan, plan_sampling

__all__ = [
    "FAMILIES", "MEMORY_MODES", "PipelineParts", "PipelineResult", "PipelineSchedule", "SamplingPlan",
    "build_parts", "comfyui_noise", "diffusers_noise", "generators_for", "memory_checkpoint",
    "optimize_pipeline", "pipeline_family", "plan_sampling", "to_pil",
]
