"""
Fine-tune BridgeTower on VQAv2 and score it with the official VQA accuracy.

    python finetune_vqa.py                                   # demo: synthetic VQA set, tiny model, CPU, ~3 min
    python finetune_vqa.py config/finetune_vqa_base.py --data_dir=/data/vqav2 --init_from=/ckpt/pretrain
    torchrun --standalone --nproc_per_node=8 finetune_vqa.py config/finetune_vqa_base.py --data_dir=...
    python finetune_vqa.py --predict --image=cat.jpg --question="what is this?" [--checkpoint=out/vqa/final]

The data path is the same for the demo and the real data: the synthetic set is written to disk in the
VQAv2 JSON schema with COCO-named JPEG files, then read back by the VQAv2 reader.
"""

import json
import os
import re
from collections import Counter

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


def load_annotations(root, split):
    """The official annotation list of a split, or None for the test splits (no answers released)."""
    path = annotations_path(root, split)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)["annotations"]


def load_questions(root, split, image_root=None):
    """[{question_id, image_id, question, image}] of a split, in file order."""
    with open(questions_path(root, split)) as f:
        questions = json.load(f)["questions"]
    image_root = image_root or root
    return [dict(q, image=image_path(image_root, split, q["image_id"])) for q in questions]


def soft_score(count):
    # VQA soft target from the number of annotators who gave the answer: 0, 0.3, 0.6, 0.9, then 1.0 from 4 on
    # (the original's get_score; close to the metric's min(1, n/3) averaged over leave-one-out subsets).
    return (0.0, 0.3, 0.6, 0.9)[count] if count < 4 else 1.0


def build_answer_vocab(annotations, min_count=9):
    """Answers whose normalised multiple_choice_answer is seen at least min_count times over the given
    annotations (train+val in the original: 3129 answers), in order of first appearance as in the original."""
    counts = Counter(normalize_answer(a["multiple_choice_answer"]) for a in annotations)
    return [answer for answer, n in counts.items() if n >= min_count]


def answer_targets(annotation, answer_to_label):
    """(labels, scores) of one question: the soft score of every in-vocabulary normalised human answer."""
    counts = Counter(normalize_answer(a["answer"]) for a in annotation["answers"])
    labels = [answer_to_label[a] for a in counts if a in answer_to_label]
    scores = [soft_score(counts[a]) for a in counts if a in answer_to_label]
    return labels, scores


def attach_targets(questions, annotations, answer_to_label):
    """Questions joined with their targets; questions with no in-vocabulary answer are dropped (the original
    drops them from training). Returns (kept, number dropped)."""
    by_id = {a["question_id"]: a for a in annotations}
    kept, dropped = [], 0
    for q in questions:
        labels, scores = answer_targets(by_id[q["question_id"]], answer_to_label)
        if labels:
            kept.append(dict(q, labels=labels, scores=scores))
        else:
            dropped += 1
    return kept, dropped
