"""Shared pytest fixtures: the reference fixtures beside the checkout (../shared/fixtures).

The suite's cost is XLA compilation; compiling the CPU kernels without LLVM's optimizations
(`--xla_backend_optimization_level=0`, set before jax starts and inherited by the suite's
subprocesses) cuts it by about a third. It changes how fast the kernels run, not what they
compute: no fast-math is enabled at either level.
"""
import os
import pathlib

import jax
import pytest

os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', ''), '--xla_backend_optimization_level=0']).strip()

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / 'shared' / 'fixtures'


@pytest.fixture(scope='session')
def case_public():
  path = FIXTURES / 'case_public.npz'
  assert path.is_file(), f'reference fixture missing: {path}'
  return path


@pytest.fixture(scope='session')
def steps_public():
  path = FIXTURES / 'steps_public.npz'
  assert path.is_file(), f'reference fixture missing: {path}'
  return path


@pytest.fixture
def x64():
  """Float64 jax for the duration of one test."""
  jax.config.update('jax_enable_x64', True)
  try:
    yield
  finally:
    jax.config.update('jax_enable_x64', False)
