r"""BHViT-tiny on ImageNet-1k with the published recipe (SPEC §5, the reference run script).

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
import ml_collections

TINY = dict(hidden_sizes=(64, 128, 256, 512), depths=(2, 2, 6, 2), num_heads=(1, 1, 4, 8),
            mlp_sizes=(512, 1024, 1024, 2048))


def imagenet_config(model_sizes: dict, variant: str = 'run'):
  """The published ImageNet recipe for a BHViT of `model_sizes`; see the module docstring."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = 256
  config.total_steps = 0
  config.num_epochs = 100
  config.checkpoint_every_steps = 2000
  config.keep_checkpoints = 3
  config.eval_every_steps = 5004  # ≈ one epoch of 1,281,167 images at batch 256
  config.log_every_steps = 100
  config.init_from = ''
  config.compute_dtype = 'bfloat16'
  config.max_nonfinite_in_row = 20
  # Resuming with other trajectory keys (bhvit_jax.run_identity) is refused unless True.
  config.allow_config_change = False

  config.data = ml_collections.ConfigDict(dict(
      name='tfds:imagenet2012', data_dir='', image_size=224, train_split='train',
      eval_split='validation', num_workers=8, shuffle_seed=0, mean=(), std=(),
      on_corrupt='skip', min_crop_scale=0.08))

  config.model = ml_collections.ConfigDict(dict(
      **model_sizes, num_classes=1000, image_size=224, patch_size=4, window_size=7,
      weight_bits=1, input_bits=1, norm='batch', shift3=True, shift5=True, some_fp=True,
      gsb=False, recu=False, disable_layerscale=False, drop_path=0.0, split_groups=False,
      remat_stages=()))

  config.optim = ml_collections.ConfigDict(dict(
      base_lr=5e-4, lr_batch_scale=512, schedule='cosine_epoch', warmup_steps=0, min_lr=1e-8,
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip_norm=0.0, reg_beta=0.0,
      reg_start_fraction=0.0, reg_placement='optimizer'))

  config.loss = ml_collections.ConfigDict(dict(
      label_smoothing=0.1, ce_weight=0.0, distill_weight=1.0,
      teacher=ml_collections.ConfigDict(dict(
          kind='deit', checkpoint='', config='', patch_size=16, embed_dim=384, depth=12,
          num_heads=6, mlp_ratio=4.0))))

  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  # Multi-process start-up (bhvit_jax.sharding.initialize_distributed); empty/0/-1 = auto.
  config.distributed = ml_collections.ConfigDict(dict(
      coordinator_address='', num_processes=0, process_id=-1))

  if variant == 'reg':
    config.loss.distill_weight = 0.9
    config.optim.reg_beta = 0.1
  elif variant == 'paper':
    config.loss.update(ce_weight=0.1, distill_weight=0.8)
    config.optim.update(reg_beta=0.1, reg_start_fraction=0.9)
  elif variant == 'noteacher':
    config.loss.update(ce_weight=1.0, distill_weight=0.0)
    config.loss.teacher.kind = 'none'
  elif variant != 'run':
    raise ValueError(f"unknown variant {variant!r}; expected 'run', 'reg', 'paper' or "
                     "'noteacher'")
  return config


def get_config(variant: str = 'run'):
  return imagenet_config(TINY, variant)
