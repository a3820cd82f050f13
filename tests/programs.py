"""The repository's programs and configs as modules, for in-process calls from the tests."""
import importlib.util
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_tool(name: str):
  """tools/<name>.py as a module (the tools are scripts, not a package)."""
  spec = importlib.util.spec_from_file_location(f'tool_{name}', REPO / 'tools' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def demo_config():
  """A fresh configs/demo.py config."""
  from configs import demo  # pylint: disable=g-import-not-at-top
  return demo.get_config()
