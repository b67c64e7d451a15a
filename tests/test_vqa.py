"""VQA fine-tuning: the official accuracy, the answer vocabulary, the data path, predict and resume.
Expected metric values are worked out by hand in the comments, never by calling the code twice."""

import json
import os
import subprocess
import sys

import pytest

import finetune_vqa as fv

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
