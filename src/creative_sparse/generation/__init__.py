"""Generation: the decoding engine, sampling functions, constraints, the strategies (Creative-Sparse's
diverge -> refine among them, `creative.py`) and the seed's wrapper, a facade over it."""

from .engine import GenerationResult, GenerationStats, generate
from .knobs import SamplingParams, sample
from .wrapper import CreativeResult, CreativeSparseWrapper

__all__ = ["CreativeResult", "CreativeSparseWrapper", "GenerationResult", "GenerationStats", "SamplingParams", "generate", "sample"]
