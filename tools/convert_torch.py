r"""Converts BHViT weights between the official PyTorch code and bhvit_jax.

PyTorch -> Flax (a `.msgpack` file of {params, batch_stats, quant_state}):
  python tools/convert_torch.py --config configs/bhvit_tiny.py --src BHViT_tiny.pth \
      --out bhvit_tiny.msgpack
Flax (a `.msgpack` file, an orbax run directory of `bhvit_jax.train` or WORKDIR:<step>) ->
PyTorch:
  python tools/convert_torch.py --config configs/demo.py --src runs/demo --out demo.pth

The direction follows from `--src`: a `.pth`/`.pt` file converts to Flax, anything else to
PyTorch. The model configuration (`--config`, with `--config.model.X=...` overrides) must
be the checkpoint's; mismatched names or shapes are listed. Needs the `torch` extra.
"""
import os
import sys

from absl import flags

from bhvit_jax import checkpoint
from bhvit_jax import cli
from bhvit_jax import convert
from bhvit_jax import model as model_lib


def define_flags(flag_values, argv):
  cli.define_config(flag_values, argv, 'config file with a `model` entry')
  flags.DEFINE_string('src', None, '.pth/.pt file, .msgpack file or orbax run directory',
                      flag_values=flag_values)
  flags.DEFINE_string('out', None, 'output path (.msgpack or .pth)', flag_values=flag_values)
  flags.mark_flags_as_required(['config', 'src', 'out'], flag_values=flag_values)


def convert_file(f, argv):
  del argv
  model = model_lib.from_config(f.config.model)
  with cli.output_file(f.out) as tmp:
    # Every format is read and checked against the model by the one loader.
    variables = checkpoint.load_any(f.src, model)
    if f.src.endswith(('.pth', '.pt')):
      convert.save_flax_file(variables, tmp)
    else:
      convert.save_torch_file(convert.flax_to_torch(variables), tmp)
  print(f'wrote {f.out} ({os.path.getsize(f.out) / 2**20:.1f} MiB)')


def main(argv=None):
  return cli.run(convert_file, define_flags, argv)


if __name__ == '__main__':
  sys.exit(main())
