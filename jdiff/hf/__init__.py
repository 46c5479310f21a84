"""Hugging Face formats at the level of whole workdirs and datasets: diffusers pipelines and
LoRA files into and out of jdiff workdirs (workdirs), and datasets encoded once with a
pipeline's frozen VAE and text encoders (latent_cache). The weight mappings themselves live
in jdiff.interop."""
