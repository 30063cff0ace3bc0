"""Generation: the decoding engine, sampling functions, constraints and the diverge -> refine wrapper."""

from .engine import GenerationResult, GenerationStats, generate
from .knobs import SamplingParams, sample
from .wrapper import CreativeResult, CreativeSparseWrapper

__all__ = ["CreativeResult", "CreativeSparseWrapper", "GenerationResult", "GenerationStats", "SamplingParams", "generate", "sample"]
