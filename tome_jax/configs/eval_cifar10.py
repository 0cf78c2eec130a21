"""The bundled default: the shipped ViT-Ti/4 on the shipped CIFAR-10 test set, offline.

    python eval.py                                    # this config
    python eval.py --config.r="0, 4, (8, -1)" --config.limit=2000
"""

import ml_collections

from tome_jax import data, reduce
from tome_jax.vit import ViT


def get_config():
    config = ml_collections.ConfigDict()
    # A timm model name, a timm checkpoint file (.safetensors/.pth/.bin/.npz), a torchvision ViT
    # state dict, or a Hugging Face model directory or hub id ("google/vit-base-patch16-224"). A
    # relative assets/NAME missing from the current folder is the installed package's copy
    # (tome_jax/assets), so this default runs from any folder.
    config.model = "assets/vit_tiny_p4_cifar10.safetensors"
    config.pretrained = True  # False: the architecture of that name or file, random init
    # ViT attributes (--config.model_overrides.num_classes=10); those left unset keep the model's own.
    config.model_overrides = model_overrides()
    # config.method and every method's settings, config.<method> (--config.pitome.margin=0.5).
    add_methods(config)
    config.metric_layers = ""  # DTEM metric layers saved alone (train.py's metric_layers.safetensors)
    config.params_from = ""  # a train.py workdir: evaluate its checkpoint's parameters
    config.params_step = "best"  # "best" (eval top-1), "latest", or a step number

    # One sweep row per entry: ints, (r, inflection) pairs, per-layer lists.
    config.r = "0, 2, 4, (4, -1), (6, -1), (8, -1)"
    # Also a row for the schedule tome_jax.choose_r picks for at most this many GFLOPs per image.
    config.target_gflops = ml_collections.config_dict.placeholder(float)
    # Also a row for the schedule tome_jax.choose_r picks for at least this speed-up over r = 0, measured here.
    config.target_speedup = ml_collections.config_dict.placeholder(float)
    # Proportional attention (off for off-the-shelf MAE models); None: the method's
    # default, as its authors run it (on for ToMe and MCTF).
    config.prop_attn = ml_collections.config_dict.placeholder(bool)

    # A TFDS name, "folder:/path" (root/<split>/<class>/<image>, or root/<class>/<image>
    # as the one split "all"), or "bundled_cifar10".
    config.dataset = "bundled_cifar10"
    config.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS's data directory (None: TFDS's default)
    config.download = True  # a TFDS dataset missing from data_dir: download and prepare it
    config.split = "test"  # the split to evaluate
    config.limit = ml_collections.config_dict.placeholder(int)  # first N examples only
    config.batch_size = 500  # images per evaluation batch, on each process
    # "timm": the model's pretrained preprocessing; "explicit": the four values below.
    config.preprocess = "explicit"
    config.mean = data.CIFAR10_MEAN  # per-channel mean the images are normalised by (preprocess="explicit")
    config.std = data.CIFAR10_STD  # per-channel standard deviation (preprocess="explicit")
    config.crop_pct = 1.0  # resize to size / crop_pct, then the central crop, as timm (preprocess="explicit")
    config.interpolation = "bicubic"  # the resize's interpolation (preprocess="explicit")

    config.timing_runs = 3  # images/s: median of this many timed batches per r
    config.workdir = "results/eval_cifar10"  # sweep.json, sweep.csv and sweep.png go here

    # Several processes (hosts) each evaluate a share.
    add_distributed(config)
    return config


def model_overrides(**values) -> ml_collections.ConfigDict:
    """Every `tome_jax.ViT` attribute a command line can set, unset (None) but typed, so that
    `--config.model_overrides.<attribute>=` works; `values` set some."""
    fields = {}
    for name, field in ViT.__dataclass_fields__.items():
        kind = next((t for t in (bool, int, float, str) if t.__name__ in str(field.type).split(" | ")[0]), None)
        if str(field.type) == "Any":  # dtype, param_dtype: by name ("bfloat16")
            kind = str
        if kind is not None and name not in ("parent", "name", "dtem", "dtem_dim"):
            fields[name] = ml_collections.config_dict.placeholder(kind)
    overrides = ml_collections.ConfigDict(fields)
    overrides.update(values)
    return overrides


def add_distributed(config: ml_collections.ConfigDict) -> None:
    """jax.distributed.initialize's settings: "auto" when a cluster (SLURM, TPU pod) is
    detected or the three keys are set, "on" always, "off" never."""
    # jax.distributed.initialize: "auto" (a detected cluster, or the three keys below), "on", "off".
    config.distributed = "auto"
    config.coordinator_address = ml_collections.config_dict.placeholder(str)  # "host:port" of process 0
    config.num_processes = ml_collections.config_dict.placeholder(int)  # processes (hosts) in all
    config.process_id = ml_collections.config_dict.placeholder(int)  # 0 .. num_processes - 1


def add_methods(config: ml_collections.ConfigDict) -> None:
    """`config.method = "tome"` and every tome_jax.reduce method's settings under `config.<method>`."""
    # How blocks remove tokens: "tome" (merge on attention keys), or another tome_jax.reduce
    # method, its settings under config.<method>; "dtem" is ToMe on DTEM's learned metric layers.
    config.method = "tome"
    for method, settings in reduce.default_settings().items():
        config[method] = ml_collections.ConfigDict(settings)
