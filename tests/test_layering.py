"""Imports run one way (README's Layout): a module imports only lower layers (or modules of
its own subpackage), and the pure step pulls in no I/O. Read from the source (ast), so
imports inside functions count too."""
import ast
import os

import pytest
from helpers import ROOT

PACKAGE = os.path.join(ROOT, 'cifar_jax')
# Lower numbers are lower layers. The longest matching prefix gives a module's layer.
LAYERS = {
    'cifar_jax.errors': -1,
    'cifar_jax.runtime': 0,
    'cifar_jax.chips': 0,
    'cifar_jax.data.cifar': 1,
    'cifar_jax.data': 2,
    'cifar_jax.models': 2,
    'cifar_jax.optimizers': 3,
    'cifar_jax.serving.model': 3,
    'cifar_jax.step': 4,
    'cifar_jax.flops': 4.2,
    'cifar_jax.population': 4.5,  # Below dispatch, which runs populations.
    'cifar_jax.dispatch': 5,
    'cifar_jax.parallel': 6,
    'cifar_jax.checkpointing': 7,
    'cifar_jax.metric_logging': 7,
    'cifar_jax.config_checks': 7,
    'cifar_jax.loop': 7,
    'cifar_jax.memory': 7,
    'cifar_jax.report': 8,
    'cifar_jax.workdir': 8,
    'cifar_jax.aot': 8.5,  # Compiles a run's programs for a topology.
    'cifar_jax.layout_search': 8.6,  # sharding=auto, through aot's compiles.
    'cifar_jax.train': 9,
    'cifar_jax.serving': 10,
}
IO = ('tarfile', 'pickle', 'socket', 'subprocess', 'etils', 'orbax', 'tensorflow',
      'tensorflow_datasets', 'gcsfs', 'google', 'PIL', 'matplotlib', 'cifar_jax.runtime',
      'cifar_jax.data.sources', 'cifar_jax.data.host_pipeline', 'cifar_jax.checkpointing')


def _modules() -> dict[str, str]:
  found = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(root, name)
        dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
        found[dotted[:-len('.__init__')] if dotted.endswith('.__init__') else dotted] = path
  return found


MODULES = _modules()


def _imports(path: str) -> set[str]:
  """Every module `path` imports, anywhere in it."""
  out = set()
  for node in ast.walk(ast.parse(open(path, encoding='utf-8').read())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      modules = {f'{node.module}.{a.name}' for a in node.names
                 if f'{node.module}.{a.name}' in MODULES}
      # `from pkg import module` imports the module (the package's __init__ is `_closure`'s).
      out |= modules if len(modules) == len(node.names) else modules | {node.module}
  return out


def _layer(module: str) -> int:
  prefix = max((p for p in LAYERS if module == p or module.startswith(p + '.')), key=len)
  return LAYERS[prefix]


def _subpackage(module: str) -> str:
  parts = module.split('.')
  return '.'.join(parts[:2]) if len(parts) > 2 else module


@pytest.mark.parametrize('module', sorted(m for m in MODULES if m != 'cifar_jax'))
def test_a_module_imports_only_lower_layers_or_its_own_subpackage(module):
  for imported in sorted(_imports(MODULES[module])):
    if not imported.startswith('cifar_jax.') or imported not in MODULES:
      continue
    same_subpackage = _subpackage(imported) == _subpackage(module)
    assert same_subpackage or _layer(imported) < _layer(module), \
        f'{module} (layer {_layer(module)}) imports {imported} (layer {_layer(imported)})'


def test_the_bottom_layers_import_nothing_above_them():
  for module in MODULES:
    inside = {i for i in _imports(MODULES[module]) if i.startswith('cifar_jax')}
    if module.startswith('cifar_jax.runtime'):
      assert inside <= {'cifar_jax.errors'}, module
    if module == 'cifar_jax.data.cifar':
      assert not inside, module


def _closure(module: str) -> set[str]:
  seen, todo = set(), [module]
  while todo:
    current = todo.pop()
    if current in seen:
      continue
    seen.add(current)
    imported = _imports(MODULES[current])
    todo += [i for i in imported if i in MODULES]
    # A submodule's package __init__ runs first.
    todo += ['.'.join(i.split('.')[:k]) for i in imported if i.startswith('cifar_jax.')
             for k in range(2, len(i.split('.'))) if '.'.join(i.split('.')[:k]) in MODULES]
  return seen


@pytest.mark.parametrize('module', ['cifar_jax', 'cifar_jax.step', 'cifar_jax.serving.model'])
def test_the_step_and_the_serving_model_pull_in_no_io(module):
  reached = _closure(module)
  everything = set().union(*(_imports(MODULES[m]) for m in reached)) | reached
  io = sorted(i for i in everything if any(i == x or i.startswith(x + '.') for x in IO))
  assert not io, f'{module} reaches {io}'
  assert 'cifar_jax.data.sources' not in reached


def test_readme_layout_names_every_module():
  text = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()
  layout = text[text.index('## Layout'):]
  for module, path in MODULES.items():
    name = os.path.relpath(path, PACKAGE)
    if name.endswith('__init__.py') and module != 'cifar_jax.models':
      continue  # Package docstrings; the models registry is listed.
    assert name in layout or os.path.basename(name) in layout, f'README Layout lacks {name}'
