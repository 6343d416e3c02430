"""Runtime concerns: the machine and the process, not the model or the data.

- `storage`: one path layer for local and gs:// files (etils.epath).
- `distributed`: multi-process start-up (`jax.distributed`), clusters detected.
- `compilation_cache`: JAX's persistent compilation cache.
- `xla_cpu`: XLA:CPU options that must be set before the backend starts.
- `preemption`: SIGTERM/SIGINT as a request to checkpoint and stop.

Imports run one way: these import nothing else of cifar_jax but `errors`.
"""
