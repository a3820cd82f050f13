"""Distillation teachers by name: `config.loss.teacher.kind` -> (module, variables)."""
import jax

from bhvit_jax import checkpoint as ckpt_lib
from bhvit_jax import config_lib
from bhvit_jax import model as model_lib


def _bhvit(teacher_config, student_config):
  if not teacher_config.checkpoint:
    raise config_lib.UserError(
        "loss.teacher.kind='bhvit' needs loss.teacher.checkpoint (.pth or orbax dir)")
  model_config = student_config.model
  if teacher_config.get('config'):
    model_config = config_lib.load_config_file(teacher_config.config).model
  model = model_lib.build(model_config, student_config.compute_dtype)
  reference = model_lib.init_variables(model, jax.random.PRNGKey(0))
  return model, ckpt_lib.load_any(teacher_config.checkpoint, model, reference)


def _deit(teacher_config, student_config):
  from bhvit_jax import deit  # pylint: disable=g-import-not-at-top
  return deit.build_teacher(teacher_config, student_config)


TEACHERS = {'bhvit': _bhvit, 'deit': _deit}


def build(config):
  """(module, variables) of the distillation teacher, or (None, None) for kind 'none'."""
  kind = config.loss.teacher.kind
  if kind == 'none':
    return None, None
  if kind not in TEACHERS:
    raise config_lib.UserError(f"unknown loss.teacher.kind {kind!r}; expected 'none' or one of "
                               f'{sorted(TEACHERS)}')
  return TEACHERS[kind](config.loss.teacher, config)
