"""Model integrations: loading (embedded default, Hugging Face ids, local paths).

Importing this package is cheap: transformers is imported only when a model is
loaded.

Example:
    >>> from creative_sparse.models import load_model
    >>> model, tokenizer = load_model("smollm2-135m")    # doctest: +SKIP
"""

from .cache import (
    CacheCorruptError,
    cached_model_dir,
    clear_cache,
    default_cache_dir,
    verify_cache,
    write_cache,
)
from .fast_linear import fast_linears
from .loading import (
    DEFAULT_MODEL,
    ModelNotFoundError,
    dequantize_gguf,
    embedded_gguf_path,
    gguf_cache_key,
    load_model,
)

__all__ = [
    "DEFAULT_MODEL",
    "CacheCorruptError",
    "ModelNotFoundError",
    "cached_model_dir",
    "clear_cache",
    "default_cache_dir",
    "dequantize_gguf",
    "embedded_gguf_path",
    "fast_linears",
    "gguf_cache_key",
    "load_model",
    "verify_cache",
    "write_cache",
]
