"""What each accelerator generation can hold and do: HBM per chip, peak FLOP/s and HBM
bandwidth, as their makers document them, for `--mode=compile`'s fit check and roofline.

A compiled program says how many bytes each chip needs (XLA's memory analysis) and how
many FLOPs and HBM bytes one step costs (its cost analysis); only the chip's datasheet
says what it has. The roofline estimate of a step is

    max(flops_per_chip / peak_flops, bytes_accessed_per_chip / hbm_bandwidth)

plus the step's collectives, `collective_bytes_per_chip / collective_bytes_per_sec`, counted
as not overlapped with the rest (XLA overlaps some: that term is an upper bound). No host
time. Useful for ranking layouts (FSDP moves fewer optimizer bytes than replication but
all-gathers the weights) and for a first guess before renting a slice.

Peak FLOP/s are the documented bfloat16 matrix-unit peaks. They bound float32 programs
too: XLA:TPU's default precision runs float32 matmuls and convolutions as single bfloat16
passes on the MXUs (`jax.default_matmul_precision`), so a float32 step's roofline is the
same formula. HBM capacities are the documented ones read as GiB (2**30 bytes); a
runtime keeps a little of it, so a program within ~3% of the limit may still not fit.
"""
from __future__ import annotations

import dataclasses
import math
import re


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str               # The generation, as topologies name it (v5e, ...).
  device_kinds: tuple     # jax's Device.device_kind strings of this chip.
  hbm_bytes: int          # Per chip.
  peak_flops: float       # Per chip per second, bfloat16 (see above).
  hbm_bytes_per_sec: float
  collective_bytes_per_sec: float  # Per chip: the Pod's all-reduce bandwidth / its chips.
  source: str             # Where these numbers are documented.


_GIB = 2**30
CHIPS = (
    Chip('v4', ('TPU v4',), 32 * _GIB, 275e12, 1200e9, 1.1e15 / 4096,
         'https://cloud.google.com/tpu/docs/v4 (275 TFLOP/s bf16; 32 GiB, 1200 GB/s; '
         'all-reduce 1.1 PB/s per 4096-chip Pod)'),
    Chip('v5e', ('TPU v5 lite', 'TPU v5e'), 16 * _GIB, 197e12, 819e9, 51.2e12 / 256,
         'https://cloud.google.com/tpu/docs/v5e (197 TFLOP/s bf16; 16 GB, 819 GB/s; '
         'all-reduce 51.2 TB/s per 256-chip Pod)'),
    # v5p's page gives the chip's bidirectional ICI bandwidth (1200 GB/s), not the Pod's
    # all-reduce: half of it, v5e's ratio of the two (400 GB/s ICI, 200 GB/s all-reduce).
    Chip('v5p', ('TPU v5', 'TPU v5p'), 95 * _GIB, 459e12, 2765e9, 1200e9 / 2,
         'https://cloud.google.com/tpu/docs/v5p (459 TFLOP/s bf16; 95 GiB, 2765 GB/s; '
         'ICI 1200 GB/s per chip)'),
    Chip('v6e', ('TPU v6 lite', 'TPU v6e'), 32 * _GIB, 918e12, 1638e9, 102.4e12 / 256,
         'https://cloud.google.com/tpu/docs/v6e (918 TFLOP/s bf16; 32 GB, 1638 GB/s; '
         'all-reduce 102.4 TB/s per 256-chip Pod)'),
)
GENERATIONS = tuple(chip.name for chip in CHIPS)


def by_device_kind(device_kind: str) -> Chip | None:
  """The chip whose devices report `device_kind`, or None (a CPU, an unlisted chip)."""
  for chip in CHIPS:
    if device_kind in chip.device_kinds:
      return chip
  return None


def roofline_seconds(chip: Chip, flops: float, bytes_accessed: float,
                     collective_bytes: float = 0.0) -> float:
  """The roofline estimate of one step on one chip (see the module docstring)."""
  return (max(flops / chip.peak_flops, bytes_accessed / chip.hbm_bytes_per_sec)
          + collective_bytes / chip.collective_bytes_per_sec)


_COLLECTIVE = re.compile(r'=\s*(\(.*?\)|\S+)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|'
                         r'collective-permute)(?:-start)?\(')
_SHAPE = re.compile(r'(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([\d,]*)\]')
_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'bf16': 2, 'f16': 2, 's32': 4,
          'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8}


def collective_bytes(hlo_text: str) -> float:
  """Bytes a chip sends in the collectives of a compiled program (`Compiled.as_text()`):
  each collective's result size, twice for an all-reduce (a ring's reduce-scatter and
  all-gather). A loop body's collectives count once, as its FLOPs do."""
  total = 0.0
  for result, kind in _COLLECTIVE.findall(hlo_text):
    size = sum(_BYTES[dtype] * math.prod(int(d) for d in dims.split(',') if d)
               for dtype, dims in _SHAPE.findall(result))
    total += size * (2 if kind == 'all-reduce' else 1)
  return total
