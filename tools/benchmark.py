r"""Training and inference throughput and peak memory of bhvit_jax, optionally beside PyTorch.

  python tools/benchmark.py --config configs/bhvit_tiny.py --batch 16 --mode train --json
  python tools/benchmark.py --variant small --mode eval,train --torch-repo ../BHViT
  python tools/benchmark.py --config configs/bhvit_tiny.py --config.model.fast_paths=plain

Without --config the model is a size of `bhvit_jax.model.VARIANTS` (--variant, updated by
--model-json) with the published flags, trained with a fixed AdamW recipe (`variant_config`).

Every case (implementation × mode) runs in its own subprocess, so the peak RSS
(`resource.getrusage` high-water mark, `peak_mem_gib`, compilation included) belongs to that
case alone; `steps_peak_mem_gib` is the high-water mark of the timed steps only (Linux), after
the heap is trimmed as the training loop does after compiling. A case compiles and runs
one warm-up step (`compile_s`, `warmup_s`: not timed), then times `--repeats` steps and reports
the median as images/s. Cases run one after the other in the same invocation, so JAX and
PyTorch numbers share the machine's load (`load_avg` is recorded before each case).

Modes: `data` times the input pipeline alone (`bhvit_jax.data`'s train and eval streams:
read, JPEG decode, transform, batch, normalize) on `--data-images` JPEGs of 500x375 made from
scikit-learn's sample photographs by crops and rescales and converted by
tools/prepare_imagefolder.py; images/s in total and per worker process for 1, 2 and all cores'
`data.num_workers` (0: loader threads in the calling process, which also gives images per CPU
second, a rate per core that other load on the host does not change), after one warm-up batch.
`train` is the real jitted `bhvit_jax.train` step (optimizer chain of
`optim.build_optimizer`, BatchNorm updates, metrics) with the state donated; `eval` is the
eval-mode forward; `packed` is the bit-packed XNOR-popcount inference of `bhvit_jax.packed`.
`deploy` exports the model and its float twin (binarization off) with
tools/export_deploy.py (IREE, ONNX) and times batch-1 latency (median, p90) and batch-16
images/s on 1 and 2 cores for those artifacts and for JAX packed and float eval, beside the
artifacts' sizes and count_ops' 1-bit limit (docs/performance.md).
The distillation teacher is not part of the timed step (label-smoothed CE only), and on CPU
activations are float32 unless `--compute-dtype` says otherwise.

`--torch-repo PATH` also times the official PyTorch BHViT imported from a local checkout of its
repository (never copied here), with `torch.set_num_threads(--threads)`; the JAX cases then use
the PyTorch model's initial weights converted by `bhvit_jax.convert`. When `transformers` or
`timm` are not installed, the few names the reference imports from them are provided by
minimal stand-ins (`bhvit_jax.official`).
"""
import collections
import dataclasses
import importlib
import importlib.util
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time

from bhvit_jax import official

from absl import flags

from bhvit_jax import cli

GIB = 2.0 ** 30
# XLA on CPU allocates every step's buffers afresh; with glibc's defaults each large buffer is
# a new mmap whose 4 KiB pages fault in on first touch, which dominates the memory-bound
# parts of the step. Transparent huge pages and a heap that is never trimmed remove that.
MALLOC_TUNABLES = ('glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:'
                   'glibc.malloc.trim_threshold=68719476736')
MODES = ('train', 'eval', 'packed', 'data', 'deploy')
# Side of the JPEGs of --mode data: ImageNet's typical 500x375.
DATA_IMAGE_SIDES = (500, 375)


# ----------------------------------------------------------- configuration ---


def variant_config(model_fields: dict):
  """The benchmark's config for a model without a config file: every BHViT field of
  `model_fields` (published defaults for the rest) and a constant-lr AdamW recipe."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from bhvit_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  model = model_lib.from_config(model_fields)
  config = ml_collections.ConfigDict()
  config.compute_dtype = 'float32'
  config.model = ml_collections.ConfigDict(
      {k: getattr(model, k) for k in model_lib.MODEL_FIELDS if k != 'dtype'})
  config.optim = ml_collections.ConfigDict(dict(
      base_lr=5e-4, lr_batch_scale=512, schedule='constant', warmup_steps=0, min_lr=1e-8,
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip_norm=0.0, reg_beta=0.0,
      reg_start_fraction=0.0, reg_placement='optimizer'))
  config.loss = ml_collections.ConfigDict(dict(label_smoothing=0.1, ce_weight=1.0,
                                               distill_weight=0.0))
  config.data = ml_collections.ConfigDict(dict(
      image_size=224, min_crop_scale=0.08, eval_interpolation='bicubic',
      train_interpolation='bilinear', eval_crop_ratio=224 / 256, fast_decode=False))
  return config


def resolve_config(f):
  """The config of a run from the flags: --config (with overrides) or --variant."""
  if f.config is None:
    config = variant_config(cli.model_fields(f))
  else:
    cli.model_fields(f)  # checks that the file has a `model` and no --variant is given
    config = f.config.copy_and_resolve_references()
  # The teacher's forward is not the student's cost; compare the student step alone.
  with config.unlocked():
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
  from bhvit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from bhvit_jax import hostmem  # pylint: disable=g-import-not-at-top
  from bhvit_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from bhvit_jax import train  # pylint: disable=g-import-not-at-top

  config = config.copy_and_resolve_references()
  config.compute_dtype = compute_dtype
  model = model_lib.build(config.model, compute_dtype)
  variables = model_lib.init_variables(model, jax.random.PRNGKey(0))
  if weights and os.path.isfile(weights):
    variables = checkpoint.load_any(weights, model, variables)
  rng = np.random.RandomState(0)
  images = jnp.asarray(rng.randn(batch, model.image_size, model.image_size, 3), jnp.float32)
  labels = jnp.asarray(rng.randint(0, model.num_classes, batch), jnp.int32)

  start = time.perf_counter()
  if mode == 'train':
    # The training loop calibrates the attention quantizers on its first batch; the step
    # refuses uncalibrated ones.
    variables, _ = model_lib.calibrate(model, variables, images)
    step, compiled = _jax_train_step(train, config, variables, images, labels, batch)
  elif mode == 'eval':
    compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(
        variables, images).compile()
    step = lambda: jax.block_until_ready(compiled(variables, images))
  else:
    step, compiled = _jax_packed_step(model, variables, images)
  compile_s = time.perf_counter() - start
  hostmem.release_host_memory()  # as the training loop does after its first step
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


def _jax_train_step(train, config, variables, images, labels, batch):
  import jax  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.loss.teacher.kind = 'none'  # the student's step alone; a teacher is another network
  recipe = train.build_train_step(config, total_steps=1000, steps_per_epoch=100,
                                  global_batch_size=batch)
  holder = {'state': train.create_train_state(variables, recipe.tx)}
  batch_ = {'image': images, 'label': labels}
  rng = jax.random.PRNGKey(0)
  compiled = jax.jit(recipe.train_step, donate_argnums=(0,)).lower(
      holder['state'], batch_, rng).compile()

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


# ------------------------------------------------------------- input data ---


def sample_photographs() -> list:
  """scikit-learn's two sample photographs (china, flower) as RGB PIL images, read from the
  package's files (importing sklearn.datasets takes seconds)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec('sklearn')
  if spec is None:
    raise cli.UserError('--mode data needs scikit-learn (the test extra) for its sample '
                        'photographs')
  folder = os.path.join(os.path.dirname(spec.origin), 'datasets', 'images')
  photos = []
  for name in ('china', 'flower'):
    with Image.open(os.path.join(folder, f'{name}.jpg')) as image:
      photos.append(image.convert('RGB'))
  return photos


def write_sample_jpegs(folder: str, count: int, seed: int = 0) -> None:
  """`count` JPEGs of 500x375 (a quarter portrait) in `folder`/<class>/: random crops of
  scikit-learn's two sample photographs, rescaled."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  photos = sample_photographs()
  rng = np.random.default_rng(seed)
  for i in range(count):
    photo = photos[i % len(photos)]
    w = int(rng.integers(photo.width // 2, photo.width + 1))
    h = min(int(w * 3 / 4), photo.height)
    left = int(rng.integers(0, photo.width - w + 1))
    top = int(rng.integers(0, photo.height - h + 1))
    size = DATA_IMAGE_SIDES if i % 4 else DATA_IMAGE_SIDES[::-1]
    image = photo.crop((left, top, left + w, top + h)).resize(size, Image.BICUBIC)
    class_dir = os.path.join(folder, f'class{i % 10}')
    os.makedirs(class_dir, exist_ok=True)
    image.save(os.path.join(class_dir, f'{i:05d}.JPEG'), quality=90)


def data_config(config, data_dir: str, batch: int, workers: int):
  import ml_collections  # pylint: disable=g-import-not-at-top
  fields = dict(config.get('data') or dict(image_size=config.model.image_size))
  fields.update(name='imagefolder', data_dir=data_dir, train_split='train', eval_split='train',
                num_workers=workers, shuffle_seed=0, mean=(), std=(), on_corrupt='fail')
  return ml_collections.ConfigDict(dict(seed=0, batch_size=batch, data=fields))


def time_stream(iterator, batches: int) -> tuple[float, float]:
  """(wall, this process's CPU) seconds for `batches` batches after one warm-up batch (worker
  start-up)."""
  next(iterator)
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(batches):
    next(iterator)
  return time.perf_counter() - wall, time.process_time() - cpu


def data_cases(config, batch: int, images: int, worker_counts=()) -> list[dict]:
  """Records of the train and eval streams for each of `worker_counts` (default 0 (threads),
  1, 2 and all-core workers)."""
  from bhvit_jax import data  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import prepare_imagefolder  # pylint: disable=g-import-not-at-top
  cores = os.cpu_count() or 1
  records = []
  with tempfile.TemporaryDirectory() as tmp:
    write_sample_jpegs(os.path.join(tmp, 'src', 'train'), images)
    prepare_imagefolder.prepare(os.path.join(tmp, 'src'), os.path.join(tmp, 'shards'),
                                splits=('train',), workers=1)
    for workers in sorted(set(worker_counts) or {0, 1, 2, cores}):
      cfg = data_config(config, os.path.join(tmp, 'shards'), batch, workers)
      for stream in ('train', 'eval'):
        build = data.build_train_iter if stream == 'train' else data.build_eval_iter
        batches = images // batch - 1
        record = {'impl': 'data', 'mode': 'data', 'stream': stream, 'workers': workers,
                  'batch': batch, 'image_size': cfg.data.image_size,
                  'image_sides': DATA_IMAGE_SIDES, 'fast_decode': bool(cfg.data.fast_decode),
                  'load_avg': os.getloadavg()[0], 'cores': cores, 'cpu': cpu_name()}
        iterator = build(cfg, process_index=0, process_count=1)
        seconds, cpu_seconds = time_stream(iterator, batches)
        if stream == 'train':
          iterator.close()
        else:
          collections.deque(iterator, maxlen=0)  # the last batch; its workers then exit
        rate = batches * batch / seconds
        record.update(images_per_s=rate,
                      images_per_s_per_worker=rate / workers if workers else None)
        if not workers:
          # CPU time of the loader threads: the per-core rate, whatever else runs on the host.
          record['images_per_cpu_s'] = batches * batch / cpu_seconds
        records.append(record)
  return records


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


# ------------------------------------------------------------------ deploy ---

# Core counts of the --mode deploy cases, and the batch of their throughput figure.
DEPLOY_THREADS = (1, 2)
DEPLOY_BATCH = 16
# (model, path) of the deploy cases: the config's BHViT through the exported artifacts and
# JAX, and its float twin (binarization off) exported the same way.
DEPLOY_PATHS = (('binary', 'iree'), ('binary', 'onnx'), ('binary', 'jax-packed'),
                ('binary', 'jax-eval'), ('float', 'iree'), ('float', 'onnx'))


def float_twin(config):
  """`config` with 32-bit weights and inputs everywhere: the BHViT without binarization."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  twin = ml_collections.ConfigDict(config.to_dict())
  twin.model.update(weight_bits=32, input_bits=32)
  return twin


def _deploy_variables(model):
  """Initial variables, the attention quantizers calibrated on one random batch."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from bhvit_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  variables = model_lib.init_variables(model, jax.random.PRNGKey(0))
  images = np.random.RandomState(0).randn(2, model.image_size, model.image_size, 3)
  return jax.jit(model_lib.calibrate, static_argnums=0)(model, variables,
                                                        images.astype(np.float32))[0]


def export_deploy_artifacts(config, folder: str) -> tuple[dict, dict]:
  """Writes each model's checkpoint and artifacts into `folder`.

  Returns `({model: {'checkpoint', 'iree': {batch: path}, 'onnx': {batch: path}}}, sizes)`
  with the sizes in bytes of the artifacts, the packed file, the float32 checkpoint and
  count_ops' 1-bit limit.
  """
  from bhvit_jax import convert  # pylint: disable=g-import-not-at-top
  from bhvit_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from bhvit_jax import packed  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      'export_deploy', os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                    'export_deploy.py'))
  export_deploy = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(export_deploy)
  files, sizes = {}, {}
  for name, model_config in (('binary', config), ('float', float_twin(config))):
    model = model_lib.build(model_config.model)
    variables = _deploy_variables(model)
    checkpoint = os.path.join(folder, f'{name}.msgpack')
    convert.save_flax_file(variables, checkpoint)
    files[name] = {'checkpoint': checkpoint, 'iree': {}, 'onnx': {}}
    for fmt, batches in (('iree', (1, DEPLOY_BATCH)), ('onnx', (None,))):
      for batch in batches:  # None: ONNX's dynamic batch, one model for both sizes
        path = os.path.join(folder, f'{name}_{batch}.{"vmfb" if fmt == "iree" else fmt}')
        export_deploy.export(model_config, checkpoint, fmt, 'host', batch, path)
        files[name][fmt].update({b: path for b in ((1, DEPLOY_BATCH) if batch is None
                                                   else (batch,))})
      sizes[f'{name}_{fmt}_bytes'] = os.path.getsize(files[name][fmt][1])
    packed_file = os.path.join(folder, f'{name}.packed')
    packed.save(packed.export(model, variables), packed_file)
    sizes.update({f'{name}_packed_file_bytes': os.path.getsize(packed_file),
                  f'{name}_float32_checkpoint_bytes': packed.float_checkpoint_bytes(variables),
                  f'{name}_one_bit_limit_bytes': packed.theoretical_bytes(model)})
  return files, sizes


def time_calls(call, images, calls: int) -> list[float]:
  """Seconds of each of `calls` calls of `call(images)` after one untimed warm-up call."""
  call(images)
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    call(images)
    times.append(time.perf_counter() - start)
  return times


def _deploy_callers(config, case: dict) -> dict:
  """{batch: images -> logits as numpy} of one deploy case."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  if case['path'] in ('iree', 'onnx'):
    from bhvit_jax import deploy_runtime  # pylint: disable=g-import-not-at-top
    return {int(b): deploy_runtime.Model(path, case['threads']).predict_logits
            for b, path in case['files'].items()}
  import jax  # pylint: disable=g-import-not-at-top
  from bhvit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from bhvit_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from bhvit_jax import packed  # pylint: disable=g-import-not-at-top
  model = model_lib.build(config.model)
  variables = checkpoint.load_any(case['checkpoint'], model)
  if case['path'] == 'jax-packed':
    weights = packed.arrays(packed.export(model, variables))
    fn = jax.jit(lambda w, x: packed.apply(model, w, x))
  else:
    weights = variables
    fn = jax.jit(lambda w, x: model.apply(w, x, train=False))
  call = lambda x: np.asarray(fn(weights, x))
  return {1: call, DEPLOY_BATCH: call}


def deploy_case(config, case: dict, repeats: int) -> dict:
  """Batch-1 latency over 10·repeats calls and batch-16 throughput (median of `repeats`) of
  one path on `case['threads']` cores (the process's CPU affinity, which every runtime's
  thread pool then fits; IREE and onnxruntime are also told the count)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:case['threads']])
  if case['model'] == 'float':
    config = float_twin(config)
  size = config.model.image_size
  rng = np.random.RandomState(0)
  callers = _deploy_callers(config, case)
  single = time_calls(callers[1], rng.randn(1, size, size, 3).astype(np.float32),
                      10 * repeats)
  batch = time_calls(callers[DEPLOY_BATCH],
                     rng.randn(DEPLOY_BATCH, size, size, 3).astype(np.float32), repeats)
  return {'latency_ms': 1e3 * median(single), 'latency_p90_ms': 1e3 * np.percentile(single, 90),
          f'batch{DEPLOY_BATCH}_images_per_s': DEPLOY_BATCH / median(batch),
          'latency_ms_all': [1e3 * t for t in single], 'peak_mem_gib': peak_rss_gib()}


def _iree_tool(name: str, *args) -> str:
  """stdout of one of iree-base-runtime's command-line tools, pinned to the first core."""
  core = sorted(os.sched_getaffinity(0))[:1]
  return subprocess.run([sys.executable, '-m', f'iree._runtime.scripts.{name}', *args],
                        capture_output=True, text=True, check=True,
                        preexec_fn=lambda: os.sched_setaffinity(0, core)).stdout


def dispatch_kind(name: str) -> str:
  """IREE's dispatch name `<function>_dispatch_<n>_<kind>_<shape>_<types>` -> kind; the
  data-tiling relayouts (`_encoding_<n>_encode_...`) are 'encode'."""
  if name.startswith('_encoding'):
    return 'encode'
  kind = re.sub(r'^\w*?_dispatch_\d+_', '', name)
  return re.split(r'_\d|_dispatch_tensor_store|xf32', kind)[0]


def iree_dispatch_profile(module: str, size: int, calls: int,
                          function: str = 'main_b1') -> dict:
  """`calls` calls of an IREE module's batch-1 `function` on one core, from IREE's HAL
  profiling (each dispatch's execution span on the synchronous driver): dispatches per call;
  of the call with the median span (its first dispatch's start to its last one's end), the
  time in dispatches and in the gaps between them (the runtime's work per dispatch); and by
  dispatch kind: count and time per call (each dispatch's median duration × its count)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as folder:
    images, profile = os.path.join(folder, 'images.npy'), os.path.join(folder, 'run.ireeprof')
    np.save(images, np.random.RandomState(0).randn(1, size, size, 3).astype(np.float32))
    _iree_tool('iree_benchmark_module', f'--module={module}', '--device=local-sync',
               f'--function={function}', f'--input=@{images}', '--benchmark_repetitions=1',
               f'--benchmark_min_time={calls}x',
               '--device_profiling_mode=host-execution,executable-metadata',
               f'--device_profiling_output={profile}')
    lines = _iree_tool('iree_profile', 'dispatch', '--dispatch_events', '--format=jsonl',
                       profile).splitlines()
  events = sorted((e for e in map(json.loads, lines) if e['type'] == 'host_dispatch_event'),
                  key=lambda e: e['start_host_time_ns'])
  per_call = len(events) // calls
  spans, inside = [], []
  for i in range(calls):
    call = events[i * per_call:(i + 1) * per_call]
    spans.append(call[-1]['end_host_time_ns'] - call[0]['start_host_time_ns'])
    inside.append(sum(e['duration_ns'] for e in call))
  durations = collections.defaultdict(list)
  for e in events:
    durations[e['key']].append(e['duration_ns'])
  kinds = collections.defaultdict(lambda: [0.0, 0.0])
  for key, ns in durations.items():
    kind = kinds[dispatch_kind(key)]
    kind[0] += len(ns) / calls
    kind[1] += np.median(ns) * len(ns) / calls / 1e6
  median = np.argsort(spans)[calls // 2]
  return {'dispatches': per_call, 'span_ms': spans[median] / 1e6,
          'dispatch_ms': inside[median] / 1e6, 'gap_ms': (spans[median] - inside[median]) / 1e6,
          'kinds': dict(sorted(kinds.items(), key=lambda kv: -kv[1][1]))}


def deploy_cases(f, argv, tunables: bool) -> list[dict]:
  """Exports the artifacts once, then runs every (path, threads) case in its own process."""
  config = resolve_config(f)
  with tempfile.TemporaryDirectory() as folder:
    start = time.perf_counter()
    files, sizes = export_deploy_artifacts(config, folder)
    yield {'impl': 'deploy', 'mode': 'sizes', 'image_size': config.model.image_size,
           'export_s': time.perf_counter() - start, **sizes}
    for model, path in DEPLOY_PATHS:
      for threads in DEPLOY_THREADS:
        case = {'model': model, 'path': path, 'threads': threads,
                'checkpoint': files[model]['checkpoint'],
                'files': files[model].get(path, {})}
        case_argv = [sys.executable, os.path.abspath(__file__), *argv[1:], '--impl', 'deploy',
                     '--mode', 'deploy', '--deploy-case', json.dumps(case)]
        yield _run_subprocess(case_argv, tunables)
    for model in files:
      yield {'impl': 'deploy', 'mode': 'profile', 'model': model, 'path': 'iree',
             'load_avg': os.getloadavg()[0],
             **iree_dispatch_profile(files[model]['iree'][1], config.model.image_size,
                                     f.repeats)}


# ------------------------------------------------------------------ driver ---


def run_case(f, argv) -> dict:
  """Runs one case in this process and returns its record."""
  config = resolve_config(f)
  dtype, repo = f['compute-dtype'].value, f['torch-repo'].value
  source = (f"variant:{f.variant} {f['model-json'].value}".strip() if f.config is None
            else f['config'].config_filename)
  record = {'impl': f.impl, 'mode': f.mode[0], 'batch': f.batch, 'config': source,
            'overrides': [a for a in argv[1:] if a.startswith('--config.')],
            'load_avg': os.getloadavg()[0], 'cores': os.cpu_count(), 'cpu': cpu_name()}
  if f.impl == 'deploy':
    case = json.loads(f['deploy-case'].value)
    record.update({k: case[k] for k in ('model', 'path', 'threads')})
    record.update(deploy_case(config, case, f.repeats))
    return record
  try:
    if f.impl == 'jax':
      if dtype == 'auto':
        import jax  # pylint: disable=g-import-not-at-top
        dtype = config.compute_dtype if jax.default_backend() != 'cpu' else 'float32'
      timing, machine = jax_case(config, f.mode[0], f.batch, f.repeats, f.weights, dtype)
      record['compute_dtype'] = dtype
    else:
      timing, machine = torch_case(config, f.mode[0], f.batch, f.repeats, repo, f.threads,
                                   f.weights)
  except (SkipCase, official.Unsupported) as e:
    record['skipped'] = str(e)
    return record
  step_s = median(timing.step_s)
  record.update(machine)
  record.update(images_per_s=f.batch / step_s, step_s=step_s, compile_s=timing.compile_s,
                warmup_s=timing.warmup_s, step_s_all=timing.step_s, peak_mem_gib=peak_rss_gib(),
                glibc_tunables=os.environ.get('GLIBC_TUNABLES', ''))
  return record


def define_flags(flag_values, argv):
  cli.define_model_flags(flag_values, argv)
  fv = dict(flag_values=flag_values)
  flags.DEFINE_integer('batch', 16, 'images per step', lower_bound=1, **fv)
  flags.DEFINE_list('mode', ['train', 'eval'], f'comma-separated subset of {",".join(MODES)}',
                    **fv)
  flags.DEFINE_integer('repeats', 5, 'timed steps (median reported)', lower_bound=1, **fv)
  flags.DEFINE_integer('data-images', 256, 'JPEGs streamed per --mode data case',
                       lower_bound=2, **fv)
  flags.DEFINE_list('data-workers', [], 'data.num_workers values of --mode data (default 0, '
                    '1, 2 and all cores; 0: loader threads in this process)', **fv)
  flags.DEFINE_enum('compute-dtype', 'auto', ['auto', 'float32', 'bfloat16'],
                    "'auto': float32 on CPU, the config's compute_dtype elsewhere", **fv)
  flags.DEFINE_string('torch-repo', '', 'checkout of the official BHViT repository', **fv)
  flags.DEFINE_integer('threads', os.cpu_count(), 'PyTorch intra-op threads', lower_bound=1,
                       **fv)
  flags.DEFINE_enum('malloc', 'tuned', ['tuned', 'default'], "'tuned': run the JAX cases with "
                    "MALLOC_TUNABLES (PyTorch cases always run in the caller's environment)",
                    **fv)
  flags.DEFINE_bool('json', False, 'one JSON line per case only', **fv)
  # Internal: run one case in this process (used by the driver's subprocesses).
  flags.DEFINE_enum('impl', None, ['jax', 'torch', 'deploy'], 'internal: run one case here',
                    **fv)
  flags.DEFINE_string('deploy-case', '', 'internal: JSON of one --mode deploy case', **fv)
  flags.DEFINE_string('weights', '', 'internal: initial weights (.npz) of the JAX cases', **fv)


def check_flags(f):
  bad = sorted(set(f.mode) - set(MODES))
  if bad or not f.mode:
    raise cli.UserError(f'--mode must be a comma-separated subset of {",".join(MODES)} '
                        f'({",".join(f.mode)})')
  if not all(w.isdigit() for w in f['data-workers'].value):
    raise cli.UserError('--data-workers must be a comma-separated list of counts >= 0 '
                        f"({','.join(f['data-workers'].value)})")
  if f['torch-repo'].value:
    cli.input_path(f['torch-repo'].value, '--torch-repo', 'dir')
  config = resolve_config(f)
  if not f.impl:  # the driver reports a bad model before any case starts
    from bhvit_jax import model as model_lib  # pylint: disable=g-import-not-at-top
    model_lib.from_config(config.model)


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
  if r.get('impl') == 'data':
    per_worker = (f"{r['images_per_s_per_worker']:.1f} per worker" if r['workers'] else
                  f"loader threads: {r['images_per_cpu_s']:.1f} per CPU second")
    return (f"{head} {r['stream']:>5} stream, {r['workers']} workers: "
            f"{r['images_per_s']:7.1f} images/s ({per_worker}) (load {r['load_avg']:.1f})")
  if 'error' in r:
    return f'{head}: FAILED {r["error"]}'
  if r.get('impl') == 'deploy':
    return _describe_deploy(r)
  if 'skipped' in r:
    return f'{head}: skipped ({r["skipped"]})'
  return (f"{head}: {r['images_per_s']:7.2f} images/s  step {r['step_s']:.3f} s  "
          f"compile {r['compile_s']:.1f} s  peak RSS {r['peak_mem_gib']:.2f} GiB "
          f"(steps {r.get('steps_peak_mem_gib') or float('nan'):.2f})  "
          f"step buffers {r.get('step_buffers_gib') or float('nan'):.2f} GiB  "
          f"(load {r['load_avg']:.1f})")


def _describe_deploy(r: dict) -> str:
  if r['mode'] == 'sizes':
    return 'deploy sizes (bytes): ' + ', '.join(f'{k[:-6]} {v:,.0f}' for k, v in r.items()
                                                if k.endswith('_bytes'))
  if r['mode'] == 'profile':
    kinds = ', '.join(f'{k} {n:.0f}× {ms:.3f} ms' for k, (n, ms) in r['kinds'].items())
    return (f"deploy {r['model']:>6} iree profile, batch 1: {r['dispatches']} dispatches, span "
            f"{r['span_ms']:.3f} ms = {r['dispatch_ms']:.3f} in dispatches + {r['gap_ms']:.3f} "
            f"between ({kinds}) (load {r['load_avg']:.1f})")
  return (f"deploy {r['model']:>6} {r['path']:>10}, {r['threads']} thread(s): batch-1 "
          f"{r['latency_ms']:8.2f} ms (p90 {r['latency_p90_ms']:8.2f}), batch {DEPLOY_BATCH} "
          f"{r[f'batch{DEPLOY_BATCH}_images_per_s']:8.1f} images/s (load {r['load_avg']:.1f})")


def _benchmark(f, argv):
  check_flags(f)
  if f.impl:
    print(json.dumps(run_case(f, argv)), flush=True)
    return 0
  records = []
  repo = f['torch-repo'].value
  with tempfile.TemporaryDirectory() as tmp:
    weights = os.path.join(tmp, 'reference_init.npz') if repo else ''
    for mode in f.mode:
      if mode in ('data', 'deploy'):
        workers = [int(w) for w in f['data-workers'].value]
        cases = (data_cases(resolve_config(f), f.batch, f['data-images'].value, workers)
                 if mode == 'data' else deploy_cases(f, argv, f.malloc == 'tuned'))
        for record in cases:
          records.append(record)
          print(json.dumps(record) if f.json else _describe(record), flush=True)
        continue
      for impl in ['torch', 'jax'] if repo else ['jax']:
        tunables = f.malloc == 'tuned' and impl == 'jax'
        # The case gets this command line (config, overrides, model) with its own mode; absl
        # keeps the last value of a repeated flag.
        case_argv = [sys.executable, os.path.abspath(__file__), *argv[1:], '--impl', impl,
                     '--mode', mode, '--weights', weights]
        record = _run_subprocess(case_argv, tunables)
        records.append(record)
        print(json.dumps(record) if f.json else _describe(record), flush=True)
      if repo and not f.json:
        by_impl = {r.get('impl'): r for r in records[-2:] if 'images_per_s' in r}
        if len(by_impl) == 2:
          print(f"  {mode}: jax/torch = "
                f"{by_impl['jax']['images_per_s'] / by_impl['torch']['images_per_s']:.2f}x")
  if not f.json:
    _print_bottleneck(records)
  return 1 if any('error' in r for r in records) else 0


def _print_bottleneck(records):
  """Which of the input pipeline (all workers) and the JAX train step limits training."""
  model = [r['images_per_s'] for r in records if r.get('impl') == 'jax' and r.get('mode') ==
           'train' and 'images_per_s' in r]
  feed = [r['images_per_s'] for r in records if r.get('impl') == 'data' and
          r['stream'] == 'train']
  if model and feed:
    print(f'train step {model[0]:.1f} images/s vs input pipeline up to {max(feed):.1f} '
          f"images/s: {'the input pipeline' if max(feed) < model[0] else 'the model'} limits")


def main(argv=None):
  argv = list(sys.argv if argv is None else argv)
  return cli.run(lambda f, _: _benchmark(f, argv), define_flags, argv)


if __name__ == '__main__':
  sys.exit(main())
