"""The error contract of every entry point (bhvit_jax.cli): a bad input gives exit status 2,
one `error:` line on stderr (only an indented listing may follow), no traceback, and every
existing file (a trained run, the inputs, an output that would be overwritten) unchanged.

The programs run in-process through their `main(argv)`; one case runs as a real subprocess.
"""
import hashlib
import json
import shutil
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest

from bhvit_jax import cli
from bhvit_jax import config_lib
from bhvit_jax import main as train_main
from bhvit_jax import model as model_lib
from bhvit_jax import packed
from bhvit_jax import train

from test_tools import REPO, TINY_CONFIG
import programs

# Two steps of the shrunk demo (stopped as on a preemption, so without the final evaluation):
# a trained run with checkpoints, metrics and a plot, to be left intact by every bad input.
TRAIN_STEPS = 2


TOOLS = ('evaluate', 'count_ops', 'export_packed', 'plot_attention', 'convert_torch',
         'verify_reference', 'plot_training', 'prepare_imagefolder', 'benchmark')


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  """A directory with a trained run (`run/`), its config and bad inputs of every kind."""
  root = tmp_path_factory.mktemp('errors')
  (root / 'tiny.py').write_text(TINY_CONFIG)
  config = config_lib.load_config_file(str(root / 'tiny.py'))
  config.update(batch_size=8, log_every_steps=1)
  _, summary = train.train_and_evaluate(config, str(root / 'run'),
                                        should_stop=lambda step: step >= TRAIN_STEPS)
  assert summary['step'] == TRAIN_STEPS
  (root / 'syntax.py').write_text('def get_config(:\n')
  (root / 'noget.py').write_text('x = 1\n')
  (root / 'notes.txt').write_text('hello\n')
  (root / 'text.pth').write_text('not a checkpoint\n')
  (root / 'random.bin').write_bytes(np.random.default_rng(0).bytes(256))
  np.savez(root / 'other.npz', a=np.zeros(3))
  (root / 'bad.npz').write_bytes(b'PK\x03\x04 truncated zip')
  whole = flax.serialization.msgpack_serialize({'params': {'w': np.zeros((64, 64), np.float32)}})
  (root / 'truncated.msgpack').write_bytes(whole[:len(whole) // 2])
  shutil.copytree(root / 'run' / 'checkpoints', root / 'corrupt')
  for path in (root / 'corrupt').rglob('*'):
    if path.is_file() and path.parent.name == 'd':  # the arrays' data, not the metadata
      path.write_bytes(b'')
  (root / 'nometrics').mkdir()
  (root / 'badmetrics').mkdir()
  (root / 'badmetrics' / 'metrics.jsonl').write_text('{"kind": "train", "loss": NaN\n')
  return root


def _snapshot(root):
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob('*')) if p.is_file()}


T, D = '{tiny}', '{root}'  # placeholders: the tiny config file and the fixture directory
CASES = [
    # training: config files, keys, value types, hyper-parameters, geometry, paths
    ('train', ['--config', f'{D}/missing.py', '--workdir', f'{D}/new'], 'config file not found'),
    ('train', ['--config', f'{D}/notes.txt', '--workdir', f'{D}/new'], 'not a Python file'),
    ('train', ['--config', f'{D}/syntax.py', '--workdir', f'{D}/new'], 'not valid Python'),
    ('train', ['--config', f'{D}/noget.py', '--workdir', f'{D}/new'], 'no get_config'),
    ('train', ['--config', T, '--workdir', f'{D}/new', '--config.optim.bse_lr=1'],
     'did you mean config.optim.base_lr'),
    ('train', ['--config', T, '--workdir', f'{D}/new', '--config.batch_size=abc'],
     'config.batch_size=abc'),
    ('train', ['--config', T, '--workdir', f'{D}/new', '--config.optim.base_lr=nan'],
     'config.optim.base_lr=nan'),
    ('train', ['--config', T, '--workdir', f'{D}/new', '--config.optim.b2=1.5'],
     'config.optim.b2=1.5'),
    ('train', ['--config', T, '--workdir', f'{D}/new', '--config.optim.weight_decay=-1.0'],
     'config.optim.weight_decay=-1.0'),
    ('train', ['--config', T, '--workdir', f'{D}/new', '--config.optim.reg_start_fraction=2.0'],
     'reg_start_fraction=2.0'),
    ('train', ['--config', T, '--workdir', f'{D}/new', '--config.total_steps=2',
               '--config.optim.warmup_steps=5'],
     'warmup_steps=5 must be below config.total_steps=2'),
    ('train', ['--config', T, '--workdir', f'{D}/new', '--config.batch_size=0'],
     'config.batch_size=0'),
    ('train', ['--config', T, '--workdir', f'{D}/new', '--config.model.image_size=33'],
     'image_size=33'),
    ('train', ['--config', T, '--workdir', f'{D}/new', '--config.data.name=cifar'], 'cifar'),
    ('train', ['--config', T, '--workdir', f'{D}/new', f'--config.init_from={D}/none.pth'],
     'none.pth'),
    ('train', ['--config', T, '--workdir', f'{D}/run/metrics.jsonl'], '--workdir is a file'),
    ('train', ['--config', T], '--workdir'),
    # evaluate: checkpoints of every kind, keys, split names, output directory
    ('evaluate', ['--config', T, '--checkpoint', f'{D}/none.msgpack'], 'checkpoint not found'),
    ('evaluate', ['--config', T, '--checkpoint', f'{D}/text.pth'],
     'not a readable PyTorch checkpoint'),
    ('evaluate', ['--config', T, '--checkpoint', f'{D}/truncated.msgpack'],
     'not a msgpack file'),
    ('evaluate', ['--config', T, '--checkpoint', f'{D}/random.bin'], 'not a packed BHViT file'),
    ('evaluate', ['--config', T, '--checkpoint', f'{D}/run:999'], 'no orbax checkpoint 999'),
    ('evaluate', ['--config', T, '--checkpoint', f'{D}/corrupt'], 'unreadable orbax checkpoint'),
    ('evaluate', ['--config', T, '--checkpoint', f'{D}/nometrics'], 'no orbax checkpoint'),
    ('evaluate', ['--config', f'{REPO}/configs/demo.py', '--checkpoint', f'{D}/run'],
     'does not match'),
    ('evaluate', ['--config', T, '--checkpoint', f'{D}/run', '--config.modl.gsb=True'],
     'did you mean config.model.gsb'),
    ('evaluate', ['--config', T, '--checkpoint', f'{D}/run', '--split', 'validation'],
     "not 'validation'"),
    ('evaluate', ['--config', T, '--checkpoint', f'{D}/run', '--json', f'{D}/no/dir/r.json'],
     'does not exist'),
    # count_ops: model geometry, variants, JSON
    ('count_ops', ['--variant', 'demo', '--model-json', '{"image_size": 40}'], 'image_size=40'),
    ('count_ops', ['--variant', 'huge'], 'unknown model variant (huge)'),
    ('count_ops', ['--model-json', '{"image_size": '], 'not valid JSON'),
    ('count_ops', ['--config', T, '--config.model.window_size=2'], 'window_size=2'),
    ('count_ops', ['--config', T, '--variant', 'small'], 'cannot be combined'),
    # export_packed: output paths, fixtures, checkpoints of another configuration
    ('export_packed', ['--config', T, '--checkpoint', f'{D}/run', '--out', f'{D}/no/x.pk'],
     'does not exist'),
    ('export_packed', ['--config', T, '--checkpoint', f'{D}/run', '--out', f'{D}/run'],
     'is a directory'),
    ('export_packed', ['--fixture', f'{D}/random.bin', '--out', f'{D}/run/training.png'],
     'is not an .npz fixture'),
    ('export_packed', ['--fixture', f'{D}/other.npz', '--out', f'{D}/run/training.png'],
     'unknown key layout'),
    ('export_packed', ['--variant', 'demo', '--checkpoint', f'{D}/run', '--out',
                       f'{D}/run/training.png'], 'does not match'),
    # plot_attention: image specs (indices, split names, files), selections
    ('plot_attention', ['--config', T, '--checkpoint', f'{D}/run', '--image', 'mnist:999999',
                        '--out', f'{D}/run/training.png'], 'mnist:999999'),
    ('plot_attention', ['--config', T, '--checkpoint', f'{D}/run', '--image', 'mnist:val:3'],
     'mnist:val:3'),
    ('plot_attention', ['--config', T, '--checkpoint', f'{D}/run', '--image', 'fixture:0'],
     'needs --fixture'),
    ('plot_attention', ['--config', T, '--checkpoint', f'{D}/run', '--image', f'{D}/no.png'],
     'does not exist'),
    ('plot_attention', ['--config', T, '--checkpoint', f'{D}/run', '--image', f'{D}/notes.txt'],
     'not a readable image'),
    ('plot_attention', ['--config', T, '--checkpoint', f'{D}/run', '--image', 'mnist:1',
                        '--blocks', 'layerZ_0', '--out', f'{D}/run/training.png'],
     'no attention block named'),
    # convert_torch
    ('convert_torch', ['--config', T, '--src', f'{D}/text.pth', '--out', f'{D}/o.msgpack'],
     'not a readable PyTorch checkpoint'),
    ('convert_torch', ['--config', T, '--src', f'{D}/run', '--out', f'{D}/no/o.pth'],
     'does not exist'),
    ('convert_torch', ['--config', f'{REPO}/configs/demo.py', '--src', f'{D}/run', '--out',
                       f'{D}/run/metrics.jsonl'], 'does not match'),
    # verify_reference
    ('verify_reference', [f'{D}/missing.npz'], 'does not exist'),
    ('verify_reference', [f'{D}/other.npz'], 'unknown key layout'),
    ('verify_reference', [f'{D}/bad.npz'], 'is not an .npz fixture'),
    ('verify_reference', [f'{D}/run'], 'is a directory'),
    ('verify_reference', ['--x65', f'{D}/other.npz'], 'unrecognized arguments'),
    # plot_training
    ('plot_training', [f'{D}/nometrics'], 'no metrics.jsonl'),
    ('plot_training', [f'{D}/badmetrics'], 'not JSON lines'),
    ('plot_training', [f'{D}/run', '--out', f'{D}/no/runs.png'], 'does not exist'),
    ('plot_training', [f'{D}/run', '--labels', 'a,b'], '--labels has 2 names'),
    # prepare_imagefolder
    ('prepare_imagefolder', [f'{D}/none', f'{D}/out'], 'does not exist'),
    ('prepare_imagefolder', [f'{D}/run', f'{D}/out', '--num-shards', 'x'], 'invalid int'),
    # benchmark
    ('benchmark', ['--mode', 'fly'], '--mode must be'),
    ('benchmark', ['--set', 'model.gsb=True'], "Unknown command line flag 'set'"),
    ('benchmark', ['--config', T, '--config.model.image_size=33'], 'image_size=33'),
    ('benchmark', ['--torch-repo', f'{D}/none'], '--torch-repo does not exist'),
    ('benchmark', ['--mode', 'data', '--data-workers', 'two'], '--data-workers must be'),
]


@pytest.fixture(scope='module')
def mains():
  return {'train': train_main.main, **{name: programs.load_tool(name).main for name in TOOLS}}


def _expand(args, root):
  return [a.replace(T, str(root / 'tiny.py')).replace(D, str(root)) for a in args]


def test_every_bad_input_is_one_error_line_and_changes_nothing(root, mains, capsys):
  assert len(CASES) >= 30
  before = _snapshot(root)
  assert any(k.startswith('run/checkpoints/') for k in before) and 'run/metrics.jsonl' in before
  failures = []
  for program, args, expected in CASES:
    argv = [program] + _expand(args, root)
    status = mains[program](argv)
    out, err = capsys.readouterr()
    lines = err.splitlines()
    problems = []
    if status != 2:
      problems.append(f'exit status {status}')
    if not lines or not lines[0].startswith('error: ') or expected not in lines[0]:
      problems.append(f'first stderr line {lines[:1]}, expected one with {expected!r}')
    if any(not line.startswith('  ') for line in lines[1:]):
      problems.append('stderr has more than the error line and an indented listing')
    if 'Traceback' in out + err:
      problems.append('traceback')
    if _snapshot(root) != before:
      problems.append('files changed')
    if problems:
      failures.append(f'{" ".join(argv)}: {"; ".join(problems)}\n{err[:500]}')
  assert not failures, '\n'.join(failures)


def test_real_program_prints_the_error_line_and_the_listing_only(root):
  """A real process: no library warning or traceback around the error and its listing."""
  run = subprocess.run([sys.executable, 'tools/evaluate.py', '--config', 'configs/demo.py',
                        '--checkpoint', str(root / 'run')], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  lines = run.stderr.splitlines()
  assert run.returncode == 2 and run.stdout == '', run.stderr[-2000:]
  assert lines[0].startswith(f'error: checkpoint {root / "run"} does not match'), lines[:3]
  assert len(lines) > 10 and all(line.startswith('  ') for line in lines[1:]), lines[:3]
  assert ('  batch_stats/embeddings/patch_embeddings/norm/mean: checkpoint (8,) vs model (32,)'
          in lines)


def test_a_defect_keeps_its_traceback():
  def broken(argv):
    raise AssertionError('a bug')
  with pytest.raises(AssertionError, match='a bug'):
    cli.run(broken, argv=['prog'])


BASE = dict(hidden_sizes=(96, 192, 384, 768), depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
            mlp_sizes=(384, 768, 1536, 3072))


def test_a_variant_added_in_process_reaches_the_tools(mains, monkeypatch, capsys, tmp_path):
  monkeypatch.setitem(model_lib.VARIANTS, 'base', BASE)
  assert mains['count_ops'](['count_ops', '--variant', 'base', '--json']) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  shapes = jax.eval_shape(lambda k: model_lib.init_variables(model_lib.BHViT(**BASE), k),
                          jax.random.PRNGKey(0))
  assert summary['params'] == sum(int(np.prod(x.shape))
                                  for x in jax.tree_util.tree_leaves(shapes['params']))

  benchmark = programs.load_tool('benchmark')
  flag_values, _ = cli.parse(benchmark.define_flags, ['benchmark', '--variant', 'base'])
  config = benchmark.resolve_config(flag_values)
  assert tuple(config.model.depths) == (2, 2, 18, 2)
  assert tuple(config.model.hidden_sizes) == (96, 192, 384, 768)

  # One block per stage and 32² inputs, so that the export compiles quickly.
  out = tmp_path / 'base.pk'
  small = {'depths': [1, 1, 1, 1], 'image_size': 32, 'window_size': 1, 'num_classes': 10}
  assert mains['export_packed'](['export_packed', '--variant', 'base', '--model-json',
                                    json.dumps(small), '--out', str(out)]) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert report['logits_rel'] < 1e-5
  model, _ = packed.load(str(out))
  assert tuple(model.hidden_sizes) == (96, 192, 384, 768) and tuple(model.depths) == (1,) * 4
