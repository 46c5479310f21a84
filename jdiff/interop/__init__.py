"""Weights in and out of jdiff: diffusers-format safetensors <-> jdiff param pytrees.

Each model family has a module (e.g. `sd3`) that turns a diffusers config into jdiff model
arguments and lists its tensor rules; `mapping` applies the rules in either direction,
so import followed by export gives back the original tensors bit for bit.
"""
