"""Tests for dino_mini.py. Run: python -m pytest test_dino_mini.py -q

Everything runs on CPU with tiny models in about a minute; GPU tests skip without a GPU. Values are
checked against hand computations, closed forms or the official recipe's numbers; runs that only
read a finished training share one (the `finished_run` fixture).
`python test_dino_mini.py` prints the README's table of deviations from the official code.
"""

import copy
import io
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
import torchvision.transforms.functional as TF

import dino_mini as dm

HERE = os.path.dirname(os.path.abspath(__file__))
# the demo preset made smaller still: a whole run of 6 iterations takes a few seconds
TINY = ["optim.epochs=2", "train.OFFICIAL_EPOCH_LENGTH=3", "optim.warmup_epochs=1",
        "train.batch_size_per_gpu=8", "train.num_workers=0", "crops.local_crops_number=2",
        "evaluation.knn_max_images=40", "evaluation.knn_n_per_class=4", "train.log_every=1",
        "teacher.warmup_teacher_temp_epochs=1", "evaluation.eval_period_iterations=3",
        "train.checkpoint_period=3"]
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def tiny_config(*extra):
    return dm.load_config("demo", TINY + list(extra))


def run_cli(out, *args):
    """dm.main in this process, on the TINY settings; returns the exit code."""
    return dm.main(["--output-dir", str(out)] + TINY + list(args))


def make_batch(cfg, n_images=4, seed=0):
    """A collated batch of built-in images, as the loader makes it."""
    random.seed(seed)
    torch.manual_seed(seed)
    c = cfg.crops
    aug = dm.DataAugmentationDINO(c.global_crops_scale, c.local_crops_scale, c.local_crops_number,
                                  c.global_crops_size, c.local_crops_size)
    data = dm.ShapesDataset(n_images, aug)
    grid = c.global_crops_size // cfg.student.patch_size
    gen = dm.MaskingGenerator((grid, grid), max_num_patches=0.5 * grid * grid)
    return dm.collate_data_and_cast([data[i] for i in range(n_images)],
                                    tuple(cfg.ibot.mask_ratio_min_max),
                                    cfg.ibot.mask_sample_probability, torch.float32, grid ** 2,
                                    gen)


def checkpoint(out, iteration):
    return torch.load(os.path.join(out, f"model_{iteration:07d}.pth"), weights_only=False)


def same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One finished TINY run (6 iterations, evaluations at 0, 3, 6) for the tests that read it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert run_cli(out) == 0
    return out


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

# dinov2/configs/ssl_default_config.yaml, written out key by key (the keys we share with it)
OFFICIAL_DEFAULTS = {
    "compute_precision.grad_scaler": True, "dino.loss_weight": 1.0,
    "dino.head_n_prototypes": 65536, "dino.head_bottleneck_dim": 256, "dino.head_nlayers": 3,
    "dino.head_hidden_dim": 2048, "dino.koleo_loss_weight": 0.1, "ibot.loss_weight": 1.0,
    "ibot.mask_sample_probability": 0.5, "ibot.mask_ratio_min_max": [0.1, 0.5],
    "ibot.separate_head": False, "ibot.head_n_prototypes": 65536, "ibot.head_bottleneck_dim": 256,
    "ibot.head_nlayers": 3, "ibot.head_hidden_dim": 2048, "train.batch_size_per_gpu": 64,
    "train.seed": 0, "train.num_workers": 10, "train.OFFICIAL_EPOCH_LENGTH": 1250,
    "train.centering": "centering", "student.arch": "vit_large", "student.patch_size": 16,
    "student.drop_path_rate": 0.3, "student.layerscale": 1.0e-5, "student.drop_path_uniform": True,
    "student.pretrained_weights": "", "student.ffn_layer": "mlp", "student.block_chunks": 0,
    "student.qkv_bias": True, "student.proj_bias": True, "student.ffn_bias": True,
    "student.num_register_tokens": 0, "student.interpolate_antialias": False,
    "student.interpolate_offset": 0.1, "teacher.momentum_teacher": 0.992,
    "teacher.final_momentum_teacher": 1.0, "teacher.warmup_teacher_temp": 0.04,
    "teacher.teacher_temp": 0.07, "teacher.warmup_teacher_temp_epochs": 30, "optim.epochs": 100,
    "optim.weight_decay": 0.04, "optim.weight_decay_end": 0.4, "optim.base_lr": 0.004,
    "optim.lr": 0.0, "optim.warmup_epochs": 10, "optim.min_lr": 1.0e-6, "optim.clip_grad": 3.0,
    "optim.freeze_last_layer_epochs": 1, "optim.scaling_rule": "sqrt_wrt_1024",
    "optim.patch_embed_lr_mult": 0.2, "optim.layerwise_decay": 0.9, "optim.adamw_beta1": 0.9,
    "optim.adamw_beta2": 0.999, "crops.global_crops_scale": [0.32, 1.0],
    "crops.local_crops_number": 8, "crops.local_crops_scale": [0.05, 0.32],
    "crops.global_crops_size": 224, "crops.local_crops_size": 96,
    "evaluation.eval_period_iterations": 12500}
# dinov2/configs/train/vitl14.yaml; vitg14.yaml differs in the lines after it
OFFICIAL_VITL14 = {
    "dino.head_n_prototypes": 131072, "dino.head_bottleneck_dim": 384, "ibot.separate_head": True,
    "ibot.head_n_prototypes": 131072, "train.batch_size_per_gpu": 32,
    "train.centering": "sinkhorn_knopp", "student.arch": "vit_large", "student.patch_size": 14,
    "student.drop_path_rate": 0.4, "student.ffn_layer": "swiglufused", "student.block_chunks": 4,
    "teacher.momentum_teacher": 0.994, "optim.epochs": 500, "optim.weight_decay_end": 0.2,
    "optim.base_lr": 2.0e-4, "optim.warmup_epochs": 80, "optim.layerwise_decay": 1.0,
    "crops.local_crops_size": 98}
OFFICIAL_VITG14 = {**OFFICIAL_VITL14, "train.batch_size_per_gpu": 12, "student.arch": "vit_giant2"}


@pytest.mark.parametrize("preset,official", [
    ("default", {}), ("vitl16_short", {"student.block_chunks": 4}),
    ("vitl14", OFFICIAL_VITL14), ("vitg14", OFFICIAL_VITG14)])
def test_presets_equal_the_official_configs(preset, official):
    """Every official key of the default YAML, with the train YAML's overrides on top."""
    flat = dm.flat_keys(dm.load_config(preset))
    expected = {**OFFICIAL_DEFAULTS, **official}
    assert {k: flat[k] for k in expected} == expected


def test_overrides_and_errors_name_the_key():
    """section.key=value parses to the default's type; mistakes name the key or its neighbours."""
    cfg = dm.load_config("default", ["optim.epochs=10", "train.centering=sinkhorn_knopp",
                                     "optim.base_lr=1e-3", "ibot.mask_ratio_min_max=[0.2,0.4]",
                                     "ibot.separate_head=true", "evaluation.knn_nb=[10,20]",
                                     "optim.min_lr=0"])
    assert cfg.optim.epochs == 10 and cfg.train.centering == "sinkhorn_knopp"
    assert cfg.optim.base_lr == 1e-3 and isinstance(cfg.optim.min_lr, float)
    assert cfg.ibot.mask_ratio_min_max == [0.2, 0.4] and cfg.ibot.separate_head is True
    assert cfg.evaluation.knn_nb == [10, 20]  # any number of ks; pairs must stay pairs
    for override, message in [("optim.base_lrr=1", "closest valid keys: optim.base_lr"),
                              ("optim.epochs=ten", "expects int"),
                              ("train.centering=sinkhorn", "must be one of"),
                              ("crops.local_crops_scale=[0.1,0.2,0.3]", "expects list"),
                              ("evaluation.knn_nb=[0]", "positive integers"),
                              ("optim.warmup_epochs=200", "at most optim.epochs"),
                              ("crops.blur_probabilities=[0.5,0.5]", "3 probabilities"),
                              ("crops.blur_probabilities=[0,0,2]", "3 probabilities"),
                              ("crops.flip_probability=1.5", "between 0 and 1")]:
        with pytest.raises(dm.UserError, match=message):
            dm.load_config("default", [override])
    with pytest.raises(dm.UserError, match="unknown --config"):
        dm.load_config("no_such_preset")


def test_overrides_anywhere_and_checkpoints_every_three_epochs(tmp_path, capsys):
    """Overrides may stand before, between and after options; train.checkpoint_period=0 (the
    default) saves every 3 x OFFICIAL_EPOCH_LENGTH iterations, as official, and at the end."""
    assert dm.main(["optim.epochs=3", "--config", "demo", "train.x=1"]) == 2
    assert "unknown config key 'train.x'" in capsys.readouterr().err
    argv = ["train.OFFICIAL_EPOCH_LENGTH=1", "--output-dir", str(tmp_path), *TINY[3:],
            "optim.epochs=5", "--config", "demo", "train.checkpoint_period=0"]
    assert dm.main(argv) == 0
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("model_")) == [
        "model_0000003.pth", "model_0000005.pth"]
    assert dm.DEFAULTS["train"]["checkpoint_period"] == 0


def test_every_preset_loads():
    with open(os.path.join(HERE, "configs.json")) as f:
        for name in json.load(f):
            dm.load_config(name)


# ---------------------------------------------------------------------------------------------
# Vision Transformer
# ---------------------------------------------------------------------------------------------


def official_vit_keys(dim, depth, patch, n_pos, regs=0):
    """The keys and shapes of Meta's dinov2_vits14[_reg4]_pretrain.pth (block_chunks=0 model)."""
    keys = {"cls_token": (1, 1, dim), "pos_embed": (1, n_pos, dim), "mask_token": (1, dim),
            "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,),
            "norm.weight": (dim,), "norm.bias": (dim,)}
    if regs:
        keys["register_tokens"] = (1, regs, dim)
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
                     b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
                     b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
                     b + "ls1.gamma": (dim,), b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
                     b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
                     b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,),
                     b + "ls2.gamma": (dim,)})
    return keys


@pytest.mark.parametrize("regs", [0, 4])
def test_official_state_dict_loads_strictly(regs):
    """Our ViT-S/14 has exactly the 175 (176 with registers) tensors of Meta's released file."""
    keys = official_vit_keys(384, 12, 14, 1370, regs)
    model = dm.vit_small(patch_size=14, img_size=518, init_values=1.0, num_register_tokens=regs)
    assert len(model.state_dict()) == 175 + (1 if regs else 0)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == keys
    model.load_state_dict({k: torch.randn(s) for k, s in keys.items()}, strict=True)


def test_pos_embed_interpolation():
    """Identity when the grid matches; else bicubic with the official factors (h/p + 0.1) / M."""
    model = dm.vit_pico(patch_size=4, img_size=32)
    D = model.embed_dim
    assert model.interpolate_pos_encoding(torch.zeros(1, 65, D), 32, 32) is model.pos_embed
    y = model.interpolate_pos_encoding(torch.zeros(1, 1 + 6 * 4, D), 24, 16)  # 6 x 4 patches
    grid = model.pos_embed[:, 1:].reshape(1, 8, 8, D).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, scale_factor=(6.1 / 8, 4.1 / 8), mode="bicubic")
    torch.testing.assert_close(y[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 24, D))
    torch.testing.assert_close(y[:, 0], model.pos_embed[:, 0])
    model.interpolate_offset, model.interpolate_antialias = 0.0, True  # the register models
    ref = F.interpolate(grid, size=(6, 4), mode="bicubic", antialias=True)
    torch.testing.assert_close(model.interpolate_pos_encoding(torch.zeros(1, 25, D), 24, 16)[:, 1:],
                               ref.permute(0, 2, 3, 1).reshape(1, 24, D))


def test_mask_tokens_change_exactly_the_masked_positions():
    """Masked patches become mask_token + pos_embed; every other token is untouched."""
    model = dm.vit_pico(patch_size=4, img_size=32, num_register_tokens=2)
    torch.nn.init.normal_(model.mask_token)
    x = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 64, dtype=torch.bool)
    masks[0, [3, 10, 11]] = True
    plain, masked = model.prepare_tokens_with_masks(x), model.prepare_tokens_with_masks(x, masks)
    changed = (plain != masked).any(-1)  # (2, 1 + 2 + 64)
    assert changed[:, 3:].eq(masks).all() and not changed[:, :3].any()
    torch.testing.assert_close(masked[0, 3 + 10], model.mask_token[0] + model.pos_embed[0, 1 + 10])


def test_vit_outputs_and_attention():
    """forward_features keys and shapes; model(x) is the final-norm cls token; attention rows
    sum to 1; the last intermediate layer is the final output."""
    model = dm.vit_pico(patch_size=4, img_size=32, num_register_tokens=4, init_values=1e-5).eval()
    x = torch.randn(2, 3, 32, 48)
    out = model.forward_features(x)
    D = model.embed_dim
    assert out["x_norm_clstoken"].shape == (2, D) and out["x_norm_regtokens"].shape == (2, 4, D)
    assert out["x_norm_patchtokens"].shape == (2, 96, D)
    torch.testing.assert_close(model(x), out["x_norm_clstoken"])
    torch.testing.assert_close(out["x_norm_clstoken"], model.norm(out["x_prenorm"])[:, 0])
    attn = model.get_last_self_attention(x)
    assert attn.shape == (2, 4, 101, 101)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4, 101))
    (patches, cls), = model.get_intermediate_layers(x, 1, reshape=True, return_class_token=True)
    torch.testing.assert_close(patches.flatten(2).transpose(1, 2), out["x_norm_patchtokens"])
    torch.testing.assert_close(cls, out["x_norm_clstoken"])


def test_attention_matches_hand_written_softmax():
    """The fused attention equals softmax(q k^T / sqrt(d)) v written out."""
    attn = dm.Attention(16, num_heads=2, qkv_bias=True)
    x = torch.randn(3, 5, 16)
    q, k, v = attn.qkv(x).reshape(3, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    ref = ((q @ k.transpose(-2, -1)) / math.sqrt(8)).softmax(-1) @ v
    torch.testing.assert_close(attn(x), attn.proj(ref.transpose(1, 2).reshape(3, 5, 16)))


def test_swiglu_hidden_size_rule():
    """SwiGLU hidden width (int(4D x 2/3) + 7) // 8 x 8: 4096 for ViT-g, 2736 for ViT-L."""
    assert dm.SwiGLUFFNFused(1536, 6144).w3.in_features == 4096
    assert dm.SwiGLUFFNFused(1024, 4096).w12.out_features == 2 * 2736


def test_drop_path_subset_rescales():
    """Batch-subset stochastic depth: int(b (1 - p)) samples get the residual, scaled by b/keep."""
    torch.manual_seed(0)
    out = dm.drop_add_residual_stochastic_depth(torch.zeros(10, 2, 3), torch.ones_like, 0.3)
    per_sample = out[:, 0, 0]
    assert (per_sample > 0).sum() == 7
    torch.testing.assert_close(per_sample[per_sample > 0], torch.full((7,), 10 / 7))


# ---------------------------------------------------------------------------------------------
# Heads and losses
# ---------------------------------------------------------------------------------------------


def test_dino_head_weight_norm():
    """Official keys; g = 1 and trainable; the effective prototype rows have norm g."""
    head = dm.DINOHead(16, 10, hidden_dim=8, bottleneck_dim=4)
    assert sorted(head.state_dict()) == ["last_layer.weight_g", "last_layer.weight_v",
                                         "mlp.0.bias", "mlp.0.weight", "mlp.2.bias",
                                         "mlp.2.weight", "mlp.4.bias", "mlp.4.weight"]
    assert head.last_layer.weight_g.requires_grad and torch.all(head.last_layer.weight_g == 1)
    z = F.normalize(head.mlp(torch.randn(3, 16)), dim=-1)
    v = head.last_layer.weight_v
    torch.testing.assert_close(head.last_layer(z), z @ (v / v.norm(dim=1, keepdim=True)).T)


def test_dino_loss_hand_computed():
    """The sum over (student, teacher) pairs of the mean cross-entropy, student temperature 0.1."""
    s = [torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.2, 0.0]])]
    t = [torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[0.0, 0.0, 1.0]])]
    expected = 0.0
    for si in s:
        logz = math.log(sum(math.exp(y / 0.1) for y in si[0].tolist()))
        for ti in t:
            expected -= sum(a * (x / 0.1 - logz) for a, x in zip(ti[0].tolist(), si[0].tolist()))
    assert dm.DINOLoss(3)(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_centering_and_center_ema_over_two_steps():
    """Targets use the centre of the earlier batches: c1 = 0.1 m1, c2 = 0.9 c1 + 0.1 m2."""
    loss = dm.DINOLoss(4)
    z1, z2 = torch.randn(6, 4), torch.randn(6, 4)
    torch.testing.assert_close(loss.softmax_center_teacher(z1, 0.05), F.softmax(z1 / 0.05, -1))
    loss.update_center(z1)
    p2 = loss.softmax_center_teacher(z2, 0.05)
    c1 = 0.1 * z1.mean(0, keepdim=True)
    torch.testing.assert_close(loss.center, c1)
    torch.testing.assert_close(p2, F.softmax((z2 - c1) / 0.05, -1))
    loss.update_center(z2)
    loss.apply_center_update()
    torch.testing.assert_close(loss.center, 0.9 * c1 + 0.1 * z2.mean(0, keepdim=True))


def test_ibot_center_update_quirk():
    """The iBOT centre moves by 0.1 x the mean over masked tokens (a (1, n, K) input: len 1)."""
    loss = dm.iBOTPatchLoss(5)
    z = torch.randn(1, 7, 5)
    loss.update_center(z)
    loss.apply_center_update()
    torch.testing.assert_close(loss.center, 0.1 * z.mean(1, keepdim=True))


def test_sinkhorn_knopp_marginals():
    """Rows sum to 1; converged, every prototype gets mass n/K; equals 3 hand-written rounds."""
    torch.manual_seed(0)
    z = torch.randn(12, 6)
    q = dm.DINOLoss(6).sinkhorn_knopp_teacher(z, 0.5)
    torch.testing.assert_close(q.sum(1), torch.ones(12))
    converged = dm.DINOLoss(6).sinkhorn_knopp_teacher(z, 0.5, n_iterations=200)
    torch.testing.assert_close(converged.sum(0), torch.full((6,), 2.0))
    Q = torch.exp(z / 0.5).T
    Q = Q / Q.sum()
    for _ in range(3):
        Q = Q / Q.sum(1, keepdim=True) / 6
        Q = Q / Q.sum(0, keepdim=True) / 12
    torch.testing.assert_close(q, (Q * 12).T)
    torch.testing.assert_close(dm.iBOTPatchLoss(6).sinkhorn_knopp_teacher(z, 0.5,
                                                                          torch.tensor([12])), q)


def test_sinkhorn_knopp_stays_finite_at_the_presets_temperature():
    """At teacher temperature 0.01 (demo, small) a cosine logit above 0.89 makes float32's exp
    overflow (the official float32 formula gives NaN targets); ours stays finite and normalised,
    and equals the same rounds done in float64 by hand."""
    torch.manual_seed(0)
    z = F.normalize(torch.randn(16, 4), dim=1) @ F.normalize(torch.randn(8, 4), dim=1).T  # cos
    z[0, 0] = 0.999
    assert not torch.isfinite(torch.exp(z / 0.01).sum())  # float32 overflows
    q = dm.DINOLoss(8).sinkhorn_knopp_teacher(z, 0.01)
    assert q.dtype == torch.float32 and torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(1), torch.ones(16))
    Q = torch.exp(z.double() / 0.01).T
    Q = Q / Q.sum()
    for _ in range(3):
        Q = Q / Q.sum(1, keepdim=True) / 8
        Q = Q / Q.sum(0, keepdim=True) / 16
    torch.testing.assert_close(q, (Q * 16).T.float())


def test_ibot_forward_masked_hand_computed():
    """-(1/2B) sum_i w_i CE_i with w_i = 1 / (masked tokens of its crop); 2B counts every crop."""
    masks = torch.tensor([[1, 1, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=torch.bool)
    s, t = torch.randn(3, 4), F.softmax(torch.randn(3, 4), -1)
    ce = -(t * F.log_softmax(s / 0.1, -1)).sum(-1)
    expected = (ce[0] / 2 + ce[1] / 2 + ce[2] / 1) / 4
    torch.testing.assert_close(dm.iBOTPatchLoss(4).forward_masked(s, t, masks), expected)


def test_koleo_known_configuration():
    """Four unit vectors 90 degrees apart: nearest-neighbour distance sqrt(2), loss -log sqrt(2);
    near collapse the eps sits inside the difference vector: d = ||x_i - x_j + 1e-8||."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]) * 3.0
    assert dm.KoLeoLoss()(x).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)
    assert dm.KoLeoLoss()(torch.randn(1, 8)).item() == 0.0  # one sample: no neighbour
    y = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert dm.KoLeoLoss()(y).item() == pytest.approx(-math.log(math.sqrt(2) * 1e-8 + 1e-8),
                                                     rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flip", [None, 0.0, 1.0])
def test_augmentation_crops(flip):
    """2 global crops (also the teacher's, the same tensors) and L local crops of the set sizes;
    a horizontal gradient is flipped in about half of the crops, as official, unless
    crops.flip_probability (ours) says otherwise."""
    kwargs = {"flip_probability": flip} if flip is not None else {}
    aug = dm.DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 3, 32, 16, **kwargs)
    img = Image.new("L", (50, 40))
    img.putdata([5 * (i % 50) for i in range(50 * 40)])
    img = img.convert("RGB")
    torch.manual_seed(0)
    flipped, n = 0, 200
    for _ in range(n):
        out = aug(img)
        assert [c.shape for c in out["global_crops"]] == [(3, 32, 32)] * 2
        assert [c.shape for c in out["local_crops"]] == [(3, 16, 16)] * 3
        assert all(a is b for a, b in zip(out["global_crops_teacher"], out["global_crops"]))
        g = out["global_crops"][0].mean(0)  # (32, 32); no solarize on global crop 1
        flipped += bool(g[:, 0].mean() > g[:, -1].mean())
    assert flipped / n == pytest.approx(0.5 if flip is None else flip, abs=0.1)


@pytest.mark.parametrize("blur", [None, (0.3, 0.0, 1.0)])
def test_colour_draws_follow_the_official_distribution(blur):
    """Per crop kind, the official frequencies: jitter 0.8, grayscale 0.2, blur 0.0 / 0.9 / 0.5
    (the inverted quirk) unless crops.blur_probabilities (ours) says otherwise, solarize 0.2 on
    global crop 2 only; jitter factors and blur sigma uniform on their ranges; the order of the
    four jitter operations a uniform random permutation (each of the 24 about equally often)."""
    kwargs = {"blur_probabilities": blur} if blur else {}
    aug = dm.DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2, 16, 8, **kwargs)
    blur = blur or (0.0, 0.9, 0.5)
    torch.manual_seed(0)
    n = 3000
    p = torch.stack([aug.colour_parameters() for _ in range(n)])  # (n, 4 crops, 12)
    assert p.shape == (n, 4, len(dm.COLOUR_COLUMNS))
    freq = (p > 0).float().mean(0)  # (4 crops, 12)
    for crop, p_blur, p_sol in [(0, blur[0], 0.0), (1, blur[1], 0.2), (2, blur[2], 0.0),
                                (3, blur[2], 0.0)]:
        assert freq[crop, 0] == pytest.approx(0.8, abs=0.03)  # jitter
        assert freq[crop, 9] == pytest.approx(0.2, abs=0.03)  # grayscale
        assert freq[crop, 10] == pytest.approx(p_blur, abs=0.03)
        assert freq[crop, 11] == pytest.approx(p_sol, abs=0.03)
    for column, (low, high) in zip((1, 2, 3, 4, 10), [(0.6, 1.4), (0.6, 1.4), (0.8, 1.2),
                                                      (-0.1, 0.1), (0.1, 2.0)]):
        v = p[..., column].flatten()
        v = v[v != 0] if column == 10 else v  # sigma only where the blur applies
        assert low <= v.min() < low + 0.01 and high - 0.01 < v.max() <= high
        quartiles = torch.quantile(v, torch.tensor([0.25, 0.5, 0.75]))
        expected = low + (high - low) * torch.tensor([0.25, 0.5, 0.75])
        torch.testing.assert_close(quartiles, expected, atol=0.03 * (high - low), rtol=0)
    orders = p[..., 5:9].reshape(-1, 4).long()
    assert (orders.sort(1).values == torch.arange(4)).all()  # each row is a permutation
    counts = torch.unique(orders, dim=0, return_counts=True)[1]
    expected = len(orders) / 24
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert len(counts) == 24 and chi2 < 50  # 23 degrees of freedom: P(chi2 > 50) < 0.001


def pil_reference_images(n=4, size=40):
    """Smooth random colour fields with noise, as uint8 (n, 3, size, size) and PIL images."""
    g = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.rand(n, 3, 6, 6, generator=g), size=size, mode="bicubic")
    noise = torch.randn(n, 3, size, size, generator=g) * 10
    images = (smooth.clamp(0, 1) * 255 + noise).clamp(0, 255).round().to(torch.uint8)
    return images, [TF.to_pil_image(i) for i in images]


def differences(ours, pil_images):
    """|ours - PIL| in 1/255 steps, ours (n, 3, h, w) in [0, 1]."""
    return (ours * 255 - torch.stack([TF.pil_to_tensor(im) for im in pil_images]).float()).abs()


def colour_only(images, **values):
    """DataAugmentationDINO.colour on uint8 images with one operation switched on (COLOUR_COLUMNS
    names; jitter factors neutral unless given), un-normalised to [0, 1]."""
    p = torch.zeros(len(images), len(dm.COLOUR_COLUMNS))
    p[:, 1:4], p[:, 5:9] = 1.0, torch.arange(4.0)  # brightness, contrast, saturation x 1; hue 0
    for name, value in values.items():
        p[:, dm.COLOUR_COLUMNS.index(name.replace("_", " "))] = value
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (dm.IMAGENET_MEAN, dm.IMAGENET_STD))
    return dm.DataAugmentationDINO((0.3, 1), (0.1, 0.3), 0).colour(images, p) * std + mean


def test_colour_ops_match_torchvision_on_pil_images():
    """Each colour operation of the batched stage against the torchvision op that official
    applies to PIL images, with the same parameter: brightness, contrast, saturation, grayscale,
    blur and solarize within 2/255 on at least 99% of the pixels; the hue shift equals
    torchvision's exact float formula and, against PIL's 8-bit HSV path, stays within twice what
    PIL's own HSV round trip loses."""
    images, pil = pil_reference_images()
    checks = [(colour_only(images, solarize=1), [TF.solarize(im, 128) for im in pil]),
              (colour_only(images, grayscale=1), [TF.rgb_to_grayscale(im, 3) for im in pil])]
    for f in (0.6, 0.85, 1.2, 1.4):
        checks += [(colour_only(images, jitter=1, brightness=f),
                    [TF.adjust_brightness(im, f) for im in pil]),
                   (colour_only(images, jitter=1, contrast=f),
                    [TF.adjust_contrast(im, f) for im in pil]),
                   (colour_only(images, jitter=1, saturation=f),
                    [TF.adjust_saturation(im, f) for im in pil])]
    for sigma in (0.1, 0.7, 2.0):
        checks.append((colour_only(images, blur_sigma=sigma),
                       [TF.gaussian_blur(im, 9, sigma) for im in pil]))
    for ours, reference in checks:
        assert (differences(ours, reference) <= 2).float().mean() >= 0.99
    assert differences(*checks[0]).max() < 1e-3  # solarize: the same threshold exactly
    x = images.float() / 255
    round_trip = differences(x, [im.convert("HSV").convert("RGB") for im in pil])
    for hue in (-0.1, -0.04, 0.05, 0.1):
        ours = colour_only(images, jitter=1, hue=hue)
        exact = TF.adjust_hue(x, math.trunc(hue * 255) / 255)  # the float tensor formula
        torch.testing.assert_close(ours, exact, atol=1e-5, rtol=0)
        off = differences(ours, [TF.adjust_hue(im, hue) for im in pil])
        assert off.quantile(0.99) <= 2 * round_trip.quantile(0.99)


@GPU
def test_colour_stage_on_the_gpu_equals_the_cpu():
    """The training loop colours the batch on the GPU, a CPU-only run in the loader: same crops."""
    images, _ = pil_reference_images(n=64, size=32)
    aug = dm.DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2, 32, 16)
    torch.manual_seed(0)
    params = torch.cat([aug.colour_parameters() for _ in range(16)])
    torch.testing.assert_close(aug.colour(images.cuda(), params).cpu(), aug.colour(images, params),
                               atol=1e-4, rtol=0)


def test_colour_chain_matches_the_official_pil_chain():
    """The whole colour stage with drawn parameters against torchvision's PIL ops in the same
    order (jitter ops in the crop's order, grayscale, blur, solarize): the differences stay at
    what 8-bit rounding after every PIL op gives (README: colour fidelity)."""
    images, pil = pil_reference_images(n=64, size=32)
    aug = dm.DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2, 32, 16)
    torch.manual_seed(0)
    params = torch.cat([aug.colour_parameters() for _ in range(16)])  # (64, 12), every crop kind
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    expected = []
    for im, p in zip(pil, params.tolist()):
        if p[0]:
            for op in p[5:9]:
                im = ops[int(op)](im, p[1 + int(op)])
        im = TF.rgb_to_grayscale(im, 3) if p[9] else im
        im = TF.gaussian_blur(im, 9, p[10]) if p[10] else im
        expected.append(TF.solarize(im, 128) if p[11] else im)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (dm.IMAGENET_MEAN, dm.IMAGENET_STD))
    off = differences(aug.colour(images, params) * std + mean, expected)
    # measured: mean 1.1/255, 99% within 4/255, max 12/255; PIL rounds to 8 bits after each op
    assert off.mean() < 1.5 and off.quantile(0.99) <= 5 and off.max() <= 16


def test_masking_generator_respects_target():
    """Never more than the target; close to it on average; a zero target gives an empty mask."""
    random.seed(0)
    gen = dm.MaskingGenerator((14, 14), max_num_patches=98)
    counts = {t: [] for t in (0, 5, 20, 50, 98)}
    for _ in range(40):
        for target in counts:
            m = gen(target)
            assert m.shape == (14, 14) and m.dtype == torch.bool and m.sum() <= target
            counts[target].append(int(m.sum()))
    assert counts[0] == [0] * 40 and sum(counts[98]) / 40 > 90


def test_collate_invariants():
    """Crop-major order; mask indices = flattened nonzeros; weights = 1 / count per crop;
    int(2B p) masked crops."""
    random.seed(1)
    crops = [{"global_crops": [torch.full((3, 32, 32), 10.0 * i + v) for v in (1, 2)],
              "local_crops": [torch.full((3, 16, 16), 10.0 * i + v) for v in (3, 4)]}
             for i in range(3)]
    gen = dm.MaskingGenerator((8, 8), max_num_patches=32)
    b = dm.collate_data_and_cast([(c, ()) for c in crops], (0.1, 0.5), 0.5, torch.float32, 64, gen)
    assert b["collated_global_crops"][:, 0, 0, 0].tolist() == [1, 11, 21, 2, 12, 22]
    assert b["collated_local_crops"][:, 0, 0, 0].tolist() == [3, 13, 23, 4, 14, 24]
    masks = b["collated_masks"]
    assert masks.shape == (6, 64) and (masks.sum(1) > 0).sum() == int(6 * 0.5)
    assert torch.equal(b["mask_indices_list"], masks.flatten().nonzero().flatten())
    per_crop = masks.sum(1, keepdim=True).expand_as(masks)[masks].float()
    torch.testing.assert_close(b["masks_weight"], 1 / per_crop)
    assert b["n_masked_patches"].tolist() == [masks.sum().item()] and b["upperbound"] >= masks.sum()


def write_odd_images(root):
    os.makedirs(root / "a", exist_ok=True)
    os.makedirs(root / "b" / "deep", exist_ok=True)
    Image.new("L", (40, 30), 100).save(root / "a" / "gray.png")
    Image.new("P", (40, 30), 3).save(root / "a" / "palette.gif")
    Image.new("RGBA", (40, 30), (1, 2, 3, 100)).save(root / "a" / "alpha.png")
    Image.new("CMYK", (40, 30), (10, 20, 30, 40)).save(root / "b" / "cmyk.jpg")
    sixteen = Image.new("I;16", (40, 30), 0)
    sixteen.paste(65535, (20, 0, 40, 30))  # left half black, right half full scale
    sixteen.save(root / "b" / "sixteen.png")
    Image.new("RGB", (10, 10), (5, 5, 5)).save(root / "b" / "deep" / "TINY.JPEG")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(buf, "JPEG")
    (root / "b" / "truncated.jpg").write_bytes(buf.getvalue()[:200])
    (root / "b" / "not_an_image.jpg").write_text("hello")
    (root / "b" / "notes.txt").write_text("ignored")


def test_folder_dataset_odd_images(tmp_path):
    """Odd modes become RGB, small images work, bad files are skipped and counted, .txt ignored;
    the first-level folder is the class."""
    write_odd_images(tmp_path)
    images = dm.scan_images(str(tmp_path))
    ds = dm.ImageFolderDataset(images, dm.DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 1, 16, 8))
    assert len(ds) == 8 and images.classes == ["a", "b"]
    assert images.relpath(7) == "b/deep/TINY.JPEG" and list(images.labels) == [0] * 3 + [1] * 5
    skipped = 0
    for i in range(len(ds)):
        crops, label, s = ds[i]
        skipped += s
        assert crops["global_crops"][0].shape == (3, 16, 16)
    assert skipped == 2
    sixteen = dm.load_rgb(tmp_path / "b" / "sixteen.png")
    assert sixteen.getpixel((0, 0)) == (0, 0, 0) and sixteen.getpixel((39, 0)) == (255,) * 3
    assert dm.load_rgb(tmp_path / "b" / "cmyk.jpg").mode == "RGB"


def test_shapes_dataset_deterministic_balanced_and_masked():
    """Image i is the same on every call, classes are balanced, the mask marks the bright shapes
    on a background that is the same in every image, and each image holds many shapes that do not
    overlap (separate blobs in the mask)."""
    ds = dm.ShapesDataset(100, transform=lambda im: im)
    (a, label, mask), (b, _, _) = ds.draw(7), ds.draw(7)
    assert a.tobytes() == b.tobytes() and label == 7
    assert [ds.draw(i)[1] for i in range(100)].count(3) == 10
    assert a.tobytes() != dm.ShapesDataset(100, lambda im: im, seed=1).draw(7)[0].tobytes()
    gray = torch.frombuffer(bytearray(a.convert("L").tobytes()), dtype=torch.uint8).float()
    inside = torch.frombuffer(bytearray(mask.tobytes()), dtype=torch.uint8) > 128
    assert gray[inside].mean() > gray[~inside].mean() + 60 and 0.05 < inside.float().mean() < 0.6
    other = ds.draw(8)[0].convert("L").tobytes()
    assert len(set(gray[~inside].tolist())) == 1 and other[0] == int(gray[~inside][0])
    counts = []  # shapes per image, as connected parts of the mask, for one-piece shapes
    for i in [i for i in range(100) if dm.SHAPES[ds.labels[i]] in ("disk", "triangle", "star")]:
        m = torch.frombuffer(bytearray(ds.draw(i)[2].tobytes()), dtype=torch.uint8).view(48, 48)
        m = m > 128
        parts = torch.arange(1, m.numel() + 1).view(m.shape) * m
        for _ in range(48):  # flood fill: every part ends labelled with its largest index
            grown = F.max_pool2d(parts[None, None].float(), 3, 1, 1)[0, 0].long()
            parts = torch.where(m, grown, parts)
        counts.append(len(parts[m].unique()))
    assert max(counts) <= 12 and sum(counts) / len(counts) >= 8


def official_sharded_stream(size, seed, rank, world_size, n):
    """dinov2/data/samplers.py ShardedInfiniteSampler(shuffle=True) as train.py selects it (with
    _shuffle_tensor_slice), written out here from the official code's algorithm."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(size, dtype=torch.int32, generator=g)
    stream, n_pass = [], 0
    while len(stream) < n:
        g.manual_seed(seed + rank + (n_pass << 24))
        count = size // world_size
        result = [0] * count
        for i in range(count):
            j = torch.randint(0, i + 1, size=(1,), generator=g).item() if i > 0 else 0
            result[i] = result[j]
            result[j] = perm[rank + i * world_size].item()
        stream, n_pass = stream + result, n_pass + 1
    return stream[:n]


def test_sampler_is_the_official_sharded_infinite_one():
    """The same indices as official for the same seed, rank and world size (3 passes of each
    rank's 5-index shard); shards are disjoint; start=k continues the same stream; every
    position gets its own crop seed."""
    streams = []
    for rank in (0, 1):
        it = iter(dm.InfiniteSampler(11, seed=3, rank=rank, world_size=2))
        streams.append([next(it) for _ in range(15)])
        assert [i for i, _ in streams[-1]] == official_sharded_stream(11, 3, rank, 2, 15)
    idx = [[i for i, _ in s] for s in streams]
    assert set(idx[0][:5]) == set(idx[0][5:10]) == set(idx[0][10:]) and len(set(idx[0])) == 5
    assert not set(idx[0]) & set(idx[1]) and idx[0][:5] != idx[0][5:10]
    resumed = iter(dm.InfiniteSampler(11, seed=3, rank=0, world_size=2, start=7))
    assert [next(resumed) for _ in range(8)] == streams[0][7:]
    seeds = [s for stream in streams for _, s in stream]
    assert len(set(seeds)) == len(seeds)


def test_seeded_rng_touches_only_the_generator_it_restores(monkeypatch):
    """Per-sample seeding must not reseed the CUDA generators: with num_workers=0 on a GPU that
    would make the model's drop-path draws depend on the samples' seeds."""
    def reseeded(*args):
        raise AssertionError("seeded_rng reseeded a CUDA generator")

    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded)
    monkeypatch.setattr(torch.cuda, "manual_seed", reseeded)
    before = torch.get_rng_state()
    with dm.seeded_rng(5):
        a = torch.rand(3), random.random()
    with dm.seeded_rng(5):
        b = torch.rand(3), random.random()
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert torch.equal(before, torch.get_rng_state())


def test_batches_do_not_depend_on_workers_or_restarts():
    """The loader's batches are a function of (seed, rank, iteration): 0 or 2 workers give the
    same crops and masks, and a loader started at iteration 2 gives the third batch."""
    cfg = tiny_config()
    aug = dm.DataAugmentationDINO(cfg.crops.global_crops_scale, cfg.crops.local_crops_scale, 2,
                                  32, 16)
    dataset = dm.ShapesDataset(40, aug.geometry)

    def batches(workers, start, n, colour_in_loader=None):
        cfg.train.num_workers = workers
        it = iter(dm.make_pretrain_loader(cfg, dataset, start, 1, 2, colour_in_loader))
        return [aug.colour_batch(next(it), "cpu") for _ in range(n)]

    ref = batches(0, 0, 3)
    assert ref[0]["collated_global_crops"].dtype == torch.float32  # coloured by colour_batch
    for got in (batches(2, 0, 3, aug), batches(0, 2, 1)):
        for a, b in zip(ref[-len(got):], got):
            for key in ("collated_global_crops", "collated_local_crops", "collated_masks"):
                assert torch.equal(a[key], b[key]), key
    assert not torch.equal(ref[0]["collated_global_crops"], ref[1]["collated_global_crops"])


# ---------------------------------------------------------------------------------------------
# Optimisation
# ---------------------------------------------------------------------------------------------


def test_cosine_scheduler_hand_values():
    s = dm.CosineScheduler(1.0, 0.0, total_iters=10, warmup_iters=3, start_warmup_value=0.1,
                           freeze_iters=2)
    assert s[0] == s[1] == 0.0 and s[2] == pytest.approx(0.1) and s[3] == pytest.approx(0.55)
    assert s[4] == 1.0 and s[5] == 1.0 and s[6] == pytest.approx(0.5 * (1 + math.cos(math.pi / 5)))
    assert s[9] == pytest.approx(0.5 * (1 + math.cos(4 * math.pi / 5)))
    assert s[10] == 0.0 and s[99] == 0.0


def test_official_schedules():
    """Teacher temperature 0.04 -> 0.07 over 30 epochs; lr 0 at first, peak at the end of the
    warm-up; last layer frozen for one epoch (here an epoch is 10 iterations)."""
    cfg = dm.load_config("default", ["train.OFFICIAL_EPOCH_LENGTH=10"])
    dm.apply_scaling_rules(cfg, world_size=16)  # global batch 1024: lr = base_lr
    s = dm.build_schedulers(cfg)
    assert s["teacher_temp"][0] == pytest.approx(0.04) and s["teacher_temp"][299] == pytest.approx(
        0.07) and s["teacher_temp"][5000] == 0.07
    assert s["lr"][0] == 0 and s["lr"][99] == pytest.approx(0.004) and s["lr"][1000] == 1e-6
    assert s["last_layer_lr"][9] == 0 and s["last_layer_lr"][10] == s["lr"][10] > 0
    assert s["wd"][0] == pytest.approx(0.04) and s["mom"][0] == pytest.approx(0.992)
    assert s["wd"][999] == pytest.approx(0.4, abs=1e-5) and s["mom"][999] == pytest.approx(1.0)


def test_param_group_multipliers():
    """ViT-S, layer decay 0.9, patch-embed multiplier 0.2 (official param_groups.py)."""
    groups = {d["name"]: d for d in dm.get_params_groups_with_decay(
        dm.vit_small(init_values=1e-5), 0.9, 0.2)}
    lr = {n: d["lr_multiplier"] for n, d in groups.items()}
    assert lr["pos_embed"] == pytest.approx(0.9 ** 13) and lr["norm.weight"] == 1.0
    assert lr["blocks.0.attn.qkv.weight"] == pytest.approx(0.9 ** 12)
    assert lr["blocks.11.mlp.fc2.weight"] == pytest.approx(0.9)
    assert lr["patch_embed.proj.bias"] == pytest.approx(0.9 ** 13 * 0.2)
    wd = {n: d["wd_multiplier"] for n, d in groups.items()}
    assert wd["cls_token"] == wd["pos_embed"] == wd["mask_token"] == 1.0
    assert wd["blocks.3.attn.qkv.weight"] == wd["patch_embed.proj.weight"] == 1.0
    assert wd["blocks.3.attn.qkv.bias"] == wd["blocks.3.norm1.weight"] == 0.0
    assert wd["blocks.3.ls1.gamma"] == 0.0
    head = {d["name"]: d for d in dm.get_params_groups_with_decay(
        dm.DINOHead(8, 4, hidden_dim=8, bottleneck_dim=4), 0.9)}
    assert head["last_layer.weight_g"]["is_last_layer"]
    assert head["last_layer.weight_g"]["wd_multiplier"] == 1.0
    assert head["mlp.0.weight"]["lr_multiplier"] == 1.0
    assert not head["mlp.0.weight"]["is_last_layer"]
    fused = dm.fuse_params_groups(list(groups.values()))
    assert len(fused) == len({(d["lr_multiplier"], d["wd_multiplier"]) for d in groups.values()})


def test_last_layer_frozen_during_first_epoch():
    """train_step with the official schedules: the prototypes do not move in the first epoch
    (last_layer_lr 0), everything else does; after it they move too."""
    cfg = tiny_config("optim.freeze_last_layer_epochs=1", "optim.warmup_epochs=0")
    dm.apply_scaling_rules(cfg, 1)
    torch.manual_seed(0)
    model, optimizer = dm.build_model_and_optimizer(cfg, torch.device("cpu"), torch.float32)
    schedules = dm.build_schedulers(cfg)
    for it in (0, 3):  # an epoch is 3 iterations in TINY
        before = {n: p.clone() for n, p in model.student.named_parameters()}
        dm.train_step(model, optimizer, make_batch(cfg, seed=it),
                      **{k: schedules[k][it] for k in schedules})
        for n, p in model.student.named_parameters():
            moved = not torch.equal(p, before[n])
            assert moved == (it == 3 or "last_layer" not in n), (it, n)


# ---------------------------------------------------------------------------------------------
# The train step
# ---------------------------------------------------------------------------------------------


def test_ema_momentum_zero_and_one():
    model = dm.SSLMetaArch(tiny_config())
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.teacher.parameters()]
    model.update_teacher(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.teacher.parameters()))
    model.update_teacher(0.0)
    assert all(torch.equal(a, b) for a, b in zip(model.student.parameters(),
                                                 model.teacher.parameters()))


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_train_step_losses_against_recomputation(centering):
    """The global DINO term and KoLeo recomputed from the modules (first step: centre 0, views
    swapped; or 3 Sinkhorn-Knopp rounds); the teacher gets no gradient, the student all."""
    cfg = tiny_config(f"train.centering={centering}",
                      "ibot.separate_head=" + str(centering == "centering"))
    torch.manual_seed(0)
    model = dm.SSLMetaArch(cfg).train()
    assert not model.teacher.training and model.student.training
    batch = make_batch(cfg)
    losses = model.forward_backward(batch, teacher_temp=0.04)
    assert set(losses) == {"dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss",
                           "ibot_loss"}
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(p.grad is not None for p in model.student.parameters())
    g, masks = batch["collated_global_crops"], batch["collated_masks"]
    with torch.no_grad():
        z = model.teacher.dino_head(model.teacher.backbone(g))
        B = len(g) // 2
        z = torch.cat([z[B:], z[:B]])  # teacher view 2 first: student view 1 learns from it
        if centering == "centering":
            p = F.softmax(z / 0.04, dim=-1)
        else:
            Q = torch.exp(z / 0.04).T
            Q = Q / Q.sum()
            for _ in range(3):
                Q = Q / Q.sum(1, keepdim=True) / Q.shape[0]
                Q = Q / Q.sum(0, keepdim=True) / Q.shape[1]
            p = (Q * Q.shape[1]).T
        cls = model.student.backbone(g, masks=masks, is_training=True)["x_norm_clstoken"]
        ce = -(p * F.log_softmax(model.student.dino_head(cls) / 0.1, -1)).sum(-1).mean()
        koleo = 0.1 * sum(dm.KoLeoLoss()(c) for c in cls.chunk(2)) / 2
    n_terms = 2 * cfg.crops.local_crops_number + 2  # (local, teacher view) pairs + 2 global
    torch.testing.assert_close(losses["dino_global_crops_loss"].detach(), ce * 2 / n_terms)
    torch.testing.assert_close(losses["koleo_loss"].detach(), koleo)


def test_fp16_scaler_path_on_cpu_skips_bad_steps_but_keeps_the_ema():
    """fp16 autocast + GradScaler on CPU, as on GPU: a good step moves the student; a step with
    an inf gradient is skipped (student unchanged, scale halved); the teacher EMA still runs."""
    cfg = tiny_config("compute_precision.dtype=fp16")
    model, optimizer = dm.build_model_and_optimizer(cfg, torch.device("cpu"), torch.float16)
    assert model.fp16_scaler.is_enabled() and model.fp16_scaler.get_scale() == 2.0 ** 16
    kw = dict(lr=1e-3, wd=0.04, mom=0.9, teacher_temp=0.04, last_layer_lr=1e-3)
    for seed in range(8):  # 2^16 may overflow at first: such steps are skipped, the scale halves
        before, scale = copy.deepcopy(model.student.state_dict()), model.fp16_scaler.get_scale()
        losses = dm.train_step(model, optimizer, make_batch(cfg, seed=seed), **kw)
        assert all(torch.isfinite(v) for v in losses.values())
        if not same_weights(before, model.student.state_dict()):
            break
        assert model.fp16_scaler.get_scale() == scale / 2
    assert not same_weights(before, model.student.state_dict())
    student1 = copy.deepcopy(model.student.state_dict())
    teacher1 = copy.deepcopy(model.teacher.state_dict())
    real = model.forward_backward

    def poisoned(images, teacher_temp):
        out = real(images, teacher_temp)
        next(model.student.parameters()).grad.view(-1)[0] = float("inf")
        return out

    model.forward_backward = poisoned
    scale = model.fp16_scaler.get_scale()
    dm.train_step(model, optimizer, make_batch(cfg, seed=9), **kw)
    assert same_weights(student1, model.student.state_dict())  # the step was skipped
    assert model.fp16_scaler.get_scale() == scale / 2
    expected = {k: 0.9 * teacher1[k] + 0.1 * student1[k] for k in teacher1}  # the EMA still ran
    for k, v in model.teacher.state_dict().items():
        torch.testing.assert_close(v, expected[k])


@pytest.mark.parametrize("device,dtype", [("cpu", "bf16"), pytest.param("cuda", "bf16", marks=GPU),
                                          pytest.param("cuda", "fp16", marks=GPU)])
def test_mixed_precision_steps_are_finite(device, dtype, capsys):
    """Two train steps under autocast, then the benchmark on the same settings."""
    cfg = tiny_config(f"compute_precision.dtype={dtype}")
    dev = torch.device(device)
    model, optimizer = dm.build_model_and_optimizer(cfg, dev, dm.DTYPES[dtype])
    for seed in range(2):
        losses = dm.train_step(model, optimizer, make_batch(cfg, seed=seed), lr=1e-3, wd=0.04,
                               mom=0.99, teacher_temp=0.04, last_layer_lr=0.0)
        assert all(torch.isfinite(v) for v in losses.values()), losses
    dm.benchmark(cfg, dev, warmup=1, iters=1)
    out = capsys.readouterr().out
    assert ("GiB (CUDA)" if device == "cuda" else "GiB (RSS)") in out
    assert ("bfloat16" if dtype == "bf16" else "float16") in out


# ---------------------------------------------------------------------------------------------
# Whole runs
# ---------------------------------------------------------------------------------------------


def test_finished_run_writes_every_output(finished_run):
    """Checkpoints, a metrics line per iteration, one eval line per evaluation (raw-pixel
    baseline at 0, attention on the objects), official teacher dumps, the lr in config.json."""
    out = finished_run
    files = set(os.listdir(out))
    assert {"model_0000006.pth", "model_0000003.pth", "training_metrics.json", "eval.jsonl",
            "teacher_backbone.pth", "config.json", "eval"} <= files
    evals = [json.loads(line) for line in open(out / "eval.jsonl")]
    assert [e["iteration"] for e in evals] == [0, 3, 6]
    assert set(evals[0]["knn_top1"]) == {"10", "20", "40"}  # k capped by the 40 neighbours
    assert "pixels_knn_top1" in evals[0] and "pixels_knn_top1" not in evals[1]
    assert all(0 < e["attention_on_object"] < 1 and 0 < e["object_area"] < 1 for e in evals)
    metrics = [json.loads(line) for line in open(out / "training_metrics.json")]
    assert [m["iteration"] for m in metrics] == [0, 1, 2, 3, 4, 5]  # as official: from 0
    assert {"teacher_entropy", "cls_std", "lr", "teacher_temp", "ibot_loss", "total_loss",
            "current_batch_size", "last_layer_lr"} <= set(metrics[0])
    assert all(0 <= m["data_time"] <= m["iter_time"] for m in metrics)
    cfg = json.load(open(out / "config.json"))
    assert cfg["optim"]["lr"] == pytest.approx(cfg["optim"]["base_lr"] * math.sqrt(8 / 1024))
    teacher = dm.build_backbone(tiny_config(), drop_path=False)
    teacher.load_state_dict(torch.load(out / "teacher_backbone.pth"), strict=True)
    for i in (2, 5):  # eval/training_<index of the last iteration run>, as official
        dump = torch.load(out / "eval" / f"training_{i}" / "teacher_checkpoint.pth")["teacher"]
        assert {k.split(".")[0] for k in dump} == {"backbone", "dino_head"}
    torch.testing.assert_close(dump["backbone.pos_embed"], teacher.pos_embed.detach())


def test_runs_are_deterministic_for_any_worker_count_and_resume_exactly(finished_run, tmp_path):
    """The same command with 2 DataLoader workers ends bitwise equal to the 0-worker run, and so
    does a run resumed (with 1 worker) from its iteration-3 checkpoint."""
    out = tmp_path / "b"
    assert run_cli(out, "train.num_workers=2") == 0
    final = checkpoint(finished_run, 6)["model"]
    assert same_weights(final, checkpoint(out, 6)["model"])
    os.remove(out / "model_0000006.pth")  # as if killed after the iteration-3 save
    assert run_cli(out, "train.num_workers=1") == 0
    assert same_weights(final, checkpoint(out, 6)["model"])


def _dist_worker(rank, world_size, port, tmp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    _, _, device = dm.setup_distributed()
    try:
        # the global quantities: centres and Sinkhorn-Knopp over the rank halves of one batch
        torch.manual_seed(0)
        part = torch.randn(8, 6)[rank * 4:(rank + 1) * 4]
        dl = dm.DINOLoss(6)
        dl.update_center(part)
        dl.apply_center_update()
        sk = dm.DINOLoss(6).sinkhorn_knopp_teacher(part, 0.5)
        ib = dm.iBOTPatchLoss(6).sinkhorn_knopp_teacher(part, 0.5, torch.tensor([4]))
        torch.save({"center": dl.center, "sk": sk, "ibot_sk": ib}, f"{tmp}/unit_{rank}.pt")
        # a run with drop path (each rank's own random stream) and 2 workers, uninterrupted ...
        over = TINY + ["dino.koleo_loss_weight=0", "student.drop_path_rate=0.2",
                       "train.num_workers=2"]
        model, _ = dm.train(dm.load_config("demo", over), device, f"{tmp}/a")
        torch.save(model.state_dict(), f"{tmp}/weights_{rank}.pt")
        assert model.student_forward.gradient_as_bucket_view  # one gradient-sized copy less
        # ... and again, resumed from its iteration-3 checkpoint
        if rank == 0:
            shutil.copytree(f"{tmp}/a", f"{tmp}/b", ignore=shutil.ignore_patterns("model_0000006*"))
        torch.distributed.barrier()
        model, _ = dm.train(dm.load_config("demo", over), device, f"{tmp}/b")
        torch.save(model.state_dict(), f"{tmp}/resumed_{rank}.pt")
    finally:
        dm.cleanup_distributed()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_reduce_globally_and_resume_exactly(tmp_path):
    """2 ranks x batch b equal 1 rank x batch 2b on the global quantities; the ranks keep equal
    weights and their own random streams; interrupted and resumed, with 2 workers per rank, both
    end bitwise equal to the uninterrupted run."""
    torch.multiprocessing.spawn(_dist_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"unit_{r}.pt") for r in (0, 1))
    torch.manual_seed(0)
    z = torch.randn(8, 6)
    torch.testing.assert_close(r0["center"], 0.1 * z.mean(0, keepdim=True))
    torch.testing.assert_close(r0["center"], r1["center"])
    full = dm.DINOLoss(6).sinkhorn_knopp_teacher(z, 0.5)
    torch.testing.assert_close(torch.cat([r0["sk"], r1["sk"]]), full)
    torch.testing.assert_close(torch.cat([r0["ibot_sk"], r1["ibot_sk"]]), full)
    w = [torch.load(tmp_path / f"{name}_{r}.pt") for name in ("weights", "resumed") for r in (0, 1)]
    assert all(same_weights(w[0], other) for other in w[1:])
    states = checkpoint(tmp_path / "a", 3)["rng"]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])


def test_log_line_flags_uniform_targets(tmp_path, capsys):
    """training_metrics.json holds what official MetricLogger dumps: the lower median of the last
    20 values of each term, schedule value and of the per-iteration totals (not the sum of the
    terms' medians); the log line says UNIFORM when the teacher's entropy is within 5% of ln K."""
    model = dm.SSLMetaArch(tiny_config())  # K = 256
    log = dm.RunLog(tiny_config(), model, str(tmp_path), 0, 30)
    a, b = [0.0, 10.0, 1.0] * 7, [10.0, 0.0, 1.0] * 7  # totals 10, 10, 2: median 10; terms 1, 1
    for i, entropy in enumerate([5.5] * 10 + [1.0] * 11):  # the window keeps the last 20
        log.wait_for(iter([None]))
        log.add({"dino_global_crops_loss": a[i], "ibot_loss": b[i], "teacher_entropy": entropy,
                 "cls_std": 1.0}, n_skipped=0, lr=float(i), wd=0.04, mom=0.99,
                last_layer_lr=0.1, current_batch_size=8, teacher_temp=0.04)
        if i in (9, 20):
            log.write(i)
    log.close()
    lines = [json.loads(line) for line in open(tmp_path / "training_metrics.json")]
    assert lines[0]["teacher_entropy"] == 5.5 and lines[0]["lr"] == 4.0  # lower median of 0..9
    assert lines[0]["total_loss"] == 10.0 and lines[0]["dino_global_crops_loss"] == 1.0
    assert lines[1]["teacher_entropy"] == 1.0 and lines[1]["lr"] == 10.0  # of 1..20
    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("it ")]
    assert "H(t) 5.50/5.55 UNIFORM (collapse)" in out[0] and "UNIFORM" not in out[1]
    assert "it 0000009/30 | loss 10.0000" in out[0]


def test_non_finite_loss_stops_at_once_without_saving(tmp_path, monkeypatch, capsys):
    """A NaN between log steps stops the run at that iteration, naming the term; the earlier
    checkpoint stays the newest."""
    calls = {"n": 0}
    real = dm.KoLeoLoss.forward

    def nan_at_iteration_5(self, x, eps=1e-8):
        calls["n"] += 1  # 2 calls per iteration
        return real(self, x, eps) * (float("nan") if calls["n"] > 8 else 1.0)

    monkeypatch.setattr(dm.KoLeoLoss, "forward", nan_at_iteration_5)
    assert run_cli(tmp_path / "run", "train.log_every=100") == 2
    err = capsys.readouterr().err
    assert "non-finite loss at iteration 5" in err and "koleo_loss=nan" in err
    assert sorted(f for f in os.listdir(tmp_path / "run") if f.startswith("model_")) == [
        "model_0000003.pth"]


LONG = ["optim.epochs=6", "train.checkpoint_period=2", "evaluation.eval_period_iterations=0"]


def cli(out, *extra):
    return [sys.executable, os.path.join(HERE, "dino_mini.py"), "--output-dir", str(out)] + TINY \
        + LONG + list(extra)


def wait_for_metrics(out, proc, n_lines, timeout=120):
    t0, path = time.time(), os.path.join(out, "training_metrics.json")
    while time.time() - t0 < timeout and proc.poll() is None:
        if os.path.exists(path) and len(open(path).read().splitlines()) >= n_lines:
            return
        time.sleep(0.05)


def test_sigterm_saves_and_kill9_resumes_exactly(tmp_path):
    """SIGTERM: the step finishes, a checkpoint is written, exit 0. SIGKILL after a random
    iteration (seeded; printed on failure): the resumed run ends with the uninterrupted weights."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    subprocess.run(cli(tmp_path / "ref"), check=True, capture_output=True, env=env)
    final = checkpoint(tmp_path / "ref", 18)["model"]

    term = tmp_path / "term"
    proc = subprocess.Popen(cli(term), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    wait_for_metrics(term, proc, 5)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"stopped by SIGTERM" in stdout
    it = dm.load_latest_checkpoint(str(term))[1]["iteration"]
    logged = [json.loads(line)["iteration"] for line in open(term / "training_metrics.json")]
    assert 5 <= it < 18 and it - 1 == logged[-1]

    killed = tmp_path / "killed"
    kill_after = random.Random(7).randint(3, 12)
    proc = subprocess.Popen(cli(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    wait_for_metrics(killed, proc, kill_after)
    proc.kill()
    proc.wait()
    for out in (term, killed):
        subprocess.run(cli(out), check=True, capture_output=True, env=env)
        assert same_weights(final, checkpoint(out, 18)["model"]), (out, kill_after)


def make_imagenet_like(root, flat_val=False):
    """train/<class>/*, val/<class>/* (or a flat val/), test/*: 2 classes of coloured squares."""
    colours = {"n01": (230, 40, 40), "n02": (40, 40, 230)}
    for split, n in (("train", 12), ("val", 4)):
        for c, colour in colours.items():
            folder = root / split if split == "val" and flat_val else root / split / c
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (40, 40), tuple(max(0, v - 9 * i) for v in colour)).save(
                    folder / f"{c}_{i}.JPEG")
    os.makedirs(root / "test")
    Image.new("RGB", (40, 40), (9, 9, 9)).save(root / "test" / "x.JPEG")


def test_imagenet_layout_pretrains_on_train_and_monitors_with_val(tmp_path, capsys):
    """--data DIR with train/ val/ test/: pre-training reads train/ only (24 images, not 33),
    the kNN monitor asks val's 8 images against train's classes, not the split names; a flat
    val/ falls back to a held-out part of train/ and says why. The list is reused on resume."""
    make_imagenet_like(tmp_path / "in")
    assert run_cli(tmp_path / "run", "--config", "demo", "--data", str(tmp_path / "in")) == 0
    out = capsys.readouterr().out
    assert "data: 24 images in" in out and "kNN monitor: 8 neighbours, 8 queries" in out
    evals = [json.loads(line) for line in open(tmp_path / "run" / "eval.jsonl")]
    assert all(v in (0.0, 12.5, 25.0, 37.5, 50.0, 62.5, 75.0, 87.5, 100.0)
               for e in evals for v in e["knn_top1"].values())
    listed = open(tmp_path / "run" / "image_list.txt").read().splitlines()
    assert len(listed) == 25 and listed[1] == "n01/n01_0.JPEG"
    Image.new("RGB", (40, 40)).save(tmp_path / "in" / "train" / "n01" / "new.JPEG")
    os.remove(tmp_path / "run" / "model_0000006.pth")
    assert run_cli(tmp_path / "run", "--config", "demo", "--data", str(tmp_path / "in")) == 0
    assert "data: 24 images in" in capsys.readouterr().out  # the saved list, not a new scan

    make_imagenet_like(tmp_path / "flat", flat_val=True)
    assert run_cli(tmp_path / "run2", "--config", "demo", "--data", str(tmp_path / "flat")) == 0
    out = capsys.readouterr().out
    assert "has no class folders" in out and "kNN monitor: 8 neighbours, 4 queries" in out


def test_own_folder_on_a_cpu_gets_the_small_preset_and_its_cost(tmp_path, capsys, monkeypatch):
    """--data without --config on a machine without a GPU trains the small preset and says so
    first, with the iterations and an estimated time for it and for the official recipe."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    make_imagenet_like(tmp_path / "in")
    argv = ["--data", str(tmp_path / "in"), "--output-dir", str(tmp_path / "run"),
            "optim.epochs=1", "train.OFFICIAL_EPOCH_LENGTH=3", "optim.warmup_epochs=0",
            "train.batch_size_per_gpu=8", "train.num_workers=0", "train.log_every=1"]
    assert dm.main(argv) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("no GPU: training with the small preset, 3 iterations of "
                            "vit_pico/8, under a minute here")
    assert "(--config default) would take 3 iterations of vit_large/16, about " in first
    assert json.load(open(tmp_path / "run" / "config.json"))["student"]["patch_size"] == 8
    assert len(open(tmp_path / "run" / "training_metrics.json").read().splitlines()) == 3


def bad_cases(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "broken").mkdir()
    for i in range(3):
        (tmp_path / "broken" / f"{i}.jpg").write_text("not an image")
    torch.save(dm.vit_small(patch_size=14).state_dict(), tmp_path / "vits14.pth")
    return [
        (["--data", str(tmp_path / "missing")], "does not exist"),
        (["--data", str(tmp_path / "empty")], "no images found"),
        (["--data", str(tmp_path / "file.txt")], "is a file"),
        (["optim.lrr=1"], "unknown config key 'optim.lrr'"),
        (["optim.epochs=1.5"], "expects int"),
        (["train.batch_size_per_gpu=-4"], "must be > 0"),
        (["ibot.mask_ratio_min_max=[0.1,1.5]"], "0 <= low <= high <= 1"),
        (["crops.global_crops_size=30"], "a multiple of student.patch_size"),
        (["crops.local_crops_number=-1"], "must be >= 0"),
        (["--config", "vitl99"], "unknown --config"),
        (["--output-dir", str(tmp_path / "file.txt" / "sub")], "not writable"),
        (["--pretrained", str(tmp_path / "nope.pth")], "not found"),
        (["--pretrained", str(tmp_path / "garbage.pth")], "not a PyTorch checkpoint"),
        (["--pretrained", str(tmp_path / "vits14.pth")], "does not fit"),
        (["--bogus-flag"], "unrecognized arguments"),
        (["--config", "demo", "--data", str(tmp_path / "broken")], "3 unreadable images in a row"),
        (["--visualize", str(tmp_path / "nope.png"), "--pretrained", str(tmp_path / "vits14.pth")],
         "not found"),
    ]


def test_unlabelled_folder_trains_without_the_monitor(tmp_path, capsys):
    """A flat folder has no labels: the kNN monitor is off, the run still evaluates (teacher
    dumps) twice and ends with exit code 0 and its outputs."""
    for i in range(12):
        Image.new("RGB", (40 + i, 36), (20 * i, 90, 250 - 20 * i)).save(tmp_path / f"{i}.png")
    assert run_cli(tmp_path / "run", "--config", "demo", "--data", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "kNN monitor: off" in out and "done in" in out and "kNN top-1" not in out
    assert sorted(os.listdir(tmp_path / "run" / "eval")) == ["training_2", "training_5"]


def test_bad_input_gives_one_clear_line(tmp_path, capsys):
    """Each bad input: exit code 2 and one `dino_mini: error:` line naming the problem."""
    for args, fragment in bad_cases(tmp_path):
        out_args = [] if "--output-dir" in args else ["--output-dir", str(tmp_path / "o")]
        assert dm.main(out_args + args) == 2, args
        err = [e for e in capsys.readouterr().err.strip().splitlines()  # minus skips and bars
               if "warning: skipping" not in e and not e.startswith("train:")]
        assert len(err) == 1 and err[0].startswith("dino_mini: error:") and fragment in err[0], (
            args, err)
    assert not os.path.exists(tmp_path / "o" / "model_0000003.pth")


def test_out_of_memory_is_one_line_with_advice(monkeypatch, capsys):
    def oom(argv):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")

    monkeypatch.setattr(dm, "run", oom)
    assert dm.main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "GPU out of memory (CUDA out of memory." in err
    assert "train.batch_size_per_gpu" in err


def test_resume_may_change_the_lr_but_not_the_shapes(finished_run, tmp_path, capsys):
    """As official, a resumed run takes the command's config: a lower optim.base_lr (and 3 more
    iterations) continues with the new lr, says so once and config.json records it; a key that
    shapes the weights or the data stream is refused in one line that says why."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    assert run_cli(out, "optim.epochs=3", "crops.local_crops_number=3") == 2
    assert "crops.local_crops_number=2, this command says 3: that changes the data stream" in \
        capsys.readouterr().err
    assert run_cli(out, "optim.epochs=3", "optim.base_lr=0.001", "ibot.head_n_prototypes=7") == 0
    text = capsys.readouterr().out
    assert text.count("resume with a changed config: optim.base_lr: 0.016 -> 0.001") == 1
    assert "ibot.head_n_prototypes: 65536 -> 7" in text  # used by a separate head only
    cfg = tiny_config("optim.epochs=3", "optim.base_lr=0.001")
    dm.apply_scaling_rules(cfg, 1)
    first_after = [json.loads(line) for line in open(out / "training_metrics.json")][6]
    assert first_after["iteration"] == 6
    assert first_after["lr"] == pytest.approx(float(dm.build_schedulers(cfg)["lr"][6]))
    assert json.load(open(out / "config.json"))["optim"]["base_lr"] == 0.001
    assert checkpoint(out, 9)["config"]["optim"]["base_lr"] == 0.001



def test_a_checkpoint_from_before_a_key_existed_resumes_with_its_default():
    """A key added after a checkpoint was written (crops.flip_probability) counts as its default
    there: left at the default it is no change; set otherwise it is refused like any crop key."""
    cfg = dm.load_config("demo")
    old = copy.deepcopy(cfg)
    del old["crops"]["flip_probability"]
    assert dm.config_changes(old, cfg, "out") == []
    with pytest.raises(dm.UserError, match="made with crops.flip_probability=0.5, this command"):
        dm.config_changes(old, dm.load_config("demo", ["crops.flip_probability=0"]), "out")

def test_checkpoint_problems(finished_run, tmp_path, monkeypatch, capsys):
    """Another config is refused with a hint; a damaged newest checkpoint is reported and the
    one before it used; a failing write (disk full) keeps the previous checkpoint."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    assert run_cli(out, "dino.head_n_prototypes=32") == 2
    err = capsys.readouterr().err
    assert "other shapes" in err and "dino.head_n_prototypes: 256 -> 32" in err
    assert "start fresh" in err
    with open(out / "model_0000006.pth", "r+b") as f:
        f.truncate(1000)
    open(out / "model_0000009.pth.tmp", "wb").close()  # a save interrupted by a kill
    path, ckpt = dm.load_latest_checkpoint(str(out))
    assert path.endswith("model_0000003.pth") and ckpt["iteration"] == 3
    assert "damaged" in capsys.readouterr().out
    assert not os.path.exists(out / "model_0000009.pth.tmp")

    real = torch.save

    def disk_full(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("iteration") == 6:
            raise OSError(28, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(dm.torch, "save", disk_full)
    os.remove(out / "model_0000006.pth")
    assert run_cli(out) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not any(f.endswith(".tmp") for f in os.listdir(out))
    assert dm.load_latest_checkpoint(str(out))[1]["iteration"] == 3


# ---------------------------------------------------------------------------------------------
# Meta's weights, pictures, features
# ---------------------------------------------------------------------------------------------

S14 = ["student.arch=vit_small", "student.patch_size=14", "crops.global_crops_size=28",
       "crops.local_crops_size=14", "student.layerscale=1.0", "train.batch_size_per_gpu=4",
       "optim.epochs=1", "train.OFFICIAL_EPOCH_LENGTH=2", "evaluation.eval_period_iterations=0",
       "optim.warmup_epochs=0", "teacher.warmup_teacher_temp_epochs=0", "train.num_workers=0",
       "evaluation.knn_max_images=20", "evaluation.knn_n_per_class=2"]


@pytest.mark.parametrize("regs", [0, 4])
def test_pretrained_official_keys_then_train(tmp_path, regs):
    """An official-format s/14 (reg4) file loads through --pretrained into student and teacher,
    the 518 px position grid is resampled, two steps train, the exported teacher reloads."""
    keys = official_vit_keys(384, 12, 14, 1370, regs)
    torch.manual_seed(0)
    state = {k: torch.randn(shape) * 0.02 for k, shape in keys.items()}
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    extra = [f"student.num_register_tokens={regs}"] + (
        ["student.interpolate_antialias=true", "student.interpolate_offset=0.0"] if regs else [])
    out = tmp_path / "run"
    assert dm.main(["--output-dir", str(out), "--pretrained", str(path)] + S14 + extra) == 0
    teacher = torch.load(out / "teacher_backbone.pth")
    assert teacher["pos_embed"].shape == (1, 5, 384)
    ckpt = checkpoint(out, 2)["model"]
    assert not torch.equal(ckpt["student.backbone.blocks.0.attn.qkv.weight"],
                           state["blocks.0.attn.qkv.weight"])
    model = dm.build_backbone(dm.load_config("demo", S14 + extra))
    dm.load_backbone(model, dm.read_backbone_state(str(path)), str(path))  # from 37 x 37
    grid = state["pos_embed"][:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
    kwargs = {"size": (2, 2), "antialias": True} if regs else {"scale_factor": (2.1 / 37, 2.1 / 37)}
    ref = F.interpolate(grid, mode="bicubic", **kwargs).permute(0, 2, 3, 1).reshape(1, 4, 384)
    torch.testing.assert_close(model.pos_embed[:, 1:], ref)
    model.load_state_dict(teacher, strict=True)


def test_visualize_and_extract_features(finished_run, tmp_path):
    """--visualize writes PNGs of the expected tiles; --extract-features writes one normalised
    feature per image in sorted file order, the same on every call, from any weights format."""
    img_dir = tmp_path / "imgs"
    for i, sub in enumerate(["b", "a", "a"]):
        os.makedirs(img_dir / sub, exist_ok=True)
        Image.new("RGB", (40 + i, 30), (50 * i, 90, 200)).save(img_dir / sub / f"im{i}.png")
    pics = tmp_path / "pics"
    assert dm.main(["--visualize", str(img_dir / "b" / "im0.png"), "--output-dir", str(pics),
                    "--pretrained", str(finished_run / "teacher_backbone.pth"),
                    "--image-size", "32"]) == 0
    with Image.open(pics / "im0_pca.png") as im:  # image | PCA, 32 px shown 7x, 2 px padding
        assert im.size == (2 * (224 + 2) + 2, 224 + 4)
    with Image.open(pics / "im0_attn.png") as im:  # image | mean | 4 heads
        assert im.size == (6 * (224 + 2) + 2, 224 + 4)
    feats = []
    for weights in ("teacher_backbone.pth", "model_0000006.pth",
                    "eval/training_5/teacher_checkpoint.pth"):
        assert dm.main(["--extract-features", str(img_dir), "--pretrained",
                        str(finished_run / weights), "--out", str(tmp_path / "f.pt"),
                        "--image-size", "32"]) == 0
        feats.append(torch.load(tmp_path / "f.pt"))
    assert feats[0]["paths"] == ["a/im1.png", "a/im2.png", "b/im0.png"]
    assert feats[0]["cls"].shape == (3, 128)
    assert all(torch.equal(feats[0]["cls"], f["cls"]) for f in feats[1:])
    torch.testing.assert_close(feats[0]["cls"].norm(dim=1), torch.ones(3))


def deviations_table(source=os.path.join(HERE, "dino_mini.py")):
    """The README's table of deliberate deviations, generated from the `# Deviation from
    official:` comments of dino_mini.py."""
    rows, cls, where = [], "", "(module)"
    lines = open(source).read().splitlines()
    for i, line in enumerate(lines):
        text = line.strip()
        name = text.split()[1].split("(")[0].rstrip(":") if text.startswith(("def ", "class ")) \
            else None
        if name and line.startswith(("def ", "class ")):  # top level
            cls, where = (name if text.startswith("class ") else ""), name
        elif name and line.startswith("    def ") and cls:  # a method
            where = f"{cls}.{name}"
        if text.startswith("# Deviation from official:"):
            words = [text.split(":", 1)[1].strip()]
            for follow in lines[i + 1:]:
                if not follow.strip().startswith("#"):
                    break
                words.append(follow.strip().lstrip("#").strip())
            rows.append(f"| `{where}` | {' '.join(words)} |")
    return "\n".join(["| where in dino_mini.py | deviation and why |", "|---|---|"] + rows)


def test_readme_deviation_table_matches_the_code():
    """README.md holds exactly the table generated from the `# Deviation from official:` tags."""
    with open(os.path.join(HERE, "README.md")) as f:
        assert deviations_table() in f.read()


def readme():
    with open(os.path.join(HERE, "README.md")) as f:
        return f.read()


def test_readme_says_what_the_card_command_trains():
    """The 8-GPU numbers of the README are the config's: global batch, iterations, images seen,
    the lr after scaling, and the FLOP count the wall-time estimate starts from."""
    cfg = dm.load_config("default")
    dm.apply_scaling_rules(cfg, 8)
    B, iters = 8 * cfg.train.batch_size_per_gpu, cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH
    grid = cfg.crops.global_crops_size // cfg.student.patch_size
    flops = dm.step_flops(cfg, B // 8, B // 8 * 0.3 * grid ** 2)  # masks: 2B x 0.5 x 0.3 of N
    text = readme()
    for fact in (f"| global batch | {B} (", f"| iterations | {iters:,} (", f"| {B * iters:,} (",
                 f"| {cfg.optim.lr:.5f} |", f"{flops / 1e12:.1f} TFLOP per GPU per step"):
        assert fact in text, fact
    assert "four times as many GPU-days" not in text


@pytest.mark.parametrize("preset", ["demo", "small"])
def test_readme_declares_every_value_of_our_presets(preset):
    """Every key our CPU presets set is a row of the README's table, with the same value, and
    the official default beside it; keys that change nothing (iBOT head sizes without a separate
    head) are not set."""
    with open(os.path.join(HERE, "configs.json")) as f:
        values = dm.flat_keys(json.load(f)[preset])
    rows = {line.split("|")[1].strip(" `"): [c.strip(" `") for c in line.split("|")[2:5]]
            for line in readme().splitlines() if line.startswith("| `") and line.count("|") >= 6}
    column, text = {"demo": 1, "small": 2}[preset], (lambda v: v if isinstance(v, str)
                                                     else json.dumps(v))
    for key, value in values.items():
        assert key in rows, key
        assert rows[key][0] == text(dm.flat_keys(dm.DEFAULTS)[key]), key
        assert rows[key][column] == text(value), key
    assert not any(k.startswith("ibot.head_") for k in values)


def test_the_story_stays_about_1500_lines_and_the_machinery_does_not_grow():
    lines = open(os.path.join(HERE, "dino_mini.py")).read().splitlines()
    story = next(i for i, line in enumerate(lines) if line.startswith("# The machinery around"))
    assert story <= 1610 and len(lines) - story <= 1050  # the data section grew by its crops split
    assert max(map(len, lines)) <= 100


# ---------------------------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------------------------


def test_flop_count_by_hand():
    """vit_pico/4 on one 8 x 8 image: 4 patches + cls = 5 tokens, D = 128, 4 blocks, MLP 512."""
    cfg = dm.load_config("demo")
    embed = 2 * 4 * (3 * 4 * 4) * 128  # patch projection
    per_block = (2 * 5 * 128 * 384 + 2 * (2 * 5 * 5 * 128) + 2 * 5 * 128 * 128
                 + 2 * (2 * 5 * 128 * 512))
    assert dm.vit_flops(cfg, 1, 8) == embed + 4 * per_block
    c = cfg.dino
    K, hid, bott = c.head_n_prototypes, c.head_hidden_dim, c.head_bottleneck_dim
    assert dm.head_flops(cfg, 3) == 3 * 2 * (128 * hid + hid * hid + hid * bott + bott * K)


def test_benchmark_prints_every_field(capsys):
    result = dm.benchmark(tiny_config(), torch.device("cpu"), warmup=1, iters=2)
    out = capsys.readouterr().out
    for field in ("images/s per process", "of a measured matmul peak", "compile False"):
        assert field in out
    for key in ("teacher_s", "student_fwd_bwd_s", "optimizer_ema_s", "peak_memory_gib", "flops"):
        assert result[key] > 0
    assert result["images_per_s"] > 0 and 0 < result["mfu"] < 1.5
    assert json.loads(out.split("result: ")[1].splitlines()[0]) == json.loads(json.dumps(result))
    assert result["step_s"] >= result["teacher_s"] > 0


def test_benchmark_data_times_the_pipeline(tmp_path, capsys):
    """--benchmark-data times the official per-image crops and ours side by side and ends with
    one JSON line whose numbers agree with each other."""
    for i in range(6):
        Image.new("RGB", (64 + 8 * i, 48), (40 * i, 90, 200)).save(tmp_path / f"{i}.jpg")
    assert dm.main(["--benchmark-data", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    r = json.loads(out.split("result: ")[1].splitlines()[0])
    assert "2 + 4 crops" in out and r["colour_device"] in ("cpu", "cuda")
    assert r["worker_speedup_vs_official"] == pytest.approx(
        r["worker_images_per_s_per_core"] / r["official_images_per_s_per_core"])
    assert r["colour_ms_per_image"] > 0
    assert dm.main(["--benchmark-data", str(tmp_path / "missing")]) == 2
    assert "dino_mini: error: data folder" in capsys.readouterr().err


if __name__ == "__main__":  # print the README's deviations table
    print(deviations_table())
