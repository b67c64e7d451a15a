"""VQA fine-tuning: the official accuracy, the answer vocabulary, the data path, predict and resume.
Expected metric values are worked out by hand in the comments, never by calling the code twice."""

import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

import data
import finetune_vqa as fv
import train_utils as tu
from conftest import assert_same_final_weights, eval_line, kill_after_first_checkpoint, run_script, train_lines
from model import BridgeTower, BridgeTowerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ann(qid, answers, answer_type="other", mca=None):
    """One annotation in the official schema; answers: 10 strings."""
    return {
        "question_id": qid, "image_id": qid, "question_type": "what", "answer_type": answer_type,
        "multiple_choice_answer": mca if mca is not None else answers[0],
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)],
    }


def acc_of(pred, answers):
    return fv.vqa_accuracy({1: pred}, [ann(1, answers)])["overall"]


# -----------------------------------------------------------------------------
# the metric

@pytest.mark.parametrize("k, expected", [
    # k of the 10 humans gave the prediction. Leaving out one of the k leaves k-1 matches, leaving out
    # one of the other 10-k leaves k; each subset scores min(1, matches/3):
    (0, 0.0),
    (1, 30.0),    # (1*0 + 9*(1/3)) / 10 = 0.3
    (2, 60.0),    # (2*(1/3) + 8*(2/3)) / 10 = 18/30 = 0.6
    (3, 90.0),    # (3*(2/3) + 7*1) / 10 = 9/10
    (4, 100.0),   # (4*1 + 6*1) / 10
    (10, 100.0),
])
def test_leave_one_out_average(k, expected):
    answers = ["cat"] * k + ["dog"] * (10 - k)
    assert acc_of("cat", answers) == pytest.approx(expected)


def test_prediction_normalisation():
    # number words -> digits, after lower-casing; "none" counts as "0"
    assert acc_of("Two", ["2"] * 10) == 100.0
    assert acc_of("TEN", ["10"] * 10) == 100.0
    assert acc_of("none", ["0"] * 10) == 100.0
    # articles removed
    assert acc_of("the dog", ["dog"] * 10) == 100.0
    assert acc_of("a red car", ["red car"] * 10) == 100.0
    # contractions map: "dont" -> "don't"; an apostrophe is not punctuation in the Python 3 evaluator
    assert acc_of("dont", ["don't"] * 10) == 100.0
    assert acc_of("don't", ["don't"] * 10) == 100.0
    # whitespace, newlines and tabs
    assert acc_of("  yes\n", ["yes"] * 10) == 100.0
    assert acc_of("red\tcar", ["red car"] * 10) == 100.0


def test_punctuation_rules():
    # a mark next to a space is deleted; elsewhere it becomes a space
    assert acc_of("red, white", ["red white"] * 10) == 100.0
    assert acc_of("red,white", ["red white"] * 10) == 100.0
    assert acc_of("black/white", ["black white"] * 10) == 100.0
    assert acc_of("yes!", ["yes"] * 10) == 100.0
    # a comma between digits anywhere in the text makes every mark disappear: "1,000" -> "1000",
    # and then also "t-shirt" -> "tshirt" in the same answer
    assert acc_of("1,000", ["1000"] * 10) == 100.0
    assert acc_of("1,000 t-shirt", ["1000 tshirt"] * 10) == 100.0
    assert acc_of("t-shirt", ["t shirt"] * 10) == 100.0
    # each mark is judged on the answer as given, not as the marks before it left it: "-" has no space beside it
    # in "ab/-cd-ef", so both become spaces, although "/" -> " " put one beside the first
    assert acc_of("ab/-cd-ef", ["ab cd ef"] * 10) == 100.0
    # periods: removed unless followed by a digit
    assert acc_of("yes.", ["yes"] * 10) == 100.0
    assert acc_of("3.5", ["3.5"] * 10) == 100.0
    assert acc_of("3.5", ["35"] * 10) == 0.0
    assert acc_of("st.louis", ["stlouis"] * 10) == 100.0


def test_human_answers_get_punctuation_only_when_they_disagree():
    # all 10 identical: the human answers are compared raw, so the processed prediction "black white"
    # does not match "black/white", and a capitalised human answer never matches
    assert acc_of("black/white", ["black/white"] * 10) == 0.0
    assert acc_of("yes", ["Yes"] * 10) == 0.0
    # 9 say "black/white", 1 says "black": they are processed to "black white"; leaving out "black"
    # leaves 9 matches, leaving out any other leaves 8: min(1, .) = 1 everywhere -> 100
    assert acc_of("black/white", ["black/white"] * 9 + ["black"]) == 100.0
    # the humans never get lower-casing, number words or articles: the prediction "the dog" becomes "dog"
    # and matches only the 1 human "dog", not the 9 "the dog": k=1 -> 30; "two dogs" becomes "2 dogs": k=5
    assert acc_of("two dogs", ["two dogs"] * 5 + ["2 dogs"] * 5) == 100.0
    assert acc_of("the dog", ["dog"] + ["the dog"] * 9) == 30.0


def test_overall_and_per_answer_type():
    annotations = [
        ann(1, ["yes"] * 10, "yes/no"),                   # pred yes: 1.0
        ann(2, ["no"] * 8 + ["yes"] * 2, "yes/no"),       # pred yes: k=2 -> 0.6
        ann(3, ["2"] * 9 + ["3"], "number"),              # pred "three": k=1 -> 0.3
        ann(4, ["red"] * 3 + ["blue"] * 7, "other"),      # pred "Red.": k=3 -> 0.9
        ann(5, ["circle"] * 10, "other"),                 # pred "square": 0
    ]
    preds = {1: "yes", 2: "yes", 3: "three", 4: "Red.", 5: "square"}
    result = fv.vqa_accuracy(preds, annotations)
    # overall (1 + 0.6 + 0.3 + 0.9 + 0) / 5 = 0.56; yes/no 0.8, number 0.3, other 0.45
    assert result["overall"] == pytest.approx(56.0)
    assert result["perAnswerType"] == pytest.approx({"yes/no": 80.0, "number": 30.0, "other": 45.0})
    assert result["perQuestion"][2] == pytest.approx(0.6)
    # rounded to 2 decimals like the official script: 1 question of 3 right -> 33.33
    three = [ann(i, ["x"] * 10) for i in range(3)]
    assert fv.vqa_accuracy({0: "x", 1: "y", 2: "y"}, three)["overall"] == 33.33
    # the caller's annotations are not rewritten
    assert annotations[3]["answers"][0]["answer"] == "red"
    with pytest.raises(KeyError):
        fv.vqa_accuracy({1: "yes"}, annotations)


# -----------------------------------------------------------------------------
# answer vocabulary and soft scores

def test_loss_sums_over_answers_and_averages_over_questions():
    # the original's scaling: BCE summed over the answer vocabulary, averaged over the questions of the batch
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(3, 7, generator=g), torch.rand(3, 7, generator=g)
    model = lambda *args, **kwargs: types.SimpleNamespace(vqa_logits=logits)
    batch = {"input_ids": torch.zeros(3, 4, dtype=torch.long), "attention_mask": torch.ones(3, 4),
             "pixel_values": torch.zeros(3, 3, 8, 8), "targets": targets, "readable": torch.tensor(2)}
    loss, metrics, weight = fv.vqa_loss(model, batch, "cpu")
    want = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / 3
    assert torch.allclose(loss, want, rtol=1e-6)
    assert metrics["vqa_score"].item() == pytest.approx(targets.gather(1, logits.argmax(1, keepdim=True)).mean().item())
    assert weight.item() == 1
    # Collate's blanks (no readable image in the batch): forward and backward still run, the loss weighs 0, and
    # the micro-batch weighs 0 in the step's logged loss and score (train_step's weighted mean)
    logits.requires_grad_()
    loss, _, weight = fv.vqa_loss(model, dict(batch, readable=torch.tensor(0)), "cpu")
    loss.backward()
    assert loss.item() == 0 and logits.grad is not None and not logits.grad.any()
    assert weight.item() == 0


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)


def test_vocabulary_soft_scores_and_dropped(tmp_path):
    annotations = [
        ann(1, ["Two"] * 6 + ["2"] * 2 + ["3"] * 2, "number", mca="two"),   # "two" and "2" are one answer
        ann(2, ["2"] * 10, "number", mca="2"),
        ann(3, ["the dog"] * 3 + ["dog"] + ["cat"] * 6, "other", mca="cat"),
        ann(4, ["dog"] * 10, "other", mca="Dog."),
        ann(5, ["cat"] * 10, "other", mca="cat"),
        ann(6, ["zebra"] * 9 + ["dog"], "other", mca="zebra"),              # only "dog" is in the vocabulary
        ann(7, ["zebra"] * 10, "other", mca="zebra"),                       # nothing in the vocabulary: dropped
    ]
    questions = [{"question_id": a["question_id"], "image_id": a["image_id"], "question": f"q{a['question_id']}?"}
                 for a in annotations]
    write_json(tmp_path / "v2_mscoco_train2014_annotations.json", {"annotations": annotations})
    write_json(tmp_path / "v2_OpenEnded_mscoco_train2014_questions.json", {"questions": questions})

    loaded = fv.load_annotations(str(tmp_path), "train2014")
    # normalised multiple_choice_answer counts: "2": 2, "cat": 2, "dog": 1, "zebra": 2, in order of appearance
    assert fv.build_answer_vocab(loaded, min_count=2) == ["2", "cat", "zebra"]
    vocab = fv.build_answer_vocab(loaded, min_count=1)
    assert vocab == ["2", "cat", "dog", "zebra"]
    vocab = ["2", "cat", "dog"]
    label = {a: i for i, a in enumerate(vocab)}

    # soft scores from the counts of the normalised human answers: 0.3, 0.6, 0.9, 1.0 for 1, 2, 3, >=4
    def targets(i):
        labels, scores = fv.answer_targets(loaded[i], label)
        return dict(zip([vocab[l] for l in labels], scores))
    assert targets(0) == {"2": 1.0}                   # 8 x "2" after normalisation; "3" not in vocab
    assert targets(2) == {"dog": 1.0, "cat": 1.0}     # 3 "the dog" + 1 "dog" = 4
    assert fv.answer_targets(ann(9, ["dog"] * 3 + ["cat"] * 2 + ["2"] + ["x"] * 4), label) == ([2, 1, 0], [0.9, 0.6, 0.3])

    questions = fv.load_questions(str(tmp_path), "train2014", image_root="/images")
    assert questions[0]["image"] == "/images/train2014/COCO_train2014_000000000001.jpg"
    assert fv.image_path("/images", "test-dev2015", 42) == "/images/test2015/COCO_test2015_000000000042.jpg"
    kept, dropped = fv.attach_targets(questions, loaded, label)
    assert dropped == 1 and [q["question_id"] for q in kept] == [1, 2, 3, 4, 5, 6]
    assert kept[5]["labels"] == [2] and kept[5]["scores"] == [0.3]


# -----------------------------------------------------------------------------
# the synthetic set and the batch schedule

def test_synthetic_set_is_vqav2_on_disk(tmp_path):
    root = fv.write_synthetic_vqa(str(tmp_path), {"train2014": 12, "val2014": 4, "test2015": 4})
    questions = json.load(open(tmp_path / "v2_OpenEnded_mscoco_train2014_questions.json"))["questions"]
    annotations = json.load(open(tmp_path / "v2_mscoco_train2014_annotations.json"))["annotations"]
    assert len(questions) == len(annotations) == 12 * fv.QUESTIONS_PER_IMAGE
    assert {q["question_id"] for q in questions} == {a["question_id"] for a in annotations}
    for a in annotations:
        assert set(a) >= {"question_id", "image_id", "question_type", "answer_type", "multiple_choice_answer", "answers"}
        assert len(a["answers"]) == 10 and [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
        assert a["answer_type"] in ("yes/no", "number", "other")
    assert any(len({x["answer"] for x in a["answers"]}) > 1 for a in annotations), "no disagreement at all"
    for q in questions:
        assert os.path.exists(tmp_path / "train2014" / f"COCO_train2014_{q['image_id']:012d}.jpg")
    # test: questions only, and test-dev a subset of test; image ids never shared between splits
    assert not os.path.exists(tmp_path / "v2_mscoco_test2015_annotations.json")
    test = json.load(open(tmp_path / "v2_OpenEnded_mscoco_test2015_questions.json"))["questions"]
    dev = json.load(open(tmp_path / "v2_OpenEnded_mscoco_test-dev2015_questions.json"))["questions"]
    assert dev and {q["question_id"] for q in dev} < {q["question_id"] for q in test}
    val = json.load(open(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"))["questions"]
    assert not {q["image_id"] for q in questions} & {q["image_id"] for q in val}
    # the same set again is not rewritten; a different one is
    stamp = os.path.getmtime(tmp_path / "synthetic.json")
    fv.write_synthetic_vqa(root, {"train2014": 12, "val2014": 4, "test2015": 4})
    assert os.path.getmtime(tmp_path / "synthetic.json") == stamp


def test_batch_schedule_ranks_and_resume(monkeypatch):
    from train_utils import Dist
    monkeypatch.setattr(fv, "batch_size", 8)
    monkeypatch.setattr(fv, "micro_batch_size", 2)
    monkeypatch.setattr(fv, "seed", 3)
    take = lambda gen, n: [next(gen) for _ in range(n)]
    single = take(fv.micro_batch_schedule(20, 0, 4, Dist(0, 0, 1)), 4 * 5)   # 5 steps; 2 full batches per epoch
    ranks = [take(fv.micro_batch_schedule(20, 0, 2, Dist(r, r, 2)), 2 * 5) for r in range(2)]
    for step in range(5):
        whole = [x for mb in single[4 * step:4 * step + 4] for x in mb]
        split = [x for k in range(2) for r in range(2) for x in ranks[r][2 * step + k]]
        assert whole == split and len(whole) == 8
        assert len({i for i, _ in whole}) == 8                       # no repeats within a batch
    first_epoch = [i for mb in single[:8] for i, _ in mb]
    assert len(set(first_epoch)) == 16                               # an epoch visits distinct items
    assert single[8][0][1].startswith("3-1-")                        # augmentation seeds carry the epoch
    assert take(fv.micro_batch_schedule(20, 3, 4, Dist(0, 0, 1)), 8) == single[12:20]   # resume at step 3


# -----------------------------------------------------------------------------
# end to end: a tiny fine-tune on a tiny synthetic set (subprocesses, as a user runs it)

SCRIPT = os.path.join(ROOT, "finetune_vqa.py")
# tiny random-weight model, 32 px (4 patches), a small synthetic set; `TINY` for mechanics, `LEARN` long enough
# for the model to get well past the majority answer (it learns the answer priors of each question kind first)
TINY = ["--init_from=", "--image_size=32", "--synthetic_images=200", "--batch_size=16", "--micro_batch_size=8",
        "--max_steps=6", "--lr=1e-3", "--lr_mult_heads=1", "--log_interval=1", "--ckpt_interval=2", "--num_workers=0"]
LEARN = ["--init_from=", "--image_size=32", "--synthetic_images=200", "--batch_size=32", "--micro_batch_size=32",
         "--max_steps=200", "--lr=3e-4", "--lr_mult_heads=10", "--lr_mult_cross_modal=5", "--log_interval=50",
         "--num_workers=0", "--dropout=0.1"]


def run_vqa(args, timeout=300):
    return run_script(SCRIPT, args, timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("vqa")
    synthetic, run = str(base / "synthetic"), str(base / "run")
    stdout = run_vqa(LEARN + [f"--synthetic_dir={synthetic}", f"--out_dir={run}"])
    return {"synthetic": synthetic, "run": run, "stdout": stdout}


def test_malformed_vqa_files_are_errors_naming_file_record_and_field(tmp_path, monkeypatch):
    root = fv.write_synthetic_vqa(str(tmp_path), {"train2014": 2, "val2014": 2, "test2015": 2})
    questions_file, annotations_file = fv.questions_path(root, "val2014"), fv.annotations_path(root, "val2014")
    original_q, original_a = json.load(open(questions_file)), json.load(open(annotations_file))

    def rewrite(path, data):
        with open(path, "w") as f:
            f.write(data if isinstance(data, str) else json.dumps(data))

    monkeypatch.setattr(fv, "eval_split", "val2014")
    monkeypatch.setattr(fv, "train_splits", "train2014")
    q = json.loads(json.dumps(original_q))
    del q["questions"][2]["image_id"]
    rewrite(questions_file, q)
    with pytest.raises(ValueError, match=r"val2014_questions.json: questions\[2\] lacks image_id"):
        fv.load_questions(root, "val2014")
    rewrite(questions_file, original_q["questions"])  # a bare list
    with pytest.raises(ValueError, match='expected {"questions": \\[...\\]}'):
        fv.load_questions(root, "val2014")
    rewrite(questions_file, "{not json")
    with pytest.raises(ValueError, match="val2014_questions.json: not valid JSON"):
        fv.load_questions(root, "val2014")
    rewrite(questions_file, original_q)
    a = json.loads(json.dumps(original_a))
    a["annotations"][1]["answers"] = []
    rewrite(annotations_file, a)
    with pytest.raises(ValueError, match=r"annotations\[1\] lacks answers: \[{\"answer\": str}"):
        fv.load_annotations(root, "val2014")
    # annotations of other questions (another version of the files): an error, not answers paired with the wrong
    # questions or a KeyError
    a = json.loads(json.dumps(original_a))
    for ann in a["annotations"]:
        ann["question_id"] += 1
    rewrite(annotations_file, a)
    with pytest.raises(ValueError, match="val2014_annotations.json: no annotation for 2 of 6 questions"):
        fv.load_eval_set(root, root, {})
    with pytest.raises(ValueError, match="do not belong together"):
        fv.attach_targets(fv.load_questions(root, "val2014"), a["annotations"], {"yes": 0}, annotations_file)
    a = json.loads(json.dumps(original_a))
    del a["annotations"][4]["answer_type"]
    rewrite(annotations_file, a)
    with pytest.raises(ValueError, match="no answer_type for question"):
        fv.load_eval_set(root, root, {})
    rewrite(annotations_file, original_a)
    questions, annotations = fv.load_eval_set(root, root, {})
    assert [a["question_id"] for a in annotations] == [q["question_id"] for q in questions]


def test_predict_needs_a_finetuned_directory(tiny_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="no answers.json in .*: --checkpoint must be a fine-tuned model"):
        fv.load_finetuned(str(tmp_path))
    final = shutil.copytree(os.path.join(tiny_run["run"], "final"), str(tmp_path / "final"))
    answers = json.load(open(os.path.join(final, "answers.json")))
    with open(os.path.join(final, "answers.json"), "w") as f:
        json.dump(answers[:-1], f)
    with pytest.raises(ValueError, match=f"lists {len(answers) - 1} answers, the VQA head scores {len(answers)}"):
        fv.load_finetuned(final)
    # the run's out_dir for its final/: the message points there
    with pytest.raises(FileNotFoundError, match="is a run's out_dir: its fine-tuned model is --checkpoint=.*/final"):
        fv.load_finetuned(tiny_run["run"])
    # an image that cannot be read is named
    model, tokenizer, vocab = fv.load_finetuned(os.path.join(tiny_run["run"], "final"))
    (tmp_path / "cut.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="--image='.*cut.jpg' cannot be read: UnidentifiedImageError"):
        fv.predict_top(model, tokenizer, vocab, str(tmp_path / "cut.jpg"), "what?")


def test_majority_answer():
    # normalised as the vocabulary is ("Two" and "two." are "2"); the most frequent wins
    annotations = [{"multiple_choice_answer": a} for a in ("Two", "yes", "2", "two.", "yes", "no", "blue")]
    assert fv.majority_answer(annotations) == "2"


def test_learns_far_above_the_majority_answer(tiny_run):
    line = eval_line(tiny_run["stdout"])
    # measured: vqa_acc 0.38 against 0.14 for always answering the most common training answer
    assert line["vqa_acc"] >= line["majority_acc"] + 0.15, line


def test_run_outputs(tiny_run):
    run, synthetic = tiny_run["run"], tiny_run["synthetic"]
    line = eval_line(tiny_run["stdout"])
    assert 0 <= line["vqa_acc"] <= 1 and 0 <= line["majority_acc"] <= 1
    # the submission file covers every test question, in the required format
    results = json.load(open(os.path.join(run, "results_test2015.json")))
    test_ids = [q["question_id"] for q in json.load(open(os.path.join(
        synthetic, "v2_OpenEnded_mscoco_test2015_questions.json")))["questions"]]
    answers = json.load(open(os.path.join(run, "final", "answers.json")))
    assert sorted(r["question_id"] for r in results) == sorted(test_ids)
    for r in results:
        assert set(r) == {"question_id", "answer"} and type(r["question_id"]) is int and r["answer"] in answers
    # the evaluation summary agrees with scoring the saved predictions again
    summary = json.load(open(os.path.join(run, "eval_val2014.json")))
    preds = {r["question_id"]: r["answer"] for r in json.load(open(os.path.join(run, "results_val2014.json")))}
    val = fv.load_annotations(synthetic, "val2014")
    assert summary["overall"] == fv.vqa_accuracy(preds, val)["overall"]
    assert summary["overall"] / 100 == pytest.approx(line["vqa_acc"], abs=0.006)
    # the final dir is a loadable model with its vocabulary and tokenizer
    assert {"config.json", "model.safetensors", "answers.json", "vocab.json", "merges.txt"} <= set(
        os.listdir(os.path.join(run, "final")))
    assert "dropped (no answer in the vocabulary)" in tiny_run["stdout"]


def test_predict_on_saved_checkpoint(tiny_run):
    run, synthetic = tiny_run["run"], tiny_run["synthetic"]
    image = os.path.join(synthetic, "val2014", os.listdir(os.path.join(synthetic, "val2014"))[0])
    stdout = run_vqa(["--predict", f"--image={image}", "--question=what color is the circle?",
                         f"--checkpoint={run}/final"], timeout=120)
    lines = stdout.strip().splitlines()[-5:]
    answers = json.load(open(os.path.join(run, "final", "answers.json")))
    scores = []
    for line in lines:
        score, answer = line.split(None, 1)
        assert answer in answers
        scores.append(float(score))
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    # --device and --dtype are honoured: bf16 autocast gives the fp32 scores up to bf16's rounding
    bf16 = run_vqa(["--predict", f"--image={image}", "--question=what color is the circle?", "--device=cpu",
                    "--dtype=bfloat16", f"--checkpoint={run}/final"], timeout=120).strip().splitlines()[-5:]
    fp32 = {line.split(None, 1)[1]: float(line.split(None, 1)[0]) for line in lines}
    bf16 = {line.split(None, 1)[1]: float(line.split(None, 1)[0]) for line in bf16}
    assert bf16 != fp32 and len(bf16.keys() & fp32.keys()) >= 3
    assert all(abs(bf16[a] - fp32[a]) < 0.05 for a in bf16.keys() & fp32.keys())
    # the printed scores are those of the model on that input, from the Python API as well
    model, tokenizer, vocab = fv.load_finetuned(os.path.join(run, "final"))
    top = fv.predict_top(model, tokenizer, vocab, image, "what color is the circle?")
    assert [a for a, _ in top] == [line.split(None, 1)[1] for line in lines]
    assert [round(p, 3) for _, p in top] == scores
    # ... and they are the sigmoid of the VQA logits (the BCE objective's probabilities), computed here directly
    from data import eval_transform
    from PIL import Image
    enc = tokenizer(["what color is the circle?"], padding="longest")
    with torch.no_grad():
        logits = model.eval()(enc["input_ids"], attention_mask=enc["attention_mask"], heads=("vqa",),
                              pixel_values=eval_transform(model.config.image_size)(Image.open(image))[None]).vqa_logits
    probs, idx = logits[0].sigmoid().topk(5)
    assert [vocab[i] for i in idx.tolist()] == [a for a, _ in top]
    torch.testing.assert_close(torch.tensor([p for _, p in top]), probs)
    # and the single-question path answers a val question as the batched evaluation did
    submitted = {r["question_id"]: r["answer"] for r in json.load(open(os.path.join(run, "results_val2014.json")))}
    for q in fv.load_questions(synthetic, "val2014")[:3]:
        assert fv.predict_top(model, tokenizer, vocab, q["image"], q["question"], k=1)[0][0] == submitted[q["question_id"]]


def test_eval_only_scores_a_finetuned_model_as_it_is(tiny_run, tmp_path):
    run, synthetic = tiny_run["run"], tiny_run["synthetic"]
    # no --image_size: the model's own, 32 px (the default, 64, would interpolate its position table)
    data = [f"--synthetic_dir={synthetic}", "--synthetic_images=200", "--num_workers=0"]
    read = lambda d, name: json.load(open(os.path.join(d, name)))
    # the run's final/ with its answers.json: the predictions and accuracy the run itself ended with
    scored = str(tmp_path / "scored")
    stdout = run_vqa(data + ["--eval_only", f"--init_from={run}/final", f"--out_dir={scored}"])
    assert f"from {run}/final at 32px, scored as it is" in stdout
    assert eval_line(stdout)["vqa_acc"] == eval_line(tiny_run["stdout"])["vqa_acc"]
    for name in ("results_val2014.json", "results_test2015.json"):
        assert read(scored, name) == read(run, name), name
    summary, run_summary = read(scored, "eval_val2014.json"), read(run, "eval_val2014.json")
    assert summary["overall"] == run_summary["overall"] and summary["perAnswerType"] == run_summary["perAnswerType"]
    assert (summary["steps"], summary["model"]) == (0, f"{run}/final")
    assert not {"ckpt.pt", "final"} & set(os.listdir(scored))  # nothing trained, nothing saved
    # on two processes (each answers its share of the questions; rank 0 writes the union), whatever batch_size says
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT, *data,
           "--eval_only", f"--init_from={run}/final", f"--out_dir={tmp_path / 'two'}", "--micro_batch_size=24"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    for name in ("results_val2014.json", "results_test2015.json"):
        assert read(tmp_path / "two", name) == read(run, name), name
    # the same weights as an original fine-tuned .ckpt, which has no answers.json: its head's rows are the
    # vocabulary rebuilt from the annotations in the original's order. (The .ckpt's head count is inferred as
    # hidden_size // 64, 2 here where the run had 4, so its predictions are another model's: they are compared with
    # those of that model saved with the run's answers.json.)
    from safetensors.torch import load_file
    from test_model import to_original_names
    ckpt = str(tmp_path / "BridgeTower_ftfpt_tiny_vqav2.ckpt")
    state = {k.removeprefix("bridgetower."): v for k, v in load_file(f"{run}/final/model.safetensors").items()}
    torch.save({"state_dict": to_original_names(state)}, ckpt)
    model = BridgeTower.from_pretrained(ckpt)
    assert "vqa" in model.config.heads and model.config.num_heads == 2
    model.save_pretrained(str(tmp_path / "as_dir"))
    shutil.copy(f"{run}/final/answers.json", tmp_path / "as_dir")
    for init, out in ((ckpt, "from_ckpt"), (str(tmp_path / "as_dir"), "from_dir")):
        run_vqa(data + ["--eval_only", f"--init_from={init}", f"--tokenizer_dir={run}/final",
                        f"--out_dir={tmp_path / out}"])
    from_ckpt = read(tmp_path / "from_ckpt", "results_val2014.json")
    assert from_ckpt == read(tmp_path / "from_dir", "results_val2014.json")
    assert len({r["answer"] for r in from_ckpt}) >= 3  # a head order mistake would show


def test_eval_only_refuses_what_it_cannot_score(tiny_run, tmp_path, monkeypatch):
    synthetic = tiny_run["synthetic"]
    with pytest.raises(ValueError, match="--eval_only scores a fine-tuned model: give --init_from="):
        fv.load_for_eval("", synthetic)
    with pytest.raises(FileNotFoundError, match="is a run's out_dir: its fine-tuned model is --init_from=.*/final"):
        fv.load_for_eval(tiny_run["run"], synthetic)
    # a model without a VQA head, and a head for another number of answers than its answers.json
    config = BridgeTowerConfig.preset("tiny", vocab_size=300, image_size=32, heads=("mlm", "itm"))
    BridgeTower(config).save_pretrained(str(tmp_path / "pretrained"))
    with pytest.raises(ValueError, match=r"pretrained has no VQA head \(it has \('mlm', 'itm'\)\)"):
        fv.load_for_eval(str(tmp_path / "pretrained"), synthetic)
    final = shutil.copytree(os.path.join(tiny_run["run"], "final"), str(tmp_path / "final"))
    answers = json.load(open(os.path.join(final, "answers.json")))
    json.dump(answers[:-1], open(os.path.join(final, "answers.json"), "w"))
    with pytest.raises(ValueError, match=f"scores {len(answers)} answers, .*answers.json has {len(answers) - 1}"):
        fv.load_for_eval(final, synthetic)
    # with no answers.json the vocabulary is rebuilt from vocab_splits, here with another min_answer_count
    os.remove(os.path.join(final, "answers.json"))
    monkeypatch.setattr(fv, "min_answer_count", 40)  # 8 of the 18 answers
    with pytest.raises(ValueError, match=r"the vocabulary of train2014,val2014 \(min_answer_count 40\) has 8"):
        fv.load_for_eval(final, synthetic)
    # an evaluation split that train_splits names: train_splits, which only gives the majority answer here, is named
    monkeypatch.setattr(fv, "eval_only", True)
    monkeypatch.setattr(fv, "train_splits", "train2014,val2014")
    with pytest.raises(ValueError, match="with --eval_only, train_splits only gives the majority answer"):
        fv.load_eval_set(synthetic, synthetic, {})
    # a training run's out_dir would lose its metrics.jsonl; --resume has nothing to continue
    args = [f"--synthetic_dir={synthetic}", "--synthetic_images=200", "--image_size=32", "--eval_only",
            f"--init_from={tiny_run['run']}/final"]
    for extra, message in (([f"--out_dir={tiny_run['run']}"], "holds a training run, whose metrics.jsonl"),
                           ([f"--out_dir={tmp_path / 'e'}", "--resume"], "--eval_only trains nothing")):
        out = subprocess.run([sys.executable, SCRIPT, *args, *extra], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode != 0 and message in out.stderr, out.stderr[-2000:]


# -----------------------------------------------------------------------------
# unreadable images: skipped and counted, never fatal

def spoil(path, how):
    """Make an image unreadable: garbage bytes, a JPEG cut short, or no file."""
    if how == "missing":
        os.remove(path)
        return
    data = open(path, "rb").read()
    open(path, "wb").write(b"not an image" if how == "garbage" else data[:len(data) // 3])


def test_collate_replaces_unreadable_samples(tiny_run, tmp_path, capsys):
    from data import Tokenizer, eval_transform
    root = str(tmp_path / "vqa")
    shutil.copytree(tiny_run["synthetic"], root)
    questions = fv.load_questions(root, "val2014")[::fv.QUESTIONS_PER_IMAGE][:5]  # 5 questions, 5 images
    for q, how in zip(questions[1:4], ("garbage", "truncated", "missing")):
        spoil(q["image"], how)
    dataset = fv.VQADataset(questions, eval_transform(32), 7, 32)
    collate = fv.Collate(Tokenizer.from_dir(os.path.join(tiny_run["run"], "final")), 40, 32, 7)
    batch = collate([dataset[(i, "")] for i in range(5)])
    ids = [q["question_id"] for q in questions]
    assert batch["skipped_ids"].tolist() == ids[1:4]
    # the batch keeps its size: the 3 bad slots repeat the good samples in turn
    assert batch["question_ids"].tolist() == [ids[0], ids[4], ids[0], ids[4], ids[0]]
    assert batch["pixel_values"].shape[0] == batch["input_ids"].shape[0] == batch["targets"].shape[0] == 5
    assert torch.equal(batch["pixel_values"][2], batch["pixel_values"][0])
    collate([dataset[(i, "")] for i in range(3)])  # each bad file is named once, however often it comes back
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 3 and all(line.startswith("skipped an unreadable image: ") for line in warnings)
    assert [sum(questions[i]["image"] in line for line in warnings) for i in (1, 2, 3)] == [1, 1, 1]
    assert batch["readable"].item() == 2
    # nothing readable to repeat (a micro-batch of 1, the last questions of a prediction): blanks, each under its
    # own question id, with no target
    blanks = collate([dataset[(i, "")] for i in (1, 2, 3)])
    assert blanks["readable"].item() == 0 and blanks["skipped_ids"].tolist() == ids[1:4]
    assert blanks["question_ids"].tolist() == ids[1:4] and blanks["pixel_values"].shape == (3, 3, 32, 32)
    assert not blanks["pixel_values"].any() and not blanks["targets"].any() and blanks["targets"].shape == (3, 7)
    # a wrong image root fails at once, naming a path
    moved = [dict(q, image=q["image"].replace(root, str(tmp_path / "nowhere"))) for q in questions]
    with pytest.raises(FileNotFoundError, match="none of the first 5 images exist.*nowhere"):
        fv.VQADataset(moved, eval_transform(32), 7, 32)


def test_missing_eval_or_test_data_fails_before_training(tiny_run, tmp_path):
    # the test and eval splits are read at the start: a missing file or image folder is an error then, not after
    # hours of training
    root = str(tmp_path / "vqa")
    shutil.copytree(tiny_run["synthetic"], root)
    args = TINY + [f"--data_dir={root}", f"--out_dir={tmp_path / 'run'}"]
    os.remove(os.path.join(root, "v2_OpenEnded_mscoco_test-dev2015_questions.json"))
    for extra, message in ((["--test_split=test-dev2015"], "v2_OpenEnded_mscoco_test-dev2015_questions.json"),
                           (["--eval_split=val2015"], "v2_OpenEnded_mscoco_val2015_questions.json"),
                           (["--vocab_splits=train2014,val2015"], "v2_mscoco_val2015_annotations.json")):
        out = subprocess.run([sys.executable, SCRIPT, *args, *extra], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode != 0 and message in out.stderr, out.stderr[-2000:]
        assert "step 1 " not in out.stdout and not (tmp_path / "run" / "ckpt.pt").exists()
    # the submission's images, then the evaluation's (with no submission, so that only its own check can see it)
    for images, extra in (("test2015", []), ("val2014", ["--test_split="])):
        shutil.rmtree(os.path.join(root, images))
        out = subprocess.run([sys.executable, SCRIPT, *args, *extra], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode != 0 and "none of the first" in out.stderr and images in out.stderr, out.stderr[-2000:]
        assert "step 1 " not in out.stdout


def test_unreadable_images_do_not_stop_a_run(tiny_run, tmp_path, monkeypatch):
    from train_utils import Dist
    root, run = str(tmp_path / "vqa"), str(tmp_path / "run")
    shutil.copytree(tiny_run["synthetic"], root)
    bad = set()
    for split, step in (("train2014", 7), ("val2014", 1000), ("test2015", 1000)):
        images = list(dict.fromkeys(q["image"] for q in fv.load_questions(root, split)))
        for k, path in enumerate(images[3::step]):
            spoil(path, ("garbage", "truncated", "missing")[k % 3])
            bad.add(path)
    # micro-batches of 1: a spoiled training image leaves a micro-batch with nothing readable; predictions go in
    # batches of 2, so the spoiled image's 3 questions make one batch with a readable sample and one without
    stdout = run_vqa(TINY + [f"--data_dir={root}", f"--out_dir={run}", "--micro_batch_size=1"])

    # the count is every scheduled training sample whose image was spoiled (6 steps of 16 micro-batches of 1)
    vocab = fv.build_answer_vocab(fv.load_annotations(root, "train2014") + fv.load_annotations(root, "val2014"),
                                  fv.min_answer_count)
    items, _, _ = fv.load_training_set(root, root, {a: i for i, a in enumerate(vocab)}, {})
    monkeypatch.setattr(fv, "batch_size", 16)
    monkeypatch.setattr(fv, "micro_batch_size", 1)
    schedule = fv.micro_batch_schedule(len(items), 0, 16, Dist())
    expected = sum(items[i]["image"] in bad for _ in range(6 * 16) for i, _ in next(schedule))
    assert expected > 0
    records = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["skipped"] for r in records if r["kind"] == "train"][-1] == expected

    # evaluation and submission still answer every question; those with a spoiled image get the majority answer
    majority = json.load(open(os.path.join(run, "eval_val2014.json")))["majority_answer"]
    for split in ("val2014", "test2015"):
        questions = fv.load_questions(root, split)
        spoiled = {q["question_id"] for q in questions if q["image"] in bad}
        assert len(spoiled) == fv.QUESTIONS_PER_IMAGE
        assert f"predict: {len(spoiled)} of {len(questions)} questions have an unreadable image" in stdout
        results = {r["question_id"]: r["answer"] for r in json.load(open(os.path.join(run, f"results_{split}.json")))}
        assert sorted(results) == sorted(q["question_id"] for q in questions)
        assert all(results[qid] == majority for qid in spoiled)


# -----------------------------------------------------------------------------
# kill and resume

def vqa_train_lines(run_dir):
    return train_lines(run_dir, ("loss", "vqa_score", "grad_norm", "lr", "skipped"))


def with_unreadable_training_images(tiny_run, tmp_path, every):
    """A copy of the tiny run's synthetic set in which every `every`-th training image is unreadable: runs on it
    count skipped samples, which a resume must carry on and the ranks must add up."""
    root = str(tmp_path / "vqa")
    shutil.copytree(tiny_run["synthetic"], root)
    images = list(dict.fromkeys(q["image"] for q in fv.load_questions(root, "train2014")))
    for k, path in enumerate(images[::every]):
        spoil(path, ("garbage", "truncated", "missing")[k % 3])
    return root


def test_kill_and_resume_matches_uninterrupted(tmp_path, tiny_run):
    # dropout on: the resumed run must draw the masks the uninterrupted one drew (the checkpoint's RNG states);
    # unreadable images before and after the cut: the count of skipped samples goes on from the checkpoint's
    root = with_unreadable_training_images(tiny_run, tmp_path, every=5)
    args = TINY + [f"--data_dir={root}", "--max_steps=8", "--test_split=", "--dropout=0.1"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    full_stdout = run_vqa(args + [f"--out_dir={full}"])

    killed_at = kill_after_first_checkpoint([sys.executable, SCRIPT, *args, f"--out_dir={cut}"], cut, ROOT)
    assert killed_at < 8

    stdout = run_vqa(args + [f"--out_dir={cut}", "--resume"])
    assert f"resumed from {cut}/ckpt.pt at step {killed_at}" in stdout
    assert vqa_train_lines(cut) == vqa_train_lines(full) and len(vqa_train_lines(full)) == 8
    assert 0 < vqa_train_lines(full)[killed_at]["skipped"] < vqa_train_lines(full)[8]["skipped"]
    assert_same_final_weights(full, cut)
    drop_time = lambda line: {k: v for k, v in line.items() if k != "time_s"}
    assert drop_time(eval_line(stdout)) == drop_time(eval_line(full_stdout))
    # metrics.jsonl as the uninterrupted run's, each step once, with the seam marked where the resume began
    records = [(r["kind"], r["step"]) for r in map(json.loads, open(os.path.join(cut, "metrics.jsonl")))]
    uninterrupted = [(r["kind"], r["step"]) for r in map(json.loads, open(os.path.join(full, "metrics.jsonl")))]
    assert [r for r in records if r[0] != "resume"] == uninterrupted and records.count(("resume", killed_at)) == 1


def test_train_plus_val_holds_out_the_last_val_images(tmp_path, monkeypatch):
    root = fv.write_synthetic_vqa(str(tmp_path), {"train2014": 6, "val2014": 5, "test2015": 2})
    monkeypatch.setattr(fv, "train_splits", "train2014,val2014")
    monkeypatch.setattr(fv, "eval_split", "val2014")
    monkeypatch.setattr(fv, "eval_holdout", 2)
    val_images = list(dict.fromkeys(q["image_id"] for q in fv.load_questions(root, "val2014")))
    held_out = {"val2014": fv.holdout_images(fv.load_questions(root, "val2014"))}
    assert held_out["val2014"] == set(val_images[-2:])
    vocab = fv.build_answer_vocab(fv.load_annotations(root, "train2014") + fv.load_annotations(root, "val2014"), 1)
    items, annotations, dropped = fv.load_training_set(root, root, {a: i for i, a in enumerate(vocab)}, held_out)
    questions, eval_annotations = fv.load_eval_set(root, root, held_out)
    assert dropped == 0 and len(items) == (6 + 3) * fv.QUESTIONS_PER_IMAGE == len(annotations)
    assert {q["image_id"] for q in questions} == set(val_images[-2:])
    assert not {q["image_id"] for q in items} & {q["image_id"] for q in questions}
    assert sorted(a["question_id"] for a in eval_annotations) == sorted(q["question_id"] for q in questions)
    monkeypatch.setattr(fv, "eval_holdout", 0)
    with pytest.raises(ValueError, match="eval_holdout"):
        fv.load_eval_set(root, root, {})
    monkeypatch.setattr(fv, "eval_holdout", 6)  # more than val's 5 images: an error, not a silently shorter holdout
    with pytest.raises(ValueError, match="eval_holdout=6 is more than eval_split val2014's 5 images"):
        fv.holdout_images(fv.load_questions(root, "val2014"))


# -----------------------------------------------------------------------------
# configs

def config_file_values(name):
    ns = {}
    exec(open(os.path.join(ROOT, "config", name)).read(), ns)
    return {k: v for k, v in ns.items() if not k.startswith("_")}


def test_resume_fixes_the_eval_split_when_it_is_trained_on(monkeypatch):
    # holding out eval_holdout images of a training split changes the training data, whichever run does it
    monkeypatch.setattr(fv, "train_splits", "train2014")
    monkeypatch.setattr(fv, "eval_split", "train2014")
    assert {"eval_split", "eval_holdout"} <= set(fv.resume_fixed({"eval_split": "val2014"}))  # trained on now
    monkeypatch.setattr(fv, "eval_split", "val2014")
    assert {"eval_split", "eval_holdout"} <= set(fv.resume_fixed({"eval_split": "train2014"}))  # trained on before
    assert fv.resume_fixed({"eval_split": "val2014"}) == fv.RESUME_FIXED  # never trained on: only listed


def test_demo_config_is_the_default():
    import pretrain
    assert fv.PRETRAIN_DEMO_MODEL == os.path.join(pretrain.out_dir, "final")  # where the demo fine-tuning starts

    demo = config_file_values("finetune_vqa_demo.py")
    assert demo and all(getattr(fv, k) == v for k, v in demo.items()), \
        {k: (getattr(fv, k), v) for k, v in demo.items() if getattr(fv, k) != v}


def test_base_config_is_the_paper_recipe():
    import train_utils as tu
    base = config_file_values("finetune_vqa_base.py")
    assert set(base) <= set(tu._config_keys(vars(fv))), "unknown keys in the base config"
    assert base["image_size"] == 576 and base["train_splits"] == "train2014,val2014" and base["epochs"] == 10
    assert base["lr"] == 1e-5 and base["lr_mult_heads"] == 50 and base["lr_mult_cross_modal"] == 5
    assert base["warmup_ratio"] == 0.06 and base["weight_decay"] == 0.05 and base["batch_size"] == 512
    assert base["min_answer_count"] == 9 and base["crop_scale"] == (0.5, 1.0) and base["randaugment"] == (2, 5)
    assert base["init_from"] and (base["eval_split"], base["eval_holdout"]) == ("", 0)  # all of train + val trained on


def test_large_config_is_the_original_large_recipe():
    # scripts/ftfpt_large_vqa.sh: the base recipe from the pre-trained large model, at 574 px, lr 4e-6, 4 per GPU
    base, large = config_file_values("finetune_vqa_base.py"), config_file_values("finetune_vqa_large.py")
    assert set(large) == set(base)
    differ = {k for k in base if base[k] != large[k]}
    assert differ == {"out_dir", "init_from", "image_size", "micro_batch_size", "lr"}
    assert (large["image_size"], large["micro_batch_size"], large["lr"]) == (574, 4, 4e-6)
    assert "large" in large["init_from"]
    assert BridgeTowerConfig.preset("large", image_size=large["image_size"]).image_grid == 41  # 574 = 41 x 14


def test_finetune_from_a_checkpoint_at_a_new_image_size(tmp_path, tiny_run):
    # the fine-tuned tiny model (32 px, with a VQA head of the same vocabulary) as the starting checkpoint at 48 px:
    # the position table is interpolated, the head and the tokenizer come from the checkpoint
    stdout = run_vqa(TINY + [f"--synthetic_dir={tiny_run['synthetic']}", f"--init_from={tiny_run['run']}/final",
                                "--image_size=48", "--max_steps=2", "--test_split=", f"--out_dir={tmp_path}"])
    assert f"from {tiny_run['run']}/final at 48px" in stdout
    assert json.load(open(tmp_path / "final" / "config.json"))["vision_config"]["image_size"] == 48


def test_dropout_setting_replaces_the_checkpoints(tmp_path, monkeypatch):
    # --dropout unset keeps the checkpoint's own (0.1 here), a value replaces it in the model built, in both the
    # config and the layers; random weights default to none
    from model import BridgeTower, BridgeTowerConfig
    config = BridgeTowerConfig.preset("tiny", vocab_size=300, image_size=32, heads=("vqa",), num_vqa_answers=5,
                                      hidden_dropout=0.1, attention_dropout=0.1)
    BridgeTower(config).save_pretrained(str(tmp_path))
    monkeypatch.setattr(fv, "image_size", 32)

    def dropouts(init_path):
        model = fv.build_model(init_path, 300, list("abcde"))
        layer = model.cross_modal_text_layers[0]
        return (model.config.hidden_dropout, model.config.attention_dropout, layer.output.dropout,
                layer.crossattention.self.dropout)
    assert dropouts(str(tmp_path)) == (0.1, 0.1, 0.1, 0.1)
    assert dropouts("") == (0.0, 0.0, 0.0, 0.0)
    monkeypatch.setattr(fv, "dropout", 0.25)
    assert dropouts(str(tmp_path)) == (0.25, 0.25, 0.25, 0.25)
    assert dropouts("") == (0.25, 0.25, 0.25, 0.25)


def test_finetuned_head_follows_the_answer_vocabulary(tmp_path, monkeypatch, capsys):
    # fine-tuning a fine-tuned model: the head's rows follow the answers by name (answers.json next to it), not
    # by position; with no answers.json, a head of another size is an error that says why
    from model import BridgeTower, BridgeTowerConfig, CheckpointError
    torch.manual_seed(0)
    config = BridgeTowerConfig.preset("tiny", vocab_size=300, image_size=32, heads=("vqa",), num_vqa_answers=4)
    old = BridgeTower(config).eval()
    old.save_pretrained(str(tmp_path / "ft"))
    monkeypatch.setattr(fv, "image_size", 32)
    monkeypatch.setattr(fv, "dropout", None)
    ids, pixels = torch.randint(5, 300, (2, 7)), torch.randn(2, 3, 32, 32)

    def logits(model):
        with torch.no_grad():
            return model.eval()(ids, pixel_values=pixels).vqa_logits
    json.dump(["a", "b", "c", "d"], open(tmp_path / "ft" / "answers.json", "w"))
    same = fv.build_model(str(tmp_path / "ft"), 300, ["a", "b", "c", "d"])
    assert torch.equal(logits(same), logits(old))
    assert "the checkpoint's, for the same 4 answers" in capsys.readouterr().out
    other = fv.build_model(str(tmp_path / "ft"), 300, ["c", "x", "a"])
    assert other.config.num_vqa_answers == 3
    torch.testing.assert_close(logits(other)[:, [0, 2]], logits(old)[:, [2, 0]], rtol=0, atol=1e-6)
    assert "2 of this run's 3 answers keep their rows, 1 new rows initialised, 2 of" in capsys.readouterr().out
    os.remove(tmp_path / "ft" / "answers.json")
    with pytest.raises(CheckpointError, match="vqa_classifier.*\n.*no answers.json"):
        fv.build_model(str(tmp_path / "ft"), 300, ["a", "b", "c"])


def test_optimizer_multipliers_follow_the_recipe(monkeypatch):
    # the original's VQA multipliers: the VQA head x50, every cross_modal* parameter x5, the towers x1; swapping
    # the two settings would give the new head a tenth of its learning rate
    monkeypatch.setattr(fv, "lr_mult_heads", 50.0)
    monkeypatch.setattr(fv, "lr_mult_cross_modal", 5.0)
    model = BridgeTower(BridgeTowerConfig.preset("tiny", vocab_size=300, image_size=32, heads=("vqa",),
                                                 num_vqa_answers=7))
    optimizer = fv.make_optimizer(model, torch.device("cpu"))
    tu.set_lr(optimizer, 1.0, 1.0)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    expect = {"vqa_classifier.0.weight": 50.0, "vqa_classifier.1.weight": 50.0, "vqa_classifier.3.bias": 50.0,
              "cross_modal_text_pooler.dense.weight": 5.0, "cross_modal_image_layers.0.output.dense.weight": 5.0,
              "text_model.embeddings.word_embeddings.weight": 1.0, "vision_model.visual.ln_pre.bias": 1.0}
    assert {n: lr_of[id(named[n])] for n in expect} == expect


def test_learning_rate_schedule_of_a_run(tiny_run):
    # LEARN: 200 steps, lr 3e-4, warmup_ratio 0.06 -> 12 warmup steps over the *run's* steps (not an epoch's),
    # then linear to 0 at step 200. The record of step s (1-based) holds the lr its update used: step s - 1's.
    lrs = {step: line["lr"] for step, line in train_lines(tiny_run["run"], ("lr",)).items()}
    assert lrs[1] == pytest.approx(3e-4 / 12)       # (0 + 1) / 12
    assert lrs[6] == pytest.approx(3e-4 * 6 / 12)
    assert lrs[12] == lrs[13] == pytest.approx(3e-4)   # the end of warmup, then the start of the decay (188 steps)
    assert lrs[107] == pytest.approx(3e-4 * (200 - 106) / 188)
    assert lrs[200] == pytest.approx(3e-4 / 188)


def test_epochs_set_the_length_unless_max_steps_does(tmp_path, tiny_run):
    # max_steps=0 (the default): epochs x the full batches of an epoch, and the schedule over that many steps
    run = str(tmp_path / "run")
    stdout = run_vqa(TINY + [f"--synthetic_dir={tiny_run['synthetic']}", "--max_steps=0", "--epochs=2",
                             "--batch_size=128", "--micro_batch_size=64", "--eval_split=", "--test_split=",
                             f"--out_dir={run}"])
    steps = int(stdout.split(" steps (2.0 epochs)")[0].split()[-1])
    records = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == steps and train[-1]["epoch"] == 2.0 and steps >= 4
    assert train[-1]["lr"] == pytest.approx(1e-3 / (steps - int(fv.warmup_ratio * steps)))  # the decay's last step


def test_submission_pairs_each_question_with_its_answer():
    # predictions come in the order the ranks answered them, not by question id; the submission lists
    # each id with its own answer, sorted by id
    assert fv.results_json({7: "two", 3: "yes", 5: "red"}) == [
        {"question_id": 3, "answer": "yes"}, {"question_id": 5, "answer": "red"}, {"question_id": 7, "answer": "two"}]


def test_two_processes_train_on_the_one_process_batches(tmp_path, tiny_run):
    # torchrun, 2 processes x 1 micro-step of 8 against 1 process x 2 micro-steps of 8: the same global batches
    # (micro_batch_schedule) from the same initial weights. The gradients then agree bit for bit: one process sums
    # g0/2 + g1/2 (each loss divided by the micro-steps), DDP averages (g0 + g1)/2, and halving is exact in binary
    # floating point. So do the steps, the weights and the answers, and the count of unreadable samples, which each
    # rank counts in its own half of the batch
    root = with_unreadable_training_images(tiny_run, tmp_path, every=3)
    args = TINY + [f"--data_dir={root}", "--max_steps=3", "--ckpt_interval=2"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run_vqa(args + [f"--out_dir={one}"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT, *args,
           f"--out_dir={two}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "2 process(es) x 1 micro-steps x 8 = batch 16" in out.stdout
    assert vqa_train_lines(two) == vqa_train_lines(one) and sorted(vqa_train_lines(two)) == [1, 2, 3]
    assert vqa_train_lines(two)[3]["skipped"] > 0
    assert torch.load(os.path.join(two, "ckpt.pt"), weights_only=False)["step"] == 3
    assert_same_final_weights(one, two)
    for name in ("results_val2014.json", "results_test2015.json"):
        assert json.load(open(os.path.join(two, name))) == json.load(open(os.path.join(one, name))), name


def test_two_processes_kill_and_resume(tmp_path, tiny_run):
    # both processes killed after the first checkpoint, then resumed: with dropout on, each rank goes on with its
    # own RNG stream from the checkpoint (rank 1 not a copy of rank 0's), and the ranks' counts of unreadable
    # samples go on from the checkpoint's sum
    root = with_unreadable_training_images(tiny_run, tmp_path, every=3)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT, *TINY,
                f"--data_dir={root}", "--max_steps=4", "--dropout=0.1", "--eval_split=", "--test_split="]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    out = subprocess.run(torchrun + [f"--out_dir={full}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert kill_after_first_checkpoint(torchrun + [f"--out_dir={cut}"], cut, ROOT) == 2
    out = subprocess.run(torchrun + [f"--out_dir={cut}", "--resume"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and f"resumed from {cut}/ckpt.pt at step 2" in out.stdout, out.stderr[-3000:]
    assert vqa_train_lines(cut) == vqa_train_lines(full) and sorted(vqa_train_lines(full)) == [1, 2, 3, 4]
    assert 0 < vqa_train_lines(full)[2]["skipped"] < vqa_train_lines(full)[4]["skipped"]
    assert_same_final_weights(full, cut)


# -----------------------------------------------------------------------------
# settings that must reach the code

# one step of a random tiny model on 40 synthetic images, no evaluation, no submission
ONE_STEP_ARGS = ["--init_from=", "--image_size=32", "--synthetic_images=40", "--batch_size=16", "--micro_batch_size=16",
                 "--max_steps=1", "--num_workers=0", "--eval_split=", "--test_split=", "--min_answer_count=1"]

# finetune_vqa.main() with train_transform wrapped to print the settings it is called with, and vqa_loss to print
# which of the model's layers are recomputed in the backward pass (activation checkpointing)
SPY = """
import inspect
import sys
import finetune_vqa as fv
real = fv.train_transform
def spy(*args, **kwargs):
    bound = inspect.signature(real).bind(*args, **kwargs)
    bound.apply_defaults()
    print("TRAIN_TRANSFORM", dict(scale=tuple(bound.arguments["scale"]),
                                  randaugment=tuple(bound.arguments["randaugment"])), flush=True)
    return real(*args, **kwargs)
fv.train_transform = spy
real_loss = fv.vqa_loss
def loss_spy(model, *args, **kwargs):
    wrapped = sorted({type(m._checkpoint_wrapped_module).__name__ for m in model.modules()
                      if hasattr(m, "_checkpoint_wrapped_module")})
    print("CHECKPOINTED", wrapped, flush=True)
    return real_loss(model, *args, **kwargs)
fv.vqa_loss = loss_spy
sys.argv = ["finetune_vqa.py"] + sys.argv[1:]
fv.main()
"""


def test_settings_reach_the_training_transform_and_the_model(tmp_path):
    args = ONE_STEP_ARGS + [f"--synthetic_dir={tmp_path / 'syn'}", f"--out_dir={tmp_path / 'run'}",
                            "--crop_scale=(0.8, 0.9)", "--randaugment=(1, 3)", "--grad_checkpointing"]
    out = subprocess.run([sys.executable, "-c", SPY, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    lines = [l for l in out.stdout.splitlines() if l.startswith("TRAIN_TRANSFORM")]
    assert lines == ["TRAIN_TRANSFORM {'scale': (0.8, 0.9), 'randaugment': (1, 3)}"], out.stdout[-2000:]
    # --grad_checkpointing reaches the model that trains: its text layers, cross layers and CLIP blocks are wrapped
    # (test_pretrain's gradient test checks the wrapping itself, layer by layer)
    lines = [l for l in out.stdout.splitlines() if l.startswith("CHECKPOINTED")]
    assert lines == ["CHECKPOINTED ['CrossLayer', 'ResidualAttentionBlock', 'TextLayer']"], out.stdout[-2000:]


def test_augmentation_follows_the_schedule_seed(tmp_path):
    # micro_batch_schedule gives each (epoch, item) its own seed: the dataset must draw the augmentation from it,
    # so that an item is augmented anew every epoch (and the same way on a resume)
    root = fv.write_synthetic_vqa(str(tmp_path), {"train2014": 1, "val2014": 1, "test2015": 2})
    items = [dict(q, labels=[0], scores=[1.0]) for q in fv.load_questions(root, "train2014")]
    dataset = fv.VQADataset(items, data.train_transform(32), 1, 32)
    epoch0, again, epoch1 = (dataset[(0, s)][0] for s in ("0-0-0", "0-0-0", "0-1-0"))
    assert torch.equal(epoch0, again) and not torch.equal(epoch0, epoch1)


def test_eval_only_scores_at_the_image_size_given(tmp_path):
    tokenizer, tok_dir = tu.load_tokenizer("", str(tmp_path / "tok"))
    root = fv.write_synthetic_vqa(str(tmp_path / "syn"), {"train2014": 40, "val2014": 8, "test2015": 2})
    answers = ["yes", "no", "1", "2", "red"]
    model_dir = str(tmp_path / "final")
    torch.manual_seed(0)
    BridgeTower(BridgeTowerConfig.preset("tiny", vocab_size=tokenizer.vocab_size, image_size=32, heads=("vqa",),
                                         num_vqa_answers=len(answers))).save_pretrained(model_dir)
    json.dump(answers, open(os.path.join(model_dir, "answers.json"), "w"))
    tu.copy_tokenizer(tok_dir, model_dir)
    stdout = run_vqa(["--eval_only", f"--init_from={model_dir}", f"--synthetic_dir={root}", "--synthetic_images=40",
                      "--num_workers=0", "--test_split=", "--image_size=48", f"--out_dir={tmp_path / 'e'}"])
    assert f"from {model_dir} at 48px, scored as it is" in stdout, stdout[-2000:]


def test_predictions_see_the_evaluation_transform(tmp_path, monkeypatch):
    # evaluation and the submission score the whole image squashed to size x size (eval_transform), never a random
    # crop with RandAugment: the pixels the model is given are exactly those
    from PIL import Image
    root = fv.write_synthetic_vqa(str(tmp_path), {"train2014": 1, "val2014": 3, "test2015": 2})
    questions = fv.load_questions(root, "val2014")
    tokenizer, _ = tu.load_tokenizer("", str(tmp_path / "tok"))
    monkeypatch.setattr(fv, "image_size", 32)
    monkeypatch.setattr(fv, "micro_batch_size", 2)
    monkeypatch.setattr(fv, "num_workers", 0)
    seen = []

    class Fake(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, pixel_values=None, heads=()):
            seen.append(pixel_values)
            return types.SimpleNamespace(vqa_logits=torch.zeros(len(input_ids), 2))
    fv.predict_answers(Fake(), questions, ["yes", "no"], tokenizer, tu.Dist(), "yes")
    want = torch.stack([data.eval_transform(32)(Image.open(q["image"])) for q in questions])
    assert torch.equal(torch.cat(seen), want)


def test_synthetic_set_is_rewritten_for_other_settings(tmp_path):
    # a synthetic_dir left by a run with another --synthetic_images (or seed) is rewritten, not silently reused
    root = str(tmp_path)
    fv.write_synthetic_vqa(root, {"train2014": 2, "val2014": 1, "test2015": 2})
    first = fv.load_questions(root, "train2014")
    fv.write_synthetic_vqa(root, {"train2014": 3, "val2014": 1, "test2015": 2})
    assert len(fv.load_questions(root, "train2014")) == 3 * fv.QUESTIONS_PER_IMAGE == len(first) + 3
    fv.write_synthetic_vqa(root, {"train2014": 3, "val2014": 1, "test2015": 2}, seed=1)
    reseeded = [q["question"] for q in fv.load_questions(root, "train2014")]
    fv.write_synthetic_vqa(str(tmp_path / "fresh"), {"train2014": 3, "val2014": 1, "test2015": 2}, seed=1)
    assert reseeded == [q["question"] for q in fv.load_questions(str(tmp_path / "fresh"), "train2014")]


def test_training_batches_truncate_questions_at_max_text_len(tmp_path, monkeypatch):
    root = fv.write_synthetic_vqa(str(tmp_path), {"train2014": 4, "val2014": 1, "test2015": 2})
    items = [dict(q, labels=[0], scores=[1.0]) for q in fv.load_questions(root, "train2014")]
    tokenizer, _ = tu.load_tokenizer("", str(tmp_path / "tok"))
    monkeypatch.setattr(fv, "max_text_len", 6)
    monkeypatch.setattr(fv, "num_workers", 0)
    dataset = fv.VQADataset(items, data.eval_transform(32), 1, 32)
    assert max(len(tokenizer(q["question"], padding="longest")["input_ids"][0]) for q in items) > 6
    batch = next(iter(fv.make_loader(dataset, [[(i, "") for i in range(len(items))]], tokenizer, torch.device("cpu"))))
    assert batch["input_ids"].shape[1] == 6 and (batch["input_ids"][:, -1] == tokenizer.sep_id).all()


def test_resume_with_only_out_dir_continues_the_run(tmp_path):
    # the run's other settings come from its checkpoint (they differ from the defaults, some of them fixed ones)
    run = str(tmp_path / "run")
    run_vqa(ONE_STEP_ARGS + [f"--synthetic_dir={tmp_path / 'syn'}", f"--out_dir={run}", "--ckpt_interval=1"])
    stdout = run_vqa(["--resume", f"--out_dir={run}", "--max_steps=2"])
    assert f"resumed from {run}/ckpt.pt at step 1" in stdout and "step 2 |" in stdout
