"""How a BitSkip model runs fast: kernels, KV cache, scheduler, runner, sampler, engine loop."""

from .llm_engine import EngineConfig, LLMEngine, StepOutput
from .sequence import SamplingParams, Sequence

__all__ = ["EngineConfig", "LLMEngine", "SamplingParams", "Sequence", "StepOutput"]
