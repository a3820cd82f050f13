"""Shared pytest fixtures: the reference fixtures beside the checkout (../shared/fixtures)."""
import pathlib

import pytest

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
