"""The run's one metrics writer: WORKDIR/metrics.jsonl (strict JSON) and TensorBoard events."""
import json
import math
import os

import numpy as np

from bhvit_jax import sharding as sharding_lib


def json_safe(record: dict) -> dict:
  """`record` with non-finite floats as None, so every line parses as strict JSON (NaN and
  Infinity are not JSON)."""
  return {k: None if isinstance(v, float) and not math.isfinite(v) else v
          for k, v in record.items()}


class MetricsWriter:
  """metrics.jsonl (rewritten from the checkpointed history on resume) + TensorBoard.

  Every process keeps the history (it is checkpointed); only an `active` one writes files.
  """

  def __init__(self, workdir: str, history: list, active: bool = True):
    self.history = [json_safe(r) for r in history]
    self.active = active
    if not active:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.path = os.path.join(workdir, 'metrics.jsonl')
    with open(self.path, 'w') as f:
      f.writelines(json.dumps(r, allow_nan=False) + '\n' for r in self.history)
    self._tb = SummaryWriter(os.path.join(workdir, 'tb'))

  def write(self, record: dict):
    record = json_safe(record)
    self.history.append(record)
    if not self.active:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps(record, allow_nan=False) + '\n')
    prefix = record.get('kind', 'train')
    for key, value in record.items():
      if key not in ('step', 'kind') and isinstance(value, (int, float)):
        self._tb.add_scalar(f'{prefix}/{key}', value, record['step'])
    self._tb.flush()

  def close(self):
    if self.active:
      self._tb.close()


def summarize(device_metrics: list) -> dict:
  """Means over a logging interval of per-step metrics fetched from the device."""
  host = sharding_lib.fetch(device_metrics)
  record = {k: float(np.mean([m[k] for m in host])) for k in host[-1] if k != 'step'}
  record['train_top1'] *= 100.0
  for key in ('nonfinite_in_row', 'nonfinite_total'):
    record[key] = int(host[-1][key])
  return record
