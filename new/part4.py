

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
            ddp = nn.parallel.DistributedDataParallel(self.student_forward, device_ids=device_ids,
                                                      find_unused_parameters=not self.do_dino)
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
        cosine = final_value + 0.5 * (base_value - final_value) * (1 + torch.cos(math.pi * iters / n))
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


class NonFiniteLoss(UserError):
    pass


def request_stop(signum, frame):
    STOP["signal"] = signal.Signals(signum).name


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
    # 3) unscale, clip each student part separately, step (the scaler skips steps with inf
    #    gradients: their scale was too large)
    model.fp16_scaler.unscale_(optimizer)
    if model.cfg.optim.clip_grad:
        for part in model.student.values():
            nn.utils.clip_grad_norm_(part.parameters(), model.cfg.optim.clip_grad)
    model.fp16_scaler.step(optimizer)
    model.fp16_scaler.update()
    # 4) teacher EMA, every iteration, also when the scaler skipped the step (as official)
    model.update_teacher(mom)
    return loss_dict


def train(cfg, device, output_dir, knn_data=None, images=None):
    """The whole pre-training run (official do_train). Returns (model, kNN results by iteration)."""
    rank, W = get_rank(), get_world_size()
    B, E = cfg.train.batch_size_per_gpu, cfg.train.OFFICIAL_EPOCH_LENGTH
    total_iters = cfg.optim.epochs * E
    apply_scaling_rules(cfg, W)
    dtype = resolve_dtype(cfg, device)
    # Deviation from official: seeds are train.seed + rank (official: always 0 + rank, never
    # train.seed); the default train.seed=0 gives the official seeds.
    seed_everything(cfg.train.seed + rank)
    print0(f"global batch {B * W} ({B} per process x {W}), lr {cfg.optim.lr:.3g} (base "
           f"{cfg.optim.base_lr} x sqrt({B * W}/1024)), {total_iters} iterations ({cfg.optim.epochs}"
           f" epochs of {E}), {str(dtype).replace('torch.', '')} on {device}")

    # ---- data, model, optimizer, schedules ----
    augmentation = DataAugmentationDINO(
        cfg.crops.global_crops_scale, cfg.crops.local_crops_scale, cfg.crops.local_crops_number,
        cfg.crops.global_crops_size, cfg.crops.local_crops_size)
    images = images or pretrain_images(cfg, output_dir)
    dataset = (ImageFolderDataset(images, augmentation) if images
               else builtin_split("train", augmentation))
    model, optimizer = build_model_and_optimizer(cfg, device, dtype)
    n_params = sum(p.numel() for p in model.student.backbone.parameters())
    print0(f"student: {cfg.student.arch}/{cfg.student.patch_size}, {n_params / 1e6:.2f}M backbone "
           f"parameters; data: {len(dataset)} images")
    schedules = build_schedulers(cfg)

    # ---- resume from the newest checkpoint in output_dir, if there is one ----
    start_iter = resume(output_dir, cfg, model, optimizer)
    data_iter = iter(make_pretrain_loader(cfg, dataset, start_iter, rank, W))
    knn_history = {}
    if start_iter == 0 and knn_data is not None:
        knn_history[0] = evaluate(cfg, model, knn_data, 0, output_dir, device)

    # ---- the training loop ----
    log = RunLog(cfg, model, output_dir, start_iter, total_iters)
    for it in range(start_iter, total_iters):
        data = log.wait_for(data_iter)  # waits only when the loader's workers are behind
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
                last_layer_lr=last_layer_lr, teacher_temp=teacher_temp)
        # 4) log, evaluate, save
        is_eval = (cfg.evaluation.eval_period_iterations
                   and done % cfg.evaluation.eval_period_iterations == 0) or done == total_iters
        is_save = done % cfg.train.checkpoint_period == 0 or done == total_iters or stop
        if done % cfg.train.log_every == 0 or is_eval or is_save:
            log.write(done)
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
            f"the last good checkpoint in '{output_dir}'. Likely causes: learning rate too high "
            f"(lower optim.base_lr), fp16 overflow (try compute_precision.dtype=bf16 or fp32), "
            f"or teacher.teacher_temp far below 0.04")


class RunLog:
    """The log line and training_metrics.json: per log step, the median of the last 20 values
    of each loss (as official MetricLogger), the schedules, speed and collapse diagnostics."""

    def __init__(self, cfg, model, output_dir, start_iter, total_iters):
        self.path = os.path.join(output_dir, "training_metrics.json")
        self.ln_K, self.B = math.log(model.dino_out_dim), cfg.train.batch_size_per_gpu
        self.window = defaultdict(lambda: deque(maxlen=20))
        self.latest, self.n_skipped, self.data_wait = {}, 0, 0.0
        self.t_last, self.it_last, self.total_iters = time.time(), start_iter, total_iters
        self.bar = tqdm(total=total_iters, initial=start_iter, disable=get_rank() != 0,
                        dynamic_ncols=True, desc="train")

    def wait_for(self, data_iter):
        t0 = time.perf_counter()
        data = next(data_iter)
        self.data_wait += time.perf_counter() - t0
        return data

    def add(self, values, n_skipped, **schedule_values):
        for k, v in values.items():
            self.window[k].append(v)
        self.latest, self.n_skipped = schedule_values, self.n_skipped + n_skipped
        self.bar.update(1)

    def write(self, iteration):
        now = time.time()
        seconds = max(now - self.t_last, 1e-9)
        m = {"iteration": iteration, **{k: statistics.median(v) for k, v in self.window.items()},
             **self.latest, "ln_K": self.ln_K, "n_skipped": self.n_skipped,
             "img_per_s": self.B * get_world_size() * (iteration - self.it_last) / seconds,
             "data_wait": self.data_wait / seconds}  # share of the time spent waiting for data
        losses = [k for k in m if k.endswith("_loss")]
        m["total_loss"] = sum(m[k] for k in losses)  # of the displayed (halved) values, as official
        self.t_last, self.it_last, self.data_wait = now, iteration, 0.0
        if get_rank() != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(m) + "\n")
        uniform = m["teacher_entropy"] > 0.95 * self.ln_K  # targets nearly uniform: collapse
        self.bar.set_postfix(loss=f"{m['total_loss']:.3f}")
        self.bar.write(
            f"it {iteration:07d}/{self.total_iters} | loss {m['total_loss']:.4f} | "
            + " ".join(f"{k.replace('_crops_loss', '').replace('_loss', '')} {m[k]:.3f}"
                       for k in losses)
            + f" | lr {m['lr']:.2e} wd {m['wd']:.3f} mom {m['mom']:.4f} t_temp {m['teacher_temp']:.4f}"
            + f" | H(t) {m['teacher_entropy']:.2f}/{self.ln_K:.2f}"
            + (" UNIFORM (collapse)" if uniform else "") + f" cls_std {m['cls_std']:.2f}"
            + f" | {m['img_per_s']:.0f} img/s, data wait {100 * m['data_wait']:.0f}%"
            + (f" | skipped {self.n_skipped}" if self.n_skipped else ""))

    def close(self):
        self.bar.close()
