"""Command-line configuration checks: every mistake is a UserError, one `error: ...` line.

`parse_flags` (used by `bhvit_jax.cli.run`) checks each `--config.a.b=...`
override against the config file's full key set first (so a typo gets a suggestion over all
dotted keys, not a traceback), then parses. `validate` checks the loaded config's values
before anything is written to the work directory.
"""
import difflib
import importlib.util
import math
import os
import sys

from absl import flags

USAGE_ERROR = 2  # as argparse: the command line or the config is wrong


class UserError(ValueError):
  """Bad input from the user (a flag, a file, a value): reported as one `error:` line, exit 2.

  Raised where the input is read; defects inside the library raise anything else and keep
  their traceback.
  """


class ConfigError(UserError):
  """The configuration names an unknown key or holds an unusable value."""


def fail(message: str, code: int = USAGE_ERROR):
  """Prints `error: message` to stderr and exits with `code` (no traceback)."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(code)


def raise_problems(what: str, problems: list):
  """Raises ConfigError: one problem on the error line, several as an indented listing."""
  if len(problems) == 1:
    raise ConfigError(f'{what}: {problems[0]}')
  if problems:
    raise ConfigError(f'{what} ({len(problems)} problems):\n  ' + '\n  '.join(problems))


def load_config_file(spec: str):
  """`get_config()` of a config file given as 'path.py' or 'path.py:argument'.

  Raises UserError when the file is missing, is not Python, has no `get_config`, or its code
  fails (a config file is user input).
  """
  path, _, argument = spec.partition(':')
  if not os.path.isfile(path):
    what = 'is a directory' if os.path.isdir(path) else 'not found'
    raise UserError(f'config file {what} ({path})')
  module_spec = importlib.util.spec_from_file_location('loaded_config', path)
  if module_spec is None:
    raise UserError(f'config file is not a Python file ({path})')
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise UserError(f'config file is not valid Python: {e.msg} at line {e.lineno} ({path})'
                    ) from None
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'config file failed to import: {type(e).__name__}: {e} ({path})') from e
  if not callable(getattr(module, 'get_config', None)):
    raise UserError(f'config file defines no get_config() ({path})')
  try:
    return module.get_config(argument) if argument else module.get_config()
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'get_config({argument!r}) failed: {type(e).__name__}: {e} ({spec})'
                    ) from e


def dotted_keys(config, prefix: str = '') -> list:
  """Every key of a (nested) ConfigDict as 'a.b.c', sub-dicts included."""
  keys = []
  for key, value in config.items():
    name = f'{prefix}{key}'
    keys.append(name)
    if hasattr(value, 'items'):
      keys.extend(dotted_keys(value, name + '.'))
  return keys


def check_keys(config, names) -> None:
  """Raises ConfigError naming each unknown or repeated dotted key (with the closest known)."""
  known = dotted_keys(config)
  # ml_collections appends a repeated tuple override to the first one instead of replacing it.
  problems = [f'config.{name} is given {names.count(name)} times'
              for name in sorted(set(names)) if names.count(name) > 1]
  for name in dict.fromkeys(names):
    if name in known:
      continue
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f' (did you mean config.{close[0]}?)' if close else ''
    problems.append(f'unknown config key config.{name}{hint}')
  if problems:
    raise ConfigError('; '.join(problems))


def _override_names(argv) -> list:
  names = []
  for arg in argv[1:]:
    if arg == '--':
      break
    if arg.startswith('--config.'):
      # `--config.a.b[0]=v` overrides an element of a.b.
      names.append(arg[len('--config.'):].split('=', 1)[0].split('[', 1)[0])
  return names


def _config_file(argv):
  """The value of --config (either `--config=F` or `--config F`), or None."""
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def parse_flags(argv, flag_values=flags.FLAGS):
  """Parses `argv` into `flag_values`; returns the remaining arguments.

  The config file (`--config`) is loaded first so that a missing file, a file that is not
  Python or an unknown `--config.a.b` key is one UserError (with the closest key), not a
  traceback from inside the flags library.
  """
  spec = _config_file(argv)
  if spec:
    check_keys(load_config_file(spec), _override_names(argv))
  try:
    return flag_values(argv)
  except flags.Error as e:
    raise UserError(f'{str(e).splitlines()[0]} (pass --help to see the flags)') from None
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # Anything else raised while parsing comes from an override value.
    raise ConfigError(f'could not apply the overrides to {spec} ({type(e).__name__}: {e})'
                      ) from e


# Numeric hyper-parameters: (dotted key, rule shown in the message, test of a finite value).
HYPER_PARAMETERS = (
    ('optim.base_lr', '> 0', lambda v: v > 0),
    ('optim.min_lr', '>= 0', lambda v: v >= 0),
    ('optim.lr_batch_scale', '> 0', lambda v: v > 0),
    ('optim.warmup_steps', '>= 0', lambda v: v >= 0),
    ('optim.b1', 'in [0, 1)', lambda v: 0 <= v < 1),
    ('optim.b2', 'in [0, 1)', lambda v: 0 <= v < 1),
    ('optim.eps', '> 0', lambda v: v > 0),
    ('optim.weight_decay', '>= 0', lambda v: v >= 0),
    ('optim.grad_clip_norm', '>= 0', lambda v: v >= 0),
    ('optim.reg_beta', '>= 0', lambda v: v >= 0),
    ('optim.reg_start_fraction', 'in [0, 1]', lambda v: 0 <= v <= 1),
    ('loss.label_smoothing', 'in [0, 1)', lambda v: 0 <= v < 1),
    ('loss.ce_weight', '>= 0', lambda v: v >= 0),
    ('loss.distill_weight', '>= 0', lambda v: v >= 0),
    ('model.drop_path', 'in [0, 1)', lambda v: 0 <= v < 1),
    ('data.min_crop_scale', 'in (0, 1]', lambda v: 0 < v <= 1),
    ('total_steps', '>= 0', lambda v: v >= 0),
    ('num_epochs', '>= 0', lambda v: v >= 0),
    ('eval_every_steps', '>= 0', lambda v: v >= 0),
    ('keep_checkpoints', '>= 1', lambda v: v >= 1),
    ('checkpoint_every_steps', '>= 1', lambda v: v >= 1),
    ('max_nonfinite_in_row', '>= 1', lambda v: v >= 1),
    ('batch_size', '>= 1', lambda v: v >= 1),
)


def _lookup(config, dotted: str):
  node = config
  for part in dotted.split('.'):
    if not hasattr(node, 'get') or part not in node:
      return None
    node = node[part]
  return node


def hyper_parameter_errors(config) -> list:
  """One message per numeric hyper-parameter that is not finite or is out of its range."""
  errors = []
  for key, rule, ok in HYPER_PARAMETERS:
    value = _lookup(config, key)
    if value is None:
      continue
    try:
      number = float(value)
    except (TypeError, ValueError):
      errors.append(f'config.{key}={value!r} must be a number {rule}')
      continue
    if not math.isfinite(number) or not ok(number):
      errors.append(f'config.{key}={value!r} must be a finite number {rule}')
  return errors


def validate(config) -> None:
  """Raises ConfigError listing every unusable value of the training config found up front."""
  from bhvit_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from bhvit_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  errors = hyper_parameter_errors(config)
  try:
    model_lib.from_config(config.model)
  except (ValueError, TypeError) as e:
    errors.append(str(e))
  if not (config.get('total_steps') or config.get('num_epochs')):
    errors.append('set config.total_steps or config.num_epochs (both are 0)')
  warmup, total = _lookup(config, 'optim.warmup_steps'), config.get('total_steps')
  if (_lookup(config, 'optim.schedule') == 'cosine' and total and warmup is not None
      and total <= warmup):
    errors.append(f'config.optim.warmup_steps={warmup} must be below '
                  f'config.total_steps={total} (cosine schedule)')
  on_corrupt = config.data.get('on_corrupt', 'fail')
  if on_corrupt not in ('skip', 'fail'):
    errors.append(f"config.data.on_corrupt={on_corrupt!r} must be 'skip' or 'fail'")
  try:
    data_lib.transform_settings(config)
    data_lib.make_source(config, config.data.train_split)
  except Exception as e:  # pylint: disable=broad-except
    errors.append(f'data: {e}')
  if config.get('augment') is not None:
    from bhvit_jax import augment  # pylint: disable=g-import-not-at-top
    try:
      augment.validate(config.augment)
    except ConfigError as e:
      errors.append(str(e))
  init_from = config.get('init_from')
  if init_from and not os.path.exists(_checkpoint_path(init_from)):
    errors.append(f'config.init_from={init_from!r} does not exist')
  raise_problems('invalid configuration', errors)


def _checkpoint_path(spec: str) -> str:
  """The file or directory of a checkpoint spec (`WORKDIR:<step>`, `WORKDIR:best`, ...)."""
  from bhvit_jax import checkpoint  # pylint: disable=g-import-not-at-top  (it imports us)
  try:
    return checkpoint.split_spec(spec)[0]
  except UserError:
    return spec


def apply_overrides(config, items) -> None:
  """Sets each 'a.b=value' of `items` in `config` (value parsed as a Python literal when it is
  one, else kept as a string); ConfigError names an unknown key or a value of the wrong type."""
  import ast  # pylint: disable=g-import-not-at-top
  parsed = []
  for item in items:
    key, sep, raw = item.partition('=')
    if not sep:
      raise ConfigError(f'expected key=value, got {item!r}')
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    parsed.append((key, value))
  check_keys(config, [key for key, _ in parsed])
  for key, value in parsed:
    *parents, leaf = key.split('.')
    target = config
    for part in parents:
      target = target[part]
    try:
      target[leaf] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f'config.{key}={value!r}: {e}') from e


def load_config(spec: str, argv) -> tuple:
  """(config, rest of argv): `--config` file `spec` with the `--config.a.b=value` items of
  `argv` applied, for tools that parse their other flags with argparse."""
  try:
    config = load_config_file(spec)
  except FileNotFoundError as e:
    raise ConfigError(str(e)) from e
  overrides = [a[len('--config.'):] for a in argv if a.startswith('--config.')]
  apply_overrides(config, overrides)
  return config, [a for a in argv if not a.startswith('--config.')]
