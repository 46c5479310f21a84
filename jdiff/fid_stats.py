"""Reference statistics for FID and KID from any data source (jdiff/eval/fid.py).

  python -m jdiff.fid_stats --config=configs/mmdit_256.py --config.data.source=folder \\
      --config.data.path=/data/my_images --weights=pt_inception-2015-12-05-6726825d.pth \\
      --out=runs/stats/my_images.npz [--num_images=10000 --resize=tf1_bilinear]

Images are read as training reads them (resized and centre-cropped to data.resolution), then
taken to 299x299 by --resize. Writes mu and sigma (the .npz layout pytorch-fid and ADM's
suite read), the pool3 features (KID needs them; --nosave_features leaves them out), the
captions, the resize and the image count; prints a JSON summary.
"""

import json

from absl import flags
from ml_collections import config_flags

from jdiff import cli
from jdiff.eval import fid

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config whose config.data to read.", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Output .npz path.")
_WEIGHTS = flags.DEFINE_string("weights", None, "FID Inception weights: pytorch-fid's pt_inception-2015-12-05-"
                               "6726825d.pth (or a .safetensors/.npz with its tensors).")
_RESIZE = flags.DEFINE_enum("resize", "tf1_bilinear", list(fid.RESIZES), "Resize to 299x299: TensorFlow 1's "
                            "bilinear (original FID, ADM, torch-fidelity) or PIL bicubic (clean-fid).")
_NUM = flags.DEFINE_integer("num_images", None, "The first N records (default: all).", lower_bound=2)
_BATCH = flags.DEFINE_integer("batch_size", 64, "Images per Inception call.", lower_bound=1)
_SPLIT = flags.DEFINE_string("split", "train", "Source split.")
_SAVE_FEATURES = flags.DEFINE_bool("save_features", True, "Keep the features in the .npz (for KID).")
flags.mark_flags_as_required(["config", "out", "weights"])


def main(argv):
  cli.no_arguments(argv)
  cli.set_log_levels()
  print(json.dumps(fid.write_reference(_CONFIG.value.data, _OUT.value, _WEIGHTS.value, resize=_RESIZE.value,
                                       batch_size=_BATCH.value, num_images=_NUM.value, split=_SPLIT.value,
                                       save_features=_SAVE_FEATURES.value)))


if __name__ == "__main__":
  cli.run(main)
