"""The official PyTorch BHViT, imported from a user-given checkout of its repository.

Nothing of the reference is copied here: `build_torch_model` puts the checkout on sys.path and
instantiates its `BHViTForImageClassification` with the flags of a bhvit_jax model config.
When `transformers` or `timm` are not installed, the few names the reference imports from them
are provided by minimal stand-ins.
"""
import importlib
import os
import sys
import types


class UnsupportedConfig(ValueError):
  """A model config the reference cannot build."""


def install_stand_ins():
  """Minimal stand-ins for the names the reference takes from transformers and timm."""
  import torch  # pylint: disable=g-import-not-at-top

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


def build_torch_model(repo: str, model_config):
  """The official `BHViTForImageClassification` with the flags of `model_config`."""
  import torch  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(os.path.join(repo, 'transformer')):
    raise FileNotFoundError(f'--torch-repo {repo}: no transformer/ package (expected a checkout '
                            'of the official BHViT repository)')
  install_stand_ins()
  if repo not in sys.path:
    sys.path.insert(0, repo)
  reference_models = importlib.import_module('models')
  from transformer.BHViT import BHViTForImageClassification  # pylint: disable=g-import-not-at-top
  m = model_config
  depths = list(m.depths)
  n_conv = depths[0] + depths[1]
  config = types.SimpleNamespace(
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
      norm_layer=reference_models.BatchNormT if m.norm == 'batch' else torch.nn.LayerNorm)
  if m.image_size != 224 or m.patch_size != 4 or m.window_size != 7:
    raise UnsupportedConfig('the reference hard-codes 224² inputs, patch 4 and window 7')
  return BHViTForImageClassification(config)
