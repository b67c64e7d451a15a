"""
Fine-tune BridgeTower on VQAv2 and score it with the official VQA accuracy.

    python finetune_vqa.py                                   # demo: synthetic VQA set, tiny model, CPU, ~3 min
    python finetune_vqa.py --resume                          # continue a killed run from out_dir/ckpt.pt (none: start)
    torchrun --nproc_per_node=8 finetune_vqa.py config/finetune_vqa_base.py    # the paper's recipe
    python finetune_vqa.py --predict --image=cat.jpg --question="what is this?" [--checkpoint=out/vqa/final]
    python finetune_vqa.py --eval_only --init_from=out/vqa/final --out_dir=out/vqa_eval   # score a model as it is

The demo and the real data take the same path: the synthetic set is written to disk in the VQAv2 JSON schema
with COCO-named JPEG files (out/vqa_synthetic), then read back by the VQAv2 reader. The run directory gets
answers.json (the answer vocabulary), metrics.jsonl, ckpt.pt, eval_<split>.json (the evaluation summary),
results_<split>.json (predictions in the submission format, for the evaluation and the test split) and final/
(save_pretrained, answers.json and the tokenizer files), which --predict loads; from random weights, also
tokenizer/ (the demo tokenizer). `python finetune_vqa.py --help` lists every setting with its default.
"""

import json
import os
import random
import re
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import train_utils as tu
from data import COLORS, SHAPES, Packed, Tokenizer, eval_transform, make_scene, train_transform
from model import BridgeTower, BridgeTowerConfig, CheckpointError, _init_weights

# -----------------------------------------------------------------------------
# default config: the CPU demo (config/finetune_vqa_base.py has the paper's recipe)
# I/O
out_dir = "out/vqa"          # run directory
log_interval = 20            # steps between printed lines (every step goes to metrics.jsonl)
eval_interval = 0            # steps between evaluations on eval_split (0: only at the end)
ckpt_interval = 100          # steps between checkpoints (0: only at the end)
resume = False               # continue from out_dir/ckpt.pt, with the run's settings where none are given; with
                             # no checkpoint there, start a new run (one command for a job that may be pre-empted)
eval_only = False            # no training: score init_from as it is (our final/, or an original fine-tuned .ckpt) on
                             # eval_split and write test_split's submission, with the answers its head was trained on
# initialisation
init_from = "auto"           # BridgeTower checkpoint (HF dir, original .ckpt, our dir); "auto": the pre-training
                             # demo's out/pretrain/final if it exists, else random weights of model_size
model_size = "tiny"          # BridgeTowerConfig preset for random weights
image_size = 64              # pixels (576 in the paper, position embeddings interpolated from the checkpoint's)
dropout = None               # hidden and attention dropout; None: init_from's own (0.1 in released checkpoints), else 0.0
tokenizer_dir = ""           # "" -> init_from's tokenizer files, else the demo tokenizer
# data
data_dir = ""                # VQAv2 json files; "" -> the synthetic set, written to synthetic_dir
image_root = ""              # COCO image folders train2014/ val2014/ test2015/; "" -> data_dir
synthetic_dir = "out/vqa_synthetic"
synthetic_images = 1500      # synthetic training images (3 questions each); validation and test get a fifth
train_splits = "train2014"   # comma-joined; "train2014,val2014" is the paper's train+val
vocab_splits = "train2014,val2014"  # answers counted over these annotations (the original: train+val)
min_answer_count = 9         # answers kept if they are the (normalised) majority answer this often (3129 on VQAv2)
eval_split = "val2014"       # scored with the official accuracy ("" to skip)
eval_holdout = 0             # if eval_split is also trained on: its last eval_holdout images are held out (original: none)
test_split = "test2015"      # predictions in the submission format ("" to skip); test-dev2015 for test-dev
max_text_len = 50            # question tokens (the original: 50)
crop_scale = (0.5, 1.0)      # random resized crop, area fraction (no flip: "left" must stay left)
randaugment = (2, 5)         # RandAugment (ops per image, magnitude)
num_workers = 0              # loader processes per rank
# optimisation
batch_size = 32              # global batch: all ranks and micro-steps together
micro_batch_size = 32        # per rank and micro-step
epochs = 7                   # passes over the training questions (the paper: 10)
max_steps = 0                # 0: epochs x steps per epoch; else stop (and schedule) at max_steps
lr = 3e-4                    # the demo's; 1e-5 in the paper, where the towers are large and pre-trained for long
warmup_ratio = 0.06          # of the steps, then linear decay to 0
weight_decay = 0.05
betas = (0.9, 0.98)
adam_eps = 1e-8
lr_mult_heads = 5.0          # vqa_classifier (the paper: 50)
lr_mult_cross_modal = 1.0    # every cross_modal* parameter (the paper: 5; on the tiny demo model x5 slowed learning)
grad_clip = 0.0              # 0: no clipping (the original does not clip)
# system
device = "auto"              # auto: cuda when available, else cpu
dtype = "auto"               # auto: bfloat16 autocast on an Ampere or newer GPU, float32 elsewhere;
                             # tf32: fp32 with TF32 matmuls (the original's fp32, in effect)
compile = False              # torch.compile the model
grad_checkpointing = False   # recompute text, vision and cross layers in the backward pass (less memory, ~1/3 more compute)
cpu_threads = 1              # torch threads per process on CPU (0: torch's default). On 2 shared cores, 2 threads
                             # spin-wait for each other (pretrain.py measured 1.5-2.7 s/step against 0.5 s with 1)
seed = 0
# --predict: top-5 answers for one image and question from a saved model dir
predict = False
image = ""                   # image file
question = ""
checkpoint = ""              # saved model dir (save_pretrained + answers.json + tokenizer); "" -> out_dir/final
# -----------------------------------------------------------------------------
# what --resume may not change: the model (dropout included), its tokenizer and the answer vocabulary come from
# the checkpoint, the optimiser's groups (decay, multipliers, betas, eps) from its state, and the data order from
# these data settings. A changed data_dir or image_root is only listed: the files may have moved.
RESUME_FIXED = ("init_from", "model_size", "image_size", "dropout", "tokenizer_dir", "synthetic_images",
                "train_splits", "vocab_splits", "min_answer_count", "max_text_len", "batch_size", "micro_batch_size",
                "seed", "weight_decay", "betas", "adam_eps", "lr_mult_heads", "lr_mult_cross_modal")


def resume_fixed(saved):
    """RESUME_FIXED, and eval_split and eval_holdout when the evaluation split is trained on, in the checkpoint's
    run or now: its held-out images are then missing from the training data."""
    eval_trained = {saved["eval_split"], eval_split} & set(splits_of(train_splits))
    return RESUME_FIXED + (("eval_split", "eval_holdout") if eval_trained else ())


# -----------------------------------------------------------------------------
# The official VQA accuracy, after GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py
# (the Python 3 version). Its quirks are kept on purpose, because the leaderboard numbers come from them:
# - the prediction gets punctuation handling, lower-casing, number words -> digits, article removal and
#   the contractions map; the human answers get *only* the punctuation handling, and only when the 10 of
#   them are not all identical;
# - the period regex "(?!<=\d)(\.)(?!\d)" is a negative look-ahead, not the intended look-behind, so it
#   removes every period not followed by a digit ("5." -> "5", "3.5" kept);
# - re.UNICODE (= 32) is passed positionally as `count`, so at most 32 periods are removed.

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
               ",", "?", "!")
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text):
    # A mark touching a space, or any text with a comma between digits ("1,000"), loses the mark;
    # otherwise it becomes a space ("black/white" -> "black white"). The test looks at the input text.
    has_digit_comma = COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=32)


def process_digit_article(text):
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text):
    """The answer normalisation of the original VQA data preparation (ViLT/METER/BridgeTower
    `normalize_word`): the evaluation's prediction processing, then any remaining comma removed."""
    return process_digit_article(process_punctuation(text)).replace(",", "")


def vqa_accuracy(predictions, annotations):
    """Official VQA accuracy. predictions: {question_id: answer}; annotations: the list of the official
    annotations file. Every annotated question must have a prediction (the official loader asserts it).
    Returns {"overall": %, "perAnswerType": {type: %}, "perQuestion": {question_id: fraction}}, the
    percentages rounded to 2 decimals as the official script prints them."""
    per_question, per_type = {}, {}
    for ann in annotations:
        qid = ann["question_id"]
        if qid not in predictions:
            raise KeyError(f"no prediction for question {qid}: results must cover every annotated question")
        pred = str(predictions[qid]).replace("\n", " ").replace("\t", " ").strip()
        pred = process_digit_article(process_punctuation(pred))
        # copies, so that the caller's annotations are not rewritten as the official script rewrites them
        gts = [dict(a) for a in ann["answers"]]
        if len(set(a["answer"] for a in gts)) > 1:
            for a in gts:
                a["answer"] = process_punctuation(a["answer"])
        # Leave-one-out over the 10 humans: the official code drops every answer dict equal to the left-out
        # one (answer_id makes them distinct in the real files), then min(1, matches / 3).
        accs = []
        for left_out in gts:
            matches = sum(1 for a in gts if a != left_out and a["answer"] == pred)
            accs.append(min(1.0, matches / 3))
        acc = sum(accs) / len(accs)
        per_question[qid] = acc
        per_type.setdefault(ann["answer_type"], []).append(acc)
    if not per_question:
        raise ValueError("no annotations to evaluate")
    return {
        "overall": round(100 * sum(per_question.values()) / len(per_question), 2),
        "perAnswerType": {t: round(100 * sum(v) / len(v), 2) for t, v in per_type.items()},
        "perQuestion": per_question,
    }


# -----------------------------------------------------------------------------
# VQAv2 files: v2_OpenEnded_mscoco_{split}_questions.json, v2_mscoco_{split}_annotations.json and
# COCO images {image_root}/{folder}/COCO_{folder}_{image_id:012d}.jpg (test-dev2015 lives in test2015).

def questions_path(root, split):
    return os.path.join(root, f"v2_OpenEnded_mscoco_{split}_questions.json")


def annotations_path(root, split):
    return os.path.join(root, f"v2_mscoco_{split}_annotations.json")


def image_path(image_root, split, image_id):
    folder = "test2015" if split.startswith("test") else split
    return os.path.join(image_root, folder, f"COCO_{folder}_{image_id:012d}.jpg")


QUESTION_FIELDS = {"question_id": int, "image_id": int, "question": str}
ANNOTATION_FIELDS = {"question_id": int, "multiple_choice_answer": str, "answers": list}


def read_records(path, key, fields):
    """The list under `key` of an official VQAv2 file, every record checked for `fields` (name -> type) and every
    annotation for at least one {"answer": str}: a malformed file stops the run at the start, naming the file,
    record and field, not at its batch or, for the evaluation split, after training."""
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    records = data.get(key) if isinstance(data, dict) else None
    if not isinstance(records, list):
        raise ValueError(f'{path}: expected {{"{key}": [...]}} (the official VQAv2 layout)')
    for i, r in enumerate(records):
        missing = [f for f, kind in fields.items() if not isinstance(r, dict) or not isinstance(r.get(f), kind)]
        if not missing and "answers" in fields and not (
                r["answers"] and all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in r["answers"])):
            missing = ['answers: [{"answer": str}, ...]']
        if missing:
            raise ValueError(f"{path}: {key}[{i}] lacks {', '.join(missing)} (or has another type): {str(r)[:200]}")
    return records


def load_annotations(root, split):
    """The official annotation list of a split, or None for the test splits (no answers released)."""
    path = annotations_path(root, split)
    if not os.path.exists(path):
        return None
    return read_records(path, "annotations", ANNOTATION_FIELDS)


def load_questions(root, split, image_root=None):
    """[{question_id, image_id, question, image}] of a split, in file order."""
    if not os.path.isfile(questions_path(root, split)):
        raise FileNotFoundError(f"questions of split {split} not found: {questions_path(root, split)} (the splits "
                                "come from --train_splits, --eval_split and --test_split; \"\" skips the last two)")
    questions = read_records(questions_path(root, split), "questions", QUESTION_FIELDS)
    image_root = image_root or root
    return [dict(q, image=image_path(image_root, split, q["image_id"])) for q in questions]


def soft_score(count):
    # VQA soft target from the number of annotators who gave the answer: 0, 0.3, 0.6, 0.9, then 1.0 from 4 on
    # (the original's get_score; close to the metric's min(1, n/3) averaged over leave-one-out subsets).
    return (0.0, 0.3, 0.6, 0.9)[count] if count < 4 else 1.0


def check_annotated(questions, annotation_by_id, source):
    # questions and annotations files of different versions or splits would pair answers with the wrong questions
    missing = [q["question_id"] for q in questions if q["question_id"] not in annotation_by_id]
    if missing:
        raise ValueError(f"{source}: no annotation for {len(missing)} of {len(questions)} questions (question ids "
                         f"{missing[:5]}...): the questions and annotations files do not belong together")


def build_answer_vocab(annotations, min_count=9):
    """Answers whose normalised multiple_choice_answer is seen at least min_count times over the given
    annotations (train+val in the original: 3129 answers), in order of first appearance as in the original."""
    counts = Counter(normalize_answer(a["multiple_choice_answer"]) for a in annotations)
    return [answer for answer, n in counts.items() if n >= min_count]


def answer_targets(annotation, answer_to_label):
    """(labels, scores) of one question: the soft score of every in-vocabulary normalised human answer. Counted
    after normalising, as BridgeTower's `_fix` VQA data ("2" and "two" are one answer); ViLT's and METER's
    write_vqa.py counted the raw strings, a bug BridgeTower fixed."""
    counts = Counter(normalize_answer(a["answer"]) for a in annotation["answers"])
    labels = [answer_to_label[a] for a in counts if a in answer_to_label]
    scores = [soft_score(counts[a]) for a in counts if a in answer_to_label]
    return labels, scores


def attach_targets(questions, annotations, answer_to_label, source="annotations"):
    """Questions joined with their targets; questions with no in-vocabulary answer are dropped (the original
    drops them from training). Returns (kept, number dropped)."""
    by_id = {a["question_id"]: a for a in annotations}
    check_annotated(questions, by_id, source)
    kept, dropped = [], 0
    for q in questions:
        labels, scores = answer_targets(by_id[q["question_id"]], answer_to_label)
        if labels:
            kept.append(dict(q, labels=labels, scores=scores))
        else:
            dropped += 1
    return kept, dropped


# -----------------------------------------------------------------------------
# The embedded synthetic VQA set: questions about data.py's scenes of coloured shapes, with 10 human
# answers that sometimes disagree, written to disk as VQAv2 files so that the real reader is what runs.

SYNTHETIC_SPLITS = {"train2014": 0, "val2014": 1, "test2015": 2}   # split -> image id block (ids never shared)
QUESTIONS_PER_IMAGE = 3


def _center_x(obj):
    return (obj["bbox"][0] + obj["bbox"][2]) / 2


def scene_questions(objects, size, rng):
    """Every question one can ask about a scene: (question, answer, answer_type, question_type, wrong answers
    an annotator might give)."""
    shape_count = Counter(o["shape"] for o in objects)
    color_count = Counter(o["color"] for o in objects)
    pair_count = Counter((o["color"], o["shape"]) for o in objects)
    qs = []
    for o in objects:
        if shape_count[o["shape"]] == 1:
            qs.append((f"what color is the {o['shape']}?", o["color"], "other", "what color is the", list(COLORS)))
        if color_count[o["color"]] == 1:
            qs.append((f"what shape is the {o['color']} object?", o["shape"], "other", "what shape is the", SHAPES))
        # only objects clearly off the centre, which a random crop seldom moves across it
        if pair_count[(o["color"], o["shape"])] == 1 and abs(_center_x(o) - size / 2) > 0.2 * size:
            side = "left" if _center_x(o) < size / 2 else "right"
            qs.append((f"is the {o['color']} {o['shape']} on the left or the right?", side, "other", "is the",
                       ("left", "right", "middle")))
    shape = rng.choice(SHAPES)
    numbers = ("0", "1", "2", "3", "4")
    qs.append((f"how many {shape}s are there?", str(shape_count[shape]), "number", "how many", numbers))
    qs.append(("how many objects are there?", str(len(objects)), "number", "how many", numbers))
    if rng.random() < 0.5 and objects:
        o = rng.choice(objects)
        qs.append((f"is there a {o['color']} {o['shape']}?", "yes", "yes/no", "is there a", ("yes", "no")))
    else:
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in pair_count]
        c, s = rng.choice(absent)
        qs.append((f"is there a {c} {s}?", "no", "yes/no", "is there a", ("yes", "no")))
    return qs


NUMBER_NAMES = ("zero", "one", "two", "three", "four")


def human_answers(answer, alternatives, rng):
    """10 annotator answers: most give the right one, a few a plausible wrong one; now and then one writes
    the answer differently ("two" for "2", "red." for "red"), which the normalisation must undo."""
    n_wrong = rng.choice((0, 0, 0, 0, 1, 1, 2, 3))
    answers = [answer] * (10 - n_wrong) + [rng.choice([a for a in alternatives if a != answer])
                                           for _ in range(n_wrong)]
    if rng.random() < 0.2:
        answers[0] = NUMBER_NAMES[int(answer)] if answer.isdigit() and int(answer) < 5 else answer + "."
    rng.shuffle(answers)
    return answers


def write_synthetic_vqa(out_dir, images_per_split, image_px=128, seed=0):
    """Write the synthetic set (questions, annotations, COCO-named JPEGs) unless out_dir already holds the
    same one. images_per_split: {"train2014": n, "val2014": n, "test2015": n}; test gets no annotations, and
    a test-dev2015 questions file covers the first half of the test images, as in the real release."""
    stamp = json.dumps({"images": images_per_split, "px": image_px, "seed": seed, "version": 1}, sort_keys=True)
    stamp_path = os.path.join(out_dir, "synthetic.json")
    if os.path.exists(stamp_path) and open(stamp_path).read() == stamp:
        return out_dir
    info = {"description": "BridgeTower synthetic VQA (coloured shapes)", "version": "synthetic-1"}
    for split, n_images in images_per_split.items():
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
        questions, annotations = [], []
        for i in range(n_images):
            image_id = SYNTHETIC_SPLITS[split] * 1_000_000 + i + 1
            rng = random.Random(f"vqa-{seed}-{split}-{i}")  # str seeds: stable across processes and runs
            img, objects = make_scene(rng, image_px)
            img.save(image_path(out_dir, split, image_id), quality=95)
            candidates = scene_questions(objects, image_px, rng)
            for k, (q, a, answer_type, question_type, wrong) in enumerate(rng.sample(candidates, QUESTIONS_PER_IMAGE)):
                qid = image_id * 1000 + k  # the real files' numbering
                questions.append({"image_id": image_id, "question": q, "question_id": qid})
                answers = human_answers(a, wrong, rng)
                annotations.append({
                    "question_type": question_type, "multiple_choice_answer": Counter(answers).most_common(1)[0][0],
                    "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": j + 1} for j, x in enumerate(answers)],
                    "image_id": image_id, "answer_type": answer_type, "question_id": qid})
        _write_json(questions_path(out_dir, split), {"info": info, "task_type": "Open-Ended", "data_type": "mscoco",
                                                     "data_subtype": split, "questions": questions})
        if split.startswith("test"):
            dev_images = {1_000_000 * SYNTHETIC_SPLITS[split] + i + 1 for i in range(n_images // 2)}
            _write_json(questions_path(out_dir, "test-dev2015"), {
                "info": info, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "test-dev2015",
                "questions": [q for q in questions if q["image_id"] in dev_images]})
        else:
            _write_json(annotations_path(out_dir, split), {"info": info, "data_type": "mscoco", "data_subtype": split,
                                                           "annotations": annotations})
    with open(stamp_path, "w") as f:
        f.write(stamp)
    return out_dir


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Batches. A sample is (question, image, soft targets); its augmentation is drawn from a seed made of
# (run seed, epoch, index), so the batches do not depend on the number of loader workers or on a resume.

class Unreadable(NamedTuple):
    """What VQADataset returns in place of a sample whose image cannot be read."""
    question_id: int
    error: str


def check_image_root(items):
    """A wrong image root would otherwise show up mid-run, as every sample skipped or every answer the majority."""
    probe = [item["image"] for item in items[:20]]
    if probe and not any(os.path.isfile(p) for p in probe):
        raise FileNotFoundError(f"none of the first {len(probe)} images exist, e.g. {probe[0]} "
                                "(set --image_root, the folder that holds train2014/ val2014/ test2015/)")


class VQADataset(torch.utils.data.Dataset):
    """Indexed by (item index, augmentation seed) pairs, which the batch schedule below produces."""

    def __init__(self, items, transform, num_answers, image_size):
        check_image_root(items)
        self.transform, self.num_answers, self.image_size = transform, num_answers, image_size  # (3, size, size)
        # numpy buffers, not the list of dicts, which forked loader workers would each copy (data.Packed)
        self.images = Packed([q["image"] for q in items])
        self.questions = Packed([q["question"] for q in items])
        self.question_ids = np.array([q["question_id"] for q in items], dtype=np.int64)
        self.labels = Packed([q.get("labels", ()) for q in items], np.int64)
        self.scores = Packed([q.get("scores", ()) for q in items], np.float32)

    def __len__(self):
        return len(self.question_ids)

    def __getitem__(self, key):
        """(pixels, question, target, question_id), or an Unreadable when the image cannot be decoded."""
        i, aug_seed = key
        image, question_id = self.images[i], int(self.question_ids[i])
        try:
            with Image.open(image) as img:
                pixels = self.transform(img, random.Random(aug_seed))
        except Exception as e:  # missing or corrupt file, any decoder error: counted by Collate, never fatal
            return Unreadable(question_id, f"{image}: {type(e).__name__}: {e}")
        target = torch.zeros(self.num_answers)
        target[torch.from_numpy(self.labels[i])] = torch.from_numpy(self.scores[i])
        return pixels, self.questions[i], target, question_id


class Collate:
    """Stack images and targets, tokenize the questions (padded to the longest). A class, not a closure, so that
    loader worker processes can pickle it.

    A sample whose image could not be read is dropped, and its slot repeats a readable sample of the same batch
    (in turn), as pretraining's loader does: the batch keeps its size, so the schedule and a resumed run stay
    as they are. "skipped_ids" lists the question ids of the dropped samples. A batch with no readable image
    (a micro-batch of 1, the last few questions of a prediction) is all blank samples: black images, empty
    questions, no target; "readable" (0 then) tells vqa_loss to weigh it 0 and predict_answers to pass it by."""

    def __init__(self, tokenizer, max_len, image_size, num_answers):
        self.tokenizer, self.max_len = tokenizer, max_len
        self.blank = (torch.zeros(3, image_size, image_size), "", torch.zeros(num_answers))
        self.reported = set()  # each bad file is named once per process, not once per question and epoch

    def __call__(self, samples):
        bad = [s for s in samples if isinstance(s, Unreadable)]
        good = [s for s in samples if not isinstance(s, Unreadable)]
        for s in bad:
            if s.error not in self.reported:
                self.reported.add(s.error)
                print(f"skipped an unreadable image: {s.error}", file=sys.stderr, flush=True)
        fill = good or [(*self.blank, s.question_id) for s in bad]
        pixels, questions, targets, qids = zip(*good, *(fill[i % len(fill)] for i in range(len(bad))))
        text = self.tokenizer(list(questions), max_length=self.max_len, padding="longest")
        return {"pixel_values": torch.stack(pixels), "input_ids": text["input_ids"],
                "attention_mask": text["attention_mask"], "targets": torch.stack(targets),
                "question_ids": torch.tensor(qids), "readable": torch.tensor(len(good)),
                "skipped_ids": torch.tensor([s.question_id for s in bad], dtype=torch.long)}


def micro_batch_schedule(n_items, start_step, accum, dist):
    """This rank's micro-batches of (index, augmentation seed), from optimiser step start_step on, forever.

    Epoch e visits the items in the order of a permutation seeded by seed + e, cut into global batches of
    batch_size (the remainder is dropped); global batch b is cut into accum x world_size micro-batches and rank r
    takes number k * world_size + r at micro-step k. Resuming at step s yields exactly what the uninterrupted run
    would have yielded from step s on."""
    steps_per_epoch = n_items // batch_size
    epoch, first = divmod(start_step, steps_per_epoch)
    while True:
        order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for b in range(first, steps_per_epoch):
            batch = order[b * batch_size:(b + 1) * batch_size]
            for k in range(accum):
                part = k * dist.world_size + dist.rank
                yield [(i, f"{seed}-{epoch}-{i}") for i in batch[part * micro_batch_size:(part + 1) * micro_batch_size]]
        epoch, first = epoch + 1, 0


def make_loader(dataset, batches, tokenizer, device):
    # Its own generator: a DataLoader otherwise draws its workers' base seed from the global RNG, which would
    # shift the dropout masks of a resumed run (samples are seeded by micro_batch_schedule, not by this).
    collate = Collate(tokenizer, max_text_len, dataset.image_size, dataset.num_answers)
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                       num_workers=num_workers, generator=torch.Generator().manual_seed(seed),
                                       pin_memory=device.type == "cuda")


# -----------------------------------------------------------------------------
# Data set assembly

def splits_of(spec):
    return [s for s in spec.split(",") if s]


def prepare_data(dist):
    """The data root (writing the synthetic set first when there is no data_dir) and its image root."""
    if data_dir:
        return data_dir, image_root or data_dir
    if dist.is_master:
        n = synthetic_images
        write_synthetic_vqa(synthetic_dir, {"train2014": n, "val2014": max(1, n // 5), "test2015": max(2, n // 5)},
                            seed=seed)
    if dist.world_size > 1:
        torch_dist.barrier()  # the other ranks read what rank 0 wrote
    return synthetic_dir, synthetic_dir


def answer_vocabulary(root):
    """The answers seen min_answer_count times in vocab_splits' annotations (3129 for VQAv2 train + val at 9)."""
    annotations = []
    for split in splits_of(vocab_splits):
        split_annotations = load_annotations(root, split)
        if split_annotations is None:  # a vocabulary from fewer splits would silently change the label set
            raise FileNotFoundError(f"no annotations for vocab_splits' {split}: {annotations_path(root, split)}")
        annotations += split_annotations
    answers = build_answer_vocab(annotations, min_answer_count)
    if not answers:
        raise ValueError(f"no answer is seen {min_answer_count} times in the annotations of {vocab_splits}: "
                         "lower --min_answer_count")
    return answers


def holdout_images(questions):
    """The last eval_holdout images of a split (in question-file order): kept out of training, evaluated on."""
    image_ids = list(dict.fromkeys(q["image_id"] for q in questions))
    if eval_holdout > len(image_ids):
        raise ValueError(f"eval_holdout={eval_holdout} is more than eval_split {eval_split}'s {len(image_ids)} images")
    return set(image_ids[len(image_ids) - eval_holdout:]) if eval_holdout else set()


def load_training_set(root, image_dir, answer_to_label, held_out):
    """Training questions with targets, over train_splits, minus held-out images. Returns (items, annotations
    of the kept questions, number dropped for having no answer in the vocabulary)."""
    items, annotations, dropped = [], [], 0
    for split in splits_of(train_splits):
        questions = [q for q in load_questions(root, split, image_dir) if q["image_id"] not in held_out.get(split, ())]
        split_annotations = load_annotations(root, split)
        if split_annotations is None:
            raise FileNotFoundError(f"no annotations for training split {split}: {annotations_path(root, split)}")
        kept, n_dropped = attach_targets(questions, split_annotations, answer_to_label, annotations_path(root, split))
        items += kept
        dropped += n_dropped
        kept_ids = {q["question_id"] for q in kept}
        annotations += [a for a in split_annotations if a["question_id"] in kept_ids]
    return items, annotations, dropped


def load_eval_set(root, image_dir, held_out):
    """(questions, annotations) of eval_split: all of it, or its held-out images when it is also trained on."""
    questions = load_questions(root, eval_split, image_dir)
    annotations = load_annotations(root, eval_split)
    if annotations is None:
        raise FileNotFoundError(f"eval_split {eval_split} has no annotations: {annotations_path(root, eval_split)}")
    if eval_split in splits_of(train_splits):
        keep = held_out.get(eval_split)
        if not keep:
            hint = ("with --eval_only, train_splits only gives the majority answer: --train_splits=train2014, or "
                    "the --eval_holdout the model was trained with" if eval_only else "set eval_holdout > 0")
            raise ValueError(f"eval_split {eval_split} is also a training split: {hint}")
        questions = [q for q in questions if q["image_id"] in keep]
    if not questions:
        raise ValueError(f"eval_split {eval_split} has no questions to evaluate")
    by_id = {a["question_id"]: a for a in annotations}
    check_annotated(questions, by_id, annotations_path(root, eval_split))
    kept = [by_id[q["question_id"]] for q in questions]
    untyped = [a["question_id"] for a in kept if not isinstance(a.get("answer_type"), str)]
    if untyped:  # the metric reports accuracy per answer type
        raise ValueError(f"{annotations_path(root, eval_split)}: no answer_type for question {untyped[0]}")
    return questions, kept


# -----------------------------------------------------------------------------
# Model, tokenizer, optimiser

PRETRAIN_DEMO_MODEL = "out/pretrain/final"  # where `python pretrain.py` (its default out_dir) leaves its model


def resolve_init():
    """The checkpoint to start from, or "" for random weights."""
    if init_from != "auto":
        return init_from
    return PRETRAIN_DEMO_MODEL if os.path.exists(os.path.join(PRETRAIN_DEMO_MODEL, "config.json")) else ""


def build_model(init_path, vocab_size, answers):
    if not init_path:
        config = BridgeTowerConfig.preset(model_size, vocab_size=vocab_size, image_size=image_size, heads=("vqa",),
                                          num_vqa_answers=len(answers), **tu.dropout_config(dropout or 0.0))
        return BridgeTower(config)
    # the image position table is interpolated to image_size (288 -> 576 in the paper)
    kwargs = dict(image_size=image_size, heads=("vqa",), **tu.dropout_config(dropout))
    head_answers_file = os.path.join(init_path, "answers.json")
    if not os.path.isfile(head_answers_file):
        # a pre-trained model gets a new head. An original fine-tuned .ckpt's head scores the original's
        # vocabulary, which build_answer_vocab rebuilds from the same files in the same order.
        try:
            return BridgeTower.from_pretrained(init_path, num_vqa_answers=len(answers), **kwargs)
        except CheckpointError as e:
            if "vqa_classifier" not in str(e):
                raise
            raise CheckpointError(f"{e}\n{init_path} has a VQA head for another number of answers and no "
                                  "answers.json to match them to this run's") from None
    with open(head_answers_file) as f:
        head_answers = json.load(f)
    model = BridgeTower.from_pretrained(init_path, num_vqa_answers=len(head_answers), **kwargs)
    if head_answers == answers:
        print(f"VQA head: the checkpoint's, for the same {len(answers)} answers ({head_answers_file})")
    else:
        reindex_vqa_head(model, head_answers, answers, head_answers_file)
    return model


def reindex_vqa_head(model, head_answers, answers, source):
    """Fine-tuning a fine-tuned model on another answer vocabulary (other data, another min_answer_count): each
    answer the two share keeps its row of the last layer, the others get new rows as a new head's."""
    last = model.vqa_classifier[-1]
    new = nn.Linear(last.in_features, len(answers)).to(last.weight.device)
    _init_weights(new)  # the model's init for new modules
    row = {a: i for i, a in enumerate(head_answers)}
    shared = [(j, row[a]) for j, a in enumerate(answers) if a in row]
    if shared:
        to, frm = map(list, zip(*shared))
        with torch.no_grad():
            new.weight[to], new.bias[to] = last.weight[frm], last.bias[frm]
    model.vqa_classifier[-1] = new
    model.config.num_vqa_answers = len(answers)
    print(f"VQA head: another answer vocabulary than {source}: {len(shared)} of this run's {len(answers)} answers "
          f"keep their rows, {len(answers) - len(shared)} new rows initialised, {len(head_answers) - len(shared)} of "
          "the checkpoint's answers dropped")


def load_for_eval(init_path, root, size=None):
    """--eval_only: (model, answers), the fine-tuned model at init_path as it is and the answers its head scores,
    row by row: its answers.json (a model this script fine-tuned), else the vocabulary rebuilt from vocab_splits
    as the original builds it (an original fine-tuned .ckpt). Nothing is initialised or re-indexed. size: the
    image size to score at (the position table interpolated), default the model's own."""
    if not init_path:
        raise ValueError("--eval_only scores a fine-tuned model: give --init_from=, the final/ of a finetune_vqa.py "
                         "run or an original fine-tuned .ckpt (BridgeTower_ftfpt_base_vqav2.ckpt)")
    check_not_a_run_dir(init_path, "init_from")
    answers_file = os.path.join(init_path, "answers.json")
    if os.path.isfile(answers_file):
        with open(answers_file) as f:
            answers, source = json.load(f), answers_file
    else:
        answers = answer_vocabulary(root)
        source = f"the vocabulary of {vocab_splits} (min_answer_count {min_answer_count})"
    model = BridgeTower.from_pretrained(init_path, **({} if size is None else {"image_size": size}))
    if "vqa" not in model.config.heads:
        raise ValueError(f"--eval_only: {init_path} has no VQA head (it has {model.config.heads}): --init_from must "
                         "be a model fine-tuned on VQA")
    if model.config.num_vqa_answers != len(answers):
        raise ValueError(f"--eval_only: the VQA head of {init_path} scores {model.config.num_vqa_answers} answers, "
                         f"{source} has {len(answers)}: they do not belong together")
    return model, answers


def make_optimizer(model, device):
    groups = tu.param_groups(model, weight_decay, {"vqa_classifier": lr_mult_heads,
                                                   "cross_modal": lr_mult_cross_modal})
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=adam_eps, fused=device.type == "cuda")


def vqa_loss(model, batch, device, autocast=nullcontext()):
    """BCE-with-logits against the soft scores, times the number of answers (the original's scaling: a sum over
    answers, a mean over questions). Also the VQA score of the top answer, as the original logs in training.
    A micro-batch with no readable image (Collate's blanks) still runs forward and backward, as every rank and
    micro-step must under DDP, with its loss weighed 0; its weight in the logged averages (the third value
    returned, for train_step) is 0 as well, so that its 0 loss and score are not averaged into the step's."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    with autocast:
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"], heads=("vqa",)).vqa_logits
    logits, targets = logits.float(), batch["targets"]
    answered = batch["readable"] > 0
    loss = F.binary_cross_entropy_with_logits(logits, targets) * targets.shape[1] * answered
    score = targets.gather(1, logits.argmax(1, keepdim=True)).mean()
    return loss, {"vqa_score": score.detach()}, answered.float()


# -----------------------------------------------------------------------------
# Prediction and evaluation

@torch.no_grad()
def predict_answers(model, questions, answers, tokenizer, dist, fallback, autocast=nullcontext()):
    """{question_id: answer} for every question: each rank answers its share, all ranks get the union. A question
    whose image cannot be read gets the answer `fallback` (the callers give the training majority answer), so
    that a submission still covers every question; how many did is printed."""
    eval_batch_size = 2 * micro_batch_size  # no activations kept for backward
    model.eval()
    mine = questions[dist.rank::dist.world_size]
    dataset = VQADataset(mine, eval_transform(image_size), len(answers), image_size)
    loader = make_loader(dataset, [[(i, "") for i in range(s, min(s + eval_batch_size, len(mine)))]
                                   for s in range(0, len(mine), eval_batch_size)], tokenizer, dist.device)
    predictions, unreadable = {}, []
    for b in loader:
        unreadable += b["skipped_ids"].tolist()
        if not b["readable"]:  # blanks, no question to answer
            continue
        with autocast:
            logits = model(b["input_ids"].to(dist.device), attention_mask=b["attention_mask"].to(dist.device),
                           pixel_values=b["pixel_values"].to(dist.device), heads=("vqa",)).vqa_logits
        # the slots of unreadable samples repeat readable ones, question ids included
        for qid, k in zip(b["question_ids"].tolist(), logits.argmax(1).tolist()):
            predictions[qid] = answers[k]
    predictions.update((qid, fallback) for qid in unreadable)
    if dist.world_size > 1:
        shards = [None] * dist.world_size
        torch_dist.all_gather_object(shards, (predictions, unreadable))
        predictions = {k: v for shard, _ in shards for k, v in shard.items()}
        unreadable = [qid for _, shard in shards for qid in shard]
    if unreadable and dist.is_master:
        print(f"predict: {len(unreadable)} of {len(questions)} questions have an unreadable image; "
              f"they were answered {fallback!r}")
    model.train()
    return predictions


def results_json(predictions):
    """The submission format: [{"question_id": int, "answer": str}]."""
    return [{"question_id": int(q), "answer": a} for q, a in sorted(predictions.items())]


def majority_answer(annotations):
    return Counter(normalize_answer(a["multiple_choice_answer"]) for a in annotations).most_common(1)[0][0]


@torch.no_grad()
def predict_top(model, tokenizer, answers, image_file, text, k=5, autocast=nullcontext()):
    """[(answer, probability)] of the k best answers for one image and question, on the model's device."""
    model.eval()
    dev = next(model.parameters()).device
    try:
        with Image.open(image_file) as img:
            pixels = eval_transform(model.config.image_size)(img)[None]
    except (OSError, ValueError) as e:  # missing, not an image, cut short
        raise ValueError(f"--image={image_file!r} cannot be read: {type(e).__name__}: {e}") from None
    enc = tokenizer([text], max_length=max_text_len, padding="longest")
    with autocast:
        logits = model(enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev),
                       pixel_values=pixels.to(dev), heads=("vqa",)).vqa_logits[0]
    probs, idx = logits.float().sigmoid().topk(min(k, len(answers)))
    return [(answers[i], p) for i, p in zip(idx.tolist(), probs.tolist())]


def check_not_a_run_dir(path, flag):
    final = os.path.join(path, "final")
    if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(final, "config.json")):
        raise FileNotFoundError(f"{path} is a run's out_dir: its fine-tuned model is --{flag}={final}")


def load_finetuned(path):
    """(model, tokenizer, answers) from a saved fine-tuned model dir."""
    check_not_a_run_dir(path, "checkpoint")
    if not os.path.isfile(os.path.join(path, "answers.json")):
        raise FileNotFoundError(f"no answers.json in {path}: --checkpoint must be a fine-tuned model directory, "
                                "the final/ that finetune_vqa.py writes in its out_dir")
    with open(os.path.join(path, "answers.json")) as f:
        answers = json.load(f)
    model = BridgeTower.from_pretrained(path)
    if "vqa" not in model.config.heads:
        raise ValueError(f"{path} has no VQA head: --checkpoint must be a fine-tuned model directory")
    if len(answers) != model.config.num_vqa_answers:
        raise ValueError(f"{path}: answers.json lists {len(answers)} answers, the VQA head scores "
                         f"{model.config.num_vqa_answers}: the two files come from different runs")
    return model, Tokenizer.from_dir(path), answers


def run_predict():
    path = checkpoint or os.path.join(out_dir, "final")
    if not image or not question:
        raise ValueError("--predict needs --image=path.jpg and --question=\"...\"")
    model, tokenizer, answers = load_finetuned(path)
    dev = tu.resolve_device(device)
    tu.set_matmul_precision(dtype)
    model.to(dev)
    print(f"Q: {question}")
    print("score  answer   (the sigmoid of each answer's logit, scored on its own as BCE trains it: the scores "
          "need not sum to 1)")
    for answer, p in predict_top(model, tokenizer, answers, image, question, autocast=tu.autocast(dev, dtype)):
        print(f"{p:.3f}  {answer}")


# -----------------------------------------------------------------------------
# Training

def evaluate(model, eval_questions, eval_annotations, answers, tokenizer, dist, autocast, majority):
    """Official accuracy on the evaluation questions, and that of always answering the training majority answer."""
    predictions = predict_answers(model, eval_questions, answers, tokenizer, dist, majority, autocast)
    result = vqa_accuracy(predictions, eval_annotations)
    baseline = vqa_accuracy({a["question_id"]: majority for a in eval_annotations}, eval_annotations)
    return predictions, result, baseline["overall"]


def main():
    global image_size  # --eval_only without --image_size: the model's own
    given = set()
    config = tu.configure(globals(), given=given)
    if resume:
        if eval_only:
            raise ValueError("--eval_only trains nothing, so there is no run to --resume")
        config = tu.take_run_settings(globals(), out_dir, given, "finetune_vqa")
    tu.check_settings(config, **tu.TRAINING_RULES, epochs=tu.POSITIVE, image_size=tu.POSITIVE,
                      synthetic_images=tu.POSITIVE, min_answer_count=tu.POSITIVE, eval_holdout=tu.NOT_NEGATIVE,
                      crop_scale=(lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1, "(min, max), 0 < min <= max <= 1"),
                      randaugment=(lambda v: len(v) == 2 and v[0] >= 0 and 0 <= v[1] <= 10,
                                   "(ops >= 0, magnitude in [0, 10])"))
    if predict:
        return run_predict()
    dist = tu.setup_distributed(device)
    tu.set_matmul_precision(dtype)
    if dist.device.type == "cpu" and cpu_threads:
        torch.set_num_threads(cpu_threads)
    t_start = time.time()
    # --eval_only trains nothing, so batch_size does not apply (it scores 2 x micro_batch_size questions at a time)
    accum = None if eval_only else tu.accumulation_steps(batch_size, micro_batch_size, dist.world_size)
    if dist.is_master:
        tu.lock_out_dir(out_dir)
    if eval_only and any(os.path.exists(os.path.join(out_dir, name)) for name in (tu.CKPT_NAME, "final")):
        raise FileExistsError(f"{out_dir} holds a training run, whose metrics.jsonl and results --eval_only would "
                              "write over: give it an --out_dir of its own")
    tu.check_out_dir(out_dir, resume)
    root, image_dir = prepare_data(dist)

    # the answer vocabulary: from the annotations, from the checkpoint when resuming (it must not move), or the
    # one the model's head scores when it is only evaluated
    ckpt = tu.load_latest_checkpoint(out_dir, "finetune_vqa", dist=dist) if resume else None
    init_path = resolve_init()
    tokenizer, tok_dir = tu.load_tokenizer(tokenizer_dir, out_dir, init_from=init_path)
    if ckpt is not None:  # every rank checks the settings, before anything is built from them
        message = tu.resume_message(out_dir, ckpt["step"], ckpt["config"], config, fixed=resume_fixed(ckpt["config"]))
        answers = ckpt["answers"]
    elif eval_only:
        model, answers = load_for_eval(init_path, root, image_size if "image_size" in given else None)
        image_size = config["image_size"] = model.config.image_size
    else:
        answers = answer_vocabulary(root)
    answer_to_label = {a: i for i, a in enumerate(answers)}
    trained_on_eval = eval_split in splits_of(train_splits)
    held_out = {eval_split: holdout_images(load_questions(root, eval_split, image_dir))} if trained_on_eval else {}
    train_items, train_annotations, dropped = load_training_set(root, image_dir, answer_to_label, held_out)
    if not train_items:
        raise ValueError(f"none of the questions of {train_splits} has an answer in the vocabulary ({dropped} "
                         "dropped)")
    # also read by --eval_only: the training majority answer answers unreadable images and is the baseline
    majority = majority_answer(train_annotations)
    del train_annotations  # 10 answers a question: gigabytes at VQAv2's size, on every rank
    if eval_split:
        eval_questions, eval_annotations = load_eval_set(root, image_dir, held_out)
        check_image_root(eval_questions)
    if test_split:  # read now, so that a missing file or image folder stops the run before training, not after
        test_questions = load_questions(root, test_split, image_dir)
        check_image_root(test_questions)
    if dist.is_master:
        print(f"data: {root} | {len(answers)} answers (seen >= {min_answer_count}x) | {len(train_items)} training "
              f"questions from {train_splits}, {dropped} dropped (no answer in the vocabulary)")
        os.makedirs(out_dir, exist_ok=True)
        _write_json(os.path.join(out_dir, "answers.json"), answers)

    # checkpoints keep what "auto" found: a resume takes this run's tokenizer, whatever out/pretrain holds by then
    config["init_from"] = init_path
    torch.manual_seed(seed)  # the same initial head on every rank (DDP also broadcasts rank 0's)
    if ckpt is not None:
        model = tu.model_from_checkpoint(ckpt, dist)
        weights_from = os.path.join(out_dir, tu.CKPT_NAME)
    elif not eval_only:  # (eval_only: loaded with its answers above)
        if resume and dist.is_master:
            print(f"resume: no checkpoint in {out_dir}, starting from scratch")
        model = build_model(init_path, tokenizer.vocab_size, answers)
        weights_from = init_path or "random weights"
    tu.check_tokenizer_fits(tokenizer, tok_dir, model.config)
    model.to(dist.device)
    autocast = tu.autocast(dist.device, dtype)
    logger = tu.MetricLogger(out_dir, dist.is_master,
                             resume=(ckpt["step"], ckpt.get("metrics_size")) if ckpt is not None else None)

    def predict_and_score(model, step, scored):
        """test_split's submission file, and eval_split's predictions, accuracy and summary, in out_dir. scored:
        where the model's weights are, for the summary."""
        if test_split:
            predictions = predict_answers(model, test_questions, answers, tokenizer, dist, majority, autocast)
            if dist.is_master:
                path = os.path.join(out_dir, f"results_{test_split}.json")
                _write_json(path, results_json(predictions))
                print(f"wrote {path}: {len(predictions)} answers for submission")
        if eval_split:
            predictions, result, baseline = evaluate(model, eval_questions, eval_annotations, answers, tokenizer,
                                                     dist, autocast, majority)
            if dist.is_master:
                _write_json(os.path.join(out_dir, f"results_{eval_split}.json"), results_json(predictions))
                summary = {"split": eval_split, "questions": len(eval_annotations), "overall": result["overall"],
                           "perAnswerType": result["perAnswerType"], "majority_answer": majority,
                           "majority_overall": baseline, "steps": step, "model": scored}
                _write_json(os.path.join(out_dir, f"eval_{eval_split}.json"), summary)
                logger.log(step, kind="eval", vqa_acc=result["overall"] / 100, majority_acc=baseline / 100)
                per_type = sorted(result["perAnswerType"].items())
                types = " ".join(f"{t.replace('/', '')}_acc={v / 100:.2f}" for t, v in per_type)
                print(f"{eval_split}: VQA accuracy {result['overall']:.2f} ({len(eval_annotations)} questions) | per "
                      f"type {result['perAnswerType']} | majority answer {majority!r}: {baseline:.2f}")
                print(f"eval: vqa_acc={result['overall'] / 100:.2f} majority_acc={baseline / 100:.2f} {types} "
                      f"questions={len(eval_annotations)} time_s={time.time() - t_start:.0f}", flush=True)

    if eval_only:  # the model as it is: nothing is trained, and nothing but the predictions is written
        if dist.is_master:
            n_params = sum(p.numel() for p in model.parameters())
            print(f"model {n_params / 1e6:.2f}M parameters from {init_path} at {image_size}px, scored as it is "
                  f"(--eval_only) | {dist.world_size} process(es) | device {dist.device}")
        predict_and_score(model, 0, init_path)
        return tu.cleanup_distributed()

    optimizer = make_optimizer(model, dist.device)
    steps_per_epoch = len(train_items) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_items)} training questions do not fill one batch of {batch_size}")
    total_steps = max_steps or epochs * steps_per_epoch
    step, skipped = 0, 0
    if ckpt is not None:
        tu.load_optimizer_state(optimizer, ckpt["optimizer"])
        step, skipped = ckpt["step"], ckpt.get("skipped", 0)
        tu.set_rng_state(ckpt["rng"][dist.rank])
        if dist.is_master:
            print(message)
    else:
        torch.manual_seed(seed + dist.rank)  # each rank draws its own dropout masks
    start_step = step
    del ckpt
    raw_model = model
    model = tu.wrap_for_training(model, dist, grad_checkpointing, compile)
    loss_fn = lambda m, b: vqa_loss(m, b, dist.device, autocast)

    dataset = VQADataset(train_items, train_transform(image_size, scale=crop_scale, randaugment=randaugment),
                         len(answers), image_size)
    del train_items  # the dataset holds them packed; the list would be copied into every loader worker
    loader = iter(make_loader(dataset, micro_batch_schedule(len(dataset), step, accum, dist), tokenizer,
                              dist.device))
    warmup_steps = int(warmup_ratio * total_steps)
    cfg = raw_model.config
    # questions are padded to the longest in the batch, so max_text_len overstates the FLOPs (MFU is an upper bound)
    flops = batch_size * tu.flops_per_sample(cfg, max_text_len, heads=("vqa",))
    peak = tu.peak_flops(dist.device, dtype)
    if dist.is_master:
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"model {n_params / 1e6:.2f}M parameters from {weights_from} at {image_size}px | "
              f"{dist.world_size} process(es) x {accum} micro-steps x {micro_batch_size} = batch {batch_size} | "
              f"{total_steps} steps ({total_steps / steps_per_epoch:.1f} epochs) | device {dist.device}")

    def checkpoint_now():
        state = {"kind": "finetune_vqa", "model": raw_model.state_dict(), "model_config": asdict(cfg),
                 "optimizer": optimizer.state_dict(),
                 "step": step, "accum": accum, "world_size": dist.world_size,
                 "skipped": skipped, "answers": answers, "config": config, "rng": tu.gather_rng_states(dist),
                 "metrics_size": logger.size()}
        if dist.is_master:
            tu.save_checkpoint(out_dir, state)

    def eval_log():
        state = tu.rng_state()
        _, result, _ = evaluate(raw_model, eval_questions, eval_annotations, answers, tokenizer, dist, autocast, majority)
        logger.log(step, kind="eval", vqa_acc=result["overall"] / 100,
                   **{f"{t.replace('/', '')}_acc": v / 100 for t, v in result["perAnswerType"].items()})
        tu.set_rng_state(state)

    skipped_local = 0  # this rank's, over one step's micro-batches

    def micro_batches():
        nonlocal skipped_local
        for _ in range(accum):
            batch = next(loader)
            skipped_local += len(batch.pop("skipped_ids"))
            yield batch

    dt_avg, t_train = None, time.time()
    while step < total_steps:
        if step > start_step:  # a resumed run already did these at its start step
            if eval_split and eval_interval and step % eval_interval == 0:
                eval_log()
            if ckpt_interval and step % ckpt_interval == 0:
                checkpoint_now()
        t0 = time.time()
        factor = tu.lr_factor(step, total_steps, warmup_steps)
        tu.set_lr(optimizer, lr, factor)
        skipped_local = 0
        metrics = tu.train_step(model, micro_batches(), loss_fn, optimizer, grad_clip, dist, accum_steps=accum)
        skipped += tu.sum_over_ranks(skipped_local, dist)
        step += 1
        dt = time.time() - t0
        dt_avg = dt if dt_avg is None else 0.9 * dt_avg + 0.1 * dt
        metrics.update(lr=lr * factor, ms=dt * 1e3, samples_s=batch_size / dt)
        if peak:
            metrics["mfu"] = flops / dt / (peak * dist.world_size)
        metrics.update(epoch=step / steps_per_epoch, eta=tu.format_eta((total_steps - step) * dt_avg), skipped=skipped)
        logger.log(step, echo=step % log_interval == 0 or step == total_steps, **metrics)
    train_time = time.time() - t_train
    if step > start_step:
        checkpoint_now()

    if dist.is_master:
        final_dir = os.path.join(out_dir, "final")
        raw_model.save_pretrained(final_dir)
        _write_json(os.path.join(final_dir, "answers.json"), answers)
        tu.copy_tokenizer(tok_dir, final_dir)
        print(f"saved {final_dir} | {step} steps, training {train_time:.0f}s")
    predict_and_score(raw_model, step, os.path.join(out_dir, "final"))
    tu.cleanup_distributed()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        resumable = not (predict or eval_only)
        sys.exit("\ninterrupted" + (": --resume continues from the last checkpoint (the last 'checkpoint:' line "
                                     "above)" if resumable else ""))
