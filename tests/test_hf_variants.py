"""
More transformers parity (the helpers of test_model.py): HF config variants, padding patterns, the training losses
and gradients, and clear errors on HF flags that model.py does not support.
"""

import pytest
import torch
import torch.nn as nn
import transformers as T

from model import BridgeTower, BridgeTowerConfig, CheckpointError, contrastive_loss
# one_thread is test_model's autouse fixture (one CPU thread for tiny models): imported, it applies here too
from test_model import VOCAB, assert_close, hf_tiny_config, inputs, one_thread, random_scalars, saved  # noqa: F401


def hf_config(**fields):
    """hf_tiny_config with fields set on the top config, or on text_config / vision_config by a text_ / vision_
    prefix (e.g. vision_hidden_size=192)."""
    config = hf_tiny_config(link=fields.pop("link", "add"), share=fields.pop("share", True),
                            image_size=fields.get("vision_image_size", 64),
                            cross_layers=fields.pop("num_hidden_layers", 2))
    for name, value in fields.items():
        for prefix, target in (("text_", config.text_config), ("vision_", config.vision_config)):
            if name.startswith(prefix):
                setattr(target, name[len(prefix):], value)
                break
        else:
            setattr(config, name, value)
    return config


def compare_itm(hf, ours, ids, mask, pixels):
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        body = hf.bridgetower(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        out = ours(ids, attention_mask=mask, pixel_values=pixels)
    for key in ("text_features", "image_features", "pooler_output"):
        assert_close(getattr(out, key), body[key], key)
    assert_close(out.itm_logits, ref.logits, "itm logits")


VARIANTS = {
    # vision width != text width (the image transform is 192 -> 128), more vision blocks than text layers (the
    # extra ones never run), patch 8 on a 40-px image (odd 5x5 grid)
    "vision_differs": dict(vision_hidden_size=192, vision_num_hidden_layers=6, vision_patch_size=8,
                           vision_image_size=40),
    # CLIP's heads are width // 64: one head of width 96
    "one_wide_vision_head": dict(vision_hidden_size=96),
    # HF builds ln_separate (never used in forward) and ignores stop_gradient in BridgeTowerModel.forward
    "separate_layernorm_stop_gradient": dict(vision_share_layernorm=False, vision_stop_gradient=True),
    # every text layer feeds a cross layer (split index 1), unshared transforms, interpolate bridges
    "all_layers_bridged": dict(num_hidden_layers=4, share=False, link="interpolate"),
    # two text token types, of which HF's forward only ever uses row 0 (it passes no token_type_ids)
    "two_token_types": dict(text_type_vocab_size=2),
    # eps is read from config.json (every LayerNorm), RoBERTa's pad id is not 1
    "eps_and_pad_id": dict(layer_norm_eps=1e-6, text_layer_norm_eps=1e-6, vision_layer_norm_eps=1e-6,
                           text_pad_token_id=0),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parity_config_variants(tmp_path, variant):
    torch.manual_seed(20)
    config = hf_config(**VARIANTS[variant])
    hf = random_scalars(T.BridgeTowerForImageAndTextRetrieval(config)).eval()
    ours = BridgeTower.from_pretrained(saved(hf, tmp_path)).eval()
    ids, mask, pixels = inputs(image_size=config.vision_config.image_size)
    pad = config.text_config.pad_token_id
    ids[:, 0] = 2 if pad == 0 else 0  # keep BOS off the pad id
    ids[mask == 0] = pad
    compare_itm(hf, ours, ids, mask, pixels)


def test_parity_padding_patterns(tmp_path):
    """Left padding, holes inside the text, a mask that hides non-pad ids, float and bool masks, no padding at all:
    HF masks keys by attention_mask and counts positions from the pad ids, independently of each other."""
    torch.manual_seed(21)
    hf = T.BridgeTowerForImageAndTextRetrieval(hf_config()).eval()
    ours = BridgeTower.from_pretrained(saved(hf, tmp_path)).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (4, 9), generator=g)
    pixels = torch.randn(4, 3, 64, 64, generator=g)
    left, left_mask = ids.clone(), torch.ones(4, 9, dtype=torch.long)
    for row, n in enumerate([0, 2, 4, 6]):
        left[row, :n], left_mask[row, :n] = 1, 0
    holes, holes_mask = ids.clone(), torch.ones(4, 9, dtype=torch.long)
    for row, cols in ((1, [3, 4]), (2, [1]), (3, [2, 5, 7])):
        holes[row, cols], holes_mask[row, cols] = 1, 0
    hidden = torch.ones(4, 9, dtype=torch.long)
    hidden[1, 6:], hidden[2, 2:4] = 0, 0
    for case_ids, mask in ((left, left_mask), (holes, holes_mask), (ids, hidden), (left, left_mask.float()),
                           (holes, holes_mask.bool()), (ids, torch.ones_like(ids)), (ids, None)):
        compare_itm(hf, ours, case_ids, mask, pixels)


@pytest.mark.parametrize("padded", [True, False])
def test_parity_hidden_states_and_attentions(tmp_path, padded):
    """output_hidden_states / output_attentions: every layer's output and the cross layers' self-attention
    probabilities equal HF's (its image entries are sequence-first, ours batch-first), unshared transforms and
    more vision blocks than text layers; masked keys get probability 0."""
    torch.manual_seed(23)
    config = hf_config(share=False, link="scaled_add", vision_num_hidden_layers=6, num_hidden_layers=3)
    hf = random_scalars(T.BridgeTowerModel(config)).eval()
    ours = BridgeTower.from_pretrained(saved(hf, tmp_path)).eval()
    ids, mask, pixels = inputs()
    if not padded:
        ids, mask = ids[:1], None
        pixels = pixels[:1]
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, output_hidden_states=True,
                 output_attentions=True)
        out = ours(ids, attention_mask=mask, pixel_values=pixels, output_hidden_states=True, output_attentions=True)
    text, image, cross = out.hidden_states
    ref_text, ref_image, ref_cross = ref.hidden_states
    assert (len(text), len(image), len(cross)) == (5, 5, 3) == (len(ref_text), len(ref_image), len(ref_cross))
    for i, (a, b) in enumerate(zip(text, ref_text)):
        assert_close(a, b, f"text hidden state {i}")
    for i, (a, b) in enumerate(zip(image, ref_image)):
        assert_close(a, b.transpose(0, 1), f"image hidden state {i}")
    for k, ((ct, ci), (ref_ct, ref_ci)) in enumerate(zip(cross, ref_cross)):
        assert_close(ct, ref_ct, f"cross text {k}")
        assert_close(ci, ref_ci, f"cross image {k}")
    assert len(out.attentions) == 3 == len(ref.attentions)
    for k, ((pt, pi), (ref_pt, ref_pi)) in enumerate(zip(out.attentions, ref.attentions)):
        assert_close(pt, ref_pt, f"text self-attention {k}")
        assert_close(pi, ref_pi, f"image self-attention {k}")
        if padded:
            assert (pt.transpose(1, 3)[mask == 0] == 0).all()  # (B, H, T, T) -> key axis first


def test_hidden_states_only_when_asked():
    torch.manual_seed(24)
    model = BridgeTower(BridgeTowerConfig.preset("tiny", vocab_size=VOCAB, heads=("mlm", "itm"))).eval()
    ids, mask, pixels = inputs()
    with torch.no_grad():
        plain = model(ids, attention_mask=mask, pixel_values=pixels)
        mlm = model(ids, attention_mask=mask, pixel_values=pixels, heads=("mlm",), output_hidden_states=True,
                    output_attentions=True)
    assert plain.hidden_states is None and plain.attentions is None
    # the MLM-only pass skips the last image-side cross layer: its entries say so rather than hold stale values
    assert mlm.hidden_states[2][-1][1] is None and mlm.attentions[-1][1] is None
    assert mlm.hidden_states[2][0][1] is not None and mlm.attentions[0][1] is not None
    assert_close(mlm.hidden_states[2][-1][0], plain.text_features, "text features")


def no_dropout_config(**fields):
    return hf_config(text_hidden_dropout_prob=0.0, text_attention_probs_dropout_prob=0.0, **fields)


def assert_grads_close(named_ours, named_ref):
    """Per tensor, relative to the largest gradient of the model (key biases get ~0 gradient in exact arithmetic)."""
    scale = max(g.abs().max().item() for g in named_ref.values())
    assert named_ours.keys() == named_ref.keys(), set(named_ours) ^ set(named_ref)
    for name, ref in named_ref.items():
        err = (named_ours[name] - ref).abs().max().item() / max(ref.abs().max().item(), 1e-3 * scale)
        assert err < 1e-4, f"{name}: gradient relative error {err:.2e}"


def test_parity_pretraining_loss_and_gradients(tmp_path):
    """pretrain.py's loss (MLM at the labelled positions + ITM, padded batch) equals HF's losses with labels, and
    every gradient equals HF's (train mode, dropout 0), bridge scalars included."""
    from pretrain import pretrain_loss
    torch.manual_seed(22)
    config = no_dropout_config(link="scaled_add")
    hf_mlm = random_scalars(T.BridgeTowerForMaskedLM(config))
    hf_itm = T.BridgeTowerForImageAndTextRetrieval(config)
    hf_itm.bridgetower.load_state_dict(hf_mlm.bridgetower.state_dict())
    ours = BridgeTower.from_pretrained(saved(hf_mlm, tmp_path), heads=("mlm", "itm"))
    ours.itm_score.load_state_dict(hf_itm.itm_score.state_dict())
    ids, mask, pixels = inputs(batch=4)
    labels = torch.full_like(ids, -100)
    where = (torch.rand(ids.shape, generator=torch.Generator().manual_seed(3)) < 0.4) & mask.bool()
    where[:, 1] = True
    labels[where] = ids[where]
    masked_ids = ids.masked_fill(where, 4)
    permutation, itm_labels = torch.tensor([0, 2, 1, 3]), torch.tensor([1, 0, 0, 1])
    batch = dict(mlm_input_ids=masked_ids, mlm_labels=labels, input_ids=ids, attention_mask=mask, pixel_values=pixels,
                 itm_image_index=permutation, itm_labels=itm_labels)
    loss, metrics = pretrain_loss(ours.train(), batch, "cpu")
    loss.backward()
    mlm = hf_mlm.train()(input_ids=masked_ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
    itm = hf_itm.train()(input_ids=ids, attention_mask=mask, pixel_values=pixels[permutation], labels=itm_labels).loss
    (mlm + itm).backward()
    assert_close(metrics["mlm_loss"], mlm.detach(), "mlm loss")
    assert_close(metrics["itm_loss"], itm.detach(), "itm loss")
    ref = {}
    for model in (hf_mlm, hf_itm):
        for name, p in model.named_parameters():
            name = name.removeprefix("bridgetower.")
            if p.grad is not None and not name.startswith("text_model.pooler."):
                ref[name] = ref[name] + p.grad if name in ref else p.grad.clone()
    assert_grads_close({n: p.grad for n, p in ours.named_parameters()}, ref)


def test_parity_contrastive_gradients(tmp_path):
    torch.manual_seed(23)
    hf = T.BridgeTowerForContrastiveLearning(no_dropout_config(link="interpolate"))
    with torch.no_grad():
        hf.logit_scale.fill_(3.1)
    ours = BridgeTower.from_pretrained(saved(hf, tmp_path)).train()
    ids, mask, pixels = inputs(batch=4)
    out = ours(ids, attention_mask=mask, pixel_values=pixels)
    contrastive_loss(out.text_embeds, out.image_embeds, out.cross_embeds, ours.logit_scale).backward()
    hf.train()(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_loss=True).loss.backward()
    # the last image-side cross layer and the image pooler get gradient only through cross_embeds; the
    # text pooler of the RoBERTa encoder none
    ref = {n.removeprefix("bridgetower."): p.grad for n, p in hf.named_parameters()
           if p.grad is not None and not n.startswith("bridgetower.text_model.pooler.")}
    assert_grads_close({n: p.grad for n, p in ours.named_parameters() if p.grad is not None}, ref)


def test_tied_word_embeddings_checkpoint(tmp_path):
    """tie_word_embeddings=True: HF's save_pretrained leaves mlm_score.decoder.weight out of the file."""
    torch.manual_seed(24)
    hf = T.BridgeTowerForMaskedLM(hf_config(tie_word_embeddings=True)).eval()
    ours = BridgeTower.from_pretrained(saved(hf, tmp_path)).eval()
    ids, mask, pixels = inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        out = ours(ids, attention_mask=mask, pixel_values=pixels).mlm_logits
    assert_close(out, ref, "mlm logits")


def test_parity_in_train_mode_with_hidden_dropout(tmp_path):
    # the other parity tests run in eval mode, where a dropout in the wrong place (before a LayerNorm instead of
    # after it, say) changes nothing. HF and we draw the hidden-dropout masks in the same order from torch's
    # generator, so with attention dropout off (HF's eager attention would draw its own) one seed gives both the
    # same masks. The two text dropouts differ, so that each is read from its own field, and written back
    config = hf_config(text_hidden_dropout_prob=0.3, text_attention_probs_dropout_prob=0.0)
    hf = T.BridgeTowerForImageAndTextRetrieval(config).train()
    ours = BridgeTower.from_pretrained(saved(hf, tmp_path)).train()
    assert (ours.config.hidden_dropout, ours.config.attention_dropout) == (0.3, 0.0)
    ids, mask, pixels = inputs()
    with torch.no_grad():
        torch.manual_seed(5)
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        torch.manual_seed(5)
        out = ours(ids, attention_mask=mask, pixel_values=pixels).itm_logits
        other_masks = ours(ids, attention_mask=mask, pixel_values=pixels).itm_logits
    assert not torch.allclose(out, other_masks, atol=1e-3)  # dropout is on
    assert_close(out, ref, "itm logits in train mode")
    ours.save_pretrained(tmp_path / "ours")
    back = T.BridgeTowerConfig.from_pretrained(tmp_path / "ours").text_config
    assert (back.hidden_dropout_prob, back.attention_probs_dropout_prob) == (0.3, 0.0)
    config = hf_config(text_hidden_dropout_prob=0.2, text_attention_probs_dropout_prob=0.4)
    ours = BridgeTower.from_pretrained(saved(T.BridgeTowerForImageAndTextRetrieval(config), tmp_path, "other"))
    assert (ours.config.hidden_dropout, ours.config.attention_dropout) == (0.2, 0.4)


UNSUPPORTED = {  # HF config -> what the error must say
    "share_link_tower_layers": (dict(share_link_tower_layers=True), "share_link_tower_layers"),
    "remove_last_layer": (dict(vision_remove_last_layer=True), "remove_last_layer"),
    "top_hidden_act": (dict(hidden_act="relu"), "hidden_act"),
    "text_hidden_act": (dict(text_hidden_act="gelu_new"), "hidden_act"),
    "text_eps": (dict(text_layer_norm_eps=1e-6), "text layer_norm_eps"),
    "vision_eps": (dict(vision_layer_norm_eps=1e-6), "vision layer_norm_eps"),
    "text_width_not_hidden_size": (dict(text_hidden_size=64), "text hidden_size != hidden_size"),
    "fewer_vision_blocks": (dict(vision_num_hidden_layers=3), "vision_layers"),
    "num_channels": (dict(vision_num_channels=1), "patch_embedding.weight"),
    "itc_unshared_transforms": (dict(share=False), "share_cross_modal_transform", T.BridgeTowerForContrastiveLearning),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_hf_configs_are_errors(tmp_path, case):
    """Checkpoints whose HF config model.py cannot reproduce: a CheckpointError naming the file and the reason,
    never silently different numbers."""
    fields, reason, *cls = UNSUPPORTED[case]
    hf = (cls or [T.BridgeTowerForImageAndTextRetrieval])[0](hf_config(**fields))
    path = saved(hf, tmp_path)
    with pytest.raises(CheckpointError, match=reason) as e:
        BridgeTower.from_pretrained(path)
    assert path in str(e.value)


def test_a_row_with_nothing_to_attend_to_is_an_error():
    # HF attends uniformly to the padding of such a row and SDPA returns zeros: no answer is right, so none is given
    torch.manual_seed(25)
    ours = BridgeTower(BridgeTowerConfig.preset("tiny", vocab_size=VOCAB, heads=("itm",))).eval()
    ids, mask, pixels = inputs()
    mask[1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] are all 0"):
        ours(ids, attention_mask=mask, pixel_values=pixels)


def test_every_layer_norm_takes_the_eps_of_the_hf_config(tmp_path):
    # at eps 1e-6 transformers runs every LayerNorm, the cross layers (built from text_config) included, at 1e-6;
    # 1e-5 instead changes outputs too little for the parity tests to see, so compare the eps themselves
    hf = T.BridgeTowerForImageAndTextRetrieval(hf_config(**VARIANTS["eps_and_pad_id"]))
    assert {m.eps for m in hf.modules() if isinstance(m, nn.LayerNorm)} == {1e-6}
    ours = BridgeTower.from_pretrained(saved(hf, tmp_path))
    assert {m.eps for m in ours.modules() if isinstance(m, nn.LayerNorm)} == {1e-6}


def test_token_ids_outside_the_vocabulary_are_an_error():
    # torch's embedding lookup would raise a bare IndexError on a CPU and a device-side assert on a GPU (after which
    # the CUDA context is unusable); checked with the mask's facts, in the same host sync, and without a mask
    torch.manual_seed(26)
    ours = BridgeTower(BridgeTowerConfig.preset("tiny", vocab_size=VOCAB, heads=("itm",))).eval()
    ids, mask, pixels = inputs()
    for bad, shown in ((VOCAB, VOCAB), (VOCAB + 7, VOCAB + 7), (-1, -1)):
        wrong = ids.clone()
        wrong[1, 2] = bad
        for m in (mask, None):
            with pytest.raises(ValueError, match=rf"vocabulary of {VOCAB} \(0..{VOCAB - 1}\): \[{shown}\]; token ids"):
                ours(wrong, attention_mask=m, pixel_values=pixels)
    ids[1, 2] = VOCAB - 1  # the last id is in
    ours(ids, attention_mask=mask, pixel_values=pixels)


def test_texts_longer_than_the_position_table_are_an_error():
    # the same failure as an id outside the vocabulary, in the position lookup: RoBERTa counts a row's non-pad
    # tokens up from pad + 1, so a table of 12 rows holds texts of 10 tokens, however long the padded batch
    torch.manual_seed(27)
    ours = BridgeTower(BridgeTowerConfig.preset("tiny", vocab_size=VOCAB, heads=("itm",), max_position_embeddings=12))
    pixels = inputs()[2][:2]
    ids = torch.randint(3, VOCAB, (2, 11))
    for m in (torch.ones_like(ids), None):
        with pytest.raises(ValueError, match=r"a text of 11 tokens; the position table \(max_position_embeddings=12\) "
                                             r"holds 10: truncate"):
            ours.eval()(ids, attention_mask=m, pixel_values=pixels)
    ids[0, 10], ids[1, 7:] = 1, 1  # padded batch of 11 columns, texts of 10 and 7 tokens: in
    with torch.no_grad():
        out = ours(ids, attention_mask=ids.ne(1).long(), pixel_values=pixels)
        short = ours(ids[:, :10], attention_mask=ids[:, :10].ne(1).long(), pixel_values=pixels)
    torch.testing.assert_close(out.itm_logits, short.itm_logits, atol=1e-5, rtol=1e-5)
