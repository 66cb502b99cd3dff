"""dino_mini: DINOv2 self-supervised pre-training in one readable PyTorch file.

DINOv2 (Oquab et al. 2023, arXiv:2304.07193) trains a Vision Transformer without labels: a student
network learns to match an exponential-moving-average teacher on different crops of the same image
(the DINO loss, arXiv:2104.14294), to predict the teacher's tokens at masked patches (the iBOT loss,
arXiv:2111.07832), while a KoLeo term spreads the features out (arXiv:1806.03198). This file follows
Meta's facebookresearch/dinov2 formula for formula; where it deliberately differs, the line says
`# Deviation from official:` and the README lists every such place.

Run it:
    python dino_mini.py                                   # CPU demo: built-in shapes dataset, ~5 min
    python dino_mini.py --data ~/my_images                # official recipe on any folder of images
    torchrun --nproc_per_node 8 dino_mini.py --data /imagenet/train      # one 8-GPU node
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        dino_mini.py --data /imagenet/train                              # run on both nodes
    python dino_mini.py --config vits16_1node --data DIR optim.epochs=10 train.batch_size_per_gpu=32
    python dino_mini.py --visualize img.jpg --pretrained dinov2_vits14_pretrain.pth
    python dino_mini.py --extract-features DIR --pretrained run/teacher_backbone.pth --out f.pt
    python dino_mini.py --benchmark --config vits16_1node

Sections, in reading order:
    1. Config              defaults mirroring ssl_default_config.yaml, presets, command-line overrides
    2. Distributed helpers torchrun detection, one all-reduce helper that is a no-op without a group
    3. Data                multi-crop augmentation, iBOT block masking, mask collate, datasets, loader
    4. Vision Transformer  DinoVisionTransformer with the official parameter names
    5. Heads               DINOHead (MLP, L2 norm, weight-normalised prototypes)
    6. Losses              DINO (centering or Sinkhorn-Knopp), iBOT, KoLeo
    7. Optimisation        parameter groups with layer-wise decay, cosine schedules
    8. Checkpointing       atomic saves, resume, teacher export, loading Meta's weights
    9. Evaluation          kNN monitor, feature extraction, PCA and attention pictures
   10. SSLMetaArch         the train step: teacher, student, losses, backward, EMA
   11. Training           train_step() is one iteration, train() tells the whole run as one story
   12. Benchmark          FLOPs of a step, the step and the data pipeline timed (--benchmark)
   13. Command line       main() is the entry point: training, pictures, features, benchmark
"""

import argparse
import ast
import contextlib
import copy
import difflib
import glob
import json
import math
import os
import random
import signal
import sys
import time
import warnings
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFile
from torchvision import transforms
from tqdm import tqdm

# -------------------------------------------------------------------------------------------------
# 1. Config
# The sections and keys mirror dinov2/configs/ssl_default_config.yaml, with the official defaults, so
# a preset can be put beside the official YAML line by line. Keys marked "ours" do not exist there.
# -------------------------------------------------------------------------------------------------

DEFAULTS = {
    "compute_precision": {
        "grad_scaler": True,  # fp16 loss scaling, as official (only used when dtype is fp16)
        # ours: auto = fp16 autocast on CUDA (the faithful choice), fp32 on CPU; or fp32 | bf16 | fp16
        "dtype": "auto",
    },
    "dino": {
        "loss_weight": 1.0,  # > 0 turns the DINO cls-token loss on
        "head_n_prototypes": 65536,  # K, the number of prototypes (softmax width)
        "head_bottleneck_dim": 256,
        "head_nlayers": 3,
        "head_hidden_dim": 2048,
        "koleo_loss_weight": 0.1,  # > 0 turns KoLeo on (only together with DINO)
    },
    "ibot": {
        "loss_weight": 1.0,  # > 0 turns the masked-patch iBOT loss on
        "mask_sample_probability": 0.5,  # fraction of the 2B global crops that get a mask
        "mask_ratio_min_max": [0.1, 0.5],  # mask ratios are stratified over this range
        "separate_head": False,  # False: iBOT shares the DINO head
        "head_n_prototypes": 65536,  # the four head_* keys are used only with a separate head
        "head_bottleneck_dim": 256,
        "head_nlayers": 3,
        "head_hidden_dim": 2048,
    },
    "train": {
        "batch_size_per_gpu": 64,  # B; the global batch is B * world size
        "dataset_path": "",  # ours: a folder of images; "" = the built-in shapes dataset
        "output_dir": "./output",
        "seed": 0,  # official seeds with 0 + rank and never reads this key; we use seed + rank
        "num_workers": 10,
        "OFFICIAL_EPOCH_LENGTH": 1250,  # an "epoch" is this many iterations, whatever the dataset
        "centering": "centering",  # "centering" (DINO's EMA centre) or "sinkhorn_knopp"
        "log_every": 10,  # ours: iterations between log lines (official prints every 10)
        "checkpoint_period": 3750,  # ours: official PeriodicCheckpointer saves every 3 epochs
        "keep_checkpoints": 3,  # ours: official keeps the last 3
        "compile": False,  # ours: torch.compile the student and teacher backbones
        "freeze_backbone_iterations": 0,  # ours: train only the heads this long (domain adaptation)
    },
    "student": {
        "arch": "vit_large",  # vit_small | vit_base | vit_large | vit_giant2 (+ ours: vit_pico, vit_tiny)
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
        "epochs": 100,  # total iterations = epochs * OFFICIAL_EPOCH_LENGTH
        "weight_decay": 0.04,  # weight decay rises on a cosine from this ...
        "weight_decay_end": 0.4,  # ... to this
        "base_lr": 0.004,  # for a global batch of 1024; scaled by sqrt(global batch / 1024)
        "lr": 0.0,  # filled in by the scaling rule
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
        "knn_train_dataset": "",  # ours: labelled folders (class sub-folders) for the kNN monitor;
        "knn_val_dataset": "",  # "" = the built-in dataset's splits when --data is not given
        "knn_nb": [10, 20, 100, 200],  # ours below: the official eval/knn.py defaults
        "knn_temperature": 0.07,
        "knn_batch_size": 256,
        "knn_max_images": 0,  # ours: use only the first N images of each split (0 = all)
    },
}

CHOICES = {  # keys whose value must be one of a few words
    "compute_precision.dtype": ("auto", "fp32", "bf16", "fp16"),
    "train.centering": ("centering", "sinkhorn_knopp"),
    "student.arch": ("vit_pico", "vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant2"),
    "student.ffn_layer": ("mlp", "swiglu", "swiglufused"),
    "optim.scaling_rule": ("sqrt_wrt_1024",),
}

CONFIGS_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs.json")


class UserError(Exception):
    """A problem with the user's input: main() prints it as one `dino_mini: error: ...` line."""


class Config(dict):
    """A nested dict with attribute access (cfg.optim.base_lr), like the official OmegaConf object."""

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
        if isinstance(v, dict):
            out.update(flat_keys(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def parse_value(text):
    """Command-line text to a Python value: numbers, lists, true/false, or else the string itself."""
    low = text.strip().lower()
    if low in ("true", "false", "yes", "no", "on", "off"):
        return low in ("true", "yes", "on")
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def set_key(cfg, dotted, value, origin):
    """Set cfg[a][b] = value for "a.b", checking the key exists and the value has the default's type."""
    valid = flat_keys(DEFAULTS)
    if dotted not in valid:
        close = difflib.get_close_matches(dotted, valid, n=3, cutoff=0.5)
        hint = f"; closest valid keys: {', '.join(close)}" if close else "; keys look like optim.base_lr"
        raise UserError(f"unknown config key '{dotted}' ({origin}){hint}")
    default = valid[dotted]
    if isinstance(value, str) and not isinstance(default, str):
        value = parse_value(value)
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str),
          list: lambda v: isinstance(v, (list, tuple)) and len(v) == len(default)
          and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)}
    if not ok[type(default)](value):
        raise UserError(f"config key '{dotted}' ({origin}) expects {type(default).__name__} like "
                        f"{json.dumps(default)}, got {value!r}")
    section, key = dotted.split(".")
    cfg[section][key] = float(value) if type(default) is float else list(value) if isinstance(value, tuple) else value


def load_presets():
    with open(CONFIGS_JSON) as f:
        return json.load(f)


def load_config(name="default", overrides=()):
    """Defaults, then the named preset from configs.json, then "section.key=value" overrides."""
    cfg = Config(copy.deepcopy(DEFAULTS))
    presets = load_presets()
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
    """Values that have the right type but make no sense are caught here, before any work starts."""
    flat = flat_keys(cfg)
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise UserError(f"config key '{key}' must be one of {', '.join(allowed)}, got {flat[key]!r}")
    positive = ["train.batch_size_per_gpu", "train.OFFICIAL_EPOCH_LENGTH", "optim.epochs", "train.log_every",
                "student.patch_size", "crops.global_crops_size", "crops.local_crops_size",
                "dino.head_n_prototypes", "dino.head_bottleneck_dim", "dino.head_hidden_dim",
                "ibot.head_n_prototypes", "ibot.head_bottleneck_dim", "ibot.head_hidden_dim",
                "teacher.teacher_temp", "teacher.warmup_teacher_temp", "train.checkpoint_period",
                "train.keep_checkpoints", "evaluation.knn_batch_size", "evaluation.knn_temperature"]
    non_negative = ["train.num_workers", "crops.local_crops_number", "optim.warmup_epochs", "optim.base_lr",
                    "optim.min_lr", "optim.clip_grad", "optim.freeze_last_layer_epochs", "student.layerscale",
                    "student.num_register_tokens", "dino.loss_weight", "dino.koleo_loss_weight",
                    "ibot.loss_weight", "teacher.warmup_teacher_temp_epochs", "train.freeze_backbone_iterations",
                    "evaluation.eval_period_iterations", "evaluation.knn_max_images", "train.seed"]
    for key in positive:
        if not flat[key] > 0:
            raise UserError(f"config key '{key}' must be > 0, got {flat[key]}")
    for key in non_negative:
        if not flat[key] >= 0:
            raise UserError(f"config key '{key}' must be >= 0, got {flat[key]}")
    for key in ["ibot.mask_sample_probability", "student.drop_path_rate", "teacher.momentum_teacher",
                "teacher.final_momentum_teacher", "optim.adamw_beta1", "optim.adamw_beta2"]:
        if not 0 <= flat[key] <= 1:
            raise UserError(f"config key '{key}' must be between 0 and 1, got {flat[key]}")
    for key in ["ibot.mask_ratio_min_max", "crops.global_crops_scale", "crops.local_crops_scale"]:
        lo, hi = flat[key]
        if not 0 <= lo <= hi <= 1:
            raise UserError(f"config key '{key}' must be [low, high] with 0 <= low <= high <= 1, got {flat[key]}")
    p = cfg.student.patch_size
    for key in ["crops.global_crops_size", "crops.local_crops_size"]:
        if flat[key] % p:
            raise UserError(f"config key '{key}'={flat[key]} is not a multiple of student.patch_size={p}")
    if cfg.optim.warmup_epochs > cfg.optim.epochs:
        raise UserError(f"optim.warmup_epochs={cfg.optim.warmup_epochs} is longer than optim.epochs={cfg.optim.epochs}")
    if cfg.dino.loss_weight <= 0 and cfg.ibot.loss_weight <= 0:
        raise UserError("both dino.loss_weight and ibot.loss_weight are 0: nothing to train")


# -------------------------------------------------------------------------------------------------
# 2. Distributed helpers
# Plain `python dino_mini.py` is one process with no process group. torchrun sets RANK, LOCAL_RANK and
# WORLD_SIZE; then we start nccl (GPU) or gloo (CPU). Every collective goes through all_reduce_, which
# does nothing without a group, so the losses below also run in a plain single process.
# -------------------------------------------------------------------------------------------------


def setup_distributed():
    """Returns (rank, local_rank, world_size, device). Starts a process group under torchrun."""
    use_cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 0, 1, torch.device("cuda" if use_cuda else "cpu")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    import datetime  # a stuck collective fails after 30 min instead of hanging for ever

    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return rank, local_rank, dist.get_world_size(), device


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


def print0(*args, **kwargs):
    """print on rank 0 only, so an 8-GPU run does not say everything 8 times."""
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


# -------------------------------------------------------------------------------------------------
# 3. Data
# Multi-crop augmentation (dinov2/data/augmentations.py), block-wise masking for iBOT (masking.py),
# the collate that batches crops and masks (collate.py), datasets and an infinite sharded sampler.
# -------------------------------------------------------------------------------------------------

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class DataAugmentationDINO:
    """Two global crops and `local_crops_number` local crops of one image (DINOv2 paper, sec. 4)."""

    def __init__(self, global_crops_scale, local_crops_scale, local_crops_number, global_crops_size=224,
                 local_crops_size=96):
        self.local_crops_number = local_crops_number
        bicubic = transforms.InterpolationMode.BICUBIC
        self.geometric_augmentation_global = transforms.Compose([
            transforms.RandomResizedCrop(global_crops_size, scale=global_crops_scale, interpolation=bicubic),
            transforms.RandomHorizontalFlip(p=0.5)])
        self.geometric_augmentation_local = transforms.Compose([
            transforms.RandomResizedCrop(local_crops_size, scale=local_crops_scale, interpolation=bicubic),
            transforms.RandomHorizontalFlip(p=0.5)])
        color_jittering = transforms.Compose([
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2)])

        # Gaussian blur: the official GaussianBlur(p) wraps RandomApply(p=1 - p), so the probabilities
        # written there (1.0, 0.1, 0.5) are inverted. The released models were trained with what the
        # code did, not with what it says: no blur on global crop 1, blur 90% of the time on global
        # crop 2, 50% on local crops. We write the effective values. The p=0.0 RandomApply still draws
        # its random number, so the random stream stays aligned with the official pipeline.
        def blur(p):
            return transforms.RandomApply([transforms.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))], p=p)

        normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.global_transfo1 = transforms.Compose([color_jittering, blur(0.0), normalize])
        self.global_transfo2 = transforms.Compose([color_jittering, blur(0.9),
                                                   transforms.RandomSolarize(threshold=128, p=0.2), normalize])
        self.local_transfo = transforms.Compose([color_jittering, blur(0.5), normalize])

    def __call__(self, image):
        global_crop_1 = self.global_transfo1(self.geometric_augmentation_global(image))
        global_crop_2 = self.global_transfo2(self.geometric_augmentation_global(image))
        local_crops = [self.local_transfo(self.geometric_augmentation_local(image))
                       for _ in range(self.local_crops_number)]
        return {"global_crops": [global_crop_1, global_crop_2],
                "global_crops_teacher": [global_crop_1, global_crop_2],  # the teacher sees the same two
                "local_crops": local_crops, "offsets": ()}


def make_augmentation(cfg):
    """The multi-crop augmentation with the crop settings of cfg.crops."""
    return DataAugmentationDINO(cfg.crops.global_crops_scale, cfg.crops.local_crops_scale,
                                cfg.crops.local_crops_number, cfg.crops.global_crops_size, cfg.crops.local_crops_size)


class MaskingGenerator:
    """Block-wise masks for iBOT (BEiT, arXiv:2106.08254): rectangles of random area and aspect ratio
    are added until the target number of patches is masked. Never masks more than the target."""

    def __init__(self, input_size, max_num_patches=None, min_num_patches=4, min_aspect=0.3, max_aspect=None):
        self.height, self.width = input_size if isinstance(input_size, tuple) else (input_size, input_size)
        self.max_num_patches = max_num_patches if max_num_patches is not None else self.height * self.width
        self.min_num_patches = min_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def _mask(self, mask, max_mask_patches):
        """Try up to 10 random rectangles; keep the first that adds new masked patches."""
        delta = 0
        for _ in range(10):
            target_area = random.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(random.uniform(*self.log_aspect_ratio))  # log-uniform aspect
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = random.randint(0, self.height - h)
                left = random.randint(0, self.width - w)
                box = mask[top:top + h, left:left + w]
                new = h * w - int(box.sum())
                if 0 < new <= max_mask_patches:  # the box must add something without overshooting
                    box.fill_(True)
                    delta += new
            if delta > 0:
                break
        return delta

    def __call__(self, num_masking_patches=0):
        # Deviation from official: returns a torch bool tensor instead of a numpy array (same values).
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)  # (H, W) in patches
        mask_count = 0
        while mask_count < num_masking_patches:
            max_mask_patches = min(num_masking_patches - mask_count, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches)
            if delta == 0:
                break
            mask_count += delta
        return mask


def collate_data_and_cast(samples_list, mask_ratio_tuple, mask_probability, dtype, n_tokens=None,
                          mask_generator=None):
    """Stack crops crop-major ([view 1 of all images; view 2 of all images]) and draw iBOT masks for a
    fraction of the 2B global crops, with mask ratios stratified over `mask_ratio_tuple`. Each sample
    is (crops dict, label, ...); labels are ignored: pre-training is self-supervised."""
    n_global_crops = len(samples_list[0][0]["global_crops"])
    n_local_crops = len(samples_list[0][0]["local_crops"])
    collated_global_crops = torch.stack([s[0]["global_crops"][i] for i in range(n_global_crops) for s in samples_list])
    collated_local_crops = (torch.stack([s[0]["local_crops"][i] for i in range(n_local_crops) for s in samples_list])
                            if n_local_crops else torch.zeros(0))
    B = len(collated_global_crops)  # 2 * images: every global crop is a candidate for masking
    N = n_tokens
    n_samples_masked = int(B * mask_probability)
    probs = torch.linspace(*mask_ratio_tuple, n_samples_masked + 1)  # ratio bins, one per masked crop
    upperbound = 0  # static size of the masked-token buffers (a bound on the masked count)
    masks_list = []
    for i in range(n_samples_masked):
        prob_min, prob_max = probs[i], probs[i + 1]
        masks_list.append(mask_generator(int(N * random.uniform(prob_min, prob_max))))
        upperbound += int(N * prob_max)
    for _ in range(n_samples_masked, B):
        masks_list.append(mask_generator(0))
    random.shuffle(masks_list)  # masks land on random crops of either view
    collated_masks = torch.stack(masks_list).flatten(1)  # (2B, N) bool
    mask_indices_list = collated_masks.flatten().nonzero().flatten()  # into the (2B * N) patch tokens
    # each masked token weighs 1 / (masked tokens in its crop): every masked crop counts the same
    masks_weight = (1 / collated_masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(collated_masks)[collated_masks]
    out = {
        "collated_global_crops": collated_global_crops.to(dtype),  # (2B, 3, G, G)
        "collated_local_crops": collated_local_crops.to(dtype),  # (L*B, 3, l, l)
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "upperbound": upperbound,
        "n_masked_patches": torch.full((1,), fill_value=mask_indices_list.shape[0], dtype=torch.long),
    }
    # ours: samples may carry a third field, how many unreadable files were skipped to produce them
    out["n_skipped"] = sum(s[2] for s in samples_list if len(s) > 2)
    return out


def load_rgb(path):
    """Open any image as 8-bit RGB: grayscale, palette, alpha, CMYK and 16-bit files all work."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()  # decode now, so a truncated file fails here and not later in a transform
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit or float: rescale to 0..255
        img = img.convert("F")
        lo, hi = img.getextrema()
        img = img.point(lambda v: (v - lo) * (255.0 / max(hi - lo, 1e-6))).convert("L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def find_images(root):
    """All image files under root (recursively, sorted, so the order is the same on every rank).
    The first-level sub-folder is the class label; images directly under root get label 0."""
    # Deviation from official: any image folder; official reads ImageNet through labels.txt and
    # pre-computed entries-*.npy files (dinov2 issues #126, #243).
    if not os.path.exists(root):
        raise UserError(f"data folder '{root}' does not exist")
    if not os.path.isdir(root):
        raise UserError(f"'{root}' is a file; --data and the kNN datasets take a folder of images")
    paths = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        paths += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS)]
    if not paths:
        raise UserError(f"no images found in '{root}' (searched recursively for {', '.join(IMG_EXTENSIONS)})")
    classes = sorted({os.path.relpath(p, root).split(os.sep)[0] for p in paths if os.sep in os.path.relpath(p, root)})
    index = {c: i for i, c in enumerate(classes)}
    labels = [index.get(os.path.relpath(p, root).split(os.sep)[0], 0) for p in paths]
    return paths, labels, classes


class ImageFolderDataset(torch.utils.data.Dataset):
    """Any folder of images, with or without class sub-folders. ImageNet's train/ works as it is.
    An unreadable or truncated file is skipped (the next image is used instead) and counted."""

    def __init__(self, root, transform, max_images=0):
        self.paths, self.labels, self.classes = find_images(root)
        if max_images:
            keep = torch.randperm(len(self.paths), generator=torch.Generator().manual_seed(0))[:max_images]
            keep = sorted(keep.tolist())
            self.paths, self.labels = [self.paths[i] for i in keep], [self.labels[i] for i in keep]
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        for skipped in range(min(len(self.paths), 100)):
            i = (index + skipped) % len(self.paths)
            try:
                img = load_rgb(self.paths[i])
            except Exception as e:  # noqa: BLE001 - any decoder error means "skip this file"
                print(f"dino_mini: warning: skipping unreadable image {self.paths[i]} ({e})", file=sys.stderr)
                continue
            return self.transform(img), self.labels[i], skipped
        raise UserError(f"{min(len(self.paths), 100)} unreadable images in a row near {self.paths[index]}; "
                        f"is this a folder of images?")


SHAPES = ("disk", "ring", "triangle", "square", "star", "cross", "bars", "dots", "half_disk", "ell")


class ShapesDataset(torch.utils.data.Dataset):
    """Ours: a labelled dataset drawn on the fly with PIL, so `python dino_mini.py` needs no download.
    Ten shape classes at a random position and size, nearly upright, with random brightness, a faint
    random tint and a blotchy background. Image i is the same on every call.
    Why nuisances only this strong: DINO learns whatever stays the same across two crops of an image.
    A random hue per image would survive the official colour jitter and become the easiest thing to
    learn, drowning the shape (our measurements: kNN stayed at chance); brightness and faint tints are
    within what the augmentations vary, so the shape is what the crops share."""

    def __init__(self, n_images, transform, size=48, seed=0):
        self.n_images, self.transform, self.size, self.seed = n_images, transform, size, seed
        self.classes = list(SHAPES)

    def __len__(self):
        return self.n_images

    def draw(self, index):
        rng = random.Random(self.seed * 1_000_003 + index)
        label = index % len(SHAPES)  # balanced classes
        s = self.size

        def tone(lo, hi):  # a random brightness with a faint random tint
            v = rng.uniform(lo, hi)
            return tuple(int(min(255, max(0, v + rng.uniform(-20, 20)))) for _ in range(3))

        img = Image.new("RGB", (s, s), tone(0, 90))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.randrange(3, 8)):  # background texture: faint random blobs
            x, y, r0 = rng.uniform(0, s), rng.uniform(0, s), rng.uniform(2, 8)
            draw.ellipse([x - r0, y - r0, x + r0, y + r0], fill=tone(0, 110))
        mask = Image.new("L", (s, s), 0)
        draw = ImageDraw.Draw(mask)
        r = rng.uniform(0.3, 0.45) * s  # shape radius
        cx, cy = rng.uniform(r, s - r), rng.uniform(r, s - r)
        angle = rng.uniform(-0.3, 0.3)  # nearly upright: a rotation is no augmentation, it would be learned

        def poly(points):  # points in units of r around the centre, rotated, then filled
            c, si = math.cos(angle), math.sin(angle)
            draw.polygon([(cx + r * (x * c - y * si), cy + r * (x * si + y * c)) for x, y in points], fill=255)

        def disk(x, y, radius, value=255):
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=value)

        shape = SHAPES[label]
        if shape in ("disk", "ring"):
            disk(cx, cy, r)
            if shape == "ring":
                disk(cx, cy, r / 2, 0)
        elif shape == "triangle":
            poly([(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
        elif shape == "square":
            poly([(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)])
        elif shape == "star":
            poly([(math.cos(math.pi * k / 5 - math.pi / 2) * (1 if k % 2 == 0 else 0.4),
                   math.sin(math.pi * k / 5 - math.pi / 2) * (1 if k % 2 == 0 else 0.4)) for k in range(10)])
        elif shape == "cross":
            poly([(-1, -.3), (-.3, -.3), (-.3, -1), (.3, -1), (.3, -.3), (1, -.3), (1, .3), (.3, .3), (.3, 1),
                  (-.3, 1), (-.3, .3), (-1, .3)])
        elif shape == "bars":
            poly([(-1, -1), (-.4, -1), (-.4, 1), (-1, 1)])
            poly([(.4, -1), (1, -1), (1, 1), (.4, 1)])
        elif shape == "dots":
            for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6):
                disk(cx + 0.6 * r * math.cos(a + angle), cy + 0.6 * r * math.sin(a + angle), 0.38 * r)
        elif shape == "half_disk":
            poly([(math.cos(math.pi * k / 12), math.sin(math.pi * k / 12)) for k in range(13)])
        else:  # "ell"
            poly([(-1, -1), (-.4, -1), (-.4, .4), (1, .4), (1, 1), (-1, 1)])
        img.paste(Image.new("RGB", (s, s), tone(150, 255)), (0, 0), mask)
        return img, label

    def __getitem__(self, index):
        img, label = self.draw(index)
        return self.transform(img), label, 0


def make_knn_data(cfg):
    """(neighbours, queries) for the kNN monitor: the two labelled folders named in the config; else
    the built-in dataset's splits without --data; else a held-out split of a labelled --data folder."""
    ev, eval_t = cfg.evaluation, make_eval_transform(cfg.crops.global_crops_size)
    if ev.knn_train_dataset or ev.knn_val_dataset:
        if not (ev.knn_train_dataset and ev.knn_val_dataset):
            raise UserError("set both evaluation.knn_train_dataset and evaluation.knn_val_dataset")
        return (ImageFolderDataset(ev.knn_train_dataset, eval_t, ev.knn_max_images),
                ImageFolderDataset(ev.knn_val_dataset, eval_t, ev.knn_max_images))
    if not cfg.train.dataset_path:
        return tuple(make_dataset("", eval_t, split, ev.knn_max_images) for split in ("train", "val"))
    return held_out_knn_split(cfg)


def held_out_knn_split(cfg, max_train=10000, max_val=2000):
    """Ours: when --data has class sub-folders and no kNN datasets are named, the kNN monitor uses a
    fixed random split of it: 20% (at most max_val images) as queries, the rest (at most max_train)
    as neighbours. Pre-training still sees every image; it never sees the labels."""
    dataset = ImageFolderDataset(cfg.train.dataset_path, make_eval_transform(cfg.crops.global_crops_size))
    if len(dataset.classes) < 2 or len(dataset) < 10:
        return None
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    n_val = min(len(dataset) // 5, max_val)
    val, train = sorted(perm[:n_val]), sorted(perm[n_val:n_val + max_train])
    print0(f"kNN monitor: {len(train)} / {len(val)} images of '{cfg.train.dataset_path}' "
           f"({len(dataset.classes)} classes) as neighbours / queries")
    return torch.utils.data.Subset(dataset, train), torch.utils.data.Subset(dataset, val)


def make_eval_transform(crop_size):
    """Official classification eval transform: Resize(256) + CenterCrop(224), scaled to crop_size."""
    return transforms.Compose([
        transforms.Resize(round(crop_size * 256 / 224), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(crop_size), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def make_dataset(path, transform, split="train", max_images=0):
    """A folder of images, or (path "") the built-in shapes: 2000 train and 500 val images."""
    if path:
        return ImageFolderDataset(path, transform, max_images)
    n = {"train": 2000, "val": 500}[split]
    return ShapesDataset(min(n, max_images) if max_images else n, transform, seed={"train": 0, "val": 1}[split])


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless stream of dataset indices for one rank (official SHARDED_INFINITE semantics): each pass
    is a fresh permutation seeded by (seed, pass), sharded as perm[rank::world_size]. `start` skips
    the first `start` indices of this rank's stream, so a resumed run continues where it stopped."""

    def __init__(self, size, seed=0, rank=0, world_size=1, start=0):
        self.size, self.seed, self.rank, self.world_size, self.start = size, seed, rank, world_size, start

    def __iter__(self):
        per_pass = len(range(self.rank, self.size, self.world_size))
        n_pass, offset = divmod(self.start, per_pass)
        while True:
            g = torch.Generator().manual_seed(self.seed + (n_pass << 24))
            perm = torch.randperm(self.size, generator=g)[self.rank::self.world_size]
            yield from perm[offset:].tolist()
            n_pass, offset = n_pass + 1, 0


def make_pretrain_loader(cfg, dataset, start_iter, rank, world_size):
    n_tokens = (cfg.crops.global_crops_size // cfg.student.patch_size) ** 2
    grid = cfg.crops.global_crops_size // cfg.student.patch_size
    mask_generator = MaskingGenerator(input_size=(grid, grid), max_num_patches=0.5 * n_tokens)
    collate_fn = partial(collate_data_and_cast, mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
                         mask_probability=cfg.ibot.mask_sample_probability, dtype=torch.float32,
                         n_tokens=n_tokens, mask_generator=mask_generator)
    B = cfg.train.batch_size_per_gpu
    sampler = InfiniteSampler(len(dataset), seed=cfg.train.seed, rank=rank, world_size=world_size,
                              start=start_iter * B)
    # worker RNGs derive from this generator: different per rank, repeatable across runs
    # Deviation from official: the sampler is seeded by train.seed and resumes mid-stream; official
    # seeds it with the start iteration, so its data order changes on resume.
    g = torch.Generator().manual_seed(cfg.train.seed + 1000 * rank + start_iter)
    workers = cfg.train.num_workers
    # Deviation from official: crops stay fp32 (autocast casts them); official collates them to fp16.
    return torch.utils.data.DataLoader(
        dataset, batch_size=B, sampler=sampler, num_workers=workers, collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available(), drop_last=True, persistent_workers=workers > 0, generator=g)


# -------------------------------------------------------------------------------------------------
# 4. Vision Transformer (dinov2/models/vision_transformer.py and dinov2/layers/*)
# Parameter names equal the official block_chunks=0 model's, so Meta's released backbones load with
# strict=True and our exported teachers load into theirs.
# -------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Cut the image into p x p patches and project each to D dims with one strided convolution."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.Identity()

    def forward(self, x):
        H, W = x.shape[-2:]
        p = self.patch_size[0]
        assert H % p == 0 and W % p == 0, f"image size {H}x{W} is not a multiple of the patch size {p}"
        x = self.proj(x)  # (B, D, H/p, W/p)
        return self.norm(x.flatten(2).transpose(1, 2))  # (B, N, D), patches in row-major order


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, proj_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x, return_attention=False):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, C/heads)
        if return_attention:  # the softmax weights themselves, for the attention pictures
            return ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, N, N)
        # Deviation from official: PyTorch's fused attention (flash / memory-efficient kernels on GPU)
        # instead of xformers; the official non-xformers path calls the same function (older releases:
        # an explicit softmax, which we measured no faster on CPU, README "Speed").
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, C/heads); no (N, N) matrix kept on GPU
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, bias=True):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFNFused(nn.Module):
    """SwiGLU feed-forward (used by ViT-g): w3(silu(a) * b) with a, b = w12(x) split in two. The hidden
    width is 2/3 of the MLP's, rounded up to a multiple of 8 (4096 for ViT-g, 2736 for ViT-L)."""

    def __init__(self, in_features, hidden_features, bias=True):
        super().__init__()
        hidden = (int(hidden_features * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(in_features, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, in_features, bias=bias)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class LayerScale(nn.Module):
    """Per-channel residual scale gamma, initialised small (1e-5) so deep nets start near identity."""

    def __init__(self, dim, init_values=1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


def drop_add_residual_stochastic_depth(x, residual_func, sample_drop_ratio):
    """Stochastic depth, official "batch subset" flavour: compute the residual branch for a random
    subset of int(b * (1 - ratio)) samples only, and add it back scaled by b / subset_size. Cheaper than
    masking per sample, and the same in expectation."""
    b = x.shape[0]
    subset = max(int(b * (1 - sample_drop_ratio)), 1)
    brange = torch.randperm(b, device=x.device)[:subset]
    residual = residual_func(x[brange])  # (subset, N, D)
    out = torch.index_add(x.flatten(1), 0, brange, residual.flatten(1).to(x.dtype), alpha=b / subset)
    return out.view_as(x)


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, proj_bias=True, ffn_bias=True,
                 drop_path=0.0, init_values=None, ffn_layer="mlp"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        ffn = Mlp if ffn_layer == "mlp" else SwiGLUFFNFused
        self.mlp = ffn(dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.sample_drop_ratio = drop_path

    def forward(self, x):
        def attn_residual(x):
            return self.ls1(self.attn(self.norm1(x)))

        def ffn_residual(x):
            return self.ls2(self.mlp(self.norm2(x)))

        if self.training and self.sample_drop_ratio > 0:
            # Deviation from official: the subset drop path for any rate > 0. The official student runs
            # through xformers nested tensors, which do exactly this; its plain-tensor path would use
            # per-sample Bernoulli masks for rates <= 0.1. Each call draws its own subset, so the
            # global and local crop groups and the two branches get independent draws, as official.
            x = drop_add_residual_stochastic_depth(x, attn_residual, self.sample_drop_ratio)
            return drop_add_residual_stochastic_depth(x, ffn_residual, self.sample_drop_ratio)
        x = x + attn_residual(x)
        return x + ffn_residual(x)


class DinoVisionTransformer(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=True, ffn_bias=True, proj_bias=True, drop_path_rate=0.0,
                 drop_path_uniform=False, init_values=None, ffn_layer="mlp", block_chunks=0,
                 num_register_tokens=0, interpolate_antialias=False, interpolate_offset=0.1):
        super().__init__()
        # block_chunks is accepted for the official signature; it only grouped blocks for FSDP.
        # Deviation from official: blocks are always stored flat (official block_chunks=0 key layout).
        assert ffn_layer in ("mlp", "swiglu", "swiglufused"), f"unknown ffn_layer {ffn_layer}"
        self.num_features = self.embed_dim = embed_dim
        self.num_tokens = 1
        self.n_blocks = depth
        self.chunked_blocks = False
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_tokens, embed_dim))
        self.register_tokens = (nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
                                if num_register_tokens else None)
        dpr = [drop_path_rate] * depth if drop_path_uniform else torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, proj_bias, ffn_bias, dpr[i], init_values, ffn_layer)
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # replaces masked patch embeddings
        self.init_weights()

    def init_weights(self):
        """Official init: pos_embed N(0, 0.02) (truncation at +-2 absolute, i.e. none in practice), cls and
        register tokens N(0, 1e-6), every Linear trunc_normal(0.02) with zero bias; the patch-embed conv
        and the LayerNorms keep PyTorch's defaults; mask_token starts at zero."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, x, w, h):
        """Resize the learned position grid to the input's patch grid (bicubic, in fp32). w is the
        image height and h its width, as in the official code. The 0.1 offset (DINO v1's trick against
        floating-point rounding) makes PyTorch sample with the given scale factors, which differs
        slightly from asking for the output size; the register models use size + antialias instead."""
        previous_dtype = x.dtype
        npatch, N = x.shape[1] - 1, self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        pos_embed = self.pos_embed.float()
        class_pos_embed, patch_pos_embed = pos_embed[:, 0], pos_embed[:, 1:]
        dim = x.shape[-1]
        w0, h0 = w // self.patch_size, h // self.patch_size
        M = int(math.sqrt(N))
        assert N == M * M, "the stored position embedding must be a square grid"
        if self.interpolate_offset:
            off = self.interpolate_offset
            kwargs = {"scale_factor": (float(w0 + off) / M, float(h0 + off) / M)}
        else:
            kwargs = {"size": (w0, h0)}
        patch_pos_embed = F.interpolate(patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2), mode="bicubic",
                                        antialias=self.interpolate_antialias, **kwargs)
        assert (w0, h0) == patch_pos_embed.shape[-2:]
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)

    def prepare_tokens_with_masks(self, x, masks=None):
        B, _, w, h = x.shape
        x = self.patch_embed(x)  # (B, N, D)
        if masks is not None:  # (B, N) bool: masked patches become the learned mask token ...
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # (B, 1 + N, D)
        x = x + self.interpolate_pos_encoding(x, w, h)  # ... and still get their position embedding
        if self.register_tokens is not None:  # registers go after cls and get no position embedding
            x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
        return x  # (B, 1 + R + N, D)

    def forward_features(self, x, masks=None):
        if isinstance(x, list):  # official: one packed xformers call; here one call per crop group
            masks = masks if masks is not None else [None] * len(x)
            return [self.forward_features(xi, mi) for xi, mi in zip(x, masks)]
        x = self.prepare_tokens_with_masks(x, masks)
        for blk in self.blocks:
            x = blk(x)
        x_norm = self.norm(x)
        R = self.num_register_tokens
        return {"x_norm_clstoken": x_norm[:, 0],  # (B, D)
                "x_norm_regtokens": x_norm[:, 1:R + 1],  # (B, R, D)
                "x_norm_patchtokens": x_norm[:, R + 1:],  # (B, N, D)
                "x_prenorm": x, "masks": masks}

    def get_intermediate_layers(self, x, n=1, reshape=False, return_class_token=False, norm=True):
        """Outputs of the last n blocks (or of the blocks listed in n), for linear probes and pictures."""
        B, _, H, W = x.shape
        x = self.prepare_tokens_with_masks(x)
        take = range(len(self.blocks) - n, len(self.blocks)) if isinstance(n, int) else n
        outputs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in take:
                outputs.append(x)
        assert len(outputs) == len(take), f"only {len(outputs)} / {len(take)} blocks found"
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        outputs = [out[:, 1 + self.num_register_tokens:] for out in outputs]
        if reshape:
            p = self.patch_size
            outputs = [o.reshape(B, H // p, W // p, -1).permute(0, 3, 1, 2).contiguous() for o in outputs]
        if return_class_token:
            return tuple(zip(outputs, class_tokens))
        return tuple(outputs)

    def get_last_self_attention(self, x):
        """Ours: softmax attention of the last block, (B, heads, T, T) with T = 1 + R + N tokens."""
        x = self.prepare_tokens_with_masks(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.blocks[-1].attn(self.blocks[-1].norm1(x), return_attention=True)

    def forward(self, *args, is_training=False, **kwargs):
        ret = self.forward_features(*args, **kwargs)
        return ret if is_training else self.head(ret["x_norm_clstoken"])


VIT_SIZES = {  # name: (embed_dim, depth, num_heads); pico and tiny are ours, for CPU runs
    "vit_pico": (128, 4, 4),
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_giant2": (1536, 40, 24),  # head dim 64
}


def _vit(arch, patch_size=16, **kwargs):
    embed_dim, depth, num_heads = VIT_SIZES[arch]
    return DinoVisionTransformer(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                                 mlp_ratio=4, **kwargs)


vit_pico = partial(_vit, "vit_pico")
vit_tiny = partial(_vit, "vit_tiny")
vit_small = partial(_vit, "vit_small")
vit_base = partial(_vit, "vit_base")
vit_large = partial(_vit, "vit_large")
vit_giant2 = partial(_vit, "vit_giant2")


def build_backbone(cfg, drop_path=True):
    """The student or teacher ViT from cfg.student (official models/__init__.py:build_model)."""
    kwargs = dict(img_size=cfg.crops.global_crops_size, patch_size=cfg.student.patch_size,
                  init_values=cfg.student.layerscale, ffn_layer=cfg.student.ffn_layer,
                  qkv_bias=cfg.student.qkv_bias, proj_bias=cfg.student.proj_bias, ffn_bias=cfg.student.ffn_bias,
                  num_register_tokens=cfg.student.num_register_tokens,
                  interpolate_offset=cfg.student.interpolate_offset,
                  interpolate_antialias=cfg.student.interpolate_antialias)
    if drop_path:
        kwargs.update(drop_path_rate=cfg.student.drop_path_rate, drop_path_uniform=cfg.student.drop_path_uniform)
    return _vit(cfg.student.arch, **kwargs)


# -------------------------------------------------------------------------------------------------
# 5. Heads (dinov2/layers/dino_head.py)
# -------------------------------------------------------------------------------------------------


class WeightNormLinear(nn.Module):
    """Linear layer without bias whose weight is g * v / ||v|| per output row (Salimans & Kingma 2016).
    Same parameters (weight_g (K, 1), weight_v (K, in)) and maths as torch.nn.utils.weight_norm, which
    the official head uses and PyTorch has deprecated."""

    def __init__(self, in_features, out_features):
        super().__init__()
        v = nn.Linear(in_features, out_features, bias=False).weight.detach()  # PyTorch's default init
        self.weight_g = nn.Parameter(v.norm(dim=1, keepdim=True))
        self.weight_v = nn.Parameter(v.clone())

    def forward(self, x):
        weight = self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))  # (K, in)
        return F.linear(x, weight)


class DINOHead(nn.Module):
    """Projection head: MLP -> L2-normalise -> weight-normalised linear onto K prototypes (the logits)."""

    def __init__(self, in_dim, out_dim, use_bn=False, nlayers=3, hidden_dim=2048, bottleneck_dim=256, mlp_bias=True):
        super().__init__()
        assert not use_bn, "the official recipe uses no batch norm in the head"
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            layers = [nn.Linear(in_dim, bottleneck_dim, bias=mlp_bias)]
        else:  # Linear-GELU, (Linear-GELU) * (nlayers - 2), Linear: keys mlp.0, mlp.2, mlp.4
            layers = [nn.Linear(in_dim, hidden_dim, bias=mlp_bias), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim, bias=mlp_bias), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=mlp_bias))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        # g starts at 1 and, unlike DINO v1's norm_last_layer, stays trainable (official quirk)
        self.last_layer.weight_g.data.fill_(1)

    def forward(self, x):
        x = self.mlp(x)  # (T, bottleneck)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12  # 1e-12 underflows in fp16
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)  # (T, K) logits


# -------------------------------------------------------------------------------------------------
# 6. Losses (dinov2/loss/dino_clstoken_loss.py, ibot_patch_loss.py, koleo_loss.py)
# The teacher's head output becomes a target distribution, either by subtracting a running centre and
# sharpening with a low temperature (DINO), or by Sinkhorn-Knopp (SwAV, arXiv:2006.09882), which
# balances how often each prototype is used. The student is trained by cross-entropy to that target.
# -------------------------------------------------------------------------------------------------


@torch.no_grad()
def sinkhorn_knopp(teacher_output, teacher_temp, n_rows_total, n_iterations=3):
    """Turn teacher logits (n, K) into targets whose rows sum to 1 while, over the global batch of
    n_rows_total rows, every prototype receives the same total mass 1/K. Alternates row and column
    normalisation of Q = exp(z / T) (no max-subtraction, as official); sums are global across ranks."""
    Q = torch.exp(teacher_output.float() / teacher_temp).t()  # (K, n)
    K = Q.shape[0]
    sum_Q = torch.sum(Q)
    all_reduce_(sum_Q)  # global across ranks in the official code
    Q /= sum_Q
    for _ in range(n_iterations):
        sum_of_rows = torch.sum(Q, dim=1, keepdim=True)  # mass per prototype
        all_reduce_(sum_of_rows)  # global across ranks in the official code
        Q /= sum_of_rows
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)  # mass per sample
        Q /= n_rows_total
    Q *= n_rows_total  # rows (samples) sum to one
    return Q.t()  # (n, K)


class CenteredTeacherLoss(nn.Module):
    """What DINOLoss and iBOTPatchLoss share: the teacher centre, an EMA of the teacher logits. It is
    updated one iteration late: update_center() starts an (async) all-reduce of this batch's sum, and
    the next softmax_center_teacher() call waits for it and applies c <- m c + (1 - m) batch mean."""

    def __init__(self, center_shape, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(center_shape))
        self.updated = True
        self.reduce_handle = None
        self.len_teacher_output = None
        self.async_batch_center = None

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output, teacher_temp):
        self.apply_center_update()  # the centre from the previous iterations' teacher batches
        return F.softmax((teacher_output - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def start_center_update(self, batch_sum, n_rows):
        self.updated = False
        self.len_teacher_output = n_rows
        self.async_batch_center = batch_sum
        self.reduce_handle = all_reduce_(self.async_batch_center, async_op=True)  # global in the official code

    @torch.no_grad()
    def apply_center_update(self):
        if self.updated is False:
            if self.reduce_handle is not None:
                self.reduce_handle.wait()
            _t = self.async_batch_center / (self.len_teacher_output * get_world_size())
            self.center = self.center * self.center_momentum + _t * (1 - self.center_momentum)
            self.updated = True


class DINOLoss(CenteredTeacherLoss):
    """Cross-entropy between sharpened teacher targets and the student's cls-token distributions."""

    def __init__(self, out_dim, student_temp=0.1, center_momentum=0.9):
        super().__init__((1, out_dim), student_temp, center_momentum)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output, teacher_temp, n_iterations=3):
        n_rows_total = teacher_output.shape[0] * get_world_size()  # 2B * W
        return sinkhorn_knopp(teacher_output, teacher_temp, n_rows_total, n_iterations)

    def forward(self, student_output_list, teacher_out_softmaxed_centered_list):
        """Sum over (student, teacher) pairs of the batch-mean cross-entropy. No averaging over pairs."""
        total_loss = 0
        for s in student_output_list:
            lsm = F.log_softmax(s / self.student_temp, dim=-1)
            for t in teacher_out_softmaxed_centered_list:
                total_loss = total_loss - torch.sum(t * lsm, dim=-1).mean()
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        """The centre moves towards the mean teacher logits over the global batch (2B * W rows)."""
        self.start_center_update(torch.sum(teacher_output, dim=0, keepdim=True), len(teacher_output))


class iBOTPatchLoss(CenteredTeacherLoss):
    """Masked image modelling against the teacher: the student sees masked patches, the teacher the
    same crop unmasked; at each masked position the student predicts the teacher's target distribution."""

    def __init__(self, patch_out_dim, student_temp=0.1, center_momentum=0.9):
        super().__init__((1, 1, patch_out_dim), student_temp, center_momentum)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output, teacher_temp, n_masked_patches_tensor, n_iterations=3):
        n_rows_total = n_masked_patches_tensor.clone()
        all_reduce_(n_rows_total)  # masked tokens over all ranks (official reduces in place, unguarded)
        return sinkhorn_knopp(teacher_output, teacher_temp, n_rows_total, n_iterations)

    def forward_masked(self, student_patch_tokens_masked, teacher_patch_tokens_masked, student_masks_flat,
                       n_masked_patches=None, masks_weight=None):
        """-(1/2B) * sum over masked tokens i of w_i * sum_k t_ik log softmax(s_i / T)_k, where w_i = 1 /
        (masked tokens in i's crop) and 2B counts all global crops, masked or not (official)."""
        t, s = teacher_patch_tokens_masked, student_patch_tokens_masked  # (n_masked, K)
        loss = torch.sum(t * F.log_softmax(s / self.student_temp, dim=-1), dim=-1)  # (n_masked,)
        if masks_weight is None:
            masks_weight = ((1 / student_masks_flat.sum(-1).clamp(min=1.0)).unsqueeze(-1)
                            .expand_as(student_masks_flat)[student_masks_flat])
        if n_masked_patches is not None:
            loss = loss[:n_masked_patches]
        loss = loss * masks_weight
        return -loss.sum() / student_masks_flat.shape[0]

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens):
        """Expects (1, n_masked, K), as the official train step passes it. Official quirk (dinov2 issues
        #113, #546): len() of that is 1, so the centre moves towards the mean over masked tokens of each
        rank, averaged over ranks with equal weight, not the mean over all masked tokens."""
        per_rank_mean = torch.sum(teacher_patch_tokens.mean(1), dim=0, keepdim=True)  # (1, 1, K)
        self.start_center_update(per_rank_mean, len(teacher_patch_tokens))


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy estimator (Sablayrolles et al. 2019): -mean log(distance to the
    nearest neighbour) of L2-normalised features. Pushes features of a batch apart (no collapse)."""

    def __init__(self):
        super().__init__()
        self.pdist = nn.PairwiseDistance(2, eps=1e-8)  # eps is added to the difference vector

    def pairwise_NNs_inner(self, x):
        """Index of each row's nearest neighbour by inner product, excluding itself (diagonal -1)."""
        dots = torch.mm(x, x.t())
        n = x.shape[0]
        dots.view(-1)[:: (n + 1)].fill_(-1)
        return torch.max(dots, dim=1)[1]

    def forward(self, student_output, eps=1e-8):
        # Deviation from official: with one sample per GPU there is no neighbour; the official code
        # returns a large or infinite value there (dinov2 issues #307, #314). We return 0.
        if student_output.shape[0] < 2:
            return student_output.sum() * 0.0
        with torch.autocast(student_output.device.type, enabled=False):  # fp32, as official
            student_output = F.normalize(student_output.float(), eps=eps, p=2, dim=-1)
            indices = self.pairwise_NNs_inner(student_output)
            distances = self.pdist(student_output, student_output[indices])
            return -torch.log(distances + eps).mean()


# -------------------------------------------------------------------------------------------------
# 7. Optimisation (dinov2/utils/param_groups.py, dinov2/utils/utils.py:CosineScheduler, train.py)
# -------------------------------------------------------------------------------------------------


def get_vit_lr_decay_rate(name, lr_decay_rate=1.0, num_layers=12, force_is_backbone=False):
    """Layer-wise lr decay: decay^(num_layers + 1 - layer_id). Tokens and embeddings are layer 0,
    block i is layer i + 1, everything after the blocks (final norm, heads) gets multiplier 1."""
    layer_id = num_layers + 1
    if name.startswith("backbone") or force_is_backbone:
        if any(k in name for k in ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")):
            layer_id = 0
        elif "blocks." in name and "residual." not in name:
            layer_id = int(name[name.find("blocks."):].split(".")[1]) + 1
    return lr_decay_rate ** (num_layers + 1 - layer_id)


def get_params_groups_with_decay(model, lr_decay_rate=1.0, patch_embed_lr_mult=1.0):
    """One dict per parameter: lr multiplier, weight-decay multiplier and whether it is a last layer.
    No weight decay on biases, norms and LayerScale gammas; tokens and pos_embed are decayed."""
    if hasattr(model, "n_blocks"):
        n_blocks = model.n_blocks
    elif hasattr(model, "blocks"):
        n_blocks = len(model.blocks)
    elif hasattr(model, "backbone"):
        n_blocks = len(model.backbone.blocks)
    else:
        n_blocks = 0  # a head: multiplier decay^0 = 1
    groups = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        d = {"params": param, "name": name, "is_last_layer": "last_layer" in name, "wd_multiplier": 1.0,
             "lr_multiplier": get_vit_lr_decay_rate(name, lr_decay_rate, n_blocks, force_is_backbone=n_blocks > 0)}
        if name.endswith(".bias") or "norm" in name or "gamma" in name:
            d["wd_multiplier"] = 0.0
        if "patch_embed" in name:
            d["lr_multiplier"] *= patch_embed_lr_mult
        groups.append(d)
    return groups


def fuse_params_groups(all_params_groups, keys=("lr_multiplier", "wd_multiplier", "is_last_layer")):
    """Merge parameters that share (lr multiplier, wd multiplier, last layer) into one optimizer group."""
    fused = {}
    for d in all_params_groups:
        group = fused.setdefault(tuple(d[k] for k in keys), {**{k: d[k] for k in keys}, "params": []})
        group["params"].append(d["params"])
    return list(fused.values())


class CosineScheduler:
    """A value per iteration: freeze_iters zeros, a linear warmup from start_warmup_value to base_value
    (both ends included), then a half cosine from base_value towards final_value. Past total_iters it
    returns final_value. Same as the official numpy version, computed in float64 with torch."""

    def __init__(self, base_value, final_value, total_iters, warmup_iters=0, start_warmup_value=0, freeze_iters=0):
        self.final_value, self.total_iters = final_value, total_iters
        freeze = torch.zeros(freeze_iters, dtype=torch.float64)
        warmup = torch.linspace(start_warmup_value, base_value, warmup_iters, dtype=torch.float64)
        n = total_iters - warmup_iters - freeze_iters
        iters = torch.arange(n, dtype=torch.float64)
        cosine = final_value + 0.5 * (base_value - final_value) * (1 + torch.cos(math.pi * iters / n))
        self.schedule = torch.cat((freeze, warmup, cosine)).tolist()
        assert len(self.schedule) == self.total_iters

    def __getitem__(self, it):
        return self.final_value if it >= self.total_iters else self.schedule[it]


def build_schedulers(cfg):
    """The five schedules of official train.py, all in iterations (epoch = OFFICIAL_EPOCH_LENGTH)."""
    E = cfg.train.OFFICIAL_EPOCH_LENGTH
    total = cfg.optim.epochs * E
    lr = dict(base_value=cfg.optim.lr, final_value=cfg.optim.min_lr, total_iters=total,
              warmup_iters=cfg.optim.warmup_epochs * E, start_warmup_value=0)
    last_layer_lr = CosineScheduler(**lr)
    frozen = min(total, cfg.optim.freeze_last_layer_epochs * E)
    last_layer_lr.schedule[:frozen] = [0.0] * frozen
    warm_temp = cfg.teacher.warmup_teacher_temp_epochs * E
    return {
        "lr": CosineScheduler(**lr),
        "wd": CosineScheduler(cfg.optim.weight_decay, cfg.optim.weight_decay_end, total),
        "mom": CosineScheduler(cfg.teacher.momentum_teacher, cfg.teacher.final_momentum_teacher, total),
        "teacher_temp": CosineScheduler(cfg.teacher.teacher_temp, cfg.teacher.teacher_temp, warm_temp,
                                        warmup_iters=warm_temp, start_warmup_value=cfg.teacher.warmup_teacher_temp),
        "last_layer_lr": last_layer_lr,
    }


def apply_optim_scheduler(optimizer, lr, wd, last_layer_lr, backbone_lr_factor=1.0):
    """Per group: lr = (last-layer lr or lr) * multiplier, wd = wd * multiplier. backbone_lr_factor is
    ours: 0 during train.freeze_backbone_iterations, so only the heads move."""
    for group in optimizer.param_groups:
        group["weight_decay"] = wd * group["wd_multiplier"]
        base = last_layer_lr if group["is_last_layer"] else lr
        group["lr"] = base * group["lr_multiplier"] * (backbone_lr_factor if group["is_backbone"] else 1.0)


# -------------------------------------------------------------------------------------------------
# 8. Checkpointing
# One rank-0 file per save (student, teacher, optimizer, scaler, loss centres, RNG states, iteration,
# config), written to a temporary name and renamed, so a kill at any moment leaves the previous file
# whole. Restarting the same command resumes from the newest complete file.
# -------------------------------------------------------------------------------------------------

CKPT_GLOB = "model_*.pth"
RUNTIME_KEYS = {"train.num_workers", "train.log_every", "train.output_dir", "train.checkpoint_period",
                "train.keep_checkpoints", "train.compile", "optim.lr", "evaluation.eval_period_iterations",
                "evaluation.knn_batch_size"}  # may change between a run and its resumption


def atomic_save(obj, path):
    """torch.save to path.tmp, flush to disk, then rename: readers see the old file or the new one."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise UserError(f"could not write {path} ({e.strerror or e}); earlier checkpoints are intact") from None


def list_checkpoints(output_dir):
    """Checkpoint files, newest first (iteration in the name). Rank 0, the only writer, also removes
    leftovers of saves interrupted by a kill."""
    for tmp in glob.glob(os.path.join(output_dir, "*.tmp")) if get_rank() == 0 else []:
        with contextlib.suppress(OSError):
            os.remove(tmp)
    return sorted(glob.glob(os.path.join(output_dir, CKPT_GLOB)), reverse=True)


def load_latest_checkpoint(output_dir):
    """The newest checkpoint that loads; a damaged one is reported and the one before it is used."""
    for path in list_checkpoints(output_dir):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(ckpt, dict) or "iteration" not in ckpt:
                raise ValueError("not a dino_mini checkpoint")
            return path, ckpt
        except Exception as e:  # noqa: BLE001 - truncated or corrupted file
            print0(f"dino_mini: warning: checkpoint {path} is damaged ({type(e).__name__}: {e}); trying an older one")
    return None, None


def check_resume_config(ckpt_cfg, cfg, output_dir):
    """Refuse to resume a run whose settings differ from the command's, and say how to start fresh."""
    old, new = flat_keys(ckpt_cfg), flat_keys(cfg)
    diff = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new if k not in RUNTIME_KEYS and old.get(k) != new[k]]
    if diff:
        raise UserError(f"the checkpoint in '{output_dir}' was made with another config ({'; '.join(diff[:4])}"
                        f"{'; ...' if len(diff) > 4 else ''}); use the same settings to resume, or a new "
                        f"--output-dir (or delete its model_*.pth) to start fresh")


def save_checkpoint(output_dir, model, optimizer, scaler, iteration, cfg, keep):
    """Save everything needed to continue after `iteration` iterations; keep the newest `keep` files."""
    # Deviation from official: one rank-0 file instead of per-rank FSDP shards, with the grad scaler
    # and RNG states too (official saves neither), so a resumed run continues exactly.
    model.dino_loss.apply_center_update()  # fold in the pending centre update: exact, and saved with it
    if model.do_ibot:
        model.ibot_patch_loss.apply_center_update()
    state = {"iteration": iteration, "config": json.loads(json.dumps(cfg)), "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state_all()}}
    atomic_save(state, os.path.join(output_dir, f"model_{iteration:07d}.pth"))
    for old in list_checkpoints(output_dir)[keep:]:
        os.remove(old)


def backbone_state_from_file(obj):
    """Find a ViT backbone state dict in what torch.load returned: Meta's released files (a bare state
    dict), our teacher_backbone.pth, our full checkpoints, or official teacher dumps ({"teacher": ...})."""
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = {k[len("teacher."):]: v for k, v in obj["model"].items() if k.startswith("teacher.")}
    elif isinstance(obj, dict) and "teacher" in obj and isinstance(obj["teacher"], dict):
        obj = obj["teacher"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        return None
    state = {}
    for k, v in obj.items():
        for prefix in ("module.", "backbone."):
            k = k[len(prefix):] if k.startswith(prefix) else k
        if k.startswith(("dino_head.", "ibot_head.")):
            continue
        parts = k.split(".")  # official block_chunks > 0 keys: blocks.<chunk>.<index>.* -> blocks.<index>.*
        if parts[0] == "blocks" and len(parts) > 2 and parts[2].isdigit():
            k = ".".join([parts[0]] + parts[2:])
        state[k] = v
    return state if "pos_embed" in state else None


def read_backbone_state(path):
    """The backbone state dict in a weights file, or one clear error about the file."""
    if not os.path.isfile(path):
        raise UserError(f"pretrained weights '{path}' not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file
        raise UserError(f"'{path}' is not a PyTorch checkpoint ({type(e).__name__})") from None
    state = backbone_state_from_file(obj)
    if state is None:
        raise UserError(f"'{path}' holds no ViT backbone state dict (expected keys like pos_embed, "
                        f"blocks.0.attn.qkv.weight)")
    return state


def load_pretrained_backbone(backbone, path, state=None):
    """Load a backbone file strictly. The stored position grid (e.g. 37 x 37 for Meta's 518 px models)
    is resized once to this model's grid with the model's own interpolation rule."""
    state = dict(state) if state is not None else read_backbone_state(path)
    expected = backbone.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shape_bad = [k for k in expected if k in state and k != "pos_embed" and state[k].shape != expected[k].shape]
    if missing or unexpected or shape_bad:
        found = f"{state['blocks.0.norm1.weight'].shape[0]}-dim" if "blocks.0.norm1.weight" in state else "unknown"
        raise UserError(
            f"'{path}' does not fit student.arch={type(backbone).__name__} with embed_dim {backbone.embed_dim}, "
            f"{backbone.n_blocks} blocks, patch {backbone.patch_size}, {backbone.num_register_tokens} registers "
            f"(found a {found} model; missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shapes {shape_bad[:3]}). "
            f"Set student.arch / patch_size / num_register_tokens / ffn_layer to match the file")
    pos = state["pos_embed"]
    if pos.shape != expected["pos_embed"].shape:  # resample the grid once, as the forward pass would
        grid = int(math.sqrt(expected["pos_embed"].shape[1] - 1)) * backbone.patch_size
        dummy = torch.zeros(1, expected["pos_embed"].shape[1], pos.shape[-1])
        with torch.no_grad():
            saved, backbone.pos_embed = backbone.pos_embed, nn.Parameter(pos.float())
            state["pos_embed"] = backbone.interpolate_pos_encoding(dummy, grid, grid).to(pos.dtype)
            backbone.pos_embed = saved
    backbone.load_state_dict(state, strict=True)
    return backbone


def infer_arch(state):
    """Read the architecture off a backbone state dict: student.* settings that build a matching ViT."""
    dim, depth = state["pos_embed"].shape[-1], len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    arch = next((a for a, (d, n, _) in VIT_SIZES.items() if (d, n) == (dim, depth)), None)
    if arch is None:
        raise UserError(f"no known ViT has embed_dim {dim} and {depth} blocks")
    regs = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    return {"arch": arch, "patch_size": state["patch_embed.proj.weight"].shape[-1], "num_register_tokens": regs,
            "ffn_layer": "swiglufused" if "blocks.0.mlp.w12.weight" in state else "mlp",
            "layerscale": 1.0 if "blocks.0.ls1.gamma" in state else 0.0,
            # Meta's register models resize positions by size with antialiasing (hub convention)
            "interpolate_antialias": regs > 0, "interpolate_offset": 0.0 if regs else 0.1}


# -------------------------------------------------------------------------------------------------
# 9. Evaluation
# kNN on frozen, L2-normalised teacher cls features (official dinov2/eval/knn.py: cosine similarity,
# top-k neighbours voting with weights softmax(sim / 0.07)). Plus feature extraction and pictures.
# -------------------------------------------------------------------------------------------------


@torch.no_grad()
def extract_features(backbone, dataset, device, batch_size, autocast_ctx=contextlib.nullcontext(), desc=None,
                     num_workers=0):
    """(n, D) L2-normalised cls features and (n,) labels. Under torchrun each rank encodes every W-th
    image and the pieces are gathered, so every rank ends with all features in dataset order."""
    rank, W = get_rank(), get_world_size()
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), W))
    loader = torch.utils.data.DataLoader(shard, batch_size=batch_size, num_workers=num_workers)
    feats, labels = [], []
    for images, target, _ in tqdm(loader, desc=desc, disable=desc is None or rank != 0, leave=False):
        with autocast_ctx:
            out = backbone(images.to(device, non_blocking=True))  # (b, D) final-norm cls token
        feats.append(F.normalize(out.float(), dim=1, p=2))
        labels.append(torch.as_tensor(target, device=device))
    feats, labels = torch.cat(feats), torch.cat(labels)
    if W > 1:  # pad shards to equal length, all-gather, then interleave back to dataset order
        n_max = math.ceil(len(dataset) / W)
        pad = n_max - len(feats)
        feats = torch.cat([feats, feats.new_zeros(pad, feats.shape[1])])
        labels = torch.cat([labels, labels.new_zeros(pad)])
        all_f, all_l = [torch.empty_like(feats) for _ in range(W)], [torch.empty_like(labels) for _ in range(W)]
        dist.all_gather(all_f, feats)
        dist.all_gather(all_l, labels)
        feats = torch.stack(all_f, dim=1).flatten(0, 1)[:len(dataset)]
        labels = torch.stack(all_l, dim=1).flatten(0, 1)[:len(dataset)]
    return feats, labels


@torch.no_grad()
def knn_classify(train_features, train_labels, test_features, test_labels, ks=(10, 20, 100, 200), T=0.07):
    """Weighted kNN: each of the k most similar train images votes for its class with weight
    softmax(sim / T) taken over the top max(k) neighbours. Returns {k: (top1 %, top5 %)}."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    ks = sorted({min(k, len(train_labels)) for k in ks})
    max_k = ks[-1]
    correct = {k: [0, 0] for k in ks}
    for i in range(0, len(test_features), 256):
        sims = test_features[i:i + 256] @ train_features.T  # (b, n_train) cosine similarities
        top_sims, top_idx = sims.topk(max_k, dim=1)  # (b, max_k)
        weights = (top_sims / T).softmax(dim=1)
        votes = F.one_hot(train_labels[top_idx], num_classes) * weights.unsqueeze(-1)  # (b, max_k, C)
        target = test_labels[i:i + 256].unsqueeze(1)
        for k in ks:
            probs = votes[:, :k].sum(1)  # (b, C)
            top5 = probs.topk(min(5, num_classes), dim=1).indices
            correct[k][0] += (top5[:, :1] == target).sum().item()
            correct[k][1] += (top5 == target).any(dim=1).sum().item()
    n = len(test_labels)
    return {k: (100.0 * c1 / n, 100.0 * c5 / n) for k, (c1, c5) in correct.items()}


def run_knn(cfg, backbone, knn_data, device, autocast_ctx, iteration, output_dir):
    """Evaluate the teacher backbone; append one JSON line per k to eval_knn.jsonl. Returns results."""
    # Deviation from official: kNN runs inside training (official: a separate eval/knn.py script on
    # the dumped teacher), so a run reports whether it learns while it learns.
    was_training = backbone.training
    backbone.eval()
    train_set, val_set = knn_data
    bs = cfg.evaluation.knn_batch_size
    workers = min(cfg.train.num_workers, 8)
    train_f, train_l = extract_features(backbone, train_set, device, bs, autocast_ctx, num_workers=workers)
    val_f, val_l = extract_features(backbone, val_set, device, bs, autocast_ctx, num_workers=workers)
    results = knn_classify(train_f, train_l, val_f, val_l, cfg.evaluation.knn_nb, cfg.evaluation.knn_temperature)
    backbone.train(was_training)
    if get_rank() == 0:
        with open(os.path.join(output_dir, "eval_knn.jsonl"), "a") as f:
            for k, (top1, top5) in results.items():
                f.write(json.dumps({"iteration": iteration, "k": k, "top1": top1, "top5": top5}) + "\n")
    return results


def pca_rgb(patch_tokens, grid):
    """First three principal components of (N, D) patch features as an RGB image (3, h, w). Patches whose
    first component falls below half its range are treated as background (black), and the colours
    come from a second PCA on the foreground patches only, as in the DINOv2 paper's figures."""
    x = patch_tokens.float() - patch_tokens.float().mean(0)
    first = torch.pca_lowrank(x, q=3, center=False)[0][:, 0]
    first = (first - first.min()) / (first.max() - first.min() + 1e-8)
    fg = first > 0.5
    if fg.float().mean() > 0.5:  # the sign of a component is arbitrary: call the smaller part foreground
        fg = ~fg
    if fg.sum() < 3:
        fg = torch.ones_like(fg)
    f = patch_tokens[fg].float()
    comps = torch.pca_lowrank(f - f.mean(0), q=3, center=False)[0][:, :3]  # (n_fg, 3)
    comps = (comps - comps.min(0).values) / (comps.max(0).values - comps.min(0).values + 1e-8)
    rgb = torch.zeros(len(patch_tokens), 3)
    rgb[fg] = comps
    return rgb.T.reshape(3, *grid)


@torch.no_grad()
def visualize(backbone, image_paths, output_dir, image_size, device="cpu", images=None):
    """For each image write <name>_pca.png (image | PCA of patch features) and <name>_attn.png (image |
    mean attention | one map per head): the last block's cls-to-patch attention, registers skipped."""
    from torchvision.utils import save_image

    backbone.eval()
    p, R = backbone.patch_size, backbone.num_register_tokens
    transform = make_eval_transform(image_size)
    written = []
    if images is None:
        images = [(os.path.splitext(os.path.basename(q))[0], load_rgb(q)) for q in image_paths]
    for name, img in images:
        x = transform(img).unsqueeze(0).to(device)  # (1, 3, S, S)
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        shown = (x[0] * torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)
                 + torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)).clamp(0, 1).cpu()

        def up(m):  # (c, h, w) patch grid -> (c, S, S) image, nearest so patches stay visible
            return F.interpolate(m.unsqueeze(0).float(), size=shown.shape[-2:], mode="nearest")[0]

        tokens = backbone.forward_features(x)["x_norm_patchtokens"][0].cpu()  # (N, D)
        save_image([shown, up(pca_rgb(tokens, grid))], os.path.join(output_dir, f"{name}_pca.png"), padding=2)
        attn = backbone.get_last_self_attention(x)[0, :, 0, 1 + R:].cpu()  # (heads, N): cls -> patches
        attn = attn / attn.amax(dim=1, keepdim=True)
        maps = [up(a.reshape(1, *grid)).expand(3, -1, -1) for a in torch.cat([attn.mean(0, keepdim=True), attn])]
        save_image([shown] + maps, os.path.join(output_dir, f"{name}_attn.png"), padding=2, nrow=8)
        written += [os.path.join(output_dir, f"{name}_{kind}.png") for kind in ("pca", "attn")]
    return written


# -------------------------------------------------------------------------------------------------
# 10. SSLMetaArch: the train step (dinov2/train/ssl_meta_arch.py)
# The teacher (an EMA of the student, no gradients) encodes the two unmasked global crops. The
# student encodes the masked global crops and the local crops. Each student view is trained to match
# the teacher's other view (DINO), masked patches to match the teacher's patches (iBOT).
# -------------------------------------------------------------------------------------------------


class MultiCropStudent(nn.Module):
    """The student's forward over both crop groups, as one module so that one DDP wraps it (one
    gradient all-reduce per step)."""

    # Deviation from official: two plain batched backbone calls (global, local) instead of one
    # xformers nested-tensor call; the maths is the same. Only the masked patch tokens go through
    # the head, without the official zero-padded buffer of `upperbound` rows (same values).
    def __init__(self, student, do_ibot, separate_head):
        super().__init__()
        self.student, self.do_ibot, self.separate_head = student, do_ibot, separate_head

    def forward(self, global_crops, local_crops, masks, mask_indices_list):
        g = self.student.backbone(global_crops, masks=masks, is_training=True)
        tokens = [g["x_norm_clstoken"]]  # (2B, D)
        if len(local_crops):
            tokens.insert(0, self.student.backbone(local_crops, is_training=True)["x_norm_clstoken"])  # (L*B, D)
        masked = None
        if self.do_ibot:  # only the masked patch tokens go through a head, never all 2B*N
            masked = torch.index_select(g["x_norm_patchtokens"].flatten(0, 1), 0, mask_indices_list)
            if not self.separate_head:
                tokens.append(masked)
        # one head call on [local cls; global cls; masked patches]: the head is per token
        out = self.student.dino_head(torch.cat(tokens))
        sizes = [t.shape[0] for t in tokens]
        parts = list(out.split(sizes))
        local_logits = parts.pop(0) if len(local_crops) else None
        global_logits = parts.pop(0)
        patch_logits = None
        if self.do_ibot:
            patch_logits = self.student.ibot_head(masked) if self.separate_head else parts.pop(0)
        return local_logits, global_logits, patch_logits, g["x_norm_clstoken"]


class SSLMetaArch(nn.Module):
    def __init__(self, cfg, device="cpu", dtype=torch.float32):
        super().__init__()
        self.cfg = cfg
        self.do_dino = cfg.dino.loss_weight > 0
        self.do_koleo = cfg.dino.koleo_loss_weight > 0
        self.do_ibot = cfg.ibot.loss_weight > 0
        self.ibot_separate_head = cfg.ibot.separate_head
        # one autocast context and one grad scaler serve every precision (both do nothing in fp32)
        device_type = torch.device(device).type
        self.autocast_ctx = (torch.autocast(device_type, dtype=dtype) if dtype != torch.float32
                             else contextlib.nullcontext())
        # Deviation from official: autocast + GradScaler instead of FSDP pure-fp16 parameters;
        # autocast keeps norms and softmaxes in fp32, slightly more accurate.
        self.fp16_scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16
                                                and cfg.compute_precision.grad_scaler)

        teacher, student = {"backbone": build_backbone(cfg, drop_path=False)}, {"backbone": build_backbone(cfg)}
        embed_dim = student["backbone"].embed_dim
        if cfg.student.pretrained_weights:
            # Deviation from official: loaded strictly (official: strict=False, which silently skips
            # mismatched keys); the teacher starts from the same weights through the copy below.
            load_pretrained_backbone(student["backbone"], cfg.student.pretrained_weights)
        self.dino_out_dim = cfg.dino.head_n_prototypes
        self.dino_loss = DINOLoss(self.dino_out_dim)
        self.koleo_loss = KoLeoLoss()
        head = partial(DINOHead, in_dim=embed_dim, out_dim=self.dino_out_dim, hidden_dim=cfg.dino.head_hidden_dim,
                       bottleneck_dim=cfg.dino.head_bottleneck_dim, nlayers=cfg.dino.head_nlayers)
        student["dino_head"], teacher["dino_head"] = head(), head()
        if self.do_ibot:
            self.ibot_out_dim = cfg.ibot.head_n_prototypes if self.ibot_separate_head else self.dino_out_dim
            self.ibot_patch_loss = iBOTPatchLoss(self.ibot_out_dim)
            if self.ibot_separate_head:
                head = partial(DINOHead, in_dim=embed_dim, out_dim=cfg.ibot.head_n_prototypes,
                               hidden_dim=cfg.ibot.head_hidden_dim, bottleneck_dim=cfg.ibot.head_bottleneck_dim,
                               nlayers=cfg.ibot.head_nlayers)
                student["ibot_head"], teacher["ibot_head"] = head(), head()
        self.student, self.teacher = nn.ModuleDict(student), nn.ModuleDict(teacher)
        # the teacher starts as an exact copy of the student (a copy, not the same object: dinov2#407)
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad = False
        # the multi-crop forward shares the student's modules; kept out of state_dict on purpose
        student_forward = MultiCropStudent(self.student, self.do_ibot, self.ibot_separate_head)
        object.__setattr__(self, "student_forward", student_forward)
        self.diagnostics = {}

    def prepare_for_distributed_training(self):
        """Wrap the student forward in DDP (the official one wraps student and teacher in FSDP)."""
        # Deviation from official: DDP instead of FSDP; each rank holds full copies of the weights,
        # gradients are averaged in one all-reduce, the teacher is not wrapped at all.
        if get_world_size() > 1:
            device_ids = [self.dino_loss.center.device] if self.dino_loss.center.is_cuda else None
            ddp = nn.parallel.DistributedDataParallel(self.student_forward, device_ids=device_ids,
                                                      find_unused_parameters=not self.do_dino)
            object.__setattr__(self, "student_forward", ddp)  # DDP made every rank's student equal ...
        self.teacher.load_state_dict(self.student.state_dict())  # ... so copy the teacher afterwards

    def forward(self, inputs):
        raise NotImplementedError("use forward_backward")

    def forward_backward(self, images, teacher_temp, mark=lambda stage: None):
        n_global_crops, n_local_crops = 2, self.cfg.crops.local_crops_number
        dev = self.dino_loss.center.device
        global_crops = images["collated_global_crops"].to(dev, non_blocking=True)  # (2B, 3, G, G)
        local_crops = images["collated_local_crops"].to(dev, non_blocking=True)  # (L*B, 3, l, l)
        masks = images["collated_masks"].to(dev, non_blocking=True)  # (2B, N) bool
        mask_indices_list = images["mask_indices_list"].to(dev, non_blocking=True)  # (n_masked,)
        n_masked_patches_tensor = images["n_masked_patches"].to(dev, non_blocking=True)
        n_masked_patches = mask_indices_list.shape[0]
        masks_weight = images["masks_weight"].to(dev, non_blocking=True)  # (n_masked,)
        n_local_crops_loss_terms = max(n_local_crops * n_global_crops, 1)  # 16 pairs (local, teacher view)
        n_global_crops_loss_terms = (n_global_crops - 1) * n_global_crops  # 2 pairs (view 1, view 2)
        n_terms = n_local_crops_loss_terms + n_global_crops_loss_terms  # 18: DINO averages over pairs
        ibot_loss_scale = 1.0 / n_global_crops

        # 1) teacher: the two unmasked global crops, no gradient
        with torch.no_grad(), self.autocast_ctx:
            t_out = self.teacher.backbone(global_crops, is_training=True)
            cls1, cls2 = t_out["x_norm_clstoken"].chunk(n_global_crops)  # (B, D) each
            t_cls = torch.cat((cls2, cls1))  # swapped: student view 1 learns from teacher view 2
            if self.do_ibot:
                t_masked = torch.index_select(t_out["x_norm_patchtokens"].flatten(0, 1), 0, mask_indices_list)
                if not self.ibot_separate_head:  # one head call for cls and masked patch tokens
                    t_logits = self.teacher.dino_head(torch.cat((t_cls, t_masked)))
                    t_cls_logits, t_patch_logits = t_logits[:len(t_cls)], t_logits[len(t_cls):]
                else:
                    t_cls_logits, t_patch_logits = self.teacher.dino_head(t_cls), self.teacher.ibot_head(t_masked)
            else:
                t_cls_logits = self.teacher.dino_head(t_cls)
        # 2) teacher targets: centering + sharpening, or Sinkhorn-Knopp
        # Deviation from official: the centre is summed from fp32 logits (official: fp16 sums).
        with torch.no_grad():
            t_cls_logits = t_cls_logits.float()  # (2B, K)
            if self.cfg.train.centering == "centering":
                t_dino = self.dino_loss.softmax_center_teacher(t_cls_logits, teacher_temp)
                self.dino_loss.update_center(t_cls_logits)
                if self.do_ibot:
                    t_patch_logits = t_patch_logits.float().unsqueeze(0)  # (1, n_masked, K)
                    t_ibot = self.ibot_patch_loss.softmax_center_teacher(t_patch_logits, teacher_temp).squeeze(0)
                    self.ibot_patch_loss.update_center(t_patch_logits)
            else:
                t_dino = self.dino_loss.sinkhorn_knopp_teacher(t_cls_logits, teacher_temp)
                if self.do_ibot:
                    t_ibot = self.ibot_patch_loss.sinkhorn_knopp_teacher(t_patch_logits, teacher_temp,
                                                                         n_masked_patches_tensor)
            t_dino = t_dino.view(n_global_crops, -1, self.dino_out_dim)  # (2, B, K): [teacher view 2; view 1]

        mark("teacher")  # (mark: a timing hook for --benchmark; does nothing in training)
        # 3) student: masked global crops and local crops
        with self.autocast_ctx:
            local_logits, global_logits, patch_logits, s_cls = self.student_forward(
                global_crops, local_crops, masks, mask_indices_list)

            # 4) losses, with the official weights and normalisations
            loss_dict, loss = {}, 0
            if n_local_crops > 0:  # 16 (local crop, teacher view) pairs, each / 18
                dino_local = self.dino_loss(local_logits.chunk(n_local_crops), t_dino) / n_terms
                loss_dict["dino_local_crops_loss"] = dino_local
                loss = loss + self.cfg.dino.loss_weight * dino_local
            if self.do_dino:  # the 2 cross-view global pairs, computed as one mean over 2B rows, * 2 / 18
                dino_global = self.dino_loss([global_logits], [t_dino.flatten(0, 1)]) * 2 / n_terms
                loss_dict["dino_global_crops_loss"] = dino_global
                loss = loss + self.cfg.dino.loss_weight * dino_global
                if self.do_koleo:  # per view, on the backbone cls tokens of this rank's images
                    koleo = self.cfg.dino.koleo_loss_weight * sum(self.koleo_loss(p) for p in s_cls.chunk(2))
                    loss = loss + koleo
                    loss_dict["koleo_loss"] = koleo / 2  # halved for display only, as official
            if self.do_ibot:
                ibot = self.ibot_patch_loss.forward_masked(patch_logits, t_ibot, student_masks_flat=masks,
                                                           n_masked_patches=n_masked_patches,
                                                           masks_weight=masks_weight) * 2 * ibot_loss_scale
                loss_dict["ibot_loss"] = ibot / 2  # halved for display only, as official
                loss = loss + self.cfg.ibot.loss_weight * ibot

        # 5) backward (scaled in fp16; the scaler does nothing otherwise)
        mark("student")
        self.fp16_scaler.scale(loss).backward()
        mark("backward")
        with torch.no_grad():  # collapse diagnostics, kept on the device until a log step reads them
            probs = t_dino.flatten(0, 1)
            self.diagnostics = {
                "teacher_entropy": -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean(),  # ln K = uniform
                "cls_std": F.normalize(s_cls.float(), dim=-1).std(0).mean() * math.sqrt(s_cls.shape[-1]),
            }
        return loss_dict

    @torch.no_grad()
    def update_teacher(self, m):
        """EMA: teacher <- m * teacher + (1 - m) * student, over every parameter, in two multi-tensor
        calls as official: on a GPU 2 kernel launches instead of 2 per tensor (on CPU it buys nothing:
        15 ms against 12 ms for a loop over ViT-S/16 + heads, 183 tensors, measured here)."""
        student_params, teacher_params = list(self.student.parameters()), list(self.teacher.parameters())
        torch._foreach_mul_(teacher_params, m)
        torch._foreach_add_(teacher_params, student_params, alpha=1 - m)

    def train(self, mode=True):
        super().train(mode)
        self.teacher.eval()  # the teacher never drops paths
        return self

    def get_params_groups(self):
        """Optimizer groups per student part (backbone, dino_head, ibot_head), fused by multipliers."""
        all_groups = []
        for name, module in self.student.items():
            groups = fuse_params_groups(get_params_groups_with_decay(
                module, lr_decay_rate=self.cfg.optim.layerwise_decay,
                patch_embed_lr_mult=self.cfg.optim.patch_embed_lr_mult))
            for g in groups:
                g["is_backbone"] = name == "backbone"  # ours, for train.freeze_backbone_iterations
            all_groups += groups
        return all_groups


# -------------------------------------------------------------------------------------------------
# 11. Training (dinov2/train/train.py): train_step() is one iteration, train() the whole run
# -------------------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STOP = {"signal": None}  # set by SIGTERM / SIGINT; the loop finishes its step, saves and exits


class NonFiniteLoss(UserError):
    pass


def request_stop(signum, frame):
    STOP["signal"] = signal.Signals(signum).name


def resolve_dtype(cfg, device):
    name = cfg.compute_precision.dtype
    if name == "auto":  # fp16 + loss scaling on GPU, as the released models; fp32 on CPU
        name = "fp16" if device.type == "cuda" else "fp32"
    return DTYPES[name]


def reduce_for_log(loss_dict, diagnostics, device):
    """Losses averaged over ranks (one all-reduce, one host sync): call at log steps only."""
    names = list(loss_dict) + list(diagnostics)
    values = torch.stack([v.detach().float() for v in list(loss_dict.values()) + list(diagnostics.values())])
    all_reduce_(values)
    return dict(zip(names, (values / get_world_size()).tolist()))  # .tolist(): a CPU-GPU sync point


def check_finite(metrics, iteration, loss_names, output_dir):
    bad = [f"{k}={metrics[k]}" for k in loss_names if not math.isfinite(metrics[k])]
    if bad:
        raise NonFiniteLoss(
            f"non-finite loss at iteration {iteration} ({', '.join(bad)}); nothing was saved after the last "
            f"good checkpoint in '{output_dir}'. Likely causes: learning rate too high (lower optim.base_lr), "
            f"fp16 overflow (try compute_precision.dtype=bf16 or fp32), a per-GPU batch of 1 with KoLeo "
            f"(set dino.koleo_loss_weight=0), or teacher.teacher_temp far below 0.04")


def params_finite(model):
    norms = torch._foreach_norm(list(model.student.parameters()) + list(model.teacher.parameters()))
    return bool(torch.stack(norms).isfinite().all())


def build_model_and_optimizer(cfg, device, dtype):
    """SSLMetaArch on the device (compiled if asked, wrapped in DDP under torchrun) and its AdamW."""
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls, as official (matters in fp32 only)
    torch.backends.cudnn.allow_tf32 = True
    model = SSLMetaArch(cfg, device, dtype).to(device)
    # compiled in place, so parameter names (and checkpoints) stay the same. Measured on CPU (demo):
    # 115 images/s against 120 without, hence off by default; not yet measured on GPUs.
    if cfg.train.compile:
        model.student.backbone.compile()
        model.teacher.backbone.compile()
    model.prepare_for_distributed_training()
    model.train()
    # one fused kernel for all parameters on GPU (gain not yet measured); the multi-tensor (foreach)
    # version on CPU: 77 ms against 300 ms a step for the per-tensor loop, ViT-S/16 + heads, measured here
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.get_params_groups(), betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2),
                                  fused=fused or None, foreach=None if fused else True)
    return model, optimizer


def train_step(model, optimizer, data, lr, wd, mom, teacher_temp, last_layer_lr, backbone_lr_factor=1.0,
               mark=lambda stage: None):
    """One iteration of official train.py, given this iteration's schedule values. No host sync here
    (but the fp16 scaler's inf check): the returned losses stay on the device until a log step."""
    # 1) this iteration's lr and weight decay into every parameter group
    apply_optim_scheduler(optimizer, lr, wd, last_layer_lr, backbone_lr_factor)
    # 2-5) teacher forward, student forward, losses, backward
    optimizer.zero_grad(set_to_none=True)
    loss_dict = model.forward_backward(data, teacher_temp=teacher_temp, mark=mark)
    # 6) unscale, clip each student part separately, step (the scaler skips steps with inf grads)
    model.fp16_scaler.unscale_(optimizer)
    if model.cfg.optim.clip_grad:
        for part in model.student.values():
            nn.utils.clip_grad_norm_(part.parameters(), model.cfg.optim.clip_grad)
    model.fp16_scaler.step(optimizer)
    model.fp16_scaler.update()
    # 7) teacher EMA, every iteration, also when the scaler skipped the step (as official)
    model.update_teacher(mom)
    mark("optimizer+ema")
    return loss_dict


def train(cfg, device, output_dir, knn_data=None):
    """The whole pre-training run. Returns the kNN results {iteration: {k: (top1, top5)}}."""
    rank, W = get_rank(), get_world_size()
    master_process = rank == 0

    # ---- derived values, computed in one visible place ----
    B = cfg.train.batch_size_per_gpu
    cfg.optim.lr = cfg.optim.base_lr * math.sqrt(B * W / 1024.0)  # official sqrt_wrt_1024 scaling rule
    E = cfg.train.OFFICIAL_EPOCH_LENGTH
    total_iters = cfg.optim.epochs * E
    dtype = resolve_dtype(cfg, device)
    # Deviation from official: seeds are train.seed + rank (official always uses 0 + rank and never
    # reads train.seed); the default train.seed=0 gives the official seeds.
    torch.manual_seed(cfg.train.seed + rank)
    random.seed(cfg.train.seed + rank)
    print0(f"global batch {B * W} ({B} per process x {W}), lr {cfg.optim.lr:.3g} (base {cfg.optim.base_lr} x "
           f"sqrt({B * W}/1024)), {total_iters} iterations ({cfg.optim.epochs} epochs of {E}), "
           f"{str(dtype).replace('torch.', '')} on {device}")

    # ---- data ----
    augmentation = make_augmentation(cfg)
    dataset = make_dataset(cfg.train.dataset_path, augmentation, "train")
    print0(f"data: {len(dataset)} images from {cfg.train.dataset_path or 'the built-in shapes dataset'}")

    # ---- model, optimizer, schedules ----
    model, optimizer = build_model_and_optimizer(cfg, device, dtype)
    n_params = sum(p.numel() for p in model.student.backbone.parameters())
    print0(f"student: {cfg.student.arch}/{cfg.student.patch_size}, {n_params / 1e6:.2f}M backbone parameters")
    schedules = build_schedulers(cfg)

    # ---- resume if the output dir holds a checkpoint ----
    start_iter = 0
    path, ckpt = load_latest_checkpoint(output_dir)
    if ckpt is not None:
        check_resume_config(ckpt["config"], cfg, output_dir)
        model.load_state_dict(ckpt["model"], strict=True)
        optimizer.load_state_dict(ckpt["optimizer"])
        model.fp16_scaler.load_state_dict(ckpt["scaler"])
        random.setstate(ckpt["rng"]["python"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and len(ckpt["rng"]["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        start_iter = ckpt["iteration"]
        print0(f"resumed from {path} at iteration {start_iter}")
        del ckpt
    loader = make_pretrain_loader(cfg, dataset, start_iter, rank, W)

    knn_history = {}

    def evaluate(done):  # kNN monitor on the teacher + export of the teacher backbone
        if knn_data is not None:
            results = run_knn(cfg, model.teacher.backbone, knn_data, device, model.autocast_ctx, done, output_dir)
            knn_history[done] = results
            print0(f"kNN at iteration {done}: " + ", ".join(f"k={k} top1 {t1:.1f}%" for k, (t1, _) in results.items()))
        if master_process:
            atomic_save(model.teacher.backbone.state_dict(), os.path.join(output_dir, "teacher_backbone.pth"))

    if start_iter == 0:
        evaluate(0)  # the random-initialisation baseline

    # a CPU side channel so that all ranks agree on stopping without a GPU sync
    stop_group = dist.new_group(backend="gloo") if W > 1 else None
    metrics_file = os.path.join(output_dir, "training_metrics.json")
    loss_names, n_skipped, last_log, data_wait = [], 0, (time.time(), start_iter), 0.0
    bar = tqdm(total=total_iters, initial=start_iter, disable=not master_process, dynamic_ncols=True, desc="train")
    it = start_iter
    data_iter = iter(loader)
    # ---- the training loop ----
    while it < total_iters:
        t_wait = time.perf_counter()
        data = next(data_iter)  # blocks only when the workers are behind: the loop is data-bound
        data_wait += time.perf_counter() - t_wait
        n_skipped += data["n_skipped"]
        # the schedules, indexed by the global iteration; then one step (train_step above)
        lr, wd, mom = schedules["lr"][it], schedules["wd"][it], schedules["mom"][it]
        teacher_temp, last_layer_lr = schedules["teacher_temp"][it], schedules["last_layer_lr"][it]
        frozen = it < cfg.train.freeze_backbone_iterations
        loss_dict = train_step(model, optimizer, data, lr, wd, mom, teacher_temp, last_layer_lr,
                               backbone_lr_factor=0.0 if frozen else 1.0)
        it += 1
        bar.update(1)

        # all ranks agree whether a signal asked us to stop (SIGTERM from a scheduler, Ctrl-C)
        stop = STOP["signal"] is not None
        if stop_group is not None:
            flag = torch.tensor([float(stop)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=stop_group)
            stop = bool(flag.item())
        is_eval = cfg.evaluation.eval_period_iterations and it % cfg.evaluation.eval_period_iterations == 0
        is_save = it % cfg.train.checkpoint_period == 0 or it == total_iters or stop
        # log: losses averaged over ranks, schedules, speed and collapse diagnostics
        if it % cfg.train.log_every == 0 or it == total_iters or is_save or is_eval:
            m = reduce_for_log(loss_dict, model.diagnostics, device)
            loss_names = list(loss_dict)
            check_finite(m, it, loss_names, output_dir)
            now = time.time()
            m.update(iteration=it, total_loss=sum(m[k] for k in loss_names), lr=lr, wd=wd, mom=mom,
                     last_layer_lr=last_layer_lr, teacher_temp=teacher_temp, ln_K=math.log(model.dino_out_dim),
                     img_per_s=B * W * (it - last_log[1]) / max(now - last_log[0], 1e-9), n_skipped=n_skipped,
                     data_wait=data_wait / max(now - last_log[0], 1e-9))  # share of the time spent waiting
            last_log, data_wait = (now, it), 0.0
            if master_process:
                with open(metrics_file, "a") as f:
                    f.write(json.dumps(m) + "\n")
                bar.set_postfix(loss=f"{m['total_loss']:.3f}")
                bar.write(f"it {it:07d}/{total_iters} | loss {m['total_loss']:.4f} | "
                          + " ".join(f"{k.replace('_crops_loss', '').replace('_loss', '')} {m[k]:.3f}"
                                     for k in loss_names)
                          + f" | lr {lr:.2e} | wd {wd:.3f} | mom {mom:.4f} | t_temp {teacher_temp:.4f}"
                          + f" | H(t) {m['teacher_entropy']:.2f}/{m['ln_K']:.2f} | cls_std {m['cls_std']:.2f}"
                          + f" | {m['img_per_s']:.0f} img/s | data wait {100 * m['data_wait']:.0f}%"
                          + (f" | skipped {n_skipped}" if n_skipped else ""))
        if is_eval or it == total_iters:
            evaluate(it)
        if is_save:
            if not params_finite(model):
                raise NonFiniteLoss(f"non-finite weights after iteration {it}; the checkpoints in '{output_dir}' "
                                    f"were left as they were. Lower optim.base_lr or use compute_precision.dtype=fp32")
            if master_process:
                save_checkpoint(output_dir, model, optimizer, model.fp16_scaler, it, cfg, cfg.train.keep_checkpoints)
        if stop:
            bar.close()
            print0(f"stopped by {STOP['signal'] or 'a signal on another rank'} after iteration {it}; "
                   f"checkpoint saved in '{output_dir}'. Run the same command to resume.")
            return model, knn_history
    bar.close()
    return model, knn_history


# -------------------------------------------------------------------------------------------------
# 12. Benchmark (ours): FLOPs counted from the config, the train step timed on synthetic batches,
# the data pipeline timed alone. README "Speed" has the measured numbers.
# -------------------------------------------------------------------------------------------------


def vit_flops(cfg, n_images, img_size):
    """Forward FLOPs of the backbone on n_images of img_size (multiply-adds count 2)."""
    D, depth, _ = VIT_SIZES[cfg.student.arch]
    p = cfg.student.patch_size
    N = (img_size // p) ** 2
    T = 1 + cfg.student.num_register_tokens + N  # tokens per image
    h = 4 * D if cfg.student.ffn_layer == "mlp" else (int(4 * D * 2 / 3) + 7) // 8 * 8
    ffn = 2 * T * D * h * (2 if cfg.student.ffn_layer == "mlp" else 3)  # fc1 + fc2, or w12 (2h) + w3
    block = 2 * T * D * 3 * D + 2 * 2 * T * T * D + 2 * T * D * D + ffn  # qkv, qk^T and attn @ v, proj, ffn
    return n_images * (2 * N * 3 * p * p * D + depth * block)


def head_flops(cfg, n_tokens, section="dino"):
    c = cfg[section]
    hidden = c.head_hidden_dim
    D = VIT_SIZES[cfg.student.arch][0]
    mlp = D * hidden + hidden * hidden * max(c.head_nlayers - 2, 0) + hidden * c.head_bottleneck_dim
    return 2 * n_tokens * (mlp + c.head_bottleneck_dim * c.head_n_prototypes)


def step_flops(cfg, B, n_masked):
    """Model FLOPs of one train step on one process: teacher forward, student forward + backward (3x)."""
    G, L = cfg.crops.global_crops_size, cfg.crops.local_crops_size
    n_loc = cfg.crops.local_crops_number * B
    patch_section = "ibot" if cfg.ibot.separate_head else "dino"
    teacher = vit_flops(cfg, 2 * B, G) + head_flops(cfg, 2 * B) + head_flops(cfg, n_masked, patch_section)
    student = vit_flops(cfg, 2 * B, G) + vit_flops(cfg, n_loc, L) + head_flops(cfg, 2 * B + n_loc) \
        + head_flops(cfg, n_masked, patch_section)
    return teacher + 3 * student


def measure_peak_flops(device, dtype, reps=10):
    """FLOP/s of a large square matmul in this dtype: the achievable peak that utilisation refers to.
    8192 on a GPU, so that each product takes milliseconds and launch overheads do not count."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def benchmark(cfg, device, warmup=3, iters=10):
    """Ours: the real train step on synthetic in-memory batches; prints speed, time split, memory, FLOPs,
    and the same as one JSON line (`result: {...}`) for tables."""
    dtype = resolve_dtype(cfg, device)
    B, W = cfg.train.batch_size_per_gpu, get_world_size()
    cfg.optim.lr = cfg.optim.base_lr * math.sqrt(B * W / 1024.0)
    model, optimizer = build_model_and_optimizer(cfg, device, dtype)
    G, L, p = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.student.patch_size
    crops = [({"global_crops": [torch.randn(3, G, G) for _ in range(2)],
               "local_crops": [torch.randn(3, L, L) for _ in range(cfg.crops.local_crops_number)]}, ())
             for _ in range(B)]
    gen = MaskingGenerator((G // p, G // p), max_num_patches=0.5 * (G // p) ** 2)
    batch = collate_data_and_cast(crops, tuple(cfg.ibot.mask_ratio_min_max), cfg.ibot.mask_sample_probability,
                                  torch.float32, (G // p) ** 2, gen)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {}

    def mark(stage):
        sync()
        now = time.perf_counter()
        times[stage] = times.get(stage, 0.0) + now - times["_last"]
        times["_last"] = now

    for i in range(warmup + iters):
        if i == warmup:
            times.clear()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
        sync()
        times["_last"] = t0 = time.perf_counter()
        train_step(model, optimizer, batch, lr=cfg.optim.lr, wd=0.04, mom=0.994, teacher_temp=0.04,
                   last_layer_lr=cfg.optim.lr, mark=mark)
        times["step"] = times.get("step", 0.0) + time.perf_counter() - t0
    flops = step_flops(cfg, B, int(batch["n_masked_patches"]))
    step = times["step"] / iters
    peak = measure_peak_flops(device, dtype)
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else peak_rss_gib()
    print0(f"benchmark: {cfg.student.arch}/{p}, batch {B} per process x {W}, {G}/{L} px crops, "
           f"{str(dtype).replace('torch.', '')} on {device}, compile {cfg.train.compile}")
    print0(f"images/s: {B / step:.1f} per process, {B * W / step:.1f} total")
    print0("time per step: " + ", ".join(f"{k} {1e3 * times[k] / iters:.1f} ms"
                                          for k in ("teacher", "student", "backward", "optimizer+ema", "step")))
    print0(f"peak memory: {mem:.2f} GiB ({'CUDA max allocated' if device.type == 'cuda' else 'process RSS'})")
    print0(f"model FLOPs per step: {flops / 1e9:.1f} GFLOP; achieved {flops / step / 1e12:.3f} TFLOP/s; "
           f"peak (matmul, same dtype) {peak / 1e12:.3f} TFLOP/s; utilisation {100 * flops / step / peak:.1f}%")
    result = {"arch": f"{cfg.student.arch}/{p}", "batch_per_process": B, "processes": W, "device": str(device),
              "dtype": str(dtype).replace("torch.", ""), "compile": cfg.train.compile, "images_per_s": B / step,
              "step_s": step, **{f"{k}_s": times[k] / iters
                                 for k in ("teacher", "student", "backward", "optimizer+ema")},
              "peak_memory_gib": mem, "flops": flops, "peak_flops": peak, "mfu": flops / step / peak}
    print0("result: " + json.dumps(result))
    return result


def peak_rss_gib():
    """Peak resident memory of this process (ru_maxrss is in KiB on Linux, bytes on macOS; no Windows)."""
    try:
        import resource
    except ImportError:
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** (30 if sys.platform == "darwin" else 20)


def benchmark_data(cfg, path, batches=20):
    """Ours: images/s through decoding, the 2 + L crops and collate, with train.num_workers workers."""
    augmentation = make_augmentation(cfg)
    loader = make_pretrain_loader(cfg, make_dataset(path, augmentation), 0, 0, 1)
    it = iter(loader)
    next(it)  # start the workers
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * cfg.train.batch_size_per_gpu / (time.perf_counter() - t0)
    workers = max(cfg.train.num_workers, 1)
    print(f"data: {rate:.1f} images/s with train.num_workers={cfg.train.num_workers} ({rate / workers:.1f} per worker), "
          f"{cfg.crops.global_crops_size}/{cfg.crops.local_crops_size} px, 2 + {cfg.crops.local_crops_number} crops")
    return rate


# -------------------------------------------------------------------------------------------------
# 13. Command line: training by default; --benchmark, --visualize, --extract-features
# -------------------------------------------------------------------------------------------------


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one clear line instead of argparse's usage dump
        raise UserError(f"{message} (see --help)")


def build_parser():
    p = ArgumentParser(prog="dino_mini", description="DINOv2 self-supervised pre-training in one file.",
                       epilog="Any config key can be set as section.key=value, e.g. optim.epochs=10 "
                              "train.batch_size_per_gpu=32 (keys and defaults: top of dino_mini.py).")
    p.add_argument("--config", help="preset from configs.json (default: 'demo' without --data, 'default' with it)")
    p.add_argument("--data", help="folder of images, searched recursively (default: built-in shapes dataset)")
    p.add_argument("--output-dir", help="checkpoints, metrics and pictures go here (default: train.output_dir)")
    p.add_argument("--pretrained", help="backbone weights to start from or to inspect (Meta's .pth or ours)")
    p.add_argument("--visualize", nargs="+", metavar="IMAGE", help="write PCA and attention pictures")
    p.add_argument("--extract-features", metavar="DIR", help="save normalised cls features of DIR's images")
    p.add_argument("--out", metavar="FILE", help="output file of --extract-features")
    p.add_argument("--patch-features", action="store_true", help="with --extract-features: keep patch tokens too")
    p.add_argument("--image-size", type=int, help="image size for --visualize / --extract-features")
    p.add_argument("--benchmark", action="store_true", help="time the train step on synthetic batches")
    p.add_argument("--benchmark-data", metavar="DIR", help="time the data pipeline alone on DIR's images")
    p.add_argument("opts", nargs="*", metavar="section.key=value", help="config overrides")
    return p


def backbone_for_inference(args, cfg):
    """The ViT to visualise or encode with: --pretrained FILE (architecture read off the file), or the
    teacher of a finished run in --output-dir (teacher_backbone.pth, config.json)."""
    if args.pretrained:
        path = args.pretrained
    elif args.output_dir and os.path.isfile(os.path.join(args.output_dir, "teacher_backbone.pth")):
        path = os.path.join(args.output_dir, "teacher_backbone.pth")
    else:
        raise UserError("give --pretrained FILE, or --output-dir of a run that wrote teacher_backbone.pth")
    state = read_backbone_state(path)
    for key, value in infer_arch(state).items():
        cfg.student[key] = value
    img = int(math.sqrt(state["pos_embed"].shape[1] - 1)) * cfg.student.patch_size
    cfg.crops.global_crops_size = img  # build the grid the file was stored at: loads without resampling
    backbone = build_backbone(cfg, drop_path=False)
    load_pretrained_backbone(backbone, path, state)
    return backbone.eval()


def cmd_extract_features(args, cfg, device):
    if not args.out:
        raise UserError("--extract-features needs --out FILE.pt")
    backbone = backbone_for_inference(args, cfg).to(device)
    size = args.image_size or 224
    if size % backbone.patch_size:
        raise UserError(f"--image-size {size} is not a multiple of the patch size {backbone.patch_size}")
    dataset = ImageFolderDataset(args.extract_features, make_eval_transform(size))
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=min(4, os.cpu_count() or 1))
    cls, patch = [], []
    with torch.no_grad():
        for images, _, _ in tqdm(loader, desc="features"):
            out = backbone.forward_features(images.to(device))
            cls.append(F.normalize(out["x_norm_clstoken"].float(), dim=-1).cpu())  # (b, D)
            if args.patch_features:
                patch.append(F.normalize(out["x_norm_patchtokens"].float(), dim=-1).cpu())  # (b, N, D)
    result = {"paths": [os.path.relpath(p, args.extract_features) for p in dataset.paths], "cls": torch.cat(cls)}
    if args.patch_features:
        result["patch"] = torch.cat(patch)
    atomic_save(result, args.out)
    print(f"wrote {len(dataset)} features of dim {result['cls'].shape[1]} to {args.out}")


def demo_pictures(backbone, cfg, output_dir, device):
    """After the default run: pictures of what the teacher learned, for four built-in val images."""
    shapes = ShapesDataset(4, transform=lambda im: im, seed=1)
    images = [(f"demo_{SHAPES[i]}", shapes.draw(i)[0].resize((96, 96), Image.BICUBIC)) for i in range(4)]
    size = 96 // cfg.student.patch_size * cfg.student.patch_size
    return visualize(backbone, None, output_dir, size, device, images=images)


def main(argv=None):
    """Entry point. Returns the exit code: 0 on success, 2 on bad input (one `dino_mini: error:` line)."""
    try:
        return run(argv)
    except (UserError, torch.cuda.OutOfMemoryError) as e:
        for bar in list(getattr(tqdm, "_instances", [])):  # end an open progress bar's line first
            bar.close()
        message = str(e).strip()
        if isinstance(e, torch.cuda.OutOfMemoryError):  # what to change, not a CUDA traceback
            message = (f"GPU out of memory ({message.splitlines()[0][:120]}); lower train.batch_size_per_gpu, "
                       f"use compute_precision.dtype=bf16, fewer crops.local_crops_number or a smaller student.arch")
        if "Original Traceback" in message:  # raised in a DataLoader worker: keep its last line only
            message = message.splitlines()[-1].split("UserError: ", 1)[-1]
        print(f"dino_mini: error: {message}", file=sys.stderr, flush=True)
        return 2


def run(argv):
    args = build_parser().parse_args(argv)
    preset = args.config or ("default" if args.data else "demo")
    overrides = list(args.opts)
    if args.data is not None:
        overrides.append(f"train.dataset_path={args.data}")
    if args.pretrained and not (args.visualize or args.extract_features):
        overrides.append(f"student.pretrained_weights={args.pretrained}")
    cfg = load_config(preset, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    if args.benchmark_data:
        find_images(args.benchmark_data)
        return benchmark_data(cfg, args.benchmark_data) and 0
    if args.benchmark:
        rank, _, _, device = setup_distributed()
        try:
            benchmark(cfg, device)
        finally:
            cleanup_distributed()
        return 0
    if args.visualize or args.extract_features:
        if args.extract_features:
            return cmd_extract_features(args, cfg, device) or 0
        for path in args.visualize:
            if not os.path.isfile(path):
                raise UserError(f"image '{path}' not found")
        backbone = backbone_for_inference(args, cfg).to(device)
        out_dir = args.output_dir or os.path.dirname(os.path.abspath(args.visualize[0]))
        os.makedirs(out_dir, exist_ok=True)
        size = args.image_size or 224
        size = size // backbone.patch_size * backbone.patch_size
        for f in visualize(backbone, args.visualize, out_dir, size, device):
            print(f"wrote {f}")
        return 0

    # ---- check the inputs before any work: data, pretrained weights, output dir ----
    output_dir = args.output_dir or cfg.train.output_dir
    cfg.train.output_dir = output_dir
    if cfg.train.dataset_path:
        find_images(cfg.train.dataset_path)
    if cfg.student.pretrained_weights and not os.path.isfile(cfg.student.pretrained_weights):
        raise UserError(f"pretrained weights '{cfg.student.pretrained_weights}' not found")
    try:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, ".write_test"), "w"):
            pass
        os.remove(os.path.join(output_dir, ".write_test"))
    except OSError as e:
        raise UserError(f"output dir '{output_dir}' is not writable ({e.strerror})") from None
    knn_data = make_knn_data(cfg)
    if cfg.dino.koleo_loss_weight > 0 and cfg.train.batch_size_per_gpu < 2:
        print("dino_mini: warning: KoLeo needs 2+ images per process; it is 0 with batch_size_per_gpu=1",
              file=sys.stderr)

    rank, local_rank, world_size, device = setup_distributed()
    STOP["signal"] = None
    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        print0(f"config: {preset} preset" + (f" + {' '.join(overrides)}" if overrides else ""))
        print0(json.dumps(cfg, indent=1))
        if rank == 0:
            with open(os.path.join(output_dir, "config.json"), "w") as f:
                json.dump(cfg, f, indent=1)
        t0 = time.time()
        model, knn = train(cfg, device, output_dir, knn_data)
        if STOP["signal"] is None and rank == 0:
            print0(f"done in {time.time() - t0:.0f}s; outputs in '{output_dir}'")
            if len(knn) >= 2:
                first, last = min(knn), max(knn)
                k = 20 if 20 in knn[first] else min(knn[first])
                print0(f"kNN top-1 (k={k}): {knn[first][k][0]:.1f}% at iteration {first} -> "
                       f"{knn[last][k][0]:.1f}% at iteration {last}")
            if not cfg.train.dataset_path:
                for f in demo_pictures(model.teacher.backbone, cfg, output_dir, device):
                    print0(f"wrote {f}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
