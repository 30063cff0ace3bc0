"""Generation: the decoding engine and sampling functions (diverge/refine build on these)."""

from .engine import GenerationResult, GenerationStats, generate
from .knobs import SamplingParams, sample

__all__ = ["GenerationResult", "GenerationStats", "SamplingParams", "generate", "sample"]
