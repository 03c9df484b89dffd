"""quant-tutor's domain: content, progress, retrieval, the model engine and measurement.

Nothing in this package imports textual; heavy libraries (torch, transformers,
sentence-transformers) are imported lazily, inside the functions that need them.
"""

__version__ = "0.1.0"
