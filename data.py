"""
Data for BridgeTower: the RoBERTa tokenizer, image transforms, an embedded synthetic dataset of
coloured shapes, and the pre-training loader (MLM + ITM batches built on the loader workers).

Read top to bottom:
  1. Tokenizer / demo_tokenizer      byte-level BPE, same ids as transformers' RobertaTokenizerFast
  2. ImageProcessor and transforms   HF BridgeTowerImageProcessor (PIL backend) + VQA train/eval transforms
  3. make_scene / scene_caption      synthetic images whose captions can only be predicted from the pixels
  4. sources                         synthetic, COCO Karpathy json, Visual Genome regions, WebDataset tar shards
  5. build_pretrain_loader           per-worker sample streams -> batches with MLM masks and ITM negatives

python data.py --bench [sources]     prints loader images/s per worker (synthetic and JPEG tar shards);
                                     --bench --help lists its options
"""

import bisect
import glob
import hashlib
import io
import json
import math
import os
import random
import re
import sys
import tarfile
import tempfile
import time
from collections import OrderedDict

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, pre_tokenizers, processors
from tokenizers.models import BPE

# -----------------------------------------------------------------------------
# 1. Tokenizer

# RoBERTa's special tokens in RoBERTa's id order: <s>=0, <pad>=1, </s>=2, <unk>=3, then <mask>.
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


class Tokenizer:
    """RoBERTa byte-level BPE on the `tokenizers` library.

    Same input_ids and attention_mask as transformers' RobertaTokenizerFast: `<s> ... </s>`, padding with
    <pad> on the right, truncation that keeps both special tokens.
    """

    def __init__(self, backend: _HFTokenizer):
        self.backend = backend
        self.cls_id = backend.token_to_id("<s>")
        self.pad_id = backend.token_to_id("<pad>")
        self.sep_id = backend.token_to_id("</s>")
        self.unk_id = backend.token_to_id("<unk>")
        self.mask_id = backend.token_to_id("<mask>")
        if None in (self.cls_id, self.pad_id, self.sep_id, self.mask_id):
            raise ValueError("tokenizer vocabulary lacks one of the RoBERTa special tokens " + str(SPECIAL_TOKENS))
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.special_ids = sorted({backend.token_to_id(t) for t in SPECIAL_TOKENS} - {None})

    @classmethod
    def from_dir(cls, path):
        path = os.fspath(path)
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            # a full tokenizers pipeline (e.g. the roberta-base hub files): it carries its own special tokens
            return cls(_HFTokenizer.from_file(os.path.join(path, "tokenizer.json")))
        vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
        for p in (vocab, merges):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"no tokenizer.json and no {os.path.basename(p)} in {path}")
        # the pipeline transformers' RobertaTokenizer builds from vocab.json + merges.txt
        backend = _HFTokenizer(BPE.from_file(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="",
                                             fuse_unk=False))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(SPECIAL_TOKENS)
        backend.post_processor = processors.RobertaProcessing(
            ("</s>", backend.token_to_id("</s>")), ("<s>", backend.token_to_id("<s>")),
            trim_offsets=True, add_prefix_space=False)
        return cls(backend)

    def __call__(self, texts, max_length=50, padding="max_length", truncation=True):
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            return {"input_ids": torch.zeros(0, max_length, dtype=torch.long),
                    "attention_mask": torch.zeros(0, max_length, dtype=torch.long)}
        if padding is True:
            padding = "longest"
        if padding not in ("max_length", "longest"):
            raise ValueError(f"padding must be 'max_length' or 'longest', got {padding!r}")
        if truncation:
            self.backend.enable_truncation(max_length)
        else:
            self.backend.no_truncation()
        self.backend.enable_padding(pad_id=self.pad_id, pad_token="<pad>",
                                    length=max_length if padding == "max_length" else None)
        encodings = self.backend.encode_batch(list(texts))
        lengths = {len(e.ids) for e in encodings}
        if len(lengths) > 1:  # only possible without truncation: a row longer than max_length
            raise ValueError(f"texts longer than max_length={max_length} need truncation=True "
                             f"(lengths {sorted(lengths)})")
        return {"input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.long),
                "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)}

    def decode(self, ids, skip_special_tokens=False):
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _demo_corpus():
    """The synthetic captions, and more question wordings than finetune_vqa.py asks, so that each of their words
    is one BPE token (byte-level BPE still encodes any other text). Editing it changes the demo tokenizer's ids."""
    rng = random.Random(0)
    texts = []
    for _ in range(3000):
        objects = _place_objects(rng, 64)
        texts.append(scene_caption(objects, rng))
    # questions and answers about the scenes
    for color in COLORS:
        for shape in SHAPES:
            for size in SIZES:
                texts += [f"what color is the {shape}?", f"what color is the {size} {shape}?",
                          f"is the {color} {shape} on the left or the right?",
                          f"what shape is the {color} object?", f"what size is the {color} {shape}?",
                          f"is there a {color} {shape}?", f"is there a {size} {color} {shape}?",
                          f"how many {color} objects are there?", f"how many {shape}s are there?",
                          f"how many {size} objects are there?", f"where is the {color} {shape}?",
                          f"is the {shape} small or large?", f"which shape is {color}?"]
                for rel in RELATIONS:
                    texts += [f"is the {color} {shape} {rel} the {size} {shape}?",
                              f"what is {rel} the {color} {shape}?", f"what color is the shape {rel} the {shape}?"]
    texts += ["how many objects are there?", "how many shapes are in the image?", "what is in the picture?"]
    texts += ["yes", "no", "left", "right", "top", "bottom", "middle", "center"] + list(COLORS) + list(SHAPES)
    texts += [str(n) for n in range(10)] + ["zero", "one", "two", "three", "four", "five"]
    texts += [s + "s" for s in SHAPES] + list(SIZES)
    return texts


def demo_tokenizer(cache_dir="out/tokenizer"):
    """A small byte-level BPE trained on the synthetic captions and questions, cached as vocab.json + merges.txt.

    Deterministic (same corpus -> same files). An existing cache is always reused, because token ids must not
    change under a checkpoint; if it was trained on another corpus (data.py edited since), a warning says so.
    """
    from tokenizers import ByteLevelBPETokenizer
    corpus = _demo_corpus()
    stamp = hashlib.sha256("\n".join(corpus).encode()).hexdigest()[:16]
    files = [os.path.join(cache_dir, n) for n in ("vocab.json", "merges.txt", "corpus.sha")]
    if os.path.isfile(files[0]) and os.path.isfile(files[1]):
        cached_stamp = open(files[2]).read().strip() if os.path.isfile(files[2]) else None
        if cached_stamp != stamp:
            print(f"data: {cache_dir} holds a tokenizer trained on another corpus; reusing it (delete the directory "
                  "to retrain)", file=sys.stderr)
        return Tokenizer.from_dir(cache_dir)
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(corpus, vocab_size=1000, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                            show_progress=False)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache_dir)
    bpe.save_model(tmp)
    with open(os.path.join(tmp, "corpus.sha"), "w") as f:
        f.write(stamp + "\n")
    for f in files:  # rename into place: several ranks may build the cache at once and none sees half a file
        os.replace(os.path.join(tmp, os.path.basename(f)), f)
    os.rmdir(tmp)
    return Tokenizer.from_dir(cache_dir)


# -----------------------------------------------------------------------------
# 2. Images

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(img):
    """RGB, with transparency composited onto white (what transformers' convert_to_rgb does). 16-bit greyscale
    (mode I;16 or I, from PNG or TIFF) is scaled to 8 bits; a plain convert would clip it to white."""
    if img.mode.startswith("I"):
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int64) >> 8, 0, 255).astype(np.uint8), "L")
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        img = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img).convert("RGB")
    return img.convert("RGB")


def draft(img, min_w, min_h):
    """Let the JPEG decoder downscale by 2/4/8 in the DCT while keeping both sides >= the request; returns that
    scale s (1: no draft, for other formats or already-loaded images).

    Pixel (x, y) of the full image is (x / s, y / s) of the drafted one, whose sides are rounded *up* (577 px
    at s = 4 gives 145, of which 144.25 are image): take all geometry from the full size, then divide by s.
    Measured: a 1280x960 JPEG decodes 1.6x faster at half size, and the bicubic resize that follows then reads
    4x fewer pixels. The pixels differ a little from a full decode's (0.4-2 uint8 levels mean on photo-like JPEGs).
    """
    if getattr(img, "format", None) == "JPEG" and getattr(img, "tile", None):
        w = img.size[0]
        drafted = img.draft("RGB", (max(1, int(min_w)), max(1, int(min_h))))
        if drafted is not None:
            return w / drafted[1][2]  # Pillow's box: (0, 0, w / s, h / s); a power of two, so exact
    return 1


_NORM_SCALE = 1.0 / (255.0 * torch.tensor(CLIP_STD).view(3, 1, 1))
_NORM_SHIFT = torch.tensor(CLIP_MEAN).view(3, 1, 1) / torch.tensor(CLIP_STD).view(3, 1, 1)


def normalize(arr):
    """uint8 (H,W,3) -> float32 (3,H,W) = (x/255 - mean)/std, folded into one multiply-subtract.

    Channels-first is made in uint8 (a quarter of the bytes) and the arithmetic is in place: 4x faster than the
    literal formula and within 5e-7 of it.
    """
    x = torch.from_numpy(np.array(arr, dtype=np.uint8))  # a copy: arrays of PIL images are read-only
    x = x.permute(2, 0, 1).contiguous().float()
    return x.mul_(_NORM_SCALE).sub_(_NORM_SHIFT)


def _center_crop(arr, crop):
    """HF's center crop on (H,W,C) uint8: pad with zeros symmetrically if smaller, then crop at (H-c)//2."""
    h, w = arr.shape[:2]
    if h < crop or w < crop:
        new_h, new_w = max(h, crop), max(w, crop)
        canvas = np.zeros((new_h, new_w, arr.shape[2]), dtype=arr.dtype)
        top_pad, left_pad = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
        canvas[top_pad:top_pad + h, left_pad:left_pad + w] = arr
        arr, h, w = canvas, new_h, new_w
    top, left = (h - crop) // 2, (w - crop) // 2
    return arr[top:top + crop, left:left + crop]


class ImageProcessor:
    """HF BridgeTowerImageProcessor, PIL backend: shortest edge -> size (long side capped at 1333/800 of it),
    sides rounded with int(x+0.5) and floored to a multiple of size_divisor, bicubic, center crop (zero pad
    if smaller), /255, CLIP mean/std. Equal to HF to float32 rounding; never drafts, so it is exact."""

    def __init__(self, size=288, crop_size=None, size_divisor=32, do_center_crop=True, resample=Image.BICUBIC):
        self.size = size
        self.crop_size = size if crop_size is None else crop_size
        self.size_divisor = size_divisor
        self.do_center_crop = do_center_crop
        self.resample = resample

    def output_size(self, width, height):
        shorter, longer = self.size, int(1333 / 800 * self.size)
        scale = shorter / min(height, width)
        if height < width:
            new_h, new_w = shorter, scale * width
        else:
            new_h, new_w = scale * height, shorter
        if max(new_h, new_w) > longer:
            scale = longer / max(new_h, new_w)
            new_h, new_w = scale * new_h, scale * new_w
        new_h, new_w = int(new_h + 0.5), int(new_w + 0.5)
        d = self.size_divisor
        # HF raises on a side floored to 0 (aspect beyond 1333/800 at small sizes); keep one divisor instead
        return max(d, new_w // d * d), max(d, new_h // d * d)

    def process(self, img):
        img = to_rgb(img)
        img = img.resize(self.output_size(*img.size), self.resample)
        arr = np.asarray(img)
        if self.do_center_crop:
            arr = _center_crop(arr, self.crop_size)
        return normalize(arr)

    def save_pretrained(self, directory):
        """HF's preprocessor_config.json for these settings: beside a model and its tokenizer files, it lets
        transformers' BridgeTowerProcessor (and AutoProcessor) load the directory and give the same pixels."""
        config = {"image_processor_type": "BridgeTowerImageProcessor", "processor_class": "BridgeTowerProcessor",
                  "size": {"shortest_edge": self.size}, "crop_size": {"shortest_edge": self.crop_size},
                  "size_divisor": self.size_divisor, "do_center_crop": self.do_center_crop,
                  "resample": int(self.resample), "do_convert_rgb": True,
                  "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
            json.dump(config, f, indent=2)

    def __call__(self, images):
        if isinstance(images, Image.Image):
            return self.process(images)
        out = [self.process(im) for im in images]
        if len({tuple(x.shape) for x in out}) > 1:
            raise ValueError("images of different sizes (do_center_crop=False): process them one by one")
        return torch.stack(out)


def pretrain_transform(size, use_draft=True):
    """Pre-training images: shorter side -> size (bicubic), center crop, no augmentation (the original recipe)."""
    def transform(img, rng=None):
        w, h = img.size
        # the original's torchvision Resize(size) + CenterCrop(size): the longer side floored, the offsets rounded
        # (1024x683 -> 431x288, left 72; rounding the side instead moves every pixel by up to half a source pixel)
        longer = int(size * max(w, h) / min(w, h))
        resized_w, resized_h = (size, longer) if w <= h else (longer, size)
        left, top = int(round((resized_w - size) / 2)), int(round((resized_h - size) / 2))
        s = draft(img, size, size) if use_draft else 1
        # the whole image, then the crop: resizing only the crop's box loads images ~14% faster, but Pillow may then
        # run its two 8-bit passes in the other order (up to 20 uint8 levels off at hard edges on portrait images)
        img = to_rgb(img).resize((resized_w, resized_h), Image.BICUBIC, box=(0, 0, w / s, h / s))
        return normalize(np.asarray(img.crop((left, top, left + size, top + size))))
    return transform


def eval_transform(size, use_draft=True):
    """VQA evaluation: the whole image squashed to size x size (the original VQA recipe)."""
    def transform(img, rng=None):
        w, h = img.size
        s = draft(img, size, size) if use_draft else 1
        return normalize(np.asarray(to_rgb(img).resize((size, size), Image.BICUBIC, box=(0, 0, w / s, h / s))))
    return transform


def _random_resized_crop_box(w, h, scale, ratio, rng):
    """torchvision's RandomResizedCrop box sampling: area fraction in `scale`, log-uniform aspect in `ratio`."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target_area * aspect)), round(math.sqrt(target_area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return x0, y0, x0 + cw, y0 + ch
    # fallback: the whole image, clipped to the allowed aspect range
    aspect = w / h
    if aspect < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif aspect > ratio[1]:
        cw, ch = round(h * ratio[1]), h
    else:
        cw, ch = w, h
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return x0, y0, x0 + cw, y0 + ch


def _randaugment_ops(magnitude):
    """The original's RandAugment ops and strengths: BLIP's `RandomAugment` as BridgeTower's VQA transform
    (`blip_transform_randaug_wohf`) configures it, magnitude on its 0..10 scale.

    Ten ops and no colour change: no Color, Contrast, Posterize or Solarize, since VQA answers name colours.
    AutoContrast is PIL's per-channel stretch, as intended; the original's port negates a uint8 minimum, which
    wraps, so it turns every channel whose minimum is above 0 white (salesforce/LAVIS #643): not reproduced.
    Brightness and Sharpness get the factor 0.1 + 1.8 * m / 10, which is exactly 1 (no change) at the recipe's
    magnitude 5. Shear (0.3 * m / 10), rotation (30 degrees * m / 10) and translation (m pixels, whatever the
    image size) take a random sign, resample bilinearly (shifts by whole pixels: nearest, the same pixels) and fill
    with grey. There is no flip anywhere, for the same kind of reason as colour: "left of" must stay left.
    """
    m = magnitude / 10.0
    factor = 0.1 + 1.8 * m
    fill = (128, 128, 128)

    def signed(v, rng):
        return v if rng.random() < 0.5 else -v

    def affine(img, coeffs, resample=Image.BILINEAR):  # coeffs map an output pixel to the input pixel it reads
        return img.transform(img.size, Image.AFFINE, coeffs, resample=resample, fillcolor=fill)

    def enhance(kind):  # factor 1 returns the image unchanged, bit for bit: skip the work (7 ms at 576 px)
        return lambda img, rng: img if factor == 1.0 else kind(img).enhance(factor)

    # a whole-pixel shift reads pixel centres, where bilinear is nearest: the same pixels, 40x faster
    shift, shift_resample = 10 * m, (Image.NEAREST if float(10 * m).is_integer() else Image.BILINEAR)
    return {
        "Identity": lambda img, rng: img,
        "AutoContrast": lambda img, rng: ImageOps.autocontrast(img),
        "Equalize": lambda img, rng: ImageOps.equalize(img),
        "Brightness": enhance(ImageEnhance.Brightness),
        "Sharpness": enhance(ImageEnhance.Sharpness),
        "ShearX": lambda img, rng: affine(img, (1, signed(0.3 * m, rng), 0, 0, 1, 0)),
        "ShearY": lambda img, rng: affine(img, (1, 0, 0, signed(0.3 * m, rng), 1, 0)),
        "TranslateX": lambda img, rng: affine(img, (1, 0, signed(shift, rng), 0, 1, 0), shift_resample),
        "TranslateY": lambda img, rng: affine(img, (1, 0, 0, 0, 1, signed(shift, rng)), shift_resample),
        "Rotate": lambda img, rng: img.rotate(signed(30 * m, rng), resample=Image.BILINEAR, fillcolor=fill),
    }


def train_transform(size, scale=(0.5, 1.0), randaugment=(2, 5), use_draft=True):
    """VQA fine-tuning: random resized crop (bicubic) + RandAugment(n ops, magnitude), no flip.

    RandAugment as in the original: n ops drawn with replacement, each then applied with probability 1/2.

    Returns transform(img, rng=None) -> (3,size,size); pass a seeded random.Random for reproducible batches.
    """
    num_ops, magnitude = randaugment
    ops = list(_randaugment_ops(magnitude).values())
    ratio = (3 / 4, 4 / 3)
    # the smallest crop side is sqrt(scale_min * 3/4) of the image's geometric mean side: draft no lower
    draft_side = size / math.sqrt(scale[0] * ratio[0])

    def transform(img, rng=None):
        rng = rng or random
        box = _random_resized_crop_box(*img.size, scale, ratio, rng)  # on the full image: draft or not, one crop
        s = draft(img, draft_side, draft_side) if use_draft else 1
        if s == 1:  # as torchvision's RandomResizedCrop: crop, then resize (the filter sees no pixel outside)
            img = to_rgb(img).crop(box).resize((size, size), Image.BICUBIC)
        else:  # the crop falls between the drafted pixels: resize from the box
            img = to_rgb(img).resize((size, size), Image.BICUBIC, box=tuple(b / s for b in box))
        for op in [rng.choice(ops) for _ in range(num_ops)]:
            if rng.random() < 0.5:
                img = op(img, rng)
        return normalize(np.asarray(img))
    return transform


# -----------------------------------------------------------------------------
# 3. Synthetic scenes: coloured shapes whose caption can only be completed by looking at the image

COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
          "yellow": (240, 210, 20), "purple": (140, 40, 180), "orange": (250, 130, 10)}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
_SIZE_FRACTION = {"small": 0.22, "large": 0.38}  # object side / image side: both legible at 64 px


def spatial_relation(a, b):
    """Where object a is relative to object b, along the axis where their centres differ most."""
    ax, ay = (a["bbox"][0] + a["bbox"][2]) / 2, (a["bbox"][1] + a["bbox"][3]) / 2
    bx, by = (b["bbox"][0] + b["bbox"][2]) / 2, (b["bbox"][1] + b["bbox"][3]) / 2
    if abs(ax - bx) >= abs(ay - by):
        return "left of" if ax < bx else "right of"
    return "above" if ay < by else "below"


def _place_objects(rng, size, max_tries=100):
    """1-3 non-overlapping objects; the first two clearly separated along one axis so 'left of' is unambiguous."""
    n = rng.randint(1, 3)
    objects = []
    tries = 0
    while len(objects) < n and tries < max_tries:
        tries += 1
        obj_size = rng.choice(SIZES)
        side = max(4, round(_SIZE_FRACTION[obj_size] * size))
        x0, y0 = rng.randint(1, size - side - 1), rng.randint(1, size - side - 1)
        bbox = (x0, y0, x0 + side, y0 + side)
        if any(bbox[0] < o["bbox"][2] + 2 and o["bbox"][0] < bbox[2] + 2 and
               bbox[1] < o["bbox"][3] + 2 and o["bbox"][1] < bbox[3] + 2 for o in objects):
            continue
        if len(objects) == 1:
            c0 = objects[0]["bbox"]
            dx, dy = abs((c0[0] + c0[2]) - (bbox[0] + bbox[2])) / 2, abs((c0[1] + c0[3]) - (bbox[1] + bbox[3])) / 2
            if abs(dx - dy) < 0.15 * size:
                continue
        # distinct (colour, shape) pairs, so "the red circle" names one object in captions and questions
        shape, color = rng.choice([(s, c) for s in SHAPES for c in COLORS
                                   if not any(o["shape"] == s and o["color"] == c for o in objects)])
        objects.append(dict(shape=shape, color=color, size=obj_size, bbox=bbox))
    return objects


def _draw_object(draw, obj):
    x0, y0, x1, y1 = obj["bbox"]
    fill = COLORS[obj["color"]]
    if obj["shape"] == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif obj["shape"] == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif obj["shape"] == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    else:  # diamond
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        draw.polygon([(cx, y0), (x1 - 1, cy), (cx, y1 - 1), (x0, cy)], fill=fill)


def make_scene(rng, size=64):
    """(PIL RGB image size x size, objects); objects: list of dict(shape, color, size "small"/"large", bbox)."""
    objects = _place_objects(rng, size)
    grey = rng.randint(200, 245)  # a neutral background, so every colour word refers to an object
    img = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(img)
    for obj in objects:
        _draw_object(draw, obj)
    return img, objects


def _describe(obj):
    return f"a {obj['size']} {obj['color']} {obj['shape']}"


def scene_caption(objects, rng):
    """'a small red circle left of a large blue square [and a small green triangle]'.

    Every object is named, so a caption fits its own scene and (almost) no other; the first two are related
    in a random order (with the matching relation), so MLM on a colour or relation word needs the image.
    """
    if not objects:
        return "an empty picture"
    if len(objects) == 1:
        return _describe(objects[0])
    a, b = objects[0], objects[1]
    if rng.random() < 0.5:
        a, b = b, a
    caption = f"{_describe(a)} {spatial_relation(a, b)} {_describe(b)}"
    for obj in objects[2:]:
        caption += f" and {_describe(obj)}"
    return caption


# -----------------------------------------------------------------------------
# 4. Sources. A map-style source has __len__ and load(i) -> (PIL image, caption, image key), and a name;
#    PairSource also has image_path(i), for naming a sample it could not load. Tar shards are read as per-worker
#    streams (ShardSource).

SYNTHETIC_SIZES = {"train": 1_000_000, "val": 5_000, "test": 5_000}


class SyntheticSource:
    """Scenes generated on the fly from (split, index): no files, and train/val never share a seed."""

    def __init__(self, split, image_size):
        if split not in SYNTHETIC_SIZES:
            raise ValueError(f"synthetic split must be one of {list(SYNTHETIC_SIZES)}, got {split!r}")
        self.split, self.image_size, self.n = split, image_size, SYNTHETIC_SIZES[split]
        self.name = f"synthetic[{split}]"

    def __len__(self):
        return self.n

    def load(self, i):
        rng = random.Random(f"synthetic-{self.split}-{i}")  # str seeds are hashed with sha512: stable everywhere
        img, objects = make_scene(rng, self.image_size)
        return img, scene_caption(objects, rng), f"synthetic/{self.split}/{i}"


PROBED_IMAGES = 100  # image files looked for at start-up, per COCO / VG source: 100 stat calls, even on NFS
_WARNED_SOURCES = set()  # (name, root) of the sources already reported with missing images


def _spread(n, k):
    """min(n, k) indices spread evenly over range(n), the first and the last included."""
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(np.int64)).tolist()


class Packed:
    """A list of strings (rows=[str, ...]) or of number lists (rows=[[...], ...], dtype given) held in one numpy
    buffer and its row offsets, not one Python object a row: reading a Python object writes its refcount, so a
    forked loader worker that reads a list of millions of strings or dicts ends up with its own copy of the
    list's memory, while it shares these two arrays with its parent. p[i] is a str, or a numpy array."""

    def __init__(self, rows, dtype=None):
        self.text = dtype is None
        if self.text:
            rows = [r.encode("utf-8") for r in rows]
        self.offsets = np.cumsum([0] + [len(r) for r in rows], dtype=np.int64)
        if self.text:
            self.values = np.frombuffer(b"".join(rows), dtype=np.uint8) if rows else np.zeros(0, np.uint8)
        else:
            self.values = np.fromiter((x for r in rows for x in r), dtype=dtype, count=int(self.offsets[-1]))

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        row = self.values[self.offsets[i]:self.offsets[i + 1]]
        return bytes(row).decode("utf-8") if self.text else row


class PairSource:
    """(image path, caption) pairs held in numpy arrays, not a list of Python strings: with millions of VG
    regions, per-object refcounts would copy the whole list into every forked loader worker (see Packed).

    hint: appended to the start-up messages about missing images (where the images are looked for)."""

    def __init__(self, name, root, image_files, image_index, captions, hint=""):
        self.name, self.root, self.hint = name, root, hint
        self.image_files = np.array(image_files)  # unique relative paths (numpy unicode array)
        self.image_index = np.asarray(image_index, dtype=np.int64)
        self.captions = Packed(captions)
        if len(self.image_index) == 0:
            raise ValueError(f"{name}: no image-caption pairs for this split (empty source)")
        self._check_root()

    def _check_root(self):
        # A wrong image root would otherwise show up as every sample being skipped, mid-run, and a half-right one
        # (VG's root set to VG_100K: every VG_100K_2 image missing) as a growing skipped count. The probe spreads
        # over the whole list because the missing files can be any part of it, e.g. all after the first few.
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"{self.name}: image root not found: {self.root}")
        probe = [os.path.join(self.root, str(self.image_files[i]))
                 for i in _spread(len(self.image_files), PROBED_IMAGES)]
        missing = [p for p in probe if not os.path.isfile(p)]
        if len(missing) == len(probe):
            raise FileNotFoundError(f"{self.name}: none of {len(probe)} images probed across the list exist, "
                                    f"e.g. {missing[0]}{self.hint}")
        if missing and (self.name, self.root) not in _WARNED_SOURCES:  # once: validation re-reads its sources
            _WARNED_SOURCES.add((self.name, self.root))
            print(f"data: {self.name}: {len(missing)} of {len(probe)} images probed across the list are missing, "
                  f"e.g. {missing[0]}; their samples will be skipped{self.hint}", file=sys.stderr)

    def __len__(self):
        return len(self.image_index)

    def image_path(self, i):
        return os.path.join(self.root, str(self.image_files[self.image_index[i]]))

    def load(self, i):
        rel = str(self.image_files[self.image_index[i]])
        caption = self.captions[i]
        return Image.open(os.path.join(self.root, rel)), caption, f"{self.name}/{rel}"


def _read_json(path, what):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None


def _text(value):
    if not isinstance(value, str):  # a null or numeric caption would fail later, at its batch
        raise TypeError(f"caption {value!r} is not a string")
    return value


def _unique(captions):
    """An image's distinct captions, in order: the original drops repeats (ViLT's BaseDataset, remove_duplicate),
    e.g. the same VG region phrase on several boxes of one image."""
    return list(dict.fromkeys(captions))


def _malformed(path, where, record, error):
    return ValueError(f"{path}: {where} is not in the expected layout ({type(error).__name__}: {error}): "
                      f"{str(record)[:200]}")


def coco_source(json_path, root, split):
    """Karpathy dataset_coco.json: images[{filepath, filename, split, sentences[{raw}]}]; train = train + restval."""
    splits = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}.get(split)
    if splits is None:
        raise ValueError(f"COCO split must be train, val or test, got {split!r}")
    data = _read_json(json_path, "COCO Karpathy json")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f'{json_path}: expected {{"images": [...]}} (Karpathy\'s dataset_coco.json)')
    files, index, captions = [], [], []
    for i, img in enumerate(data["images"]):
        try:
            if img["split"] not in splits:
                continue
            new_captions = _unique(_text(sentence["raw"]) for sentence in img["sentences"])
            files.append(os.path.join(img.get("filepath", ""), img["filename"]))
        except (KeyError, TypeError, AttributeError) as e:
            raise _malformed(json_path, f"images[{i}]", img, e) from None
        index += [len(files) - 1] * len(new_captions)
        captions += new_captions
    return PairSource(f"coco:{json_path}[{split}]", root, files, index, captions,
                      hint=f" (image paths are {root}/<filepath>/<filename> of the json, e.g. train2014/...)")


VG_FOLDERS = ("VG_100K", "VG_100K_2")  # where the two image zips of the Visual Genome download unpack


def vg_source(json_path, root, split):
    """Visual Genome region_descriptions.json: [{id, regions[{image_id, phrase, ...}]}]; image {id}.jpg, found in
    root/VG_100K/ or root/VG_100K_2/ (the download's layout), else directly under root.

    VG has no val/test split (the original pre-training used all of it), so only split="train" reads it.
    """
    if split != "train":
        return None
    data = _read_json(json_path, "Visual Genome region_descriptions.json")
    folder_of = {name: folder for folder in VG_FOLDERS if os.path.isdir(os.path.join(root, folder))
                 for name in os.listdir(os.path.join(root, folder))}
    if not isinstance(data, list):
        raise ValueError(f"{json_path}: expected a list of images with regions (region_descriptions.json)")
    files, index, captions = [], [], []
    for i, entry in enumerate(data):
        try:
            regions = entry.get("regions", [])
            if not regions:
                continue
            image_id = entry.get("id", regions[0].get("image_id"))
            new_captions = _unique(_text(region["phrase"]) for region in regions)
        except (KeyError, TypeError, AttributeError) as e:
            raise _malformed(json_path, f"entry {i}", entry, e) from None
        name = f"{image_id}.jpg"
        files.append(f"{folder_of[name]}/{name}" if name in folder_of else name)
        index += [len(files) - 1] * len(new_captions)
        captions += new_captions
    return PairSource(f"vg:{json_path}", root, files, index, captions, hint=_vg_hint(root))


def _vg_hint(root):
    both = f"{VG_FOLDERS[0]}/ and {VG_FOLDERS[1]}/"
    if os.path.basename(os.path.normpath(root)) in VG_FOLDERS:  # an easy slip that loses the other folder's third
        return f" ({root} is one of VG's two image folders: give its parent, the folder that holds {both})"
    return f" (VG images are looked for in {both} under {root}, else in {root} itself)"


def expand_shards(pattern):
    """'dir/{00000..00099}.tar' (numeric ranges keep zero padding), '{a,b}' lists, and glob wildcards."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m:
        body = m.group(1)
        r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if r:
            width = len(r.group(1))
            choices = [str(i).zfill(width) for i in range(int(r.group(1)), int(r.group(2)) + 1)]
        else:
            choices = body.split(",")
        return [p for c in choices for p in expand_shards(pattern[:m.start()] + c + pattern[m.end():])]
    if any(ch in pattern for ch in "*?["):
        return sorted(glob.glob(pattern))
    return [pattern]


def _split_spec(spec):
    """Split 'a,b' on commas outside braces, so shard patterns may use {x,y}."""
    parts, depth, current = [], 0, ""
    for ch in spec:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _zeros_from(path, offset, chunk=1 << 20):
    with open(path, "rb") as f:
        f.seek(offset)
        while block := f.read(chunk):
            if block.count(0) != len(block):
                return False
    return True


def scan_shard(path):
    """Read only the tar headers of one shard -> (samples, error).

    samples: [(key, {ext: (data offset, size)})] grouped like webdataset (key = path up to the first dot of the
    basename). error: None, or why the shard was abandoned; the samples before the bad member are kept.
    """
    samples, error = [], None
    file_size = os.path.getsize(path)
    key, members = None, {}
    try:
        with tarfile.open(path, "r:") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                if info.offset_data + info.size > file_size:
                    raise tarfile.ReadError(f"member {info.name} runs past the end of the file")
                m = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", info.name)
                if not m:
                    continue
                if m.group(1) != key:
                    if key is not None:
                        samples.append((key, members))
                    key, members = m.group(1), {}
                members[m.group(2).lower()] = (info.offset_data, info.size)
            # tarfile ends quietly on a cut header: a complete archive ends with two zero blocks
            if file_size - tf.offset < 1024:
                raise tarfile.ReadError(f"no end-of-archive marker after {info.name if key else 'the start'}")
            # ... and on a corrupt header, or at the first of two archives joined with cat: all that follows the
            # end marker must be zeros (padding to the block size)
            if not _zeros_from(path, tf.offset):
                if key is not None:  # every member read so far is whole: keep the last sample too
                    samples.append((key, members))
                raise tarfile.ReadError(f"unreadable data after byte {tf.offset} (a corrupt header, or joined "
                                        "archives), after " + (info.name if key else "the start"))
        if key is not None:
            samples.append((key, members))
    except (tarfile.TarError, OSError, EOFError) as e:
        error = f"{type(e).__name__}: {e}"  # the sample being read when it broke is dropped: it may be partial
    return samples, error


class ShardSource:
    """WebDataset shards as written by img2dataset: {key}.jpg + {key}.txt [+ {key}.json]."""

    def __init__(self, pattern):
        self.name = f"wds:{pattern}"
        self.shards = expand_shards(pattern)
        if not self.shards:
            raise FileNotFoundError(f"{self.name}: no shard matches {pattern}")
        for p in self.shards:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{self.name}: shard not found: {p}")
        # the first shard with samples sizes the others (img2dataset writes an empty tar when every download of a
        # shard failed); none at all is an error now rather than a loader that waits forever
        errors = []
        for p in self.shards:
            samples, error = scan_shard(p)
            if samples:
                break
            errors.append(f"{p} ({error or 'empty'})")
        else:
            raise ValueError(f"{self.name}: no shard holds a sample: {'; '.join(errors[:3])}"
                             + (f" and {len(errors) - 3} more" if len(errors) > 3 else ""))
        self.estimated_len = self._estimate_len(len(samples))

    def _estimate_len(self, first_count):
        # img2dataset writes {shard}_stats.json with the sample count; otherwise assume shards like the first
        total = 0
        for p in self.shards:
            stats = os.path.splitext(p)[0] + "_stats.json"
            try:
                with open(stats) as f:
                    total += int(json.load(f)["successes"])
            except (OSError, ValueError, KeyError):
                total += first_count
        return max(1, total)


def parse_sources(spec, split, image_size):
    """'synthetic', 'wds:<pattern>', 'coco:<json>@<root>', 'vg:<json>@<root>', comma-joined -> (map sources, shards)."""
    map_sources, shard_sources = [], []
    for part in _split_spec(spec or "synthetic"):
        kind, _, arg = part.partition(":")
        if kind == "synthetic":
            map_sources.append(SyntheticSource(split, image_size))
        elif kind == "wds":
            shard_sources.append(ShardSource(arg))
        elif kind in ("coco", "vg"):
            json_path, _, root = arg.rpartition("@") if "@" in arg else (arg, "", os.path.dirname(arg))
            source = (coco_source if kind == "coco" else vg_source)(json_path, root, split)
            if source is None:
                print(f"data: {part} has no {split} split; left out", file=sys.stderr)
            else:
                map_sources.append(source)
        else:
            raise ValueError(f"unknown data source {part!r}: use synthetic, wds:<pattern>, coco:<json>@<root>, "
                             "vg:<json>@<root>")
    if not map_sources and not shard_sources:
        raise ValueError(f"data sources {spec!r} give no samples for split {split!r}")
    return map_sources, shard_sources


def validation_spec(spec):
    """The parts of a source spec that hold out a validation split of their own: synthetic (other seeds) and COCO
    (Karpathy val). Tar shards and VG have none, so they are left out: give held-out shards separately."""
    return ",".join(p for p in _split_spec(spec or "synthetic") if p.partition(":")[0] not in ("wds", "vg"))


def spec_shards(spec):
    """The tar files a source spec's wds: parts name, as real paths (to compare two specs)."""
    return {os.path.realpath(path) for part in _split_spec(spec or "") if part.startswith("wds:")
            for path in expand_shards(part[len("wds:"):])}


# -----------------------------------------------------------------------------
# 5. The pre-training loader.
#
# Every (rank, loader worker) pair is a "role" with its own deterministic stream of samples:
#   - map-style sources (synthetic, COCO, VG) form one concatenated index space; an infinite sequence of epoch
#     permutations (seeded by seed+epoch) is dealt out round-robin: role r gets positions r, r+R, r+2R, ...
#   - tar shards are dealt out the same way, one shard at a time; their samples pass a shuffle buffer.
#   - with both kinds, each slot of a role's stream draws its kind with weights proportional to their sizes.
# Role w of a rank builds that rank's batches w, w+W, w+2W, ... from consecutive slots of its stream, which is
# exactly the order torch's DataLoader reads its workers in. Resuming at batch k therefore means: each worker
# skips the slots of its earlier batches, by index arithmetic for map-style sources and for shards by their sample
# counts (ShardIndex, kept in the run directory; no image decoding, and tar headers read only for the few shards
# still in the shuffle buffer). Resume is exact for the same seed, batch_size, world_size and num_workers.

SHUFFLE_BUFFER = 2000  # tar samples (header references, not bytes) shuffled per worker
MAX_OPEN_SHARDS = 8
SKIPS_NAMED = 20  # unusable samples named on stderr per stream (rank x loader worker); see _report_skip
_NAMED_SKIPS = set()  # the samples this process has named: each validation pass meets the same ones again


def _say(line):
    # one write a line: loader workers share stderr, and print's separate write of the newline can land after
    # another worker's line where stderr is unbuffered (pytest's capture), joining two lines into one
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _seed_of(*parts):
    return random.Random("-".join(map(str, parts))).getrandbits(63)


class _MapStream:
    """Positions role, role+R, ... of the concatenated per-epoch permutations of all map-style samples."""

    def __init__(self, sources, seed, role, num_roles):
        self.sources, self.seed, self.role, self.num_roles = sources, seed, role, num_roles
        self.offsets = np.cumsum([0] + [len(s) for s in sources])
        self.n = int(self.offsets[-1])
        self.position = role
        self._epoch, self._perm = None, None

    def skip(self, count):
        self.position += count * self.num_roles

    def next(self):
        epoch, i = divmod(self.position, self.n)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        self.position += self.num_roles
        index = int(self._perm[i])
        s = bisect.bisect_right(self.offsets, index) - 1
        return ("map", s, index - int(self.offsets[s]))


class ShardIndex:
    """What one stream (role) found at each shard position it read: the shard and its sample count, so that a
    resume skips the shards consumed before it by count instead of reading their tar headers again.

    A scan reads every member's header: 0.7 s for a 10k-sample, 230 MB shard from the page cache (measured), far
    longer from a cold disk or a network file system. At step 90k of the paper's recipe (batch 4096) a stream of
    64 has consumed some 575 such shards. With the counts, a resume scans only the few shards whose samples are
    still in the shuffle buffer. Each stream appends to its own file, {index_dir}/role{role}.jsonl, one JSON
    line per shard read: {"position", "path", "size", "mtime_ns", "samples"}. Keyed by position, an entry replays
    what this stream saw there, even a scan that a read error cut short; the last line for a position wins (a
    resumed run reads again the positions its killed predecessor read past the checkpoint). An entry is used
    only while the shard's size and modification time are as they were; a missing or stale entry means a scan.
    (A shard rewritten with other samples but the same size and mtime is caught only if it is one of those
    rescanned and now holds fewer samples; otherwise the resumed stream is off by the difference in count,
    reading the same data in a slightly shifted order.) An index that cannot be read or written costs only time:
    the run goes on without it.
    """

    def __init__(self, index_dir, role):
        self.index_dir, self.file = index_dir, os.path.join(index_dir, f"role{role}.jsonl")
        self.seen = {}  # shard position -> (real path, size, mtime_ns, samples)
        self.broken = False
        self._tail_checked = False

    @staticmethod
    def stamp(path):
        """(real path, size, mtime_ns), or None for a shard that cannot be stat'ed (its scan reports why)."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        return os.path.realpath(path), st.st_size, st.st_mtime_ns

    def load(self):
        try:
            with open(self.file, encoding="utf-8", errors="replace") as f:
                lines = f.readlines()
        except FileNotFoundError:
            return
        except OSError as e:
            _say(f"data: shard index {self.file} not read ({e}); skipping to the resume point by reading tar headers")
            return
        for line in lines:
            try:
                e = json.loads(line)
                self.seen[int(e["position"])] = (e["path"], e["size"], e["mtime_ns"], int(e["samples"]))
            except (ValueError, KeyError, TypeError, OverflowError):
                continue  # the last line of a killed run's file may be cut short

    def count(self, position, path):
        """The sample count this stream found at this position, if that shard is unchanged since, else None."""
        entry = self.seen.get(position)
        return entry[3] if entry is not None and entry[:3] == self.stamp(path) else None

    def record(self, position, stamp, samples):
        """stamp: taken before the scan, so that a shard rewritten during it does not pair new stamp, old count."""
        if self.broken or stamp is None or self.seen.get(position) == stamp + (samples,):
            return
        try:
            os.makedirs(self.index_dir, exist_ok=True)
            line = json.dumps({"position": position, "path": stamp[0], "size": stamp[1], "mtime_ns": stamp[2],
                               "samples": samples}) + "\n"
            if not self._tail_checked:  # a kill may have cut the last line: end it, or this one would join it
                self._tail_checked = True
                with open(self.file, "ab+") as f:
                    size = f.seek(0, os.SEEK_END)
                    f.seek(max(size - 1, 0))
                    if size and f.read(1) != b"\n":
                        line = "\n" + line
            with open(self.file, "a", encoding="utf-8") as f:  # one short write a line: a kill cuts at most one
                f.write(line)
            self.seen[position] = stamp + (samples,)
        except OSError as e:
            self.broken = True
            _say(f"data: shard index {self.file} not written ({e}); a resume will read tar headers instead")


class _ShardStream:
    """Samples of shards role, role+R, ... of the per-epoch shard orders, through a shuffle buffer.

    The buffer holds header references (shard, key, member offsets), so skipping to a resume point reads no image
    bytes. With a ShardIndex that knows the consumed shards' sample counts, the skip reads no tar headers either:
    it runs on placeholders (shard, sample number, count), then scans only the shards of those left over.
    """

    def __init__(self, shards, seed, role, num_roles, counters, index=None):
        self.shards, self.seed, self.role, self.num_roles = shards, seed, role, num_roles
        self.counters, self.index = counters, index
        self.distinct = len(set(shards))
        self._start()

    def _start(self):
        self.shard_position = self.role
        self.pending = []  # samples of the current shard, reversed, not yet in the buffer
        self.empty = set()  # shards found to hold no readable sample
        self.buffer = []
        self.rng = random.Random(f"buffer-{self.seed}-{self.role}")
        self._epoch, self._order = None, None
        self._by_count = False  # skipping on placeholders

    def _next_sample(self):
        while not self.pending:
            if len(self.empty) == self.distinct:  # distinct: a shard listed twice would otherwise loop forever
                raise RuntimeError(f"none of the {self.distinct} shards has a readable sample any more")
            position = self.shard_position
            epoch, i = divmod(position, len(self.shards))
            self.shard_position += self.num_roles
            if epoch != self._epoch:
                self._epoch = epoch
                self._order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(self.shards))
            path = self.shards[int(self._order[i])]
            count = self.index.count(position, path) if self._by_count else None
            if count is not None:
                self.pending = [(path, n, count) for n in reversed(range(count))]
                if not count:
                    self.empty.add(path)
                continue
            stamp = self.index.stamp(path) if self.index is not None else None
            samples, error = scan_shard(path)
            if self.index is not None:
                self.index.record(position, stamp, len(samples))
            if error:
                self.counters["skipped"] += 1
                _say(f"data: shard {path} abandoned after {len(samples)} samples: {error}")
            if not samples:
                self.empty.add(path)
            self.pending = [(path, key, members) for key, members in reversed(samples)]
        return self.pending.pop()

    def next(self):
        # webdataset's warm-up: the buffer grows by one per sample taken until full, so batch 0 need not wait
        for _ in range(2 if len(self.buffer) < SHUFFLE_BUFFER else 1):
            self.buffer.append(self._next_sample())
        i = self.rng.randrange(len(self.buffer))
        self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
        return ("tar",) + self.buffer.pop()

    def skip(self, count):
        if self.index is not None:
            self.index.load()  # also with nothing to skip: a known position's scan is then not written again
            if count:
                self._by_count = True
                try:
                    for _ in range(count):
                        self.next()
                finally:
                    self._by_count = False
                if self._resolve_placeholders():
                    return
                self._start()  # a shard changed under an unchanged size and mtime: skip again the slow way
        for _ in range(count):
            self.next()

    def _resolve_placeholders(self):
        """Turn the placeholders left in the buffer and the current shard into header references, scanning only
        their shards. False if a shard now holds fewer samples than it was indexed with. (More is fine: the index
        may hold a scan a read error cut short, and the samples before the error are the same.)"""
        scanned = {}
        for path, _, count in {ref for ref in self.buffer + self.pending if type(ref[1]) is int}:
            if path not in scanned:
                scanned[path], _ = scan_shard(path)
            if len(scanned[path]) < count:
                _say(f"data: shard {path} holds {len(scanned[path])} samples, its index entry says {count}; "
                     "skipping to the resume point by reading tar headers")
                return False

        def resolve(ref):
            return (ref[0],) + scanned[ref[0]][ref[1]] if type(ref[1]) is int else ref
        self.buffer = [resolve(r) for r in self.buffer]
        self.pending = [resolve(r) for r in self.pending]
        return True


class _BadSample(ValueError):
    """A sample that decodes but cannot be used (no image, no caption)."""


class _PretrainStream(torch.utils.data.IterableDataset):
    """Yields finished batches. Everything after sample selection (decode, transform, tokenize, MLM masking,
    ITM negatives) happens here, on the loader workers."""

    def __init__(self, map_sources, shard_sources, tokenizer, *, image_size, batch_size, max_text_len, mlm_prob,
                 itm_neg_prob, rank, world_size, seed, start_batch, shard_index_dir=None):
        super().__init__()
        self.map_sources = map_sources
        self.shards = [p for s in shard_sources for p in s.shards]
        # for ITM negatives (a shard listed by two sources is read by both and named after the last)
        self.source_of_shard = {p: s.name for s in shard_sources for p in s.shards}
        map_len = sum(len(s) for s in map_sources)
        shard_len = sum(s.estimated_len for s in shard_sources)
        self.map_weight = map_len / (map_len + shard_len)
        self.tokenizer, self.transform = tokenizer, pretrain_transform(image_size)
        self.batch_size, self.max_text_len = batch_size, max_text_len
        self.mlm_prob, self.itm_neg_prob = mlm_prob, itm_neg_prob
        self.rank, self.world_size, self.seed, self.start_batch = rank, world_size, seed, start_batch
        self.shard_index_dir = shard_index_dir
        self._last_error = None
        self._skips_named = 0
        special = torch.zeros(tokenizer.vocab_size, dtype=torch.bool)
        special[tokenizer.special_ids] = True
        self.is_special = special
        self.random_token_ids = torch.nonzero(~special).flatten()  # MLM's random replacements are real words

    # -- sample streams

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # DataLoader reads worker 0 first; on a resume at batch k, worker 0 must play the role that owns batch k
        role_in_rank = (self.start_batch + worker) % num_workers
        role = self.rank * num_workers + role_in_rank
        num_roles = self.world_size * num_workers
        counters = {"skipped": 0}
        streams = {}
        if self.map_sources:
            streams["map"] = _MapStream(self.map_sources, self.seed, role, num_roles)
        if self.shards:
            index = ShardIndex(self.shard_index_dir, role) if self.shard_index_dir else None
            streams["tar"] = _ShardStream(self.shards, self.seed, role, num_roles, counters, index)
        chooser = random.Random(f"mix-{self.seed}-{role}")
        # slots this role filled before the resume point: its batches role_in_rank, +W, ... below start_batch
        batches_before = max(0, -(-(self.start_batch - role_in_rank) // num_workers))
        kinds = [self._choose(chooser) for _ in range(batches_before * self.batch_size)]
        for kind, stream in streams.items():
            stream.skip(kinds.count(kind))
        counters["skipped"] = 0  # problems met while skipping were counted by the run that made those batches
        batch_index = role_in_rank + batches_before * num_workers
        open_files = OrderedDict()  # a few recently used shards, for reading the members the buffer hands out
        while True:
            refs = [streams[self._choose(chooser)].next() for _ in range(self.batch_size)]
            batch = self._make_batch(refs, batch_index, streams, chooser, counters, open_files)
            yield batch
            batch_index += num_workers

    def _choose(self, chooser):
        if self.map_weight in (0.0, 1.0):
            return "map" if self.map_weight == 1.0 else "tar"
        return "map" if chooser.random() < self.map_weight else "tar"

    # -- loading one sample; any failure means "bad sample", never a crash

    def _load(self, ref, open_files):
        if ref[0] == "map":
            _, s, i = ref
            img, caption, key = self.map_sources[s].load(i)
            source = self.map_sources[s].name
        else:
            _, path, key, members = ref
            f = open_files.get(path)
            if f is None:
                f = open_files[path] = open(path, "rb")
                if len(open_files) > MAX_OPEN_SHARDS:
                    open_files.popitem(last=False)[1].close()
            open_files.move_to_end(path)

            def read(ext):
                offset, size = members[ext]
                f.seek(offset)
                return f.read(size)
            image_ext = next((e for e in _IMAGE_EXTS if e in members), None)
            if image_ext is None:
                raise _BadSample(f"no image member (it has .{', .'.join(sorted(members))})")
            caption = read("txt").decode("utf-8", errors="replace") if "txt" in members else ""
            if not caption.strip():
                raise _BadSample("no caption (.txt member missing or empty)")
            img, key = Image.open(io.BytesIO(read(image_ext))), f"{path}/{key}"
            source = self.source_of_shard[path]
        caption = caption.strip()
        if not caption:
            raise _BadSample("empty caption")
        return self.transform(img), caption, key, source

    def _try_load(self, ref, open_files):
        try:
            return self._load(ref, open_files)
        except Exception as e:  # corrupt/missing image: any decoder error must not stop a run
            name = self._sample_name(ref)
            self._last_error = f"{name}: {type(e).__name__}: {e}"
            self._report_skip(name)
            return None

    def _sample_name(self, ref):
        if ref[0] == "tar":
            return f"{ref[1]}/{ref[2]}"
        source = self.map_sources[ref[1]]
        path = getattr(source, "image_path", None)  # the synthetic scenes have no file
        return f"{source.name} sample {ref[2]}" + (f" ({path(ref[2])})" if path else "")

    def _report_skip(self, name):
        # Named so the user can find the file, but only the first SKIPS_NAMED per stream: enough to see a pattern
        # (every missing file in one folder) and a few corrupt files, while a source broken throughout prints
        # SKIPS_NAMED lines per rank and worker instead of one per sample of a million-sample epoch. A budget
        # shared by all streams would need a counter across processes; the skipped count covers the rest.
        # A sample named before in this process (the validation loader, built anew each pass in the main
        # process, or a second epoch) is not named again.
        if name in _NAMED_SKIPS:
            return
        self._skips_named += 1
        if self._skips_named <= SKIPS_NAMED:
            _NAMED_SKIPS.add(name)
            _say(f"data: skipped {self._last_error}")
        if self._skips_named == SKIPS_NAMED:
            info = torch.utils.data.get_worker_info()
            stream = f"rank {self.rank}" + (f" loader worker {info.id}" if info else "")
            _say(f"data: {stream} has named {SKIPS_NAMED} unusable samples; its further ones are only counted "
                 "(the log's skipped)")

    def _make_batch(self, refs, batch_index, streams, chooser, counters, open_files):
        samples = [self._try_load(ref, open_files) for ref in refs]
        skipped = sum(s is None for s in samples)
        while all(s is None for s in samples):
            # a batch with no usable sample at all borrows the next ones (the only case resume cannot replay)
            if skipped >= len(samples) + 1000:
                raise RuntimeError(f"{skipped} samples in a row are unusable; last error: {self._last_error}")
            samples[-1] = self._try_load(streams[self._choose(chooser)].next(), open_files)
            skipped += samples[-1] is None
        rng = random.Random(_seed_of("batch", self.seed, self.rank, batch_index))
        good = [s for s in samples if s is not None]
        # bad slots repeat a good sample of the same batch: batch shapes and the stream positions stay fixed,
        # which is what makes a resumed run replay exactly
        samples = [s if s is not None else rng.choice(good) for s in samples]
        batch = self._collate(samples, rng)
        batch["skipped"] = skipped + counters["skipped"]  # unusable samples, and 1 per abandoned shard
        counters["skipped"] = 0
        return batch

    # -- collate: tokenize, MLM masking, ITM negatives

    def _collate(self, samples, rng):
        images, captions, keys, sources = zip(*samples)
        text = self.tokenizer(list(captions), max_length=self.max_text_len, padding="max_length", truncation=True)
        g = torch.Generator().manual_seed(rng.getrandbits(63))
        mlm_input_ids, mlm_labels = mask_tokens(text["input_ids"], text["attention_mask"], self.is_special,
                                                self.random_token_ids, self.tokenizer.mask_id, self.mlm_prob, g)
        itm_image_index, itm_labels = itm_negatives(keys, captions, self.itm_neg_prob, g, sources)
        pixel_values = None
        if torch.utils.data.get_worker_info() is not None:
            # stack straight into shared memory, as torch's default_collate does: the batch then crosses to the
            # main process without another copy
            storage = torch.UntypedStorage._new_shared(len(images) * images[0].nbytes)
            pixel_values = torch.empty(0).set_(storage).view(len(images), *images[0].shape)
        return {"pixel_values": torch.stack(images, out=pixel_values), "input_ids": text["input_ids"],
                "attention_mask": text["attention_mask"], "mlm_input_ids": mlm_input_ids, "mlm_labels": mlm_labels,
                "itm_image_index": itm_image_index, "itm_labels": itm_labels}


def mask_tokens(input_ids, attention_mask, is_special, random_token_ids, mask_id, mlm_prob, generator):
    """BERT masking: each non-special, non-pad token is chosen with mlm_prob; of those 80% -> <mask>,
    10% -> a random non-special token, 10% kept. Labels are -100 where nothing is predicted."""
    candidates = (attention_mask == 1) & ~is_special[input_ids]
    chosen = (torch.rand(input_ids.shape, generator=generator) < mlm_prob) & candidates
    if not chosen.any() and candidates.any():
        # one predicted token, so the MLM loss of this batch is defined (not a 0/0 NaN)
        flat = torch.nonzero(candidates.flatten()).flatten()
        chosen.view(-1)[flat[torch.randint(len(flat), (1,), generator=generator)]] = True
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    u = torch.rand(input_ids.shape, generator=generator)
    to_mask = chosen & (u < 0.8)
    to_random = chosen & (u >= 0.8) & (u < 0.9)
    random_ids = random_token_ids[torch.randint(len(random_token_ids), input_ids.shape, generator=generator)]
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


def itm_negatives(image_keys, captions, neg_prob, generator, sources=None):
    """round(B * neg_prob) rows get the image of a random other row (label 0); the rest keep their own.

    A row is only a negative for another image *and* another caption: two COCO captions of one image, or two
    synthetic scenes with the same description, would otherwise be "negatives" that actually match.
    With `sources` (each row's data set), the other row comes from the same data set where the batch has one,
    else from any: the original draws the negative image from the sample's own data set, and a VG region phrase
    against a CC photo is an easier negative than against another VG image.
    """
    b = len(image_keys)
    sources = sources or [None] * b
    index = torch.arange(b)
    labels = torch.ones(b, dtype=torch.long)
    for i in torch.randperm(b, generator=generator)[:round(b * neg_prob)].tolist():
        others = [j for j in range(b) if image_keys[j] != image_keys[i] and captions[j] != captions[i]]
        others = [j for j in others if sources[j] == sources[i]] or others
        if others:
            index[i] = others[int(torch.randint(len(others), (1,), generator=generator))]
            labels[i] = 0
    return index, labels


class PretrainLoader:
    """Infinite iterator over pre-training batches (the stream itself starts at the resume point)."""

    def __init__(self, dataset, num_workers, pin_memory=False):
        # batch_size=None: the workers already yield whole batches; pinned memory speeds the host-to-GPU copy.
        # A private generator: otherwise the DataLoader draws its worker seed from torch's global RNG when its
        # iterator starts, which shifts the training's dropout masks after a resume (our streams seed themselves).
        self.dataloader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
            prefetch_factor=4 if num_workers > 0 else None, generator=torch.Generator())
        self._it = None

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            self._it = iter(self.dataloader)
        return next(self._it)


def build_pretrain_loader(sources="synthetic", tokenizer=None, *, split="train", image_size=288, batch_size=32,
                          max_text_len=50, mlm_prob=0.15, itm_neg_prob=0.5, rank=0, world_size=1, num_workers=0,
                          seed=0, start_batch=0, pin_memory=False, shard_index_dir=None):
    """Infinite MLM + ITM batches (see the block comment above for how streams, ranks and resume work).
    pin_memory: page-locked batches, for training on a GPU (not on a CPU: it would start CUDA for nothing).
    shard_index_dir: where the streams keep their tar shards' sample counts (ShardIndex), for a fast resume; the
    training run's directory, so that the run resumed from it finds them. None: no index (a resume reads headers).

    All paths are checked here, before training starts: a missing file or an empty source raises, naming it.
    """
    if tokenizer is None:
        raise ValueError("build_pretrain_loader needs a tokenizer (e.g. demo_tokenizer())")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    map_sources, shard_sources = parse_sources(sources, split, image_size)
    num_roles = world_size * max(1, num_workers)
    shard_count = sum(len(s.shards) for s in shard_sources)
    if shard_count and shard_count < num_roles:
        print(f"data: {shard_count} shards for {num_roles} rank x worker streams: some streams share shards",
              file=sys.stderr)
    # forked workers cannot use the tokenizers thread pool; saying so up front silences its fork warning
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    dataset = _PretrainStream(map_sources, shard_sources, tokenizer, image_size=image_size, batch_size=batch_size,
                              max_text_len=max_text_len, mlm_prob=mlm_prob, itm_neg_prob=itm_neg_prob, rank=rank,
                              world_size=world_size, seed=seed, start_batch=start_batch,
                              shard_index_dir=shard_index_dir)
    return PretrainLoader(dataset, num_workers, pin_memory)


# -----------------------------------------------------------------------------
# Benchmark: python data.py --bench [sources] [--image_size=288] [--batch_size=32] [--batches=10]

def write_demo_shards(out_dir, num_shards=2, per_shard=64, image_hw=(480, 640), seed=0):
    """JPEG tar shards in img2dataset's layout (COCO-like 640x480 photos of synthetic scenes)."""
    rng = random.Random(seed)
    paths = []
    for s in range(num_shards):
        path = os.path.join(out_dir, f"{s:05d}.tar")
        with tarfile.open(path, "w") as tf:
            for i in range(per_shard):
                img, objects = make_scene(rng, 128)
                img = img.resize(image_hw[::-1], Image.BICUBIC)
                noise = np.random.default_rng(s * per_shard + i).integers(-12, 13, (*image_hw, 3))
                img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                key = f"{s:05d}{i:04d}"
                for name, data in ((f"{key}.jpg", buf.getvalue()), (f"{key}.txt", scene_caption(objects, rng).encode()),
                                   (f"{key}.json", json.dumps({"key": key}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def _bench(argv):
    import argparse
    parser = argparse.ArgumentParser(prog="python data.py --bench", description="images/s of one pre-training "
                                     "loader worker on the synthetic set, on JPEG tar shards made here, and on SOURCES")
    parser.add_argument("sources", nargs="*", help="more --data specs to time, e.g. coco:dataset_coco.json@coco")
    parser.add_argument("--image_size", type=int, default=288)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=10, help="timed batches a source (after one warm-up batch)")
    args = parser.parse_args(argv)  # an unknown option or a bad number is an error that names it
    image_size, batch_size, batches, extra = args.image_size, args.batch_size, args.batches, args.sources
    torch.set_num_threads(1)  # a loader worker is one process with one thread
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = demo_tokenizer(os.path.join(tmp, "tokenizer"))
        write_demo_shards(tmp, num_shards=2, per_shard=max(64, batch_size * (batches + 2) // 2))
        specs = ["synthetic", f"wds:{tmp}/{{00000..00001}}.tar"] + extra
        print(f"images/s of ONE loader worker (decode + transform + collate), image_size {image_size}, "
              f"batch {batch_size}; tar shards hold 640x480 JPEGs (quality 90)")
        for spec in specs:
            loader = build_pretrain_loader(spec, tokenizer, image_size=image_size, batch_size=batch_size, num_workers=0)
            next(loader)  # warm-up: shard header scan, shuffle buffer fill
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(batches):
                next(loader)
            # CPU seconds too: on a shared machine the wall clock mostly measures the neighbours
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            n = batches * batch_size
            print(f"  {spec[:50]:<50} {n / wall:8.1f} images/s wall   {n / cpu:8.1f} images per CPU second")


if __name__ == "__main__":
    if "--bench" in sys.argv:
        _bench([a for a in sys.argv[1:] if a != "--bench"])
    else:
        print(__doc__)
        if len(sys.argv) > 1 and sys.argv[1:] not in (["-h"], ["--help"]):
            sys.exit(f"data.py: unknown arguments {sys.argv[1:]}: only --bench runs something")
