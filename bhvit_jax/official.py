"""The official PyTorch BHViT, imported at run time from a user's checkout of its repository.

Nothing of the official code lives in this project: `build_model` puts the checkout on
`sys.path` and builds `BHViTForImageClassification` with the flags of a bhvit_jax model
config. When `transformers` or `timm` are not installed, the few names the official code
imports from them come from minimal stand-ins. Also here: the official configuration as a
fixture's `config_json` and the oscillation regularizer over the official parameter names.
"""
import contextlib
import importlib
import io
import json
import os
import sys
import types

import numpy as np

from bhvit_jax import config_lib

# Files of the checkout that `build_model` imports.
REQUIRED_FILES = ('transformer/BHViT.py', 'transformer/utils_quant.py', 'models.py')
# Weights that enter the oscillation regularizer R (docs/reference.md §5), by official name.
REGULARIZED = ('cov1.weight', 'cov2.weight', 'cov3.weight', 'dense.weight', 'query.weight',
               'key.weight', 'value.weight')


class Unsupported(config_lib.UserError):
  """A model configuration the official code cannot express."""


def require_torch():
  """The `torch` module, or a UserError naming the extra that installs it."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise config_lib.UserError(
        "PyTorch is not installed: install the [torch] extra (pip install -e '.[torch]')"
    ) from e
  return torch


def check_expressible(model_config) -> None:
  """Raises Unsupported naming every field the official code hard-codes to another value."""
  m = model_config
  fixed = {'image_size': 224, 'patch_size': 4, 'window_size': 7}
  problems = [f'model.{k}={getattr(m, k)} (the official code hard-codes {v})'
              for k, v in fixed.items() if getattr(m, k) != v]
  if m.hidden_sizes[0] != 64:
    problems.append(f'model.hidden_sizes[0]={m.hidden_sizes[0]} (the official stem is 64 wide)')
  if problems:
    raise Unsupported('the official code cannot express ' + '; '.join(problems))


def _install_stand_ins(torch):
  """Minimal stand-ins for the names the official code takes from transformers and timm."""

  def module(name, **attrs):
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod

  try:
    import transformers  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    output = lambda name: type(name, (dict,), {})
    module('transformers', ViTConfig=types.SimpleNamespace)
    module('transformers.activations', ACT2FN={'gelu': torch.nn.GELU()})
    module('transformers.modeling_outputs', BaseModelOutput=output('BaseModelOutput'),
           BaseModelOutputWithPooling=output('BaseModelOutputWithPooling'),
           ImageClassifierOutput=output('ImageClassifierOutput'))
    import logging  # pylint: disable=g-import-not-at-top
    module('transformers.utils', logging=types.SimpleNamespace(get_logger=logging.getLogger))
  try:
    import timm  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:

    class DropPath(torch.nn.Module):

      def __init__(self, rate=0.0):
        super().__init__()
        self.rate = rate

      def forward(self, x):
        if not self.training or not self.rate:
          return x
        keep = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device) >= self.rate
        return x * keep / (1 - self.rate)

    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    module('timm')
    module('timm.models')
    module('timm.models.layers', trunc_normal_=torch.nn.init.trunc_normal_, DropPath=DropPath,
           to_2tuple=pair)


def import_official(repo: str):
  """(BHViTForImageClassification, BatchNormT) from the checkout `repo`."""
  torch = require_torch()
  if not os.path.isdir(repo):
    raise config_lib.UserError(f'--torch-repo {repo}: no such directory')
  missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(repo, f))]
  if missing:
    raise config_lib.UserError(
        f'--torch-repo {repo} is not a checkout of the official BHViT repository: missing '
        + ', '.join(missing))
  _install_stand_ins(torch)
  repo = os.path.abspath(repo)
  if repo not in sys.path:
    sys.path.insert(0, repo)
  models = importlib.import_module('models')
  bhvit = importlib.import_module('transformer.BHViT')
  return bhvit.BHViTForImageClassification, models.BatchNormT


def official_config(model_config, batch_norm_class):
  """The namespace the official `BHViTForImageClassification` is built from."""
  torch = require_torch()
  m = model_config
  depths = list(m.depths)
  n_conv = depths[0] + depths[1]
  return types.SimpleNamespace(
      hidden_size=list(m.hidden_sizes), depths=depths, num_attention_heads=list(m.num_heads),
      intermediate_size=list(m.mlp_sizes), num_hidden_layersA=n_conv,
      num_hidden_layersB=sum(depths) - n_conv, image_size=m.image_size,
      patch_size=m.patch_size, num_channels=3, hidden_act='gelu', hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0, layer_norm_eps=1e-5, qkv_bias=True,
      chunk_size_feed_forward=0, output_attentions=False, output_hidden_states=False,
      use_return_dict=False, drop_path=m.drop_path, num_labels=m.num_classes,
      shift3=m.shift3, shift5=m.shift5, disable_layerscale=m.disable_layerscale,
      enable_cls_token=False, gsb=m.gsb, recu=m.recu, weight_bits=m.weight_bits,
      input_bits=m.input_bits, some_fp=m.some_fp,
      norm_layer=batch_norm_class if m.norm == 'batch' else torch.nn.LayerNorm)


def build_model(repo: str, model_config):
  """The official `BHViTForImageClassification` with the flags of `model_config` (float32,
  PyTorch's default initialization under the caller's `torch.manual_seed`)."""
  check_expressible(model_config)
  model_class, batch_norm_class = import_official(repo)
  with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per shift residual
    return model_class(official_config(model_config, batch_norm_class))


def config_json(model_config) -> str:
  """`config_json` of a fixture (fixtures/README.md): the official config and CLI flags."""
  m = model_config
  vit = {k: v for k, v in vars(official_config(m, None)).items() if k != 'norm_layer'}
  vit.update(window_size=m.window_size, norm_layer='BatchNormT' if m.norm == 'batch'
             else 'LayerNorm')
  flags = dict(weight_bits=m.weight_bits, input_bits=m.input_bits,
               replace_ln_bn=m.norm == 'batch', shift3=m.shift3, shift5=m.shift5,
               some_fp=m.some_fp, gsb=m.gsb, recu=m.recu,
               disable_layerscale=m.disable_layerscale, enable_cls_token=False,
               drop_path=m.drop_path, nb_classes=m.num_classes)
  return json.dumps({'vit_config': vit, 'cli_flags': flags})


def state_dict(model) -> dict:
  """The model's state dict as numpy arrays (parameters and buffers, their own dtypes)."""
  return {k: as_numpy(v) for k, v in model.state_dict().items()}


def regularized_names(model) -> list:
  return [n for n, _ in model.named_parameters() if any(p in n for p in REGULARIZED)]


def regularizer(model):
  """R of docs/reference.md §5 over the official parameter names (a differentiable torch scalar)."""
  params = dict(model.named_parameters())
  names = regularized_names(model)
  return sum(((params[n].abs() - 1).abs().sum() / params[n].numel()) for n in names) / len(names)


def as_numpy(tensor) -> np.ndarray:
  """A copy (a CPU tensor's `.numpy()` shares its memory, which training keeps updating)."""
  return tensor.detach().cpu().numpy().copy()


# --------------------------------------------------------------- running it ---

# The training-step recipe of the fixtures (fixtures/README.md, "One training step").
RECIPE = {'optimizer': 'torch.optim.AdamW lr=1e-3 betas=(0.9,0.999) eps=1e-8 weight_decay=0, '
                       'constant lr',
          'loss': 'cross_entropy(logits, labels, label_smoothing=0.1) + 0.1*R, R as SPEC 5 '
                  '(official name patterns)'}
LEARNING_RATE = 1e-3
REG_WEIGHT = 0.1
LABEL_SMOOTHING = 0.1


def load_state(model, state: dict, what: str = 'weights'):
  """Loads a numpy state dict into `model` (strict); UserError naming what does not fit."""
  torch = require_torch()
  current = model.state_dict()
  missing = sorted(set(current) - set(state))
  unexpected = sorted(set(state) - set(current))
  wrong = [f'{k} {tuple(state[k].shape)} vs {tuple(current[k].shape)}' for k in current
           if k in state and tuple(state[k].shape) != tuple(current[k].shape)]
  if missing or unexpected or wrong:
    raise config_lib.UserError(
        f'{what} do not fit the configured official model: '
        + '; '.join(f'{n} {kind}: {", ".join(v[:3])}' for kind, v, n in (
            ('missing', missing, len(missing)), ('unexpected', unexpected, len(unexpected)),
            ('mis-shaped', wrong, len(wrong))) if v))
  model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state.items()})


def perturbed(state: dict, seed: int) -> dict:
  """`state` with every float parameter and BatchNorm statistic moved by seeded noise, so that
  no check passes because a value is exactly 0 or 1 (e.g. running statistics, offsets)."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, value in state.items():
    if not np.issubdtype(value.dtype, np.floating) or name.endswith('init_state'):
      out[name] = value
    elif name.endswith('running_var'):
      out[name] = rng.uniform(0.5, 1.5, value.shape).astype(value.dtype)
    else:
      noise = rng.standard_normal((2,) + value.shape)
      scale = 0.05 if name.endswith('running_mean') else 0.02
      out[name] = (value * (1 + 0.1 * noise[0]) + scale * noise[1]).astype(value.dtype)
  return out


def replica(model, state: dict, dtype: str):
  """A copy of `model` holding `state`, in float32 or float64."""
  import copy  # pylint: disable=g-import-not-at-top
  torch = require_torch()
  twin = copy.deepcopy(model)
  load_state(twin, state)
  return twin.to(getattr(torch, dtype))


def tensor(array, dtype: str):
  torch = require_torch()
  return torch.from_numpy(np.asarray(array)).to(getattr(torch, dtype))


def training_loss(model, logits, labels, label_smoothing=LABEL_SMOOTHING, reg_weight=REG_WEIGHT):
  """Label-smoothed cross-entropy + reg_weight·R (the fixtures' recipe); (loss, ce, reg)."""
  torch = require_torch()
  ce = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=label_smoothing)
  reg = regularizer(model)
  return ce + reg_weight * reg, ce, reg


def adamw(model, lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
  torch = require_torch()
  return torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, eps=eps,
                           weight_decay=weight_decay)
