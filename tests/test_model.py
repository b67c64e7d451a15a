"""
model.py against transformers (the parity target) with random weights, loaded the way a user loads them:
transformers' save_pretrained -> our from_pretrained (and back). Tiny configs for breadth, base size once.
"""

import argparse
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers as T

from model import (BridgeTower, BridgeTowerConfig, CheckpointError, ModelTypeError, contrastive_loss, config_to_hf,
                   resize_position_table)

@pytest.fixture(autouse=True)
def one_thread(request):
    """Tiny models gain nothing from intra-op threads, and on a busy machine each parallel region waits for a
    descheduled thread: 1 thread makes the tiny tests ~5x faster there. The base-size test keeps the default."""
    if "base_size" in request.node.name:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


RTOL = 1e-5  # relative to the largest magnitude of the reference: fp32 re-implementations agree to ~1e-6
VOCAB = 120


def assert_close(ours, ref, what=""):
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    err = (ours - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
    assert err < RTOL, f"{what}: relative error {err:.2e}"


def hf_tiny_config(link="add", share=True, image_size=64, cross_layers=2, **text):
    """A small transformers BridgeTowerConfig, written independently of model.py's config_to_hf."""
    text = dict(dict(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=256), **text)
    return T.BridgeTowerConfig(
        text_config=text, vision_config=dict(hidden_size=128, num_hidden_layers=4, patch_size=16, image_size=image_size),
        hidden_size=text["hidden_size"], num_attention_heads=text["num_attention_heads"],
        num_hidden_layers=cross_layers, link_tower_type=link, share_cross_modal_transformer_layers=share,
        contrastive_hidden_size=512, logit_scale_init_value=2.6592)  # HF v5 lacks these two defaults


def random_scalars(model):
    """Move the bridge scalars away from their init (1 and 0.5) so that the test sees their use."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("scaled_factor", "beta")):
                p.uniform_(0.2, 0.9)
    return model


def inputs(batch=3, length=9, image_size=64, seed=0, vocab=VOCAB):
    """Text with a different amount of right padding per row (row 0 none), and images."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    ids[:, 0] = 0
    lengths = [max(3, length - 3 * i) for i in range(batch)]
    mask = torch.zeros(batch, length, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n - 1] = 2
    ids[mask == 0] = 1
    pixels = torch.randn(batch, 3, image_size, image_size, generator=g)
    return ids, mask, pixels


def saved(hf_model, tmp_path, name="hf"):
    path = tmp_path / name
    hf_model.save_pretrained(path)
    return str(path)


# -----------------------------------------------------------------------------
# transformers -> ours: every output and head, link types, shared/unshared transforms, padded batches

@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("link", ["add", "scaled_add", "interpolate"])
def test_parity_mlm_itm_features(tmp_path, link, share):
    torch.manual_seed(0)
    ids, mask, pixels = inputs()
    for cls, head in ((T.BridgeTowerForMaskedLM, "mlm"), (T.BridgeTowerForImageAndTextRetrieval, "itm")):
        hf = random_scalars(cls(hf_tiny_config(link, share))).eval()
        ours = BridgeTower.from_pretrained(saved(hf, tmp_path, head)).eval()
        assert ours.config.heads == (head,) and ours.config.link_tower_type == link
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels)
            ref_body = hf.bridgetower(input_ids=ids, attention_mask=mask, pixel_values=pixels)
            out = ours(ids, attention_mask=mask, pixel_values=pixels)
        for key in ("text_features", "image_features", "pooler_output"):
            assert_close(getattr(out, key), ref_body[key], f"{head} {key}")
        assert_close(getattr(out, f"{head}_logits"), ref.logits, f"{head} logits")


def test_parity_contrastive(tmp_path):
    torch.manual_seed(1)
    ids, mask, pixels = inputs(batch=4)
    hf = T.BridgeTowerForContrastiveLearning(hf_tiny_config("scaled_add")).eval()
    with torch.no_grad():
        hf.logit_scale.fill_(3.1)
    ours = BridgeTower.from_pretrained(saved(hf, tmp_path)).eval()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_loss=True)
        out = ours(ids, attention_mask=mask, pixel_values=pixels)
        loss = contrastive_loss(out.text_embeds, out.image_embeds, out.cross_embeds, ours.logit_scale)
    for key in ("text_embeds", "image_embeds", "cross_embeds"):
        assert_close(getattr(out, key), ref[key], key)
    assert_close(loss, ref.loss, "contrastive loss")


def test_parity_base_size(tmp_path):
    """The full base config once: BridgeTowerModel, batch 2, short text with one padded row."""
    torch.manual_seed(0)
    hf = T.BridgeTowerModel(T.BridgeTowerConfig()).eval()
    ours = BridgeTower.from_pretrained(saved(hf, tmp_path)).eval()
    assert ours.config == BridgeTowerConfig.preset("base", heads=())
    # HF 326,347,008 includes the RoBERTa pooler (590,592), which we do not build
    assert sum(p.numel() for p in ours.parameters()) == 326_347_008 - 590_592
    ids, mask, pixels = inputs(batch=2, length=8, image_size=288, vocab=50265)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        out = ours(ids, attention_mask=mask, pixel_values=pixels)
    for key in ("text_features", "image_features", "pooler_output"):
        assert_close(getattr(out, key), ref[key], key)


def test_parameter_counts_of_presets():
    """Parameter counts of HF's BridgeTowerModel and its heads at the released sizes, less the unused text pooler;
    built on the meta device."""
    with torch.device("meta"):
        base = BridgeTower(BridgeTowerConfig.preset("base", heads=("mlm", "itm", "itc")))
        large = BridgeTower(BridgeTowerConfig.preset("large", heads=()))
    count = lambda m, prefix="": sum(p.numel() for n, p in m.named_parameters() if n.startswith(prefix))
    assert count(large) == 864_514_048 - 1_049_600
    assert count(base, "mlm_score") == 365_592_921 - 326_347_008
    assert count(base, "itm_score") == 326_350_082 - 326_347_008
    assert count(base, "itc_") + count(base, "logit_scale") == 327_921_409 - 326_347_008


def test_position_interpolation_matches_hf(tmp_path):
    """A 64-px checkpoint loaded at 96 px equals HF's interpolate_pos_encoding=True at 96 px."""
    torch.manual_seed(2)
    hf = T.BridgeTowerModel(hf_tiny_config()).eval()
    ours = BridgeTower.from_pretrained(saved(hf, tmp_path), image_size=96).eval()
    assert ours.vision_model.visual.embeddings.position_embedding.weight.shape[0] == 6 * 6 + 1
    ids, mask, pixels = inputs(image_size=96)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, interpolate_pos_encoding=True)
        out = ours(ids, attention_mask=mask, pixel_values=pixels)
    for key in ("text_features", "image_features", "pooler_output"):
        assert_close(getattr(out, key), ref[key], key)
    with pytest.raises(ValueError, match="96x96"):
        ours(ids, pixel_values=torch.zeros(1, 3, 64, 64))
    # an fp16 table (OpenAI's archives) is resized in fp32 and stays fp32, as the model's own table is
    table = torch.randn(1 + 4 * 4, 8).half()
    resized = resize_position_table(table, 6)
    assert resized.dtype == torch.float32 and torch.equal(resized, resize_position_table(table.float(), 6))


# -----------------------------------------------------------------------------
# ours -> transformers: save_pretrained loads into every HF class with no missing key, same outputs

def test_save_pretrained_loads_in_transformers(tmp_path):
    torch.manual_seed(3)
    config = BridgeTowerConfig.preset("tiny", vocab_size=VOCAB, link_tower_type="interpolate",
                                      heads=("mlm", "itm", "itc", "vqa"), num_vqa_answers=7)
    ours = random_scalars(BridgeTower(config)).eval()
    ours.save_pretrained(tmp_path / "ours")
    # readable by others as any new file is (safetensors alone writes 0600, which other users cannot load)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "config.json"):
        assert os.stat(tmp_path / "ours" / name).st_mode & 0o777 == 0o666 & ~umask, name
    ids, mask, pixels = inputs()
    with torch.no_grad():
        out = ours(ids, attention_mask=mask, pixel_values=pixels)
        for cls, field in ((T.BridgeTowerForMaskedLM, "mlm_logits"), (T.BridgeTowerForImageAndTextRetrieval, "itm_logits"),
                           (T.BridgeTowerForContrastiveLearning, "text_embeds")):
            hf, info = cls.from_pretrained(tmp_path / "ours", output_loading_info=True)
            assert not info["missing_keys"] and not info["mismatched_keys"], (cls.__name__, info)
            ref = hf.eval()(input_ids=ids, attention_mask=mask, pixel_values=pixels)
            if field == "text_embeds":
                for key in ("text_embeds", "image_embeds", "cross_embeds"):
                    assert_close(getattr(out, key), ref[key], key)
            else:
                assert_close(getattr(out, field), ref.logits, field)
        # and back: our own directory reproduces everything, the VQA head included
        again = BridgeTower.from_pretrained(tmp_path / "ours").eval()
        assert again.config == config
        out2 = again(ids, attention_mask=mask, pixel_values=pixels)
    for key in ("text_features", "image_features", "pooler_output", "mlm_logits", "itm_logits", "vqa_logits"):
        assert torch.equal(getattr(out, key), getattr(out2, key)), key


def test_load_report_names_what_is_ignored(tmp_path, capsys):
    # HF's files hold a RoBERTa pooler that BridgeTower never runs: reported; ours hold it as zeros: not reported
    hf = T.BridgeTowerForMaskedLM(hf_tiny_config())
    ours = BridgeTower.from_pretrained(saved(hf, tmp_path))
    assert "ignored 2 keys on purpose: text_model.pooler.dense.bias, text_model.pooler.dense.weight" in \
        capsys.readouterr().out
    ours.save_pretrained(tmp_path / "ours")
    BridgeTower.from_pretrained(str(tmp_path / "ours"))
    assert "on purpose" not in capsys.readouterr().out


def test_heads_requested_and_dropped(tmp_path, capsys):
    torch.manual_seed(4)
    hf = T.BridgeTowerForMaskedLM(hf_tiny_config()).eval()
    path = saved(hf, tmp_path)
    ours = BridgeTower.from_pretrained(path, heads=("vqa",), num_vqa_answers=11)
    report = capsys.readouterr().out
    assert "head mlm: in the checkpoint, not requested: dropped" in report
    assert "head vqa: not in the checkpoint: freshly initialised" in report
    assert not hasattr(ours, "mlm_score")
    head = ours.vqa_classifier
    assert [type(m) for m in head] == [nn.Linear, nn.LayerNorm, nn.GELU, nn.Linear]
    assert head[0].weight.shape == (512, 256) and head[3].weight.shape == (11, 512)
    assert abs(head[0].weight.std().item() - 0.02) < 0.002 and head[3].bias.abs().max() == 0
    ids, mask, pixels = inputs()
    out = ours.eval()(ids, attention_mask=mask, pixel_values=pixels)
    assert out.vqa_logits.shape == (3, 11) and out.mlm_logits is None


def test_bin_and_sharded_weight_files(tmp_path):
    """pytorch_model.bin (older hub checkpoints) and sharded *.index.json directories load the same tensors."""
    import json
    import shutil
    from safetensors.torch import load_file, save_file
    torch.manual_seed(13)
    path = saved(T.BridgeTowerForImageAndTextRetrieval(hf_tiny_config()), tmp_path)
    state = load_file(os.path.join(path, "model.safetensors"))
    reference = BridgeTower.from_pretrained(path).state_dict()
    bin_dir, shard_dir = tmp_path / "bin", tmp_path / "shards"
    for d in (bin_dir, shard_dir):
        d.mkdir()
        shutil.copy(os.path.join(path, "config.json"), d)
    torch.save(state, bin_dir / "pytorch_model.bin")
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, shard_dir / name)
    index = {"weight_map": {k: name for name, names in shards.items() for k in names}}
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    for d in (bin_dir, shard_dir):
        loaded = BridgeTower.from_pretrained(str(d)).state_dict()
        assert loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in loaded)


# -----------------------------------------------------------------------------
# Original Lightning .ckpt

def to_original_names(state):
    """Our (HF) names -> microsoft/BridgeTower names, written independently of model.py's mapping."""
    out = {}
    for k, v in state.items():
        k = k.replace("text_model.", "text_transformer.", 1) if k.startswith("text_model.") else k
        if k.startswith("vision_model.visual."):
            k = "vit_model.visual." + k[len("vision_model.visual."):]
            k = (k.replace("embeddings.patch_embedding.", "conv1.").replace("embeddings.class_embedding", "class_embedding")
                 .replace("embeddings.position_embedding.weight", "positional_embedding"))
        out[k] = v
    return out


def test_original_checkpoint(tmp_path, capsys):
    torch.manual_seed(5)
    hf = T.BridgeTowerForMaskedLM(hf_tiny_config()).eval()
    state = {k.removeprefix("bridgetower."): v for k, v in hf.state_dict().items()}
    original = to_original_names(state)
    W = 128
    original.update({  # what the original files also hold, ignored on purpose
        "vit_model.positional_embedding": torch.zeros(77, 512), "vit_model.ln_final.weight": torch.ones(512),
        "vit_model.ln_final.bias": torch.zeros(512), "temperature": torch.tensor(0.07),
        "text_transformer.embeddings.position_ids": torch.arange(514)[None],
        "itm_score.fc.weight": torch.randn(2, 2 * W), "itm_score.fc.bias": torch.zeros(2),
        "nlvr2_classifier.0.weight": torch.randn(4, 4 * W),  # a head we do not implement: dropped, reported
    })
    # NLVR2 fine-tuning appends a token type for the second image of a pair; rows 0 and 1 keep their meaning
    original["token_type_embeddings.weight"] = torch.cat([original["token_type_embeddings.weight"], torch.randn(1, W)])
    path = tmp_path / "BridgeTower_pt_tiny.ckpt"
    torch.save({"epoch": 3, "global_step": 1000, "state_dict": original, "hyper_parameters": {"config": {}}}, path)

    ours = BridgeTower.from_pretrained(str(path)).eval()
    report = capsys.readouterr().out
    assert "dropped: nlvr2_classifier" in report and "NLVR2's third row" in report
    c = ours.config
    assert (c.hidden_size, c.num_heads, c.text_layers, c.vision_layers, c.cross_layers, c.image_size) == (128, 2, 4, 4, 2, 64)
    assert c.cross_layer_norm_eps == 1e-12 and c.heads == ("mlm", "itm")
    assert ours.cross_modal_text_layers[0].output.LayerNorm.eps == 1e-12
    assert ours.mlm_score.transform.LayerNorm.eps == 1e-12
    assert torch.equal(ours.itm_score.fc.weight, original["itm_score.fc.weight"])

    # The original files carry no head count: it is inferred as hidden_size // 64 (true of RoBERTa base and
    # large); this tiny model has 4. With those and HF's eps every output equals HF's: all weights landed right.
    ours = BridgeTower.from_pretrained(str(path), num_heads=4, cross_layer_norm_eps=1e-5).eval()
    ids, mask, pixels = inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        out = ours(ids, attention_mask=mask, pixel_values=pixels)
    assert_close(out.mlm_logits, ref.logits, "mlm logits")


@pytest.mark.parametrize("link", ["scaled_add", "interpolate"])
def test_original_checkpoint_bridge_scalars(tmp_path, link):
    # the link type of an original file is read off its bridge scalars' names (scaled_factor, beta)
    torch.manual_seed(5)
    hf = random_scalars(T.BridgeTowerForMaskedLM(hf_tiny_config(link))).eval()
    original = to_original_names({k.removeprefix("bridgetower."): v for k, v in hf.state_dict().items()})
    path = tmp_path / "BridgeTower_pt_tiny.ckpt"
    torch.save({"state_dict": original}, path)
    ours = BridgeTower.from_pretrained(str(path), num_heads=4, cross_layer_norm_eps=1e-5).eval()
    assert ours.config.link_tower_type == link
    ids, mask, pixels = inputs()
    with torch.no_grad():
        assert_close(ours(ids, attention_mask=mask, pixel_values=pixels).mlm_logits,
                     hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, "mlm logits")


class _RunsCode:
    """What a pickled object can do when a file is unpickled fully: call any function, here os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Calls:
    """A pickled call of fn(*args), as _RunsCode is of os.system"""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


class _AttributeDict(dict):  # Lightning's hyper-parameter container is a dict subclass
    pass


def test_original_checkpoint_runs_no_code_from_the_file(tmp_path, capsys, monkeypatch):
    # A Lightning .ckpt pickles the training config's objects next to the tensors, so weights_only=True refuses
    # it. Reading it must still not run what the pickle names (os.system here): only the tensors are used.
    torch.manual_seed(6)
    hf = T.BridgeTowerForMaskedLM(hf_tiny_config()).eval()
    original = to_original_names({k.removeprefix("bridgetower."): v for k, v in hf.state_dict().items()})
    marker, written = tmp_path / "code_ran", tmp_path / "file_written"
    # the torch module's names resolve too, but only to storages, dtypes, layouts and memory formats: not to
    # torch.save (pickled under that name, as the unpickler would meet it) or torch.set_default_dtype
    monkeypatch.setattr(torch.serialization.save, "__module__", "torch")
    hyper = _AttributeDict(config=argparse.Namespace(lr=np.float64(1e-5), sizes=np.arange(3)), hook=_RunsCode(marker),
                           save=_Calls(torch.save, {}, str(written)),
                           dtype=_Calls(torch.set_default_dtype, torch.float64))
    path = tmp_path / "BridgeTower_pt_tiny.ckpt"
    torch.save({"state_dict": original, "hyper_parameters": hyper}, path)
    monkeypatch.undo()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    try:
        ours = BridgeTower.from_pretrained(str(path))
    finally:
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
    assert not marker.exists() and not written.exists() and default_dtype == torch.float32
    assert "holds objects other than tensors" in capsys.readouterr().out
    loaded = ours.state_dict()
    assert torch.equal(loaded["cross_modal_text_layers.0.attention.self.query.weight"],
                       original["cross_modal_text_layers.0.attention.self.query.weight"])
    assert torch.equal(loaded["text_model.embeddings.word_embeddings.weight"],
                       original["text_transformer.embeddings.word_embeddings.weight"])


# -----------------------------------------------------------------------------
# Uni-modal initialisation: RoBERTa and CLIP (HF directories and OpenAI's TorchScript archive)

def our_text_encoder(model, ids, mask):
    t = model.text_model.embeddings(ids)
    key_mask = mask.bool() if not mask.all() else None
    for layer in model.text_model.encoder.layer:
        t = layer(t, key_mask)
    return t


def our_vision_encoder(model, pixels):
    visual = model.vision_model.visual
    v = visual.ln_pre(visual.embeddings(pixels))
    for block in visual.transformer.resblocks:
        v = block(v)
    return v


def roberta_config():
    return T.RobertaConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=256, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5)


@pytest.mark.parametrize("cls", [T.RobertaModel, T.RobertaForMaskedLM])
def test_text_encoder_from_roberta(tmp_path, cls):
    torch.manual_seed(6)
    roberta = cls(roberta_config()).eval()
    ours = BridgeTower.from_unimodal(BridgeTowerConfig.preset("tiny", vocab_size=VOCAB), text_path=saved(roberta, tmp_path)).eval()
    ids, mask, _ = inputs()
    body = roberta if cls is T.RobertaModel else roberta.roberta
    with torch.no_grad():
        ref = body(input_ids=ids, attention_mask=mask).last_hidden_state
        out = our_text_encoder(ours, ids, mask)
    real = mask.bool()  # HF's padded rows are garbage too, but computed the same way; compare real tokens
    assert_close(out[real], ref[real], "text encoder")


def clip_vision_config(image_size=32):
    return T.CLIPVisionConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=2, intermediate_size=512,
                              patch_size=16, image_size=image_size)


def check_vision(ours, clip, pixels):
    """Our blocks vs HF CLIP's encoder, at 64 px from a 32-px position table (interpolated on load)."""
    with torch.no_grad():
        ref = clip(pixel_values=pixels, interpolate_pos_encoding=True)
        v = our_vision_encoder(ours, pixels)
    assert_close(v, ref.last_hidden_state, "vision blocks")
    assert_close(ours.vision_model.visual.ln_post(v[:, 0]), ref.pooler_output, "ln_post(class token)")


@pytest.mark.parametrize("whole_clip", [False, True])
def test_vision_encoder_from_hf_clip(tmp_path, whole_clip):
    torch.manual_seed(7)
    if whole_clip:
        text = T.CLIPTextConfig(vocab_size=50, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64)
        model = T.CLIPModel(T.CLIPConfig(text_config=text.to_dict(), vision_config=clip_vision_config().to_dict()))
        clip = model.vision_model.eval()
    else:
        model = clip = T.CLIPVisionModel(clip_vision_config()).eval()
    ours = BridgeTower.from_unimodal(BridgeTowerConfig.preset("tiny", vocab_size=VOCAB), vision_path=saved(model, tmp_path)).eval()
    check_vision(ours, clip, torch.randn(2, 3, 64, 64))


class OpenAIArchive(nn.Module):
    """Holds tensors under OpenAI CLIP's state-dict names; scripted and saved like ViT-B-16.pt."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def openai_archive(clip, path):
    """Write HF CLIP vision weights in OpenAI's layout (visual.*, packed in_proj, fp16 as OpenAI ships them)
    plus text-tower tensors, as a TorchScript archive."""
    sd = {k.removeprefix("vision_model."): v for k, v in clip.state_dict().items()}
    names = {"embeddings.patch_embedding.weight": "conv1.weight", "embeddings.class_embedding": "class_embedding",
             "embeddings.position_embedding.weight": "positional_embedding", "pre_layrnorm.weight": "ln_pre.weight",
             "pre_layrnorm.bias": "ln_pre.bias", "post_layernorm.weight": "ln_post.weight", "post_layernorm.bias": "ln_post.bias"}
    visual = {new: sd[old] for old, new in names.items()}
    visual["proj"] = torch.randn(128, 64)
    for i in range(clip.config.num_hidden_layers):
        a, b = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            visual[b + f"attn.in_proj_{kind}"] = torch.cat([sd[a + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for old, new in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                visual[b + f"{new}.{kind}"] = sd[a + f"{old}.{kind}"]
    tensors = {"visual." + k: v for k, v in visual.items()}
    tensors.update({"positional_embedding": torch.zeros(77, 64), "token_embedding.weight": torch.zeros(50, 64),
                    "transformer.resblocks.0.ln_1.weight": torch.ones(64), "ln_final.weight": torch.ones(64),
                    "text_projection": torch.zeros(64, 64), "logit_scale": torch.tensor(4.6)})
    archive = OpenAIArchive()
    for name, tensor in tensors.items():
        owner = archive
        *parents, leaf = name.split(".")
        for p in parents:
            if not hasattr(owner, p):
                owner.add_module(p, nn.Module())
            owner = getattr(owner, p)
        owner.register_parameter(leaf, nn.Parameter(tensor.detach().clone().half(), requires_grad=False))
    torch.jit.save(torch.jit.script(archive), str(path))


def test_vision_encoder_from_openai_archive(tmp_path):
    torch.manual_seed(8)
    clip = T.CLIPVisionModel(clip_vision_config()).eval()
    with torch.no_grad():  # OpenAI ships fp16: round the reference the same way
        for p in clip.parameters():
            p.copy_(p.half().float())
    openai_archive(clip, tmp_path / "ViT-tiny.pt")
    ours = BridgeTower.from_unimodal(BridgeTowerConfig.preset("tiny", vocab_size=VOCAB), vision_path=str(tmp_path / "ViT-tiny.pt"))
    check_vision(ours.eval(), clip, torch.randn(2, 3, 64, 64))


# -----------------------------------------------------------------------------
# Clear errors on the wrong checkpoint

def test_errors_name_the_file_and_keys(tmp_path):
    from safetensors.torch import load_file, save_file
    torch.manual_seed(9)
    path = saved(T.BridgeTowerForImageAndTextRetrieval(hf_tiny_config()), tmp_path)
    weights = os.path.join(path, "model.safetensors")
    state = load_file(weights)
    state.pop("bridgetower.cross_modal_text_pooler.dense.bias")
    state.pop("itm_score.fc.bias")  # a head the file has, less one of its tensors: not left at its random init
    state["bridgetower.cross_modal_text_mystery.weight"] = torch.zeros(3)
    state["itm_score.fc.weight"] = torch.zeros(2, 7)
    save_file(state, weights)
    with pytest.raises(CheckpointError) as e:
        BridgeTower.from_pretrained(path)
    msg = str(e.value)
    assert weights in msg
    assert "missing: cross_modal_text_pooler.dense.bias, itm_score.fc.bias" in msg
    assert "unexpected: cross_modal_text_mystery.weight" in msg
    assert "mis-shaped: itm_score.fc.weight (file (2, 7), model (2, 256))" in msg

    roberta = saved(T.RobertaModel(roberta_config()), tmp_path, "roberta")
    with pytest.raises(CheckpointError, match="describes a 'roberta' model, not a BridgeTower: .*--text_init"):
        BridgeTower.from_pretrained(roberta)
    # an encoder path that holds another kind of model, or nothing: what it holds and where that belongs
    tiny = BridgeTowerConfig.preset("tiny", vocab_size=VOCAB)
    with pytest.raises(ModelTypeError, match="hf: config.json describes a 'bridgetower' model, not a RoBERTa: a whole "
                                             r"model, for from_pretrained \(pretrain.py --init_from\)"):
        BridgeTower.from_unimodal(tiny, text_path=path)
    with pytest.raises(ModelTypeError, match="roberta: config.json describes a 'roberta' model, not a CLIP image "
                                             "encoder: .*text_path"):
        BridgeTower.from_unimodal(tiny, vision_path=roberta)
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such RoBERTa directory$"):
        BridgeTower.from_unimodal(tiny, text_path=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="openai/clip-vit-base-patch16: no such CLIP directory or OpenAI "
                                                "archive; if it is a hub id, note that this loads local files only"):
        BridgeTower.from_unimodal(tiny, vision_path="openai/clip-vit-base-patch16")
    with pytest.raises(CheckpointError, match="num_hidden_layers=4 \\(model needs 6\\)"):
        BridgeTower.from_unimodal(BridgeTowerConfig.preset("tiny", vocab_size=VOCAB, text_layers=6, vision_layers=6), text_path=roberta)
    # the blocks' activations are fixed (RoBERTa's erf GELU, OpenAI CLIP's quick_gelu), so an encoder trained with
    # another one, such as an OpenCLIP conversion's "gelu", is refused rather than run with the wrong one
    text, vision = roberta_config(), clip_vision_config()
    text.hidden_act, vision.hidden_act = "gelu_new", "gelu"
    other_act = {"text_path": T.RobertaModel(text), "vision_path": T.CLIPVisionModel(vision)}
    for argument, encoder in other_act.items():
        with pytest.raises(CheckpointError, match="config does not match the model: hidden_act='gelu.*' "
                                                  "\\(model needs '(quick_)?gelu'\\)"):
            BridgeTower.from_unimodal(tiny, **{argument: saved(encoder, tmp_path, argument)})
    state = load_file(os.path.join(roberta, "model.safetensors"))
    del state["encoder.layer.3.output.dense.weight"]
    save_file(state, os.path.join(roberta, "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing: text_model.encoder.layer.3.output.dense.weight"):
        BridgeTower.from_unimodal(BridgeTowerConfig.preset("tiny", vocab_size=VOCAB), text_path=roberta)
    with pytest.raises(CheckpointError, match="not a BridgeTower checkpoint"):
        torch.save({"state_dict": {"foo": torch.zeros(1)}}, tmp_path / "foo.ckpt")
        BridgeTower.from_pretrained(str(tmp_path / "foo.ckpt"))

    # a config or a tensor that describes no valid model: still an error that names the file
    config_path = os.path.join(path, "config.json")
    hf_config = json.load(open(config_path))
    json.dump({**hf_config, "link_tower_type": "concat"}, open(config_path, "w"))
    with pytest.raises(CheckpointError, match=f"{weights}: BridgeTowerConfig: link_tower_type 'concat'"):
        BridgeTower.from_pretrained(path)
    original = to_original_names({k.removeprefix("bridgetower."): v for k, v in load_file(weights).items()})
    original["vit_model.visual.positional_embedding"] = torch.zeros(16, 128)
    torch.save({"state_dict": original}, tmp_path / "bad_positions.ckpt")
    with pytest.raises(CheckpointError, match=r"bad_positions.ckpt: .*position_embedding.weight has 16 rows"):
        BridgeTower.from_pretrained(str(tmp_path / "bad_positions.ckpt"))

    # files that are not checkpoints at all: errors that name them, not torch's or safetensors' tracebacks
    with pytest.raises(FileNotFoundError, match=r"nowhere.ckpt: no such checkpoint \(an HF directory or an original "
                                                r"\.ckpt\)$"):
        BridgeTower.from_pretrained(str(tmp_path / "nowhere.ckpt"))
    # a hub id, which transformers would download: the message says how to get it
    with pytest.raises(FileNotFoundError, match="if it is a hub id, note that this loads local files only: download "
                                                r"it first \(hf download BridgeTower/bridgetower-base-itm-mlm"):
        BridgeTower.from_pretrained("BridgeTower/bridgetower-base-itm-mlm")
    shutil.copy(weights, tmp_path / "renamed.safetensors")  # HF weights without their directory and config.json
    with pytest.raises(CheckpointError, match="renamed.safetensors: a file of an HF checkpoint alone; give the "
                                              "directory"):
        BridgeTower.from_pretrained(str(tmp_path / "renamed.safetensors"))
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.ckpt: cannot be read as a checkpoint"):
        BridgeTower.from_pretrained(str(tmp_path / "empty.ckpt"))
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")  # a whole pickled module, not its state dict
    with pytest.raises(CheckpointError, match="module.pt: holds no state dict of tensors"):
        BridgeTower.from_pretrained(str(tmp_path / "module.pt"))
    torch.save({"model": {}, "model_config": {}, "optimizer": {}, "step": 3}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="ckpt.pt is a training checkpoint of this project's scripts"):
        BridgeTower.from_pretrained(str(tmp_path / "ckpt.pt"))
    fresh = saved(T.BridgeTowerForImageAndTextRetrieval(hf_tiny_config()), tmp_path, "fresh")
    fresh_weights = os.path.join(fresh, "model.safetensors")
    assert BridgeTower.from_pretrained(fresh_weights).config.heads == ("itm",)  # a file of the directory: the directory
    with pytest.raises(ValueError, match="model.safetensors loaded with image_size=100: .*image_size 100 not a multiple") as e:
        BridgeTower.from_pretrained(fresh, image_size=100)  # the override is at fault, not the file
    assert not isinstance(e.value, CheckpointError)
    open(fresh_weights, "r+b").truncate(1000)
    with pytest.raises(CheckpointError, match="model.safetensors: cannot be read as a weights file"):
        BridgeTower.from_pretrained(fresh)
    open(config_path, "w").write("{")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        BridgeTower.from_pretrained(path)


# -----------------------------------------------------------------------------
# Behaviour of our own model

def test_every_parameter_gets_a_gradient():
    torch.manual_seed(10)
    config = BridgeTowerConfig.preset("tiny", vocab_size=VOCAB, link_tower_type="scaled_add",
                                      share_cross_modal_transform=True, heads=("mlm", "itm", "itc", "vqa"), num_vqa_answers=5)
    model = BridgeTower(config).train()
    ids, mask, pixels = inputs(batch=4)
    out = model(ids, attention_mask=mask, pixel_values=pixels)
    loss = (F.cross_entropy(out.mlm_logits.flatten(0, 1), ids.flatten()) + F.cross_entropy(out.itm_logits, torch.tensor([1, 0, 1, 0]))
            + contrastive_loss(out.text_embeds, out.image_embeds, out.cross_embeds, model.logit_scale)
            + F.binary_cross_entropy_with_logits(out.vqa_logits, torch.rand(4, 5)))
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not no_grad, no_grad


def test_dropout_where_the_original_has_it(monkeypatch):
    # the parity tests run in eval mode or with dropout 0, so they cannot see a dropout that went missing: count
    # the calls. Hidden dropout: the text embeddings and every dense sub-layer output of the text layers (2 each)
    # and of both cross-modal streams (3 each); attention dropout: every text and cross attention, none in CLIP
    import model as model_lib
    real_dropout, real_attention = F.dropout, model_lib.attention
    hidden, attn = [], []
    monkeypatch.setattr(model_lib.F, "dropout", lambda x, p=0.5, training=True, inplace=False:
                        hidden.append((p, training)) or real_dropout(x, p, training, inplace))
    monkeypatch.setattr(model_lib, "attention", lambda q, k, v, key_mask=None, dropout_p=0.0, kernels="auto":
                        attn.append(dropout_p) or real_attention(q, k, v, key_mask, dropout_p, kernels))
    config = BridgeTowerConfig.preset("tiny", vocab_size=VOCAB, hidden_dropout=0.2, attention_dropout=0.3,
                                      heads=("itm",))
    model = BridgeTower(config).train()
    T, C = config.text_layers, config.cross_layers
    ids, mask, pixels = inputs()
    model(ids, attention_mask=mask, pixel_values=pixels)
    assert hidden == [(0.2, True)] * (1 + 2 * T + 2 * 3 * C)
    assert attn.count(0.3) == T + 2 * 2 * C and attn.count(0.0) == T  # the CLIP blocks beside the text layers
    hidden.clear(), attn.clear()
    model.eval()(ids, attention_mask=mask, pixel_values=pixels)
    assert all(not training for _, training in hidden) and set(attn) == {0.0}


def test_every_add_layer_norm_runs_at_its_eps(monkeypatch):
    # the fused add + LayerNorm gets eps as an argument, not from the module's forward, and parity cannot tell
    # 1e-12 from 1e-5: record what each call gets. Text layers and bridges at layer_norm_eps, the three residuals
    # of a cross layer (self-attention, cross-attention, FFN) at cross_layer_norm_eps
    import model as model_lib
    real, seen = model_lib.bridge_add_layer_norm, []

    def recording(h, c, weight, bias, eps, *args, **kwargs):
        seen.append(eps)
        return real(h, c, weight, bias, eps, *args, **kwargs)

    monkeypatch.setattr(model_lib, "bridge_add_layer_norm", recording)
    config = BridgeTowerConfig.preset("tiny", vocab_size=VOCAB, layer_norm_eps=1e-6, cross_layer_norm_eps=1e-12,
                                      heads=("itm",))
    ids, mask, pixels = inputs()
    with torch.no_grad():
        BridgeTower(config).eval()(ids, attention_mask=mask, pixel_values=pixels)
    T, C = config.text_layers, config.cross_layers
    assert len(seen) == seen.count(1e-6) + seen.count(1e-12)
    assert (seen.count(1e-6), seen.count(1e-12)) == (2 * T + 2 * (C - 1), 2 * 3 * C)


def test_vqa_head_is_the_originals():
    # HF has no VQA head to compare with: the original's Linear(2H, 4H), LayerNorm(4H) at layer_norm_eps, exact
    # (erf) GELU, Linear(4H, answers) on the pooler output, worked out by hand
    torch.manual_seed(3)
    config = BridgeTowerConfig.preset("tiny", vocab_size=VOCAB, heads=("vqa",), num_vqa_answers=7, layer_norm_eps=1e-6)
    model = BridgeTower(config).eval()
    ids, mask, pixels = inputs()
    with torch.no_grad():
        for p in model.vqa_classifier.parameters():
            p.normal_()  # away from the init, so that the LayerNorm's affine and the GELU's shape matter
        out = model(ids, attention_mask=mask, pixel_values=pixels)
        first, norm, _, last = model.vqa_classifier
        x = F.linear(out.pooler_output, first.weight, first.bias)
        x = F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, 1e-6)
        want = F.linear(0.5 * x * (1 + torch.erf(x / 2 ** 0.5)), last.weight, last.bias)
    assert out.vqa_logits.shape == (3, 7)
    assert_close(out.vqa_logits, want, "vqa logits")


def test_unshared_transforms_get_gradients():
    model = BridgeTower(BridgeTowerConfig.preset("tiny", vocab_size=VOCAB, share_cross_modal_transform=False,
                                                 link_tower_type="interpolate", heads=("itm",)))
    ids, mask, pixels = inputs()
    model(ids, attention_mask=mask, pixel_values=pixels).itm_logits.sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not no_grad, no_grad


def test_mlm_pass_and_positions():
    """heads=("mlm",) skips what MLM does not read, with the same logits; mlm_positions picks rows, given as a
    boolean mask or as row-major indices (pre-training's, found on the host)."""
    torch.manual_seed(11)
    model = BridgeTower(BridgeTowerConfig.preset("tiny", vocab_size=VOCAB)).eval()
    ids, mask, pixels = inputs()
    with torch.no_grad():
        full = model(ids, attention_mask=mask, pixel_values=pixels)
        mlm = model(ids, attention_mask=mask, pixel_values=pixels, heads=("mlm",))
        where = torch.rand(ids.shape) < 0.3
        picked = model(ids, attention_mask=mask, pixel_values=pixels, heads=("mlm",), mlm_positions=where)
        indexed = model(ids, attention_mask=mask, pixel_values=pixels, heads=("mlm",),
                        mlm_positions=torch.nonzero(where.flatten()).flatten())
    assert torch.equal(full.mlm_logits, mlm.mlm_logits)
    assert mlm.image_features is None and mlm.pooler_output is None and mlm.itm_logits is None
    assert where.sum() > 1 and not where.all()
    torch.testing.assert_close(picked.mlm_logits, full.mlm_logits[where])
    torch.testing.assert_close(indexed.mlm_logits, full.mlm_logits[where])
    with pytest.raises(ValueError, match="vqa"):
        model(ids, pixel_values=pixels, heads=("vqa",))


def test_image_inputs_replace_the_vision_tower():
    """image_inputs= (from return_image_inputs or encode_image, rows in any order) gives what pixel_values of those
    rows give, with the ITC embeddings; wrong counts and row numbers are errors that say what is expected."""
    torch.manual_seed(13)
    model = BridgeTower(BridgeTowerConfig.preset("tiny", vocab_size=VOCAB, heads=("itm", "itc"))).eval()
    ids, mask, pixels = inputs(batch=3)
    order = torch.tensor([2, 0, 2])
    with torch.no_grad():
        first = model(ids, attention_mask=mask, pixel_values=pixels, return_image_inputs=True)
        want = model(ids, attention_mask=mask, pixel_values=pixels[order])
        got = model(ids, attention_mask=mask, image_inputs=[x[order] for x in first.image_inputs])
        tower = model.encode_image(pixels)
    assert want.image_inputs is None and len(first.image_inputs) == model.config.cross_layers
    assert all(torch.equal(a, b) for a, b in zip(tower, first.image_inputs))
    for name in ("pooler_output", "itm_logits", "text_embeds", "image_embeds", "cross_embeds", "image_features"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="one of them"):
        model(ids, pixel_values=pixels, image_inputs=tower)
    with pytest.raises(ValueError, match="expected 2 tensors .* of 3 rows"):
        model(ids, image_inputs=[x[:2] for x in tower])
    for wrong_count in (tower[:1], tuple(tower) + tuple(tower[:1])):  # one per cross layer, no more, no fewer
        with pytest.raises(ValueError, match="expected 2 tensors"):
            model(ids, attention_mask=mask, image_inputs=wrong_count)
    for flag in ("output_hidden_states", "output_attentions"):
        with pytest.raises(ValueError, match="need pixel_values"):
            model(ids, image_inputs=tower, **{flag: True})


def test_padding_is_invisible():
    """Whatever sits in padded positions changes nothing at the real tokens, nor the pooled output;
    an all-ones mask is the same as none."""
    torch.manual_seed(12)
    model = BridgeTower(BridgeTowerConfig.preset("tiny", vocab_size=VOCAB, heads=("itm",))).eval()
    ids, mask, pixels = inputs()
    other = torch.where(mask.bool(), ids, torch.randint(5, VOCAB, ids.shape))
    with torch.no_grad():
        a = model(ids, attention_mask=mask, pixel_values=pixels)
        b = model(other, attention_mask=mask, pixel_values=pixels)
        c = model(ids[:1], attention_mask=mask[:1], pixel_values=pixels[:1])
        d = model(ids[:1], pixel_values=pixels[:1])
    # padding sits at the right end, so the real tokens keep their positions whatever ids the padding holds
    real = mask.bool()
    torch.testing.assert_close(a.text_features[real], b.text_features[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(a.image_features, b.image_features, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.pooler_output, b.pooler_output, rtol=0, atol=1e-5)
    assert torch.equal(c.pooler_output, d.pooler_output)


def test_torch_compile_matches_eager():
    """pretrain.py / finetune_vqa.py --compile: the model traces and compiles (PyTorch path; one graph break at the
    padding check), and its MLM and ITM passes, the ITM one on the MLM one's image inputs and the MLM logits at
    row-major positions, as pretrain.py runs them, give eager's outputs and gradients."""
    import shutil
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("inductor needs a C++ compiler on the CPU")
    torch.manual_seed(13)
    config = BridgeTowerConfig.preset("tiny", vocab_size=VOCAB, heads=("mlm", "itm"), hidden_dropout=0.0,
                                      attention_dropout=0.0, link_tower_type="interpolate")
    model = BridgeTower(config)
    ids, mask, pixels = inputs()
    where = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.3
    where[:, 1] = True
    positions = torch.nonzero(where.flatten()).flatten()  # row-major indices, as pretrain.py gives them

    def step(m):  # m: the model or its compiled wrapper (same parameters)
        model.zero_grad(set_to_none=True)
        first = m(ids, attention_mask=mask, pixel_values=pixels, heads=("mlm",), mlm_positions=positions,
                  return_image_inputs=True)
        image_inputs = [x[torch.tensor([2, 0, 2])] for x in first.image_inputs]
        mlm = first.mlm_logits
        itm = m(ids, attention_mask=mask, image_inputs=image_inputs, heads=("itm",)).itm_logits
        (F.cross_entropy(mlm, ids[where]) + F.cross_entropy(itm, torch.tensor([1, 0, 1]))).backward()
        return mlm.detach(), itm.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager = step(model)
    try:
        compiled = step(torch.compile(model))
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-4, atol=1e-5)
    assert compiled[2].keys() == eager[2].keys()
    for name, grad in eager[2].items():
        torch.testing.assert_close(compiled[2][name], grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_config_checks_and_presets():
    tiny = BridgeTowerConfig.preset("tiny", vocab_size=300)
    assert (tiny.hidden_size, tiny.num_heads, tiny.vision_heads, tiny.cross_layers, tiny.image_grid) == (128, 4, 2, 2, 4)
    large = BridgeTowerConfig.preset("large")
    assert (large.patch_size, large.image_size, large.image_grid ** 2 + 1) == (14, 294, 442)
    for bad in (dict(heads=("mlm", "nlvr2")), dict(link_tower_type="concat"),
                dict(heads=("itc",), share_cross_modal_transform=False), dict(cross_layers=13)):
        with pytest.raises(ValueError):
            BridgeTowerConfig(**bad)
    # CLIP's heads: width // 64 of them, which must divide the width (100: one head of 100, which HF runs too)
    for width in (32, 200):
        with pytest.raises(ValueError, match=f"vision_width {width}: CLIP blocks have vision_width // 64 heads"):
            BridgeTowerConfig(vision_width=width)
    assert BridgeTowerConfig(vision_width=100).vision_heads == 1
    with pytest.raises(ValueError, match="patch_size 0 not positive; image_size 0 not positive"):
        BridgeTowerConfig(image_size=0, patch_size=0)  # not a ZeroDivisionError from the divisibility check
    with pytest.raises(ValueError, match="dropouts"):
        BridgeTowerConfig(attention_dropout=1.0)
    with pytest.raises(ValueError, match="hidden_size 128 not a multiple of num_heads 3"):
        BridgeTowerConfig.preset("tiny", num_heads=3)
    with pytest.raises(ValueError, match="kernels 'cuda' not one of"):
        BridgeTowerConfig(kernels="cuda")
    assert config_to_hf(tiny)["vision_config"]["hidden_size"] == 128


def test_save_pretrained_keeps_the_pad_token_id(tmp_path):
    config = BridgeTowerConfig.preset("tiny", vocab_size=VOCAB, pad_token_id=0, heads=("itm",))
    BridgeTower(config).save_pretrained(tmp_path / "ours")
    assert T.BridgeTowerConfig.from_pretrained(tmp_path / "ours").text_config.pad_token_id == 0
    assert BridgeTower.from_pretrained(tmp_path / "ours").config == config


def test_position_limit_counts_from_the_pad_id():
    # positions of a text of n tokens run pad + 1 .. pad + n: the table of 12 rows holds 11 tokens at pad 0, 8 at pad 3
    torch.manual_seed(27)
    pixels = inputs()[2][:1]
    ids = torch.randint(4, VOCAB, (1, 11))
    pad0 = BridgeTower(BridgeTowerConfig.preset("tiny", vocab_size=VOCAB, heads=("itm",), max_position_embeddings=12,
                                                pad_token_id=0)).eval()
    with torch.no_grad():
        pad0(ids, pixel_values=pixels)  # 11 tokens fit
    pad3 = BridgeTower(BridgeTowerConfig.preset("tiny", vocab_size=VOCAB, heads=("itm",), max_position_embeddings=12,
                                                pad_token_id=3)).eval()
    with pytest.raises(ValueError, match=r"a text of 9 tokens; .* holds 8"):
        pad3(ids[:, :9], pixel_values=pixels)


def test_original_checkpoint_with_unshared_transforms(tmp_path):
    torch.manual_seed(5)
    hf = T.BridgeTowerForMaskedLM(hf_tiny_config(share=False)).eval()
    original = to_original_names({k.removeprefix("bridgetower."): v for k, v in hf.state_dict().items()})
    path = tmp_path / "BridgeTower_pt_tiny.ckpt"
    torch.save({"state_dict": original}, path)
    ours = BridgeTower.from_pretrained(str(path), num_heads=4, cross_layer_norm_eps=1e-5).eval()
    assert not ours.config.share_cross_modal_transform
    ids, mask, pixels = inputs()
    with torch.no_grad():
        assert_close(ours(ids, attention_mask=mask, pixel_values=pixels).mlm_logits,
                     hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, "mlm logits")


def test_original_vqa_checkpoint_answer_count(tmp_path):
    torch.manual_seed(5)
    model = BridgeTower(BridgeTowerConfig.preset("tiny", vocab_size=VOCAB, heads=("vqa",), num_vqa_answers=7))
    original = to_original_names(model.state_dict())
    path = tmp_path / "BridgeTower_vqa_tiny.ckpt"
    torch.save({"state_dict": original}, path)
    ours = BridgeTower.from_pretrained(str(path))
    assert ours.config.heads == ("vqa",) and ours.config.num_vqa_answers == 7
    assert torch.equal(ours.vqa_classifier[3].weight, model.vqa_classifier[3].weight)


# -----------------------------------------------------------------------------
# A released checkpoint (HF's published checks), only when one is at hand

@pytest.mark.slow
def test_released_checkpoint():
    """HF's integration tests (tests/models/bridgetower/test_modeling_bridgetower.py), on our model.
    BRIDGETOWER_CKPT: an HF bridgetower-base-itm-mlm directory (with its tokenizer files);
    BRIDGETOWER_IMAGE: COCO val2017 000000039769 (two cats on a couch), HF's test image
    (tests/fixtures/tests_samples/COCO/000000039769.png in transformers). HF asserts its published losses to
    4 places on that PNG; we allow 1e-3 since a JPEG copy may decode a little differently, and compare our
    logits with transformers' own on the same input at the suite's fp32 tolerance."""
    path, image_path = os.environ.get("BRIDGETOWER_CKPT"), os.environ.get("BRIDGETOWER_IMAGE")
    if not path or not image_path:
        pytest.skip("set BRIDGETOWER_CKPT (HF bridgetower-base-itm-mlm dir) and BRIDGETOWER_IMAGE (COCO 000000039769)")
    from PIL import Image
    processor = T.BridgeTowerProcessor.from_pretrained(path)
    image = Image.open(image_path).convert("RGB")
    ours = BridgeTower.from_pretrained(path).eval()
    with torch.no_grad():
        # MLM: " cats" at the mask, and the loss over all 11 tokens with labels = input_ids (HF: 5.7373)
        enc = processor(image, "a bunch of <mask> laying on a tower.", return_tensors="pt")
        out = ours(enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=enc["pixel_values"])
        assert out.mlm_logits.shape == (1, 11, 50265)
        assert processor.decode([out.mlm_logits[0, 4].argmax().item()]) == " cats"
        hf_mlm = T.BridgeTowerForMaskedLM.from_pretrained(path).eval()
        assert_close(out.mlm_logits, hf_mlm(**enc).logits, "mlm logits on real weights")
        del hf_mlm
        mlm_loss = F.cross_entropy(out.mlm_logits.flatten(0, 1), enc["input_ids"].flatten()).item()
        print(f"MLM loss (labels = input_ids): {mlm_loss:.4f}, HF published 5.7373")
        assert abs(mlm_loss - 5.7373) < 1e-3
        # ITM: match logit above no-match, and the loss for label 1 (HF: 0.5108)
        enc = processor(image, "a bunch of cats laying on a tower.", return_tensors="pt")
        out = ours(enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=enc["pixel_values"])
        assert out.itm_logits.shape == (1, 2) and out.itm_logits[0, 1] > out.itm_logits[0, 0]
        hf_itm = T.BridgeTowerForImageAndTextRetrieval.from_pretrained(path).eval()
        assert_close(out.itm_logits, hf_itm(**enc).logits, "itm logits on real weights")
        itm_loss = F.cross_entropy(out.itm_logits, torch.tensor([1])).item()
        print(f"ITM loss (label 1): {itm_loss:.4f}, HF published 0.5108")
        assert abs(itm_loss - 0.5108) < 1e-3


def test_itc_temperature_starts_at_clips():
    # ITC's initial temperature is CLIP's 0.07 (HF BridgeTower's logit_scale_init_value 2.6592 = log(1 / 0.07)):
    # logit_scale holds its log, so the similarities are scaled by 1 / 0.07 at the start, not by e^(1/0.07)
    model = BridgeTower(BridgeTowerConfig.preset("tiny", vocab_size=120, image_size=32, heads=("itc",)))
    assert model.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-4)


def test_vision_encoder_from_hf_clip_with_trained_layer_norms(tmp_path):
    # a fresh CLIP's LayerNorms are all weight 1, bias 0, so a swapped rename (layer_norm1 <-> layer_norm2,
    # pre_layrnorm <-> post_layernorm) loads unseen: give every LayerNorm its own values, as trained CLIP has
    torch.manual_seed(9)
    clip = T.CLIPVisionModel(clip_vision_config()).eval()
    with torch.no_grad():
        for m in clip.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    ours = BridgeTower.from_unimodal(BridgeTowerConfig.preset("tiny", vocab_size=VOCAB),
                                     vision_path=saved(clip, tmp_path))
    check_vision(ours.eval(), clip, torch.randn(2, 3, 64, 64))


def test_save_pretrained_keeps_the_two_eps_apart(tmp_path):
    # an original checkpoint's model: LayerNorms at 1e-5, cross layers at BERT's 1e-12. transformers has one eps,
    # which must be the 1e-5 of its text layers, CLIP and first cross inputs; our own field gives the 1e-12 back
    config = BridgeTowerConfig.preset("tiny", vocab_size=VOCAB, cross_layer_norm_eps=1e-12)
    BridgeTower(config).save_pretrained(tmp_path / "ours")
    hf = T.BridgeTowerConfig.from_pretrained(tmp_path / "ours")
    assert hf.layer_norm_eps == hf.text_config.layer_norm_eps == hf.vision_config.layer_norm_eps == 1e-5
    assert BridgeTower.from_pretrained(tmp_path / "ours").config == config
