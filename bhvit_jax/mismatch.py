"""The one listing of what stored weights and a model disagree on (names and shapes), used by
every loader: orbax checkpoints, Flax files, PyTorch state dicts, fine-tuning sources."""
import flax

from bhvit_jax import config_lib


class ShapeMismatchError(config_lib.UserError):
  """The checkpoint was written by a model/optimizer of another shape."""


def raise_mismatch(what: str, problems: list):
  """Raises ShapeMismatchError with the one mismatch listing every loader uses (no-op when
  `problems` is empty): one line per name, at most 40 shown."""
  if not problems:
    return
  shown = problems[:40] + ([f'  ... and {len(problems) - 40} more'] if len(problems) > 40 else [])
  raise ShapeMismatchError(
      f'{what} does not match the current model/optimizer configuration '
      f'({len(problems)} mismatches); was it written with another model config? Nothing on '
      'disk was changed.\n' + '\n'.join(shown))


def mismatch_lines(stored: dict, target: dict) -> list:
  """Listing lines for flat {name: shape} dicts of a checkpoint and of the model."""
  lines = [f'  {k}: checkpoint {stored[k]} vs model {target[k]}'
           for k in sorted(stored.keys() & target.keys()) if stored[k] != target[k]]
  lines += [f'  {k}: not in the model' for k in sorted(stored.keys() - target.keys())]
  return lines + [f'  {k}: missing in checkpoint' for k in sorted(target.keys() - stored.keys())]


def _flat_shapes(tree) -> dict:
  flat = flax.traverse_util.flatten_dict(tree, sep='/') if isinstance(tree, dict) else {}
  return {k: tuple(v.shape) for k, v in flat.items() if hasattr(v, 'shape')}


def check_shapes(stored: dict, target: dict, what: str):
  """Raises ShapeMismatchError listing every leaf whose shape or presence differs."""
  raise_mismatch(what, mismatch_lines(_flat_shapes(stored), _flat_shapes(target)))
