"""Tests for dino_mini.py. Run: python -m pytest test_dino_mini.py -q

Everything runs on CPU with tiny models in a few minutes; GPU tests skip without a GPU. Values are
checked against hand computations or closed forms, not only shapes.
"""

import copy
import io
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import dino_mini as dm

HERE = os.path.dirname(os.path.abspath(__file__))
# the demo preset made smaller still: a whole run takes a few seconds
TINY = ["optim.epochs=2", "train.OFFICIAL_EPOCH_LENGTH=3", "optim.warmup_epochs=1", "train.batch_size_per_gpu=8",
        "train.num_workers=0", "evaluation.knn_max_images=40", "crops.local_crops_number=2", "train.log_every=1",
        "teacher.warmup_teacher_temp_epochs=1", "evaluation.eval_period_iterations=3", "train.checkpoint_period=3"]


def tiny_config(*extra):
    return dm.load_config("demo", TINY + list(extra))


def run_cli(tmp_path, *args, name="run"):
    """dm.main in this process; returns (exit code, output dir)."""
    out = str(tmp_path / name)
    return dm.main(["--output-dir", out] + TINY + list(args)), out


def make_batch(cfg, n_images=4, seed=0):
    """A collated batch of built-in shapes images, as the loader would produce it."""
    random.seed(seed)
    torch.manual_seed(seed)
    aug = dm.DataAugmentationDINO(cfg.crops.global_crops_scale, cfg.crops.local_crops_scale,
                                  cfg.crops.local_crops_number, cfg.crops.global_crops_size, cfg.crops.local_crops_size)
    data = dm.ShapesDataset(n_images, aug)  # (crops, label, skipped); the collate ignores the label
    grid = cfg.crops.global_crops_size // cfg.student.patch_size
    gen = dm.MaskingGenerator((grid, grid), max_num_patches=0.5 * grid * grid)
    return dm.collate_data_and_cast([data[i] for i in range(n_images)], tuple(cfg.ibot.mask_ratio_min_max),
                                    cfg.ibot.mask_sample_probability, torch.float32, grid * grid, gen)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def test_defaults_are_the_official_recipe():
    """A few official defaults (ssl_default_config.yaml) and the derived official figures."""
    cfg = dm.load_config("default")
    assert (cfg.student.arch, cfg.student.patch_size, cfg.train.batch_size_per_gpu) == ("vit_large", 16, 64)
    assert (cfg.dino.head_n_prototypes, cfg.optim.base_lr, cfg.optim.epochs) == (65536, 0.004, 100)
    assert cfg.teacher.momentum_teacher == 0.992 and cfg.crops.local_crops_number == 8
    assert cfg.ibot.mask_ratio_min_max == [0.1, 0.5] and cfg.train.OFFICIAL_EPOCH_LENGTH == 1250


def test_overrides_and_errors_name_the_key():
    """section.key=value overrides parse to the default's type; mistakes name the closest keys."""
    cfg = dm.load_config("default", ["optim.epochs=10", "train.centering=sinkhorn_knopp", "optim.base_lr=1e-3",
                                     "ibot.mask_ratio_min_max=[0.2,0.4]", "ibot.separate_head=true"])
    assert cfg.optim.epochs == 10 and cfg.train.centering == "sinkhorn_knopp" and cfg.optim.base_lr == 1e-3
    assert cfg.ibot.mask_ratio_min_max == [0.2, 0.4] and cfg.ibot.separate_head is True
    with pytest.raises(dm.UserError, match="closest valid keys: optim.base_lr"):
        dm.load_config("default", ["optim.base_lrr=1"])
    with pytest.raises(dm.UserError, match="expects int"):
        dm.load_config("default", ["optim.epochs=ten"])
    with pytest.raises(dm.UserError, match="must be one of"):
        dm.load_config("default", ["train.centering=sinkhorn"])
    with pytest.raises(dm.UserError, match="unknown --config"):
        dm.load_config("no_such_preset")


def test_every_preset_loads():
    """Every preset in configs.json uses existing keys with well-typed values."""
    with open(os.path.join(HERE, "configs.json")) as f:
        names = list(json.load(f))
    assert {"default", "vitl16_short", "vitl14", "vitg14", "demo"} <= set(names)
    for name in names:
        dm.load_config(name)
    assert dm.load_config("vitl14").ibot.head_n_prototypes == 131072


# ---------------------------------------------------------------------------------------------
# ViT
# ---------------------------------------------------------------------------------------------


def official_vit_keys(dim, depth, patch, n_pos, regs=0):
    """The official block_chunks=0 state-dict keys and shapes, written out from dinov2_facts.md 3.8."""
    keys = {"cls_token": (1, 1, dim), "pos_embed": (1, n_pos, dim), "mask_token": (1, dim),
            "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,),
            "norm.weight": (dim,), "norm.bias": (dim,)}
    if regs:
        keys["register_tokens"] = (1, regs, dim)
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,), b + "attn.qkv.weight": (3 * dim, dim),
                     b + "attn.qkv.bias": (3 * dim,), b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
                     b + "ls1.gamma": (dim,), b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
                     b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
                     b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,), b + "ls2.gamma": (dim,)})
    return keys


@pytest.mark.parametrize("regs", [0, 4])
def test_official_state_dict_loads_strictly(regs):
    """A state dict with the official names and shapes of dinov2_vits14[_reg4] loads with strict=True."""
    keys = official_vit_keys(384, 12, 14, 1370, regs)
    assert len(keys) == 175 + (1 if regs else 0)
    state = {k: torch.randn(shape) for k, shape in keys.items()}
    model = dm.vit_small(patch_size=14, img_size=518, init_values=1.0, num_register_tokens=regs)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == keys
    model.load_state_dict(state, strict=True)


def test_pos_embed_interpolation():
    """Identity when the grid matches; otherwise bicubic with the official scale factors (h/p + 0.1)/M."""
    model = dm.vit_pico(patch_size=4, img_size=32)
    D = model.embed_dim
    x = torch.zeros(1, 65, D)
    assert model.interpolate_pos_encoding(x, 32, 32) is model.pos_embed
    y = model.interpolate_pos_encoding(torch.zeros(1, 1 + 6 * 4, D), 24, 16)  # 6 x 4 patches
    grid = model.pos_embed[:, 1:].reshape(1, 8, 8, D).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, scale_factor=(6.1 / 8, 4.1 / 8), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 24, D)
    torch.testing.assert_close(y[:, 1:], ref)
    torch.testing.assert_close(y[:, 0], model.pos_embed[:, 0])
    model.interpolate_offset, model.interpolate_antialias = 0.0, True  # register models: size + antialias
    ref = F.interpolate(grid, size=(6, 4), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, 24, D)
    torch.testing.assert_close(model.interpolate_pos_encoding(torch.zeros(1, 25, D), 24, 16)[:, 1:], ref)


def test_mask_tokens_change_exactly_the_masked_positions():
    """Masked patches become mask_token + pos_embed; unmasked tokens are untouched."""
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
    """forward_features keys and shapes; model(x) is the normalised cls token; attention rows sum to 1."""
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
    assert patches.shape == (2, D, 8, 12)
    torch.testing.assert_close(cls, out["x_norm_clstoken"])


def test_attention_matches_hand_written_softmax():
    """The SDPA attention equals softmax(q k^T / sqrt(d)) v written out."""
    attn = dm.Attention(16, num_heads=2, qkv_bias=True)
    x = torch.randn(3, 5, 16)
    q, k, v = attn.qkv(x).reshape(3, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    ref = ((q @ k.transpose(-2, -1)) / math.sqrt(8)).softmax(-1) @ v
    torch.testing.assert_close(attn(x), attn.proj(ref.transpose(1, 2).reshape(3, 5, 16)))


def test_swiglu_hidden_size_rule():
    """SwiGLU hidden width (int(4D * 2/3) + 7) // 8 * 8: 4096 for ViT-g, 2736 for ViT-L."""
    assert dm.SwiGLUFFNFused(1536, 6144).w3.in_features == 4096
    assert dm.SwiGLUFFNFused(1024, 4096).w12.out_features == 2 * 2736


def test_drop_path_subset_rescales():
    """Batch-subset stochastic depth: int(b(1-p)) samples get the residual, scaled by b/subset."""
    torch.manual_seed(0)
    x = torch.zeros(10, 2, 3)
    out = dm.drop_add_residual_stochastic_depth(x, lambda t: torch.ones_like(t), 0.3)
    per_sample = out[:, 0, 0]
    assert (per_sample > 0).sum() == 7 and torch.allclose(per_sample[per_sample > 0], torch.tensor(10 / 7))


# ---------------------------------------------------------------------------------------------
# Heads and losses
# ---------------------------------------------------------------------------------------------


def test_dino_head_weight_norm():
    """Head: official keys, g = 1 and trainable, rows of the effective weight have norm g."""
    head = dm.DINOHead(16, 10, hidden_dim=8, bottleneck_dim=4)
    assert sorted(head.state_dict()) == ["last_layer.weight_g", "last_layer.weight_v", "mlp.0.bias", "mlp.0.weight",
                                         "mlp.2.bias", "mlp.2.weight", "mlp.4.bias", "mlp.4.weight"]
    assert head.last_layer.weight_g.requires_grad and torch.all(head.last_layer.weight_g == 1)
    z = F.normalize(head.mlp(torch.randn(3, 16)), dim=-1)
    v = head.last_layer.weight_v
    torch.testing.assert_close(head.last_layer(z), z @ (v / v.norm(dim=1, keepdim=True)).T)


def test_dino_loss_hand_computed():
    """Sum over (student, teacher) pairs of mean cross-entropy, student temperature 0.1."""
    loss = dm.DINOLoss(3)
    s = [torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.2, 0.0]])]
    t = [torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[0.0, 0.0, 1.0]])]
    expected = 0.0
    for si in s:
        logp = [x / 0.1 - math.log(sum(math.exp(y / 0.1) for y in si[0].tolist())) for x in si[0].tolist()]
        for ti in t:
            expected -= sum(a * b for a, b in zip(ti[0].tolist(), logp))
    assert loss(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_centering_and_center_ema_over_two_steps():
    """Targets use the centre of the previous batches: c1 = 0.1 m1, c2 = 0.9 c1 + 0.1 m2."""
    loss = dm.DINOLoss(4)
    z1, z2 = torch.randn(6, 4), torch.randn(6, 4)
    p1 = loss.softmax_center_teacher(z1, 0.05)
    torch.testing.assert_close(p1, F.softmax(z1 / 0.05, -1))  # centre 0 at first
    loss.update_center(z1)
    p2 = loss.softmax_center_teacher(z2, 0.05)
    c1 = 0.1 * z1.mean(0, keepdim=True)
    torch.testing.assert_close(loss.center, c1)
    torch.testing.assert_close(p2, F.softmax((z2 - c1) / 0.05, -1))
    loss.update_center(z2)
    loss.apply_center_update()
    torch.testing.assert_close(loss.center, 0.9 * c1 + 0.1 * z2.mean(0, keepdim=True))


def test_ibot_center_update_quirk():
    """The iBOT centre moves by 0.1 x (mean over masked tokens), the (1, n, K) input having len 1."""
    loss = dm.iBOTPatchLoss(5)
    z = torch.randn(1, 7, 5)
    loss.update_center(z)
    loss.apply_center_update()
    torch.testing.assert_close(loss.center, 0.1 * z.mean(1, keepdim=True))


def test_sinkhorn_knopp_marginals():
    """Rows sum to 1; every prototype gets mass n/K; equals 3 hand-written normalisation rounds."""
    torch.manual_seed(0)
    z = torch.randn(12, 6)
    q = dm.DINOLoss(6).sinkhorn_knopp_teacher(z, 0.5)
    torch.testing.assert_close(q.sum(1), torch.ones(12))
    converged = dm.DINOLoss(6).sinkhorn_knopp_teacher(z, 0.5, n_iterations=200)
    torch.testing.assert_close(converged.sum(0), torch.full((6,), 2.0))  # uniform prototype marginals
    Q = torch.exp(z / 0.5).T
    Q = Q / Q.sum()
    for _ in range(3):
        Q = Q / Q.sum(1, keepdim=True) / 6
        Q = Q / Q.sum(0, keepdim=True) / 12
    torch.testing.assert_close(q, (Q * 12).T)
    q2 = dm.iBOTPatchLoss(6).sinkhorn_knopp_teacher(z, 0.5, torch.tensor([12]))
    torch.testing.assert_close(q2, q)


def test_ibot_forward_masked_hand_computed():
    """-(1/2B) sum_i w_i CE_i with w_i = 1 / (masked tokens of its crop); 2B counts unmasked crops too."""
    masks = torch.tensor([[1, 1, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=torch.bool)
    s, t = torch.randn(3, 4), F.softmax(torch.randn(3, 4), -1)
    ce = -(t * F.log_softmax(s / 0.1, -1)).sum(-1)
    expected = (ce[0] / 2 + ce[1] / 2 + ce[2] / 1) / 4
    torch.testing.assert_close(dm.iBOTPatchLoss(4).forward_masked(s, t, masks), expected)


def test_koleo_known_configuration():
    """Four unit vectors at 90 degrees: nearest-neighbour distance sqrt(2), loss -log(sqrt 2)."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]) * 3.0
    assert dm.KoLeoLoss()(x).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)
    assert dm.KoLeoLoss()(torch.randn(1, 8)).item() == 0.0  # guard: one sample, no neighbour
    # near collapse the eps sits inside the difference vector: d = ||x_i - x_j + 1e-8||
    y = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert dm.KoLeoLoss()(y).item() == pytest.approx(-math.log(math.sqrt(2) * 1e-8 + 1e-8), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def test_augmentation_shapes():
    aug = dm.DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 3, 32, 16)
    out = aug(Image.new("RGB", (50, 40), (200, 10, 10)))
    assert [c.shape for c in out["global_crops"]] == [(3, 32, 32)] * 2
    assert [c.shape for c in out["local_crops"]] == [(3, 16, 16)] * 3
    assert all(a is b for a, b in zip(out["global_crops_teacher"], out["global_crops"])) and out["offsets"] == ()


def test_blur_and_solarize_frequencies(monkeypatch):
    """Effective blur probabilities 0.0 / 0.9 / 0.5 (the official inverted quirk), solarize 0.2 on
    global crop 2 only."""
    aug = dm.DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2, 16, 8)
    counts = {}

    def counting(name):
        return lambda img: counts.__setitem__(name, counts.get(name, 0) + 1) or img

    for name, compose in [("g1", aug.global_transfo1), ("g2", aug.global_transfo2), ("local", aug.local_transfo)]:
        for t in compose.transforms:
            if isinstance(t, dm.transforms.RandomApply) and isinstance(t.transforms[0], dm.transforms.GaussianBlur):
                t.transforms[0] = counting(name)
    monkeypatch.setattr(dm.transforms.functional, "solarize", lambda img, th: counting("sol")(img))
    torch.manual_seed(0)
    img = Image.new("RGB", (20, 20), (100, 150, 200))
    n = 600
    for _ in range(n):
        aug(img)
    assert counts.get("g1", 0) == 0
    assert counts["g2"] / n == pytest.approx(0.9, abs=0.04)
    assert counts["local"] / (2 * n) == pytest.approx(0.5, abs=0.05)
    assert counts["sol"] / n == pytest.approx(0.2, abs=0.05)


def test_masking_generator_respects_target():
    """Never more than the target; close to it on average; zero target gives an empty mask."""
    random.seed(0)
    gen = dm.MaskingGenerator((14, 14), max_num_patches=98)
    counts = []
    for target in [0, 5, 20, 50, 98] * 40:
        m = gen(target)
        assert m.shape == (14, 14) and m.dtype == torch.bool and m.sum() <= target
        counts.append((target, int(m.sum())))
    mean98 = sum(c for t, c in counts if t == 98) / 40
    assert mean98 > 90


def test_collate_invariants():
    """Crop-major order, mask indices = flattened nonzeros, weights = 1/count, int(2B p) masked crops."""
    cfg = tiny_config()
    random.seed(1)
    crops = [{"global_crops": [torch.full((3, 32, 32), 10.0 * i + v) for v in (1, 2)],
              "local_crops": [torch.full((3, 16, 16), 10.0 * i + v) for v in (3, 4)]} for i in range(3)]
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
    assert cfg.crops.global_crops_size == 32


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
    """Odd modes become RGB, small images work, bad files are skipped and counted, .txt is ignored."""
    write_odd_images(tmp_path)
    aug = dm.DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 1, 16, 8)
    ds = dm.ImageFolderDataset(str(tmp_path), aug)
    assert len(ds) == 8 and ds.classes == ["a", "b"]
    skipped = 0
    for i in range(len(ds)):
        crops, label, s = ds[i]
        skipped += s
        assert crops["global_crops"][0].shape == (3, 16, 16)
    assert skipped == 2
    sixteen = dm.load_rgb(tmp_path / "b" / "sixteen.png")
    assert sixteen.mode == "RGB" and sixteen.getpixel((0, 0)) == (0, 0, 0) and sixteen.getpixel((39, 0)) == (255,) * 3
    assert dm.load_rgb(tmp_path / "b" / "cmyk.jpg").mode == "RGB"


def test_shapes_dataset_deterministic_and_balanced():
    ds = dm.ShapesDataset(100, transform=lambda im: im)
    a, b = ds.draw(7)[0], ds.draw(7)[0]
    assert a.tobytes() == b.tobytes()
    assert [ds.draw(i)[1] for i in range(100)].count(3) == 10
    assert ds.draw(7)[0].tobytes() != dm.ShapesDataset(100, lambda im: im, seed=1).draw(7)[0].tobytes()


def test_infinite_sampler_shards_and_resumes():
    """Ranks split each pass without overlap; start=k continues the same stream; passes reshuffle."""
    s0, s1 = dm.InfiniteSampler(10, seed=3, rank=0, world_size=2), dm.InfiniteSampler(10, seed=3, rank=1, world_size=2)
    it0, it1 = iter(s0), iter(s1)
    a, b = [next(it0) for _ in range(10)], [next(it1) for _ in range(10)]
    assert sorted(a[:5] + b[:5]) == list(range(10)) and a[:5] != a[5:]
    resumed = iter(dm.InfiniteSampler(10, seed=3, rank=0, world_size=2, start=7))
    assert [next(resumed) for _ in range(3)] == a[7:10]


# ---------------------------------------------------------------------------------------------
# Optimisation
# ---------------------------------------------------------------------------------------------


def test_cosine_scheduler_hand_values():
    s = dm.CosineScheduler(1.0, 0.0, total_iters=10, warmup_iters=3, start_warmup_value=0.1, freeze_iters=2)
    assert s[0] == s[1] == 0.0 and s[2] == pytest.approx(0.1) and s[3] == pytest.approx(0.55) and s[4] == 1.0
    assert s[5] == 1.0 and s[6] == pytest.approx(0.5 * (1 + math.cos(math.pi / 5)))
    assert s[9] == pytest.approx(0.5 * (1 + math.cos(4 * math.pi / 5))) and s[10] == 0.0 and s[99] == 0.0


def test_official_schedules():
    """Teacher temperature 0.04 -> 0.07 over 30 epochs; lr 0 at start, peak at the end of warmup;
    last layer frozen for one epoch (here an epoch is 10 iterations)."""
    cfg = dm.load_config("default", ["train.OFFICIAL_EPOCH_LENGTH=10"])
    cfg.optim.lr = 0.004
    s = dm.build_schedulers(cfg)
    assert s["teacher_temp"][0] == pytest.approx(0.04) and s["teacher_temp"][299] == pytest.approx(0.07)
    assert s["teacher_temp"][5000] == 0.07
    assert s["lr"][0] == 0 and s["lr"][99] == pytest.approx(0.004) and s["lr"][1000] == 1e-6
    assert s["last_layer_lr"][9] == 0 and s["last_layer_lr"][10] == s["lr"][10] > 0
    assert s["wd"][0] == pytest.approx(0.04) and s["mom"][0] == pytest.approx(0.992)


def test_param_group_multipliers():
    """ViT-S with layer decay 0.9 and patch-embed multiplier 0.2 (dinov2_facts.md 6.1)."""
    groups = {d["name"]: d for d in dm.get_params_groups_with_decay(dm.vit_small(init_values=1e-5), 0.9, 0.2)}
    assert groups["pos_embed"]["lr_multiplier"] == pytest.approx(0.9 ** 13)
    assert groups["blocks.0.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.9 ** 12)
    assert groups["blocks.11.mlp.fc2.weight"]["lr_multiplier"] == pytest.approx(0.9)
    assert groups["norm.weight"]["lr_multiplier"] == 1.0
    assert groups["patch_embed.proj.bias"]["lr_multiplier"] == pytest.approx(0.9 ** 13 * 0.2)
    wd = {n: d["wd_multiplier"] for n, d in groups.items()}
    assert wd["cls_token"] == wd["pos_embed"] == wd["mask_token"] == wd["blocks.3.attn.qkv.weight"] == 1.0
    assert wd["blocks.3.attn.qkv.bias"] == wd["blocks.3.norm1.weight"] == wd["blocks.3.ls1.gamma"] == 0.0
    head = {d["name"]: d for d in dm.get_params_groups_with_decay(dm.DINOHead(8, 4, hidden_dim=8, bottleneck_dim=4), 0.9)}
    assert head["last_layer.weight_g"]["is_last_layer"] and head["last_layer.weight_g"]["wd_multiplier"] == 1.0
    assert head["mlp.0.weight"]["lr_multiplier"] == 1.0
    fused = dm.fuse_params_groups(list(groups.values()))
    assert len(fused) == len({(d["lr_multiplier"], d["wd_multiplier"]) for d in groups.values()})


# ---------------------------------------------------------------------------------------------
# The train step
# ---------------------------------------------------------------------------------------------


def test_ema_momentum_zero_and_one():
    cfg = tiny_config()
    model = dm.SSLMetaArch(cfg)
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.teacher.parameters()]
    model.update_teacher(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.teacher.parameters()))
    model.update_teacher(0.0)
    assert all(torch.equal(a, b) for a, b in zip(model.student.parameters(), model.teacher.parameters()))


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_train_step_losses_and_gradients(centering):
    """Finite official loss terms; the teacher gets no gradient; the recomputed total matches."""
    cfg = tiny_config(f"train.centering={centering}", "ibot.separate_head=" + str(centering == "centering"))
    torch.manual_seed(0)
    model = dm.SSLMetaArch(cfg)
    model.train()
    assert not model.teacher.training and model.student.training
    batch = make_batch(cfg)
    losses = model.forward_backward(batch, teacher_temp=0.04)
    assert set(losses) == {"dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(p.grad is not None for p in model.student.parameters())
    # recompute the global DINO term and KoLeo from the modules directly (drop path is 0 in the demo)
    if centering == "centering":  # first step: centre 0, so targets are softmax(z / T), views swapped
        g, masks = batch["collated_global_crops"], batch["collated_masks"]
        with torch.no_grad():
            p = F.softmax(model.teacher.dino_head(model.teacher.backbone(g)) / 0.04, dim=-1)
            B = len(g) // 2
            p = torch.cat([p[B:], p[:B]])
            cls = model.student.backbone(g, masks=masks, is_training=True)["x_norm_clstoken"]
            ce = -(p * F.log_softmax(model.student.dino_head(cls) / 0.1, -1)).sum(-1).mean()
            koleo = 0.1 * sum(dm.KoLeoLoss()(c) for c in cls.chunk(2)) / 2
        n_terms = 2 * cfg.crops.local_crops_number + 2  # (local, teacher view) pairs + 2 global pairs
        torch.testing.assert_close(losses["dino_global_crops_loss"].detach(), ce * 2 / n_terms)
        torch.testing.assert_close(losses["koleo_loss"].detach(), koleo)


def test_last_layer_frozen_during_first_epoch(tmp_path):
    """Prototype weights do not move while last_layer_lr is 0; the other weights do."""
    cfg = tiny_config("optim.freeze_last_layer_epochs=1")
    torch.manual_seed(0)
    model = dm.SSLMetaArch(cfg)
    opt = torch.optim.AdamW(model.get_params_groups())
    before = {n: p.clone() for n, p in model.student.named_parameters()}
    dm.apply_optim_scheduler(opt, lr=1e-2, wd=0.04, last_layer_lr=0.0)
    opt.zero_grad()
    model.forward_backward(make_batch(cfg), teacher_temp=0.04)
    opt.step()
    for n, p in model.student.named_parameters():
        assert torch.equal(p, before[n]) == ("last_layer" in n), n


def final_weights(out):
    ckpt = torch.load(sorted(p for p in os.listdir(out) if p.startswith("model_"))[-1] and
                      os.path.join(out, sorted(p for p in os.listdir(out) if p.startswith("model_"))[-1]),
                      weights_only=False)
    return ckpt["model"]


def test_end_to_end_run_writes_outputs(tmp_path):
    """The CLI run writes checkpoint, metrics, kNN lines and a strictly loadable teacher backbone."""
    code, out = run_cli(tmp_path)
    assert code == 0
    files = set(os.listdir(out))
    assert {"model_0000006.pth", "model_0000003.pth", "training_metrics.json", "eval_knn.jsonl",
            "teacher_backbone.pth", "config.json"} <= files
    knn = [json.loads(line) for line in open(os.path.join(out, "eval_knn.jsonl"))]
    assert [r["iteration"] for r in knn if r["k"] == 10] == [0, 3, 6]
    assert set(knn[0]) == {"iteration", "k", "top1", "top5"} and knn[0]["k"] == 10 and knn[-1]["k"] == 40
    metrics = [json.loads(line) for line in open(os.path.join(out, "training_metrics.json"))]
    assert [m["iteration"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert {"teacher_entropy", "cls_std", "lr", "teacher_temp", "img_per_s", "ibot_loss"} <= set(metrics[0])
    assert all(0 <= m["data_wait"] <= 1.01 for m in metrics)  # a share of wall time
    cfg = tiny_config()
    backbone = dm.build_backbone(cfg, drop_path=False)
    backbone.load_state_dict(torch.load(os.path.join(out, "teacher_backbone.pth")), strict=True)


def test_runs_are_deterministic_and_resume_exactly(tmp_path):
    """Two identical runs give bitwise-equal weights; a run resumed from its iteration-3 checkpoint
    ends with the same weights as the uninterrupted run."""
    assert run_cli(tmp_path, name="a")[0] == 0
    assert run_cli(tmp_path, name="b")[0] == 0
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    os.remove(tmp_path / "b" / "model_0000006.pth")  # as if killed after the iteration-3 save
    assert run_cli(tmp_path, name="b")[0] == 0
    c = final_weights(tmp_path / "b")
    assert all(torch.equal(a[k], c[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# Distributed: two gloo processes through the same environment variables torchrun sets
# ---------------------------------------------------------------------------------------------


def _dist_worker(rank, world_size, port, out_dir, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    rank_, _, W, device = dm.setup_distributed()
    try:
        # globally reduced quantities: centres and Sinkhorn-Knopp over the rank halves of one batch
        torch.manual_seed(0)
        z = torch.randn(8, 6)
        part = z[rank * 4:(rank + 1) * 4]
        dl = dm.DINOLoss(6)
        dl.update_center(part)
        dl.apply_center_update()
        sk = dm.DINOLoss(6).sinkhorn_knopp_teacher(part, 0.5)
        ib = dm.iBOTPatchLoss(6).sinkhorn_knopp_teacher(part, 0.5, torch.tensor([4]))
        torch.save({"center": dl.center, "sk": sk, "ibot_sk": ib}, os.path.join(result_dir, f"unit_{rank}.pt"))
        # a short training run: both ranks must end with identical weights
        cfg = dm.load_config("demo", TINY + ["dino.koleo_loss_weight=0", "evaluation.eval_period_iterations=0"])
        model, _ = dm.train(cfg, device, out_dir, knn_data=None)
        torch.save(model.state_dict(), os.path.join(result_dir, f"weights_{rank}.pt"))
    finally:
        dm.cleanup_distributed()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo(tmp_path):
    """2 ranks x batch b equals 1 rank x batch 2b on the global quantities; ranks stay identical."""
    out = tmp_path / "run"
    out.mkdir()
    torch.multiprocessing.spawn(_dist_worker, args=(2, free_port(), str(out), str(tmp_path)), nprocs=2)
    r0, r1 = torch.load(tmp_path / "unit_0.pt"), torch.load(tmp_path / "unit_1.pt")
    torch.manual_seed(0)
    z = torch.randn(8, 6)
    torch.testing.assert_close(r0["center"], 0.1 * z.mean(0, keepdim=True))
    torch.testing.assert_close(r0["center"], r1["center"])
    full = dm.DINOLoss(6).sinkhorn_knopp_teacher(z, 0.5)
    torch.testing.assert_close(torch.cat([r0["sk"], r1["sk"]]), full)
    torch.testing.assert_close(torch.cat([r0["ibot_sk"], r1["ibot_sk"]]), full)
    w0, w1 = torch.load(tmp_path / "weights_0.pt"), torch.load(tmp_path / "weights_1.pt")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert not torch.equal(w0["student.backbone.pos_embed"], dm.SSLMetaArch(tiny_config()).state_dict()["student.backbone.pos_embed"])


# ---------------------------------------------------------------------------------------------
# Meta's weights, pictures, features
# ---------------------------------------------------------------------------------------------

S14 = ["student.arch=vit_small", "student.patch_size=14", "crops.global_crops_size=28", "crops.local_crops_size=14",
       "student.layerscale=1.0", "train.batch_size_per_gpu=4", "optim.epochs=1", "train.OFFICIAL_EPOCH_LENGTH=2",
       "evaluation.eval_period_iterations=0", "optim.warmup_epochs=0", "teacher.warmup_teacher_temp_epochs=0"]


@pytest.mark.parametrize("regs", [0, 4])
def test_pretrained_official_keys_then_train(tmp_path, regs):
    """An official-format s/14 (reg4) file loads through --pretrained into student and teacher, the
    518 px position grid is resampled, two steps train, and the exported teacher reloads strictly."""
    keys = official_vit_keys(384, 12, 14, 1370, regs)
    torch.manual_seed(0)
    state = {k: torch.randn(shape) * 0.02 for k, shape in keys.items()}
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    extra = [f"student.num_register_tokens={regs}"] + (["student.interpolate_antialias=true",
                                                        "student.interpolate_offset=0.0"] if regs else [])
    out = str(tmp_path / "run")
    code = dm.main(["--output-dir", out, "--pretrained", str(path), "evaluation.knn_max_images=20",
                    "train.num_workers=0"] + S14 + extra)
    assert code == 0
    teacher = torch.load(os.path.join(out, "teacher_backbone.pth"))  # exported after the 2 steps
    assert teacher["pos_embed"].shape == (1, 5, 384)
    ckpt = torch.load(os.path.join(out, "model_0000002.pth"))["model"]
    assert not torch.equal(ckpt["student.backbone.blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])
    cfg = dm.load_config("demo", S14 + extra)
    model = dm.build_backbone(cfg)
    dm.load_pretrained_backbone(model, str(path))  # the resampled grid, from the official 37 x 37
    grid = state["pos_embed"][:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
    kwargs = {"size": (2, 2), "antialias": True} if regs else {"scale_factor": (2.1 / 37, 2.1 / 37)}
    ref = F.interpolate(grid, mode="bicubic", **kwargs).permute(0, 2, 3, 1).reshape(1, 4, 384)
    torch.testing.assert_close(model.pos_embed[:, 1:], ref)
    model.load_state_dict(teacher, strict=True)


def test_visualize_and_extract_features(tmp_path):
    """--visualize writes PNGs of the expected grid size; --extract-features writes one normalised
    feature per image in sorted file order, the same on every call."""
    code, out = run_cli(tmp_path)
    assert code == 0
    img_dir = tmp_path / "imgs"
    for i, sub in enumerate(["b", "a", "a"]):
        os.makedirs(img_dir / sub, exist_ok=True)
        Image.new("RGB", (40 + i, 30), (50 * i, 90, 200)).save(img_dir / sub / f"im{i}.png")
    pics = tmp_path / "pics"
    assert dm.main(["--visualize", str(img_dir / "a" / "im1.png"), "--output-dir", str(out), "--image-size", "32"]) == 0
    assert dm.main(["--visualize", str(img_dir / "b" / "im0.png"), "--pretrained",
                    os.path.join(out, "teacher_backbone.pth"), "--output-dir", str(pics), "--image-size", "32"]) == 0
    with Image.open(pics / "im0_pca.png") as im:
        assert im.size == (2 * 34 + 2, 36)  # image | PCA, 32 px tiles with 2 px padding
    with Image.open(os.path.join(out, "im1_attn.png")) as im:
        assert im.size == ((2 + 4) * 34 + 2, 36)  # image | mean | 4 heads
    feats = []
    for name in ("f1.pt", "f2.pt"):
        assert dm.main(["--extract-features", str(img_dir), "--pretrained", os.path.join(out, "teacher_backbone.pth"),
                        "--out", str(tmp_path / name), "--image-size", "32"]) == 0
        feats.append(torch.load(tmp_path / name))
    assert feats[0]["paths"] == [os.path.join("a", "im1.png"), os.path.join("a", "im2.png"), os.path.join("b", "im0.png")]
    assert feats[0]["cls"].shape == (3, dm.VIT_SIZES["vit_pico"][0]) and torch.equal(feats[0]["cls"], feats[1]["cls"])
    torch.testing.assert_close(feats[0]["cls"].norm(dim=1), torch.ones(3))


def deviations_table(source=os.path.join(HERE, "dino_mini.py")):
    """The README's table of deliberate deviations, generated from the `# Deviation from official:`
    comments of dino_mini.py (`python test_dino_mini.py` prints it for the README)."""
    rows, cls, where = [], "", "(module)"
    lines = open(source).read().splitlines()
    for i, line in enumerate(lines):
        text = line.strip()
        name = text.split()[1].split("(")[0].rstrip(":") if text.startswith(("def ", "class ")) else None
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
    """README.md holds exactly the table generated from the `# Deviation from official:` comments."""
    table = deviations_table()
    assert table.count("\n") >= 8
    with open(os.path.join(HERE, "README.md")) as f:
        assert table in f.read()


# ---------------------------------------------------------------------------------------------
# Reliability: bad input, signals, kills, damaged checkpoints, non-finite losses
# ---------------------------------------------------------------------------------------------


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
        (["crops.global_crops_size=30"], "not a multiple of student.patch_size"),
        (["crops.local_crops_number=-1"], "must be >= 0"),
        (["--config", "vitl99"], "unknown --config"),
        (["--output-dir", str(tmp_path / "file.txt" / "sub")], "not writable"),
        (["--pretrained", str(tmp_path / "nope.pth")], "not found"),
        (["--pretrained", str(tmp_path / "garbage.pth")], "not a PyTorch checkpoint"),
        (["--pretrained", str(tmp_path / "vits14.pth")], "does not fit"),
        (["--bogus-flag"], "unrecognized arguments"),
        (["--config", "demo", "--data", str(tmp_path / "broken")], "3 unreadable images in a row"),
    ]


def test_bad_input_gives_one_clear_line(tmp_path, capsys):
    """Each bad input: exit code 2 and a single `dino_mini: error:` line naming the problem."""
    for args, fragment in bad_cases(tmp_path):
        out_args = [] if any(a == "--output-dir" for a in args) else ["--output-dir", str(tmp_path / "o")]
        assert dm.main(out_args + args) == 2, args
        err = [e for e in capsys.readouterr().err.strip().splitlines()  # minus skip warnings and progress bars
               if "warning: skipping" not in e and not e.startswith("train:")]
        assert len(err) == 1 and err[0].startswith("dino_mini: error:") and fragment in err[0], (args, err)
    assert not os.path.exists(tmp_path / "o" / "model_0000003.pth")


def test_out_of_memory_is_one_line_with_advice(monkeypatch, capsys):
    def oom(argv):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    monkeypatch.setattr(dm, "run", oom)
    assert dm.main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dino_mini: error: GPU out of memory (CUDA out of memory.")
    assert "train.batch_size_per_gpu" in err


def test_resume_refuses_another_config(tmp_path, capsys):
    code, out = run_cli(tmp_path)
    assert code == 0
    assert dm.main(["--output-dir", out] + TINY + ["dino.head_n_prototypes=32"]) == 2
    err = capsys.readouterr().err
    assert "dino.head_n_prototypes: 256 -> 32" in err and "start fresh" in err


def test_damaged_checkpoint_is_reported_and_skipped(tmp_path, capsys):
    code, out = run_cli(tmp_path)
    assert code == 0
    newest = os.path.join(out, "model_0000006.pth")
    with open(newest, "r+b") as f:
        f.truncate(1000)
    open(os.path.join(out, "model_0000009.pth.tmp"), "wb").close()  # a save interrupted by a kill
    path, ckpt = dm.load_latest_checkpoint(out)
    assert path.endswith("model_0000003.pth") and ckpt["iteration"] == 3
    assert "damaged" in capsys.readouterr().out and not os.path.exists(os.path.join(out, "model_0000009.pth.tmp"))


def test_non_finite_loss_stops_without_saving(tmp_path, monkeypatch, capsys):
    """A NaN in a loss term stops the run naming the term; the earlier checkpoint stays intact."""
    calls = {"n": 0}
    real = dm.KoLeoLoss.forward

    def sometimes_nan(self, x, eps=1e-8):
        calls["n"] += 1
        return real(self, x, eps) * (float("nan") if calls["n"] > 8 else 1.0)  # 2 calls per iteration

    monkeypatch.setattr(dm.KoLeoLoss, "forward", sometimes_nan)
    code, out = run_cli(tmp_path)
    assert code == 2
    err = capsys.readouterr().err
    assert "non-finite loss at iteration 5" in err and "koleo_loss=nan" in err
    assert sorted(f for f in os.listdir(out) if f.startswith("model_")) == ["model_0000003.pth"]
    assert dm.load_latest_checkpoint(out)[1]["iteration"] == 3


LONG = ["optim.epochs=6", "train.checkpoint_period=2", "evaluation.eval_period_iterations=0"]


def cli(out, *extra):
    return [sys.executable, os.path.join(HERE, "dino_mini.py"), "--output-dir", str(out)] + TINY + LONG + list(extra)


def wait_for_metrics(out, proc, n_lines, timeout=120):
    t0 = time.time()
    path = os.path.join(out, "training_metrics.json")
    while time.time() - t0 < timeout and proc.poll() is None:
        if os.path.exists(path) and len(open(path).read().splitlines()) >= n_lines:
            return
        time.sleep(0.05)


def test_sigterm_saves_and_kill9_resumes_exactly(tmp_path):
    """SIGTERM: the step finishes, a checkpoint is written, exit 0. SIGKILL at a random moment: the
    resumed run ends with the same weights as an uninterrupted one."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    ref = tmp_path / "ref"
    subprocess.run(cli(ref), check=True, capture_output=True, env=env)
    final = torch.load(ref / "model_0000018.pth")["model"]

    term = tmp_path / "term"
    proc = subprocess.Popen(cli(term), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    wait_for_metrics(term, proc, 5)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"stopped by SIGTERM" in stdout
    it = dm.load_latest_checkpoint(str(term))[1]["iteration"]
    logged = [json.loads(line)["iteration"] for line in open(term / "training_metrics.json")]
    assert 5 <= it < 18 and it == logged[-1]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wait_for_metrics(killed, proc, random.Random().randint(3, 12))
    proc.kill()
    proc.wait()
    for out in (term, killed):
        subprocess.run(cli(out), check=True, capture_output=True, env=env)
        resumed = torch.load(out / "model_0000018.pth")["model"]
        assert all(torch.equal(final[k], resumed[k]) for k in final), out


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.parametrize("device,dtype", [("cpu", "bf16"), pytest.param("cuda", "bf16", marks=GPU),
                                          pytest.param("cuda", "fp16", marks=GPU)])
def test_mixed_precision_steps_are_finite_and_report_memory(device, dtype, capsys):
    """Two full train steps under autocast (fp16 with the grad scaler), then the benchmark's memory line."""
    cfg = tiny_config(f"compute_precision.dtype={dtype}")
    dev = torch.device(device)
    model, optimizer = dm.build_model_and_optimizer(cfg, dev, dm.DTYPES[dtype])
    assert model.fp16_scaler.is_enabled() == (dtype == "fp16")
    before = copy.deepcopy(model.student.state_dict())
    for seed in range(2):
        losses = dm.train_step(model, optimizer, make_batch(cfg, seed=seed), lr=1e-3, wd=0.04, mom=0.99,
                               teacher_temp=0.04, last_layer_lr=0.0)
        assert all(torch.isfinite(v) for v in losses.values()), losses
    assert dm.params_finite(model)
    moved = not torch.equal(before["backbone.blocks.0.attn.qkv.weight"].to(dev),
                            model.student.state_dict()["backbone.blocks.0.attn.qkv.weight"])
    assert moved or model.fp16_scaler.get_scale() < 2.0 ** 16  # or fp16 overflow skipped both steps
    dm.benchmark(cfg, dev, warmup=1, iters=1)
    out = capsys.readouterr().out
    assert ("CUDA max allocated" if device == "cuda" else "process RSS") in out
    assert ("bfloat16" if dtype == "bf16" else "float16") in out


# ---------------------------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------------------------


def test_flop_count_by_hand():
    """vit_pico/4 on one 8x8 image: 4 patches + cls = 5 tokens, D = 128, 4 blocks, MLP 512."""
    cfg = dm.load_config("demo")
    assert dm.VIT_SIZES["vit_pico"] == (128, 4, 4)
    embed = 2 * 4 * (3 * 4 * 4) * 128  # patch projection
    per_block = 2 * 5 * 128 * 384 + 2 * (2 * 5 * 5 * 128) + 2 * 5 * 128 * 128 + 2 * (2 * 5 * 128 * 512)
    assert dm.vit_flops(cfg, 1, 8) == embed + 4 * per_block
    K, hid, bott = cfg.dino.head_n_prototypes, cfg.dino.head_hidden_dim, cfg.dino.head_bottleneck_dim
    assert dm.head_flops(cfg, 3) == 3 * 2 * (128 * hid + hid * hid + hid * bott + bott * K)


def test_benchmark_prints_every_field(capsys):
    cfg = tiny_config()
    result = dm.benchmark(cfg, torch.device("cpu"), warmup=1, iters=2)
    out = capsys.readouterr().out
    for field in ("images/s", "per process", "total", "teacher", "student", "backward", "optimizer+ema",
                  "peak memory", "GFLOP", "TFLOP/s", "utilisation", "compile False"):
        assert field in out
    assert result["images_per_s"] > 0 and 0 < result["mfu"] < 1.5
    assert json.loads(out.split("result: ")[1].splitlines()[0]) == json.loads(json.dumps(result))
    assert result["step_s"] >= sum(result[f"{k}_s"] for k in ("teacher", "student", "backward")) > 0


def test_benchmark_data_times_the_pipeline(tmp_path, capsys):
    for i in range(6):
        Image.new("RGB", (64 + 8 * i, 48), (40 * i, 90, 200)).save(tmp_path / f"{i}.jpg")
    assert dm.main(["--benchmark-data", str(tmp_path), "train.num_workers=0", "train.batch_size_per_gpu=3"]) == 0
    out = capsys.readouterr().out
    rate = float(out.split("data: ")[1].split(" images/s")[0])
    assert rate > 0 and "with train.num_workers=0" in out and "2 + 4 crops" in out
    assert dm.main(["--benchmark-data", str(tmp_path / "missing")]) == 2
    assert "dino_mini: error: data folder" in capsys.readouterr().err


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    """A failing write (disk full) is reported; the earlier checkpoint survives, no temporary file stays."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "iteration" in obj and obj["iteration"] == 6:
            raise OSError(28, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(dm.torch, "save", save)
    code, out = run_cli(tmp_path)
    assert code == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not any(f.endswith(".tmp") for f in os.listdir(out)) and "model_0000006.pth" not in os.listdir(out)
    assert dm.load_latest_checkpoint(out)[1]["iteration"] == 3


def test_labelled_data_folder_gets_a_knn_monitor(tmp_path):
    """--data with class sub-folders: pre-training reads every image, kNN uses a held-out split."""
    for c, colour in enumerate([(250, 20, 20), (20, 20, 250)]):
        os.makedirs(tmp_path / "data" / f"class{c}")
        for i in range(10):
            Image.new("RGB", (40, 40), tuple(max(0, v - 5 * i) for v in colour)).save(
                tmp_path / "data" / f"class{c}" / f"{i}.JPEG")
    code, out = run_cli(tmp_path, "--config", "demo", "--data", str(tmp_path / "data"))
    assert code == 0
    knn = [json.loads(line) for line in open(os.path.join(out, "eval_knn.jsonl"))]
    assert [r["iteration"] for r in knn if r["k"] == 10] == [0, 3, 6]
    assert {r["top1"] for r in knn} <= {0.0, 25.0, 50.0, 75.0, 100.0}  # 4 held-out queries (20% of 20)
    assert {r["k"] for r in knn} == {10, 16}  # k capped by the 16 neighbours


if __name__ == "__main__":  # print the README's deviations table
    print(deviations_table())
