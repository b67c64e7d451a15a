import copy
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

import train_utils as tu
from conftest import end_ddp_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -----------------------------------------------------------------------------
# configurator

def _defaults():
    return {"batch_size": 32, "lr": 1e-5, "compile": False, "out_dir": "out/x", "betas": (0.9, 0.98),
            "init_from": "", "heads": ("mlm", "itm"), "torch": torch}


def test_configure_file_then_command_line(tmp_path, capsys):
    cfg = tmp_path / "c.py"
    cfg.write_text("import math\nbatch_size = 4096\nlr = 2 * 1e-5\nbetas = [0.9, 0.999]\n")
    g = _defaults()
    out = tu.configure(g, [str(cfg), "--batch_size=8", "--lr=1", "--compile", "--out_dir=runs/a", "--init_from=123"])
    assert g["batch_size"] == 8 and g["lr"] == 1.0 and type(g["lr"]) is float  # int -> float for a float key
    assert g["betas"] == (0.9, 0.999)  # list -> tuple for a tuple key
    assert g["compile"] is True and g["out_dir"] == "runs/a" and g["init_from"] == "123"
    assert "torch" not in out and "math" not in g and out["batch_size"] == 8
    assert tu.configure(g, ["--compile=false"])["compile"] is False
    assert "batch_size = 8" in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["--batch_sise=8"], "batch_sise"),
    (["--batch_size=8.5"], "batch_size"),
    (["--batch_size=True"], "batch_size"),
    (["--compile=1"], "compile"),
    (["--lr=abc"], "lr"),
    (["--heads=mlm"], "heads"),
    (["--batch_size"], "batch_size"),
    (["config/nowhere.py"], "config file 'config/nowhere.py': no such file"),
    (["bridgetower-base/config.json"], "'bridgetower-base/config.json': expected a config file of settings"),
])
def test_configure_rejects_bad_overrides(argv, match):
    with pytest.raises((ValueError, TypeError, FileNotFoundError) if "no such file" in match else (ValueError, TypeError),
                       match=match):
        tu.configure(_defaults(), argv)


def test_configure_key_in_consecutive_arguments(tmp_path):
    # bash turns an unquoted --out_dir=x/{a,b} into two --out_dir arguments in a row (a shard pattern into one
    # argument per shard): keeping the last one would silently drop the others
    with pytest.raises(ValueError, match="'out_dir' in consecutive arguments .*'--out_dir=x/b'"):
        tu.configure(_defaults(), ["--lr=0.1", "--out_dir=x/a", "--out_dir=x/b"])
    with pytest.raises(ValueError, match="unknown config key 'HEADS'"):  # upper case: a constant, not a setting
        tu.configure(dict(_defaults(), HEADS=("mlm",)), ["--HEADS=('itm',)"])
    upper = tmp_path / "upper.py"
    upper.write_text("LR = 1e-4\n")  # meant as lr: reported, not silently dropped
    with pytest.raises(ValueError, match="unknown config key 'LR' \\(from .*upper.py\\)"):
        tu.configure(_defaults(), [str(upper)])
    # overriding a list of base arguments later on is fine: the last wins
    assert tu.configure(_defaults(), ["--lr=0.1", "--batch_size=8", "--lr=0.2"])["lr"] == 0.2
    cfg = tmp_path / "c.py"
    cfg.write_text("lr = 1e-4\n")
    assert tu.configure(_defaults(), [str(cfg), "--lr=0.2"])["lr"] == 0.2  # a file, then the command line
    with pytest.raises(ValueError, match="c.py comes after --lr on the command line and would undo it"):
        tu.configure(_defaults(), ["--lr=0.2", str(cfg)])
    assert tu.configure(_defaults(), ["--batch_size=4", str(cfg)])["batch_size"] == 4  # a file setting other keys


def test_configure_help(capsys, tmp_path):
    # each setting with its default and the comment on its line in the script (and the comment lines under it)
    script = tmp_path / "train.py"
    script.write_text("batch_size = 32   # global batch\nlr = 1e-5  # peak rate,\n          # then decay\n\n"
                      "# a section heading\nbetas = (0.9, 0.98)\nout_dir = 'out/#1'  # where '#' is in the value\n"
                      "init_from = '#x'\n")
    with pytest.raises(SystemExit):
        tu.configure(dict(_defaults(), __doc__="A training script.", __file__=str(script)), ["--help"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "A training script."
    assert "  --batch_size=32                    global batch" in lines
    assert "  --lr=1e-05                         peak rate, then decay" in lines and "  --betas=(0.9, 0.98)" in lines
    assert "  --out_dir='out/x'                  where '#' is in the value" in lines and "  --init_from=''" in lines


def test_check_settings_names_every_bad_one():
    config = dict(_defaults(), micro_batch_size=0, warmup_ratio=0.1, betas=(0.9,), dropout=1.0, max_text_len=50)
    with pytest.raises(ValueError) as error:
        tu.check_settings(config, **tu.TRAINING_RULES)
    assert str(error.value) == ("bad settings: --micro_batch_size=0 (must be > 0); --dropout=1.0 (must be None or in [0, 1)); "
                                "--betas=(0.9,) (must be two numbers in [0, 1))")
    tu.check_settings(dict(config, micro_batch_size=8, betas=(0.9, 0.98), dropout=0.1), **tu.TRAINING_RULES)
    with pytest.raises(ValueError, match="--betas=\\('a', 'b'\\) \\(must be two numbers"):
        tu.check_settings(dict(config, betas=("a", "b")), betas=tu.TRAINING_RULES["betas"])


def test_configure_unknown_key_in_file(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("batch_size = 8\nlearning_rate = 1e-4\n")
    with pytest.raises(ValueError, match="learning_rate"):
        tu.configure(_defaults(), [str(cfg)])


# -----------------------------------------------------------------------------
# schedule and optimiser groups

def test_lr_factor():
    f = lambda s: tu.lr_factor(s, max_steps=100, warmup_steps=10)
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(99) == pytest.approx(1 / 90)
    assert f(100) == 0.0 and f(150) == 0.0
    assert tu.lr_factor(0, 5, 0) == 1.0 and tu.lr_factor(4, 5, 0) == pytest.approx(0.2)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.text_model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.cross_modal_text_transform = nn.Linear(4, 4)
        self.cross_modal_image_layernorm = nn.LayerNorm(4)
        self.itm_score = nn.Linear(4, 2)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_param_groups_decay_and_multipliers():
    model = Toy()
    groups = tu.param_groups(model, 0.01, {"cross_modal": 5.0, "itm_score": 5.0})
    by_param = {id(p): (g["weight_decay"], g["lr_mult"]) for g in groups for p in g["params"]}
    expect = {
        "text_model.0.weight": (0.01, 1.0), "text_model.0.bias": (0.0, 1.0),
        "text_model.1.weight": (0.0, 1.0), "text_model.1.bias": (0.0, 1.0),
        "cross_modal_text_transform.weight": (0.01, 5.0), "cross_modal_text_transform.bias": (0.0, 5.0),
        "cross_modal_image_layernorm.weight": (0.0, 5.0), "itm_score.weight": (0.01, 5.0),
        "itm_score.bias": (0.0, 5.0),
    }
    named = dict(model.named_parameters())
    assert {n: by_param[id(named[n])] for n in expect} == expect
    assert id(named["frozen.weight"]) not in by_param
    assert len(groups) == 4 and sum(len(g["params"]) for g in groups) == 10
    opt = torch.optim.AdamW(groups, lr=1.0)
    tu.set_lr(opt, 1e-5, 0.5)
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([5e-6, 5e-6, 2.5e-5, 2.5e-5])


# -----------------------------------------------------------------------------
# checkpoints, RNG, logging

def test_checkpoint_atomic(tmp_path, monkeypatch):
    assert tu.load_latest_checkpoint(tmp_path) is None
    tu.save_checkpoint(tmp_path, {"step": 1, "w": torch.ones(3)})

    def crash(obj, f):  # dies half-way through writing the next checkpoint
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        tu.save_checkpoint(tmp_path, {"step": 2})
    monkeypatch.undo()
    assert (tmp_path / "ckpt.pt.tmp").exists()
    state = tu.load_latest_checkpoint(tmp_path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    tu.save_checkpoint(tmp_path, {"step": 3})
    assert tu.load_latest_checkpoint(tmp_path)["step"] == 3 and not (tmp_path / "ckpt.pt.tmp").exists()
    # the new file's bytes are on disk before the rename makes it the checkpoint: else a power cut soon after
    # could leave a ckpt.pt the rename made, with no data behind it, and no previous checkpoint
    order, real_replace = [], os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: order.append("fsync"))
    monkeypatch.setattr(os, "replace", lambda src, dst: order.append("replace") or real_replace(src, dst))
    tu.save_checkpoint(tmp_path, {"step": 4})
    assert order == ["fsync", "replace"]


def test_one_run_at_a_time_in_an_out_dir(tmp_path):
    run = str(tmp_path / "run")
    lock = [sys.executable, "-c", "import train_utils as tu, sys; tu.lock_out_dir(sys.argv[1])", run]
    tu.lock_out_dir(run)
    tu.lock_out_dir(run)  # this process again (a run, then its resume, in one notebook)
    other = subprocess.run(lock, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert other.returncode != 0 and f"{run} is in use: another process holds {run}/run.lock" in other.stderr
    tu._HELD_LOCKS.pop(os.path.realpath(run)).close()  # the run ends: the next one may start
    assert subprocess.run(lock, cwd=ROOT, capture_output=True, text=True, timeout=60).returncode == 0


def test_out_dir_lock_is_not_held_by_forked_children(tmp_path):
    # A killed run's loader workers (forked, they outlive it by seconds) must not keep its lock: an immediate
    # --resume would be told the run is still going. A flock would be shared with them; a POSIX lock is not.
    run = str(tmp_path / "run")
    killed_run = (
        "import os, signal, sys, time, train_utils as tu\n"
        "tu.lock_out_dir(sys.argv[1])\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    devnull = os.open(os.devnull, os.O_WRONLY)\n"
        "    os.dup2(devnull, 1), os.dup2(devnull, 2)\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "print(child, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.run([sys.executable, "-c", killed_run, run], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    child = int(killed.stdout)
    try:
        os.kill(child, 0)  # the forked child still runs
        lock = [sys.executable, "-c", "import train_utils as tu, sys; tu.lock_out_dir(sys.argv[1])", run]
        resumed = subprocess.run(lock, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert resumed.returncode == 0, resumed.stderr
    finally:
        os.kill(child, 9)


def test_resume_takes_the_settings_not_given(tmp_path, capsys):
    # what no --key gives is the checkpointed run's (a forgotten --data would otherwise train on the default data),
    # also when the run's config file is given again (it would undo the run's --key overrides); what a --key gives
    # is kept, to be compared by resume_message; another script's run gives none
    settings = {"lr": 1e-5, "data": "synthetic", "batch_size": 8, "out_dir": "out/x", "resume": False}
    saved = dict(settings, lr=3e-5, data="coco:c.json@coco", batch_size=16, out_dir="elsewhere", resume=False)
    tu.save_checkpoint(tmp_path, {"kind": "pretrain", "config": saved, "w": torch.ones(2)})
    g = dict(settings, resume=True)
    given = set()
    config_file = tmp_path / "recipe.py"
    config_file.write_text("data = 'synthetic'\nbatch_size = 8\n")
    tu.configure(g, [str(config_file), "--lr=2e-5", "--resume"], given=given)
    assert given == {"lr", "resume"}
    config = tu.take_run_settings(g, str(tmp_path), given, "pretrain")
    assert config == dict(settings, lr=2e-5, data="coco:c.json@coco", batch_size=16, resume=True) and g == config
    assert "as in the checkpointed run: data='coco:c.json@coco', batch_size=16" in capsys.readouterr().out
    g = dict(settings, resume=True)
    assert tu.take_run_settings(g, str(tmp_path), set(), "finetune_vqa") == g == dict(settings, resume=True)
    assert tu.take_run_settings(g, str(tmp_path / "none"), set(), "pretrain") == g


def test_resume_message_names_changed_settings():
    saved = {"lr": 1e-5, "max_steps": 100, "resume": False, "out_dir": "out/x", "batch_size": 8}
    assert tu.resume_message("out/x", 40, saved, dict(saved, resume=True)) == "resumed from out/x/ckpt.pt at step 40"
    line = tu.resume_message("out/x", 40, saved, dict(saved, resume=True, lr=2e-5, max_steps=200, seed=3),
                             fixed=("batch_size",))
    assert line.endswith("differ from the checkpointed run: lr: 1e-05 -> 2e-05, max_steps: 100 -> 200, seed: None -> 3")
    with pytest.raises(ValueError, match=r"other batch_size \(8 in the checkpointed run, 16 now\)"):
        tu.resume_message("out/x", 40, saved, dict(saved, lr=2e-5, batch_size=16), fixed=("batch_size", "seed"))


def test_resume_needs_as_many_processes_as_wrote_the_checkpoint():
    # each rank reads its own data stream, so another number of processes would replay another data order
    with pytest.raises(ValueError, match=r"written by 2 processes; resuming needs the same number \(not 1\)"):
        tu.model_from_checkpoint({"world_size": 2, "model_config": {}, "model": {}}, tu.Dist())


def test_new_runs_keep_earlier_ones(tmp_path):
    for resume in (False, True):
        tu.check_out_dir(str(tmp_path / "none"), resume)
        tu.check_out_dir(str(tmp_path), resume)  # an empty directory
    (tmp_path / "final").mkdir()  # a finished run whose ckpt.pt was deleted: neither a new run nor a resume
    with pytest.raises(FileExistsError, match="holds an earlier run \\(final/\\): to start over, choose another"):
        tu.check_out_dir(str(tmp_path), False)
    with pytest.raises(FileExistsError, match="holds a finished run's final/ but no ckpt.pt to resume from"):
        tu.check_out_dir(str(tmp_path), True)
    tu.save_checkpoint(tmp_path, {"step": 1})
    with pytest.raises(FileExistsError, match="holds an earlier run \\(ckpt.pt and final/\\): --resume continues it"):
        tu.check_out_dir(str(tmp_path), False)
    tu.check_out_dir(str(tmp_path), True)
    # a checkpoint of another script, or a damaged one, is an error naming the file, not a traceback from torch
    tu.save_checkpoint(tmp_path, {"kind": "finetune_vqa", "step": 3})
    assert tu.load_latest_checkpoint(tmp_path, "finetune_vqa")["step"] == 3
    with pytest.raises(ValueError, match="ckpt.pt was written by finetune_vqa.py, not pretrain.py"):
        tu.load_latest_checkpoint(tmp_path, "pretrain")
    (tmp_path / "ckpt.pt").write_bytes((tmp_path / "ckpt.pt").read_bytes()[:100])
    with pytest.raises(RuntimeError, match="ckpt.pt cannot be read"):
        tu.load_latest_checkpoint(tmp_path, "pretrain")


def test_load_tokenizer_never_pairs_a_checkpoint_with_the_demo_tokenizer(tmp_path, capsys):
    from model import BridgeTowerConfig
    out = str(tmp_path / "run")
    tokenizer, where = tu.load_tokenizer("", out, init_from="", text_init="")  # from scratch: the demo tokenizer
    assert where == os.path.join(out, "tokenizer") and os.path.isfile(os.path.join(where, "vocab.json"))
    assert tu.load_tokenizer("", out, init_from=where)[1] == where  # a directory with tokenizer files: its own
    weights_only = tmp_path / "hf"  # e.g. transformers' save_pretrained of the model alone, or a .ckpt file
    weights_only.mkdir()
    (weights_only / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="text_init=.*hf' carries no tokenizer files .*: set --tokenizer_dir"):
        tu.load_tokenizer("", out, init_from="", text_init=str(weights_only))
    assert tu.load_tokenizer(where, out, init_from=str(weights_only))[1] == where
    with pytest.raises(FileNotFoundError, match="init_from='/nowhere/x.ckpt': no such file"):
        tu.load_tokenizer("", out, init_from="/nowhere/x.ckpt")
    with pytest.raises(FileNotFoundError, match="no tokenizer files .* in tokenizer_dir="):
        tu.load_tokenizer(str(weights_only), out, init_from="")
    tu.check_tokenizer_fits(tokenizer, where, BridgeTowerConfig.preset("tiny", vocab_size=tokenizer.vocab_size))
    with pytest.raises(ValueError, match=f"{tokenizer.vocab_size} token ids, more than the model's 100"):
        tu.check_tokenizer_fits(tokenizer, where, BridgeTowerConfig.preset("tiny", vocab_size=100))
    with pytest.raises(ValueError, match="has <pad> = 1, the model's pad_token_id is 0"):
        tu.check_tokenizer_fits(tokenizer, where, BridgeTowerConfig.preset("tiny", vocab_size=tokenizer.vocab_size,
                                                                           pad_token_id=0))
    # --tokenizer_dir with other ids than the starting model's tokenizer: allowed, with a warning
    capsys.readouterr()
    assert tu.load_tokenizer(where, out, init_from=where)[1] == where and "warning" not in capsys.readouterr().err
    other = tmp_path / "other"
    shutil.copytree(where, other)
    vocab = json.load(open(other / "vocab.json"))
    a, b = sorted(vocab, key=vocab.get)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    json.dump(vocab, open(other / "vocab.json", "w"))
    assert tu.load_tokenizer(str(other), out, init_from=where)[1] == str(other)
    assert f"has another vocabulary than the tokenizer of the model it starts from ({where})" in capsys.readouterr().err


def test_rng_state_roundtrip():
    import random
    import numpy as np
    state = tu.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(2))
    tu.set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_metric_logger(tmp_path, capsys):
    log = tu.MetricLogger(tmp_path / "run", is_master=True)
    log.log(3, loss=1.23456, lr=1e-5, eta="1m00s")
    log.log(4, kind="eval", mlm_acc=0.5)
    tu.MetricLogger(tmp_path / "run", is_master=False).log(5, loss=0.0)
    out = capsys.readouterr().out.splitlines()
    assert out == ["step 3 | loss 1.235 | lr 1e-05 | eta 1m00s", "eval step 4 | mlm_acc 0.5"]
    lines = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert [(l["kind"], l["step"]) for l in lines] == [("train", 3), ("eval", 4)] and lines[0]["loss"] == 1.23456
    # resumed from the checkpoint of step 3, written when the file held the first line: the killed run's later
    # lines go (the eval at step 4, undecodable bytes cut short by the kill), a marker follows; edited in place, so
    # that a reader following the file (tail -f) keeps reading it
    size_at_checkpoint = len(open(tmp_path / "run" / "metrics.jsonl", "rb").readline())
    with open(tmp_path / "run" / "metrics.jsonl", "ab") as f:
        f.write(b'{"kind": "train", "st\xff\xfe')
    follower = open(tmp_path / "run" / "metrics.jsonl")
    resumed = tu.MetricLogger(tmp_path / "run", is_master=True, resume=(3, size_at_checkpoint))
    resumed.log(4, echo=False, loss=0.5)
    lines = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert [(l["kind"], l["step"]) for l in lines] == [("train", 3), ("resume", 3), ("train", 4)]
    assert lines[0]["loss"] == 1.23456 and lines[2]["loss"] == 0.5
    assert [json.loads(l)["kind"] for l in follower] == ["train", "resume", "train"]
    assert resumed.size() == os.path.getsize(tmp_path / "run" / "metrics.jsonl")
    # a checkpoint from before sizes were recorded cuts nothing; a new run (the last left no checkpoint) starts afresh
    tu.MetricLogger(tmp_path / "run", is_master=True, resume=(4, None))
    assert len(open(tmp_path / "run" / "metrics.jsonl").readlines()) == 4
    tu.MetricLogger(tmp_path / "run", is_master=True).log(1, echo=False, loss=2.0)
    assert [json.loads(l)["step"] for l in open(tmp_path / "run" / "metrics.jsonl")] == [1]


def test_peak_flops(monkeypatch):
    assert tu.peak_flops("cpu") is None
    # the bf16 peak measures bf16 runs only: an fp32 run (forced, or auto on a V100) reports no MFU
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert tu.peak_flops("cuda:0", "auto") == tu.peak_flops("cuda:0", "bfloat16") == 989e12
    assert tu.peak_flops("cuda:0", "float32") is None
    assert tu.peak_flops("cuda:0", "tf32") == 989e12 / 2  # TF32's dense peak is half bf16's
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert tu.peak_flops("cuda:0", "auto") is None and tu.peak_flops("cuda:0", "bfloat16") == 125e12
    assert tu.peak_flops("cuda:0", "tf32") is None  # no TF32 before Ampere
    names = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H200": 989e12,
             "NVIDIA H200 NVL": 835e12, "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA L40S": 362e12, "NVIDIA L40": 181e12,
             "NVIDIA L4": 121e12, "NVIDIA H800": 989e12, "NVIDIA A10G": 70e12, "NVIDIA GeForce GTX 1080": None}
    assert {name: tu.peak_flops_of(name) for name in names} == names


def test_device_and_dtype_flags(monkeypatch):
    assert tu.resolve_device("cuda", local_rank=3) == torch.device("cuda", 3)  # torchrun: one GPU a process
    assert tu.resolve_device("cuda:1", local_rank=3) == torch.device("cuda", 1)
    assert tu.resolve_device("cpu", local_rank=3) == torch.device("cpu")
    assert tu.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="--device='gpu'"):
        tu.resolve_device("gpu")
    with pytest.raises(ValueError, match="--device=cuda:1: under torchrun each process takes its own GPU"):
        monkeypatch.setenv("WORLD_SIZE", "2")
        tu.resolve_device("cuda:1", local_rank=1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # H100 / H200
    assert tu.use_bf16(torch.device("cuda"), "auto") and not tu.use_bf16(torch.device("cpu"), "auto")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))  # V100: no bf16 cores
    assert not tu.use_bf16(torch.device("cuda"), "auto") and tu.use_bf16(torch.device("cuda"), "bfloat16")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # A100
    assert tu.use_bf16(torch.device("cpu"), "bfloat16") and not tu.use_bf16(torch.device("cuda"), "float32")
    assert not tu.use_bf16(torch.device("cuda"), "tf32")
    for wrong in ("bf16", "float16", "fp32"):  # not a silent fp32 run
        with pytest.raises(ValueError, match=f"--dtype='{wrong}'"):
            tu.use_bf16(torch.device("cuda"), wrong)


def test_ranks_must_find_the_same_checkpoint(tmp_path, monkeypatch):
    # a node that cannot see rank 0's out_dir would start from step 0 and hang in another collective: an error
    tu.save_checkpoint(tmp_path, {"step": 7})
    two_ranks = tu.Dist(0, 0, 2, torch.device("cpu"))
    for other, ok in ((7, True), (None, False), (5, False)):
        monkeypatch.setattr(tu.torch_dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), [obj, other]))
        if ok:
            assert tu.load_latest_checkpoint(tmp_path, dist=two_ranks)["step"] == 7
        else:
            with pytest.raises(RuntimeError, match=rf"ckpt.pt: .*\[7, {other}\].*every node"):
                tu.load_latest_checkpoint(tmp_path, dist=two_ranks)


# -----------------------------------------------------------------------------
# train_step: accumulation, clipping, DDP

def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 3))


def _loss_fn(model, batch):
    x, y = batch
    logits = model(x)
    return nn.functional.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}


def _weighted_loss_fn(model, batch):
    # a micro-batch weighs as many as its samples of class 0 (none, in some): a stand-in for VQA's blanks
    loss, metrics = _loss_fn(model, batch)
    return loss, metrics, (batch[1] == 0).sum()


def _batches(n, size=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 6, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(n)]


def test_train_step_accumulation_equals_full_batch():
    # plain SGD with lr 1: the parameter change is minus the gradient
    batches = _batches(2)
    full = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    a, b = _mlp(), _mlp()
    out_a = tu.train_step(a, batches, _loss_fn, torch.optim.SGD(a.parameters(), lr=1.0))
    out_b = tu.train_step(b, iter([full]), _loss_fn, torch.optim.SGD(b.parameters(), lr=1.0), accum_steps=1)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)
    assert out_a["loss"] == pytest.approx(out_b["loss"], abs=1e-6)
    assert set(out_a) == {"loss", "acc", "grad_norm"}
    assert all(p.grad is None for p in a.parameters())


def test_train_step_weighs_the_logged_metrics():
    # the gradient stays the mean of the micro-batch means; only the logged figures are weighted, and a micro-batch
    # of weight 0 leaves them as they were without it
    batches = _batches(3)
    weights = [0.0, 1.0, 3.0]
    weighted = lambda m, b: (*_loss_fn(m, b[0]), b[1])
    a, b = _mlp(), _mlp()
    out = tu.train_step(a, list(zip(batches, weights)), weighted, torch.optim.SGD(a.parameters(), lr=1.0))
    tu.train_step(b, batches, _loss_fn, torch.optim.SGD(b.parameters(), lr=1.0))
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)
    with torch.no_grad():
        each = [_loss_fn(_mlp(), batch) for batch in batches]
    assert out["loss"] == pytest.approx((each[1][0] + 3 * each[2][0]).item() / 4, abs=1e-6)
    assert out["acc"] == pytest.approx((each[1][1]["acc"] + 3 * each[2][1]["acc"]).item() / 4, abs=1e-6)
    # every weight 0 (no sample counted anywhere in the step): 0s, not NaN
    c = _mlp()
    out = tu.train_step(c, [(batches[0], 0.0)], weighted, torch.optim.SGD(c.parameters(), lr=1.0))
    assert out["loss"] == 0 and out["acc"] == 0 and out["grad_norm"] > 0


def test_train_step_clipping():
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    out = tu.train_step(model, _batches(1), _loss_fn, torch.optim.SGD(model.parameters(), lr=1.0), grad_clip=1e-3)
    update = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    assert out["grad_norm"] > 1e-2  # reported before clipping
    assert update.norm().item() == pytest.approx(1e-3, rel=1e-4)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, batches, result_path, loss_fn):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist = tu.setup_distributed("cpu")
    model = torch.nn.parallel.DistributedDataParallel(_mlp())
    per_rank = len(batches) // world_size
    mine = batches[rank * per_rank:(rank + 1) * per_rank]
    out = tu.train_step(model, mine, loss_fn, torch.optim.SGD(model.parameters(), lr=1.0), dist=dist)
    if dist.is_master:
        torch.save({"params": [p.detach() for p in model.parameters()], "out": out}, result_path)
    end_ddp_worker()  # the group destroyed, then the process


@pytest.mark.parametrize("loss_fn", [_loss_fn, _weighted_loss_fn])
def test_train_step_ddp_matches_single_process(tmp_path, loss_fn):
    # 2 ranks x 2 micro-batches (the first under no_sync) == 1 process accumulating all 4; weighted, the ranks'
    # figures weigh as their micro-batches do, not half each
    batches = _batches(4)
    if loss_fn is _weighted_loss_fn:
        assert len({(b[1] == 0).sum().item() for b in batches}) > 1  # the weights differ
    mp.spawn(_ddp_worker, args=(2, _free_port(), batches, str(tmp_path / "ddp.pt"), loss_fn), nprocs=2)
    ddp = torch.load(tmp_path / "ddp.pt")
    single = _mlp()
    out = tu.train_step(single, batches, loss_fn, torch.optim.SGD(single.parameters(), lr=1.0))
    for pa, pb in zip(ddp["params"], single.parameters()):
        torch.testing.assert_close(pa, pb.detach(), rtol=0, atol=1e-6)
    assert ddp["out"]["loss"] == pytest.approx(out["loss"], abs=1e-6)
    assert ddp["out"]["acc"] == pytest.approx(out["acc"], abs=1e-6)
    assert ddp["out"]["grad_norm"] == pytest.approx(out["grad_norm"], rel=1e-6) and out["grad_norm"] > 0


def test_reductions_run_on_the_process_device(monkeypatch):
    # NCCL reduces only CUDA tensors, so a count made on the CPU must go to dist.device first (gloo, which the
    # other tests use, takes either). "meta" stands in for "cuda" here; the fake all_reduce plays two ranks
    # that hold the same values.
    seen = []

    def all_reduce(t):
        seen.append(t.device)
        t.mul_(2)

    monkeypatch.setattr(tu.torch_dist, "all_reduce", all_reduce)
    out = tu.all_reduce_mean(torch.tensor([1.0, 3.0]), tu.Dist(0, 0, 2, torch.device("meta")))
    assert seen == [torch.device("meta")] and out.device == torch.device("meta")
    two_ranks = tu.Dist(0, 0, 2, torch.device("cpu"))
    values = torch.tensor([1.0, 3.0])
    assert tu.all_reduce_mean(values, two_ranks).tolist() == [1.0, 3.0]
    assert values.tolist() == [1.0, 3.0]  # the caller's tensor is not reduced in place
    assert tu.sum_over_ranks(3, two_ranks) == 6
    assert tu.sum_over_ranks(3, tu.Dist()) == 3


# -----------------------------------------------------------------------------
# FLOPs: the formula against torch's FLOP counter on a real forward + backward

def _math_attention(q, k, v, key_mask=None, dropout_p=0.0, requested="auto"):
    # the counter does not see inside CPU scaled_dot_product_attention; these two matmuls it counts
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("heads,vision", [(("mlm",), True), (("itm",), True), (("itm",), False),
                                          (("mlm", "itm", "itc", "vqa"), True)])
def test_flops_per_sample_matches_flop_counter(monkeypatch, heads, vision):
    from torch.utils.flop_counter import FlopCounterMode
    import model as M
    monkeypatch.setattr(M, "bridge_attention", _math_attention)
    # every width different, and more vision blocks than text layers (the extra blocks never run)
    config = M.BridgeTowerConfig(vocab_size=300, hidden_size=96, num_heads=3, intermediate_size=160, text_layers=3,
                                 vision_width=128, vision_layers=4, patch_size=16, image_size=48, cross_layers=2,
                                 num_vqa_answers=50, contrastive_hidden_size=32, heads=("mlm", "itm", "itc", "vqa"))
    model = M.BridgeTower(config)
    B, T = 2, 11
    ids = torch.randint(3, 300, (B, T))
    positions = torch.zeros(B, T, dtype=torch.bool)
    positions[:, 2:5] = True
    kw = {"mlm_positions": positions} if heads == ("mlm",) else {}
    mlm_tokens = 3 if kw else None
    pixels = torch.randn(B, 3, 48, 48)
    # vision=False: the pass is given the vision tower's output (pre-training's ITM pass), which costs nothing here
    kw.update(pixel_values=pixels) if vision else kw.update(image_inputs=[x.detach() for x in model.encode_image(pixels)])
    with FlopCounterMode(display=False) as counter:
        out = model(ids, heads=heads, **kw)
        sum(x.float().sum() for x in (out.mlm_logits, out.itm_logits, out.vqa_logits, out.text_embeds,
                                      out.image_embeds, out.cross_embeds) if x is not None).backward()
    assert tu.flops_per_sample(config, T, heads=heads, mlm_tokens=mlm_tokens, vision=vision) == \
        counter.get_total_flops() / B


def test_train_step_without_clipping():
    # grad_clip=0 (both base recipes: the original does not clip) means no clipping at all, however large the
    # gradient: with SGD at lr 1 the update is the whole gradient, of the reported norm
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    big = lambda m, b: (lambda loss, metrics: (100 * loss, metrics))(*_loss_fn(m, b))
    out = tu.train_step(model, _batches(1), big, torch.optim.SGD(model.parameters(), lr=1.0), grad_clip=0.0)
    update = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    assert out["grad_norm"] > 10
    assert update.norm().item() == pytest.approx(out["grad_norm"], rel=1e-5)


def _rng_worker(rank, world_size, port, result_path):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist = tu.setup_distributed("cpu")
    torch.manual_seed(100 + rank)  # as the scripts do: seed + rank, each rank its own dropout masks
    states = tu.gather_rng_states(dist)
    if dist.is_master:
        torch.save(states, result_path)
    tu.cleanup_distributed()


def test_checkpoint_keeps_each_ranks_rng_state(tmp_path):
    # a checkpoint holds every rank's RNG state, indexed by rank, so that after a resume rank 1 continues its own
    # stream of dropout masks, not a copy of rank 0's
    mp.spawn(_rng_worker, args=(2, _free_port(), str(tmp_path / "rng.pt")), nprocs=2)
    states = torch.load(tmp_path / "rng.pt", weights_only=False)
    assert len(states) == 2
    for rank, state in enumerate(states):
        assert torch.equal(state["torch"], torch.Generator().manual_seed(100 + rank).get_state()), rank


@pytest.mark.parametrize("api", ["set_matmul_precision", "legacy", "global"])
def test_tf32_switch_reaches_the_kernels(api):
    # --dtype=tf32 sets PyTorch's switch through the API of torch >= 2.9, after which reading the legacy
    # allow_tf32 raises; the kernels read it in a way that works whichever API set it (a fresh process each:
    # the switch is global)
    set_it = {"set_matmul_precision": "tu.set_matmul_precision('tf32')",
              "legacy": "torch.backends.cuda.matmul.allow_tf32 = True",
              "global": "torch.backends.fp32_precision = 'tf32'"}[api]
    code = ("import torch, train_utils as tu, bridge_kernels as bk\n"
            "assert not bk.tf32_matmuls() and bk._dot_precision(torch.float32) == 'ieee'\n"
            "tu.set_matmul_precision('float32')\n"
            "assert not bk.tf32_matmuls()\n"
            f"{set_it}\n"
            "assert bk.tf32_matmuls() and bk._dot_precision(torch.float32) == 'tf32'\n"
            "assert bk._dot_precision(torch.bfloat16) == 'ieee'\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], cwd=root, env=env, check=True, timeout=120)


def test_resume_keeps_this_runs_fused_adamw():
    # a checkpoint's optimizer groups carry the device that wrote them: one from a CPU run (unfused) resumed where
    # the script builds a fused AdamW (on a GPU; fused AdamW also runs on a CPU, which this test uses) stays fused,
    # with the same update as the unfused optimizer would make
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(8))
    written = torch.optim.AdamW([p], lr=0.1, fused=False)
    for _ in range(2):
        p.grad = torch.randn(8)
        written.step()
    state = written.state_dict()  # its tensors are the optimizer's own: each load gets a copy, as from a file
    fused = torch.optim.AdamW([p], lr=0.1, fused=True)
    tu.load_optimizer_state(fused, copy.deepcopy(state))
    assert fused.param_groups[0]["fused"] and fused.state[p]["step"].dtype == torch.float32
    unfused = torch.optim.AdamW([q := nn.Parameter(p.detach().clone())], lr=0.1, fused=False)
    tu.load_optimizer_state(unfused, copy.deepcopy(state))
    assert not unfused.param_groups[0]["fused"]
    p.grad = q.grad = torch.randn(8)
    fused.step()
    unfused.step()
    torch.testing.assert_close(p, q)
    assert fused.state[p]["step"].item() == unfused.state[q]["step"].item() == 3


def test_a_config_file_between_two_keys_makes_them_not_consecutive(tmp_path):
    # --lr twice, a config file between: two overrides in order, not a key given twice in a row
    cfg = tmp_path / "c.py"
    cfg.write_text("batch_size = 64\n")
    config = tu.configure(_defaults(), ["--lr=0.1", str(cfg), "--lr=0.2"])
    assert config["lr"] == 0.2 and config["batch_size"] == 64


def test_resume_never_pads_a_shorter_metrics_file(tmp_path):
    # the checkpoint recorded a size the file no longer reaches (deleted or cut since): nothing is cut, and the file
    # is not extended with NUL bytes to that size either
    log = tu.MetricLogger(tmp_path, is_master=True)
    log.log(1, echo=False, loss=1.0)
    tu.MetricLogger(tmp_path, is_master=True, resume=(5, 10_000)).log(6, echo=False, loss=0.5)
    raw = open(tmp_path / "metrics.jsonl", "rb").read()
    assert b"\0" not in raw and [l.count(b"{") for l in raw.splitlines()] == [1, 1, 1]
