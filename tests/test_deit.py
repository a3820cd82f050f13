"""DeiT teacher: timm-format conversion against a numpy ViT forward, and KD training wiring."""
import json
import pathlib

import flax.linen as nn
import numpy as np
import pytest
from scipy.special import erf

from bhvit_jax import config_lib
from bhvit_jax import deit
from bhvit_jax import model as model_lib
from bhvit_jax import teachers
from bhvit_jax import train

torch = pytest.importorskip('torch')

DIM, DEPTH, HEADS, IMAGE, PATCH, CLASSES = 32, 2, 2, 32, 8, 10
REPO = pathlib.Path(__file__).resolve().parents[1]


class TinyStudent(nn.Module):
  """Stand-in student with the BHViT interface, so the run compiles in seconds."""
  num_classes: int = CLASSES
  image_size: int = IMAGE
  weight_bits: int = 1
  some_fp: bool = True

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(8, (4, 4), strides=(4, 4), name='cov1')(x)
    return nn.Dense(self.num_classes, name='classifier')(nn.relu(x).mean(axis=(1, 2)))


def _timm_state_dict(rng, distilled):
  """Random weights under timm's names and PyTorch layouts."""
  tokens = (IMAGE // PATCH) ** 2 + (2 if distilled else 1)
  w = lambda *shape: rng.normal(0, 0.2, shape).astype(np.float32)
  sd = {'patch_embed.proj.weight': w(DIM, 3, PATCH, PATCH), 'patch_embed.proj.bias': w(DIM),
        'cls_token': w(1, 1, DIM), 'pos_embed': w(1, tokens, DIM),
        'norm.weight': 1 + w(DIM), 'norm.bias': w(DIM),
        'head.weight': w(CLASSES, DIM), 'head.bias': w(CLASSES)}
  if distilled:
    sd.update({'dist_token': w(1, 1, DIM), 'head_dist.weight': w(CLASSES, DIM),
               'head_dist.bias': w(CLASSES)})
  for i in range(DEPTH):
    b = f'blocks.{i}.'
    sd.update({b + 'norm1.weight': 1 + w(DIM), b + 'norm1.bias': w(DIM),
               b + 'attn.qkv.weight': w(3 * DIM, DIM), b + 'attn.qkv.bias': w(3 * DIM),
               b + 'attn.proj.weight': w(DIM, DIM), b + 'attn.proj.bias': w(DIM),
               b + 'norm2.weight': 1 + w(DIM), b + 'norm2.bias': w(DIM),
               b + 'mlp.fc1.weight': w(4 * DIM, DIM), b + 'mlp.fc1.bias': w(4 * DIM),
               b + 'mlp.fc2.weight': w(DIM, 4 * DIM), b + 'mlp.fc2.bias': w(DIM)})
  return sd


def _numpy_vit(sd, images):
  """ViT equations in float64 on NCHW-free numpy: patches as flattened (c, i, j) vectors."""
  sd = {k: v.astype(np.float64) for k, v in sd.items()}
  b, g = images.shape[0], IMAGE // PATCH
  # Patch (r, s) holds pixels [r*P:(r+1)*P, s*P:(s+1)*P]; the conv is a dot with weight[o].
  patches = images.astype(np.float64).reshape(b, g, PATCH, g, PATCH, 3)
  patches = patches.transpose(0, 1, 3, 5, 2, 4).reshape(b, g * g, 3 * PATCH * PATCH)
  x = patches @ sd['patch_embed.proj.weight'].reshape(DIM, -1).T + sd['patch_embed.proj.bias']
  special = [sd['cls_token']] + ([sd['dist_token']] if 'dist_token' in sd else [])
  x = np.concatenate([np.repeat(t, b, 0) for t in special] + [x], 1) + sd['pos_embed']

  def ln(v, name):
    mu, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
    return (v - mu) / np.sqrt(var + 1e-6) * sd[name + '.weight'] + sd[name + '.bias']

  lin = lambda v, name: v @ sd[name + '.weight'].T + sd[name + '.bias']
  hd = DIM // HEADS
  for i in range(DEPTH):
    p = f'blocks.{i}.'
    qkv = lin(ln(x, p + 'norm1'), p + 'attn.qkv')
    heads = []
    for h in range(HEADS):
      q, k, v = (qkv[..., j * DIM + h * hd: j * DIM + (h + 1) * hd] for j in range(3))
      s = q @ k.transpose(0, 2, 1) / np.sqrt(hd)
      a = np.exp(s - s.max(-1, keepdims=True))
      heads.append((a / a.sum(-1, keepdims=True)) @ v)
    x = x + lin(np.concatenate(heads, -1), p + 'attn.proj')
    h1 = lin(ln(x, p + 'norm2'), p + 'mlp.fc1')
    x = x + lin(0.5 * h1 * (1 + erf(h1 / np.sqrt(2))), p + 'mlp.fc2')
  x = ln(x, 'norm')
  logits = lin(x[:, 0], 'head')
  if 'head_dist' + '.weight' in sd:
    logits = (logits + lin(x[:, 1], 'head_dist')) / 2
  return logits


@pytest.mark.parametrize('distilled', [False, True])
def test_converted_forward_matches_numpy_vit(distilled):
  rng = np.random.default_rng(0)
  sd = _timm_state_dict(rng, distilled)
  torch_sd = {k: torch.from_numpy(v) for k, v in sd.items()}
  model = deit.DeiT(image_size=IMAGE, patch_size=PATCH, embed_dim=DIM, depth=DEPTH,
                    num_heads=HEADS, num_classes=CLASSES, distilled=distilled)
  variables = deit.from_timm_state_dict({'model': torch_sd}, model)
  images = rng.normal(size=(3, IMAGE, IMAGE, 3)).astype(np.float32)
  got = np.asarray(model.apply(variables, images, train=False))
  want = _numpy_vit(sd, images)
  assert got.shape == (3, CLASSES)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_conversion_names_every_problem():
  sd = _timm_state_dict(np.random.default_rng(0), distilled=False)
  del sd['blocks.1.mlp.fc2.bias']
  sd['extra.weight'] = np.zeros(3, np.float32)
  model = deit.DeiT(image_size=IMAGE, patch_size=PATCH, embed_dim=DIM, depth=DEPTH,
                    num_heads=HEADS, num_classes=CLASSES + 1)
  with pytest.raises(ValueError) as err:
    deit.from_timm_state_dict(sd, model)
  message = str(err.value)
  for text in ('missing: blocks.1.mlp.fc2.bias', 'unexpected: extra.weight', 'shape: head.weight'):
    assert text in message


def test_distillation_run_with_deit_teacher(tmp_path, monkeypatch):
  monkeypatch.setattr(model_lib, 'build', lambda *args: TinyStudent())
  path = tmp_path / 'deit_tiny.pth'
  sd = _timm_state_dict(np.random.default_rng(1), distilled=True)
  torch.save({'model': {k: torch.from_numpy(v) for k, v in sd.items()}}, path)
  config = config_lib.load_config_file(str(REPO / 'configs' / 'demo.py'))
  config.update(batch_size=8, total_steps=2, log_every_steps=1, eval_every_steps=0,
                checkpoint_every_steps=2)
  config.optim.warmup_steps = 0
  config.loss.update(ce_weight=0.0, distill_weight=1.0)
  config.loss.teacher.update(kind='deit', checkpoint=str(path), patch_size=PATCH,
                             embed_dim=DIM, depth=DEPTH, num_heads=HEADS)
  teacher, _ = teachers.build(config)
  assert isinstance(teacher, deit.DeiT) and teacher.distilled
  _, summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  records = [json.loads(line) for line in open(tmp_path / 'run' / 'metrics.jsonl')]
  steps = [r for r in records if r['kind'] == 'train']
  assert [r['step'] for r in steps] == [1, 2] and summary['step'] == 2
  for r in steps:  # KD alone: the loss is the teacher term, which is positive
    assert r['kd'] > 0 and r['loss'] == pytest.approx(r['kd'], rel=1e-6)
