

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
    """Per-channel residual scale gamma (CaiT), initialised small so deep nets start near identity."""

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
        self.start_center_update(torch.sum(teacher_output, dim=0, keepdim=True), len(teacher_output))


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
