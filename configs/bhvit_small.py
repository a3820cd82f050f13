r"""BHViT-small on ImageNet-1k with the published recipe (SPEC §5, the reference run script).

Command:
  python -m bhvit_jax.train --config configs/bhvit_small.py --workdir runs/bhvit_small \
      --config.loss.teacher.kind=deit --config.loss.teacher.checkpoint=/path/deit_small.pth
Variants as in configs/bhvit_tiny.py (`--config configs/bhvit_small.py:paper`, ...).
Hardware / time: 100 epochs at global batch 256 (the reference: 2 GPUs × 128); roughly 1.5×
the cost of BHViT-tiny.
Memory: --config.model.remat_stages='(1,)' recomputes stage 1's blocks in the backward pass:
on CPU at batch 16, peak 6.6 → 5.4 GiB (docs/performance.md).
Expected: ImageNet-1k top-1 70.1% (some_fp=True, the released model; 68.4% all binary).
"""
import importlib.util
import pathlib

SMALL = dict(hidden_sizes=(64, 128, 256, 512), depths=(3, 4, 8, 4), num_heads=(1, 1, 4, 8),
             mlp_sizes=(512, 1024, 1024, 2048))


def _tiny_module():
  # Config files are loaded by path (config_flags), so the sibling is too.
  path = pathlib.Path(__file__).with_name('bhvit_tiny.py')
  spec = importlib.util.spec_from_file_location('bhvit_tiny_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(variant: str = 'run'):
  return _tiny_module().imagenet_config(SMALL, variant)
