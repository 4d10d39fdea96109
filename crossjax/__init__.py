"""crossjax: crosscoders over pre-training snapshots of a language model, in JAX."""

__version__ = "0.1.0"
