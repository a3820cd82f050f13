r"""Converts BHViT weights between the official PyTorch code and bhvit_jax.

PyTorch -> Flax (a `.msgpack` file of {params, batch_stats, quant_state}):
  python tools/convert_torch.py --config configs/bhvit_tiny.py --src BHViT_tiny.pth \
      --out bhvit_tiny.msgpack
Flax (a `.msgpack` file or an orbax run directory of `bhvit_jax.train`) -> PyTorch:
  python tools/convert_torch.py --config configs/demo.py --src runs/demo --out demo.pth

The direction follows from `--src`: a `.pth`/`.pt` file converts to Flax, anything else to
PyTorch. The model configuration (`--config`, with `--config.model.X=...` overrides) must
be the checkpoint's; mismatched names or shapes are listed. Needs the `torch` extra.
"""
import os

from absl import app
from absl import flags
from ml_collections import config_flags

from bhvit_jax import convert
from bhvit_jax import model as model_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'config file with a `model` entry')
_SRC = flags.DEFINE_string('src', None, '.pth/.pt file, .msgpack file or orbax run directory')
_OUT = flags.DEFINE_string('out', None, 'output path (.msgpack or .pth)')
flags.mark_flags_as_required(['config', 'src', 'out'])


def main(argv):
  del argv
  model = model_lib.from_config(_CONFIG.value.model)
  src, out = _SRC.value, _OUT.value
  if src.endswith(('.pth', '.pt')):
    variables = convert.torch_to_flax(convert.load_torch_file(src), model)
    convert.save_flax_file(variables, out)
  else:
    variables = convert.load_flax_variables(src)
    convert.torch_to_flax(convert.flax_to_torch(variables), model)  # validates names, shapes
    convert.save_torch_file(convert.flax_to_torch(variables), out)
  print(f'wrote {out} ({os.path.getsize(out) / 2**20:.1f} MiB)')


if __name__ == '__main__':
  app.run(main)
