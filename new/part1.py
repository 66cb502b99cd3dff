"""dino_mini: DINOv2 self-supervised pre-training in one readable PyTorch file.

DINOv2 (Oquab et al. 2023, arXiv:2304.07193) trains a Vision Transformer without labels. A student
network learns to match an exponential-moving-average teacher on other crops of the same image (the
DINO loss, arXiv:2104.14294) and to predict the teacher's tokens at masked patches (the iBOT loss,
arXiv:2111.07832), while a KoLeo term spreads the features out (arXiv:1806.03198). The code follows
Meta's facebookresearch/dinov2 formula for formula, with the same names; each place where it
deliberately differs says `# Deviation from official:` and the README lists them all.

Run it:
    python dino_mini.py                                    # CPU demo on built-in shapes, ~5 min
    python dino_mini.py --data ~/my_images                 # official recipe, any folder of images
    torchrun --nproc_per_node 8 dino_mini.py --data /imagenet           # one 8-GPU node
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        dino_mini.py --data /imagenet --output-dir /shared/run1        # the same line on each node
    python dino_mini.py --config vits16_1node --data DIR optim.epochs=10   # a preset + overrides
    python dino_mini.py --visualize img.jpg --pretrained dinov2_vits14_pretrain.pth
    python dino_mini.py --extract-features DIR --pretrained run/teacher_backbone.pth --out f.pt
    python dino_mini.py --benchmark --config vits16_1node

Reading order. Sections 1-9 are the training story, in the order a run uses them; 10-14 are the
machinery around it, which a first reading can skip.
     1. Config              the official defaults, presets, command-line overrides
     2. Processes           torchrun, one all-reduce helper, seeds
     3. Data                multi-crop augmentation, block masks, collate, datasets, sampler
     4. Vision Transformer  DinoVisionTransformer with the official parameter names
     5. Heads               DINOHead: MLP, L2 norm, weight-normalised prototypes
     6. Losses              DINO (centering or Sinkhorn-Knopp), iBOT, KoLeo
     7. SSLMetaArch         one forward-backward: teacher, student, the four losses, EMA
     8. Optimisation        parameter groups with layer-wise decay, the five schedules
     9. Training loop       train_step() is one iteration, train() the whole run
    10. Checkpoints         atomic saves, exact resume, teacher snapshots, loading Meta's weights
    11. Evaluation          kNN monitor, raw-pixel baseline, where the cls token looks
    12. Pictures/features   PCA and attention pictures, feature extraction
    13. Benchmark           FLOPs of a step, the step and the data pipeline timed
    14. Command line        main(): one `dino_mini: error:` line for every bad input
"""

import argparse
import ast
import contextlib
import copy
import datetime
import difflib
import glob
import itertools
import json
import math
import os
import random
import signal
import statistics
import sys
import time
from array import array
from collections import defaultdict, deque
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision import transforms
from torchvision.utils import save_image
from tqdm import tqdm

# -------------------------------------------------------------------------------------------------
# 1. Config (dinov2/configs/ssl_default_config.yaml, dinov2/utils/config.py)
# Same sections, keys and defaults as the official YAML, so a preset can be put beside the official
# file line by line. Keys marked "ours" do not exist there. The defaults are the ImageNet recipe;
# small runs are presets in configs.json.
# -------------------------------------------------------------------------------------------------

DEFAULTS = {
    "compute_precision": {
        "grad_scaler": True,  # fp16 loss scaling, as official (used only when dtype is fp16)
        # ours: auto = fp16 autocast on CUDA (the faithful choice), fp32 on CPU; or fp32/bf16/fp16
        "dtype": "auto",
    },
    "dino": {
        "loss_weight": 1.0,  # > 0 turns the DINO cls-token loss on
        "head_n_prototypes": 65536,  # K, the number of prototypes (the softmax width)
        "head_bottleneck_dim": 256,
        "head_nlayers": 3,
        "head_hidden_dim": 2048,
        "koleo_loss_weight": 0.1,  # > 0 turns KoLeo on (only together with DINO)
    },
    "ibot": {
        "loss_weight": 1.0,  # > 0 turns the masked-patch iBOT loss on
        "mask_sample_probability": 0.5,  # share of the 2B global crops that get a mask
        "mask_ratio_min_max": [0.1, 0.5],  # mask ratios are stratified over this range
        "separate_head": False,  # False: iBOT shares the DINO head
        "head_n_prototypes": 65536,  # the four head_* keys are used only with a separate head
        "head_bottleneck_dim": 256,
        "head_nlayers": 3,
        "head_hidden_dim": 2048,
    },
    "train": {
        "batch_size_per_gpu": 64,  # B; the global batch is B x world size
        "dataset_path": "",  # ours: a folder of images; "" = the built-in shapes dataset
        "output_dir": "./output",
        "seed": 0,  # official seeds with 0 + rank and never reads this key; we use seed + rank
        "num_workers": 10,
        "OFFICIAL_EPOCH_LENGTH": 1250,  # an "epoch" is this many iterations, whatever the data
        "centering": "centering",  # "centering" (DINO's EMA centre) or "sinkhorn_knopp"
        "log_every": 10,  # ours: iterations between log lines (official prints every 10)
        "checkpoint_period": 3750,  # ours: the official PeriodicCheckpointer saves every 3 epochs
        "keep_checkpoints": 3,  # ours: official keeps the last 3
        "compile": False,  # ours: torch.compile the student and teacher backbones
        "freeze_backbone_iterations": 0,  # ours: train only the heads this long (domain transfer)
    },
    "student": {
        "arch": "vit_large",  # vit_small/base/large/giant2 (+ ours: vit_pico, vit_tiny)
        "patch_size": 16,
        "drop_path_rate": 0.3,
        "layerscale": 1.0e-5,  # LayerScale init; 0 turns LayerScale off
        "drop_path_uniform": True,
        "pretrained_weights": "",  # a backbone .pth (Meta's release or ours) to start from
        "ffn_layer": "mlp",  # mlp | swiglu | swiglufused (the same SwiGLU)
        "block_chunks": 0,  # FSDP wrapping only; our keys are always the flat block_chunks=0 ones
        "qkv_bias": True,
        "proj_bias": True,
        "ffn_bias": True,
        "num_register_tokens": 0,  # 4 for the "registers" models (arXiv:2309.16588)
        "interpolate_antialias": False,
        "interpolate_offset": 0.1,
    },
    "teacher": {
        "momentum_teacher": 0.992,  # EMA momentum, cosine-scheduled up to final_momentum_teacher
        "final_momentum_teacher": 1.0,
        "warmup_teacher_temp": 0.04,  # the teacher temperature rises linearly from this ...
        "teacher_temp": 0.07,  # ... to this over warmup_teacher_temp_epochs; > 0.07 is unstable
        "warmup_teacher_temp_epochs": 30,
    },
    "optim": {
        "epochs": 100,  # total iterations = epochs x OFFICIAL_EPOCH_LENGTH
        "weight_decay": 0.04,  # weight decay rises on a cosine from this ...
        "weight_decay_end": 0.4,  # ... to this
        "base_lr": 0.004,  # for a global batch of 1024; scaled by sqrt(global batch / 1024)
        "lr": 0.0,  # filled in by the scaling rule when the run starts
        "warmup_epochs": 10,
        "min_lr": 1.0e-6,
        "clip_grad": 3.0,  # max gradient norm, separately for backbone and each head; 0 = off
        "freeze_last_layer_epochs": 1,  # the prototypes get lr 0 this long
        "scaling_rule": "sqrt_wrt_1024",
        "patch_embed_lr_mult": 0.2,
        "layerwise_decay": 0.9,
        "adamw_beta1": 0.9,
        "adamw_beta2": 0.999,
    },
    "crops": {
        "global_crops_scale": [0.32, 1.0],
        "local_crops_number": 8,
        "local_crops_scale": [0.05, 0.32],
        "global_crops_size": 224,  # also the img_size of the ViT's position-embedding grid
        "local_crops_size": 96,
    },
    "evaluation": {
        "eval_period_iterations": 12500,  # official dumps the teacher this often; we also run kNN
        # ours below: the kNN monitor (official: the separate eval/knn.py, whose defaults these are)
        "knn_train_dataset": "",  # two labelled folders (class sub-folders) for the kNN monitor;
        "knn_val_dataset": "",  # "" = found from --data or the built-in dataset (README)
        "knn_nb": [10, 20, 100, 200],
        "knn_temperature": 0.07,
        "knn_batch_size": 256,
        "knn_n_per_class": 100,  # neighbours per class (eval/knn.py --n-per-class-list; 0 = all)
        "knn_max_images": 10000,  # queries at most (a fixed random subset; 0 = all)
    },
}

CHOICES = {  # keys whose value must be one of a few words
    "compute_precision.dtype": ("auto", "fp32", "bf16", "fp16"),
    "train.centering": ("centering", "sinkhorn_knopp"),
    "student.arch": ("vit_pico", "vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant2"),
    "student.ffn_layer": ("mlp", "swiglu", "swiglufused"),
    "optim.scaling_rule": ("sqrt_wrt_1024",),
}
PAIRS = ("ibot.mask_ratio_min_max", "crops.global_crops_scale", "crops.local_crops_scale")
POSITIVE = ("train.batch_size_per_gpu", "train.OFFICIAL_EPOCH_LENGTH", "optim.epochs",
            "train.log_every", "student.patch_size", "crops.global_crops_size",
            "crops.local_crops_size", "dino.head_n_prototypes", "dino.head_bottleneck_dim",
            "dino.head_hidden_dim", "ibot.head_n_prototypes", "ibot.head_bottleneck_dim",
            "ibot.head_hidden_dim", "teacher.teacher_temp", "teacher.warmup_teacher_temp",
            "train.checkpoint_period", "train.keep_checkpoints", "evaluation.knn_batch_size",
            "evaluation.knn_temperature")
UNIT_INTERVAL = ("ibot.mask_sample_probability", "student.drop_path_rate",
                 "teacher.momentum_teacher", "teacher.final_momentum_teacher",
                 "optim.adamw_beta1", "optim.adamw_beta2")
CONFIGS_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs.json")


class UserError(Exception):
    """A problem with the user's input: main() prints it as one `dino_mini: error: ...` line."""


class Config(dict):
    """A nested dict with attribute access (cfg.optim.base_lr), like the official OmegaConf."""

    def __init__(self, d=()):
        super().__init__({k: Config(v) if isinstance(v, dict) else v for k, v in dict(d).items()})

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key, value):
        self[key] = value


def flat_keys(d, prefix=""):
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    out = {}
    for k, v in d.items():
        out.update(flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def parse_value(text):
    """Command-line text to a Python value: numbers, lists, true/false, or else the text itself."""
    if text.strip().lower() in ("true", "false", "yes", "no", "on", "off"):
        return text.strip().lower() in ("true", "yes", "on")
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def set_key(cfg, dotted, value, origin):
    """cfg[a][b] = value for "a.b", after checking the key exists and the value has its type."""
    valid = flat_keys(DEFAULTS)
    if dotted not in valid:
        close = difflib.get_close_matches(dotted, valid, n=3, cutoff=0.5)
        hint = f"closest valid keys: {', '.join(close)}" if close else "keys look like optim.base_lr"
        raise UserError(f"unknown config key '{dotted}' ({origin}); {hint}")
    default = valid[dotted]
    if isinstance(value, str) and not isinstance(default, str):
        value = parse_value(value)
    if isinstance(default, list):  # [low, high] pairs have two numbers; knn_nb any count of ks
        ok = (isinstance(value, (list, tuple)) and len(value) > 0 and all(map(is_number, value))
              and (len(value) == 2 or dotted not in PAIRS))
    else:
        ok = {bool: lambda v: isinstance(v, bool), str: lambda v: isinstance(v, str),
              int: lambda v: is_number(v) and isinstance(v, int),
              float: is_number}[type(default)](value)
    if not ok:
        raise UserError(f"config key '{dotted}' ({origin}) expects {type(default).__name__} like "
                        f"{json.dumps(default)}, got {value!r}")
    section, key = dotted.split(".")
    cfg[section][key] = (float(value) if isinstance(default, float)
                         else list(value) if isinstance(default, list) else value)


def load_config(name="default", overrides=()):
    """Defaults, then the named preset from configs.json, then "section.key=value" overrides."""
    cfg = Config(copy.deepcopy(DEFAULTS))
    with open(CONFIGS_JSON) as f:
        presets = json.load(f)
    if name not in presets:
        raise UserError(f"unknown --config '{name}'; presets in configs.json: {', '.join(presets)}")
    for dotted, value in flat_keys(presets[name]).items():
        set_key(cfg, dotted, value, f"preset '{name}'")
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' should look like section.key=value")
        dotted, value = item.split("=", 1)
        set_key(cfg, dotted.strip(), value, "command line")
    validate_config(cfg)
    return cfg


def validate_config(cfg):
    """Values of the right type that make no sense are caught here, before any work starts."""
    flat = flat_keys(cfg)
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise UserError(f"config key '{key}' must be one of {', '.join(allowed)}, "
                            f"got {flat[key]!r}")
    for key, value in flat.items():
        if not is_number(value):
            continue
        if key in POSITIVE and not value > 0:
            rule = "> 0"
        elif key in UNIT_INTERVAL and not 0 <= value <= 1:
            rule = "between 0 and 1"
        elif not value >= 0:
            rule = ">= 0"
        else:
            continue
        raise UserError(f"config key '{key}' must be {rule}, got {value}")
    for key in PAIRS:
        lo, hi = flat[key]
        if not 0 <= lo <= hi <= 1:
            raise UserError(f"config key '{key}' must be [low, high] with 0 <= low <= high <= 1, "
                            f"got {flat[key]}")
    if any(not (isinstance(k, int) and k > 0) for k in cfg.evaluation.knn_nb):
        raise UserError(f"evaluation.knn_nb must list positive integers, got {cfg.evaluation.knn_nb}")
    for key in ("crops.global_crops_size", "crops.local_crops_size"):
        if flat[key] % cfg.student.patch_size:
            raise UserError(f"config key '{key}'={flat[key]} is not a multiple of "
                            f"student.patch_size={cfg.student.patch_size}")
    if cfg.optim.warmup_epochs > cfg.optim.epochs:
        raise UserError(f"optim.warmup_epochs={cfg.optim.warmup_epochs} is longer than "
                        f"optim.epochs={cfg.optim.epochs}")
    if cfg.dino.loss_weight <= 0 and cfg.ibot.loss_weight <= 0:
        raise UserError("both dino.loss_weight and ibot.loss_weight are 0: nothing to train")


def apply_scaling_rules(cfg, world_size):
    """The lr actually used: base_lr x sqrt(global batch / 1024) (official sqrt_wrt_1024 rule).
    Written into cfg, so config.json and the checkpoints record it, as official config.yaml does."""
    cfg.optim.lr = cfg.optim.base_lr * math.sqrt(cfg.train.batch_size_per_gpu * world_size / 1024)


# -------------------------------------------------------------------------------------------------
# 2. Processes (dinov2/distributed/__init__.py, dinov2/utils/utils.py:fix_random_seeds)
# Plain `python dino_mini.py` is one process with no process group. torchrun sets RANK, LOCAL_RANK
# and WORLD_SIZE; then we start nccl (GPU) or gloo (CPU). Every collective of the algorithm goes
# through all_reduce_, which does nothing without a group, so the losses also run in one process.
# -------------------------------------------------------------------------------------------------


def setup_distributed():
    """Returns (rank, world_size, device); starts a process group when launched by torchrun."""
    use_cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if use_cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    # a stuck collective fails after 30 minutes instead of hanging for ever
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return dist.get_rank(), dist.get_world_size(), device


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_(tensor, op="sum", async_op=False):
    """In-place all-reduce across ranks; a no-op (returning None) in a plain single process."""
    if get_world_size() == 1:
        return None
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
    return dist.all_reduce(tensor, op=ops[op], async_op=async_op)


def share_from_rank0(make):
    """Run make() on rank 0 only and hand its result, or its UserError, to every rank: one rank
    lists a folder of a million files, not all of them at once on a shared file system."""
    box = [None]
    if get_rank() == 0:
        try:
            box = [(make(), None)]
        except UserError as e:
            box = [(None, str(e))]
    if get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    result, error = box[0]
    if error:
        raise UserError(error)
    return result


def print0(*args, **kwargs):
    """print on rank 0 only, so an 8-GPU run does not say everything 8 times."""
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


def seed_everything(seed):
    """Seed torch (CPU and CUDA) and Python's random, as official fix_random_seeds(0 + rank)."""
    random.seed(seed)
    torch.manual_seed(seed)


def rng_states():
    """This process's random generators, saved per rank in checkpoints."""
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states):
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


@contextlib.contextmanager
def seeded_rng(seed):
    """Run a block with torch's and Python's global generators seeded by `seed`, then put them
    back as they were: the block's randomness depends on the seed alone, not on what ran before in
    this process, and the process's own stream (drop path, say) is left untouched."""
    saved = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(saved)
