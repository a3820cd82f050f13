r"""BHViT-tiny on ImageNet-1k with the published recipe (docs/reference.md "Recipe": the reference run script).

Command (ImageNet prepared for tfds as `imagenet2012`, or pass data.name='imagefolder'):
  python -m bhvit_jax.train --config configs/bhvit_tiny.py --workdir runs/bhvit_tiny \
      --config.loss.teacher.kind=deit --config.loss.teacher.checkpoint=/path/deit_small.pth
Variants (get_config argument, `--config configs/bhvit_tiny.py:paper`):
  'run'   (default) the run script: KD alone from a DeiT-small teacher, no regularizer.
  'reg'   the run script with its regularizer flag: 0.9·KD + 0.1·R in every epoch.
  'paper' the paper: 0.1·CE + 0.8·KD + 0.1·R, R only in the last 10% of the epochs.
  'noteacher' label-smoothed CE (0.1) alone, for a run without a teacher.
Hardware / time: the reference trained on 2 GPUs × 128 images for 100 epochs (~500k steps of
batch 256); expect several days on one modern GPU with compute_dtype='bfloat16'.
Memory: --config.model.remat_stages='(1,)' recomputes stage 1's blocks (the largest
activations) in the backward pass: on CPU at batch 16, peak 4.5 → 3.8 GiB for 2–10% more time;
listing more stages trades further (docs/performance.md).
Expected: ImageNet-1k top-1 66.0% (some_fp=True, the released model; 64.0% all binary).
The teacher is the paper's DeiT-small (`bhvit_jax.deit`), loaded from a timm-format .pth
(e.g. deit_small_patch16_224); other ViT/DeiT sizes via --config.loss.teacher.embed_dim/
depth/num_heads/patch_size. Without one, use the 'noteacher' variant.
"""
from configs import common


def get_config(recipe: str = 'run'):
  return common.apply_recipe(common.get_config('tiny'), recipe)
