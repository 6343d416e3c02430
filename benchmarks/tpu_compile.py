"""The same train programs compiled by XLA:CPU and by the TPU compiler: how wrong was the CPU?

  JAX_PLATFORMS=cpu python benchmarks/tpu_compile.py [--topologies=v5e:2x4,v6e:2x4]

For each model (configs/tpu.py's run: batch 1024, the device pipeline's resident data,
bf16 compute, EMA, a dispatch of 50 steps) and layout, the train dispatch is built from
abstract shapes (`cifar_jax.aot.abstract_run`) on 8 devices twice: on this machine's 8
XLA:CPU devices (what `memory.py` used to judge fits before `--mode=compile`) and on the
8 chips of each TPU topology, compiled by libtpu. Printed per row: peak bytes per device
(arguments + outputs - aliased + temporaries) from each compiler, their ratio, compile
seconds, and the TPU roofline's images/s per chip (`cifar_jax/chips.py`). Needs libtpu
(`pip install -e ".[tpu]"`); no TPU. `--json` adds one JSON line per row.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_force_host_platform_device_count=8')
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import quiet  # benchmarks/quiet.py, beside this script  # pylint: disable=wrong-import-position
import jax  # pylint: disable=wrong-import-position

from cifar_jax import aot, chips  # pylint: disable=wrong-import-position
from configs import tpu  # pylint: disable=wrong-import-position

ROWS = [('airbench', 'replicated', (-1, 1)), ('resnet18', 'replicated', (-1, 1)),
        ('wrn28_10', 'replicated', (-1, 1)), ('wrn28_10', 'fsdp', (-1, 1)),
        ('vit_small', 'replicated', (-1, 1)), ('vit_small', 'fsdp', (-1, 1)),
        ('vit_small', 'tensor', (-1, 2)), ('vit_small', 'fsdp_tensor', (-1, 2))]


def config_for(model: str, sharding: str, mesh: tuple):
  config = tpu.get_config()
  config.update(model=model, sharding=sharding, mesh_shape=mesh)
  return config


def train_program(config, devices, chip):
  run = aot.abstract_run(config, devices)
  return aot.compile_programs(config, run, chip, with_eval=False)['train']


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--topologies', default='v5e:2x4,v6e:2x4')
  parser.add_argument('--models', default='', help='only these models (comma-separated)')
  parser.add_argument('--json', action='store_true')
  args = parser.parse_args()
  quiet.report()
  cpu_devices = jax.devices('cpu')
  assert len(cpu_devices) == 8, cpu_devices
  topologies = {t: aot.topology_devices(t) for t in args.topologies.split(',')}
  rows = [r for r in ROWS if not args.models or r[0] in args.models.split(',')]
  gib = lambda n: f'{n / 2**30:6.2f}'
  print(f'{"model":10} {"layout":12} {"XLA:CPU GiB":>11} {"cpu s":>6} {"topology":9} '
        f'{"TPU GiB":>8} {"HBM":>5} {"TPU/CPU":>7} {"tpu s":>6} {"est img/s/chip":>14}')
  for model, sharding, mesh in rows:
    config = config_for(model, sharding, mesh)
    cpu = train_program(config, cpu_devices, None)
    for name, devices in topologies.items():
      chip = chips.by_device_kind(devices[0].device_kind)
      got = train_program(config, devices, chip)
      per_chip = got['estimated_images_per_sec'] / len(devices)
      ratio = got['peak_bytes_per_chip'] / cpu['peak_bytes_per_chip']
      print(f'{model:10} {sharding:12} {gib(cpu["peak_bytes_per_chip"]):>11} '
            f'{cpu["compile_seconds"]:6.1f} {name:9} {gib(got["peak_bytes_per_chip"]):>8} '
            f'{chip.hbm_bytes / 2**30:5.0f} {ratio:7.2f} {got["compile_seconds"]:6.1f} '
            f'{per_chip:14,.0f}', flush=True)
      if args.json:
        print(json.dumps({'model': model, 'sharding': sharding, 'mesh_shape': list(mesh),
                          'topology': name, 'cpu': cpu, 'tpu': got}), flush=True)


if __name__ == '__main__':
  main()
