r"""Training and inference throughput and peak memory of bhvit_jax, optionally beside PyTorch.

  python tools/benchmark.py --config configs/bhvit_tiny.py --batch 16 --mode train --json
  python tools/benchmark.py --preset small --mode eval,train --torch-repo /tmp/bhvit_ref
  python tools/benchmark.py --config configs/bhvit_tiny.py --set model.split_groups=False

Every case (implementation × mode) runs in its own subprocess, so the peak RSS
(`resource.getrusage` high-water mark, `peak_mem_gib`, compilation included) belongs to that
case alone; `steps_peak_mem_gib` is the high-water mark of the timed steps only (Linux), after
the heap is trimmed as the training loop does after compiling. A case compiles and runs
one warm-up step (`compile_s`, `warmup_s`: not timed), then times `--repeats` steps and reports
the median as images/s. Cases run one after the other in the same invocation, so JAX and
PyTorch numbers share the machine's load (`load_avg` is recorded before each case).

Modes: `train` is the real jitted `bhvit_jax.train` step (optimizer chain of
`optim.build_optimizer`, BatchNorm updates, metrics) with the state donated; `eval` is the
eval-mode forward; `packed` is the bit-packed XNOR-popcount inference of `bhvit_jax.packed`.
The distillation teacher is not part of the timed step (label-smoothed CE only), and on CPU
activations are float32 unless `--compute-dtype` says otherwise.

`--torch-repo PATH` also times the official PyTorch BHViT imported from a local checkout of its
repository (never copied here), with `torch.set_num_threads(--threads)`; the JAX cases then use
the PyTorch model's initial weights converted by `bhvit_jax.convert`. When `transformers` or
`timm` are not installed, `bhvit_jax.official` provides the few names the reference imports
from them.
"""
import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

GIB = 2.0 ** 30
# XLA on CPU allocates every step's buffers afresh; with glibc's defaults each large buffer is
# a new mmap whose 4 KiB pages fault in on first touch, which dominates the memory-bound
# parts of the step. Transparent huge pages and a heap that is never trimmed remove that.
MALLOC_TUNABLES = ('glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:'
                   'glibc.malloc.trim_threshold=68719476736')
PRESETS = {'tiny': (2, 2, 6, 2), 'small': (3, 4, 8, 4)}
MODES = ('train', 'eval', 'packed')


# ----------------------------------------------------------- configuration ---


def preset_config(name: str):
  """The published BHViT flags for `--preset tiny|small` when no config file is given."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  if name not in PRESETS:
    raise ValueError(f'unknown preset {name!r}; expected one of {sorted(PRESETS)}')
  config = ml_collections.ConfigDict()
  config.compute_dtype = 'float32'
  config.model = ml_collections.ConfigDict(dict(
      hidden_sizes=(64, 128, 256, 512), depths=PRESETS[name], num_heads=(1, 1, 4, 8),
      mlp_sizes=(512, 1024, 1024, 2048), num_classes=1000, image_size=224, patch_size=4,
      window_size=7, weight_bits=1, input_bits=1, norm='batch', shift3=True, shift5=True,
      some_fp=True, gsb=False, recu=False, disable_layerscale=False, drop_path=0.0))
  config.optim = ml_collections.ConfigDict(dict(
      base_lr=5e-4, lr_batch_scale=512, schedule='constant', warmup_steps=0, min_lr=1e-8,
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip_norm=0.0, reg_beta=0.0,
      reg_start_fraction=0.0, reg_placement='optimizer'))
  config.loss = ml_collections.ConfigDict(dict(label_smoothing=0.1, ce_weight=1.0,
                                               distill_weight=0.0))
  return config


def load_config(path: str):
  """`get_config()` of a config file; `path:arg` passes `arg` as config_flags does."""
  path, _, arg = path.partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file not found: {path}')
  spec = importlib.util.spec_from_file_location('benchmark_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def resolve_config(args):
  from bhvit_jax import config_lib  # pylint: disable=g-import-not-at-top
  config = load_config(args.config) if args.config else preset_config(args.preset)
  config_lib.apply_overrides(config, args.set)
  # The teacher's forward is not the student's cost; compare the student step alone.
  config.loss.ce_weight = config.loss.get('ce_weight') or 1.0
  config.loss.distill_weight = 0.0
  return config


# ----------------------------------------------------------------- machine ---


def cpu_name() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def peak_rss_gib() -> float:
  # ru_maxrss is KiB on Linux.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def reset_peak_rss() -> bool:
  """Restarts the process's RSS high-water mark (Linux), so later peaks exclude compilation."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


def steps_peak_rss_gib():
  """RSS high-water mark since `reset_peak_rss` (VmHWM), or None off Linux."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 2 ** 20
  except OSError:
    pass
  return None


def median(values):
  values = sorted(values)
  mid = len(values) // 2
  return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


@dataclasses.dataclass
class Timing:
  warmup_s: float
  step_s: list
  compile_s: float = 0.0


def time_steps(step, repeats: int) -> Timing:
  """`step()` blocks until done; the first call is a warm-up, timed apart."""
  start = time.perf_counter()
  step()
  warmup_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return Timing(warmup_s, times)


# --------------------------------------------------------------------- JAX ---


def jax_case(config, mode: str, batch: int, repeats: int, weights: str, compute_dtype: str):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from bhvit_jax import train  # pylint: disable=g-import-not-at-top

  model = train.build_model(config.model, compute_dtype)
  variables = train.init_variables(model, jax.random.PRNGKey(0))
  if weights and os.path.isfile(weights):
    variables = train.load_pretrained(weights, model, variables)
  rng = np.random.RandomState(0)
  images = jnp.asarray(rng.randn(batch, model.image_size, model.image_size, 3), jnp.float32)
  labels = jnp.asarray(rng.randint(0, model.num_classes, batch), jnp.int32)

  start = time.perf_counter()
  if mode == 'train':
    step, compiled = _jax_train_step(train, model, config, variables, images, labels, batch)
  elif mode == 'eval':
    compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(
        variables, images).compile()
    step = lambda: jax.block_until_ready(compiled(variables, images))
  else:
    step, compiled = _jax_packed_step(model, variables, images)
  compile_s = time.perf_counter() - start
  train.release_host_memory()  # as the training loop does after its first step
  reset = reset_peak_rss()
  timing = time_steps(step, repeats)
  timing.compile_s = compile_s
  device = jax.devices()[0]
  memory = device.memory_stats() or {}
  return timing, {'steps_peak_mem_gib': steps_peak_rss_gib() if reset else None,
                  'backend': jax.default_backend(), 'device_kind': device.device_kind,
                  'device_peak_gib': memory.get('peak_bytes_in_use', 0) / GIB or None,
                  'step_buffers_gib': _step_buffers_gib(compiled), 'jax': jax.__version__}


def _step_buffers_gib(compiled):
  """Arguments + outputs + temporaries of one step as XLA allocates them (donated aliases once)."""
  try:
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
  except (AttributeError, NotImplementedError):
    return None
  return total / GIB


def _jax_train_step(train, model, config, variables, images, labels, batch):
  import jax  # pylint: disable=g-import-not-at-top
  from bhvit_jax import optim  # pylint: disable=g-import-not-at-top
  tx, lr_fn, beta_fn = optim.build_optimizer(config.optim, global_batch_size=batch,
                                             total_steps=1000, steps_per_epoch=100)
  reg_in_loss = config.optim.get('reg_placement', 'optimizer') == 'loss'
  holder = {'state': train.create_train_state(variables, tx)}
  batch_ = {'image': images, 'label': labels}
  rng = jax.random.PRNGKey(0)
  compiled = jax.jit(train.make_train_step(
      model, tx, loss_config=config.loss, lr_fn=lr_fn, beta_fn=beta_fn,
      reg_in_loss=reg_in_loss), donate_argnums=(0,)).lower(holder['state'], batch_, rng).compile()

  def step():
    holder['state'], metrics = compiled(holder['state'], batch_, rng)
    jax.block_until_ready((holder['state'], metrics))
  return step, compiled


def _jax_packed_step(model, variables, images):
  import jax  # pylint: disable=g-import-not-at-top
  from bhvit_jax import packed  # pylint: disable=g-import-not-at-top
  arrays = packed.arrays(packed.export(model, variables))
  compiled = jax.jit(lambda a, x: packed.apply(model, a, x)).lower(arrays, images).compile()
  return lambda: jax.block_until_ready(compiled(arrays, images)), compiled


class SkipCase(Exception):
  """A case that cannot run here (reason in the message)."""


# ----------------------------------------------------------------- PyTorch ---


def torch_case(config, mode: str, batch: int, repeats: int, repo: str, threads: int,
               weights_out: str):
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from bhvit_jax import official  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  try:
    model = official.build_model(repo, config.model)
  except official.Unsupported as e:
    raise SkipCase(str(e)) from e
  if weights_out:
    # numpy arrays, so that the JAX cases load them without importing torch (whose ~0.2 GiB
    # would count in their peak memory).
    np.savez(weights_out, **{k: v.detach().numpy() for k, v in model.state_dict().items()})
  if mode == 'packed':
    raise SkipCase('the reference has no packed inference')
  rng = np.random.RandomState(0)
  size = config.model.image_size
  images = torch.from_numpy(rng.randn(batch, 3, size, size).astype(np.float32))
  labels = torch.from_numpy(rng.randint(0, config.model.num_classes, batch))
  if mode == 'train':
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config.loss.label_smoothing)

    def step():
      opt.zero_grad(set_to_none=True)
      loss = loss_fn(model(images)[0], labels)
      loss.backward()
      opt.step()
  else:
    model.eval()

    def step():
      with torch.inference_mode():
        model(images)
  reset = reset_peak_rss()
  timing = time_steps(step, repeats)
  return timing, {'steps_peak_mem_gib': steps_peak_rss_gib() if reset else None,
                  'backend': 'cpu', 'device_kind': 'cpu', 'device_peak_gib': None,
                  'torch': torch.__version__, 'torch_threads': torch.get_num_threads()}


# ------------------------------------------------------------------ driver ---


def run_case(args) -> dict:
  """Runs one case in this process and returns its record."""
  config = resolve_config(args)
  dtype = args.compute_dtype
  record = {'impl': args.impl, 'mode': args.mode, 'batch': args.batch,
            'config': args.config or f'preset:{args.preset}', 'overrides': args.set,
            'load_avg': os.getloadavg()[0], 'cores': os.cpu_count(), 'cpu': cpu_name()}
  try:
    if args.impl == 'jax':
      if dtype == 'auto':
        import jax  # pylint: disable=g-import-not-at-top
        dtype = config.compute_dtype if jax.default_backend() != 'cpu' else 'float32'
      timing, machine = jax_case(config, args.mode, args.batch, args.repeats, args.weights,
                                 dtype)
      record['compute_dtype'] = dtype
    else:
      timing, machine = torch_case(config, args.mode, args.batch, args.repeats, args.torch_repo,
                                   args.threads, args.weights)
  except SkipCase as e:
    record['skipped'] = str(e)
    return record
  step_s = median(timing.step_s)
  record.update(machine)
  record.update(images_per_s=args.batch / step_s, step_s=step_s, compile_s=timing.compile_s,
                warmup_s=timing.warmup_s, step_s_all=timing.step_s, peak_mem_gib=peak_rss_gib(),
                glibc_tunables=os.environ.get('GLIBC_TUNABLES', ''))
  return record


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  source = parser.add_mutually_exclusive_group()
  source.add_argument('--config', help='ml_collections config file (path[:variant])')
  source.add_argument('--preset', choices=sorted(PRESETS), default='tiny',
                      help='published BHViT flags without a config file')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='config override, e.g. model.split_groups=True (repeatable)')
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--mode', default='train,eval',
                      help=f'comma-separated subset of {",".join(MODES)}')
  parser.add_argument('--repeats', type=int, default=5, help='timed steps (median reported)')
  parser.add_argument('--compute-dtype', default='auto',
                      help="'auto' (float32 on CPU, the config's compute_dtype elsewhere), "
                           "'float32' or 'bfloat16'")
  parser.add_argument('--torch-repo', help='checkout of the official BHViT repository')
  parser.add_argument('--threads', type=int, default=os.cpu_count(),
                      help='PyTorch intra-op threads')
  parser.add_argument('--malloc', choices=('tuned', 'default'), default='tuned',
                      help="'tuned': run the JAX cases with MALLOC_TUNABLES (PyTorch cases "
                           "always run in the caller's environment)")
  parser.add_argument('--json', action='store_true', help='one JSON line per case only')
  # Internal: run one case in this process (used by the driver's subprocesses).
  parser.add_argument('--impl', choices=('jax', 'torch'), help=argparse.SUPPRESS)
  parser.add_argument('--weights', default='', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  modes = [m for m in args.mode.split(',') if m]
  bad = sorted(set(modes) - set(MODES))
  if bad or not modes:
    parser.error(f'--mode {args.mode!r}: expected a comma-separated subset of {MODES}')
  if args.batch < 1 or args.repeats < 1:
    parser.error('--batch and --repeats must be positive')
  args.modes = modes
  return args


def _case_argv(args, impl, mode, weights):
  argv = [sys.executable, os.path.abspath(__file__), '--impl', impl, '--mode', mode,
          '--batch', str(args.batch), '--repeats', str(args.repeats), '--compute-dtype',
          args.compute_dtype, '--threads', str(args.threads), '--weights', weights]
  argv += ['--config', args.config] if args.config else ['--preset', args.preset]
  for item in args.set:
    argv += ['--set', item]
  if args.torch_repo:
    argv += ['--torch-repo', args.torch_repo]
  return argv


def _run_subprocess(argv, tunables: bool) -> dict:
  env = dict(os.environ)
  if tunables:
    env['GLIBC_TUNABLES'] = MALLOC_TUNABLES
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env['PYTHONPATH'] = os.pathsep.join(p for p in (root, env.get('PYTHONPATH')) if p)
  result = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
  lines = [l for l in result.stdout.splitlines() if l.startswith('{')]
  if result.returncode or not lines:
    return {'error': result.stderr.strip().splitlines()[-5:], 'argv': argv[2:]}
  return json.loads(lines[-1])


def _describe(r: dict) -> str:
  head = f"{r.get('impl', '?'):>5} {r.get('mode', '?'):>6} batch {r.get('batch', '?')}"
  if 'error' in r:
    return f'{head}: FAILED {r["error"]}'
  if 'skipped' in r:
    return f'{head}: skipped ({r["skipped"]})'
  return (f"{head}: {r['images_per_s']:7.2f} images/s  step {r['step_s']:.3f} s  "
          f"compile {r['compile_s']:.1f} s  peak RSS {r['peak_mem_gib']:.2f} GiB "
          f"(steps {r.get('steps_peak_mem_gib') or float('nan'):.2f})  "
          f"step buffers {r.get('step_buffers_gib') or float('nan'):.2f} GiB  "
          f"(load {r['load_avg']:.1f})")


def main(argv=None):
  args = parse_args(argv)
  if args.impl:
    args.mode = args.modes[0]
    print(json.dumps(run_case(args)), flush=True)
    return 0
  records = []
  with tempfile.TemporaryDirectory() as tmp:
    weights = os.path.join(tmp, 'reference_init.npz') if args.torch_repo else ''
    for mode in args.modes:
      impls = ['torch', 'jax'] if args.torch_repo else ['jax']
      for impl in impls:
        tunables = args.malloc == 'tuned' and impl == 'jax'
        record = _run_subprocess(_case_argv(args, impl, mode, weights), tunables)
        records.append(record)
        print(json.dumps(record) if args.json else _describe(record), flush=True)
      if args.torch_repo and not args.json:
        by_impl = {r.get('impl'): r for r in records[-2:] if 'images_per_s' in r}
        if len(by_impl) == 2:
          print(f"  {mode}: jax/torch = "
                f"{by_impl['jax']['images_per_s'] / by_impl['torch']['images_per_s']:.2f}x")
  return 1 if any('error' in r for r in records) else 0


if __name__ == '__main__':
  sys.exit(main())
