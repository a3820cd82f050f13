r"""Command line of training: `python -m bhvit_jax.train --config configs/demo.py --workdir W`.

(`python -m bhvit_jax.main` is the same program.) On Linux with CPU JAX the process re-executes
itself once with the malloc tunables of `bhvit_jax.hostmem` before JAX starts.
"""
import logging

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from bhvit_jax import checkpoint as ckpt_lib
from bhvit_jax import config_lib
from bhvit_jax import hostmem
from bhvit_jax import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and plots.')


# Failures caused by the config, the data or the files given: reported as one `error:` line.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, ImportError,
               NotImplementedError)


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax's per-save INFO lines drown the bar
  try:
    config_lib.validate(_CONFIG.value)
    _, summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (train.NonFiniteError, ckpt_lib.CheckpointReadError) as e:
    config_lib.fail(str(e), code=1)
  except USER_ERRORS as e:
    logging.debug('traceback of the error below', exc_info=True)
    config_lib.fail(str(e))
  if summary['top1'] is None:
    print(f"stopped at step {summary['step']}; checkpoint saved, rerun the same command to "
          'resume.')
  else:
    print(f"held-out top-1: {summary['top1']:.2f}%")
  print(f"training plot: {summary['plot']}")


def run():
  hostmem.tune_malloc()
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=config_lib.parse_flags)


if __name__ == '__main__':
  run()
