"""GPU(s): ResNet-18 on CIFAR-10 in bfloat16, data-parallel over all local GPUs.

COMMAND:
  python main.py --config=configs/gpu.py --workdir=/tmp/cifar10
  (offline: add --config.data_source=archive --config.data_dir=<folder with cifar-10-*.tar.gz>)
EXPECTED: not yet measured on a GPU. ResNet-18 with this 40-epoch cosine recipe typically
  reaches ~94-95% top-1 on the original CIFAR-10 (a little less on a JPEG re-encoded copy).
  The measured accuracy, runtime and GPU model belong here.
INPUT: input_pipeline=device (the uint8 splits, 176 MiB, live on every GPU; batches are
  gathered, cropped, flipped and cut out inside the compiled step, 50 steps per call), so a
  GPU never waits on the host and the run needs no TensorFlow with the archive source. Host
  vs device images/sec on a GPU: `python benchmarks/throughput.py --config=configs/gpu.py
  --config.data_source=synthetic` (not yet run on one). On a 2-core CPU the device pipeline
  delivers 7.6x the host pipeline's images/sec at batch 1024 (478k vs 63k,
  benchmarks/throughput.py, JAX 0.10.2).
PLATFORM: config.platform='gpu': on a JAX without a GPU, main.py says so in one warning line
  (with the install command) and trains on what it found.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.model = 'resnet18'
  config.batch_size = 512
  config.num_epochs = 40.0
  config.learning_rate = 0.1       # For batch 256: 0.2 at batch 512.
  config.lr_schedule = 'cosine'
  config.warmup_epochs = 2.0
  config.label_smoothing = 0.1
  config.ema_decay = 0.999
  config.half_precision = True
  config.platform = 'gpu'
  config.parallelism = 'jit'
  config.input_pipeline = 'device'  # Data and augmentation on the GPUs: no host work per step.
  config.steps_per_dispatch = 50    # One compiled call per 50 steps (cut at log/eval/checkpoint).
  config.log_every_steps = 100
  config.eval_every_steps = 980     # Every 10 epochs.
  config.checkpoint_every_steps = 980
  return config
