"""The entry points apply the malloc tunables themselves (bhvit_jax.hostmem)."""
import os
import subprocess
import sys

from bhvit_jax import hostmem

PROBE = '''
from bhvit_jax import hostmem
hostmem.tune_malloc()
import os, sys
print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])
'''


def _run(tmp_path, env_update):
  script = tmp_path / 'probe.py'
  script.write_text(PROBE)
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'BHVIT_MALLOC_TUNED')}
  env.update(env_update, JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, str(script), 'a', '--b=1'], env=env, check=True,
                          capture_output=True, text=True, timeout=120)
  return result.stdout.strip()


def test_cpu_process_reexecutes_once_with_the_tunables_and_its_arguments(tmp_path):
  assert _run(tmp_path, {}) == f"{hostmem.MALLOC_TUNABLES} ['a', '--b=1']"


def test_a_users_own_setting_is_left_alone(tmp_path):
  assert _run(tmp_path, {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}).startswith(
      'glibc.malloc.arena_max=2 ')
  assert _run(tmp_path, {'BHVIT_MALLOC_TUNED': '0'}).startswith('None ')
