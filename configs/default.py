"""Default hyper-parameters: every field the trainer reads, with its meaning.

The other configs import this one and adjust it. Any field can be overridden
on the command line, e.g. `--config.batch_size=512 --config.model=resnet56`.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # --- model and data ---
  config.model = 'resnet20'          # Registry name: tutorial_cnn|resnet20|resnet56|resnet18|wrn28_10|fast_cnn|airbench|vit_tiny|vit_small|vit_base|...
  config.model_widths = ()           # Block widths of airbench/fast_cnn, e.g. (64, 256, 256) (empty = the model's own).
  config.dataset = 'cifar10'         # cifar10 | cifar100.
  config.data_source = 'tfds'        # tfds | archive (official CIFAR downloads, offline) | synthetic.
  config.data_dir = ''               # tfds data_dir, or the folder/file holding the CIFAR archive.
  config.input_pipeline = 'host'     # host (tf.data on the CPU host) | device (data and augmentation on the devices; no TensorFlow).
  config.crop_padding = 4            # Random crop of the image padded by this many pixels (0 = no crop).
  config.crop_pad_mode = 'zeros'     # zeros | reflect (airbench: 2 pixels of reflection).
  config.flip = 'random'             # random | alternating (airbench: mirrored in alternate epochs after the first) | none.
  config.cutout = 0                  # Cutout square side in pixels (0 = off).
  config.num_synthetic_examples = 0  # Train-split size for data_source=synthetic (0 = the real size).
  # --- length, batch and seed ---
  config.batch_size = 256            # Global batch size, split over all devices.
  config.eval_batch_size = 500       # Global eval batch (rounded up to a multiple of the devices; padding is masked).
  config.num_epochs = 30.0           # Training length in epochs (may be fractional).
  config.num_train_steps = -1        # >0 overrides num_epochs.
  config.seed = 0                    # Seeds init, shuffling and augmentation.
  # --- population: N independent models in one compiled step (docs/configs.md) ---
  config.population = 1              # Members; member i has seed seed + i (1 = a single model, as always).
  config.population_sweep = ''       # Per-member values, e.g. 'learning_rate=0.05,0.1,0.2,0.4;label_smoothing=0,0.2,0.2,0' (learning_rate | weight_decay | label_smoothing).
  config.population_sharding = 'replicated'  # replicated (every device holds every member) | members (members split over the data axis; jit only).
  # --- parallelism ---
  config.parallelism = 'jit'         # pmap | shard_map | jit (with NamedSharding).
  config.mesh_shape = (-1, 1)        # (data, model) device mesh of parallelism=jit; -1 = all the rest, e.g. (4, 2).
  config.sharding = 'replicated'     # replicated | fsdp | tensor | fsdp_tensor | auto (the fastest that fits, from compiled programs: layout_search.py): the train state's layout (jit only; see docs/large_models.md).
  config.remat = 'none'              # none | block (recompute each block's activations in the backward pass: less memory, same numbers).
  config.micro_batches = 1           # Gradient accumulation inside the step: batch_size is split into this many micro-batches.
  config.steps_per_dispatch = 1      # Train steps per compiled call (same results for any value).
  config.platform = ''               # Meant for: '' anywhere | gpu | tpu | accelerator (gpu or tpu); on another, one warning line.
  config.compilation_cache_dir = '~/.cache/cifar_jax'  # JAX's persistent compilation cache ('' = off).
  # --- optimization ---
  config.optimizer = 'sgd'           # sgd | adamw | lars.
  config.lr_units = 'batch256'       # batch256 | per_1024_examples (sgd only; airbench's units, see optimizers.py).
  config.learning_rate = 0.1         # batch256: peak LR for a global batch of 256, scaled linearly with batch_size.
  config.warmup_epochs = 1.0         # Linear warm-up length in epochs (triangular/onecycle: where the peak is).
  config.lr_schedule = 'cosine'      # cosine | onecycle | piecewise | triangular (0.2 -> 1 -> lr_end_fraction of the peak).
  config.lr_end_fraction = 0.0       # Where the triangular schedule ends, as a fraction of its peak (airbench: 0.07).
  config.momentum = 0.9              # SGD/LARS momentum (0 = plain SGD).
  config.nesterov = True             # Nesterov momentum for SGD/LARS.
  config.weight_decay = 5e-4         # batch256: L2 added to the gradient; per_1024_examples: per 1024 examples.
  config.weight_decay_scope = 'kernels'  # kernels (never biases or normalization parameters) | all.
  config.bn_bias_lr_multiplier = 1.0  # LR multiplier of BatchNorm biases' gradients (airbench: 64).
  config.whiten_bias_epochs = 3.0    # airbench's whitening-layer bias is trained for this many epochs.
  config.label_smoothing = 0.0       # Label smoothing of the cross-entropy targets.
  config.ema_decay = 0.0             # Moving average of weights for eval (0 = off), e.g. 0.999.
  config.lookahead_every = 0         # Lookahead: sync slow and fast weights every this many steps (0 = off; airbench: 5).
  config.lookahead_decay = 0.95**5   # Lookahead's slow-weight decay at the end (ramped in as (step/total)^3).
  config.tta = 0                     # Test-time augmentation of the final eval and --mode=eval: 0 none | 1 mirror | 2 mirror + 1-pixel translations.
  config.tta_every_eval = False      # Also at the evals during training (each costs 1x/2x/6x a plain one).
  config.half_precision = False      # bfloat16 compute; float32 params, optimizer state and BN stats.
  # --- logging, eval and checkpoints ---
  config.log_every_steps = 100       # Train metrics and progress line every this many steps.
  config.eval_every_steps = 1000     # Full test-split eval every this many steps (and at the end).
  config.checkpoint_every_steps = 1000  # Orbax checkpoint every this many steps (and at the end).
  config.checkpoint_max_to_keep = 3  # Most recent checkpoints kept (the best one is kept apart).
  config.checkpoint_step = -1        # --mode=eval: the checkpoint step to evaluate (-1 = latest).
  config.report = True               # Draw WORKDIR/report.png and the TensorBoard confusion-matrix image at the end (~1 s, matplotlib).
  config.profile_steps = ''          # "A:B": a profiler trace of steps A+1..B in WORKDIR/plugins/profile (TensorBoard/XProf); '' = off.
  return config
