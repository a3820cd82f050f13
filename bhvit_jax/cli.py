"""The one `main` wrapper of every program (tools/*.py, `python -m bhvit_jax.*`).

Contract: a user error (`config_lib.UserError`, raised where the input is read) prints exactly
one line `error: <what> (<value given>)` to stderr, followed only by an indented listing where
one helps (a checkpoint's mismatched names), and the program exits with status 2. Outputs are
written to a temporary file in the destination directory and renamed when complete, so a
failure leaves every existing file as it was. Any other exception is a defect and keeps its
traceback.

Programs built on absl flags get a fresh `FlagValues` per call, so `main(argv)` can run many
times in one process (tests do); `--config` is an ml_collections config file whose
`--config.a.b=...` overrides are checked against the file's keys (with suggestions).
"""
import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile

from absl import flags
from ml_collections import config_flags

from bhvit_jax import config_lib

UserError = config_lib.UserError
_HELP = ('-h', '--help', '--helpshort', '--helpfull')


def define_config(flag_values, argv, help_string='ml_collections config file '
                  '(path.py or path.py:argument); override keys with --config.a.b=value'):
  """Defines `--config` on `flag_values`, reading its overrides from `argv`."""
  return config_flags.DEFINE_config_file('config', None, help_string, flag_values=flag_values,
                                         sys_argv=argv, lock_config=True)


def define_model_flags(flag_values, argv):
  """`--config`, or `--variant NAME` (a size of `model.VARIANTS`, looked up when the program
  runs) updated by `--model-json`: the model of a tool; see `model_fields`."""
  define_config(flag_values, argv, 'config file whose `model` sub-config is the model '
                '(path.py[:argument]; override with --config.model.x=...)')
  flags.DEFINE_string('variant', 'tiny', 'model size from bhvit_jax.model.VARIANTS, '
                      'without --config', flag_values=flag_values)
  flags.DEFINE_string('model-json', '', 'JSON object of BHViT fields updating --variant '
                      '(without --config)', flag_values=flag_values)


def model_fields(f) -> dict:
  """The BHViT fields chosen by the flags of `define_model_flags`."""
  if f.config is not None:
    if f['model-json'].value or f['variant'].present:
      raise UserError('--variant/--model-json cannot be combined with --config; override '
                      'with --config.model.<field>=... instead')
    if 'model' not in f.config:
      path = config_flags.get_config_filename(f['config'])
      raise UserError(f'the config file has no `model` sub-config ({path})')
    return dict(f.config.model)
  from bhvit_jax import model as model_lib  # pylint: disable=g-import-not-at-top  (jax)
  fields = model_lib.variant(f.variant)
  if f['model-json'].value:
    try:
      overrides = json.loads(f['model-json'].value)
    except json.JSONDecodeError as e:
      raise UserError(f'--model-json is not valid JSON: {e} ({f["model-json"].value})'
                      ) from None
    if not isinstance(overrides, dict):
      raise UserError(f'--model-json must be a JSON object ({f["model-json"].value})')
    fields.update(overrides)
  return fields


def parse(define, argv):
  """(flag values, remaining arguments) of `argv` for the flags declared by `define`."""
  flag_values = flags.FlagValues()
  define(flag_values, argv)
  return flag_values, config_lib.parse_flags(argv, flag_values)


def run(body, define=None, argv=None, positional=False):
  """Runs a program; returns its exit status (2 on a user error).

  Args:
    body: `body(argv)` without `define` (the program parses argv itself, e.g. with
      `ArgumentParser` below), else `body(flag_values, remaining_argv)`.
    define: `define(flag_values, argv)` declares the program's absl flags.
    argv: the command line, program name first (default: sys.argv).
    positional: whether arguments other than flags are allowed.
  """
  argv = list(sys.argv if argv is None else argv)
  try:
    if define is None:
      return body(argv) or 0
    if any(arg in _HELP for arg in argv[1:]):
      flag_values = flags.FlagValues()
      define(flag_values, argv)
      print(flag_values.get_help())
      return 0
    flag_values, rest = parse(define, argv)
    if len(rest) > 1 and not positional:
      raise UserError(f'unexpected arguments ({" ".join(rest[1:])})')
    return body(flag_values, rest) or 0
  except UserError as e:
    logging.debug('traceback of the error below', exc_info=True)
    print(f'error: {e}', file=sys.stderr)
    return config_lib.USAGE_ERROR


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose usage errors are `UserError`s (one `error:` line through `run`)."""

  def error(self, message):
    raise UserError(f'{message} (see {self.prog} --help)')


def input_path(path: str, what: str, kind: str = 'file') -> str:
  """`path` if it exists as a `kind` ('file', 'dir' or 'any'), else a UserError."""
  if not path:
    raise UserError(f'{what} is required')
  if not os.path.exists(path):
    raise UserError(f'{what} does not exist ({path})')
  if kind == 'file' and os.path.isdir(path):
    raise UserError(f'{what} is a directory, expected a file ({path})')
  if kind == 'dir' and not os.path.isdir(path):
    raise UserError(f'{what} is a file, expected a directory ({path})')
  return path


def check_output(path: str, what: str = '--out') -> str:
  """The directory of output file `path`; UserError if it does not exist or `path` is one."""
  if not path:
    raise UserError(f'{what} is required')
  if os.path.isdir(path):
    raise UserError(f'{what} is a directory, expected a file name ({path})')
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise UserError(f'{what}: directory {directory} does not exist (create it first)')
  return directory


@contextlib.contextmanager
def output_file(path: str, what: str = '--out'):
  """Yields a temporary path beside `path`, renamed to `path` when the block completes.

  The directory must exist (a mistyped path should not create a tree); on any failure the
  temporary file is removed and an existing `path` is untouched.
  """
  directory = check_output(path, what)
  base, ext = os.path.splitext(os.path.basename(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f'.{base}.', suffix=f'.partial{ext}')
  os.close(fd)
  # mkstemp's file is private (0600); the output gets the mode of any file the user creates.
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o666 & ~umask)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
