r"""The smallest model the official PyTorch BHViT can build, for cross-framework checks.

  python tools/compare_training.py --torch-repo ~/src/BHViT --steps 12 --x64
  python tools/record_reference.py --torch-repo ~/src/BHViT --config configs/verify.py \
      --out case_verify.npz

The official code hard-codes 224² inputs, 4×4 patches, 7×7 windows and a 64-wide stem, so
widths double from 64; one block per stage and MLP ratio 1 keep it cheap on a CPU. Flags are
the published ones (all binary, BatchNorm, shift3+shift5, some_fp, 3-level LSQ attention);
flip any of them with `--config.model.<flag>=...`. Data: the embedded MNIST digits resized to
224², ten classes. Optimizer and loss: the recipe of the reference fixtures (AdamW lr 1e-3,
betas 0.9/0.999, weight decay 0, label-smoothed CE with 0.1·R carried by the optimizer).
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = 2
  config.compute_dtype = 'float32'
  config.data = ml_collections.ConfigDict(dict(name='mnist', image_size=224))
  config.model = ml_collections.ConfigDict(dict(
      hidden_sizes=(64, 128, 256, 512), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 4),
      mlp_sizes=(64, 128, 256, 512), num_classes=10, image_size=224, patch_size=4,
      window_size=7, weight_bits=1, input_bits=1, norm='batch', shift3=True, shift5=True,
      some_fp=True, gsb=False, recu=False, disable_layerscale=False, drop_path=0.0,
      fast_paths='auto', split_groups=False, remat_stages=()))
  config.optim = ml_collections.ConfigDict(dict(
      base_lr=1e-3, lr_batch_scale=1, schedule='constant', warmup_steps=0, min_lr=0.0,
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip_norm=0.0, reg_beta=0.1,
      reg_start_fraction=0.0, reg_placement='optimizer'))
  config.loss = ml_collections.ConfigDict(dict(label_smoothing=0.1, ce_weight=1.0,
                                               distill_weight=0.0))
  return config
