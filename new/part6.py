

# -------------------------------------------------------------------------------------------------
# 12. Pictures and features (ours; the PCA pictures follow the DINOv2 paper's figure 1)
# -------------------------------------------------------------------------------------------------


def pca_rgb(patch_tokens, grid):
    """The first three principal components of (N, D) patch features as an RGB image (3, h, w).
    Patches whose first component falls below half its range are background (black); the colours
    come from a second PCA of the foreground patches alone, as in the DINOv2 paper's figures."""
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
    """For each (name, PIL image) write <name>_pca.png (image | PCA of the patch features) and
    <name>_attn.png (image | mean attention | one map per head): the last block's attention from
    the cls token to the patches, registers skipped. Tiles are shown at 224 px or more."""
    backbone.eval()
    p, R, written = backbone.patch_size, backbone.num_register_tokens, []
    transform = make_eval_transform(image_size)
    std, mean = (torch.tensor(v, device=device).view(3, 1, 1) for v in (IMAGENET_STD, IMAGENET_MEAN))
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


def demo_pictures(backbone, cfg, output_dir, device):
    """After a run on the built-in data: what the teacher learned, on four val images."""
    shapes = builtin_split("val", None)
    images = [(f"demo_{SHAPES[i]}", shapes.draw(i)[0]) for i in range(4)]
    return visualize(backbone, images, output_dir, cfg.crops.global_crops_size, device)


def cmd_extract_features(args, device):
    """--extract-features DIR: L2-normalised cls (and patch) features of every image of DIR."""
    if not args.out:
        raise UserError("--extract-features needs --out FILE.pt")
    backbone = backbone_from_file(inference_weights(args)).to(device)
    size = args.image_size or 224
    if size % backbone.patch_size:
        raise UserError(f"--image-size {size} is not a multiple of the patch size "
                        f"{backbone.patch_size}")
    images = scan_images(args.extract_features)
    feats = extract_features(backbone, ImageFolderDataset(images, make_eval_transform(size)),
                             device, batch_size=64, patch_tokens=args.patch_features,
                             num_workers=min(4, os.cpu_count() or 1), desc="features")
    result = {"paths": [images.relpath(i) for i in range(len(images))], "cls": feats["cls"].cpu()}
    if args.patch_features:
        result["patch"] = feats["patch"].cpu()
    atomic_save(result, args.out)
    print(f"wrote {len(images)} features of dim {result['cls'].shape[1]} to {args.out}")


def cmd_visualize(args, device):
    for path in args.visualize:
        if not os.path.isfile(path):
            raise UserError(f"image '{path}' not found")
    backbone = backbone_from_file(inference_weights(args)).to(device)
    out_dir = args.output_dir or os.path.dirname(os.path.abspath(args.visualize[0]))
    os.makedirs(out_dir, exist_ok=True)
    size = (args.image_size or 224) // backbone.patch_size * backbone.patch_size
    images = [(os.path.splitext(os.path.basename(q))[0], load_rgb(q)) for q in args.visualize]
    for f in visualize(backbone, images, out_dir, size, device):
        print(f"wrote {f}")


def inference_weights(args):
    """--pretrained FILE, or the teacher_backbone.pth of the run in --output-dir."""
    if args.pretrained:
        return args.pretrained
    if args.output_dir and os.path.isfile(os.path.join(args.output_dir, "teacher_backbone.pth")):
        return os.path.join(args.output_dir, "teacher_backbone.pth")
    raise UserError("give --pretrained FILE, or --output-dir of a run with a teacher_backbone.pth")


# -------------------------------------------------------------------------------------------------
# 13. Benchmark (ours): the FLOPs of a step counted from the config, the real train step timed on
# synthetic batches, and the data pipeline timed alone. README "Speed" holds the measured numbers.
# -------------------------------------------------------------------------------------------------


def vit_flops(cfg, n_images, img_size):
    """Forward FLOPs of the backbone on n_images of img_size (a multiply-add counts 2)."""
    D, depth, _ = VIT_SIZES[cfg.student.arch]
    p = cfg.student.patch_size
    N = (img_size // p) ** 2
    T = 1 + cfg.student.num_register_tokens + N  # tokens per image
    mlp = cfg.student.ffn_layer == "mlp"
    h = 4 * D if mlp else (int(4 * D * 2 / 3) + 7) // 8 * 8
    ffn = 2 * T * D * h * (2 if mlp else 3)  # fc1 + fc2, or w12 (2h) + w3
    block = 2 * T * D * 3 * D + 2 * 2 * T * T * D + 2 * T * D * D + ffn  # qkv, attention, proj
    return n_images * (2 * N * 3 * p * p * D + depth * block)


def head_flops(cfg, n_tokens, section="dino"):
    c = cfg[section]
    D = VIT_SIZES[cfg.student.arch][0]
    mlp = (D * c.head_hidden_dim + c.head_hidden_dim ** 2 * max(c.head_nlayers - 2, 0)
           + c.head_hidden_dim * c.head_bottleneck_dim)
    return 2 * n_tokens * (mlp + c.head_bottleneck_dim * c.head_n_prototypes)


def step_flops(cfg, B, n_masked):
    """Model FLOPs of one step on one process: teacher forward, student forward + backward (3x)."""
    G, L = cfg.crops.global_crops_size, cfg.crops.local_crops_size
    n_loc = cfg.crops.local_crops_number * B
    patch_section = "ibot" if cfg.ibot.separate_head else "dino"
    patches = head_flops(cfg, n_masked, patch_section) if cfg.ibot.loss_weight > 0 else 0
    teacher = vit_flops(cfg, 2 * B, G) + head_flops(cfg, 2 * B) + patches
    student = vit_flops(cfg, 2 * B, G) + vit_flops(cfg, n_loc, L) + head_flops(cfg, 2 * B + n_loc)
    return teacher + 3 * (student + patches)


def measure_peak_flops(device, dtype, reps=10):
    """FLOP/s of a large square matmul in this dtype: the achievable peak utilisation refers to
    (8192 on a GPU, so that each product takes milliseconds and launch overheads vanish)."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def peak_rss_gib():
    """Peak resident memory of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** (30 if sys.platform ==
                                                                      "darwin" else 20)


def benchmark(cfg, device, warmup=3, iters=10):
    """The real train_step on a synthetic in-memory batch: speed, where the time goes (teacher
    forward, then student forward + backward, then clipping + AdamW + EMA, each timed again on
    its own), peak memory, FLOPs and utilisation; the same again as one JSON line `result: {}`."""
    dtype = resolve_dtype(cfg, device)
    B, W = cfg.train.batch_size_per_gpu, get_world_size()
    apply_scaling_rules(cfg, W)
    model, optimizer = build_model_and_optimizer(cfg, device, dtype)
    G, L, p = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.student.patch_size
    crops = [({"global_crops": [torch.randn(3, G, G) for _ in range(2)],
               "local_crops": [torch.randn(3, L, L) for _ in range(cfg.crops.local_crops_number)]},
              0) for _ in range(B)]
    batch = collate_data_and_cast(crops, tuple(cfg.ibot.mask_ratio_min_max),
                                  cfg.ibot.mask_sample_probability, torch.float32, (G // p) ** 2,
                                  MaskingGenerator((G // p, G // p), 0.5 * (G // p) ** 2))
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    def teacher_forward():
        with torch.no_grad(), model.autocast_ctx:
            cls = model.teacher.backbone(batch["collated_global_crops"])
            model.teacher.dino_head(cls)

    times = defaultdict(float)
    for i in range(warmup + iters):
        if i == warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step = timed(lambda: train_step(model, optimizer, batch, lr=cfg.optim.lr, wd=0.04,
                                        mom=0.994, teacher_temp=0.04, last_layer_lr=cfg.optim.lr))
        teacher = timed(teacher_forward)
        forward_backward = timed(lambda: model.forward_backward(batch, teacher_temp=0.04))
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times["step"] += step / iters
            times["teacher"] += teacher / iters
            times["student_fwd_bwd"] += max(forward_backward - teacher, 0) / iters
            times["optimizer_ema"] += max(step - forward_backward, 0) / iters
    flops, peak = step_flops(cfg, B, int(batch["n_masked_patches"])), measure_peak_flops(device,
                                                                                        dtype)
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else peak_rss_gib()
    result = {"arch": f"{cfg.student.arch}/{p}", "batch_per_process": B, "processes": W,
              "device": str(device), "dtype": str(dtype).replace("torch.", ""),
              "compile": cfg.train.compile, "images_per_s": B / times["step"],
              **{f"{k}_s": v for k, v in times.items()}, "peak_memory_gib": mem, "flops": flops,
              "peak_flops": peak, "mfu": flops / times["step"] / peak}
    print0(f"benchmark: {result['arch']}, batch {B} per process x {W}, {G}/{L} px crops, "
           f"{result['dtype']} on {device}, compile {cfg.train.compile}")
    print0(f"images/s: {B / times['step']:.1f} per process, {B * W / times['step']:.1f} total")
    print0("time per step: " + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in times.items()))
    print0(f"peak memory: {mem:.2f} GiB "
           f"({'CUDA max allocated' if device.type == 'cuda' else 'process RSS'})")
    print0(f"model FLOPs per step: {flops / 1e9:.1f} GFLOP; achieved "
           f"{flops / times['step'] / 1e12:.3f} TFLOP/s; matmul peak in {result['dtype']} "
           f"{peak / 1e12:.3f} TFLOP/s; utilisation {100 * result['mfu']:.1f}%")
    print0("result: " + json.dumps(result))
    return result


def benchmark_data(cfg, path, batches=20):
    """Images/s through decoding, the 2 + L crops and the collate, with train.num_workers workers."""
    augmentation = DataAugmentationDINO(
        cfg.crops.global_crops_scale, cfg.crops.local_crops_scale, cfg.crops.local_crops_number,
        cfg.crops.global_crops_size, cfg.crops.local_crops_size)
    dataset = ImageFolderDataset(scan_images(path), augmentation)
    it = iter(make_pretrain_loader(cfg, dataset, 0, 0, 1))
    next(it)  # start the workers
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * cfg.train.batch_size_per_gpu / (time.perf_counter() - t0)
    print(f"data: {rate:.1f} images/s with train.num_workers={cfg.train.num_workers} "
          f"({rate / max(cfg.train.num_workers, 1):.1f} per worker), {cfg.crops.global_crops_size}/"
          f"{cfg.crops.local_crops_size} px, 2 + {cfg.crops.local_crops_number} crops")
    return rate


# -------------------------------------------------------------------------------------------------
# 14. Command line: training by default; --visualize, --extract-features, --benchmark(-data)
# -------------------------------------------------------------------------------------------------


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one clear line instead of argparse's usage dump
        raise UserError(f"{message} (see --help)")


def build_parser():
    p = ArgumentParser(prog="dino_mini", description="DINOv2 self-supervised pre-training.",
                       epilog="Any config key can be set as section.key=value, e.g. optim.epochs=10 "
                              "train.batch_size_per_gpu=32 (keys and defaults: top of dino_mini.py).")
    p.add_argument("--config", help="preset from configs.json (default: demo without --data, "
                                    "default with it)")
    p.add_argument("--data", help="folder of images, searched recursively; with a train/ folder "
                                  "(ImageNet's layout) only train/ (default: built-in shapes)")
    p.add_argument("--output-dir", help="checkpoints, metrics, pictures (default: train.output_dir)")
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
        return benchmark_data(cfg, args.benchmark_data) and 0
    if args.extract_features:
        return cmd_extract_features(args, device) or 0
    if args.visualize:
        return cmd_visualize(args, device) or 0
    if args.benchmark:
        _, _, device = setup_distributed()
        try:
            benchmark(cfg, device)
        finally:
            cleanup_distributed()
        return 0

    # ---- training: check what can be checked before any work ----
    output_dir = cfg.train.output_dir = args.output_dir or cfg.train.output_dir
    try:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, ".write_test"), "w"):
            pass
        os.remove(os.path.join(output_dir, ".write_test"))
    except OSError as e:
        raise UserError(f"output dir '{output_dir}' is not writable ({e.strerror})") from None
    if cfg.student.pretrained_weights and not os.path.isfile(cfg.student.pretrained_weights):
        raise UserError(f"pretrained weights '{cfg.student.pretrained_weights}' not found")
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
            if len(knn) >= 2:
                first, last = min(knn), max(knn)
                k = 20 if 20 in knn[first] else min(knn[first])
                print0(f"kNN top-1 (k={k}): {knn[first][k][0]:.1f}% at iteration {first} -> "
                       f"{knn[last][k][0]:.1f}% at iteration {last}")
            if not cfg.train.dataset_path and rank == 0:
                for f in demo_pictures(model.teacher.backbone, cfg, output_dir, device):
                    print0(f"wrote {f}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
