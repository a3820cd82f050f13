r"""Prints parameter, BOP, FLOP and OP counts of a BHViT configuration (bhvit_jax.ops_count).

  python tools/count_ops.py --config configs/bhvit_tiny.py [--config.model.some_fp=False] [--json]
  python tools/count_ops.py --variant small --model-json '{"image_size": 448}'

Without --config the model is a size of `bhvit_jax.model.VARIANTS` (--variant, default tiny)
with the published flags, updated by --model-json. With --json the last line is one JSON
object of the totals.
"""
import json
import sys

from absl import flags

from bhvit_jax import cli
from bhvit_jax import model as model_lib
from bhvit_jax import ops_count


def define_flags(flag_values, argv):
  cli.define_model_flags(flag_values, argv)
  flags.DEFINE_enum('pv', 'bitplanes', ['bitplanes', 'float'],
                    'count P·v as bit-plane BOPs (3 planes gsb, 2 LSQ) or as FLOPs',
                    flag_values=flag_values)
  flags.DEFINE_bool('json', False, 'print the totals as one JSON object on the last line',
                    flag_values=flag_values)


def count(f, argv):
  del argv
  counts = ops_count.count(model_lib.from_config(cli.model_fields(f)), pv=f.pv)
  print(ops_count.format_table(counts))
  if f.json:
    print(json.dumps(counts.summary()))


def main(argv=None):
  return cli.run(count, define_flags, argv)


if __name__ == '__main__':
  sys.exit(main())
