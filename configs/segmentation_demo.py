r"""Segmentation demo: the demo's all-binary BHViT as a backbone, an FPN head, digit masks.

Command (from the repository root):
  python -m bhvit_jax.train --config configs/segmentation_demo.py --workdir runs/segmentation

Task (bhvit_jax/segmentation.py): 64² canvases of 2×2 cells, each holding an embedded MNIST
digit with probability 3/4; every stroke pixel is labelled with its digit, the rest is
background (11 classes). Held-out canvases are built from the 500 held-out digits. The
backbone (configs/demo.py's model at 64²: stage grids 16/8/4/2) feeds its four stage maps to a
full-precision FPN head (`--config.segmentation.binary_head=True` makes its convs 1-bit).
`model.num_classes` is unused: the backbone's classifier is not built.

Hardware / time: 2-core CPU, no accelerator: 235 s of CPU time for the 600 steps of batch 32
(3 min 48 s wall beside another job).
Expected: held-out mIoU 58.20% over 256 held-out canvases (pixel accuracy 95.95%; 52.66% at
step 300), deterministic on CPU for a given code version.
"""
import ml_collections

from configs import demo


def get_config():
  config = demo.get_config()
  config.task = 'segmentation'
  config.batch_size = 32
  config.total_steps = 600
  config.checkpoint_every_steps = 200
  config.eval_every_steps = 300
  config.data.image_size = 64
  config.model.image_size = 64
  config.segmentation = ml_collections.ConfigDict(dict(
      cells=2, head_features=64, binary_head=False, eval_canvases=256))
  return config
