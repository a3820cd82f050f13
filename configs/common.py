r"""The one config schema: BHViT-tiny on ImageNet-1k with the published recipe.

Every other config file starts from `get_config()` here and overrides what differs (as flax's
hardware configs override `default.py`), so every key a user can set with `--config.x=...`
exists in every config. Not meant to be trained as is; see configs/bhvit_tiny.py.
"""
import ml_collections

from bhvit_jax import augment
from bhvit_jax import model as model_lib


def get_config(variant: str = 'tiny'):
  """The published ImageNet recipe (docs/reference.md, "Recipe") for a BHViT size."""
  config = ml_collections.ConfigDict()
  config.task = 'classification'  # or 'segmentation' (configs/segmentation_demo.py)
  config.seed = 0
  config.batch_size = 256
  config.eval_batch_size = 0  # 0: batch_size
  config.total_steps = 0  # 0: num_epochs
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
  # Research knobs (README "Research recipes"), all off in the published recipe.
  config.ema_decay = 0.0  # EMA of weights and BatchNorm statistics; 0: off (official: 0.99996)
  config.grad_accum_steps = 1  # micro-batches per optimizer update (batch_size is the total)
  config.keep_best_checkpoint = True  # WORKDIR/checkpoints_best: the best evaluation's weights

  config.data = ml_collections.ConfigDict(dict(
      name='tfds:imagenet2012', data_dir='', image_size=224, train_split='train',
      eval_split='validation', num_workers=8, shuffle_seed=0, mean=(), std=(),
      on_corrupt='skip', min_crop_scale=0.08, random_flip=True,
      # The reference's transforms: bicubic eval resize to int(S / eval_crop_ratio) (256 for
      # 224) + centre crop; bilinear RandomResizedCrop. fast_decode lets JPEGs decode at a
      # reduced scale (faster, other pixels).
      eval_interpolation='bicubic', train_interpolation='bilinear', eval_crop_ratio=224 / 256,
      fast_decode=False,
      digits=(),  # the embedded MNIST only: keep these digits, relabelled 0.. in this order
      # > 0: evaluate during training (and pick the best checkpoint) on this fraction of the
      # train split, held out from training (fixed seed), instead of on eval_split.
      holdout_fraction=0.0))

  config.model = ml_collections.ConfigDict(dict(
      **model_lib.variant(variant), num_classes=1000, image_size=224, patch_size=4,
      window_size=7, weight_bits=1, input_bits=1, norm='batch', shift3=True, shift5=True,
      some_fp=True, gsb=False, recu=False, disable_layerscale=False, drop_path=0.0,
      fast_paths='auto', split_groups='auto', remat_stages=()))

  config.optim = ml_collections.ConfigDict(dict(
      base_lr=5e-4, lr_batch_scale=512, schedule='cosine_epoch', warmup_steps=0, min_lr=1e-8,
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip_norm=0.0, reg_beta=0.0,
      reg_start_fraction=0.0, reg_placement='optimizer',
      layer_decay=1.0))  # fine-tuning: update scale decay**(depth from the head); 1.0 = off

  config.loss = ml_collections.ConfigDict(dict(
      label_smoothing=0.1, ce_weight=0.0, distill_weight=1.0,
      teacher=ml_collections.ConfigDict(dict(
          kind='deit', checkpoint='', config='', patch_size=16, embed_dim=384, depth=12,
          num_heads=6, mlp_ratio=4.0))))

  # timm-style augmentation options of the official code, all off as in the published run
  # (bhvit_jax/augment.py; README "Research recipes").
  config.augment = augment.defaults()

  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  # Multi-process start-up (bhvit_jax.sharding.initialize_distributed); empty/0/-1 = auto.
  config.distributed = ml_collections.ConfigDict(dict(
      coordinator_address='', num_processes=0, process_id=-1))
  return config


def apply_recipe(config, recipe: str):
  """The loss/regularizer variants of the ImageNet configs (see configs/bhvit_tiny.py)."""
  if recipe == 'reg':
    config.loss.distill_weight = 0.9
    config.optim.reg_beta = 0.1
  elif recipe == 'paper':
    config.loss.update(ce_weight=0.1, distill_weight=0.8)
    config.optim.update(reg_beta=0.1, reg_start_fraction=0.9)
  elif recipe == 'noteacher':
    config.loss.update(ce_weight=1.0, distill_weight=0.0)
    config.loss.teacher.kind = 'none'
  elif recipe != 'run':
    raise ValueError(f"unknown recipe {recipe!r}; expected 'run', 'reg', 'paper' or "
                     "'noteacher'")
  return config
