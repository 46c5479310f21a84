"""A tiny, random Stable Diffusion 3 pipeline written with diffusers' save_pretrained: the
same directory layout, configs, safetensors and tokenizer files as a real one, small
enough for CPU tests. Tokenizers are built offline: CLIP BPE over single characters,
a T5 unigram model over a few words plus characters."""

from __future__ import annotations

import json
import os
import string

import torch

import helpers

CLIP_MAX_LEN = 16
T5_MAX_LEN = 12
WORDS = ("a small large red blue green yellow purple orange circle square triangle in the top bottom left right "
         "center at on of").split()


def clip_tokenizer(path: str, pad: str):
  from transformers import CLIPTokenizer

  vocab = {"!": 0}
  for piece in list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase]:
    vocab[piece] = len(vocab)
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(path, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n")
  tok = CLIPTokenizer(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"), pad_token=pad)
  tok.model_max_length = CLIP_MAX_LEN
  return tok, len(vocab)


def t5_tokenizer():
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, processors
  from transformers import T5TokenizerFast

  pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
  pieces += [("▁" + w, -1.0) for w in WORDS] + [(c, -5.0) for c in string.ascii_lowercase]
  uni = tokenizers.Tokenizer(models.Unigram(pieces, unk_id=2))
  uni.pre_tokenizer = pre_tokenizers.Metaspace()
  uni.decoder = decoders.Metaspace()
  uni.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
  return T5TokenizerFast(tokenizer_object=uni, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                         extra_ids=0), len(pieces)




def make_pipeline(path: str, seed: int = 0, with_t5: bool = True):
  """Writes a tiny SD3 pipeline to `path` and returns it (float32, CPU).

  Latents: 16 channels at 1/2 resolution (one VAE downsampling); transformer width 32
  with QK RMSNorm and one dual-attention block (SD3.5 Medium's structure);
  joint_attention_dim 32 = T5 width; pooled 20 = 8 (CLIP-L) + 12 (CLIP-G) projections.
  """
  import transformers
  from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                         StableDiffusion3Pipeline)

  torch.manual_seed(seed)
  tmp = os.path.join(path, "_tok")
  tok1, v1 = clip_tokenizer(os.path.join(tmp, "1"), "<|endoftext|>")
  tok2, v2 = clip_tokenizer(os.path.join(tmp, "2"), "!")
  tok3, v3 = t5_tokenizer()

  def clip(hidden, proj, vocab):
    cfg = transformers.CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_MAX_LEN,
                                      projection_dim=proj, hidden_act="gelu", bos_token_id=vocab - 2,
                                      eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    m = transformers.CLIPTextModelWithProjection(cfg).eval()
    helpers.randomize_norms(m)
    return m

  t5_cfg = transformers.T5Config(vocab_size=v3, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                 feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                                 relative_attention_max_distance=20, is_encoder_decoder=False, use_cache=False)
  t5 = transformers.T5EncoderModel(t5_cfg).eval() if with_t5 else None
  if t5 is not None:
    helpers.randomize_norms(t5)
  transformer = SD3Transformer2DModel(
      sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
      num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=20,
      pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,)).eval()
  helpers.randomize_norms(transformer)
  vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16),
                      layers_per_block=1, norm_num_groups=4, sample_size=16,
                      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                      use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305,
                      shift_factor=0.0609).eval()
  pipe = StableDiffusion3Pipeline(
      transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
      text_encoder=clip(8, 8, v1), tokenizer=tok1, text_encoder_2=clip(16, 12, v2), tokenizer_2=tok2,
      text_encoder_3=t5, tokenizer_3=tok3 if with_t5 else None)
  pipe.save_pretrained(path)
  return pipe
