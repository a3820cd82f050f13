"""Command-line configuration checks: every mistake becomes one `error: ...` line, exit 2.

`parse_flags` replaces absl's flag parser in `app.run`: it checks each `--config.a.b=...`
override against the config file's full key set first (so a typo gets a suggestion over all
dotted keys, not a traceback), then parses. `validate` checks the loaded config's values
before anything is written to the work directory.
"""
import difflib
import importlib.util
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


def load_config_file(spec: str):
  """`get_config()` of a config file given as 'path.py' or 'path.py:argument'."""
  path, _, argument = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('loaded_config', path)
  if module_spec is None or not os.path.isfile(path):
    raise FileNotFoundError(f'config file not found: {path}')
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(argument) if argument else module.get_config()


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


def parse_flags(argv):
  """absl flags parser for `app.run` that reports configuration mistakes without tracebacks."""
  spec = _config_file(argv)
  names = _override_names(argv)
  try:
    if spec and names:
      check_keys(load_config_file(spec), names)
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f'{e}\nPass --helpshort to see the flags.')
  except (ConfigError, FileNotFoundError) as e:
    fail(str(e))
  except Exception as e:  # pylint: disable=broad-except
    # Anything else raised while parsing comes from the config file or an override value.
    fail(f'could not load the configuration ({type(e).__name__}: {e})')


def validate(config) -> None:
  """Raises ConfigError listing every unusable value of the training config found up front."""
  from bhvit_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from bhvit_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  errors = []
  try:
    model_lib.from_config(config.model)
  except (ValueError, TypeError) as e:
    errors.append(str(e))
  for key in ('checkpoint_every_steps', 'max_nonfinite_in_row', 'batch_size'):
    if int(config.get(key) or 0) < 1:
      errors.append(f'config.{key}={config.get(key)!r} must be >= 1')
  if not (config.get('total_steps') or config.get('num_epochs')):
    errors.append('set config.total_steps or config.num_epochs (both are 0)')
  on_corrupt = config.data.get('on_corrupt', 'fail')
  if on_corrupt not in ('skip', 'fail'):
    errors.append(f"config.data.on_corrupt={on_corrupt!r} must be 'skip' or 'fail'")
  try:
    data_lib.make_source(config, config.data.train_split)
  except Exception as e:  # pylint: disable=broad-except
    errors.append(f'data: {e}')
  init_from = config.get('init_from')
  if init_from and not os.path.exists(init_from):
    errors.append(f'config.init_from={init_from!r} does not exist')
  if errors:
    raise ConfigError('invalid configuration:\n  ' + '\n  '.join(errors))


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
