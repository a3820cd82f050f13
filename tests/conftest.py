"""Shared pytest fixtures (the reference fixtures beside the checkout, ../shared/fixtures) and
the suite's distribution over pytest-xdist workers.

`make test` runs `-n 2 --dist loadgroup`: a test that uses a module- or session-scoped fixture
of its own module joins the xdist group of that module (unless it names a group itself), so
an expensive fixture (a trained run, a multi-process job) is built on one worker, not once
per worker that happens to receive one of its tests.

The suite's cost is XLA compilation; compiling the CPU kernels without LLVM's optimizations
(`--xla_backend_optimization_level=0`, set before jax starts and inherited by the suite's
subprocesses) cuts it by about a third. It changes how fast the kernels run, not what they
compute: no fast-math is enabled at either level.
"""
import importlib.util
import os
import pathlib

import jax
from PIL import Image
import pytest

os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', ''), '--xla_backend_optimization_level=0']).strip()

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / 'shared' / 'fixtures'


def _shared_fixture_group(item):
  """The xdist group of `item`: its module's name when it uses a module/session fixture that
  its module defines, else None."""
  module = item.module.__name__
  for defs in item._fixtureinfo.name2fixturedefs.values():  # pylint: disable=protected-access
    definition = defs[-1]
    if definition.scope in ('module', 'session') and getattr(
        definition.func, '__module__', None) == module:
      return module
  return None


@pytest.hookimpl(tryfirst=True)  # before xdist turns the marks into scheduling scopes
def pytest_collection_modifyitems(items):
  for item in items:
    if item.get_closest_marker('xdist_group') is None:
      group = _shared_fixture_group(item)
      if group:
        item.add_marker(pytest.mark.xdist_group(group))


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


@pytest.fixture(scope='session')
def photos():
  """{'china', 'flower'}: scikit-learn's two sample photographs, RGB 640x427 PIL images
  (read from the package's files: importing sklearn.datasets takes seconds)."""
  spec = importlib.util.find_spec('sklearn')
  assert spec is not None, 'scikit-learn (the test extra) is needed for its sample photographs'
  folder = pathlib.Path(spec.origin).parent / 'datasets' / 'images'
  images = {}
  for name in ('china', 'flower'):
    with Image.open(folder / f'{name}.jpg') as img:
      images[name] = img.convert('RGB')
  return images


@pytest.fixture
def x64():
  """Float64 jax for the duration of one test."""
  jax.config.update('jax_enable_x64', True)
  try:
    yield
  finally:
    jax.config.update('jax_enable_x64', False)
