"""
BridgeTower (Xu et al., AAAI 2023) in one file: a RoBERTa text encoder and a CLIP ViT image encoder whose
top layers feed, through "bridge" layers, a cross-modal encoder of two BERT-style streams.

Read top to bottom:
  1. BridgeTowerConfig           every number that changes the math, with presets tiny / base / large
  2. attention, add_layer_norm   the two hot spots; both go through bridge_kernels' dispatcher (Triton or
                                 PyTorch: see bridge_kernels.backend and AUTO_TRITON)
  3. modules                     RoBERTa, CLIP ViT, cross layers, bridges, heads; named after the Hugging Face
                                 keys, so that an HF checkpoint loads by stripping the `bridgetower.` prefix
  4. BridgeTower                 the forward schedule and the heads (MLM, ITM, ITC, VQA)
  5. checkpoints                 HF directories, original Lightning .ckpt, RoBERTa / CLIP initialisation,
                                 save_pretrained in the HF layout

The math follows transformers' BridgeTowerModel (the parity target, see tests/test_model.py) and the original
microsoft/BridgeTower code where HF has no equivalent (VQA head, eps 1e-12 of the original cross layers).
"""

import json
import math
import os
import pickle
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from bridge_kernels import BACKENDS, LINK_TYPES, bridge_add_layer_norm, bridge_attention

# -----------------------------------------------------------------------------
# 1. Configuration

HEADS = ("mlm", "itm", "itc", "vqa")


@dataclass
class BridgeTowerConfig:
    # text encoder (RoBERTa). As in HF, its sizes also build the cross-modal layers.
    vocab_size: int = 50265               # BPE vocabulary of the tokenizer (RoBERTa: 50265)
    max_position_embeddings: int = 514    # RoBERTa position table: 512 tokens + 2 (positions start at pad + 1)
    pad_token_id: int = 1                 # RoBERTa <pad>; pads get position pad, real tokens count up from pad + 1
    hidden_size: int = 768                # width of the text encoder and of both cross-modal streams
    num_heads: int = 12                   # attention heads of the text and cross-modal layers
    intermediate_size: int = 3072         # FFN width of the text and cross-modal layers
    text_layers: int = 12                 # RoBERTa layers; the top `cross_layers` feed the cross-modal encoder
    # image encoder (CLIP ViT); its heads are vision_width // 64, as CLIP fixes them
    vision_width: int = 768               # CLIP transformer width
    vision_layers: int = 12               # CLIP blocks; block i runs beside text layer i (blocks >= text_layers idle)
    patch_size: int = 16                  # patch side = conv kernel = stride
    image_size: int = 288                 # square input side; (image_size / patch_size)^2 + 1 image tokens
    # cross-modal encoder
    cross_layers: int = 6                 # layers per stream, each fed by one of the top cross_layers uni-modal layers
    link_tower_type: str = "add"          # bridge: "add" LN(h+c), "scaled_add" LN(s*h+c), "interpolate" LN((1-b)h+bc)
    share_cross_modal_transform: bool = True  # one input projection per modality for all cross layers (HF's
    #                                           share_cross_modal_transformer_layers); False: one per cross layer
    layer_norm_eps: float = 1e-5          # text encoder, CLIP, first cross inputs, bridges, VQA head
    cross_layer_norm_eps: float = 1e-5    # cross-modal layers and MLM transform: HF uses 1e-5, the original code 1e-12
    hidden_dropout: float = 0.1           # text embeddings and every dense sub-layer of text/cross layers (CLIP: none)
    attention_dropout: float = 0.1        # on the attention probabilities of text and cross layers
    # heads
    heads: tuple = ("mlm", "itm")         # heads built: any of "mlm", "itm", "itc", "vqa"
    num_vqa_answers: int = 3129           # VQA answer vocabulary (VQAv2: answers seen >= 9 times)
    contrastive_hidden_size: int = 512    # ITC embedding size
    logit_scale_init: float = 2.6592      # ITC: initial log inverse temperature, exp(2.6592) = 1/0.07
    # runtime
    kernels: str = "auto"                 # "auto" | "triton" | "torch"; env BRIDGETOWER_KERNELS wins (bridge_kernels)

    def __post_init__(self):
        self.heads = tuple(self.heads)  # a list when read back from JSON
        problems = []
        if not set(self.heads) <= set(HEADS):
            problems.append(f"heads {self.heads} not a subset of {HEADS}")
        sizes = ("vocab_size", "max_position_embeddings", "hidden_size", "num_heads", "intermediate_size",
                 "text_layers", "vision_width", "vision_layers", "patch_size", "image_size", "cross_layers",
                 "num_vqa_answers", "contrastive_hidden_size")
        problems += [f"{name} {getattr(self, name)} not positive" for name in sizes if getattr(self, name) <= 0]
        if problems:  # before the divisibility checks below
            raise ValueError("BridgeTowerConfig: " + "; ".join(problems))
        if not (0 <= self.hidden_dropout < 1 and 0 <= self.attention_dropout < 1):
            problems.append(f"dropouts {self.hidden_dropout}, {self.attention_dropout} not in [0, 1)")
        if self.link_tower_type not in LINK_TYPES:
            problems.append(f"link_tower_type {self.link_tower_type!r} not one of {tuple(LINK_TYPES)}")
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} not a multiple of num_heads {self.num_heads}")
        if self.vision_width < 64 or self.vision_width % self.vision_heads:  # CLIP's rule, HF's too
            problems.append(f"vision_width {self.vision_width}: CLIP blocks have vision_width // 64 heads, which must "
                            "be at least 1 and divide the width")
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} not a multiple of patch_size {self.patch_size}")
        if not 1 <= self.cross_layers <= self.text_layers <= self.vision_layers:
            problems.append(f"need 1 <= cross_layers ({self.cross_layers}) <= text_layers ({self.text_layers}) "
                            f"<= vision_layers ({self.vision_layers})")
        if "itc" in self.heads and not self.share_cross_modal_transform:
            # HF's ITC image embedding goes through the shared image transform; HF crashes without one
            problems.append("the itc head needs share_cross_modal_transform=True")
        if self.kernels not in BACKENDS:
            problems.append(f"kernels {self.kernels!r} not one of {BACKENDS}")
        if problems:
            raise ValueError("BridgeTowerConfig: " + "; ".join(problems))

    @property
    def vision_heads(self):  # as OpenAI's CLIP and HF's BridgeTowerVisionModel: width 768 -> 12, 96 -> 1 head of 96
        return self.vision_width // 64

    @property
    def image_grid(self):
        return self.image_size // self.patch_size

    @classmethod
    def preset(cls, name, **overrides):
        """tiny (tests, demos), base (RoBERTa-base + CLIP ViT-B/16, 288 px), large (RoBERTa-large + ViT-L/14, 294 px)"""
        presets = {
            "tiny": dict(hidden_size=128, num_heads=4, intermediate_size=256, text_layers=4, vision_width=128,
                         vision_layers=4, cross_layers=2, patch_size=16, image_size=64),
            "base": dict(),
            "large": dict(hidden_size=1024, num_heads=16, intermediate_size=4096, text_layers=24, vision_width=1024,
                          vision_layers=24, patch_size=14, image_size=294),
        }
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
        return cls(**{**presets[name], **overrides})


# -----------------------------------------------------------------------------
# 2. The two hot spots: attention (every layer) and add_layer_norm (each post-LN residual of the text and cross
#    layers, and the bridges; CLIP's pre-LN blocks use plain nn.LayerNorm). bridge_kernels decides Triton (CUDA,
#    sm_80+, where AUTO_TRITON allows) or PyTorch: F.scaled_dot_product_attention with a boolean key mask, and
#    F.layer_norm(h + c).
#    (bridge_kernels.attention and .add_layer_norm, by contrast, always run the Triton kernels.)

def attention(q, k, v, key_mask=None, dropout_p=0.0, kernels="auto"):
    """softmax(q k^T / sqrt(d)) v for q (B,H,Lq,d), k/v (B,H,Lk,d). key_mask (B,Lk) bool, True = attend, or None
    when nothing is padded. Masked keys get probability 0, as HF's additive finfo.min mask gives."""
    return bridge_attention(q, k, v, key_mask, dropout_p, requested=kernels)


def add_layer_norm(h, c, norm, link_type="add", scalar=None, kernels="auto"):
    """norm(h + c), norm(s*h + c) or norm((1-s)*h + s*c): the post-LN residuals of text and cross layers
    (h = sub-layer output, c = residual) and the bridges (h = uni-modal input, c = cross-modal output)."""
    return bridge_add_layer_norm(h, c, norm.weight, norm.bias, norm.eps, link_type, scalar, requested=kernels)


def split_heads(x, num_heads):
    """(B, L, D) -> (B, heads, L, D / heads), a view"""
    B, L, D = x.shape
    return x.view(B, L, num_heads, D // num_heads).transpose(1, 2)


def merge_heads(x):
    """(B, heads, L, d) -> (B, L, heads * d)"""
    B, H, L, d = x.shape
    return x.transpose(1, 2).reshape(B, L, H * d)


def attention_probs(mha, x, key_mask):
    """The self-attention probabilities (B, heads, L, L) that MultiHeadAttention `mha` computes over x, before
    dropout, worked out again from its weights: the fused kernels never form them (output_attentions only)."""
    q, k = split_heads(mha.query(x), mha.num_heads), split_heads(mha.key(x), mha.num_heads)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return scores.softmax(-1)


# -----------------------------------------------------------------------------
# 3. Modules. Class names are ours; attribute names are the HF keys.

class TextEmbeddings(nn.Module):
    """RoBERTa embeddings: word + token type 0 + position, LayerNorm, dropout."""

    def __init__(self, config):
        super().__init__()
        H = config.hidden_size
        self.pad_token_id = config.pad_token_id
        self.word_embeddings = nn.Embedding(config.vocab_size, H, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, H, padding_idx=config.pad_token_id)
        self.token_type_embeddings = nn.Embedding(1, H)  # one row: RoBERTa has no segments
        self.LayerNorm = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.dropout = config.hidden_dropout

    def forward(self, input_ids):
        # RoBERTa (fairseq) positions: real tokens count up from pad+1, pads sit at pad, mid-sequence pads do
        # not advance the count
        real = input_ids.ne(self.pad_token_id).long()
        positions = torch.cumsum(real, dim=1) * real + self.pad_token_id
        x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]
        x = self.LayerNorm(x + self.position_embeddings(positions))
        return F.dropout(x, self.dropout, self.training)


class MultiHeadAttention(nn.Module):
    """BERT attention projections (HF `attention.self` / `crossattention.self`): queries from x, keys and
    values from `other` (x itself for self-attention). Three separate matmuls: packing q/k/v into one matmul
    was measured no faster on CPU at these sizes (and a cat of the weights per call costs more)."""

    def __init__(self, config):
        super().__init__()
        H = config.hidden_size
        self.query, self.key, self.value = nn.Linear(H, H), nn.Linear(H, H), nn.Linear(H, H)
        self.num_heads = config.num_heads
        self.dropout = config.attention_dropout
        self.kernels = config.kernels

    def forward(self, x, other, key_mask):
        q = split_heads(self.query(x), self.num_heads)
        k = split_heads(self.key(other), self.num_heads)
        v = split_heads(self.value(other), self.num_heads)
        p = self.dropout if self.training else 0.0
        return merge_heads(attention(q, k, v, key_mask, p, self.kernels))


class DenseAddNorm(nn.Module):
    """BERT post-LN output of a sub-layer: LayerNorm(dropout(dense(h)) + residual).
    HF `attention.output`, `crossattention.output` and `output`."""

    def __init__(self, config, in_features, eps):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.dropout = config.hidden_dropout
        self.kernels = config.kernels

    def forward(self, h, residual):
        h = F.dropout(self.dense(h), self.dropout, self.training)
        return add_layer_norm(h, residual, self.LayerNorm, kernels=self.kernels)


class Attention(nn.Module):
    """HF `attention` / `crossattention`: multi-head attention, then its post-LN output."""

    def __init__(self, config, eps):
        super().__init__()
        self.self = MultiHeadAttention(config)
        self.output = DenseAddNorm(config, config.hidden_size, eps)

    def forward(self, x, other, key_mask):
        return self.output(self.self(x, other, key_mask), x)


class Intermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))  # exact (erf) GELU, as RoBERTa and BERT


class TextLayer(nn.Module):
    """RoBERTa layer (post-LN): self-attention, FFN."""

    def __init__(self, config, eps):
        super().__init__()
        self.attention = Attention(config, eps)
        self.intermediate = Intermediate(config)
        self.output = DenseAddNorm(config, config.intermediate_size, eps)

    def forward(self, x, key_mask):
        a = self.attention(x, x, key_mask)
        return self.output(self.intermediate(a), a)


class CrossLayer(TextLayer):
    """Cross-modal layer (HF BridgeTowerBertCrossLayer), post-LN: a = LN(x + SelfAttn(x)),
    c = LN(a + CrossAttn(q=a, kv=other)), y = LN(c + FFN(c)). `other` is the other stream's input to this same
    layer, not its output. self_mask masks its own keys, other_mask the other's."""

    def __init__(self, config):
        super().__init__(config, config.cross_layer_norm_eps)
        self.crossattention = Attention(config, config.cross_layer_norm_eps)

    def forward(self, x, other, self_mask, other_mask):
        a = self.attention(x, x, self_mask)
        c = self.crossattention(a, other, other_mask)
        return self.output(self.intermediate(c), c)


class VisionEmbeddings(nn.Module):
    """CLIP: bias-free patch conv, class token, learned positions."""

    def __init__(self, config):
        super().__init__()
        W, P = config.vision_width, config.patch_size
        self.image_size = config.image_size
        self.class_embedding = nn.Parameter(torch.zeros(W))
        self.patch_embedding = nn.Conv2d(3, W, kernel_size=P, stride=P, bias=False)
        self.position_embedding = nn.Embedding(config.image_grid ** 2 + 1, W)

    def forward(self, pixel_values):
        if pixel_values.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"pixel_values are {tuple(pixel_values.shape[-2:])}, the model takes "
                             f"{self.image_size}x{self.image_size}; load it with image_size=... to resize its "
                             "position table")
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, W, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (B, grid * grid, W): one token a patch
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight


class PackedAttention(nn.Module):
    """CLIP self-attention with nn.MultiheadAttention's parameter names (packed q,k,v `in_proj_weight`), run
    batch-first, so no sequence-first permutes."""

    def __init__(self, width, num_heads, kernels):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        self.kernels = kernels

    def forward(self, x):
        B, L, W = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        # each (B, heads, L, d): strided views of the packed projection, no copy
        q, k, v = qkv.view(B, L, 3, self.num_heads, W // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.out_proj(merge_heads(attention(q, k, v, None, 0.0, self.kernels)))  # images are never masked


class MLP(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        h = self.c_fc(x)
        return self.c_proj(h * torch.sigmoid(1.702 * h))  # CLIP's quick_gelu


class ResidualAttentionBlock(nn.Module):
    """CLIP block (pre-LN, no dropout)."""

    def __init__(self, config):
        super().__init__()
        W, eps = config.vision_width, config.layer_norm_eps
        self.attn = PackedAttention(W, config.vision_heads, config.kernels)
        self.ln_1 = nn.LayerNorm(W, eps=eps)
        self.mlp = MLP(W)
        self.ln_2 = nn.LayerNorm(W, eps=eps)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    """HF `vision_model.visual`. ln_post is shared by every block output that feeds the cross-modal encoder.
    No forward: BridgeTower.encode_image runs the blocks and taps the top ones for the cross layers."""

    def __init__(self, config):
        super().__init__()
        W, eps = config.vision_width, config.layer_norm_eps
        self.embeddings = VisionEmbeddings(config)
        self.ln_pre = nn.LayerNorm(W, eps=eps)
        self.transformer = nn.ModuleDict(dict(
            resblocks=nn.ModuleList([ResidualAttentionBlock(config) for _ in range(config.vision_layers)])))
        self.ln_post = nn.LayerNorm(W, eps=eps)


class LinkTower(nn.Module):
    """Bridge into cross layer k >= 1, one per stream and layer: h = W·(uni-modal layer output, ln_post'ed
    for images) + the modality's type embedding, c = this stream's output of cross layer k-1.
    add: LN(h + c) (the released models'); scaled_add: LN(s·h + c), s from 1; interpolate: LN((1-b)·h + b·c),
    b from 0.5."""

    def __init__(self, config):
        super().__init__()
        self.link_type = config.link_tower_type
        self.kernels = config.kernels
        if self.link_type == "scaled_add":
            self.scaled_factor = nn.Parameter(torch.tensor(1.0))
        elif self.link_type == "interpolate":
            self.beta = nn.Parameter(torch.tensor(0.5))
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, h, c):
        scalar = (self.scaled_factor if self.link_type == "scaled_add" else
                  self.beta if self.link_type == "interpolate" else None)
        return add_layer_norm(h, c, self.LayerNorm, self.link_type, scalar, self.kernels)


class Pooler(nn.Module):
    def __init__(self, hidden_size):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, x):
        return torch.tanh(self.dense(x[:, 0]))


class MLMHead(nn.Module):
    """HF `mlm_score`: dense, GELU, LayerNorm, decoder (not tied to the word embeddings) + separate bias."""

    def __init__(self, config):
        super().__init__()
        H = config.hidden_size
        self.transform = nn.ModuleDict(dict(dense=nn.Linear(H, H),
                                            LayerNorm=nn.LayerNorm(H, eps=config.cross_layer_norm_eps)))
        self.decoder = nn.Linear(H, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x):
        x = self.transform.LayerNorm(F.gelu(self.transform.dense(x)))
        return self.decoder(x) + self.bias


class LinearHead(nn.Module):
    """One Linear under the name `fc` (HF's ITM and ITC heads)."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.fc = nn.Linear(in_features, out_features)

    def forward(self, x):
        return self.fc(x)


def vqa_classifier(config):
    """The original VQA head (task_head_layers=2, head_hidden_scale=2): keys vqa_classifier.{0,1,3}."""
    H2 = 2 * config.hidden_size
    return nn.Sequential(nn.Linear(H2, 2 * H2), nn.LayerNorm(2 * H2, eps=config.layer_norm_eps), nn.GELU(),
                         nn.Linear(2 * H2, config.num_vqa_answers))


def contrastive_loss(text_embeds, image_embeds, cross_embeds, logit_scale):
    """HF BridgeTowerForContrastiveLearning's loss: the mean of three one-directional (row-wise) cross-entropies,
    text->image, text->cross, image->cross, over exp(logit_scale)-scaled cosine similarities; pair i matches i.
    logit_scale is the model's parameter (a log), the embeddings are L2-normalised (B, contrastive_hidden_size)."""
    scale = logit_scale.exp()
    labels = torch.arange(text_embeds.shape[0], device=text_embeds.device)
    pairs = ((text_embeds, image_embeds), (text_embeds, cross_embeds), (image_embeds, cross_embeds))
    return sum(F.cross_entropy(a @ b.t() * scale, labels) for a, b in pairs) / 3.0


@dataclass
class BridgeTowerOutput:
    text_features: torch.Tensor                    # (B, T, H) output of the last text-side cross layer
    image_features: Optional[torch.Tensor] = None  # (B, L, H) last image-side cross layer; None when only "mlm" ran
    pooler_output: Optional[torch.Tensor] = None   # (B, 2H) [tanh(P_t·text CLS) | tanh(P_i·image CLS)]; None as above
    mlm_logits: Optional[torch.Tensor] = None      # (B, T, V), or (N, V) at mlm_positions
    itm_logits: Optional[torch.Tensor] = None      # (B, 2), class 1 = match
    text_embeds: Optional[torch.Tensor] = None     # (B, contrastive_hidden_size) ITC, L2-normalised
    image_embeds: Optional[torch.Tensor] = None    # (B, contrastive_hidden_size) ITC
    cross_embeds: Optional[torch.Tensor] = None    # (B, contrastive_hidden_size) ITC
    vqa_logits: Optional[torch.Tensor] = None      # (B, num_vqa_answers)
    # output_hidden_states=True: (text, image, cross) as HF's, all batch-first (HF's image entries are (L, B, D)):
    # text: the embeddings, then each text layer (B, T, H); image: ln_pre's output, then each block that runs
    # (B, L, W), before ln_post; cross: (text, image) after each cross layer
    hidden_states: Optional[tuple] = None
    # output_attentions=True: (text, image) self-attention probabilities of each cross layer, (B, heads, T, T) and
    # (B, heads, L, L), as HF's (before dropout; HF's are after it)
    attentions: Optional[tuple] = None
    # return_image_inputs=True: each cross layer's image input, W·ln_post(v) + image type (B, L, H), before its
    # LayerNorm or bridge; give them back as image_inputs= (rows in any order) to skip the vision tower
    image_inputs: Optional[tuple] = None


# -----------------------------------------------------------------------------
# 4. The model

class BridgeTower(nn.Module):

    def __init__(self, config: BridgeTowerConfig):
        super().__init__()
        self.config = c = config
        H, N = c.hidden_size, c.cross_layers
        # The RoBERTa pooler is not built: BridgeTower never uses it (it would get no gradient, which DDP rejects).
        # save_pretrained writes it as zeros so that HF classes load our files without missing keys.
        self.text_model = nn.ModuleDict(dict(
            embeddings=TextEmbeddings(c),
            encoder=nn.ModuleDict(dict(layer=nn.ModuleList(
                [TextLayer(c, c.layer_norm_eps) for _ in range(c.text_layers)])))))
        self.vision_model = nn.ModuleDict(dict(visual=VisionTransformer(c)))

        def transforms(in_features):
            if c.share_cross_modal_transform:
                return nn.Linear(in_features, H)
            return nn.ModuleList([nn.Linear(in_features, H) for _ in range(N)])
        self.cross_modal_text_transform = transforms(H)
        self.cross_modal_image_transform = transforms(c.vision_width)
        self.token_type_embeddings = nn.Embedding(2, H)  # modality type: row 0 text, row 1 image
        self.cross_modal_text_layernorm = nn.LayerNorm(H, eps=c.layer_norm_eps)
        self.cross_modal_image_layernorm = nn.LayerNorm(H, eps=c.layer_norm_eps)
        self.cross_modal_text_layers = nn.ModuleList([CrossLayer(c) for _ in range(N)])
        self.cross_modal_image_layers = nn.ModuleList([CrossLayer(c) for _ in range(N)])
        self.cross_modal_text_link_tower = nn.ModuleList([LinkTower(c) for _ in range(N - 1)])
        self.cross_modal_image_link_tower = nn.ModuleList([LinkTower(c) for _ in range(N - 1)])
        self.cross_modal_text_pooler = Pooler(H)
        self.cross_modal_image_pooler = Pooler(H)

        if "mlm" in c.heads:
            self.mlm_score = MLMHead(c)
        if "itm" in c.heads:
            self.itm_score = LinearHead(2 * H, 2)
        if "itc" in c.heads:
            self.itc_text_head = LinearHead(H, c.contrastive_hidden_size)
            self.itc_image_head = LinearHead(H, c.contrastive_hidden_size)
            self.itc_cross_modal_head = LinearHead(2 * H, c.contrastive_hidden_size)
            self.logit_scale = nn.Parameter(torch.tensor(c.logit_scale_init))
        if "vqa" in c.heads:
            self.vqa_classifier = vqa_classifier(c)
        self.apply(_init_weights)

    def forward(self, input_ids, attention_mask=None, pixel_values=None, heads=None, mlm_positions=None,
                output_hidden_states=False, output_attentions=False, image_inputs=None, return_image_inputs=False):
        """input_ids (B,T); attention_mask (B,T), 1 = token, 0 = pad (default all ones);
        pixel_values (B,3,image_size,image_size).
        heads=None computes every built head and all features. An explicit heads=(...) computes only what those
        heads need: with heads=("mlm",) the last image-side cross layer and the poolers are skipped (MLM reads
        only the text stream), so image_features and pooler_output are None.
        mlm_positions (B,T) bool: compute MLM logits only there, (N,V) in row-major order (training labels
        cover ~15% of tokens, and the vocabulary projection is the largest matmul of the head). Or the same
        positions as a 1-D integer tensor of row-major indices into the B*T tokens: found on the host before the
        batch moves to the GPU (as pre-training does), they pick the rows there with no host sync, where a
        boolean mask makes the host wait for the GPU to count its Trues.
        output_hidden_states / output_attentions: also return every layer's output / the cross layers'
        self-attention probabilities (see BridgeTowerOutput).
        return_image_inputs: also return out.image_inputs, what the vision tower gives the cross layers; an
        image_inputs= from an earlier call or from encode_image (its rows in any order) then replaces pixel_values,
        and the tower does not run again. CLIP has no dropout, so values and gradients are those of running it
        again: pre-training's ITM pass reuses the MLM pass's (a quarter of the step's FLOPs)."""
        mlm_only = heads is not None and tuple(heads) == ("mlm",)
        heads = self.config.heads if heads is None else tuple(heads)
        if not set(heads) <= set(self.config.heads):
            raise ValueError(f"heads {heads} requested, but the model has only {self.config.heads}")
        if (pixel_values is None) == (image_inputs is None):
            raise ValueError("BridgeTower needs pixel_values, or image_inputs from an earlier call: one of them")
        if image_inputs is not None:
            image_inputs = tuple(image_inputs)
            if len(image_inputs) != self.config.cross_layers or any(len(x) != len(input_ids) for x in image_inputs):
                raise ValueError(f"image_inputs: expected {self.config.cross_layers} tensors (out.image_inputs) of "
                                 f"{len(input_ids)} rows, got {[tuple(x.shape) for x in image_inputs]}")
            if output_hidden_states or output_attentions:
                raise ValueError("output_hidden_states / output_attentions need pixel_values, not image_inputs")
        # what the checks below need of the inputs' values, in one host sync. An id outside the vocabulary would
        # otherwise fail in the embedding lookup: a bare IndexError on a CPU, a device-side assert on a GPU, which
        # leaves the CUDA context unusable; so would a text longer than the position table (positions count a row's
        # non-pad tokens up from pad + 1), which only a batch wider than the table can hold
        V = self.config.vocab_size
        longest = self.config.max_position_embeddings - 1 - self.config.pad_token_id
        facts = {"ids_in_vocab": ((input_ids >= 0) & (input_ids < V)).all()}
        if input_ids.shape[1] > longest:
            lengths = input_ids.ne(self.config.pad_token_id).sum(-1)
            facts["fits_positions"] = (lengths <= longest).all()
        if attention_mask is not None:
            facts["unpadded"], facts["no_empty_row"] = attention_mask.all(), attention_mask.any(-1).all()
        facts = dict(zip(facts, torch.stack(list(facts.values())).tolist()))
        if not facts["ids_in_vocab"]:
            outside = input_ids[(input_ids < 0) | (input_ids >= V)].unique().tolist()
            raise ValueError(f"input_ids holds ids outside the model's vocabulary of {V} (0..{V - 1}): {outside[:5]}; "
                             "token ids of another tokenizer?")
        if not facts.get("fits_positions", True):
            raise ValueError(f"input_ids has a text of {lengths.max().item()} tokens; the position table "
                             f"(max_position_embeddings={self.config.max_position_embeddings}) holds {longest}: "
                             "truncate the text (the tokenizer's max_length)")
        key_mask = None  # no mask at all when nothing is padded: the fastest attention path
        if attention_mask is not None:
            if not facts["no_empty_row"]:
                # HF adds finfo.min to every score of such a row, which makes them all one value, so it attends
                # uniformly to the padding; SDPA gives zeros. Neither means anything, so say so rather than return
                # either (a tokenizer always yields <s> and </s>)
                rows = torch.nonzero(~attention_mask.any(-1)).flatten().tolist()
                raise ValueError(f"attention_mask rows {rows} are all 0: no token to attend to")
            if not facts["unpadded"]:
                key_mask = attention_mask.bool()

        states = ({"text": [], "image": [], "cross": [], "cross_inputs": []}
                  if output_hidden_states or output_attentions else None)

        def keep(**outputs):  # every layer's output, for output_hidden_states / output_attentions
            if states is not None:
                for name, x in outputs.items():
                    states[name].append(x)

        if image_inputs is None:
            image_inputs = self.encode_image(pixel_values, keep)
        t, ct, ci = self._encode(input_ids, image_inputs, key_mask, keep, skip_last_image_layer=mlm_only)
        out = BridgeTowerOutput(text_features=ct, image_features=ci,
                                image_inputs=image_inputs if return_image_inputs else None)
        if output_hidden_states:
            out.hidden_states = tuple(tuple(states[name]) for name in ("text", "image", "cross"))
        if output_attentions:
            out.attentions = []
            for k, ((xt, xi), (_, ci_k)) in enumerate(zip(states["cross_inputs"], states["cross"])):
                text_probs = attention_probs(self.cross_modal_text_layers[k].attention.self, xt, key_mask)
                image_probs = (None if ci_k is None else  # the image layer was skipped (heads=("mlm",))
                               attention_probs(self.cross_modal_image_layers[k].attention.self, xi, None))
                out.attentions.append((text_probs, image_probs))
            out.attentions = tuple(out.attentions)
        if not mlm_only:
            out.pooler_output = torch.cat([self.cross_modal_text_pooler(ct), self.cross_modal_image_pooler(ci)], -1)
        if "mlm" in heads:
            rows = ct
            if mlm_positions is not None:  # a boolean mask, or row-major indices (no host sync on a GPU)
                rows = (ct[mlm_positions] if mlm_positions.dtype == torch.bool else
                        ct.flatten(0, 1).index_select(0, mlm_positions))
            out.mlm_logits = self.mlm_score(rows)
        if "itm" in heads:
            out.itm_logits = self.itm_score(out.pooler_output)
        if "itc" in heads:
            # HF: CLS of the last uni-modal text layer; CLS of the last image block after ln_post, the (shared)
            # image transform and the image type embedding: image_inputs[-1], the last cross layer's image input
            out.text_embeds = F.normalize(self.itc_text_head(t[:, 0]), dim=-1)
            out.image_embeds = F.normalize(self.itc_image_head(image_inputs[-1][:, 0]), dim=-1)
            out.cross_embeds = F.normalize(self.itc_cross_modal_head(out.pooler_output), dim=-1)
        if "vqa" in heads:
            out.vqa_logits = self.vqa_classifier(out.pooler_output)
        return out

    def encode_image(self, pixel_values, keep=None):
        """The vision tower's part, for forward's image_inputs=: the image input of each cross layer k,
        W_i·ln_post(v) + the image type embedding, v the output of block text_layers - cross_layers + k, 0-based
        (see _encode; blocks above text_layers never run). `keep(image=...)` is given ln_pre's output and each
        block's."""
        keep = keep or (lambda **outputs: None)
        c = self.config
        visual = self.vision_model.visual
        image_type = self.token_type_embeddings.weight[1]
        v = visual.ln_pre(visual.embeddings(pixel_values))
        keep(image=v)
        first_fed = c.text_layers - c.cross_layers
        inputs = []
        for i in range(c.text_layers):
            v = visual.transformer.resblocks[i](v)
            keep(image=v)
            if i >= first_fed:
                inputs.append(self._project(self.cross_modal_image_transform, i - first_fed, visual.ln_post(v))
                              + image_type)
        return tuple(inputs)

    def _encode(self, input_ids, image_inputs, key_mask, keep, skip_last_image_layer=False):
        """The BridgeTower schedule. The top N text layers and image blocks each feed one cross layer: cross
        layer 0 through the first-layer LayerNorms, cross layers 1..N-1 through the bridges. Both streams of cross
        layer k attend to the *inputs* of the other stream at layer k.
        Returns the last uni-modal text states and both cross-modal outputs. `keep(name=...)` is given each text
        layer's output (text), each cross layer's outputs (cross) and its inputs (cross_inputs)."""
        c = self.config
        text_layers = self.text_model.encoder.layer
        text_type = self.token_type_embeddings.weight[0]

        t = self.text_model.embeddings(input_ids)
        keep(text=t)
        # 0-based index of the first uni-modal layer that feeds a cross layer. Base: 6, so layers 7..12 (1-based)
        # feed cross layers 0..5; HF's split_index (layers run before cross layer 0) is first_fed + 1
        first_fed = c.text_layers - c.cross_layers
        for i in range(first_fed):
            t = text_layers[i](t, key_mask)
            keep(text=t)
        for k in range(c.cross_layers):
            t = text_layers[first_fed + k](t, key_mask)
            keep(text=t)
            text_input = self._project(self.cross_modal_text_transform, k, t) + text_type
            image_input = image_inputs[k]
            if k == 0:
                xt, xi = self.cross_modal_text_layernorm(text_input), self.cross_modal_image_layernorm(image_input)
            else:
                xt = self.cross_modal_text_link_tower[k - 1](text_input, ct)
                xi = self.cross_modal_image_link_tower[k - 1](image_input, ci)
            ct = self.cross_modal_text_layers[k](xt, xi, key_mask, None)  # text keys masked, image keys never
            if skip_last_image_layer and k == c.cross_layers - 1:
                ci = None
            else:
                ci = self.cross_modal_image_layers[k](xi, xt, None, key_mask)
            keep(cross=(ct, ci), cross_inputs=(xt, xi))
        return t, ct, ci

    @staticmethod
    def _project(transform, k, x):
        """The shared projection W, or cross layer k's own when share_cross_modal_transform=False."""
        return transform(x) if isinstance(transform, nn.Linear) else transform[k](x)

    @classmethod
    def from_pretrained(cls, path, **config_overrides):
        """A BridgeTower checkpoint: an HF directory (config.json + model.safetensors or pytorch_model.bin, any of
        BridgeTowerModel / ForMaskedLM / ForImageAndTextRetrieval / ForContrastiveLearning, or one written by
        save_pretrained), or an original Lightning .ckpt (config inferred from the tensor shapes).
        config_overrides replace config fields, e.g. image_size=576 (the position table is resized bicubically)
        or heads=("vqa",) (a requested head absent from the file is freshly initialised, a head in the file that
        is not requested is dropped; both are reported). Returns the model in train mode, like any nn.Module."""
        if not os.path.exists(path):
            raise no_such_path(path, "checkpoint (an HF directory or an original .ckpt)")
        if os.path.basename(path) in ("model.safetensors", "pytorch_model.bin", "config.json"):
            path = os.path.dirname(path) or "."  # a file of an HF directory: the directory
        if os.path.isdir(path):
            state, config_kwargs, source, notes = read_hf_checkpoint(path)
        elif str(path).endswith((".safetensors", ".json")):  # a shard, an index, weights renamed: not original files
            raise CheckpointError(f"{path}: a file of an HF checkpoint alone; give the directory that holds its "
                                  "config.json and model.safetensors (or sharded index)")
        else:
            state, config_kwargs, source, notes = read_original_checkpoint(path)
        found_heads = tuple(h for h in HEADS if any(head_of(k) == h for k in state))
        config_kwargs.update(head_sizes(state), heads=found_heads)
        try:
            config = BridgeTowerConfig(**{**config_kwargs, **config_overrides})
        except ValueError as e:  # what the file's config.json or tensor shapes describe is not a valid model
            try:
                BridgeTowerConfig(**config_kwargs)
            except ValueError:
                raise CheckpointError(f"{source}: {e}") from None
            overrides = ", ".join(f"{k}={v!r}" for k, v in config_overrides.items())
            raise ValueError(f"{source} loaded with {overrides}: {e}") from None  # the file is fine, an override not
        model = cls(config)
        notes += model._load_checkpoint(state, source, found_heads)
        print(f"{source}: loaded" + "".join(f"\n  {note}" for note in notes))
        return model

    @classmethod
    def from_unimodal(cls, config, text_path=None, vision_path=None):
        """A new model for pre-training whose text encoder comes from an HF RobertaModel / RobertaForMaskedLM
        directory and whose image encoder comes from CLIP: an HF CLIPModel / CLIPVisionModel directory or
        OpenAI's TorchScript archive (ViT-B-16.pt). The CLIP position table is resized to config.image_size."""
        for path, what in ((text_path, "RoBERTa directory"), (vision_path, "CLIP directory or OpenAI archive")):
            if path is not None and not os.path.exists(path):
                raise no_such_path(path, what)
        model = cls(config)
        if text_path is not None:
            state, source, notes = read_roberta(text_path, config)
            notes += model._load_part(state, "text_model.", source)
            print(f"{source}: loaded the text encoder" + "".join(f"\n  {note}" for note in notes))
        if vision_path is not None:
            state, source, notes = read_clip(vision_path, config)
            notes += model._load_part(state, "vision_model.visual.", source)
            print(f"{source}: loaded the image encoder" + "".join(f"\n  {note}" for note in notes))
        return model

    def save_pretrained(self, directory):
        """model.safetensors + config.json in the HF layout: body under `bridgetower.`, heads at the top (the VQA
        head too, which transformers ignores). transformers' BridgeTowerForMaskedLM / ForImageAndTextRetrieval /
        ForContrastiveLearning load it without missing keys (the unused RoBERTa pooler is written as zeros).
        HF has a single text eps for the text and cross layers: with cross_layer_norm_eps != layer_norm_eps
        (original checkpoints, 1e-12) transformers runs the cross layers with layer_norm_eps; we read our
        extra config field back."""
        from safetensors.torch import save_file
        os.makedirs(directory, exist_ok=True)
        state = {(k if head_of(k) else "bridgetower." + k): v.detach().to("cpu").contiguous()
                 for k, v in self.state_dict().items()}
        H = self.config.hidden_size
        state["bridgetower.text_model.pooler.dense.weight"] = torch.zeros(H, H)
        state["bridgetower.text_model.pooler.dense.bias"] = torch.zeros(H)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(config_to_hf(self.config), f, indent=2)
        path = os.path.join(directory, "model.safetensors")
        save_file(state, path, metadata={"format": "pt"})
        umask = os.umask(0)  # safetensors writes the file 0600; give it the mode any new file gets (umask read back)
        os.umask(umask)
        try:
            os.chmod(path, 0o666 & ~umask)
        except OSError:  # a file system without modes: the file is written all the same
            pass

    def _load_checkpoint(self, state, source, found_heads):
        """Load a whole-model state (HF key names without `bridgetower.`). Returns report lines."""
        notes = []
        for head in found_heads:
            if head not in self.config.heads:
                state = {k: v for k, v in state.items() if head_of(k) != head}
                notes.append(f"head {head}: in the checkpoint, not requested: dropped")
        fresh = [h for h in self.config.heads if h not in found_heads]
        notes += [f"head {h}: not in the checkpoint: freshly initialised" for h in fresh]
        state, resized = resize_position_table_in(state, self.config, source)
        check_state(self.state_dict(), state, source, may_miss=lambda k: head_of(k) in fresh)
        self.load_state_dict(state, strict=False)  # strictness checked just above, fresh heads aside
        return notes + resized

    def _load_part(self, state, prefix, source):
        """Load the parameters under prefix (one encoder), all of them, nothing else."""
        state, resized = resize_position_table_in(state, self.config, source)
        expected = {k: v for k, v in self.state_dict().items() if k.startswith(prefix)}
        check_state(expected, state, source)
        self.load_state_dict(state, strict=False)  # the other parameters keep their initialisation
        return resized


def _init_weights(module):
    """The original's init for new modules: N(0, 0.02) weights, zero biases, LayerNorm 1/0.
    (Real training starts from RoBERTa + CLIP weights or a BridgeTower checkpoint.)"""
    if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, PackedAttention):
        nn.init.normal_(module.in_proj_weight, std=0.02)
        nn.init.zeros_(module.in_proj_bias)
    elif isinstance(module, VisionEmbeddings):
        nn.init.normal_(module.class_embedding, std=0.02)


# -----------------------------------------------------------------------------
# 5. Checkpoints. One key mapping per format, into the HF names of our parameters (without `bridgetower.`).
#    Whatever is neither mapped nor listed as ignored below is an error that names the file and the keys.

class CheckpointError(ValueError):
    pass


class ModelTypeError(CheckpointError):
    """A checkpoint of another kind of model than the one asked for (its config.json's model_type)."""


_MODEL_KINDS = {  # kind -> (its config.json model_types, its name, where such a checkpoint is loaded)
    "bridgetower": (("bridgetower",), "a BridgeTower", "a whole model, for from_pretrained (pretrain.py --init_from)"),
    "roberta": (("roberta",), "a RoBERTa", "an encoder to start pre-training from, with from_unimodal's text_path "
                "(pretrain.py --text_init)"),
    "clip": (("clip", "clip_vision_model"), "a CLIP image encoder", "an encoder to start pre-training from, with "
             "from_unimodal's vision_path (pretrain.py --vision_init)"),
}


def check_model_type(hf, wanted, directory):
    """That an HF config.json (a dict) describes the kind of model wanted, a key of _MODEL_KINDS; one without a
    model_type is taken at its word."""
    model_type = hf.get("model_type", _MODEL_KINDS[wanted][0][0])
    if model_type not in _MODEL_KINDS[wanted][0]:
        use = [where for types, _, where in _MODEL_KINDS.values() if model_type in types]
        raise ModelTypeError(f"{directory}: config.json describes a {model_type!r} model, not "
                             f"{_MODEL_KINDS[wanted][1]}" + (f": {use[0]}" if use else ""))


def no_such_path(path, what):
    """The error for a checkpoint path that does not exist. A hub id (BridgeTower/bridgetower-base-itm-mlm) gets a
    word on downloading it: transformers would fetch it, this reads local files only."""
    hub = (f"; if it is a hub id, note that this loads local files only: download it first (hf download {path} "
           "--local-dir DIR) and give DIR" if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) else "")
    return FileNotFoundError(f"{path}: no such {what}{hub}")


# Keys deliberately not loaded, per format (fnmatch patterns on the mapped names) -> why.
IGNORED_HF = {
    "text_model.pooler.*": "RoBERTa pooler, never used by BridgeTower (save_pretrained writes zeros)",
    "*.position_ids": "index buffer saved by older transformers",
    "*.token_type_ids": "index buffer saved by older transformers",
    "vision_model.visual.ln_separate.*": "HF share_layernorm=False LayerNorms, never used by HF's forward",
}
IGNORED_ORIGINAL = {  # original names; IGNORED_HF applies after the renaming
    "vit_model.positional_embedding": "CLIP text-tower leftover in the original ViT module",
    "vit_model.ln_final.*": "CLIP text-tower leftover in the original ViT module",
    "temperature": "the original ITC temperature (its ITC differs from HF's and is not implemented)",
}
# Original heads not implemented here: dropped with a report (the original ITC pools differently from HF's).
ORIGINAL_ONLY_HEADS = ("nlvr2_classifier", "snli_classifier", "rank_output", "itc_text_head", "itc_image_head")
IGNORED_ROBERTA = {
    "lm_head.*": "RoBERTa's LM head (BridgeTower trains its own MLM head)",
    "pooler.*": "RoBERTa pooler, never used by BridgeTower",
    "*.position_ids": "index buffer",
    "*.token_type_ids": "index buffer",
}
IGNORED_HF_CLIP = {
    "text_model.*": "CLIP text tower",
    "text_projection.*": "CLIP text projection",
    "visual_projection.*": "CLIP image projection (BridgeTower bridges the block outputs)",
    "logit_scale": "CLIP temperature",
    "*.position_ids": "index buffer",
}
IGNORED_OPENAI_CLIP = {
    "visual.proj": "CLIP image projection (BridgeTower bridges the block outputs)",
    **dict.fromkeys(("transformer.*", "token_embedding.*", "positional_embedding", "ln_final.*", "text_projection"),
                    "CLIP text tower"),
    "logit_scale": "CLIP temperature",
    **dict.fromkeys(("input_resolution", "context_length", "vocab_size"), "archive metadata"),
}

HEAD_MODULES = {"mlm": ("mlm_score",), "itm": ("itm_score",), "vqa": ("vqa_classifier",),
                "itc": ("itc_text_head", "itc_image_head", "itc_cross_modal_head", "logit_scale")}
POSITION_KEY = "vision_model.visual.embeddings.position_embedding.weight"


def head_of(key):
    """The head a parameter name belongs to, or None for the body."""
    root = key.split(".")[0]
    return next((head for head, roots in HEAD_MODULES.items() if root in roots), None)


def head_sizes(state):
    """Config fields that a checkpoint's heads fix by their shapes."""
    sizes = {}
    if "vqa_classifier.3.weight" in state:
        sizes["num_vqa_answers"] = state["vqa_classifier.3.weight"].shape[0]
    if "itc_text_head.fc.weight" in state:
        sizes["contrastive_hidden_size"] = state["itc_text_head.fc.weight"].shape[0]
    return sizes


def drop_ignored(state, ignored):
    """Split off the keys matching an `ignored` pattern. Returns (kept state, one report line or [])."""
    from fnmatch import fnmatchcase
    dropped = {k for k in state if any(fnmatchcase(k, p) for p in ignored)}
    kept = {k: v for k, v in state.items() if k not in dropped}
    # nothing to report when every one is zeros (nothing is lost): e.g. the RoBERTa pooler that our save_pretrained
    # writes as zeros, since HF's classes expect it
    if all(torch.is_tensor(state[k]) and not state[k].any() for k in dropped):
        return kept, []
    return kept, [f"ignored {len(dropped)} keys on purpose: {_listing(dropped, 6)}"]


def _listing(keys, limit=30):
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def check_state(expected, state, source, may_miss=lambda k: False):
    """Raise CheckpointError naming the file and every missing, unexpected or mis-shaped key."""
    missing = [k for k in expected if k not in state and not may_miss(k)]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
                 for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or misshaped:
        lines = [f"{source} does not match the model:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if keys:
                lines.append(f"  {len(keys)} {title}: {_listing(keys)}")
        raise CheckpointError("\n".join(lines))


def resize_position_table(table, grid, source="position table"):
    """(1 + g*g, D) CLIP position table -> (1 + grid*grid, D): bicubic over the patch grid (align_corners=False,
    as the original adapt_position_encoding and HF's interpolate_pos_encoding), class row kept."""
    old = math.isqrt(table.shape[0] - 1)
    if old * old + 1 != table.shape[0]:
        raise CheckpointError(f"{source}: {POSITION_KEY} has {table.shape[0]} rows, not 1 + a square grid")
    if old == grid:
        return table
    # in fp32 at least, and kept so: rounding the result back to an fp16 source's dtype (OpenAI's archives) would
    # add an error of about 1e-5 to the model's fp32 table
    table = table.to(torch.promote_types(table.dtype, torch.float32))
    patches = table[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([table[:1], patches.permute(0, 2, 3, 1).reshape(grid * grid, -1)])


def resize_position_table_in(state, config, source):
    table = state.get(POSITION_KEY)
    if table is None or table.shape[0] == config.image_grid ** 2 + 1:
        return state, []
    old = math.isqrt(table.shape[0] - 1)
    state = {**state, POSITION_KEY: resize_position_table(table, config.image_grid, source)}
    return state, [f"position table resized from a {old}x{old} to a {config.image_grid}x{config.image_grid} patch grid "
                   f"({old * config.patch_size} -> {config.image_size} px, bicubic)"]


def load_weights_file(path):
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, empty, not a weights file: name the file, keep the reason
        raise CheckpointError(f"{path}: cannot be read as a weights file ({type(e).__name__}: {e})") from e


def read_hf_weights(directory):
    """(state dict, file name) of an HF model directory: one file or a sharded index."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return load_weights_file(path), path
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            with open(path) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(load_weights_file(os.path.join(directory, shard)))
            return state, path
    raise FileNotFoundError(f"{directory}: no model.safetensors, pytorch_model.bin or sharded index")


def read_json(directory, name="config.json"):
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None


# ---- BridgeTower checkpoints: HF directories (ours included) and original Lightning files

def read_hf_checkpoint(directory):
    """(state, config kwargs, source, report lines) of an HF BridgeTower directory."""
    raw, source = read_hf_weights(directory)
    hf = read_json(directory)
    if hf is None:
        raise FileNotFoundError(f"{directory}: no config.json")
    check_model_type(hf, "bridgetower", directory)
    state = {k.removeprefix("bridgetower."): v for k, v in raw.items()}
    state, notes = drop_ignored(state, IGNORED_HF)
    word = state.get("text_model.embeddings.word_embeddings.weight")
    if hf.get("tie_word_embeddings") and "mlm_score.bias" in state and "mlm_score.decoder.weight" not in state \
            and word is not None:
        # HF ties the MLM decoder to the word embeddings, and save_pretrained writes the shared tensor once
        state["mlm_score.decoder.weight"] = word.clone()
        notes.append("tie_word_embeddings: mlm_score.decoder.weight copied from the word embeddings (untied here, "
                     "as in the original: they train separately)")
    types = state.get("text_model.embeddings.token_type_embeddings.weight")
    if types is not None and len(types) > 1:  # type_vocab_size > 1: HF's forward passes no token types, so row 0
        state["text_model.embeddings.token_type_embeddings.weight"] = types[:1]
        notes.append(f"text_model.embeddings.token_type_embeddings: row 0 kept of {len(types)} (the only one HF uses)")
    return state, config_from_hf(hf, source), source, notes


def config_from_hf(hf, source="config.json"):
    """Our config fields from an HF BridgeTower config.json (text_config / vision_config nesting; old hub files
    name them *_dict). Missing values take HF's defaults, which are our base preset."""
    d = BridgeTowerConfig()
    text = hf.get("text_config") or hf.get("text_config_dict") or {}
    vision = hf.get("vision_config") or hf.get("vision_config_dict") or {}
    eps = hf.get("layer_norm_eps", d.layer_norm_eps)
    unsupported = [
        msg for bad, msg in (
            (hf.get("share_link_tower_layers", False), "share_link_tower_layers=True (crashes in HF too)"),
            (vision.get("remove_last_layer", False), "remove_last_layer=True (crashes in HF too)"),
            ({text.get("hidden_act", "gelu"), hf.get("hidden_act", "gelu")} != {"gelu"}, "hidden_act not gelu"),
            (text.get("hidden_size", 768) != hf.get("hidden_size", 768), "text hidden_size != hidden_size"),
            (vision.get("layer_norm_eps", eps) != eps, "vision layer_norm_eps != layer_norm_eps"),
            (text.get("layer_norm_eps", eps) != eps, "text layer_norm_eps != layer_norm_eps"),
        ) if bad]
    if unsupported:
        raise CheckpointError(f"{source}: unsupported config: {', '.join(unsupported)}")
    return dict(
        vocab_size=text.get("vocab_size", d.vocab_size),
        max_position_embeddings=text.get("max_position_embeddings", d.max_position_embeddings),
        pad_token_id=text.get("pad_token_id", d.pad_token_id),
        hidden_size=text.get("hidden_size", d.hidden_size),
        num_heads=text.get("num_attention_heads", d.num_heads),
        intermediate_size=text.get("intermediate_size", d.intermediate_size),
        text_layers=text.get("num_hidden_layers", d.text_layers),
        vision_width=vision.get("hidden_size", d.vision_width),
        vision_layers=vision.get("num_hidden_layers", d.vision_layers),
        patch_size=vision.get("patch_size", d.patch_size),
        image_size=vision.get("image_size", d.image_size),
        cross_layers=hf.get("num_hidden_layers", d.cross_layers),
        link_tower_type=hf.get("link_tower_type", d.link_tower_type),
        share_cross_modal_transform=hf.get("share_cross_modal_transformer_layers", d.share_cross_modal_transform),
        layer_norm_eps=eps,
        # HF builds the cross layers from text_config, whose eps equals layer_norm_eps (checked above); our own
        # files carry cross_layer_norm_eps, which HF cannot express (1e-12 for original checkpoints)
        cross_layer_norm_eps=hf.get("cross_layer_norm_eps", eps),
        hidden_dropout=text.get("hidden_dropout_prob", d.hidden_dropout),
        attention_dropout=text.get("attention_probs_dropout_prob", d.attention_dropout),
        num_vqa_answers=hf.get("num_vqa_answers", d.num_vqa_answers),
        contrastive_hidden_size=hf.get("contrastive_hidden_size", d.contrastive_hidden_size),
        logit_scale_init=hf.get("logit_scale_init_value", d.logit_scale_init),
    )


def config_to_hf(c):
    """config.json for transformers' BridgeTower classes, plus our fields that HF lacks (it ignores them)."""
    architecture = ("BridgeTowerForContrastiveLearning" if "itc" in c.heads else "BridgeTowerForMaskedLM"
                    if "mlm" in c.heads else "BridgeTowerForImageAndTextRetrieval" if "itm" in c.heads
                    else "BridgeTowerModel")
    text_config = dict(
        model_type="bridgetower_text_model", vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        num_hidden_layers=c.text_layers, num_attention_heads=c.num_heads, intermediate_size=c.intermediate_size,
        hidden_act="gelu", hidden_dropout_prob=c.hidden_dropout, attention_probs_dropout_prob=c.attention_dropout,
        max_position_embeddings=c.max_position_embeddings, type_vocab_size=1, layer_norm_eps=c.layer_norm_eps,
        pad_token_id=c.pad_token_id, bos_token_id=0, eos_token_id=2, initializer_factor=1)
    vision_config = dict(
        model_type="bridgetower_vision_model", hidden_size=c.vision_width, num_hidden_layers=c.vision_layers,
        num_channels=3, patch_size=c.patch_size, image_size=c.image_size, layer_norm_eps=c.layer_norm_eps,
        share_layernorm=True, remove_last_layer=False, stop_gradient=False, initializer_factor=1)
    return dict(
        architectures=[architecture], model_type="bridgetower", hidden_size=c.hidden_size,
        num_attention_heads=c.num_heads, num_hidden_layers=c.cross_layers, hidden_act="gelu",
        layer_norm_eps=c.layer_norm_eps, initializer_factor=1,
        share_cross_modal_transformer_layers=c.share_cross_modal_transform, share_link_tower_layers=False,
        link_tower_type=c.link_tower_type, tie_word_embeddings=False, init_layernorm_from_vision_encoder=False,
        contrastive_hidden_size=c.contrastive_hidden_size, logit_scale_init_value=c.logit_scale_init,
        text_config=text_config, vision_config=vision_config,
        # ours
        heads=list(c.heads), num_vqa_answers=c.num_vqa_answers, cross_layer_norm_eps=c.cross_layer_norm_eps,
    )


ORIGINAL_RENAMES = (  # (original prefix, HF prefix), first match wins
    ("text_transformer.", "text_model."),
    ("vit_model.visual.conv1.", "vision_model.visual.embeddings.patch_embedding."),
    ("vit_model.visual.class_embedding", "vision_model.visual.embeddings.class_embedding"),
    ("vit_model.visual.positional_embedding", "vision_model.visual.embeddings.position_embedding.weight"),
    ("vit_model.visual.", "vision_model.visual."),
)


def original_key(key):
    for old, new in ORIGINAL_RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return key  # cross_modal_*, token_type_embeddings and heads keep their names


class _Inert:
    """Stands in for any class or function named in a .ckpt other than what rebuilds tensors: it accepts every
    argument, state and item, and does nothing, so loading the file runs no code of the file's choosing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):  # dict subclasses (Lightning's AttributeDict)
        pass

    def append(self, item):  # list subclasses
        pass

    def extend(self, items):
        pass


class _TensorsOnlyUnpickler(pickle.Unpickler):
    """Resolves only the globals that torch.load needs for tensors and plain containers; every other one (the
    training config's objects that a Lightning .ckpt pickles in hyper_parameters) becomes _Inert."""
    PLAIN = {("collections", "OrderedDict"), ("torch._tensor", "_rebuild_from_type_v2"),
             ("torch.nn.parameter", "Parameter"), ("torch", "Size"), ("torch", "device"), ("torch", "Tensor")} | {
        ("builtins", name) for name in ("set", "frozenset", "complex", "slice", "range", "bytearray", "tuple", "list",
                                        "dict", "int", "float", "bool", "str", "bytes")}

    def find_class(self, module, name):
        if (module, name) in self.PLAIN or module == "torch._utils" and name.startswith("_rebuild_"):
            return super().find_class(module, name)
        if module == "torch":  # storage classes (torch.FloatStorage, ...), dtypes, layouts, memory formats
            obj = getattr(torch, name, None)
            if (isinstance(obj, type) and issubclass(obj, (torch.UntypedStorage, torch.storage.TypedStorage))
                    or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format))):
                return obj
        return _Inert


class _TensorsOnlyPickle:  # the pickle_module torch.load uses for it
    __name__ = "tensors_only_pickle"
    Unpickler = _TensorsOnlyUnpickler

    @staticmethod
    def load(f, **kwargs):
        return _TensorsOnlyUnpickler(f, **kwargs).load()


def read_original_checkpoint(path):
    """(state, config kwargs, source, report lines) of an original microsoft/BridgeTower Lightning .ckpt."""
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # Lightning pickles more than tensors (hyper_parameters: the training config's objects). Only the
            # tensors are needed: the rest is read as inert placeholders, not by a full, code-running unpickling.
            ckpt = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_TensorsOnlyPickle)
            print(f"{path}: holds objects other than tensors; read with those replaced by placeholders")
    except Exception as e:  # empty, truncated, not a PyTorch file
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(e).__name__}: {e})") from e
    if isinstance(ckpt, dict) and {"model", "model_config", "optimizer"} <= set(ckpt):
        raise CheckpointError(f"{path} is a training checkpoint of this project's scripts: resume its run with "
                              "--resume and its --out_dir, or start from the run's final/ directory")
    raw = ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt
    if not isinstance(raw, dict) or not all(torch.is_tensor(v) for v in raw.values()):
        raise CheckpointError(f"{path}: holds no state dict of tensors (a pickled module? save its state_dict())")
    state, notes = drop_ignored(raw, IGNORED_ORIGINAL)
    unsupported = sorted({k.split(".")[0] for k in state if k.split(".")[0] in ORIGINAL_ONLY_HEADS})
    if unsupported:
        notes.append(f"heads of the original not implemented here, dropped: {', '.join(unsupported)}")
        state = {k: v for k, v in state.items() if k.split(".")[0] not in ORIGINAL_ONLY_HEADS}
    types = state.get("token_type_embeddings.weight")
    if types is not None and types.shape[0] == 3:
        # NLVR2 fine-tuning adds a row for the second image of a pair; rows 0 (text) and 1 (image) are the model's
        state["token_type_embeddings.weight"] = types[:2]
        notes.append("token_type_embeddings: NLVR2's third row (its second image) dropped")
    state, more = drop_ignored({original_key(k): v for k, v in state.items()}, IGNORED_HF)
    return state, config_from_shapes(state, path), path, notes + more


def config_from_shapes(state, source):
    """Config fields of an original checkpoint, from its tensor shapes. The original has no head-count field:
    RoBERTa and CLIP use heads of width 64. Its cross layers and MLM transform use eps 1e-12 (BertConfig)."""
    def get(key):
        if key not in state:
            raise CheckpointError(f"{source}: not a BridgeTower checkpoint (no {key})")
        return state[key]

    def count(prefix):
        return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})

    word = get("text_model.embeddings.word_embeddings.weight")
    conv = get("vision_model.visual.embeddings.patch_embedding.weight")
    grid = math.isqrt(get(POSITION_KEY).shape[0] - 1)
    link = ("scaled_add" if "cross_modal_text_link_tower.0.scaled_factor" in state else
            "interpolate" if "cross_modal_text_link_tower.0.beta" in state else "add")
    return dict(
        vocab_size=word.shape[0], hidden_size=word.shape[1], num_heads=word.shape[1] // 64,
        max_position_embeddings=get("text_model.embeddings.position_embeddings.weight").shape[0],
        intermediate_size=get("text_model.encoder.layer.0.intermediate.dense.weight").shape[0],
        text_layers=count("text_model.encoder.layer."), vision_width=conv.shape[0],
        vision_layers=count("vision_model.visual.transformer.resblocks."), patch_size=conv.shape[-1],
        image_size=grid * conv.shape[-1], cross_layers=count("cross_modal_text_layers."), link_tower_type=link,
        share_cross_modal_transform="cross_modal_text_transform.weight" in state,
        layer_norm_eps=1e-5, cross_layer_norm_eps=1e-12,
    )


# ---- uni-modal initialisation: RoBERTa and CLIP

def _check_fields(found, wanted, source):
    wrong = [f"{k}={found[k]!r} (model needs {v!r})" for k, v in wanted.items() if k in found and found[k] != v]
    if wrong:
        raise CheckpointError(f"{source}: config does not match the model: {', '.join(wrong)}")


def read_roberta(directory, config):
    """(state named text_model.*, source, report lines) from an HF RobertaModel / RobertaForMaskedLM directory."""
    hf = read_json(directory) or {}
    check_model_type(hf, "roberta", directory)
    raw, source = read_hf_weights(directory)
    c = config
    _check_fields(hf, dict(
        hidden_size=c.hidden_size, num_hidden_layers=c.text_layers, num_attention_heads=c.num_heads,
        intermediate_size=c.intermediate_size, vocab_size=c.vocab_size, hidden_act="gelu",
        max_position_embeddings=c.max_position_embeddings, layer_norm_eps=c.layer_norm_eps,
        pad_token_id=c.pad_token_id, type_vocab_size=1), source)
    state, notes = drop_ignored({k.removeprefix("roberta."): v for k, v in raw.items()}, IGNORED_ROBERTA)
    return {"text_model." + k: v for k, v in state.items()}, source, notes


HF_CLIP_RENAMES = (("pre_layrnorm.", "ln_pre."), ("post_layernorm.", "ln_post."),  # sic: HF CLIP's "layrnorm"
                   ("encoder.layers.", "transformer.resblocks."), (".self_attn.out_proj.", ".attn.out_proj."),
                   (".layer_norm1.", ".ln_1."), (".layer_norm2.", ".ln_2."),
                   (".mlp.fc1.", ".mlp.c_fc."), (".mlp.fc2.", ".mlp.c_proj."))
OPENAI_CLIP_RENAMES = (("conv1.", "embeddings.patch_embedding."), ("class_embedding", "embeddings.class_embedding"),
                       ("positional_embedding", "embeddings.position_embedding.weight"))


def read_clip(path, config):
    """(state named vision_model.visual.*, source, report lines) from an HF CLIP directory or an OpenAI archive."""
    if os.path.isdir(path):
        state, source, notes = read_hf_clip(path, config)
    else:
        state, source, notes = read_openai_clip(path)
    return {"vision_model.visual." + k: v for k, v in state.items()}, source, notes


def read_hf_clip(directory, config):
    hf = read_json(directory) or {}
    check_model_type(hf, "clip", directory)
    raw, source = read_hf_weights(directory)
    vision = hf.get("vision_config", hf)  # CLIPModel nests it, CLIPVisionModel does not
    _check_fields(vision, dict(hidden_size=config.vision_width, num_hidden_layers=config.vision_layers,
                               num_attention_heads=config.vision_heads, hidden_act="quick_gelu",
                               patch_size=config.patch_size, layer_norm_eps=config.layer_norm_eps), source)
    state, notes = drop_ignored({k.removeprefix("vision_model."): v for k, v in raw.items()}, IGNORED_HF_CLIP)
    renamed = {}
    for k, v in state.items():
        for old, new in HF_CLIP_RENAMES:
            k = k.replace(old, new)
        renamed[k] = v
    return pack_qkv(renamed), source, notes


def pack_qkv(state):
    """HF CLIP's separate q/k/v projections -> nn.MultiheadAttention's packed in_proj (q, k, v order).
    Incomplete triples are left as they are, so that the key check reports them."""
    packed = dict(state)
    for q_key in [k for k in state if ".self_attn.q_proj." in k]:
        parts = [q_key.replace(".q_proj.", f".{p}_proj.") for p in "qkv"]
        if all(p in state for p in parts):
            block, kind = q_key.split(".self_attn.q_proj.")
            packed[f"{block}.attn.in_proj_{kind}"] = torch.cat([packed.pop(p) for p in parts])
    return packed


def read_openai_clip(path):
    try:
        raw = torch.jit.load(path, map_location="cpu").state_dict()
    except RuntimeError:  # not a TorchScript archive: a plain state dict, as OpenAI's own loader accepts
        raw = torch.load(path, map_location="cpu", weights_only=True)
    state, notes = drop_ignored(dict(raw), IGNORED_OPENAI_CLIP)
    renamed = {}
    for k, v in state.items():
        k = k.removeprefix("visual.")
        for old, new in OPENAI_CLIP_RENAMES:
            if k.startswith(old):
                k = new + k[len(old):]
        renamed[k] = v
    return renamed, path, notes
