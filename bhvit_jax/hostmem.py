"""Host (C heap) memory settings for XLA:CPU processes.

glibc's default malloc returns large blocks to the kernel on every free and re-faults them on
the next allocation; XLA:CPU allocates and frees activation-sized buffers every step, so that
churn costs as much as some kernels (docs/performance.md measures it). The tunables below keep
freed memory in the process. glibc reads them only at process start, so `tune_malloc` re-executes
the entry point once with them set.
"""
import ctypes
import os
import sys

MALLOC_TUNABLES = ('glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:'
                   'glibc.malloc.trim_threshold=68719476736')
_MARK = 'BHVIT_MALLOC_TUNED'


def tune_malloc():
  """Re-executes this process with MALLOC_TUNABLES unless already done, or set otherwise.

  Only on Linux with CPU JAX (the default backend is chosen by JAX_PLATFORMS or by what is
  installed; a GPU/TPU process keeps its activations off the host heap). A user's own
  GLIBC_TUNABLES, or BHVIT_MALLOC_TUNED=0, is left alone.
  """
  if (not sys.platform.startswith('linux') or os.environ.get(_MARK) is not None
      or os.environ.get('GLIBC_TUNABLES') or not _cpu_only()):
    return
  env = dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES, **{_MARK: '1'})
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + _command_line(), env)


def _cpu_only() -> bool:
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  import importlib.util  # pylint: disable=g-import-not-at-top
  return not any(importlib.util.find_spec(name) for name in (
      'jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin', 'libtpu'))


def _command_line() -> list:
  # `python -m pkg.mod` arrives as sys.argv[0] == the module's file; re-run it as a module.
  spec = getattr(sys.modules.get('__main__'), '__spec__', None)
  if spec is not None and spec.name:
    return ['-m', spec.name.removesuffix('.__main__')] + sys.argv[1:]
  return list(sys.argv)


def release_host_memory():
  """Hands memory freed on the C heap back to the operating system.

  Compiling the train step leaves ~1.5 GiB freed but resident in glibc's heap, where the
  step's large buffers cannot reuse it; trimming once after the compile lowers the training
  process's peak by that much. A no-op where `malloc_trim` does not exist.
  """
  try:
    ctypes.CDLL(None).malloc_trim(0)
  except (OSError, AttributeError):
    pass
