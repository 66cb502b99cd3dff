"""dino_mini: DINOv2 self-supervised pre-training in one readable PyTorch file.

DINOv2 (Oquab et al. 2023, arXiv:2304.07193) trains a Vision Transformer without labels. A student
network learns to match an exponential-moving-average teacher on other crops of the same image (the
DINO loss, arXiv:2104.14294) and to predict the teacher's tokens at masked patches (the iBOT loss,
arXiv:2111.07832), while a KoLeo term spreads the features out (arXiv:1806.03198). The code follows
Meta's facebookresearch/dinov2 formula for formula, with the same names; each place where it
deliberately differs says `# Deviation from official:` and the README lists them all.

Run it:
    python dino_mini.py                                    # CPU demo on built-in shapes, 4-7 min
    python dino_mini.py --data ~/my_images                 # your images: small preset on a CPU
    torchrun --nproc_per_node 8 dino_mini.py --data /imagenet           # one 8-GPU node
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        dino_mini.py --data /imagenet --output-dir /shared/run1        # the same line on each node
    python dino_mini.py --config vits16_1node --data DIR optim.epochs=10   # a preset + overrides
    python dino_mini.py --visualize img.jpg --pretrained dinov2_vits14_pretrain.pth
    python dino_mini.py --extract-features DIR --pretrained run/teacher_backbone.pth --out f.pt
    python dino_mini.py --benchmark --config vits16_1node

Reading order. Sections 1-9 are the training story, in the order a run uses them; 10-15 are the
machinery around it, which a first reading can skip.
     1. Config              the official defaults, presets, the lr scaling rule
     2. Processes           torchrun, one all-reduce helper, seeds
     3. Data                multi-crop augmentation (geometry, batched colour), block masks,
                            collate, sampler, loader
     4. Vision Transformer  DinoVisionTransformer with the official parameter names
     5. Heads               DINOHead: MLP, L2 norm, weight-normalised prototypes
     6. Losses              DINO (centering or Sinkhorn-Knopp), iBOT, KoLeo
     7. SSLMetaArch         one forward-backward: teacher, student, the four losses, EMA
     8. Optimisation        parameter groups with layer-wise decay, the five schedules
     9. Training loop       train_step() is one iteration, train() the whole run
    10. Checkpoints, logs   atomic saves, exact resume, teacher dumps, loading Meta's weights
    11. Data folders        the compact image list, ImageNet's layout, the built-in shapes
    12. Evaluation          kNN monitor, raw-pixel baseline, where the cls token looks
    13. Pictures/features   PCA and attention pictures, feature extraction
    14. Benchmark           FLOPs of a step, the step and the data pipeline timed
    15. Command line        override checks, main(): one `dino_mini: error:` line for bad input
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
# small runs are presets in configs.json. Overrides are checked in section 15.
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
        "checkpoint_period": 0,  # ours: 0 = every 3 epochs (3 x OFFICIAL_EPOCH_LENGTH), as official
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
        # ours: Gaussian blur probability of global crop 1, global crop 2, local crops; the values
        # official code applies (its own numbers are inverted, see DataAugmentationDINO)
        "blur_probabilities": [0.0, 0.9, 0.5],
        "flip_probability": 0.5,  # ours: of a horizontal flip, per crop (official: 0.5)
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

def print0(*args, **kwargs):
    """print on rank 0 only, so an 8-GPU run does not say everything 8 times."""
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)

def seed_everything(seed):
    """Seed torch (CPU and CUDA) and Python's random, as official fix_random_seeds(0 + rank)."""
    random.seed(seed)
    torch.manual_seed(seed)

@contextlib.contextmanager
def seeded_rng(seed):
    """Run a block with torch's and Python's global generators seeded by `seed`, then put them
    back as they were: the block's randomness depends on the seed alone, not on what ran before in
    this process, and the process's own stream (drop path, say) is left untouched."""
    saved = random.getstate()
    with torch.random.fork_rng(devices=[]):  # saves and restores the CPU generator only ...
        torch.default_generator.manual_seed(seed)  # ... so seed that one (torch.manual_seed
        random.seed(seed)  # would also reseed every CUDA device, and leave them changed)
        try:
            yield
        finally:
            random.setstate(saved)


# -------------------------------------------------------------------------------------------------
# 3. Data (dinov2/data/augmentations.py, masking.py, collate.py, samplers.py)
# Each image becomes 2 global and L local crops, cut in the loader's workers and coloured a batch
# at a time where the model runs; half of the global crops get a block mask for iBOT; the collate
# stacks them crop-major. An endless sharded sampler feeds every rank. (Listing folders and the
# built-in dataset are machinery: section 11.)
# -------------------------------------------------------------------------------------------------

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm")

class DataAugmentationDINO:
    """Two global crops and `local_crops_number` local crops of one image (DINO sec. 3.1), made in
    two halves: geometry() per image in the loader's workers (crops and flips, kept as uint8, and
    every random draw of the colour stage), colour() per batch where the model runs. Calling it
    on one image runs both and returns its finished crops, as official."""

    def __init__(self, global_crops_scale, local_crops_scale, local_crops_number,
                 global_crops_size=224, local_crops_size=96, blur_probabilities=(0.0, 0.9, 0.5),
                 flip_probability=0.5):
        self.local_crops_number = local_crops_number
        bicubic = transforms.InterpolationMode.BICUBIC
        self.geometric_augmentation_global = transforms.Compose([
            transforms.RandomResizedCrop(global_crops_size, scale=global_crops_scale,
                                         interpolation=bicubic),
            transforms.RandomHorizontalFlip(flip_probability)])
        self.geometric_augmentation_local = transforms.Compose([
            transforms.RandomResizedCrop(local_crops_size, scale=local_crops_scale,
                                         interpolation=bicubic),
            transforms.RandomHorizontalFlip(flip_probability)])
        # Gaussian blur: the official GaussianBlur(p) wraps RandomApply(p=1 - p), so the
        # probabilities written there (1.0, 0.1, 0.5) are inverted. The released models were
        # trained with what the code did, not with what it says: no blur on global crop 1, blur
        # 90% of the time on global crop 2, 50% on local crops. We write the effective values.
        # (Ours: blur_probabilities sets them; a 9-tap kernel wipes out the strokes of small crops.)
        # Solarize only global crop 2, with probability 0.2: the two views differ on purpose.
        # Colour jitter 80% of the time, grayscale 20%, on every crop. Per crop (global 1, global
        # 2, the locals), the probability of jitter, grayscale, blur, solarize:
        p_global_1, p_global_2, p_local = blur_probabilities
        self.p_apply = torch.tensor([[0.8, 0.2, p_global_1, 0.0], [0.8, 0.2, p_global_2, 0.2]]
                                    + [[0.8, 0.2, p_local, 0.0]] * local_crops_number)

    def __call__(self, image):
        crops = self.geometry(image)
        params = crops["colour"]
        global_crops = list(self.colour(torch.stack(crops["global_crops"]), params[:2]))
        local_crops = (list(self.colour(torch.stack(crops["local_crops"]), params[2:]))
                       if self.local_crops_number else [])
        return {"global_crops": global_crops, "global_crops_teacher": global_crops,  # the same
                "local_crops": local_crops, "offsets": ()}

    def geometry(self, image):
        """The worker's half: 2 + L crops of a PIL image, each (3, size, size) uint8, and their
        colour parameters (2 + L, 12), all drawn from the torch generator (the sample's seed)."""
        as_uint8 = transforms.functional.pil_to_tensor
        global_crops = [as_uint8(self.geometric_augmentation_global(image)) for _ in range(2)]
        local_crops = [as_uint8(self.geometric_augmentation_local(image))
                       for _ in range(self.local_crops_number)]
        return {"global_crops": global_crops, "global_crops_teacher": global_crops,
                "local_crops": local_crops, "offsets": (), "colour": self.colour_parameters()}

    def colour_parameters(self):
        """One row per crop, the draws of torchvision's RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1),
        p=0.8), RandomGrayscale(0.2), RandomApply(GaussianBlur(9, (0.1, 2.0)), p) and
        RandomSolarize(128, p): columns COLOUR_COLUMNS."""
        # Deviation from official: the colour stage's random draws are made per image in the
        # worker, its operations run on whole batches of tensors where the model runs (the GPU);
        # the same distribution, another random stream.
        n = len(self.p_apply)
        applies = torch.rand(n, 4) < self.p_apply  # (n, 4): jitter, grayscale, blur, solarize
        low, high = JITTER_RANGES.T  # (4,) each
        factors = low + (high - low) * torch.rand(n, 4)  # brightness, contrast, saturation, hue
        order = torch.rand(n, 4).argsort(dim=1)  # a uniform random order of the 4, as randperm(4)
        sigma = torch.where(applies[:, 2], 0.1 + 1.9 * torch.rand(n), 0.0)  # U[0.1, 2]; 0: none
        return torch.cat([applies[:, :1], factors, order, applies[:, 1:2], sigma[:, None],
                          applies[:, 3:]], dim=1).float()  # (n, 12)

    def colour(self, crops, params):
        """The batch's half: uint8 crops (n, 3, h, w) on any device, each with its own row of
        colour parameters (n, 12), to normalised float crops. The official order: jitter (its four
        operations in the crop's own order), grayscale, blur, solarize, normalise."""
        x = crops.float() / 255  # (n, 3, h, w) in [0, 1], as ToTensor gives
        params = params.to(x.device)

        def apply(rows, op, *args):  # op on the crops of the selected rows only
            if rows.any():
                x[rows] = op(x[rows], *(a[rows] for a in args))

        factors = params[:, 1:5, None, None, None]  # (n, 4, 1, 1, 1)
        for position in range(4):
            for op, adjust in enumerate(JITTER_OPS):
                apply((params[:, 0] > 0) & (params[:, 5 + position] == op), adjust, factors[:, op])
        apply(params[:, 9] > 0, lambda x: luma(x).expand(-1, 3, -1, -1))  # grayscale, 3 channels
        apply(params[:, 10] > 0, gaussian_blur, params[:, 10])
        apply(params[:, 11] > 0, lambda x: torch.where(x >= 128 / 255, 1 - x, x))  # solarize
        mean, std = (x.new_tensor(v).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
        return (x - mean) / std

    def colour_batch(self, batch, device):
        """colour() on a collated batch, on `device`: its uint8 crops become normalised floats."""
        for kind in ("global", "local"):
            crops, params = batch[f"collated_{kind}_crops"], batch.pop(f"{kind}_colour", None)
            if params is not None and len(crops):  # not coloured yet
                batch[f"collated_{kind}_crops"] = self.colour(
                    crops.to(device, non_blocking=True), params)
        return batch

COLOUR_COLUMNS = ("jitter", "brightness", "contrast", "saturation", "hue", "op 1", "op 2", "op 3",
                  "op 4", "grayscale", "blur sigma", "solarize")
JITTER_RANGES = torch.tensor([[0.6, 1.4], [0.6, 1.4], [0.8, 1.2], [-0.1, 0.1]])  # ColorJitter's

# The colour operations on float crops x (n, 3, h, w) in [0, 1], one factor f (n, 1, 1, 1) per
# crop, with the formulas of the torchvision ops that official applies to PIL images.
def luma(x):  # (n, 3, h, w) -> (n, 1, h, w): ITU-R 601-2 luma, as PIL's convert("L")
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)

def blend(x, f, other):  # f = 1 keeps x, f = 0 gives `other`
    return (f * x + (1 - f) * other).clamp(0, 1)

def adjust_hue(x, f):
    """Rotate the hue by f turns, keeping value (max) and chroma (max - min)."""
    f = torch.trunc(f * 255) / 255  # as official's PIL path: a whole number of 1/255 turns
    v, c = x.amax(1, keepdim=True), x.amax(1, keepdim=True) - x.amin(1, keepdim=True)
    r, g, b, c_safe = x[:, :1], x[:, 1:2], x[:, 2:], torch.where(c > 0, c, 1.0)
    h = torch.where(v == r, (g - b) / c_safe,  # hue in sixths of a turn, from the largest channel
                    torch.where(v == g, 2 + (b - r) / c_safe, 4 + (r - g) / c_safe))
    h = (h / 6 + f) % 1  # (n, 1, h, w) turns
    # back to RGB: channel n = 5, 3, 1 (R, G, B) is v - c * clamp(min(k, 4 - k), 0, 1),
    # k = (n + 6 h) mod 6: the piecewise-linear hexcone written once for the three channels
    k = (x.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1) + 6 * h) % 6
    return v - c * torch.minimum(k, 4 - k).clamp(0, 1)

JITTER_OPS = (  # the numbers of the "op" columns
    lambda x, f: blend(x, f, 0.0),  # brightness: from black
    lambda x, f: blend(x, f, luma(x).mean(dim=(1, 2, 3), keepdim=True)),  # contrast: mean grey
    lambda x, f: blend(x, f, luma(x)),  # saturation: from the crop's own grayscale
    adjust_hue)

def gaussian_blur(x, sigma, kernel_size=9):
    """torchvision's gaussian_blur (reflect padding, a kernel_size-tap kernel of each crop's
    sigma (n,)) as two 1-D passes: the same 2-D kernel, 2 x 9 instead of 81 taps per pixel."""
    n, C, H, W = x.shape
    t = torch.arange(kernel_size, device=x.device) - kernel_size // 2  # -4 ... 4
    kernel = torch.exp(-0.5 * (t / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (n C, 9)
    y = F.pad(x.reshape(1, n * C, H, W), [kernel_size // 2] * 4, mode="reflect")
    y = F.conv2d(y, kernel.view(n * C, 1, 1, kernel_size), groups=n * C)  # along rows
    return F.conv2d(y, kernel.view(n * C, 1, kernel_size, 1), groups=n * C).view(n, C, H, W)

def make_augmentation(cfg):
    return DataAugmentationDINO(**cfg.crops)  # the crops keys are its argument names

class MaskingGenerator:
    """Block-wise masks for iBOT (BEiT, arXiv:2106.08254): rectangles of random area and aspect
    ratio are added until the target number of patches is masked. Never masks more than that."""

    def __init__(self, input_size, max_num_patches=None, min_num_patches=4, min_aspect=0.3,
                 max_aspect=None):
        self.height, self.width = input_size if isinstance(input_size, tuple) else (input_size,) * 2
        self.max_num_patches = (max_num_patches if max_num_patches is not None
                                else self.height * self.width)
        self.min_num_patches = min_num_patches
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))

    def _mask(self, mask, max_mask_patches):
        """Try up to 10 random rectangles; keep the first that adds new masked patches."""
        delta = 0
        for _ in range(10):
            target_area = random.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(random.uniform(*self.log_aspect_ratio))  # log-uniform
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = random.randint(0, self.height - h)
                left = random.randint(0, self.width - w)
                box = mask[top:top + h, left:left + w]
                new = h * w - int(box.sum())
                if 0 < new <= max_mask_patches:  # the box must add something, never overshoot
                    box.fill_(True)
                    delta += new
            if delta > 0:
                break
        return delta

    def __call__(self, num_masking_patches=0):
        # Deviation from official: returns a torch bool tensor instead of a numpy array.
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
    """Stack crops crop-major ([view 1 of all images; view 2 of all images]) and draw iBOT masks
    for int(2B x mask_probability) of the 2B global crops, with mask ratios stratified over
    `mask_ratio_tuple`. Each sample is (crops, label, ...); labels are never used."""
    n_global_crops = len(samples_list[0][0]["global_crops"])
    n_local_crops = len(samples_list[0][0]["local_crops"])
    collated_global_crops = torch.stack([s[0]["global_crops"][i] for i in range(n_global_crops)
                                         for s in samples_list])
    collated_local_crops = torch.stack([s[0]["local_crops"][i] for i in range(n_local_crops)
                                        for s in samples_list]) if n_local_crops else torch.zeros(0)
    B = len(collated_global_crops)  # 2 x images: every global crop may get a mask
    n_samples_masked = int(B * mask_probability)
    probs = torch.linspace(*mask_ratio_tuple, n_samples_masked + 1)  # one ratio bin per mask
    upperbound = 0  # the official static size of the masked-token buffers
    masks_list = []
    for i in range(n_samples_masked):
        prob_min, prob_max = probs[i], probs[i + 1]
        masks_list.append(mask_generator(int(n_tokens * random.uniform(prob_min, prob_max))))
        upperbound += int(n_tokens * prob_max)
    for _ in range(n_samples_masked, B):
        masks_list.append(mask_generator(0))
    random.shuffle(masks_list)  # masks land on random crops of either view
    collated_masks = torch.stack(masks_list).flatten(1)  # (2B, N) bool
    mask_indices_list = collated_masks.flatten().nonzero().flatten()  # into the 2B x N tokens
    # each masked token weighs 1 / (masked tokens in its crop): every masked crop counts the same
    masks_weight = (1 / collated_masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(
        collated_masks)[collated_masks]
    return {
        "collated_global_crops": collated_global_crops.to(dtype),  # (2B, 3, G, G)
        "collated_local_crops": collated_local_crops.to(dtype),  # (L x B, 3, l, l)
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "upperbound": upperbound,
        "n_masked_patches": torch.full((1,), fill_value=mask_indices_list.shape[0],
                                       dtype=torch.long),
    }

class ImageFolderDataset(torch.utils.data.Dataset):
    """The images of an ImageList through a transform. An unreadable or truncated file is skipped
    (the next image is used instead) and counted: items are (transformed, label, n_skipped)."""

    def __init__(self, images, transform):
        self.images, self.transform, self.labels = images, transform, images.labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        for skipped in range(min(len(self), 100)):
            i = (index + skipped) % len(self)
            path = os.path.join(self.images.root, self.images.relpath(i))
            try:
                img = load_rgb(path)
            except Exception as e:  # noqa: BLE001 - any decoder error means "skip this file"
                print(f"dino_mini: warning: skipping unreadable image {path} ({e})",
                      file=sys.stderr)
                continue
            return self.transform(img), self.images.labels[i], skipped
        raise UserError(f"{min(len(self), 100)} unreadable images in a row near "
                        f"{self.images.relpath(index)} in '{self.images.root}'; "
                        f"is this a folder of images?")

def make_eval_transform(crop_size):
    """The official eval transform, Resize(256) + CenterCrop(224), scaled to crop_size."""
    return transforms.Compose([
        transforms.Resize(round(crop_size * 256 / 224),
                          interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(crop_size), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

class InfiniteSampler(torch.utils.data.Sampler):
    """Endless stream of (dataset index, sample seed) for one rank: the official SHARDED_INFINITE
    sampler that train.py selects (dinov2/data/samplers.py). One permutation of the dataset, seeded
    by `seed`, gives rank r the fixed shard perm[r::W] of len // W indices for the whole run; on
    every pass the shard is reshuffled under the seed seed + r + (pass << 24), by the official
    `_shuffle_tensor_slice` (an inside-out Fisher-Yates shuffle), so the same seed gives the same
    stream as official. Position p of the stream gets its own seed for its crops (SeededSamples);
    `start` skips the first positions, so a resumed run continues the same stream."""

    def __init__(self, size, seed=0, rank=0, world_size=1, start=0):
        self.size, self.seed, self.rank, self.world_size, self.start = (size, seed, rank,
                                                                        world_size, start)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(self.size, generator=g, dtype=torch.int32 if self.size <= 2 ** 31
                              else torch.int64)  # the official dtype: the same permutation
        shard = perm[self.rank::self.world_size][:self.size // self.world_size].tolist()
        n_pass, offset = divmod(self.start, len(shard))
        while True:
            g.manual_seed(self.seed + self.rank + (n_pass << 24))
            order = [0] * len(shard)
            for i, index in enumerate(shard):  # inside out: put each index at a random place
                j = int(torch.randint(0, i + 1, (1,), generator=g)) if i > 0 else 0
                order[i], order[j] = order[j], index
            for i in range(offset, len(order)):
                position = n_pass * len(shard) + i
                # hash() of a tuple of ints is the same in every process and on every run
                yield order[i], hash((self.seed, self.rank, position)) % 2 ** 63
            n_pass, offset = n_pass + 1, 0

class SeededSamples(torch.utils.data.Dataset):
    """Ours: item (index, seed) is dataset[index] made under its own seed, plus that seed. The
    batches are then a function of (train.seed, rank, iteration) alone: the same for any number
    of DataLoader workers, and the same after a resume, when the workers start afresh."""

    # Deviation from official: crops are seeded per sample; official workers draw from their
    # own per-worker streams, so a resumed or re-sharded run sees other crops and masks.
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index_and_seed):
        index, seed = index_and_seed
        with seeded_rng(seed):
            return (*self.dataset[index], seed)

def collate_pretrain(samples, augmentation=None, **kwargs):
    """collate_data_and_cast under the batch's own seed (so the masks, too, depend only on the
    position in the stream), plus the crops' colour parameters in the same crop-major order, how
    many unreadable files were skipped, and the colour stage itself if `augmentation` is given."""
    with seeded_rng(hash((samples[0][-1], 1)) % 2 ** 63):
        batch = collate_data_and_cast(samples, **kwargs)
    n = 2 * len(samples)  # global crops: the colour rows go crop-major too
    colour = torch.stack([s[0]["colour"] for s in samples], dim=1).flatten(0, 1)  # ((2 + L) B, 12)
    batch["global_colour"], batch["local_colour"] = colour[:n], colour[n:]
    batch["n_skipped"] = sum(s[2] for s in samples)
    return augmentation.colour_batch(batch, "cpu") if augmentation else batch

def make_pretrain_loader(cfg, dataset, start_iter, rank, world_size, colour_in_loader=None):
    """Batches of B images from iteration start_iter on, for this rank (official train.py). The
    dataset makes geometry() crops; their colour stage runs in the loader's collate when
    colour_in_loader (a DataAugmentationDINO) is given, else the uint8 crops come out."""
    grid = cfg.crops.global_crops_size // cfg.student.patch_size  # patches per side
    mask_generator = MaskingGenerator(input_size=(grid, grid), max_num_patches=0.5 * grid * grid)
    # Deviation from official: crops cross the loader as uint8 (official collates fp16 crops).
    collate_fn = partial(collate_pretrain, mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
                         mask_probability=cfg.ibot.mask_sample_probability, dtype=torch.uint8,
                         n_tokens=grid * grid, mask_generator=mask_generator,
                         augmentation=colour_in_loader)
    B = cfg.train.batch_size_per_gpu
    if len(dataset) < world_size:
        raise UserError(f"{len(dataset)} images cannot be shared among {world_size} processes")
    # Deviation from official: the sampler is seeded by train.seed and resumes mid-stream; official
    # seeds it with the start iteration, so its data order changes on resume.
    sampler = InfiniteSampler(len(dataset), seed=cfg.train.seed, rank=rank, world_size=world_size,
                              start=start_iter * B)
    workers = cfg.train.num_workers
    # its own generator, so that making a loader never draws from the training process's stream
    return torch.utils.data.DataLoader(
        SeededSamples(dataset), batch_size=B, sampler=sampler, num_workers=workers,
        collate_fn=collate_fn, pin_memory=torch.cuda.is_available(), drop_last=True,
        persistent_workers=workers > 0, generator=torch.Generator())


# -------------------------------------------------------------------------------------------------
# 4. Vision Transformer (dinov2/models/vision_transformer.py, dinov2/layers/*)
# Parameter names equal those of the official block_chunks=0 model, so Meta's released backbones
# load with strict=True and our exported teachers load into theirs.
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
        assert H % p == 0 and W % p == 0, f"image size {H}x{W} is not a multiple of patch {p}"
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
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, C / heads)
        if return_attention:  # the softmax weights themselves, for pictures and evaluation
            return ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, N, N)
        # Deviation from official: PyTorch's fused attention (flash or memory-efficient kernels on
        # GPU) instead of xformers; official's own non-xformers path calls the same function.
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, C / heads)
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
    """SwiGLU feed-forward (ViT-g): w3(silu(a) * b) with a, b = w12(x) split in two. The hidden
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
    """Per-channel residual scale gamma (CaiT), initialised small: deep nets start near identity."""

    def __init__(self, dim, init_values=1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma

def drop_add_residual_stochastic_depth(x, residual_func, sample_drop_ratio):
    """Stochastic depth, official "batch subset" flavour: compute the residual branch for a random
    subset of int(b (1 - ratio)) samples only and add it back scaled by b / subset. Cheaper than
    masking per sample, and the same in expectation."""
    b = x.shape[0]
    subset = max(int(b * (1 - sample_drop_ratio)), 1)
    brange = torch.randperm(b, device=x.device)[:subset]
    residual = residual_func(x[brange])  # (subset, N, D)
    out = torch.index_add(x.flatten(1), 0, brange, residual.flatten(1).to(x.dtype),
                          alpha=b / subset)
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
            # Deviation from official: the subset drop path at any rate > 0. The official student
            # runs through xformers nested tensors, which do exactly this; its plain-tensor path
            # would draw per-sample Bernoulli masks for rates <= 0.1. Each call draws its own
            # subset, so crop groups and branches get independent draws, as official.
            x = drop_add_residual_stochastic_depth(x, attn_residual, self.sample_drop_ratio)
            return drop_add_residual_stochastic_depth(x, ffn_residual, self.sample_drop_ratio)
        x = x + attn_residual(x)
        return x + ffn_residual(x)

class DinoVisionTransformer(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=True, ffn_bias=True, proj_bias=True,
                 drop_path_rate=0.0, drop_path_uniform=False, init_values=None, ffn_layer="mlp",
                 block_chunks=0, num_register_tokens=0, interpolate_antialias=False,
                 interpolate_offset=0.1):
        super().__init__()
        # block_chunks is accepted for the official signature; it only grouped blocks for FSDP.
        # Deviation from official: blocks are always stored flat (the block_chunks=0 key layout).
        assert ffn_layer in ("mlp", "swiglu", "swiglufused"), f"unknown ffn_layer {ffn_layer}"
        self.num_features = self.embed_dim = embed_dim
        self.num_tokens = 1
        self.n_blocks = depth
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
        dpr = ([drop_path_rate] * depth if drop_path_uniform
               else torch.linspace(0, drop_path_rate, depth).tolist())
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, proj_bias, ffn_bias, dpr[i],
                  init_values, ffn_layer) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # replaces masked patches
        self.init_weights()

    def init_weights(self):
        """Official init: pos_embed N(0, 0.02) (truncated at +-2 absolute: never, in practice), cls
        and register tokens N(0, 1e-6), every Linear trunc_normal(0.02) with zero bias; the
        patch-embed conv and the LayerNorms keep PyTorch's defaults; mask_token starts at zero."""
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
        """Resize the learned position grid to the input's patch grid (bicubic, in fp32); w is the
        image height and h its width, as in the official code. The 0.1 offset (DINO v1's guard
        against rounding) makes PyTorch sample with the given scale factors, slightly unlike
        asking for the output size; the register models ask for the size, with antialiasing."""
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
        patch_pos_embed = F.interpolate(patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2),
                                        mode="bicubic", antialias=self.interpolate_antialias,
                                        **kwargs)
        assert (w0, h0) == patch_pos_embed.shape[-2:]
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)

    def prepare_tokens_with_masks(self, x, masks=None):
        B, _, w, h = x.shape
        x = self.patch_embed(x)  # (B, N, D)
        if masks is not None:  # (B, N) bool: masked patches become the learned mask token ...
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # (B, 1 + N, D)
        x = x + self.interpolate_pos_encoding(x, w, h)  # ... and still get their position
        if self.register_tokens is not None:  # registers go after cls, without a position
            x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]),
                          dim=1)
        return x  # (B, 1 + R + N, D)

    def forward_features(self, x, masks=None):
        if isinstance(x, list):  # official: one packed xformers call; here one call per group
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
        """Outputs of the last n blocks (or of the blocks listed in n), as linear probes use."""
        B, _, H, W = x.shape
        x = self.prepare_tokens_with_masks(x)
        take = range(len(self.blocks) - n, len(self.blocks)) if isinstance(n, int) else n
        outputs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in take:
                outputs.append(x)
        assert len(outputs) == len(take), f"only {len(outputs)} / {len(take)} blocks found"
        outputs = [self.norm(out) for out in outputs] if norm else outputs
        class_tokens = [out[:, 0] for out in outputs]
        outputs = [out[:, 1 + self.num_register_tokens:] for out in outputs]
        if reshape:
            p = self.patch_size
            outputs = [o.reshape(B, H // p, W // p, -1).permute(0, 3, 1, 2).contiguous()
                       for o in outputs]
        return tuple(zip(outputs, class_tokens)) if return_class_token else tuple(outputs)

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
    return DinoVisionTransformer(patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                                 num_heads=num_heads, mlp_ratio=4, **kwargs)

vit_pico, vit_tiny = partial(_vit, "vit_pico"), partial(_vit, "vit_tiny")
vit_small, vit_base = partial(_vit, "vit_small"), partial(_vit, "vit_base")
vit_large, vit_giant2 = partial(_vit, "vit_large"), partial(_vit, "vit_giant2")

def build_backbone(cfg, drop_path=True):
    """The student or teacher ViT from cfg.student (official models/__init__.py:build_model)."""
    s = cfg.student
    kwargs = dict(img_size=cfg.crops.global_crops_size, patch_size=s.patch_size,
                  init_values=s.layerscale, ffn_layer=s.ffn_layer, qkv_bias=s.qkv_bias,
                  proj_bias=s.proj_bias, ffn_bias=s.ffn_bias,
                  num_register_tokens=s.num_register_tokens,
                  interpolate_offset=s.interpolate_offset,
                  interpolate_antialias=s.interpolate_antialias)
    if drop_path:  # the teacher has none
        kwargs.update(drop_path_rate=s.drop_path_rate, drop_path_uniform=s.drop_path_uniform)
    return _vit(s.arch, **kwargs)


# -------------------------------------------------------------------------------------------------
# 5. Heads (dinov2/layers/dino_head.py)
# A 3-layer MLP to a 256-d bottleneck, L2-normalised, then a weight-normalised linear layer onto
# K prototypes: the logits are cosine similarities to the prototypes, times a learned g.
# -------------------------------------------------------------------------------------------------

class WeightNormLinear(nn.Module):
    """Linear layer without bias whose weight is g * v / ||v|| per output row (Salimans & Kingma
    2016): the parameters (weight_g (K, 1), weight_v (K, in)) and maths of the deprecated
    torch.nn.utils.weight_norm that the official head uses, so their state dicts load."""

    def __init__(self, in_features, out_features):
        super().__init__()
        v = nn.Linear(in_features, out_features, bias=False).weight.detach()  # PyTorch's init
        self.weight_g = nn.Parameter(v.norm(dim=1, keepdim=True))
        self.weight_v = nn.Parameter(v.clone())

    def forward(self, x):
        weight = self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))
        return F.linear(x, weight)  # (T, K)

class DINOHead(nn.Module):
    """Projection head: MLP -> L2-normalise -> weight-normalised linear onto K prototypes."""

    def __init__(self, in_dim, out_dim, use_bn=False, nlayers=3, hidden_dim=2048,
                 bottleneck_dim=256, mlp_bias=True):
        super().__init__()
        assert not use_bn, "the official recipe uses no batch norm in the head"
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            layers = [nn.Linear(in_dim, bottleneck_dim, bias=mlp_bias)]
        else:  # Linear-GELU, (Linear-GELU) x (nlayers - 2), Linear: keys mlp.0, mlp.2, mlp.4
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
# The teacher's head output becomes a target distribution, either by subtracting a running centre
# and sharpening with a low temperature (DINO), or by Sinkhorn-Knopp (SwAV, arXiv:2006.09882),
# which balances how often each prototype is used. The student is trained by cross-entropy to it.
# Without the centre, one prototype would win for every image; without sharpening, every target
# would become uniform. Both ends are collapse: every image gets the same output.
# -------------------------------------------------------------------------------------------------

@torch.no_grad()
def sinkhorn_knopp(teacher_output, teacher_temp, n_rows_total, n_iterations=3):
    """Teacher logits (n, K) to targets whose rows sum to 1 while, over the global batch of
    n_rows_total rows, every prototype gets the same total mass 1/K: alternate row and column
    normalisation of Q = exp(z / T) (no max-subtraction, as official), with sums over all ranks."""
    # Deviation from official: float64 (official: float32); at our presets' teacher temperature
    # 0.01, z / T reaches 100 and float32's exp overflows above 88 (NaN targets).
    Q = torch.exp(teacher_output.double() / teacher_temp).t()  # (K, n)
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
    return Q.t().float()  # (n, K)

class CenteredTeacherLoss(nn.Module):
    """What DINOLoss and iBOTPatchLoss share: the centre, an EMA of the teacher logits, updated
    one iteration late. update_center() starts an (async) all-reduce of this batch's sum; the next
    softmax_center_teacher() waits for it and applies c <- m c + (1 - m) x batch mean."""

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
        self.apply_center_update()  # the centre of the previous iterations' teacher batches
        return F.softmax((teacher_output - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def start_center_update(self, batch_sum, n_rows):
        self.updated = False
        self.len_teacher_output = n_rows
        self.async_batch_center = batch_sum
        # global in the official code: the sum runs while the student computes
        self.reduce_handle = all_reduce_(self.async_batch_center, async_op=True)

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
        n_rows_total = teacher_output.shape[0] * get_world_size()  # 2B x W
        return sinkhorn_knopp(teacher_output, teacher_temp, n_rows_total, n_iterations)

    def forward(self, student_output_list, teacher_out_softmaxed_centered_list):
        """Sum over (student, teacher) pairs of the batch-mean cross-entropy; no pair average."""
        total_loss = 0
        for s in student_output_list:
            lsm = F.log_softmax(s / self.student_temp, dim=-1)
            for t in teacher_out_softmaxed_centered_list:
                total_loss = total_loss - torch.sum(t * lsm, dim=-1).mean()
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        """The centre moves towards the mean teacher logits of the global batch (2B x W rows)."""
        self.start_center_update(teacher_output.sum(dim=0, keepdim=True), len(teacher_output))

class iBOTPatchLoss(CenteredTeacherLoss):
    """Masked image modelling against the teacher: the student sees masked patches, the teacher the
    same crop unmasked; at each masked position the student predicts the teacher's target."""

    def __init__(self, patch_out_dim, student_temp=0.1, center_momentum=0.9):
        super().__init__((1, 1, patch_out_dim), student_temp, center_momentum)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output, teacher_temp, n_masked_patches_tensor,
                               n_iterations=3):
        n_rows_total = n_masked_patches_tensor.clone()
        all_reduce_(n_rows_total)  # masked tokens of all ranks (official: in place, unguarded)
        return sinkhorn_knopp(teacher_output, teacher_temp, n_rows_total, n_iterations)

    def forward_masked(self, student_patch_tokens_masked, teacher_patch_tokens_masked,
                       student_masks_flat, n_masked_patches=None, masks_weight=None):
        """-(1/2B) x sum over masked tokens i of w_i sum_k t_ik log softmax(s_i / T)_k, where
        w_i = 1 / (masked tokens in i's crop) and 2B counts all global crops, masked or not."""
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
        """Takes (1, n_masked, K), as the official train step passes it. Official quirk (dinov2
        issues #113, #546): len() of that is 1, so the centre moves towards the mean over the masked
        tokens of each rank, averaged over ranks with equal weights, not over all masked tokens."""
        per_rank_mean = torch.sum(teacher_patch_tokens.mean(1), dim=0, keepdim=True)  # (1, 1, K)
        self.start_center_update(per_rank_mean, len(teacher_patch_tokens))

class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy estimator (Sablayrolles et al. 2019): -mean log(distance to the
    nearest neighbour) of L2-normalised features. Pushes the features of a batch apart."""

    def __init__(self):
        super().__init__()
        self.pdist = nn.PairwiseDistance(2, eps=1e-8)  # eps is added to the difference vector

    def pairwise_NNs_inner(self, x):
        """Index of each row's nearest neighbour by inner product, itself excluded (diagonal -1)."""
        dots = torch.mm(x, x.t())
        n = x.shape[0]
        dots.view(-1)[:: (n + 1)].fill_(-1)
        return torch.max(dots, dim=1)[1]

    def forward(self, student_output, eps=1e-8):
        # Deviation from official: with one sample per GPU there is no neighbour; official gives a
        # large or infinite value there (dinov2 issues #307, #314). We return 0.
        if student_output.shape[0] < 2:
            return student_output.sum() * 0.0
        # Deviation from official: computed in fp32. The official student is pure fp16 under FSDP
        # (its autocast(enabled=False) casts nothing), where eps=1e-8 rounds to 0 and two equal
        # tokens give an infinite loss.
        with torch.autocast(student_output.device.type, enabled=False):
            student_output = F.normalize(student_output.float(), eps=eps, p=2, dim=-1)
            indices = self.pairwise_NNs_inner(student_output)
            distances = self.pdist(student_output, student_output[indices])  # (B,)
            return -torch.log(distances + eps).mean()


# -------------------------------------------------------------------------------------------------
# 7. SSLMetaArch: one forward-backward (dinov2/train/ssl_meta_arch.py)
# The teacher, an EMA of the student with no gradients, encodes the two unmasked global crops. The
# student encodes the masked global crops and the local crops. Each student view learns the
# teacher's other view (DINO); masked patches learn the teacher's unmasked patches (iBOT).
# -------------------------------------------------------------------------------------------------

class MultiCropStudent(nn.Module):
    """The student's forward over both crop groups, one module so that one DDP wraps it (one
    gradient all-reduce per step, like DINO v1's MultiCropWrapper)."""

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
            local = self.student.backbone(local_crops, is_training=True)
            tokens.insert(0, local["x_norm_clstoken"])  # (L x B, D)
        masked = None
        if self.do_ibot:  # only the masked patch tokens go through a head, never all 2B x N
            masked = torch.index_select(g["x_norm_patchtokens"].flatten(0, 1), 0,
                                        mask_indices_list)  # (n_masked, D)
            if not self.separate_head:
                tokens.append(masked)
        # one head call on [local cls; global cls; masked patches]: the head works per token
        parts = list(self.student.dino_head(torch.cat(tokens)).split([len(t) for t in tokens]))
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
        # one autocast context and one grad scaler serve every precision (both idle in fp32)
        device_type = torch.device(device).type
        self.autocast_ctx = (torch.autocast(device_type, dtype=dtype) if dtype != torch.float32
                             else contextlib.nullcontext())
        # Deviation from official: autocast + GradScaler instead of FSDP's pure-fp16 parameters;
        # autocast keeps norms and softmaxes in fp32, slightly more accurate.
        self.fp16_scaler = torch.amp.GradScaler(
            device_type, enabled=dtype == torch.float16 and cfg.compute_precision.grad_scaler)

        teacher = {"backbone": build_backbone(cfg, drop_path=False)}
        student = {"backbone": build_backbone(cfg)}
        embed_dim = student["backbone"].embed_dim
        if cfg.student.pretrained_weights:
            # Deviation from official: loaded strictly (official: strict=False, which silently
            # skips mismatched keys); the teacher gets the same weights through the copy below.
            load_backbone(student["backbone"], read_backbone_state(cfg.student.pretrained_weights),
                          cfg.student.pretrained_weights)
        self.dino_out_dim = cfg.dino.head_n_prototypes
        self.dino_loss = DINOLoss(self.dino_out_dim)
        self.koleo_loss = KoLeoLoss()

        def head(section):
            c = cfg[section]
            return DINOHead(embed_dim, c.head_n_prototypes, nlayers=c.head_nlayers,
                            hidden_dim=c.head_hidden_dim, bottleneck_dim=c.head_bottleneck_dim)

        student["dino_head"], teacher["dino_head"] = head("dino"), head("dino")
        if self.do_ibot:
            self.ibot_out_dim = (cfg.ibot.head_n_prototypes if self.ibot_separate_head
                                 else self.dino_out_dim)
            self.ibot_patch_loss = iBOTPatchLoss(self.ibot_out_dim)
            if self.ibot_separate_head:
                student["ibot_head"], teacher["ibot_head"] = head("ibot"), head("ibot")
        self.student, self.teacher = nn.ModuleDict(student), nn.ModuleDict(teacher)
        # the teacher starts as an exact copy of the student: a copy, never the same object (a
        # shared object collapses at once, dinov2 issue #407)
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad = False
        # the multi-crop forward shares the student's modules; kept out of state_dict on purpose
        object.__setattr__(self, "student_forward",
                           MultiCropStudent(self.student, self.do_ibot, self.ibot_separate_head))
        self.diagnostics = {}

    def prepare_for_distributed_training(self):
        """Wrap the student forward in DDP (the official one wraps every part in FSDP)."""
        # Deviation from official: DDP instead of FSDP; each rank holds full copies of the
        # weights, gradients are averaged in one all-reduce, the teacher is not wrapped at all.
        if get_world_size() > 1:
            device_ids = [self.dino_loss.center.device] if self.dino_loss.center.is_cuda else None
            # the gradients are views into DDP's all-reduce buckets: one gradient-sized copy less
            ddp = nn.parallel.DistributedDataParallel(self.student_forward, device_ids=device_ids,
                                                      find_unused_parameters=not self.do_dino,
                                                      gradient_as_bucket_view=True)
            object.__setattr__(self, "student_forward", ddp)  # DDP made every rank equal ...
        self.teacher.load_state_dict(self.student.state_dict())  # ... so copy the teacher after

    def forward(self, inputs):
        raise NotImplementedError("use forward_backward")

    def forward_backward(self, images, teacher_temp):
        """Teacher targets, student forward, the four losses, backward. Returns the losses."""
        n_global_crops, n_local_crops = 2, self.cfg.crops.local_crops_number
        dev = self.dino_loss.center.device
        global_crops = images["collated_global_crops"].to(dev, non_blocking=True)  # (2B, 3, G, G)
        local_crops = images["collated_local_crops"].to(dev, non_blocking=True)  # (LB, 3, l, l)
        masks = images["collated_masks"].to(dev, non_blocking=True)  # (2B, N) bool
        mask_indices_list = images["mask_indices_list"].to(dev, non_blocking=True)  # (n_masked,)
        n_masked_patches_tensor = images["n_masked_patches"].to(dev, non_blocking=True)
        n_masked_patches = mask_indices_list.shape[0]
        masks_weight = images["masks_weight"].to(dev, non_blocking=True)  # (n_masked,)
        n_local_crops_loss_terms = max(n_local_crops * n_global_crops, 1)  # 16 (local, view) pairs
        n_global_crops_loss_terms = (n_global_crops - 1) * n_global_crops  # 2 cross-view pairs
        n_terms = n_local_crops_loss_terms + n_global_crops_loss_terms  # 18: DINO averages pairs
        ibot_loss_scale = 1.0 / n_global_crops

        # 1) teacher: the two unmasked global crops, no gradient
        with torch.no_grad(), self.autocast_ctx:
            t_out = self.teacher.backbone(global_crops, is_training=True)
            cls1, cls2 = t_out["x_norm_clstoken"].chunk(n_global_crops)  # (B, D) each
            t_cls = torch.cat((cls2, cls1))  # swapped: student view 1 learns teacher view 2
            t_patch_logits = None
            if self.do_ibot:
                t_masked = torch.index_select(t_out["x_norm_patchtokens"].flatten(0, 1), 0,
                                              mask_indices_list)  # (n_masked, D)
                if not self.ibot_separate_head:  # one head call for cls and masked patches
                    t_logits = self.teacher.dino_head(torch.cat((t_cls, t_masked)))
                    t_cls_logits, t_patch_logits = t_logits[:len(t_cls)], t_logits[len(t_cls):]
                else:
                    t_cls_logits = self.teacher.dino_head(t_cls)
                    t_patch_logits = self.teacher.ibot_head(t_masked)
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
                    t_ibot = self.ibot_patch_loss.softmax_center_teacher(
                        t_patch_logits, teacher_temp).squeeze(0)
                    self.ibot_patch_loss.update_center(t_patch_logits)
            else:
                t_dino = self.dino_loss.sinkhorn_knopp_teacher(t_cls_logits, teacher_temp)
                if self.do_ibot:
                    t_ibot = self.ibot_patch_loss.sinkhorn_knopp_teacher(
                        t_patch_logits, teacher_temp, n_masked_patches_tensor)
            t_dino = t_dino.view(n_global_crops, -1, self.dino_out_dim)  # (2, B, K): views 2, 1

        # 3) student: masked global crops and local crops
        with self.autocast_ctx:
            local_logits, global_logits, patch_logits, s_cls = self.student_forward(
                global_crops, local_crops, masks, mask_indices_list)

            # 4) the losses, with the official weights and normalisations
            loss_dict, loss = {}, 0
            if n_local_crops > 0:  # 16 (local crop, teacher view) pairs, each / 18
                dino_local = self.dino_loss(local_logits.chunk(n_local_crops), t_dino) / n_terms
                loss_dict["dino_local_crops_loss"] = dino_local
                loss = loss + self.cfg.dino.loss_weight * dino_local
            if self.do_dino:  # the 2 cross-view global pairs: one mean over 2B rows, x 2 / 18
                dino_global = self.dino_loss([global_logits], [t_dino.flatten(0, 1)]) * 2 / n_terms
                loss_dict["dino_global_crops_loss"] = dino_global
                loss = loss + self.cfg.dino.loss_weight * dino_global
                if self.do_koleo:  # per view, on the backbone cls tokens of this rank's images
                    koleo = self.cfg.dino.koleo_loss_weight * sum(
                        self.koleo_loss(p) for p in s_cls.chunk(2))
                    loss = loss + koleo
                    loss_dict["koleo_loss"] = koleo / 2  # halved for display only, as official
            if self.do_ibot:
                ibot = self.ibot_patch_loss.forward_masked(
                    patch_logits, t_ibot, student_masks_flat=masks,
                    n_masked_patches=n_masked_patches, masks_weight=masks_weight)
                ibot = ibot * 2 * ibot_loss_scale
                loss_dict["ibot_loss"] = ibot / 2  # halved for display only, as official
                loss = loss + self.cfg.ibot.loss_weight * ibot

        # 5) backward (scaled in fp16; the scaler does nothing otherwise)
        self.fp16_scaler.scale(loss).backward()
        with torch.no_grad():  # collapse diagnostics, kept on the device like the losses
            probs = t_dino.flatten(0, 1)
            self.diagnostics = {
                # mean entropy of the DINO targets: ln K means uniform targets (collapse)
                "teacher_entropy": -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean(),
                # spread of the normalised student cls tokens over the batch, x sqrt(D): about 1
                # when the features spread out, 0 when every image gets the same token
                "cls_std": F.normalize(s_cls.float(), dim=-1).std(0).mean()
                * math.sqrt(s_cls.shape[-1]),
            }
        return loss_dict

    @torch.no_grad()
    def update_teacher(self, m):
        """EMA: teacher <- m teacher + (1 - m) student over every parameter, in two multi-tensor
        calls, as official (on a GPU: two kernel launches, not two per tensor)."""
        teacher_params = list(self.teacher.parameters())
        torch._foreach_mul_(teacher_params, m)
        torch._foreach_add_(teacher_params, list(self.student.parameters()), alpha=1 - m)

    def train(self, mode=True):
        super().train(mode)
        self.teacher.eval()  # the teacher never drops paths
        return self

    def get_params_groups(self):
        """Optimizer groups per student part (backbone, dino_head, ibot_head), fused by their
        multipliers (section 8). "is_backbone" is ours: train.freeze_backbone_iterations sets the
        lr of those groups to 0 (apply_optim_scheduler)."""
        all_groups = []
        for name, module in self.student.items():
            for group in fuse_params_groups(get_params_groups_with_decay(
                    module, lr_decay_rate=self.cfg.optim.layerwise_decay,
                    patch_embed_lr_mult=self.cfg.optim.patch_embed_lr_mult)):
                all_groups.append({**group, "is_backbone": name == "backbone"})
        return all_groups


# -------------------------------------------------------------------------------------------------
# 8. Optimisation (dinov2/utils/param_groups.py, dinov2/utils/utils.py, dinov2/train/train.py)
# AdamW with one group per (lr multiplier, weight-decay multiplier, last layer); five schedules,
# all indexed by the iteration, set lr, weight decay, EMA momentum and teacher temperature.
# -------------------------------------------------------------------------------------------------

def get_vit_lr_decay_rate(name, lr_decay_rate=1.0, num_layers=12, force_is_backbone=False):
    """Layer-wise lr decay: decay^(num_layers + 1 - layer_id). Tokens and embeddings are layer 0,
    block i is layer i + 1, everything after the blocks (final norm, heads) gets multiplier 1."""
    layer_id = num_layers + 1
    if name.startswith("backbone") or force_is_backbone:
        if any(k in name for k in ("pos_embed", "patch_embed", "mask_token", "cls_token",
                                   "register_tokens")):
            layer_id = 0
        elif "blocks." in name and "residual." not in name:
            layer_id = int(name[name.find("blocks."):].split(".")[1]) + 1
    return lr_decay_rate ** (num_layers + 1 - layer_id)

def get_params_groups_with_decay(model, lr_decay_rate=1.0, patch_embed_lr_mult=1.0):
    """One dict per parameter: its lr and weight-decay multipliers, and whether it is a last
    layer. No weight decay on biases, norms and LayerScale gammas; tokens and pos_embed decay."""
    n_blocks = getattr(model, "n_blocks", 0)  # a head has no blocks: multiplier decay^0 = 1
    groups = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr_mult = get_vit_lr_decay_rate(name, lr_decay_rate, n_blocks, force_is_backbone=n_blocks)
        no_decay = name.endswith(".bias") or "norm" in name or "gamma" in name
        groups.append({"params": param, "name": name, "is_last_layer": "last_layer" in name,
                       "wd_multiplier": 0.0 if no_decay else 1.0,
                       "lr_multiplier": lr_mult * (patch_embed_lr_mult if "patch_embed" in name
                                                   else 1.0)})
    return groups

def fuse_params_groups(all_params_groups, keys=("lr_multiplier", "wd_multiplier", "is_last_layer")):
    """Merge the parameters that share (lr multiplier, wd multiplier, last layer) into one group."""
    fused = {}
    for d in all_params_groups:
        group = fused.setdefault(tuple(d[k] for k in keys), {**{k: d[k] for k in keys},
                                                             "params": []})
        group["params"].append(d["params"])
    return list(fused.values())

class CosineScheduler:
    """A value per iteration: freeze_iters zeros, a linear warm-up from start_warmup_value to
    base_value (both ends included), then a half cosine from base_value towards final_value; past
    total_iters, final_value. The official numpy version, in float64 with torch."""

    def __init__(self, base_value, final_value, total_iters, warmup_iters=0, start_warmup_value=0,
                 freeze_iters=0):
        self.final_value, self.total_iters = final_value, total_iters
        freeze = torch.zeros(freeze_iters, dtype=torch.float64)
        warmup = torch.linspace(start_warmup_value, base_value, warmup_iters, dtype=torch.float64)
        n = total_iters - warmup_iters - freeze_iters
        iters = torch.arange(n, dtype=torch.float64)
        cosine = final_value + 0.5 * (base_value - final_value) * (
            1 + torch.cos(math.pi * iters / n))
        self.schedule = torch.cat((freeze, warmup, cosine)).tolist()
        assert len(self.schedule) == self.total_iters

    def __getitem__(self, it):
        return self.final_value if it >= self.total_iters else self.schedule[it]

def build_schedulers(cfg):
    """The five schedules of official train.py, in iterations (an epoch: OFFICIAL_EPOCH_LENGTH)."""
    E = cfg.train.OFFICIAL_EPOCH_LENGTH
    total = cfg.optim.epochs * E
    lr = dict(base_value=cfg.optim.lr, final_value=cfg.optim.min_lr, total_iters=total,
              warmup_iters=cfg.optim.warmup_epochs * E, start_warmup_value=0)
    last_layer_lr = CosineScheduler(**lr)  # the lr, but 0 while the prototypes are frozen
    frozen = min(total, cfg.optim.freeze_last_layer_epochs * E)
    last_layer_lr.schedule[:frozen] = [0.0] * frozen
    warm = cfg.teacher.warmup_teacher_temp_epochs * E  # then the temperature stays at teacher_temp
    return {
        "lr": CosineScheduler(**lr),
        "wd": CosineScheduler(cfg.optim.weight_decay, cfg.optim.weight_decay_end, total),
        "mom": CosineScheduler(cfg.teacher.momentum_teacher, cfg.teacher.final_momentum_teacher,
                               total),
        "teacher_temp": CosineScheduler(cfg.teacher.teacher_temp, cfg.teacher.teacher_temp, warm,
                                        warmup_iters=warm,
                                        start_warmup_value=cfg.teacher.warmup_teacher_temp),
        "last_layer_lr": last_layer_lr,
    }

def apply_optim_scheduler(optimizer, lr, wd, last_layer_lr, backbone_lr_factor=1.0):
    """Per group: lr = (last-layer lr or lr) x multiplier, wd = wd x multiplier.
    backbone_lr_factor is ours: 0 during train.freeze_backbone_iterations, so only heads move."""
    for group in optimizer.param_groups:
        group["weight_decay"] = wd * group["wd_multiplier"]
        base = last_layer_lr if group["is_last_layer"] else lr
        group["lr"] = base * group["lr_multiplier"] * (backbone_lr_factor if group["is_backbone"]
                                                       else 1.0)


# -------------------------------------------------------------------------------------------------
# 9. Training loop (dinov2/train/train.py)
# train_step() is one iteration: schedules into the optimizer, forward-backward, clip, AdamW, EMA.
# train() is the run around it: data, model, resume, then per iteration the step, the NaN check,
# the log line, the evaluations and the checkpoints, in the official order.
# -------------------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STOP = {"signal": None}  # set by SIGTERM / SIGINT: the loop finishes its step, saves and exits

def resolve_dtype(cfg, device):
    name = cfg.compute_precision.dtype
    if name == "auto":  # fp16 + loss scaling on GPU, as the released models; fp32 on CPU
        name = "fp16" if device.type == "cuda" else "fp32"
    return DTYPES[name]

def build_model_and_optimizer(cfg, device, dtype):
    """SSLMetaArch on the device (compiled if asked, in DDP under torchrun) and its AdamW."""
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls, as official (fp32 only)
    torch.backends.cudnn.allow_tf32 = True
    model = SSLMetaArch(cfg, device, dtype).to(device)
    if cfg.train.compile:  # compiled in place: parameter names and checkpoints stay the same
        model.student.backbone.compile()
        model.teacher.backbone.compile()
    model.prepare_for_distributed_training()
    model.train()
    # one fused kernel for all parameters on GPU; the multi-tensor (foreach) version on CPU
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.get_params_groups(), fused=fused or None,
                                  foreach=None if fused else True,
                                  betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2))
    return model, optimizer

def train_step(model, optimizer, data, lr, wd, mom, teacher_temp, last_layer_lr,
               backbone_lr_factor=1.0):
    """One iteration of official train.py, given this iteration's schedule values. No host sync
    here (but the fp16 scaler's inf check): the losses stay on the device."""
    # 1) this iteration's lr and weight decay into every parameter group
    apply_optim_scheduler(optimizer, lr, wd, last_layer_lr, backbone_lr_factor)
    # 2) teacher forward, student forward, losses, backward
    optimizer.zero_grad(set_to_none=True)
    loss_dict = model.forward_backward(data, teacher_temp=teacher_temp)
    # 3) clip, AdamW, EMA
    optimizer_step(model, optimizer, mom)
    return loss_dict

def optimizer_step(model, optimizer, mom):
    """Unscale, clip each student part separately, step (the fp16 scaler skips a step whose
    gradients hold an inf: its scale was too large), then the teacher EMA, which runs every
    iteration, also after a skipped step (as official)."""
    model.fp16_scaler.unscale_(optimizer)
    if model.cfg.optim.clip_grad:
        for part in model.student.values():
            nn.utils.clip_grad_norm_(part.parameters(), model.cfg.optim.clip_grad)
    model.fp16_scaler.step(optimizer)
    model.fp16_scaler.update()
    model.update_teacher(mom)

def train(cfg, device, output_dir, knn_data=None, images=None):
    """The whole pre-training run (official do_train). Returns (model, kNN results by iteration)."""
    rank, W = get_rank(), get_world_size()
    B, E = cfg.train.batch_size_per_gpu, cfg.train.OFFICIAL_EPOCH_LENGTH
    total_iters = cfg.optim.epochs * E
    save_period = cfg.train.checkpoint_period or 3 * E  # official: every 3 "epochs"
    apply_scaling_rules(cfg, W)
    os.makedirs(output_dir, exist_ok=True)
    dtype = resolve_dtype(cfg, device)
    # Deviation from official: seeds are train.seed + rank (official: always 0 + rank, never
    # train.seed); the default train.seed=0 gives the official seeds.
    seed_everything(cfg.train.seed + rank)
    print0(f"global batch {B * W} ({B} per process x {W}), lr {cfg.optim.lr:.3g} (base "
           f"{cfg.optim.base_lr} x sqrt({B * W}/1024)), {total_iters} iterations "
           f"({cfg.optim.epochs} epochs of {E}), {str(dtype).replace('torch.', '')} on {device}")

    # ---- data, model, optimizer, schedules ----
    augmentation = make_augmentation(cfg)  # geometry in the loader, colour where the model runs
    images = images or pretrain_images(cfg, output_dir)
    dataset = (ImageFolderDataset(images, augmentation.geometry) if images
               else builtin_split("train", augmentation.geometry))
    model, optimizer = build_model_and_optimizer(cfg, device, dtype)
    n_params = sum(p.numel() for p in model.student.backbone.parameters())
    print0(f"student: {cfg.student.arch}/{cfg.student.patch_size}, {n_params / 1e6:.2f}M backbone "
           f"parameters; data: {len(dataset)} images")
    schedules = build_schedulers(cfg)

    # ---- resume from the newest checkpoint in output_dir, if there is one ----
    start_iter = resume(output_dir, cfg, model, optimizer)
    # the colour stage on the GPU; on a CPU-only run in the loader, beside the training process
    colour_in_loader = augmentation if device.type == "cpu" else None
    data_iter = iter(make_pretrain_loader(cfg, dataset, start_iter, rank, W, colour_in_loader))
    knn_history = {}
    if start_iter == 0 and knn_data is not None:
        knn_history[0] = evaluate(cfg, model, knn_data, 0, output_dir, device)

    # ---- the training loop ----
    log = RunLog(cfg, model, output_dir, start_iter, total_iters)
    for it in range(start_iter, total_iters):
        data = log.wait_for(data_iter)  # waits only when the loader's workers are behind
        data = augmentation.colour_batch(data, device)  # unless the loader did it already
        # 1) this iteration's values of the five schedules
        lr, wd, mom = schedules["lr"][it], schedules["wd"][it], schedules["mom"][it]
        teacher_temp, last_layer_lr = schedules["teacher_temp"][it], schedules["last_layer_lr"][it]
        backbone_lr_factor = 0.0 if it < cfg.train.freeze_backbone_iterations else 1.0
        # 2) one step: forward, backward, clip, AdamW, EMA
        loss_dict = train_step(model, optimizer, data, lr, wd, mom, teacher_temp, last_layer_lr,
                               backbone_lr_factor)
        done = it + 1
        # 3) the losses averaged over ranks, every iteration as official, to stop on a NaN at
        #    once; the same all-reduce carries the vote on whether a signal asked us to stop
        values, stop = reduce_losses(loss_dict, model.diagnostics, STOP["signal"] is not None)
        check_finite(values, list(loss_dict), done, output_dir)
        log.add(values, n_skipped=data["n_skipped"], lr=lr, wd=wd, mom=mom,
                last_layer_lr=last_layer_lr, current_batch_size=B, teacher_temp=teacher_temp)
        # 4) log (after iteration 0, every log_every and the last, as official), evaluate, save
        if it % cfg.train.log_every == 0 or done == total_iters:
            log.write(it)
        is_eval = (cfg.evaluation.eval_period_iterations
                   and done % cfg.evaluation.eval_period_iterations == 0) or done == total_iters
        is_save = done % save_period == 0 or done == total_iters or stop
        if is_eval:
            knn_history[done] = evaluate(cfg, model, knn_data, done, output_dir, device)
        if is_save:
            save_checkpoint(output_dir, model, optimizer, done, cfg)
        if stop:
            log.close()
            print0(f"stopped by {STOP['signal'] or 'a signal on another rank'} after iteration "
                   f"{done}; checkpoint saved in '{output_dir}'. Run the same command to resume.")
            break
    log.close()
    return model, knn_history

def reduce_losses(loss_dict, diagnostics, stop):
    """The losses and diagnostics averaged over ranks, and whether any rank was asked to stop:
    one all-reduce and one host sync per iteration (.tolist() waits for the GPU)."""
    names = list(loss_dict) + list(diagnostics)
    values = torch.stack([v.detach().float() for v in [*loss_dict.values(),
                                                       *diagnostics.values()]])
    values = torch.cat([values, values.new_tensor([float(stop)])])
    all_reduce_(values)
    values = values.tolist()
    return {k: v / get_world_size() for k, v in zip(names, values)}, values[-1] > 0

def check_finite(values, loss_names, iteration, output_dir):
    """Stop the run on a non-finite loss, naming the term, before anything is saved."""
    # Deviation from official: stops on inf as well as NaN (official checks isnan of the sum).
    bad = [f"{k}={values[k]}" for k in loss_names if not math.isfinite(values[k])]
    if bad:
        raise NonFiniteLoss(
            f"non-finite loss at iteration {iteration} ({', '.join(bad)}); nothing was saved after "
            f"the last good checkpoint in '{output_dir}'. Run again with a fix to resume from it: "
            f"a lower optim.base_lr, or compute_precision.dtype=bf16 or fp32 (fp16 overflow)")


# =================================================================================================
# The machinery around the story: checkpoints and logs, data folders, evaluation, pictures,
# benchmark, command line.
# =================================================================================================


# -------------------------------------------------------------------------------------------------
# 10. Checkpoints and logs (official: fvcore's PeriodicCheckpointer, do_test's teacher dumps,
# MetricLogger). One rank-0 file per save, written under a temporary name and renamed, so a kill
# at any moment leaves the previous file whole; the same command again resumes from the newest.
# -------------------------------------------------------------------------------------------------

CKPT_GLOB = "model_*.pth"
# the keys that fix the stream of crops: a resume may not change them (config_changes)
DATA_STREAM_KEYS = ("train.batch_size_per_gpu", "train.seed", "train.dataset_path", "crops.")

class NonFiniteLoss(UserError):
    pass

def request_stop(signum, frame):
    STOP["signal"] = signal.Signals(signum).name

class RunLog:
    """The log line and training_metrics.json as official MetricLogger: after iteration i (from 0)
    when i % log_every == 0 and after the last, the lower median of the last 20 values of each."""

    def __init__(self, cfg, model, output_dir, start_iter, total_iters):
        self.path = os.path.join(output_dir, "training_metrics.json")
        self.ln_K, self.B = math.log(model.dino_out_dim), cfg.train.batch_size_per_gpu
        self.window = defaultdict(lambda: deque(maxlen=20))
        self.n_skipped, self.total_iters = 0, total_iters
        self.bar = tqdm(total=total_iters, initial=start_iter, disable=get_rank() != 0,
                        dynamic_ncols=True, desc="train")

    def wait_for(self, data_iter):
        self.t0 = time.perf_counter()
        data = next(data_iter)
        self.window["data_time"].append(time.perf_counter() - self.t0)
        return data

    def add(self, values, n_skipped, **schedule_values):
        # Deviation from official: iter_time ends before the evaluation and checkpoint of its step.
        total = sum(v for k, v in values.items() if k.endswith("_loss"))  # as official's total
        for k, v in {**values, "total_loss": total, **schedule_values,
                     "iter_time": time.perf_counter() - self.t0}.items():
            self.window[k].append(v)
        self.n_skipped += n_skipped
        self.bar.update(1)

    def write(self, iteration):
        m = {"iteration": iteration, **{k: statistics.median_low(v)
                                        for k, v in self.window.items()},
             **{k: statistics.mean(self.window[k]) for k in ("iter_time", "data_time")},
             "ln_K": self.ln_K, "n_skipped": self.n_skipped}
        if get_rank() != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(m) + "\n")
        losses = [k for k in m if k.endswith("_loss") and k != "total_loss"]
        uniform = m["teacher_entropy"] > 0.95 * self.ln_K  # targets nearly uniform: collapse
        self.bar.set_postfix(loss=f"{m['total_loss']:.3f}")
        self.bar.write(
            f"it {iteration:07d}/{self.total_iters} | loss {m['total_loss']:.4f} | "
            + " ".join(f"{k.replace('_crops_loss', '').replace('_loss', '')} {m[k]:.3f}"
                       for k in losses)
            + f" | lr {m['lr']:.2e} wd {m['wd']:.3f} mom {m['mom']:.4f} t_temp "
            + f"{m['teacher_temp']:.4f} | H(t) {m['teacher_entropy']:.2f}/{self.ln_K:.2f}"
            + (" UNIFORM (collapse)" if uniform else "") + f" cls_std {m['cls_std']:.2f} | "
            + f"{self.B * get_world_size() / m['iter_time']:.0f} img/s, data wait "
            + f"{100 * m['data_time'] / m['iter_time']:.0f}%"
            + (f" | skipped {self.n_skipped}" if self.n_skipped else ""))

    def close(self):
        self.bar.close()

def atomic_save(obj, path):
    """torch.save (or write, for bytes) to path.tmp, flush to disk, then rename: readers see the
    old file or the new one, never half of one."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(obj) if isinstance(obj, bytes) else torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise UserError(f"could not write {path} ({e.strerror or e}); earlier checkpoints are "
                        f"intact") from None

def list_checkpoints(output_dir):
    """Checkpoint files, newest first. Rank 0, the only writer, also removes what a kill left."""
    for tmp in glob.glob(os.path.join(output_dir, "*.tmp")) if get_rank() == 0 else []:
        with contextlib.suppress(OSError):
            os.remove(tmp)
    return sorted(glob.glob(os.path.join(output_dir, CKPT_GLOB)), reverse=True)

def load_latest_checkpoint(output_dir):
    """The newest checkpoint that loads; a damaged one is reported and the one before it used."""
    for path in list_checkpoints(output_dir):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(ckpt, dict) or "iteration" not in ckpt:
                raise ValueError("not a dino_mini checkpoint")
            return path, ckpt
        except Exception as e:  # noqa: BLE001 - a truncated or corrupted file
            print0(f"dino_mini: warning: checkpoint {path} is damaged ({type(e).__name__}: {e}); "
                   f"trying an older one")
    return None, None

def config_changes(ckpt_cfg, cfg, output_dir):
    """["key: old -> new"] of the keys this command changes: lr, schedules, loss weights, dtype ...
    may change on resume, as official resumes with whatever config it is given."""
    # Deviation from official: a change of the data stream (DATA_STREAM_KEYS) is refused, and one of
    # the weights' shapes or parameter groups by the load (official loads with strict=False).
    old, new = {**flat_keys(DEFAULTS), **flat_keys(ckpt_cfg)}, flat_keys(cfg)  # keys added later
    changes = [k for k in new if old.get(k) != new[k] and k not in ("optim.lr", "train.output_dir")]
    for k in changes:
        if k.startswith(DATA_STREAM_KEYS):
            raise UserError(f"the checkpoint in '{output_dir}' was made with {k}={old.get(k)!r}, "
                            f"this command says {new[k]!r}: that changes the data stream; resume "
                            f"with the same value, or start fresh in a new --output-dir")
    return [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changes]

def rng_states():
    """This process's random generators, saved per rank in checkpoints."""
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

def set_rng_states(states):
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])

def resume(output_dir, cfg, model, optimizer):
    """Load the newest checkpoint of output_dir into the model, optimizer, grad scaler and this
    rank's random generators. Returns the iteration to continue from (0 without a checkpoint)."""
    path, ckpt = load_latest_checkpoint(output_dir)
    if ckpt is None:
        return 0
    changes = config_changes(ckpt["config"], cfg, output_dir)
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        model.load_state_dict(ckpt["model"], strict=True)
        optimizer.load_state_dict(ckpt["optimizer"])  # the moments; then this command's betas
        for group, settings in zip(optimizer.param_groups, fresh):  # and lr / wd multipliers
            group.update(settings)
    except (RuntimeError, ValueError):  # other shapes, heads, losses or parameter groups
        raise UserError(f"the checkpoint in '{output_dir}' holds weights of other shapes or "
                        f"parameter groups than this command's model ({'; '.join(changes)}); "
                        f"resume with its settings, or start fresh in a new --output-dir") from None
    for change in changes:
        print0(f"resume with a changed config: {change}")
    if ckpt["scaler"]:  # empty when saved without fp16 (dtype may change on resume)
        model.fp16_scaler.load_state_dict(ckpt["scaler"])
    if len(ckpt["rng"]) == get_world_size():  # each rank continues its own random stream
        set_rng_states(ckpt["rng"][get_rank()])
    else:
        print0(f"dino_mini: warning: {path} was written by {len(ckpt['rng'])} processes and this "
               f"run has {get_world_size()}: it continues, but not as the first run would have")
    print0(f"resumed from {path} at iteration {ckpt['iteration']}")
    return ckpt["iteration"]

def save_checkpoint(output_dir, model, optimizer, iteration, cfg):
    """Everything needed to continue after `iteration` iterations; keep the newest few files."""
    # Deviation from official: one rank-0 file instead of per-rank FSDP shards, with the grad
    # scaler and every rank's random states too (official saves neither), so that a resumed run
    # continues exactly as the uninterrupted one.
    params = list(model.student.parameters()) + list(model.teacher.parameters())
    if not torch.stack(torch._foreach_norm(params)).isfinite().all():
        raise NonFiniteLoss(f"non-finite weights after iteration {iteration}; the checkpoints in "
                            f"'{output_dir}' were left as they were. Lower optim.base_lr or use "
                            f"compute_precision.dtype=fp32")
    model.dino_loss.apply_center_update()  # fold in the pending centre update: exact, and saved
    if model.do_ibot:
        model.ibot_patch_loss.apply_center_update()
    states = [rng_states()]
    if get_world_size() > 1:
        states = [None] * get_world_size()
        dist.all_gather_object(states, rng_states())
    if get_rank() != 0:
        return
    atomic_save({"iteration": iteration, "config": json.loads(json.dumps(cfg)),
                 "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": model.fp16_scaler.state_dict(), "rng": states},
                os.path.join(output_dir, f"model_{iteration:07d}.pth"))
    for old in list_checkpoints(output_dir)[cfg.train.keep_checkpoints:]:
        os.remove(old)

def save_teacher(output_dir, model, iteration):
    """The official teacher dump eval/training_<index of the last iteration>/teacher_checkpoint.pth
    and the teacher backbone alone, teacher_backbone.pth, keyed as Meta's released backbones."""
    if get_rank() != 0:
        return
    folder = os.path.join(output_dir, "eval", f"training_{iteration - 1}")
    os.makedirs(folder, exist_ok=True)
    atomic_save({"teacher": model.teacher.state_dict()},
                os.path.join(folder, "teacher_checkpoint.pth"))
    atomic_save(model.teacher.backbone.state_dict(), f"{output_dir}/teacher_backbone.pth")

def read_backbone_state(path):
    """The ViT backbone state dict in any weights file: Meta's release, our teacher_backbone.pth,
    a full checkpoint or an official teacher dump (chunked block keys too); one error otherwise."""
    if not os.path.isfile(path):
        raise UserError(f"pretrained weights '{path}' not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file
        raise UserError(f"'{path}' is not a PyTorch checkpoint ({type(e).__name__})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # our full checkpoint
        obj = {k[len("teacher."):]: v for k, v in obj["model"].items() if k.startswith("teacher.")}
    elif isinstance(obj, dict) and isinstance(obj.get("teacher"), dict):  # an official dump
        obj = obj["teacher"]
    state = {}
    for k, v in (obj.items() if isinstance(obj, dict) else []):
        for prefix in ("module.", "backbone."):
            k = k[len(prefix):] if k.startswith(prefix) else k
        parts = k.split(".")  # official block_chunks > 0: blocks.<chunk>.<i>.* -> blocks.<i>.*
        if parts[0] == "blocks" and len(parts) > 2 and parts[2].isdigit():
            k = ".".join([parts[0]] + parts[2:])
        if isinstance(v, torch.Tensor) and not k.startswith(("dino_head.", "ibot_head.")):
            state[k] = v
    if "pos_embed" not in state:
        raise UserError(f"'{path}' holds no ViT backbone state dict (expected keys like "
                        f"pos_embed, blocks.0.attn.qkv.weight)")
    return state

def load_backbone(backbone, state, path):
    """Load a backbone state dict strictly. A stored position grid of another size (37 x 37 for
    Meta's 518-px models) is resized once to this model's grid, with the model's own rule."""
    state, expected = dict(state), backbone.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shape_bad = [k for k in expected if k in state and k != "pos_embed"
                 and state[k].shape != expected[k].shape]
    if missing or unexpected or shape_bad:
        raise UserError(
            f"'{path}' does not fit student.arch with embed_dim {backbone.embed_dim}, "
            f"{backbone.n_blocks} blocks, patch {backbone.patch_size}, "
            f"{backbone.num_register_tokens} registers (found a {state['pos_embed'].shape[-1]}-"
            f"dim model; missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shapes "
            f"{shape_bad[:3]}); set student.arch / patch_size / num_register_tokens / ffn_layer")
    pos = state["pos_embed"]
    if pos.shape != expected["pos_embed"].shape:  # resample the grid once, as forward would
        grid = int(math.sqrt(expected["pos_embed"].shape[1] - 1)) * backbone.patch_size
        dummy = torch.zeros(1, expected["pos_embed"].shape[1], pos.shape[-1])
        with torch.no_grad():
            saved, backbone.pos_embed = backbone.pos_embed, nn.Parameter(pos.float())
            state["pos_embed"] = backbone.interpolate_pos_encoding(dummy, grid, grid).to(pos.dtype)
            backbone.pos_embed = saved
    backbone.load_state_dict(state, strict=True)
    return backbone

def backbone_from_file(path):
    """The ViT stored in a weights file, its architecture read off the tensors, for pictures and
    features (Meta's register models resize positions by size with antialiasing, as the hub)."""
    state = read_backbone_state(path)
    dim = state["pos_embed"].shape[-1]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    arch = next((a for a, (d, n, _) in VIT_SIZES.items() if (d, n) == (dim, depth)), None)
    if arch is None:
        raise UserError(f"'{path}': no known ViT has embed_dim {dim} and {depth} blocks")
    regs = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    patch = state["patch_embed.proj.weight"].shape[-1]
    backbone = _vit(arch, patch_size=patch, num_register_tokens=regs,
                    img_size=int(math.sqrt(state["pos_embed"].shape[1] - 1)) * patch,
                    ffn_layer="swiglufused" if "blocks.0.mlp.w12.weight" in state else "mlp",
                    init_values=1.0 if "blocks.0.ls1.gamma" in state else None,
                    interpolate_antialias=regs > 0, interpolate_offset=0.0 if regs else 0.1)
    return load_backbone(backbone, state, path).eval()


# -------------------------------------------------------------------------------------------------
# 11. Data folders and the built-in dataset (ours; official reads ImageNet through metadata files)
# -------------------------------------------------------------------------------------------------

def load_rgb(path):
    """Open any image as 8-bit RGB: grayscale, palette, alpha, CMYK and 16-bit files all work."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()  # decode now, so a truncated file fails here and not inside a transform
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit or float: rescale to 0..255
        img = img.convert("F")
        lo, hi = img.getextrema()
        img = img.point(lambda v: (v - lo) * (255.0 / max(hi - lo, 1e-6))).convert("L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")

class ImageList:
    """The image files under a folder: relative paths and a class each (the first-level folder),
    in one bytes buffer and two flat arrays: a list of 1.28M strings would be copied page by page
    into each forked DataLoader worker, as reading an object writes its refcount (PyTorch #13246)"""

    def __init__(self, root, paths):
        self.root = root
        encoded = [p.encode() for p in paths]  # "class/file.JPEG", with "/" on every system
        self.blob = b"".join(encoded)
        self.offsets = array("q", itertools.chain([0], itertools.accumulate(map(len, encoded))))
        tops = [p.split("/", 1)[0] if "/" in p else None for p in paths]
        self.classes = sorted({t for t in tops if t is not None})
        index = {c: i for i, c in enumerate(self.classes)}
        self.labels = array("i", (index.get(t, 0) for t in tops))

    def __len__(self):
        return len(self.labels)

    def relpath(self, i):
        return self.blob[self.offsets[i]:self.offsets[i + 1]].decode()

def scan_images(root):
    """ImageList of every image file under root, searched recursively in sorted order."""
    # Deviation from official: any folder of images; official reads ImageNet through labels.txt and
    # pre-computed entries-*.npy files (dinov2 issues #126, #243).
    if not os.path.exists(root):
        raise UserError(f"data folder '{root}' does not exist")
    if not os.path.isdir(root):
        raise UserError(f"'{root}' is a file; --data and the kNN datasets take a folder of images")
    paths = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
        prefix = "" if rel == "." else rel + "/"
        paths += [prefix + f for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS)]
    if not paths:
        raise UserError(f"no images found in '{root}' (searched recursively for "
                        f"{', '.join(IMG_EXTENSIONS)})")
    return ImageList(root, paths)

def data_folders(path):
    """ImageNet's layout, DIR/train (+ DIR/val): pre-train on train/ only, as official pre-trains
    on ImageNet:split=TRAIN. Any other folder is pre-trained on whole. Returns (train, val)."""
    if os.path.isdir(os.path.join(path, "train")):
        val = os.path.join(path, "val")
        return os.path.join(path, "train"), val if os.path.isdir(val) else None
    return path, None

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

def pretrain_images(cfg, output_dir):
    """The ImageList to pre-train on (None: the built-in dataset). Listed once per run, on rank 0,
    and saved as output_dir/image_list.txt, which a resumed run reads instead of listing again."""
    if not cfg.train.dataset_path:
        return None
    root, _ = data_folders(cfg.train.dataset_path)
    cache = os.path.join(output_dir, "image_list.txt")
    header = f"# images under {os.path.abspath(root)}"

    def make():
        if os.path.isfile(cache):
            with open(cache) as f:
                first, *paths = f.read().splitlines()
            if first == header and paths:
                return ImageList(root, paths)
        images = scan_images(root)
        text = "\n".join([header] + [images.relpath(i) for i in range(len(images))]) + "\n"
        atomic_save(text.encode(), cache)
        return images

    images = share_from_rank0(make)
    where = " (its train/ folder only)" if root != cfg.train.dataset_path else ""
    print0(f"data: {len(images)} images in '{root}'{where}")
    return images

SHAPES = ("disk", "ring", "triangle", "square", "star", "cross", "bars", "dots", "half_disk", "ell")
POLYGONS = {  # the polygon shapes, in units of the shape's radius around its centre
    "triangle": [[(math.cos(a), math.sin(a))
                  for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]],
    "square": [[(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]],
    "star": [[((1 if k % 2 == 0 else 0.4) * math.cos(math.pi * k / 5 - math.pi / 2),
               (1 if k % 2 == 0 else 0.4) * math.sin(math.pi * k / 5 - math.pi / 2))
              for k in range(10)]],
    "cross": [[(-1, -.3), (-.3, -.3), (-.3, -1), (.3, -1), (.3, -.3), (1, -.3), (1, .3), (.3, .3),
               (.3, 1), (-.3, 1), (-.3, .3), (-1, .3)]],
    "bars": [[(-1, -1), (-.4, -1), (-.4, 1), (-1, 1)], [(.4, -1), (1, -1), (1, 1), (.4, 1)]],
    "half_disk": [[(math.cos(math.pi * k / 12), math.sin(math.pi * k / 12)) for k in range(13)]],
    "ell": [[(-1, -1), (-.4, -1), (-.4, .4), (1, .4), (1, 1), (-1, 1)]]}

class ShapesDataset(torch.utils.data.Dataset):
    """Ours: ten shape classes drawn on the fly (no download). Image i holds up to 12 small shapes
    of its class, each with its own place, size, brightness and tint, on one grey background: what
    the crops of an image share is the class (README, "Collapse"), not its raw pixels."""

    def __init__(self, n_images, transform, size=48, seed=0):
        self.n_images, self.transform, self.size, self.seed = n_images, transform, size, seed
        self.classes, self.labels = list(SHAPES), [i % len(SHAPES) for i in range(n_images)]

    def __len__(self):
        return self.n_images

    def draw(self, index):
        """(RGB image, label, object mask as an "L" image) of image `index`."""
        rng = random.Random(self.seed * 1_000_003 + index)
        label, s = self.labels[index], self.size  # balanced classes
        img, mask = Image.new("RGB", (s, s), (45, 45, 45)), Image.new("L", (s, s), 0)
        placed = []  # (cx, cy, r) of the shapes drawn so far: shapes never overlap
        for _ in range(12):
            r = rng.uniform(0.07, 0.11) * s  # shape radius
            for _ in range(30):  # 30 tries to find a free place, or one shape fewer
                cx, cy = rng.uniform(r, s - r), rng.uniform(r, s - r)
                if all(math.hypot(cx - x, cy - y) > r + q for x, y, q in placed):
                    break
            else:
                continue
            placed.append((cx, cy, r))
            one = Image.new("L", (s, s), 0)
            draw_shape(ImageDraw.Draw(one), SHAPES[label], cx, cy, r, rng.uniform(-0.3, 0.3))
            v = rng.uniform(150, 255)  # the shape's brightness, with a faint tint of its own
            tone = tuple(int(min(255, max(0, v + rng.uniform(-20, 20)))) for _ in range(3))
            img.paste(Image.new("RGB", (s, s), tone), (0, 0), one)
            mask.paste(255, (0, 0), one)
        return img, label, mask

    def __getitem__(self, index):
        img, label, _ = self.draw(index)
        return self.transform(img), label, 0

def draw_shape(draw, shape, cx, cy, r, angle):
    """Fill one shape of radius r centred at (cx, cy), turned by `angle` radians (kept small: a
    free rotation would be learned as a feature, not ignored)."""
    c, si = math.cos(angle), math.sin(angle)

    def disk(x, y, radius, value=255):
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=value)

    if shape in ("disk", "ring"):
        disk(cx, cy, r)
        if shape == "ring":
            disk(cx, cy, r / 2, 0)
    elif shape == "dots":
        for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6):
            disk(cx + 0.6 * r * math.cos(a + angle), cy + 0.6 * r * math.sin(a + angle), 0.38 * r)
    else:  # polygons, in units of r around the centre, rotated
        for points in POLYGONS[shape]:
            draw.polygon([(cx + r * (x * c - y * si), cy + r * (x * si + y * c))
                          for x, y in points], fill=255)

def builtin_split(split, transform):
    """The built-in dataset: 2000 "train" images and 500 "val" images drawn with another seed."""
    return ShapesDataset({"train": 2000, "val": 500}[split], transform,
                         seed={"train": 0, "val": 1}[split])


# -------------------------------------------------------------------------------------------------
# 12. Evaluation (dinov2/eval/knn.py)
# A kNN classifier on frozen, L2-normalised teacher cls features (cosine similarity, the top-k
# neighbours vote with weights softmax(sim / 0.07)) tells whether the features learn while the
# run goes. Official runs it as a separate script on the teacher dumps; we run it in the loop.
# -------------------------------------------------------------------------------------------------

@torch.no_grad()
def extract_features(backbone, dataset, device, batch_size=256, autocast_ctx=None,
                     num_workers=0, patch_tokens=False, pixels=False, desc=None):
    """{"cls": (n, D) L2-normalised final-norm cls tokens (the official eval feature), "labels"},
    optionally "patch" (n, N, D) and "pixels" (n, 3 x 32 x 32); rank r encodes every W-th item."""
    rank, W = get_rank(), get_world_size()
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), W))
    out = defaultdict(list)
    for images, labels, _ in tqdm(torch.utils.data.DataLoader(
            shard, batch_size, num_workers=num_workers, generator=torch.Generator()),
            desc=desc, disable=desc is None or rank != 0):
        images = images.to(device, non_blocking=True)
        with autocast_ctx or contextlib.nullcontext():
            f = backbone.forward_features(images)
        out["cls"].append(F.normalize(f["x_norm_clstoken"].float(), dim=-1))
        out["labels"].append(torch.as_tensor(labels, device=device))
        if patch_tokens:
            out["patch"].append(F.normalize(f["x_norm_patchtokens"].float(), dim=-1))
        if pixels:
            out["pixels"].append(F.adaptive_avg_pool2d(images.float(), min(32, images.shape[-1]))
                                 .flatten(1))  # (b, 3 x 32 x 32)
    out = {k: torch.cat(v) for k, v in out.items()}
    for k, v in out.items() if W > 1 else ():  # pad to one length, gather, interleave back
        v = torch.cat([v, v.new_zeros(math.ceil(len(dataset) / W) - len(v), *v.shape[1:])])
        parts = [torch.empty_like(v) for _ in range(W)]
        dist.all_gather(parts, v)
        out[k] = torch.stack(parts, dim=1).flatten(0, 1)[:len(dataset)]
    return out

@torch.no_grad()
def knn_classify(train_features, train_labels, test_features, test_labels, ks=(10, 20, 100, 200),
                 T=0.07):
    """Weighted kNN: each of the k most similar train images votes for its class with weight
    softmax(sim / T) over the top max(k) neighbours. Returns {k: (top-1 %, top-5 %)}."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    ks = sorted({min(k, len(train_labels)) for k in ks})
    correct = {k: [0, 0] for k in ks}
    for i in range(0, len(test_features), 256):
        sims = test_features[i:i + 256] @ train_features.T  # (b, n_train) cosine similarities
        top_sims, top_idx = sims.topk(ks[-1], dim=1)  # (b, max k)
        weights = (top_sims / T).softmax(dim=1)
        votes = F.one_hot(train_labels[top_idx], num_classes) * weights.unsqueeze(-1)  # (b, k, C)
        target = test_labels[i:i + 256].unsqueeze(1)
        for k in ks:
            top5 = votes[:, :k].sum(1).topk(min(5, num_classes), dim=1).indices  # (b, 5)
            correct[k][0] += (top5[:, :1] == target).sum().item()
            correct[k][1] += (top5 == target).any(dim=1).sum().item()
    return {k: (100 * c1 / len(test_labels), 100 * c5 / len(test_labels))
            for k, (c1, c5) in correct.items()}

def class_balanced(labels, n_per_class, seed=0):
    """Indices of at most n_per_class random items of each class (all for 0), sorted."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    taken, keep = defaultdict(int), []
    for i in order:
        if n_per_class == 0 or taken[labels[i]] < n_per_class:
            taken[labels[i]] += 1
            keep.append(i)
    return sorted(keep)

def labels_of(dataset):  # a dataset's labels, or a Subset's (one level deep), decoding nothing
    subset = isinstance(dataset, torch.utils.data.Subset)
    return [dataset.dataset.labels[i] for i in dataset.indices] if subset else dataset.labels

def make_knn_data(cfg, images=None):
    """(neighbours, queries) for the kNN monitor, or None without labels: evaluation.knn_*_dataset,
    the built-in splits, DIR/train and DIR/val, or else a fixed fifth of DIR's classes' images."""
    ev, eval_t = cfg.evaluation, make_eval_transform(cfg.crops.global_crops_size)

    def folder(path):
        return ImageFolderDataset(share_from_rank0(lambda: scan_images(path)), eval_t)

    if ev.knn_train_dataset or ev.knn_val_dataset:
        if not (ev.knn_train_dataset and ev.knn_val_dataset):
            raise UserError("set both evaluation.knn_train_dataset and evaluation.knn_val_dataset")
        train, val = folder(ev.knn_train_dataset), folder(ev.knn_val_dataset)
    elif not cfg.train.dataset_path:
        train, val = builtin_split("train", eval_t), builtin_split("val", eval_t)
    else:
        train = ImageFolderDataset(images or pretrain_images(cfg, cfg.train.output_dir), eval_t)
        val_root = data_folders(cfg.train.dataset_path)[1]
        val = folder(val_root) if val_root else None
        if val is None or val.images.classes != train.images.classes:
            if len(train.images.classes) < 2:
                print0("kNN monitor: off (no class sub-folders, so no labels to evaluate with)")
                return None
            if val_root:
                print0(f"kNN monitor: '{val_root}' has no class folders like the train folder's "
                       f"(the raw ILSVRC val tarball?); a held-out part of train serves instead")
            perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
            held_out = sorted(perm[:len(train) // 5])
            val, train = (torch.utils.data.Subset(train, held_out),
                          torch.utils.data.Subset(train, sorted(perm[len(train) // 5:])))
    train = torch.utils.data.Subset(train, class_balanced(labels_of(train), ev.knn_n_per_class))
    if ev.knn_max_images and len(val) > ev.knn_max_images:
        val = torch.utils.data.Subset(val, class_balanced([0] * len(val), ev.knn_max_images))
    print0(f"kNN monitor: {len(train)} neighbours, {len(val)} queries")
    return train, val

@torch.no_grad()
def attention_on_objects(backbone, cfg, device, n_images=200):
    """Ours, for the built-in data: the share of the last block's cls attention that falls on the
    objects' patches, against the share of the patches they cover (what blind attention scores)."""
    size, p, R = cfg.crops.global_crops_size, backbone.patch_size, backbone.num_register_tokens
    shapes, image_t = builtin_split("val", None), make_eval_transform(size)
    mask_t = transforms.Compose([transforms.Resize(round(size * 256 / 224)),
                                 transforms.CenterCrop(size), transforms.ToTensor()])
    drawn = [shapes.draw(i) for i in range(n_images)]
    x = torch.stack([image_t(img) for img, _, _ in drawn]).to(device)  # (n, 3, S, S)
    masks = torch.stack([mask_t(mask) for _, _, mask in drawn])  # (n, 1, S, S)
    on_object = (F.avg_pool2d(masks, p).flatten(1) > 0.5).float().to(device)  # (n, N)
    was_training = backbone.training
    attn = backbone.eval().get_last_self_attention(x)[:, :, 0, 1 + R:].mean(1)  # (n, N)
    backbone.train(was_training)
    share = (attn * on_object).sum(1) / attn.sum(1)
    return share.mean().item(), on_object.mean().item()

def evaluate(cfg, model, knn_data, iteration, output_dir, device):
    """kNN of the teacher's cls tokens (and at iteration 0 of the raw pixels), attention on the
    objects (built-in data), a line of eval.jsonl, a teacher dump. Returns {k: (top1, top5)}."""
    # Deviation from official: kNN runs inside the run, on at most knn_n_per_class neighbours per
    # class (official: the separate eval/knn.py on a teacher dump, with the whole train set).
    teacher, row, results = model.teacher.backbone, {"iteration": iteration}, None
    if knn_data is not None:
        kw = dict(batch_size=cfg.evaluation.knn_batch_size, autocast_ctx=model.autocast_ctx,
                  pixels=iteration == 0, num_workers=min(cfg.train.num_workers, 8))
        train_f, val_f = (extract_features(teacher, s, device, **kw) for s in knn_data)
        knn = partial(knn_classify, ks=cfg.evaluation.knn_nb, T=cfg.evaluation.knn_temperature)
        results = knn(train_f["cls"], train_f["labels"], val_f["cls"], val_f["labels"])
        row["knn_top1"] = {k: t1 for k, (t1, _) in results.items()}
        row["knn_top5"] = {k: t5 for k, (_, t5) in results.items()}
        print0(f"kNN at iteration {iteration}: " + ", ".join(
            f"k={k} top-1 {t1:.1f}%" for k, (t1, _) in results.items()))
        if iteration == 0:  # the baseline: kNN on the mean-centred pixels themselves
            mean = train_f["pixels"].mean(0)
            pixels = knn(F.normalize(train_f["pixels"] - mean, dim=1), train_f["labels"],
                         F.normalize(val_f["pixels"] - mean, dim=1), val_f["labels"])
            row["pixels_knn_top1"] = {k: t1 for k, (t1, _) in pixels.items()}
            print0("kNN on raw pixels (the baseline to beat): " + ", ".join(
                f"k={k} top-1 {t1:.1f}%" for k, (t1, _) in pixels.items()))
    if not cfg.train.dataset_path:
        row["attention_on_object"], row["object_area"] = attention_on_objects(teacher, cfg, device)
        print0(f"teacher cls attention on the objects: {100 * row['attention_on_object']:.0f}% "
               f"(they cover {100 * row['object_area']:.0f}% of the patches)")
    if get_rank() == 0:
        with open(os.path.join(output_dir, "eval.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
    if iteration > 0:
        save_teacher(output_dir, model, iteration)
    return results


# -------------------------------------------------------------------------------------------------
# 13. Pictures and features (ours; the PCA pictures follow the DINOv2 paper's figure 1)
# -------------------------------------------------------------------------------------------------

def pca_rgb(patch_tokens, grid):
    """First three principal components of (N, D) patch features as an RGB image (3, h, w): the
    foreground (first component above half) coloured by its own PCA, as DINOv2's figure 1."""
    x = patch_tokens.float() - patch_tokens.float().mean(0)
    first = torch.pca_lowrank(x, q=3, center=False)[0][:, 0]
    first = (first - first.min()) / (first.max() - first.min() + 1e-8)
    fg = first > 0.5
    if fg.float().mean() > 0.5:  # the sign of a component is arbitrary: the smaller part is fg
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
def visualize(backbone, images, output_dir, image_size, device="cpu"):
    """For each (name, PIL image): <name>_pca.png (image | PCA of the patch features) and
    <name>_attn.png (image | mean | per-head cls attention of the last block, no registers)."""
    backbone.eval()
    p, R, written = backbone.patch_size, backbone.num_register_tokens, []
    transform = make_eval_transform(image_size)
    std, mean = (torch.tensor(v, device=device).view(3, 1, 1)
                 for v in (IMAGENET_STD, IMAGENET_MEAN))
    for name, img in images:
        x = transform(img).unsqueeze(0).to(device)  # (1, 3, S, S)
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        scale = max(1, 224 // x.shape[-1])  # small images shown larger, pixels kept sharp

        def up(m):  # (c, h, w) -> (c, scale S, scale S), nearest so patches stay visible
            return F.interpolate(m.unsqueeze(0).float().cpu(), scale_factor=scale * x.shape[-1]
                                 / m.shape[-1], mode="nearest")[0]

        shown = up((x[0] * std + mean).clamp(0, 1))
        tokens = backbone.forward_features(x)["x_norm_patchtokens"][0].cpu()  # (N, D)
        save_image([shown, up(pca_rgb(tokens, grid))], os.path.join(output_dir, f"{name}_pca.png"),
                   padding=2)
        attn = backbone.get_last_self_attention(x)[0, :, 0, 1 + R:].cpu()  # (heads, N)
        attn = attn / attn.amax(dim=1, keepdim=True)
        maps = [up(a.reshape(1, *grid)).expand(3, -1, -1)
                for a in torch.cat([attn.mean(0, keepdim=True), attn])]
        save_image([shown] + maps, os.path.join(output_dir, f"{name}_attn.png"), padding=2, nrow=8)
        written += [os.path.join(output_dir, f"{name}_{kind}.png") for kind in ("pca", "attn")]
    return written

def pictures_or_features(args, device):
    """--visualize IMAGE... or --extract-features DIR (into --out), with the backbone of
    --pretrained FILE or of the run in --output-dir."""
    weights = args.pretrained or os.path.join(args.output_dir or "", "teacher_backbone.pth")
    if not (args.pretrained or args.output_dir and os.path.isfile(weights)):
        raise UserError("give --pretrained FILE, or --output-dir of a run with a "
                        "teacher_backbone.pth")
    missing = [q for q in args.visualize or [] if not os.path.isfile(q)]
    if missing or (args.extract_features and not args.out):
        raise UserError(f"image '{missing[0]}' not found" if missing
                        else "--extract-features needs --out FILE.pt")
    backbone = backbone_from_file(weights).to(device)
    p, size = backbone.patch_size, args.image_size or 224
    if args.visualize:
        out_dir = args.output_dir or os.path.dirname(os.path.abspath(args.visualize[0]))
        os.makedirs(out_dir, exist_ok=True)
        images = [(os.path.splitext(os.path.basename(q))[0], load_rgb(q)) for q in args.visualize]
        for f in visualize(backbone, images, out_dir, size // p * p, device):
            print(f"wrote {f}")
        return 0
    if size % p:
        raise UserError(f"--image-size {size} is not a multiple of the patch size {p}")
    images = scan_images(args.extract_features)
    feats = extract_features(backbone, ImageFolderDataset(images, make_eval_transform(size)),
                             device, batch_size=64, patch_tokens=args.patch_features,
                             num_workers=min(4, os.cpu_count() or 1), desc="features")
    result = {"paths": [images.relpath(i) for i in range(len(images))], "cls": feats["cls"].cpu(),
              **({"patch": feats["patch"].cpu()} if args.patch_features else {})}
    atomic_save(result, args.out)
    print(f"wrote {len(images)} features of dim {result['cls'].shape[1]} to {args.out}")
    return 0


# -------------------------------------------------------------------------------------------------
# 14. Benchmark (ours): the FLOPs of a step counted from the config, the real train step timed on
# synthetic batches, and the data pipeline timed alone. README "Speed" holds the measured numbers.
# -------------------------------------------------------------------------------------------------

def vit_flops(cfg, n_images, img_size):
    """Forward FLOPs of the backbone on n_images of img_size (a multiply-add counts 2)."""
    s, (D, depth, _) = cfg.student, VIT_SIZES[cfg.student.arch]
    N = (img_size // s.patch_size) ** 2
    T = 1 + s.num_register_tokens + N  # tokens per image
    ffn = 2 * 4 * D if s.ffn_layer == "mlp" else 3 * ((int(4 * D * 2 / 3) + 7) // 8 * 8)
    per_token = 4 * D * D + ffn * D + 2 * T * D  # qkv + proj, the FFN, q.k and attention x v
    return 2 * n_images * (N * 3 * s.patch_size ** 2 * D + depth * T * per_token)

def head_flops(cfg, n_tokens, section="dino"):
    c, D = cfg[section], VIT_SIZES[cfg.student.arch][0]
    hidden = c.head_hidden_dim
    return 2 * n_tokens * (D * hidden + hidden ** 2 * max(c.head_nlayers - 2, 0)
                           + hidden * c.head_bottleneck_dim + c.head_bottleneck_dim
                           * c.head_n_prototypes)

def step_flops(cfg, B, n_masked):
    """Model FLOPs of one step on one process: teacher forward, student forward + backward (3x)."""
    G, L, n_loc = (cfg.crops.global_crops_size, cfg.crops.local_crops_size,
                   cfg.crops.local_crops_number * B)
    patches = (head_flops(cfg, n_masked, "ibot" if cfg.ibot.separate_head else "dino")
               if cfg.ibot.loss_weight > 0 else 0)
    teacher = vit_flops(cfg, 2 * B, G) + head_flops(cfg, 2 * B) + patches
    student = vit_flops(cfg, 2 * B, G) + vit_flops(cfg, n_loc, L) + head_flops(cfg, 2 * B + n_loc)
    return teacher + 3 * (student + patches)

def measure_peak_flops(device, dtype, reps=10):
    """FLOP/s of a large square matmul in this dtype, the peak that utilisation refers to."""
    n = 8192 if device.type == "cuda" else 1024  # on a GPU, launch overheads vanish
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    timed(device, lambda: a @ b)  # the first call warms up; the best of 3 ignores a busy moment
    seconds = min(timed(device, lambda: [a @ b for _ in range(reps)]) for _ in range(3))
    return 2 * n ** 3 * reps / seconds

def timed(device, fn):
    """Seconds that fn() takes, waiting for the GPU before and after."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0

def peak_memory_gib(device):
    """CUDA's max allocated memory, or on a CPU this process's peak RSS (Linux and macOS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    try:
        import resource  # not on Windows
    except ImportError:
        return float("nan")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2 ** (30 if sys.platform == "darwin" else 20)

def cost_here(cfg, utilisation=0.35):
    """"N iterations ..., about T here", T from the FLOPs of a step and a CPU matmul timed now."""
    B, grid = cfg.train.batch_size_per_gpu, cfg.crops.global_crops_size // cfg.student.patch_size
    n_masked = B * cfg.ibot.mask_sample_probability * sum(cfg.ibot.mask_ratio_min_max) * grid ** 2
    iters = cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH
    peak = measure_peak_flops(torch.device("cpu"), torch.float32)
    hours = iters * step_flops(cfg, B, n_masked) / (utilisation * peak) / 3600
    when = ("under a minute" if hours < 1 / 60 else f"about {60 * hours:.0f} minutes" if hours < 2
            else f"about {hours:.0f} hours" if hours < 48 else f"about {hours / 24:.0f} days")
    return f"{iters} iterations of {cfg.student.arch}/{cfg.student.patch_size}, {when} here"

def benchmark(cfg, device, warmup=3, iters=10):
    """train_step's parts timed on a synthetic in-memory batch: images/s, time per part, peak
    memory, FLOPs and utilisation, and all of it as one JSON line `result: {...}`."""
    dtype, B, W = resolve_dtype(cfg, device), cfg.train.batch_size_per_gpu, get_world_size()
    apply_scaling_rules(cfg, W)
    model, optimizer = build_model_and_optimizer(cfg, device, dtype)
    G, L, p = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.student.patch_size
    aug, cfg.train.num_workers = make_augmentation(cfg), 0  # one batch of built-in images
    batch = next(iter(make_pretrain_loader(cfg, builtin_split("train", aug.geometry), 0, 0, 1)))
    batch = aug.colour_batch(batch, device)  # crops on the device, as the training loop has them

    def teacher_forward():
        with torch.no_grad(), model.autocast_ctx:
            model.teacher.dino_head(model.teacher.backbone(batch["collated_global_crops"]))

    times = defaultdict(float)
    apply_optim_scheduler(optimizer, cfg.optim.lr, 0.04, cfg.optim.lr)
    for i in range(warmup + iters):  # train_step's parts, each timed on its own
        if i == warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        teacher = timed(device, teacher_forward)
        optimizer.zero_grad(set_to_none=True)
        fwd_bwd = timed(device, lambda: model.forward_backward(batch, teacher_temp=0.04))
        optimizer_ema = timed(device, lambda: optimizer_step(model, optimizer, mom=0.994))
        for k, v in (("step", fwd_bwd + optimizer_ema), ("teacher", teacher),
                     ("student_fwd_bwd", fwd_bwd - teacher), ("optimizer_ema", optimizer_ema)):
            times[k] += v / iters if i >= warmup else 0.0
    flops, peak = step_flops(cfg, B, int(batch["n_masked_patches"])), measure_peak_flops(device,
                                                                                        dtype)
    result = {"arch": f"{cfg.student.arch}/{p}", "batch_per_process": B, "processes": W,
              "device": str(device), "dtype": str(dtype).replace("torch.", ""),
              "compile": cfg.train.compile, "images_per_s": B / times["step"],
              **{f"{k}_s": v for k, v in times.items()}, "peak_memory_gib": peak_memory_gib(device),
              "flops": flops, "peak_flops": peak, "mfu": flops / times["step"] / peak}
    print0(f"benchmark: {result['arch']}, batch {B} x {W}, {G}/{L} px, {result['dtype']} on "
           f"{device}, compile {cfg.train.compile}: {B / times['step']:.1f} images/s per process, "
           f"{result['peak_memory_gib']:.2f} GiB ({'CUDA' if device.type == 'cuda' else 'RSS'}), "
           f"{100 * result['mfu']:.1f}% of a measured matmul peak\nresult: {json.dumps(result)}")
    return result

def benchmark_data(cfg, path, n_images=32):
    """Images/s on one core, side by side on the same (cached) files: (a) official, each crop via
    torchvision's PIL ops, (b) our worker's geometry(); then colour() where training runs it."""
    images, aug, c = scan_images(path), make_augmentation(cfg), cfg.crops
    files = [os.path.join(images.root, images.relpath(i % len(images))) for i in range(n_images)]
    official_crops = [transforms.Compose([  # p: jitter, grayscale, blur, solarize of each crop
        aug.geometric_augmentation_global if i < 2 else aug.geometric_augmentation_local,
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=p[0]),
        transforms.RandomGrayscale(p[1]),
        transforms.RandomApply([transforms.GaussianBlur(9, sigma=(0.1, 2.0))], p=p[2]),
        transforms.RandomSolarize(128, p[3]), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        for i, p in enumerate(aug.p_apply.tolist())]
    threads, seconds = torch.get_num_threads(), {}
    torch.set_num_threads(1)  # one core, as one loader worker has
    for name, per_image in [("warm-up", lambda im: im), ("worker", aug.geometry),
                            ("official", lambda im: [crop(im) for crop in official_crops])]:
        t0 = time.perf_counter()
        [per_image(load_rgb(f)) for f in files]
        seconds[name] = (time.perf_counter() - t0) / n_images
    params = torch.stack([aug.colour_parameters() for _ in range(n_images)], dim=1)  # (2+L, n, 12)
    crops = [(torch.randint(0, 256, (p.numel() // 12, 3, s, s), dtype=torch.uint8), p.flatten(0, 1))
             for p, s in [(params[:2], c.global_crops_size), (params[2:], c.local_crops_size)]]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where colour runs
    colour = lambda: [aug.colour(x.to(device), p) for x, p in crops]  # noqa: E731
    seconds["colour"] = statistics.mean([timed(device, colour) for _ in range(6)][1:]) / n_images
    torch.set_num_threads(threads)
    result = {"official_images_per_s_per_core": 1 / seconds["official"],
              "worker_images_per_s_per_core": 1 / seconds["worker"],
              "worker_speedup_vs_official": seconds["official"] / seconds["worker"],
              "colour_ms_per_image": 1e3 * seconds["colour"], "colour_device": device.type}
    print(f"{c.global_crops_size}/{c.local_crops_size} px, 2 + {c.local_crops_number} crops of "
          f"{n_images} images of '{path}'\nresult: {json.dumps(result)}")
    return result


# -------------------------------------------------------------------------------------------------
# 15. Command line: config overrides and their checks, then main(): training by default;
# --visualize, --extract-features, --benchmark(-data); one `dino_mini: error:` line for bad input.
# -------------------------------------------------------------------------------------------------

CHOICES = {  # keys whose value must be one of a few words
    "compute_precision.dtype": ("auto", "fp32", "bf16", "fp16"),
    "train.centering": ("centering", "sinkhorn_knopp"),
    "student.arch": ("vit_pico", "vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant2"),
    "student.ffn_layer": ("mlp", "swiglu", "swiglufused"), "optim.scaling_rule": ("sqrt_wrt_1024",)}
PAIRS = ("ibot.mask_ratio_min_max", "crops.global_crops_scale", "crops.local_crops_scale")
POSITIVE = ("train.batch_size_per_gpu", "train.OFFICIAL_EPOCH_LENGTH", "optim.epochs",
            "train.log_every", "student.patch_size", "crops.global_crops_size",
            "crops.local_crops_size", "dino.head_n_prototypes", "dino.head_bottleneck_dim",
            "dino.head_hidden_dim", "ibot.head_n_prototypes", "ibot.head_bottleneck_dim",
            "ibot.head_hidden_dim", "teacher.teacher_temp", "teacher.warmup_teacher_temp",
            "train.keep_checkpoints", "evaluation.knn_batch_size", "evaluation.knn_temperature")
UNIT_INTERVAL = ("ibot.mask_sample_probability", "student.drop_path_rate",
                 "teacher.momentum_teacher", "teacher.final_momentum_teacher",
                 "optim.adamw_beta1", "optim.adamw_beta2", "crops.flip_probability")
CONFIGS_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs.json")

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
        hint = f"closest valid keys: {', '.join(close)}" if close else "keys are like optim.lr"
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

def validate_config(cfg):
    """Values of the right type that make no sense are caught here, before any work starts."""
    flat, p = flat_keys(cfg), cfg.student.patch_size

    def require(ok, key, rule):
        if not ok:
            raise UserError(f"config key '{key}' must be {rule}, got {flat[key]!r}")

    for key, allowed in CHOICES.items():
        require(flat[key] in allowed, key, f"one of {', '.join(allowed)}")
    for key, v in flat.items():
        if is_number(v) and key in POSITIVE:
            require(v > 0, key, "> 0")
        elif is_number(v):
            require(0 <= v <= 1 if key in UNIT_INTERVAL else v >= 0, key,
                    "between 0 and 1" if key in UNIT_INTERVAL else ">= 0")
    for key in PAIRS:
        require(0 <= flat[key][0] <= flat[key][1] <= 1, key, "[low, high], 0 <= low <= high <= 1")
    require(all(isinstance(k, int) and k > 0 for k in flat["evaluation.knn_nb"]),
            "evaluation.knn_nb", "a list of positive integers")
    require(len(cfg.crops.blur_probabilities) == 3 and all(0 <= v <= 1 for v in flat[
        "crops.blur_probabilities"]), "crops.blur_probabilities", "3 probabilities")
    for key in ("crops.global_crops_size", "crops.local_crops_size"):
        require(flat[key] % p == 0, key, f"a multiple of student.patch_size={p}")
    require(cfg.optim.warmup_epochs <= cfg.optim.epochs, "optim.warmup_epochs",
            f"at most optim.epochs={cfg.optim.epochs}")
    if cfg.dino.loss_weight <= 0 and cfg.ibot.loss_weight <= 0:
        raise UserError("both dino.loss_weight and ibot.loss_weight are 0: nothing to train")

class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one clear line instead of argparse's usage dump
        raise UserError(f"{message} (see --help)")

def build_parser():
    p = ArgumentParser(prog="dino_mini", description="DINOv2 self-supervised pre-training.",
                       epilog="Any config key can be set as section.key=value, e.g. "
                              "optim.epochs=10 (keys and defaults: top of dino_mini.py).")
    p.add_argument("--config", help="configs.json preset (default: demo; with --data: default "
                                    "on a GPU, small on a CPU)")
    p.add_argument("--data", help="folder of images, searched recursively (default: shapes)")
    p.add_argument("--output-dir", help="checkpoints, metrics, pictures (train.output_dir)")
    p.add_argument("--pretrained", help="backbone weights to start from or to look at")
    p.add_argument("--visualize", nargs="+", metavar="IMAGE", help="write PCA/attention pictures")
    p.add_argument("--extract-features", metavar="DIR", help="save normalised features of DIR")
    p.add_argument("--out", metavar="FILE", help="output file of --extract-features")
    p.add_argument("--patch-features", action="store_true", help="also keep the patch tokens")
    p.add_argument("--image-size", type=int, help="image size for --visualize/--extract-features")
    p.add_argument("--benchmark", action="store_true", help="time the train step")
    p.add_argument("--benchmark-data", metavar="DIR", help="time the data pipeline on DIR")
    p.add_argument("opts", nargs="*", metavar="section.key=value", help="config overrides")
    return p

def main(argv=None):
    """Entry point. Returns the exit code: 0 on success, 2 on bad input (one error line)."""
    try:
        return run(argv)
    except (UserError, torch.cuda.OutOfMemoryError) as e:
        for bar in list(getattr(tqdm, "_instances", [])):  # end an open progress bar's line
            bar.close()
        message = str(e).strip()
        if isinstance(e, torch.cuda.OutOfMemoryError):  # what to change, not a CUDA traceback
            message = (f"GPU out of memory ({message.splitlines()[0][:120]}); lower "
                       f"train.batch_size_per_gpu, use compute_precision.dtype=bf16, fewer "
                       f"crops.local_crops_number or a smaller student.arch")
        if "Original Traceback" in message:  # raised in a DataLoader worker: its last line
            message = message.splitlines()[-1].split("UserError: ", 1)[-1]
        print(f"dino_mini: error: {message}", file=sys.stderr, flush=True)
        return 2

def run(argv):
    args = build_parser().parse_intermixed_args(argv)  # overrides may stand anywhere
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # without --config: the demo, the official recipe on a GPU, the small-data recipe on a CPU
    preset = args.config or ("demo" if not args.data else "default" if device.type == "cuda"
                             else "small")
    overrides = list(args.opts) + ([f"train.dataset_path={args.data}"] if args.data else [])
    if args.pretrained and not (args.visualize or args.extract_features):
        overrides.append(f"student.pretrained_weights={args.pretrained}")
    cfg = load_config(preset, overrides)
    if preset == "small" and not args.config and not (args.benchmark or args.benchmark_data):
        print0(f"no GPU: training with the small preset, {cost_here(cfg)}; the official recipe "
               f"(--config default) would take {cost_here(load_config('default', overrides))}")
    if args.benchmark_data:
        return benchmark_data(cfg, args.benchmark_data) and 0
    if args.extract_features or args.visualize:
        return pictures_or_features(args, device)
    if args.benchmark:
        _, _, device = setup_distributed()
        try:
            return benchmark(cfg, device) and 0
        finally:
            cleanup_distributed()
    # training: check what can be checked before any work
    output_dir = cfg.train.output_dir = args.output_dir or cfg.train.output_dir
    try:
        os.makedirs(output_dir, exist_ok=True)
        if not os.access(output_dir, os.W_OK):
            raise PermissionError("permission denied")
    except OSError as e:
        raise UserError(f"output dir '{output_dir}' is not writable ({e})") from None
    if cfg.dino.koleo_loss_weight > 0 and cfg.train.batch_size_per_gpu < 2:
        print("dino_mini: warning: KoLeo needs 2+ images per process; with batch_size_per_gpu=1 "
              "it is 0", file=sys.stderr)
    rank, world_size, device = setup_distributed()
    STOP["signal"] = None
    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        images = pretrain_images(cfg, output_dir)
        knn_data = make_knn_data(cfg, images)
        apply_scaling_rules(cfg, world_size)  # so that config.json records the lr used
        print0(f"config: {preset} preset" + (f" + {' '.join(overrides)}" if overrides else ""))
        if rank == 0:
            with open(os.path.join(output_dir, "config.json"), "w") as f:
                json.dump(cfg, f, indent=1)
        t0 = time.time()
        model, knn = train(cfg, device, output_dir, knn_data, images)
        if STOP["signal"] is None:
            print0(f"done in {time.time() - t0:.0f} s; outputs in '{output_dir}'")
            knn = {it: result for it, result in knn.items() if result}  # None: no labels
            if len(knn) >= 2:  # first and last kNN at k=20 (or the smallest k)
                (first, a), (last, b) = min(knn.items()), max(knn.items())
                k = 20 if 20 in a else min(a)
                print0(f"kNN top-1 (k={k}): {a[k][0]:.1f}% at iteration {first} -> "
                       f"{b[k][0]:.1f}% at iteration {last}")
            if not cfg.train.dataset_path and rank == 0:  # what the teacher learned, 4 images
                shapes = builtin_split("val", None)
                images = [(f"demo_{SHAPES[i]}", shapes.draw(i)[0]) for i in range(4)]
                for f in visualize(model.teacher.backbone, images, output_dir,
                                   cfg.crops.global_crops_size, device):
                    print(f"wrote {f}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        cleanup_distributed()
    return 0

if __name__ == "__main__":
    sys.exit(main())
