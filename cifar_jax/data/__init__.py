"""The data: where images come from and how batches are made.

- `cifar`: the datasets' facts (classes, sizes, mean/std, `normalize`); no I/O.
- `sources`: a whole split from TFDS, the official archives or synthetic data.
- `host_pipeline`: tf.data batches on the host (`config.input_pipeline=host`).
- `device_pipeline`: batches made inside the compiled step from the split on the
  devices (`config.input_pipeline=device`; no TensorFlow).

Imports run one way: the pipelines and sources read `cifar`; `cifar` reads nothing.
"""
