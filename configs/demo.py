r"""Demo: a small all-binary BHViT on the embedded MNIST digits (CPU, minutes).

Command (from the repository root; `make demo` does the same after installing):
  python -m bhvit_jax.train --config configs/demo.py --workdir runs/demo

Hardware / time: 2-core CPU, no accelerator: under 2 min wall for 700 steps of batch 64
(≈25 s of it JIT compilation), longer when the cores are shared; `make demo` adds the
package install.
Expected: held-out top-1 94.8% on the 500 held-out digits (deterministic on CPU for a given
code version). A binary network's result moves by a point or two with the seed or with float
rounding: the reference's transforms (training crops before resizing, 32² eval inputs stay
unresized) and the later changes to the training step moved it from 97.6% to 96.2% to 94.8%.

Model: every binary path of the published BHViT is on: 1-bit weights and 1-bit inputs in
all token mixers, q/k/v, output projections and MLPs, BatchNorm token norms, shift3 and
shift5 residuals, full-precision downsampling (some_fp, as the released models). gsb=False
because that is what the published run script trains (the 3-level LSQ attention quantizer),
so the demo also exercises its first-batch calibration. The network is shrunk
(widths 32..256, one block per stage) and uses 32² inputs with 4×4 patches, so the stage grids
are 8/4/2/1 and the window size must be 1: each stage-3/4 token attends to itself plus the
global tokens (2×2 at stage 3, one at stage 4). 48² inputs with 2×2 patches and window 3
would keep larger windows but train ~8× slower on CPU.
"""
from configs import common


def get_config():
  config = common.get_config('demo')
  config.update(batch_size=64, total_steps=700, num_epochs=0, checkpoint_every_steps=200,
                keep_checkpoints=2, eval_every_steps=350, log_every_steps=10,
                compute_dtype='float32', max_nonfinite_in_row=5)
  config.data.update(name='mnist', image_size=32, eval_split='test', num_workers=0,
                     on_corrupt='fail', min_crop_scale=0.6, random_flip=False)
  config.model.update(num_classes=10, image_size=32, window_size=1)
  config.optim.update(base_lr=2e-3, lr_batch_scale=64, schedule='cosine', warmup_steps=50,
                      min_lr=1e-5)
  config.loss.update(ce_weight=1.0, distill_weight=0.0)
  config.loss.teacher.kind = 'none'
  return config
