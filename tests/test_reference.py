"""Parity with the official PyTorch BHViT on the public fixture (tools/verify_reference.py)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


def _verify(*args):
  # These runs are bound by execution (whole models in float64), so they keep LLVM's
  # optimizations, which the rest of the suite turns off (conftest.py): ~2x faster here.
  flags = ' '.join(flag for flag in os.environ.get('XLA_FLAGS', '').split()
                   if flag != '--xla_backend_optimization_level=0')
  proc = subprocess.run([sys.executable, str(REPO / 'tools' / 'verify_reference.py'), *args,
                         '--json'], capture_output=True, text=True, cwd=REPO, timeout=900,
                        env={**os.environ, 'XLA_FLAGS': flags})
  lines = proc.stdout.strip().splitlines()
  assert lines, proc.stderr[-3000:]
  return proc.returncode, json.loads(lines[-1])


@pytest.mark.parametrize('x64', [True, False], ids=['float64', 'float32'])
def test_case_public_matches_reference(case_public, x64):
  rc, report = _verify(str(case_public), *(['--x64'] if x64 else []))
  assert rc == 0 and report['passed'], report
  tight = 1e-12 if x64 else 1e-4  # float64 replays every sign decision of the reference
  assert report['eval_logits']['rel'] <= tight and report['train_logits']['rel'] <= tight
  assert report['ce']['rel'] <= (1e-12 if x64 else 1e-5)
  assert report['reg']['rel'] <= 1e-5 and report['reg']['names_match']
  assert report['grads']['frac_within_limit'] >= 0.99 and report['grads']['count'] > 200
  assert report['bn_running']['rel'] <= 1e-4


def test_training_step_matches_reference_adamw(steps_public):
  rc, report = _verify(str(steps_public), '--x64')
  assert rc == 0 and report['passed'], report
  for key in ('step0_loss', 'step1_logits', 'step1_loss'):
    assert report[key]['rel'] <= 1e-8, (key, report[key])
  state = report['state_after']
  assert state['count'] > 300 and state['median_rel'] <= 1e-6
  if state['reference'] == 'f64':
    assert state['max_rel'] <= 1e-6
