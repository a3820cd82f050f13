"""A stand-in for BHViT in the tests of the training loop: it compiles in about a second.

It has the interface the loop relies on (`num_classes`, `image_size`, `weight_bits`,
`some_fp`; a `cov1` convolution and binarizable `dense` kernel; BatchNorm statistics; dropout)
and runs on 8×8 images. Install it with `monkeypatch.setattr(model_lib, 'build', ...)`.
"""
import flax.linen as nn


class StandIn(nn.Module):
  """conv 3×3 → norm → mean pool → [dense → dropout] → classifier.

  `hidden=0` drops the hidden layer (`dense` is then the classifier); `norm='layer'` and
  `dropout=0` make every example's loss independent of the others in its batch and of the
  dropout keys. A layer of 2**14 or more kernel elements (e.g. `hidden=2048`) is split by
  FSDP (sharding.FSDP_MIN_SIZE).
  """
  num_classes: int = 10
  image_size: int = 8
  weight_bits: int = 1
  some_fp: bool = True
  width: int = 8
  stride: int = 1
  hidden: int = 16
  norm: str = 'batch'
  dropout: float = 0.2

  @nn.compact
  def __call__(self, x, train=False):
    """[B, H, W, 3] -> logits [B, num_classes]."""
    x = nn.Conv(self.width, (3, 3), strides=(self.stride, self.stride), name='cov1')(x)
    if self.norm == 'batch':
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name='norm')(x)
    else:
      x = nn.LayerNorm(name='norm')(x)
    if not self.hidden:
      return nn.Dense(self.num_classes, name='dense')(x.mean(axis=(1, 2)))
    x = nn.Dense(self.hidden, name='dense')(nn.relu(x).mean(axis=(1, 2)))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, name='classifier')(x)

