"""Shared pytest fixtures: the reference fixtures beside the checkout (../shared/fixtures).

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
