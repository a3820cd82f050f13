r"""Demo: a small all-binary BHViT on the embedded MNIST digits (CPU, minutes).

Command (from the repository root; `make demo` does the same after installing):
  python -m bhvit_jax.train --config configs/demo.py --workdir runs/demo

Hardware / time: 2-core CPU, no accelerator: under 2 min wall for 700 steps of batch 64
(≈25 s of it JIT compilation), longer when the cores are shared; `make demo` adds the
package install.
Expected: held-out top-1 96.8% on the 500 held-out digits (deterministic on CPU for a given
code version; 97.2% at the mid-run evaluation, step 350). `--config.seed=1` gives 97.2%: a
binary network's result moves by about a point with the seed or with float rounding.

Model: every binary path of the published BHViT is on: 1-bit weights and 1-bit inputs in
all token mixers, q/k/v, output projections and MLPs, BatchNorm token norms, shift3 and
shift5 residuals, full-precision downsampling (some_fp, as the released models). gsb=False
because that is what the published run script trains (the 3-level LSQ attention quantizer),
so the demo also exercises its first-batch calibration. The network is shrunk
(widths 32..256, one block per stage) and uses 32² inputs with 4×4 patches, so the stage grids
are 8/4/2/1 and the window size must be 1: each stage-3/4 token attends to itself plus the
global tokens (2×2 at stage 3, one at stage 4). 48² inputs with 2×2 patches and window 3
would keep larger windows but train ~8× slower on CPU. split_groups computes the grouped
convs group by group, 2× faster on XLA:CPU and numerically the same.
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
  # Resuming with other trajectory keys (bhvit_jax.run_identity) is refused unless True.
  config.allow_config_change = False

  config.data = ml_collections.ConfigDict(dict(
      name='mnist', data_dir='', image_size=32, train_split='train', eval_split='test',
      num_workers=0, shuffle_seed=0, mean=(), std=(), on_corrupt='fail',
      min_crop_scale=0.6))

  config.model = ml_collections.ConfigDict(dict(
      hidden_sizes=(32, 64, 128, 256), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 4),
      mlp_sizes=(128, 256, 256, 512), num_classes=10, image_size=32, patch_size=4,
      window_size=1, weight_bits=1, input_bits=1, norm='batch', shift3=True, shift5=True,
      some_fp=True, gsb=False, recu=False, disable_layerscale=False, drop_path=0.0,
      split_groups=True, remat_stages=()))

  config.optim = ml_collections.ConfigDict(dict(
      base_lr=2e-3, lr_batch_scale=64, schedule='cosine', warmup_steps=50, min_lr=1e-5,
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip_norm=0.0,
      reg_beta=0.0, reg_start_fraction=0.0, reg_placement='optimizer'))

  config.loss = ml_collections.ConfigDict(dict(
      label_smoothing=0.1, ce_weight=1.0, distill_weight=0.0,
      teacher=ml_collections.ConfigDict(dict(kind='none', checkpoint='', config=''))))

  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  # Multi-process start-up (bhvit_jax.sharding.initialize_distributed); empty/0/-1 = auto.
  config.distributed = ml_collections.ConfigDict(dict(
      coordinator_address='', num_processes=0, process_id=-1))
  return config
