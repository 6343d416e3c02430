"""Using a trained run: predict on image files, export a serving bundle.

- `model`: the uint8 -> logits function that every serving path runs.
- `images`: image files, folders and globs -> CIFAR-sized uint8 arrays.
- `predict`: `--mode=predict` (top-5 labels as JSON lines or a CSV).
- `export`: `--mode=export` (jax.export artifact, weights, labels, README).
- `onnx_export`: model.onnx from a bundle, in an environment with jax2onnx.

The run itself (its config and checkpoint) is read by `cifar_jax.workdir`.
"""
