r"""BHViT-small on ImageNet-1k with the published recipe (docs/reference.md "Recipe": the reference run script).

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
from configs import common


def get_config(recipe: str = 'run'):
  return common.apply_recipe(common.get_config('small'), recipe)
