"""The FID InceptionV3 weights (pytorch-fid's pt_inception-2015-12-05-6726825d.pth, also
torch-fidelity's weights-inception-2015-12-05-6726825d.pth: torchvision's Inception3 key
names) <-> jdiff.models.inception params."""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np

from jdiff import errors
from jdiff.interop import mapping as M
from jdiff.models import inception

# jdiff leaf -> (suffix of the torch key, layout)
_LEAVES = {
    ("conv", "kernel"): ("conv.weight", "conv"),
    ("scale",): ("bn.weight", "same"),
    ("bias",): ("bn.bias", "same"),
    ("mean",): ("bn.running_mean", "same"),
    ("var",): ("bn.running_var", "same"),
}


def rules(logits: bool = True) -> list[M.Rule]:
  """One rule per parameter of InceptionV3(logits=logits), derived from its tree."""
  shapes = jax.eval_shape(lambda: inception.InceptionV3(logits=logits).init(
      jax.random.key(0), np.zeros((1, 299, 299, 3), np.float32)))["params"]
  out = []
  for path, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    names = tuple(p.key for p in path)
    if names[0] == "fc":
      out += M.linear("fc", ("fc",)) if names[-1] == "kernel" else []
      continue
    for tail, (suffix, layout) in _LEAVES.items():
      if names[-len(tail):] == tail:
        out.append(M.Rule(".".join(names[:-len(tail)] + (suffix,)), names, layout))
  return out


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The tensors of a weights file: .safetensors, .npz, or a PyTorch .pth/.pt (read with torch,
  which must then be installed)."""
  if not os.path.exists(path):
    raise errors.NotFound(f"Inception weights {path!r} not found (pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                            "or torch-fidelity's weights-inception-2015-12-05-6726825d.pth; jdiff downloads nothing)")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return load_file(path)
  if path.endswith(".npz"):
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"reading {path!r} (PyTorch format) needs torch (pip install torch), or convert it once to "
                      ".safetensors where torch is installed") from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {k: v.float().numpy() for k, v in state.items()}


def load_params(path: str, logits: bool = False) -> dict[str, Any]:
  """The FID weights file at `path` -> params of InceptionV3(logits=logits)."""
  state = {k: v for k, v in read_state_dict(path).items() if not k.endswith("num_batches_tracked")}
  if not logits:
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
  return M.import_params(rules(logits), state, what="InceptionV3")


def export_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """params -> torchvision-named tensors (for the parity tests, and to write .safetensors)."""
  return M.export_params(rules("fc" in params), params, what="InceptionV3")
