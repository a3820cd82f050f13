"""DeiT / ViT in Flax, loaded from timm-format PyTorch checkpoints: the paper's KD teacher.

The module tree mirrors timm's names (`blocks_3/attn/qkv` <-> `blocks.3.attn.qkv`), so
`from_timm_state_dict` maps names by rule. A distilled DeiT (with `dist_token` and
`head_dist`) averages its two heads, which is what timm returns in eval mode.

  model, variables = build_teacher(config.loss.teacher, config)
  logits = model.apply(variables, images, train=False)   # images [B, H, W, 3] -> [B, classes]
"""
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bhvit_jax import config_lib
# timm's LayerNorm epsilon for ViT/DeiT (PyTorch's default is 1e-5).
LN_EPS = 1e-6
# DeiT-small, the teacher of the BHViT paper; a teacher config overrides any of these.
DEIT_SMALL = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0)


class Attention(nn.Module):
  """Multi-head self-attention with one fused qkv projection. [B, N, D] -> [B, N, D]."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, tokens, dim = x.shape
    head_dim = dim // self.num_heads
    qkv = nn.Dense(3 * dim, dtype=self.dtype, name='qkv')(x)
    # timm's channel order of qkv is (3, heads, head_dim).
    q, k, v = jnp.moveaxis(qkv.reshape(batch, tokens, 3, self.num_heads, head_dim), 2, 0)
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) * head_dim ** -0.5
    attn = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', attn, v).reshape(batch, tokens, dim)
    return nn.Dense(dim, dtype=self.dtype, name='proj')(out)


class Mlp(nn.Module):
  """fc1 -> exact (erf) GELU -> fc2. [B, N, D] -> [B, N, D]."""
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(self.hidden, dtype=self.dtype, name='fc1')(x), approximate=False)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name='fc2')(h)


class Block(nn.Module):
  """Pre-norm transformer block. [B, N, D] -> [B, N, D]."""
  num_heads: int
  mlp_ratio: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    norm = lambda name: nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name=name)
    x = x + Attention(self.num_heads, self.dtype, name='attn')(norm('norm1')(x))
    hidden = int(x.shape[-1] * self.mlp_ratio)
    return x + Mlp(hidden, self.dtype, name='mlp')(norm('norm2')(x))


class DeiT(nn.Module):
  """ViT classifier on the class token (DeiT: plus a distillation token and head)."""
  image_size: int = 224
  patch_size: int = 16
  embed_dim: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  distilled: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    """images [B, H, W, 3] -> logits [B, num_classes]. `train` is accepted for the common
    teacher interface; the teacher has no dropout, so it changes nothing."""
    del train
    if images.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f'DeiT built for {self.image_size}² images got {images.shape[1:3]}')
    p, dim = self.patch_size, self.embed_dim
    x = nn.Conv(dim, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                name='patch_embed')(images.astype(self.dtype))
    x = x.reshape(x.shape[0], -1, dim)
    special = ['cls_token'] + (['dist_token'] if self.distilled else [])
    init = nn.initializers.normal(0.02)
    tokens = [jnp.broadcast_to(self.param(name, init, (1, 1, dim)).astype(self.dtype),
                               (x.shape[0], 1, dim)) for name in special]
    x = jnp.concatenate(tokens + [x], axis=1)
    x = x + self.param('pos_embed', init, (1, x.shape[1], dim)).astype(self.dtype)
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_ratio, self.dtype, name=f'blocks_{i}')(x)
    x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name='norm')(x)
    head = lambda name, token: nn.Dense(self.num_classes, dtype=self.dtype, name=name)(token)
    logits = head('head', x[:, 0])
    if self.distilled:
      logits = (logits + head('head_dist', x[:, 1])) / 2
    return logits


def timm_name(path) -> str:
  """Flax path ('blocks_0', 'attn', 'qkv', 'kernel') -> timm name 'blocks.0.attn.qkv.weight'."""
  names = list(path)
  if names[0].startswith('blocks_'):
    names[0] = names[0].replace('_', '.')
  elif names[0] == 'patch_embed':
    names[0] = 'patch_embed.proj'
  if names[-1] in ('kernel', 'scale'):
    names[-1] = 'weight'
  return '.'.join(names)


def _from_torch_layout(name: str, value: np.ndarray) -> np.ndarray:
  if name == 'patch_embed.proj.weight':
    return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if value.ndim == 2 and name.endswith('.weight'):
    return value.T  # Linear [out, in] -> Dense [in, out]
  return value


def from_timm_state_dict(state_dict, model: DeiT) -> dict:
  """{'params': ...} for `model` from a timm ViT/DeiT state dict (name -> array/tensor).

  Raises:
    ValueError listing every missing, unexpected and mis-shaped name.
  """
  from bhvit_jax import convert  # pylint: disable=g-import-not-at-top
  state = {k: convert._numpy(v) for k, v in convert.unwrap_checkpoint(state_dict).items()}  # pylint: disable=protected-access
  images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)['params']
  params, missing, wrong = {}, [], []
  for path, spec in flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes)).items():
    name = timm_name(path)
    if name not in state:
      missing.append(name)
      continue
    value = _from_torch_layout(name, state.pop(name))
    if value.shape != spec.shape:
      wrong.append(f'{name}: checkpoint {value.shape} (Flax layout) vs model {spec.shape}')
      continue
    params[path] = np.asarray(value, np.float32)
  problems = ([f'  missing: {n}' for n in missing] + [f'  unexpected: {n}' for n in sorted(state)]
              + [f'  shape: {w}' for w in wrong])
  if problems:
    raise config_lib.UserError(
        f'timm checkpoint does not match DeiT(image_size={model.image_size}, '
        f'patch_size={model.patch_size}, embed_dim={model.embed_dim}, depth={model.depth}, '
        f'num_heads={model.num_heads}, num_classes={model.num_classes}, '
        f'distilled={model.distilled}) ({len(problems)} problems):\n' + '\n'.join(problems[:40]))
  return {'params': flax.traverse_util.unflatten_dict(params)}


def build_teacher(teacher_config, config):
  """(DeiT, variables) from loss.teacher: checkpoint (.pth, timm format) plus the variant fields
  patch_size, embed_dim, depth, num_heads, mlp_ratio (DeiT-small when absent). The image size
  and number of classes are the student's; `distilled` follows the checkpoint (dist_token)."""
  path = teacher_config.get('checkpoint', '')
  if not path:
    raise config_lib.UserError("loss.teacher.kind='deit' needs loss.teacher.checkpoint (a "
                               'timm-format DeiT .pth file)')
  if not path.endswith(('.pth', '.pt')):
    raise config_lib.UserError(f'loss.teacher.checkpoint={path!r}: the DeiT teacher loads a '
                               'timm-format PyTorch .pth/.pt file')
  from bhvit_jax import convert  # pylint: disable=g-import-not-at-top
  state = convert.load_torch_file(path)
  fields = {k: teacher_config.get(k, default) for k, default in DEIT_SMALL.items()}
  dtype = config.get('compute_dtype', 'float32')
  model = DeiT(image_size=config.data.image_size, num_classes=config.model.num_classes,
               distilled='dist_token' in state, dtype=jnp.dtype(dtype), **fields)
  return model, jax.tree_util.tree_map(jnp.asarray, from_timm_state_dict(state, model))
