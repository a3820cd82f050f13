"""PyTorch <-> Flax conversion: lossless round trip, clear errors, .pth files."""
import numpy as np
import pytest

from bhvit_jax import convert
from bhvit_jax import reference


@pytest.fixture(scope='module')
def public_state(case_public):
  data = np.load(case_public)
  model = reference.model_lib.BHViT(
      **reference.model_config_from_reference(str(data['config_json'])))
  return model, reference.prefixed(data, 'state/')


def test_round_trip_reproduces_state_dict_exactly(public_state):
  model, state = public_state
  back = convert.flax_to_torch(convert.torch_to_flax(state, model))
  assert sorted(back) == sorted(state)
  for name, value in state.items():
    assert back[name].dtype == value.dtype and back[name].shape == value.shape, name
    np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_layouts_are_nhwc(public_state):
  model, state = public_state
  params = convert.torch_to_flax(state, model)['params']
  conv = state['vit.encoder.layerA.0.GC.cov2.weight']  # [O, I/g, kh, kw]
  np.testing.assert_array_equal(params['layerA_0']['GC']['cov2']['kernel'][2, 1, 3, 5],
                                conv[5, 3, 2, 1])
  pos = state['vit.embeddings.position_embeddings']  # [1, C, H, W]
  np.testing.assert_array_equal(params['embeddings']['position_embeddings'][0, 4, 7, 9],
                                pos[0, 9, 4, 7])
  dense = state['vit.encoder.layerB.0.attention.attention.query.weight']  # [out, in]
  np.testing.assert_array_equal(
      params['layerB_0']['attention']['attention']['query']['kernel'], dense.T)


def test_mismatch_lists_missing_unexpected_and_shapes(public_state):
  model, state = public_state
  broken = dict(state)
  del broken['vit.encoder.layerA.0.GC.cov1.bias']
  broken['vit.encoder.layerA.0.extra.weight'] = np.zeros(3, np.float32)
  broken['classifier.weight'] = np.zeros((7, 512), np.float32)
  with pytest.raises(ValueError) as err:
    convert.torch_to_flax(broken, model)
  text = str(err.value)
  assert '(3 mismatches)' in text
  assert 'vit.encoder.layerA.0.GC.cov1.bias: missing in checkpoint' in text
  assert 'vit.encoder.layerA.0.extra.weight: not in the model' in text
  assert 'classifier.weight: checkpoint (7, 512) vs model (10, 512)' in text


def test_pth_file_with_training_wrapper_and_module_prefix(public_state, tmp_path):
  torch = pytest.importorskip('torch')
  model, state = public_state
  wrapped = {'model': {'module.' + k: torch.from_numpy(v) for k, v in state.items()},
             'epoch': 3}
  path = tmp_path / 'ckpt.pth'
  torch.save(wrapped, path)
  loaded = convert.load_torch_file(path)
  variables = convert.torch_to_flax(loaded, model)
  out = tmp_path / 'back.pth'
  convert.save_torch_file(convert.flax_to_torch(variables), out)
  again = torch.load(out, weights_only=True)
  for name, value in state.items():
    assert tuple(again[name].shape) == value.shape, name
    np.testing.assert_array_equal(again[name].numpy(), value)


def test_non_bhvit_files_are_rejected(tmp_path):
  torch = pytest.importorskip('torch')
  path = tmp_path / 'other.pth'
  torch.save([1, 2, 3], path)
  with pytest.raises(ValueError, match='not a PyTorch state dict'):
    convert.load_torch_file(path)
  (tmp_path / 'garbage.pth').write_bytes(b'not a zip file')
  with pytest.raises(ValueError, match='not a readable PyTorch checkpoint'):
    convert.load_torch_file(tmp_path / 'garbage.pth')
  with pytest.raises(FileNotFoundError, match='missing.pth'):
    convert.load_torch_file(tmp_path / 'missing.pth')


def test_convert_tool_round_trip(public_state, case_public, tmp_path):
  torch = pytest.importorskip('torch')
  import subprocess
  import sys
  from conftest import REPO
  _, state = public_state
  fields = reference.model_config_from_reference(str(np.load(case_public)['config_json']))
  (tmp_path / 'cfg.py').write_text(
      'import ml_collections\n'
      f'def get_config():\n  return ml_collections.ConfigDict({{"model": {fields!r}}})\n')
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / 'in.pth')
  tool = [sys.executable, str(REPO / 'tools' / 'convert_torch.py'),
          f'--config={tmp_path / "cfg.py"}']
  for src, out in (('in.pth', 'mid.msgpack'), ('mid.msgpack', 'out.pth')):
    subprocess.run(tool + [f'--src={tmp_path / src}', f'--out={tmp_path / out}'], check=True,
                   cwd=REPO, capture_output=True)
  again = torch.load(tmp_path / 'out.pth', weights_only=True)
  assert sorted(again) == sorted(state)
  for name, value in state.items():
    assert tuple(again[name].shape) == value.shape, name
    np.testing.assert_array_equal(again[name].numpy(), value)
