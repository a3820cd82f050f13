r"""Prints parameter, BOP, FLOP and OP counts of a BHViT configuration (bhvit_jax.ops_count).

  python tools/count_ops.py --config configs/bhvit_tiny.py [--config.model.some_fp=False] [--json]
  python tools/count_ops.py --preset small --model-json '{"image_size": 448}'

Without --config the model is BHViT-tiny (or --preset small) with the published flags,
updated by --model-json. With --json the last line is one JSON object of the totals.
"""
import json

from absl import app
from absl import flags
from ml_collections import config_flags

from bhvit_jax import model as model_lib
from bhvit_jax import ops_count

PRESETS = {'tiny': {'depths': (2, 2, 6, 2)}, 'small': {'depths': (3, 4, 8, 4)}}

_CONFIG = config_flags.DEFINE_config_file('config', None, 'ml_collections config file whose '
                                          '`model` sub-config holds the BHViT fields.')
_PRESET = flags.DEFINE_enum('preset', 'tiny', list(PRESETS), 'model when no --config is given')
_MODEL_JSON = flags.DEFINE_string('model-json', '', 'JSON object of BHViT fields overriding '
                                  'the preset (only without --config)')
_PV = flags.DEFINE_enum('pv', 'bitplanes', ['bitplanes', 'float'],
                        'count P·v as bit-plane BOPs (3 planes gsb, 2 LSQ) or as FLOPs')
_JSON = flags.DEFINE_bool('json', False, 'print the totals as one JSON object on the last line')


def model_fields() -> dict:
  if _CONFIG.value is not None:
    if _MODEL_JSON.value:
      raise app.UsageError('--model-json cannot be combined with --config; '
                           'override with --config.model.<field>=... instead')
    if 'model' not in _CONFIG.value:
      raise app.UsageError('the config file has no `model` sub-config')
    return dict(_CONFIG.value.model)
  fields = dict(PRESETS[_PRESET.value])
  if _MODEL_JSON.value:
    try:
      fields.update(json.loads(_MODEL_JSON.value))
    except json.JSONDecodeError as e:
      raise app.UsageError(f'--model-json is not valid JSON: {e}') from None
  return fields


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  counts = ops_count.count(model_lib.from_config(model_fields()), pv=_PV.value)
  print(ops_count.format_table(counts))
  if _JSON.value:
    print(json.dumps(counts.summary()))


if __name__ == '__main__':
  app.run(main)
