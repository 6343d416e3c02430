"""A run's workdir, read back: its config and its checkpointed state.

The layout (local or gs://): `config.json` (the config it was trained with),
`checkpoints/<step>` and `best_checkpoint/<step>` (Orbax, `checkpointing`),
`metrics.jsonl` and TensorBoard events (`metric_logging`), `report.png`
(`report`), `plugins/profile/` (a profiler trace).

`--mode=eval`, predict, export and report all start here. A run written
before a config field existed reads as having that field's default: its
`config.json` is merged over `configs/default.py`, the one place a default lives.
"""
from __future__ import annotations

import json

import jax
from absl import logging

from cifar_jax.errors import UserError
from cifar_jax.runtime import storage

CHECKPOINTS = ('best', 'latest')  # Or a step number.


def config_path(workdir):
  return storage.path(workdir) / 'config.json'


def saved_config(workdir) -> dict | None:
  """`workdir/config.json` merged over the defaults, as JSON values; None if absent."""
  text = storage.read_text(config_path(workdir))
  if text is None:
    return None
  from configs import default  # pylint: disable=import-outside-toplevel
  return {**json.loads(default.get_config().to_json_best_effort()), **json.loads(text)}


def read_config(workdir):
  """The config a run was trained with, as a ConfigDict (fields it predates: defaults)."""
  from configs import default  # pylint: disable=import-outside-toplevel
  saved = saved_config(workdir)
  if saved is None:
    raise UserError(f'{config_path(workdir)} does not exist; point --workdir at a training run')
  config = default.get_config()
  for field, value in saved.items():
    # JSON has no tuples: a tuple field reads back as a list.
    config[field] = tuple(value) if isinstance(config.get(field), tuple) else value
  return config


def write_config(workdir, config) -> None:
  """Written whole: other processes (and --mode=eval) may be reading it."""
  storage.write_whole(config_path(workdir), config.to_json_best_effort(indent=2) + '\n')


def parse_member(member: str, population: int) -> int | str | None:
  """`--member` of a run with `population` members: '' (the default: None), 'ensemble',
  'all', or a member's index as an int. A UserError for anything else."""
  member = str(member or '').strip()
  if population == 1:
    if member not in ('', '0', 'all'):
      raise UserError(f'--member={member} but this run trained one model (population 1); '
                      'drop --member')
    return None
  if member in ('', 'ensemble', 'all'):
    return member or None
  if not member.isdigit() or int(member) >= population:
    raise UserError(f'--member={member!r} must be ensemble, all or a member 0..{population - 1} '
                    f'(this run trained a population of {population})')
  return int(member)


def load_state(workdir: str, checkpoint: str = 'best', member: str = ''):
  """(config, state on one device, step, description) of `checkpoint`: best | latest | STEP.

  `best` is the best-by-eval-accuracy checkpoint, or the latest one if the run
  has not evaluated yet (said in the log). A population's (`config.population` > 1):
  with `member` = i, member i as a solo run's config and state (seed + i, its swept
  values); otherwise (`ensemble`, the default) the stacked state of every member.
  """
  from cifar_jax import checkpointing, population, step as step_lib  # pylint: disable=import-outside-toplevel
  config = read_config(workdir)
  which = parse_member(member, int(config.population))
  if checkpoint not in CHECKPOINTS and not str(checkpoint).isdigit():
    raise UserError(f'--checkpoint={checkpoint!r} must be best, latest or a step number')
  best = checkpointing.best_dir(workdir)
  use_best = checkpoint == 'best' and storage.has_step_dirs(best)
  if checkpoint == 'best' and not use_best:
    logging.warning('%s has no best checkpoint (no eval yet); using the latest one.', workdir)
  directory = best if use_best else checkpointing.checkpoints_dir(workdir)
  if not directory.exists():
    raise UserError(f'{directory} does not exist; train first, or point --workdir at a run')
  manager = checkpointing.open_read_only(workdir, directory=directory)
  if config.population > 1:
    template = population.create_state(config, int(config.population))
  else:
    template = step_lib.create_train_state(config, jax.random.key(config.seed))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  wanted = int(checkpoint) if str(checkpoint).isdigit() else None
  state = checkpointing.restore(manager, template, device, step=wanted)
  manager.close()
  if state is None:
    raise UserError(f'{directory} holds no checkpoint; train first')
  step = step_lib.current_step(state)
  weights = 'EMA weights' if state.ema_params is not None else 'weights'
  source = f'{"best" if use_best else "checkpoint"} {directory}/{step} ({weights})'
  if isinstance(which, int):
    config, state = population.member_config(config, which), population.member(state, which)
    source += f', member {which} of {population.size(template)}'
  elif config.population > 1:
    source += f', the ensemble of its {config.population} members'
  return config, state, step, source
