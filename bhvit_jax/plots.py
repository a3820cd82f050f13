"""Training curves of one or several runs (metrics.jsonl histories) as one PNG."""
import json
import os

from bhvit_jax import config_lib


def read_history(workdir: str) -> list:
  """The records of WORKDIR/metrics.jsonl (dicts with kind 'train'/'eval', step, ...)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isfile(path):
    raise config_lib.UserError(f'no metrics.jsonl in {workdir} (is it a training workdir?)')
  with open(path) as f:
    try:
      history = [json.loads(line) for line in f if line.strip()]
    except ValueError as e:
      raise config_lib.UserError(f'{path} is not JSON lines: {e}') from None
  if not all(isinstance(r, dict) for r in history):
    raise config_lib.UserError(f'{path} holds lines that are not JSON objects')
  if not any(r.get('kind') == 'train' for r in history):
    raise config_lib.UserError(f'{path} has no training records yet')
  return history


def _column(rows: list, key: str):
  rows = [r for r in rows if key in r]
  return [r['step'] for r in rows], [r[key] for r in rows]


def plot_runs(runs: dict, path: str) -> str:
  """PNG of loss, top-1, learning rate and sign-flip rate against the step.

  Args:
    runs: {label: history}, one colour per run; a single run may have the label ''.
      In the top-1 panel the line with markers is held-out top-1 (dashed: of the EMA
      weights, when the run kept one), the thin one the training-batch top-1.
    path: the PNG to write.
  Returns:
    path.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(2, 2, figsize=(11, 7))
  for i, (label, history) in enumerate(runs.items()):
    color, prefix = f'C{i}', f'{label}: ' if label else ''
    train = [r for r in history if r.get('kind') == 'train']
    evals = [r for r in history if r.get('kind') == 'eval']
    axes[0, 0].plot(*_column(train, 'loss'), color=color, label=label or None)
    axes[0, 1].plot(*_column(train, 'train_top1'), color=color, lw=0.8, alpha=0.6,
                    label=prefix + 'train batch')
    if evals:
      axes[0, 1].plot(*_column(evals, 'top1'), 'o-', color=color, label=prefix + 'held-out')
    emas = [r for r in history if r.get('kind') == 'eval_ema']
    if emas:
      axes[0, 1].plot(*_column(emas, 'top1'), 's--', color=color, label=prefix + 'held-out, EMA')
    axes[1, 0].plot(*_column(train, 'lr'), color=color, label=label or None)
    axes[1, 1].plot(*_column(train, 'sign_flip_rate'), color=color, label=label or None)
  axes[0, 0].set(title='training loss', xlabel='step')
  axes[0, 1].set(title='top-1 (%)', xlabel='step')
  axes[1, 0].set(title='learning rate', xlabel='step')
  axes[1, 1].set(title='sign-flip rate per step', xlabel='step')
  axes[1, 1].set_yscale('symlog', linthresh=1e-4)  # rates span 1e-2 .. 0
  axes[0, 1].legend(fontsize='small')
  if len(runs) > 1:
    axes[0, 0].legend(fontsize='small')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
