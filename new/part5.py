

# =================================================================================================
# The machinery around the story: checkpoints, evaluation, pictures, benchmark, command line.
# =================================================================================================

# -------------------------------------------------------------------------------------------------
# 10. Checkpoints (official: fvcore PeriodicCheckpointer, FSDPCheckpointer, do_test's dumps)
# One rank-0 file per save, written to a temporary name and renamed, so a kill at any moment leaves
# the previous file whole; running the same command again resumes from the newest complete file.
# -------------------------------------------------------------------------------------------------

CKPT_GLOB = "model_*.pth"
RUNTIME_KEYS = {"train.num_workers", "train.log_every", "train.output_dir", "train.compile",
                "train.checkpoint_period", "train.keep_checkpoints", "optim.lr"}  # may change


def atomic_save(obj, path):
    """torch.save to path.tmp, flush to disk, then rename: readers see the old file or the new."""
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


def check_resume_config(ckpt_cfg, cfg, output_dir):
    """Refuse to resume a run whose settings differ from the command's; say how to start fresh."""
    old, new = flat_keys(ckpt_cfg), flat_keys(cfg)
    diff = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new
            if k not in RUNTIME_KEYS and not k.startswith("evaluation.") and old.get(k) != new[k]]
    if diff:
        raise UserError(f"the checkpoint in '{output_dir}' was made with another config "
                        f"({'; '.join(diff[:4])}{'; ...' if len(diff) > 4 else ''}); use the same "
                        f"settings to resume, or a new --output-dir (or delete its model_*.pth) "
                        f"to start fresh")


def resume(output_dir, cfg, model, optimizer):
    """Load the newest checkpoint of output_dir into the model, optimizer, grad scaler and this
    rank's random generators. Returns the iteration to continue from (0 without a checkpoint)."""
    path, ckpt = load_latest_checkpoint(output_dir)
    if ckpt is None:
        return 0
    check_resume_config(ckpt["config"], cfg, output_dir)
    model.load_state_dict(ckpt["model"], strict=True)
    optimizer.load_state_dict(ckpt["optimizer"])
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
    """The official teacher dump, eval/training_<i>/teacher_checkpoint.pth ({"teacher": backbone
    and heads}; i is the index of the last iteration run, 12499 after 12500 iterations, as
    official), and the latest teacher backbone alone, teacher_backbone.pth, in the key layout of
    Meta's released backbones."""
    if get_rank() != 0:
        return
    folder = os.path.join(output_dir, "eval", f"training_{iteration - 1}")
    os.makedirs(folder, exist_ok=True)
    atomic_save({"teacher": model.teacher.state_dict()},
                os.path.join(folder, "teacher_checkpoint.pth"))
    atomic_save(model.teacher.backbone.state_dict(), os.path.join(output_dir,
                                                                  "teacher_backbone.pth"))


def read_backbone_state(path):
    """The ViT backbone state dict in a weights file: Meta's released backbones (a bare state
    dict), our teacher_backbone.pth, our full checkpoints, official teacher dumps ({"teacher":
    ...}, chunked block keys included). One clear error for anything else."""
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
        dim = state["pos_embed"].shape[-1]
        raise UserError(
            f"'{path}' does not fit student.arch with embed_dim {backbone.embed_dim}, "
            f"{backbone.n_blocks} blocks, patch {backbone.patch_size}, "
            f"{backbone.num_register_tokens} registers (found a {dim}-dim model; missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}, wrong shapes {shape_bad[:3]}). Set "
            f"student.arch / patch_size / num_register_tokens / ffn_layer to match the file")
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
# 11. Evaluation (dinov2/eval/knn.py)
# A kNN classifier on frozen, L2-normalised teacher cls features (cosine similarity, the top-k
# neighbours vote with weights softmax(sim / 0.07)) tells whether the features learn while the
# run goes. Official runs it as a separate script on the teacher dumps; we run it in the loop.
# -------------------------------------------------------------------------------------------------


@torch.no_grad()
def extract_features(backbone, dataset, device, batch_size=256, autocast_ctx=None,
                     num_workers=0, patch_tokens=False, pixels=False, desc=None):
    """{"cls": (n, D) L2-normalised final-norm cls tokens (the official eval feature), "labels":
    (n,)} for every item of `dataset`, plus "patch" tokens (n, N, D) or the "pixels" (at most
    32 x 32 per image) if asked. Under torchrun each rank encodes every W-th item and the pieces
    are gathered, so every rank ends with all features, in dataset order."""
    rank, W = get_rank(), get_world_size()
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), W))
    loader = torch.utils.data.DataLoader(shard, batch_size=batch_size, num_workers=num_workers,
                                         generator=torch.Generator())
    out = defaultdict(list)
    for images, labels, _ in tqdm(loader, desc=desc, disable=desc is None or rank != 0):
        images = images.to(device, non_blocking=True)
        with autocast_ctx or contextlib.nullcontext():
            f = backbone.forward_features(images)
        out["cls"].append(F.normalize(f["x_norm_clstoken"].float(), dim=-1))
        out["labels"].append(torch.as_tensor(labels, device=device))
        if patch_tokens:
            out["patch"].append(F.normalize(f["x_norm_patchtokens"].float(), dim=-1))
        if pixels:
            small = F.adaptive_avg_pool2d(images.float(), min(32, images.shape[-1]))
            out["pixels"].append(small.flatten(1))  # (b, 3 x 32 x 32)
    out = {k: torch.cat(v) for k, v in out.items()}
    if W > 1:  # pad the shards to one length, gather, then interleave back to dataset order
        n_max = math.ceil(len(dataset) / W)
        for k, v in out.items():
            v = torch.cat([v, v.new_zeros(n_max - len(v), *v.shape[1:])])
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
    n = len(test_labels)
    return {k: (100.0 * c1 / n, 100.0 * c5 / n) for k, (c1, c5) in correct.items()}


def class_balanced(labels, n_per_class, seed=0):
    """Indices of at most n_per_class random items of each class (all of them for 0), sorted."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    taken, keep = defaultdict(int), []
    for i in order:
        if n_per_class == 0 or taken[labels[i]] < n_per_class:
            taken[labels[i]] += 1
            keep.append(i)
    return sorted(keep)


def make_knn_data(cfg, images=None):
    """(neighbours, queries) for the kNN monitor, or None when there are no labels:
    1. the labelled folders evaluation.knn_train_dataset and knn_val_dataset, when set;
    2. without --data, the built-in dataset's train and val splits;
    3. --data DIR in ImageNet's layout: DIR/val's class folders as queries, DIR/train neighbours;
    4. else, when the pre-training folder has class sub-folders, a fixed held-out split of it:
       20% as queries (pre-training still sees them, without labels), the rest as neighbours.
    Neighbours: at most evaluation.knn_n_per_class per class; queries: at most knn_max_images."""
    ev, eval_t = cfg.evaluation, make_eval_transform(cfg.crops.global_crops_size)
    if ev.knn_train_dataset or ev.knn_val_dataset:
        if not (ev.knn_train_dataset and ev.knn_val_dataset):
            raise UserError("set both evaluation.knn_train_dataset and evaluation.knn_val_dataset")
        train = ImageFolderDataset(share_from_rank0(lambda: scan_images(ev.knn_train_dataset)),
                                   eval_t)
        val = ImageFolderDataset(share_from_rank0(lambda: scan_images(ev.knn_val_dataset)), eval_t)
        train_idx, val_idx = range(len(train)), range(len(val))
    elif not cfg.train.dataset_path:
        train, val = builtin_split("train", eval_t), builtin_split("val", eval_t)
        train_idx, val_idx = range(len(train)), range(len(val))
    else:
        images = images or pretrain_images(cfg, cfg.train.output_dir)
        train = ImageFolderDataset(images, eval_t)
        _, val_root = data_folders(cfg.train.dataset_path)
        val_images = share_from_rank0(lambda: scan_images(val_root)) if val_root else None
        if val_images is not None and len(val_images.classes) >= 2:
            if val_images.classes != images.classes:
                raise UserError(f"the class folders of '{val_root}' and of the train folder differ")
            val, train_idx, val_idx = ImageFolderDataset(val_images, eval_t), range(len(train)), \
                range(len(val_images))
        elif len(images.classes) >= 2:
            if val_root:
                print0(f"kNN monitor: '{val_root}' has no class folders (the raw ILSVRC val "
                       f"tarball?), so a held-out part of the train folder serves as queries")
            perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).tolist()
            n_val = len(images) // 5
            val, val_idx, train_idx = train, sorted(perm[:n_val]), sorted(perm[n_val:])
        else:
            print0("kNN monitor: off (no class sub-folders, so no labels to evaluate with)")
            return None
    train_labels = [train.images.labels[i] if isinstance(train, ImageFolderDataset)
                    else i % len(SHAPES) for i in train_idx]
    train_idx = [train_idx[j] for j in class_balanced(train_labels, ev.knn_n_per_class)]
    if ev.knn_max_images and len(val_idx) > ev.knn_max_images:
        val_idx = [val_idx[j] for j in class_balanced([0] * len(val_idx), ev.knn_max_images)]
    print0(f"kNN monitor: {len(train_idx)} neighbours, {len(val_idx)} queries")
    return torch.utils.data.Subset(train, train_idx), torch.utils.data.Subset(val, val_idx)


@torch.no_grad()
def attention_on_objects(backbone, cfg, device, n_images=200):
    """Ours, for the built-in data, whose object masks are known: the share of the last block's
    cls attention (mean over heads, over the patches) that falls on the object's patches, and the
    share of the patches the object covers. Attention blind to the content scores the latter."""
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
    """At iteration 0, every evaluation.eval_period_iterations and at the end: kNN on the teacher
    (and, at 0, on raw pixels), where the teacher's cls token looks (built-in data), one line of
    eval.jsonl, and a teacher snapshot. Returns the kNN results {k: (top1, top5)} or None."""
    teacher, row, results = model.teacher.backbone, {"iteration": iteration}, None
    if knn_data is not None:
        (train_set, val_set), bs = knn_data, cfg.evaluation.knn_batch_size
        kw = dict(batch_size=bs, autocast_ctx=model.autocast_ctx, pixels=iteration == 0,
                  num_workers=min(cfg.train.num_workers, 8))
        train_f, val_f = (extract_features(teacher, s, device, **kw) for s in (train_set, val_set))
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
