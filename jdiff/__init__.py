"""jdiff: text-to-image diffusion transformers trained with flow matching in JAX/Flax."""

__version__ = "0.1.0"
