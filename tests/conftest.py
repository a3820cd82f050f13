"""Shared pytest fixtures (the reference fixtures beside the checkout, ../shared/fixtures) and
the suite's distribution over pytest-xdist workers.

`make test` runs `-n 2 --dist loadgroup`: tests that share a module- or session-scoped fixture
of their module join one xdist group (unless they name a group themselves), so an expensive
fixture (a trained run, a multi-process job) is built on one worker, not once per worker that
happens to receive one of its tests.

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


def _shared_fixtures(item) -> list:
  """Names of the module/session-scoped fixtures of `item`'s own module that it uses."""
  module = item.module.__name__
  fixtures = item._fixtureinfo.name2fixturedefs  # pylint: disable=protected-access
  return sorted(name for name, defs in fixtures.items()
                if defs[-1].scope in ('module', 'session')
                and getattr(defs[-1].func, '__module__', None) == module)


@pytest.hookimpl(tryfirst=True)  # before xdist turns the marks into scheduling scopes
def pytest_collection_modifyitems(items):
  """Tests connected through shared fixtures form one group `module:fixture` (the
  alphabetically first fixture of the connected set)."""
  parent = {}

  def root(key):
    while parent.setdefault(key, key) != key:
      key = parent[key]
    return key
  uses = {}
  for item in items:
    if item.get_closest_marker('xdist_group') is None:
      keys = [f'{item.module.__name__}:{name}' for name in _shared_fixtures(item)]
      for key in keys[1:]:
        a, b = sorted((root(keys[0]), root(key)))
        parent[b] = a
      uses[item] = keys
  for item, keys in uses.items():
    if keys:
      item.add_marker(pytest.mark.xdist_group(root(keys[0])))


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
def torch_repo():
  """The checkout of the official BHViT (IMRL/BHViT) named by BHVIT_TORCH_REPO, for the
  comparisons with its PyTorch code. With PyTorch (the test extra) installed an unset or wrong
  path fails; BHVIT_TORCH_REPO=skip skips those comparisons by choice."""
  repo = os.environ.get('BHVIT_TORCH_REPO', '')
  if repo == 'skip':
    pytest.skip('BHVIT_TORCH_REPO=skip: comparison with the official PyTorch code not run')
  pytest.importorskip('torch', reason='the comparisons with the official code need the test '
                      'extra (PyTorch)')
  assert repo, ('set BHVIT_TORCH_REPO to a checkout of the official BHViT (IMRL/BHViT) to '
                'compare with its PyTorch code, or to "skip" to skip those comparisons')
  assert (pathlib.Path(repo) / 'transformer' / 'BHViT.py').is_file(), (
      f'BHVIT_TORCH_REPO={repo} is not a checkout of the official BHViT (no transformer/BHViT.py)')
  return repo


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
