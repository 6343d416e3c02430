"""Default hyper-parameters: every field the trainer reads, with its meaning.

The other configs import this one and adjust it. Any field can be overridden
on the command line, e.g. `--config.batch_size=512 --config.model=resnet56`.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # --- model and data ---
  config.model = 'resnet20'          # Registry name: tutorial_cnn|resnet20|resnet56|resnet18|wrn28_10|fast_cnn.
  config.dataset = 'cifar10'         # cifar10 | cifar100.
  config.data_source = 'tfds'        # tfds | archive (official CIFAR downloads, offline) | synthetic.
  config.data_dir = ''               # tfds data_dir, or the folder/file holding the CIFAR archive.
  config.input_pipeline = 'host'     # host (tf.data on the CPU host) | device (data and augmentation on the devices; no TensorFlow).
  config.cutout = 0                  # Cutout square side in pixels (0 = off).
  config.num_synthetic_examples = 0  # Train-split size for data_source=synthetic (0 = the real size).
  # --- length, batch and seed ---
  config.batch_size = 256            # Global batch size, split over all devices.
  config.eval_batch_size = 500       # Global eval batch (rounded up to a multiple of the devices; padding is masked).
  config.num_epochs = 30.0           # Training length in epochs (may be fractional).
  config.num_train_steps = -1        # >0 overrides num_epochs.
  config.seed = 0                    # Seeds init, shuffling and augmentation.
  # --- parallelism ---
  config.parallelism = 'jit'         # pmap | shard_map | jit (with NamedSharding).
  config.steps_per_dispatch = 1      # Train steps per compiled call (same results for any value).
  config.compilation_cache_dir = '~/.cache/cifar_jax'  # JAX's persistent compilation cache ('' = off).
  # --- optimization ---
  config.optimizer = 'sgd'           # sgd | adamw | lars.
  config.learning_rate = 0.1         # Peak LR for a global batch of 256; scaled linearly with batch_size.
  config.warmup_epochs = 1.0         # Linear warm-up length in epochs.
  config.lr_schedule = 'cosine'      # cosine | onecycle | piecewise.
  config.momentum = 0.9              # SGD/LARS momentum (0 = plain SGD).
  config.nesterov = True             # Nesterov momentum for SGD/LARS.
  config.weight_decay = 5e-4         # L2 on kernels only (never biases or normalization parameters).
  config.label_smoothing = 0.0       # Label smoothing of the cross-entropy targets.
  config.ema_decay = 0.0             # Moving average of weights for eval (0 = off), e.g. 0.999.
  config.half_precision = False      # bfloat16 compute; float32 params, optimizer state and BN stats.
  # --- logging, eval and checkpoints ---
  config.log_every_steps = 100       # Train metrics and progress line every this many steps.
  config.eval_every_steps = 1000     # Full test-split eval every this many steps (and at the end).
  config.checkpoint_every_steps = 1000  # Orbax checkpoint every this many steps (and at the end).
  config.checkpoint_max_to_keep = 3  # Most recent checkpoints kept (the best one is kept apart).
  config.checkpoint_step = -1        # --mode=eval: the checkpoint step to evaluate (-1 = latest).
  return config
