"""Cloud TPU VM: Wide ResNet 28-10 on CIFAR-10 in bfloat16 over all TPU cores.

COMMAND (on a single-host TPU VM, TFDS data prepared in TFDS_DATA_DIR or a gs:// bucket):
  python main.py --config=configs/tpu.py --workdir=gs://<bucket>/runs/cifar10_wrn \
      --config.data_dir=gs://<bucket>/tensorflow_datasets
On a pod slice (every worker runs it; a gs:// workdir is shared by the workers):
  ./tpu_setup.sh train --name <tpu> --zone <zone> -- --config=configs/tpu.py \
      --workdir=gs://<bucket>/runs/cifar10_wrn --config.data_dir=gs://<bucket>/tensorflow_datasets
EXPECTED: not yet measured on a TPU by this project. WRN-28-10 with this 100-epoch
  cosine recipe, label smoothing and EMA typically reaches ~96% top-1 on the original
  CIFAR-10. Whoever runs it first: put the measured accuracy, runtime and TPU type here.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.model = 'wrn28_10'
  config.batch_size = 1024
  config.num_epochs = 100.0
  config.learning_rate = 0.1       # For batch 256: 0.4 at batch 1024.
  config.lr_schedule = 'cosine'
  config.warmup_epochs = 5.0
  config.label_smoothing = 0.1
  config.cutout = 16
  config.ema_decay = 0.9995
  config.half_precision = True
  config.platform = 'tpu'
  config.parallelism = 'jit'
  config.input_pipeline = 'device'  # Data and augmentation on the TPU cores: no host work per step.
  config.steps_per_dispatch = 50    # One compiled call per 50 steps (cut at log/eval/checkpoint).
  config.log_every_steps = 100
  config.eval_every_steps = 1220    # Every 25 epochs.
  config.checkpoint_every_steps = 1220
  return config
