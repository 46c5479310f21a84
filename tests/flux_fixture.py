"""A tiny, random Flux pipeline written with diffusers' save_pretrained: the directory layout,
configs, safetensors and tokenizer files of a real one (CLIP-L and T5 text encoders, a
16-channel VAE, a FluxTransformer2DModel on 2x2-packed latents), small enough for CPU tests."""

from __future__ import annotations

import os

import torch

import helpers
import sd3_fixture

T5_LEN = 12  # max_sequence_length of the tests


def make_pipeline(path: str, seed: int = 0, guidance: bool = True):
  """Writes a tiny Flux-dev-like (guidance embedding) or schnell-like pipeline to `path`
  and returns it (float32, CPU). Latents: 16 channels at 1/2 resolution; transformer width
  32, context 32 = T5 width, pooled 8 = CLIP-L width."""
  import transformers
  from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

  torch.manual_seed(seed)
  tok, vocab = sd3_fixture.clip_tokenizer(os.path.join(path, "_tok"), "<|endoftext|>")
  tok_t5, vocab_t5 = sd3_fixture.t5_tokenizer()
  clip_cfg = transformers.CLIPTextConfig(vocab_size=vocab, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=sd3_fixture.CLIP_MAX_LEN,
                                         hidden_act="quick_gelu", bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                                         pad_token_id=vocab - 1)
  clip = helpers.randomize_norms(transformers.CLIPTextModel(clip_cfg).eval())
  t5_cfg = transformers.T5Config(vocab_size=vocab_t5, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                 feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                                 relative_attention_max_distance=20, is_encoder_decoder=False, use_cache=False)
  t5 = helpers.randomize_norms(transformers.T5EncoderModel(t5_cfg).eval())
  transformer = helpers.randomize_norms(FluxTransformer2DModel(
      patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
      joint_attention_dim=32, pooled_projection_dim=8, guidance_embeds=guidance, axes_dims_rope=(4, 6, 6)).eval())
  vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16),
                      layers_per_block=1, norm_num_groups=4, sample_size=16,
                      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                      use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
                      shift_factor=0.1159).eval()
  scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                              base_image_seq_len=256, max_image_seq_len=4096)
  pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tok, text_encoder_2=t5,
                      tokenizer_2=tok_t5, transformer=transformer)
  pipe.save_pretrained(path)
  return pipe
