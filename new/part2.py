

# -------------------------------------------------------------------------------------------------
# 3. Data (dinov2/data/augmentations.py, masking.py, collate.py, samplers.py)
# Each image becomes 2 global and L local crops; half of the global crops get a block mask for
# iBOT; the collate stacks them crop-major. An endless sharded sampler feeds every rank.
# -------------------------------------------------------------------------------------------------

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm")


class DataAugmentationDINO:
    """Two global crops and `local_crops_number` local crops of one image (DINO sec. 3.1)."""

    def __init__(self, global_crops_scale, local_crops_scale, local_crops_number,
                 global_crops_size=224, local_crops_size=96):
        self.local_crops_number = local_crops_number
        bicubic = transforms.InterpolationMode.BICUBIC
        self.geometric_augmentation_global = transforms.Compose([
            transforms.RandomResizedCrop(global_crops_size, scale=global_crops_scale,
                                         interpolation=bicubic),
            transforms.RandomHorizontalFlip(p=0.5)])
        self.geometric_augmentation_local = transforms.Compose([
            transforms.RandomResizedCrop(local_crops_size, scale=local_crops_scale,
                                         interpolation=bicubic),
            transforms.RandomHorizontalFlip(p=0.5)])
        color_jittering = transforms.Compose([
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2)])

        # Gaussian blur: the official GaussianBlur(p) wraps RandomApply(p=1 - p), so the
        # probabilities written there (1.0, 0.1, 0.5) are inverted. The released models were
        # trained with what the code did, not with what it says: no blur on global crop 1, blur
        # 90% of the time on global crop 2, 50% on local crops. We write the effective values. The
        # p=0.0 RandomApply still draws its random number, so the random stream stays aligned.
        def blur(p):
            kernel = transforms.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))
            return transforms.RandomApply([kernel], p=p)

        normalize = transforms.Compose([transforms.ToTensor(),
                                        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.global_transfo1 = transforms.Compose([color_jittering, blur(0.0), normalize])
        self.global_transfo2 = transforms.Compose([
            color_jittering, blur(0.9), transforms.RandomSolarize(threshold=128, p=0.2), normalize])
        self.local_transfo = transforms.Compose([color_jittering, blur(0.5), normalize])

    def __call__(self, image):
        global_crop_1 = self.global_transfo1(self.geometric_augmentation_global(image))
        global_crop_2 = self.global_transfo2(self.geometric_augmentation_global(image))
        local_crops = [self.local_transfo(self.geometric_augmentation_local(image))
                       for _ in range(self.local_crops_number)]
        return {"global_crops": [global_crop_1, global_crop_2],
                "global_crops_teacher": [global_crop_1, global_crop_2],  # the teacher's two views
                "local_crops": local_crops, "offsets": ()}


class MaskingGenerator:
    """Block-wise masks for iBOT (BEiT, arXiv:2106.08254): rectangles of random area and aspect
    ratio are added until the target number of patches is masked. Never masks more than that."""

    def __init__(self, input_size, max_num_patches=None, min_num_patches=4, min_aspect=0.3,
                 max_aspect=None):
        self.height, self.width = input_size
        self.max_num_patches = max_num_patches or self.height * self.width
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
    N = n_tokens
    n_samples_masked = int(B * mask_probability)
    probs = torch.linspace(*mask_ratio_tuple, n_samples_masked + 1)  # one ratio bin per mask
    upperbound = 0  # the official static size of the masked-token buffers
    masks_list = []
    for i in range(n_samples_masked):
        prob_min, prob_max = probs[i], probs[i + 1]
        masks_list.append(mask_generator(int(N * random.uniform(prob_min, prob_max))))
        upperbound += int(N * prob_max)
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
    """The image files under a folder: relative paths, and a class per file (its first-level
    sub-folder; 0 for files directly in the folder). Kept as one bytes buffer and two flat arrays,
    not as a Python list of strings: DataLoader workers are forked copies of their process, and
    merely reading a Python object writes its reference count, so a list of ImageNet's 1.28M paths
    would be copied page by page into every worker of every rank (PyTorch issue #13246)."""

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
        with open(cache + ".tmp", "w") as f:
            f.write(text)
        os.replace(cache + ".tmp", cache)
        return images

    images = share_from_rank0(make)
    where = " (its train/ folder only)" if root != cfg.train.dataset_path else ""
    print0(f"data: {len(images)} images in '{root}'{where}")
    return images


class ImageFolderDataset(torch.utils.data.Dataset):
    """The images of an ImageList through a transform. An unreadable or truncated file is skipped
    (the next image is used instead) and counted: items are (transformed, label, n_skipped)."""

    def __init__(self, images, transform):
        self.images, self.transform = images, transform

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


SHAPES = ("disk", "ring", "triangle", "square", "star", "cross", "bars", "dots", "half_disk", "ell")


class ShapesDataset(torch.utils.data.Dataset):
    """Ours: ten shape classes drawn on the fly with PIL, so `python dino_mini.py` needs no
    download: one shape at a random place and size, nearly upright, with random brightness, a
    faint tint and a blotchy background. Image i is the same on every call.
    Why nuisances only this strong: DINO learns whatever two crops of an image share. A random hue
    per image would survive the colour jitter and be the easiest thing to learn, drowning the
    shape (kNN then stays at chance); brightness and faint tints are within what the augmentations
    vary, so the shape is what the crops share."""

    def __init__(self, n_images, transform, size=48, seed=0):
        self.n_images, self.transform, self.size, self.seed = n_images, transform, size, seed
        self.classes = list(SHAPES)

    def __len__(self):
        return self.n_images

    def draw(self, index):
        """(RGB image, label, object mask as an "L" image) of image `index`."""
        rng = random.Random(self.seed * 1_000_003 + index)
        label, s = index % len(SHAPES), self.size  # balanced classes

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
        angle = rng.uniform(-0.3, 0.3)  # nearly upright: a rotation would be learned, not ignored
        c, si = math.cos(angle), math.sin(angle)

        def poly(points):  # points in units of r around the centre, rotated
            draw.polygon([(cx + r * (x * c - y * si), cy + r * (x * si + y * c))
                          for x, y in points], fill=255)

        def disk(x, y, radius, value=255):
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=value)

        def star(k):
            return 1 if k % 2 == 0 else 0.4

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
            poly([(math.cos(math.pi * k / 5 - math.pi / 2) * star(k),
                   math.sin(math.pi * k / 5 - math.pi / 2) * star(k)) for k in range(10)])
        elif shape == "cross":
            poly([(-1, -.3), (-.3, -.3), (-.3, -1), (.3, -1), (.3, -.3), (1, -.3), (1, .3),
                  (.3, .3), (.3, 1), (-.3, 1), (-.3, .3), (-1, .3)])
        elif shape == "bars":
            poly([(-1, -1), (-.4, -1), (-.4, 1), (-1, 1)])
            poly([(.4, -1), (1, -1), (1, 1), (.4, 1)])
        elif shape == "dots":
            for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6):
                disk(cx + 0.6 * r * math.cos(a + angle), cy + 0.6 * r * math.sin(a + angle),
                     0.38 * r)
        elif shape == "half_disk":
            poly([(math.cos(math.pi * k / 12), math.sin(math.pi * k / 12)) for k in range(13)])
        else:  # "ell"
            poly([(-1, -1), (-.4, -1), (-.4, .4), (1, .4), (1, 1), (-1, 1)])
        img.paste(Image.new("RGB", (s, s), tone(150, 255)), (0, 0), mask)
        return img, label, mask

    def __getitem__(self, index):
        img, label, _ = self.draw(index)
        return self.transform(img), label, 0


def builtin_split(split, transform):
    """The built-in dataset: 2000 "train" images and 500 "val" images drawn with another seed."""
    return ShapesDataset({"train": 2000, "val": 500}[split], transform,
                         seed={"train": 0, "val": 1}[split])


def make_eval_transform(crop_size):
    """Official classification eval transform: Resize(256) + CenterCrop(224), scaled to crop_size."""
    return transforms.Compose([
        transforms.Resize(round(crop_size * 256 / 224),
                          interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(crop_size), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless stream of (dataset index, sample seed) for one rank, with the official
    SHARDED_INFINITE semantics (dinov2/data/samplers.py): one permutation of the dataset seeded by
    `seed` gives each rank a fixed shard perm[rank::W] of len // W indices for the whole run, and
    the shard is reshuffled on every pass with seed + rank + (pass << 24), by torch.randperm (the
    official `_new_shuffle_tensor_slice` variant). Position p of the stream gets its own seed for
    its crops (see SeededSamples); `start` skips the first positions, so a resumed run continues
    the same stream."""

    def __init__(self, size, seed=0, rank=0, world_size=1, start=0):
        self.size, self.seed, self.rank, self.world_size, self.start = (size, seed, rank,
                                                                        world_size, start)

    def __iter__(self):
        perm = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed))
        shard = perm[self.rank::self.world_size][:self.size // self.world_size]
        n_pass, offset = divmod(self.start, len(shard))
        while True:
            g = torch.Generator().manual_seed(self.seed + self.rank + (n_pass << 24))
            order = shard[torch.randperm(len(shard), generator=g)].tolist()
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


def collate_pretrain(samples, **kwargs):
    """collate_data_and_cast under the batch's own seed (so the masks, too, depend only on the
    position in the stream), plus how many unreadable files were skipped."""
    with seeded_rng(hash((samples[0][-1], 1)) % 2 ** 63):
        batch = collate_data_and_cast(samples, **kwargs)
    batch["n_skipped"] = sum(s[2] for s in samples)
    return batch


def make_pretrain_loader(cfg, dataset, start_iter, rank, world_size):
    """Batches of B images from iteration start_iter on, for this rank (official train.py)."""
    grid = cfg.crops.global_crops_size // cfg.student.patch_size  # patches per side
    mask_generator = MaskingGenerator(input_size=(grid, grid), max_num_patches=0.5 * grid * grid)
    # Deviation from official: crops stay fp32 (autocast casts them); official collates to fp16.
    collate_fn = partial(collate_pretrain, mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
                         mask_probability=cfg.ibot.mask_sample_probability, dtype=torch.float32,
                         n_tokens=grid * grid, mask_generator=mask_generator)
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
