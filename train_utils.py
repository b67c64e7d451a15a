"""
Training helpers shared by pretrain.py and finetune_vqa.py. Not a framework: each script keeps its own
visible loop and calls these small functions for the parts that are the same everywhere (configuration,
torchrun setup, optimiser groups, schedule, checkpoints, logging, MFU, one optimiser step with gradient
accumulation).
"""
import ast
import json
import os
import random
import re
import shutil
import sys
import time
import tokenize
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
from torch.nn.parallel import DistributedDataParallel as DDP

# -----------------------------------------------------------------------------
# configuration (nanoGPT's configurator, with the errors made explicit)

_CONFIG_TYPES = (int, float, bool, str, tuple, list, dict, type(None))


def _config_keys(globals_dict, constants=False):
    # a script's settings are its lower-case module globals; UPPER_CASE ones (HEADS, COLORS, the VQA normalisation
    # tables) are constants of the code. A config file's names are all read (constants=True), so that an upper-case
    # one there is reported as unknown rather than dropped.
    return [k for k, v in globals_dict.items()
            if not k.startswith("_") and (constants or not k.isupper()) and isinstance(v, _CONFIG_TYPES)]


def _setting_comments(path):
    """{name: comment} from a script's `name = value  # comment` lines and the indented comment-only lines under
    them (the tokenizer tells a comment from a '#' inside a string)."""
    try:
        with open(path) as f:
            lines = f.read().splitlines(keepends=True)
        found = {t.start[0]: t for t in tokenize.generate_tokens(iter(lines).__next__) if t.type == tokenize.COMMENT}
    except (OSError, TypeError, SyntaxError, tokenize.TokenError):
        return {}
    comments, name = {}, None
    for number, line in enumerate(lines, 1):
        comment = found.get(number)
        code = line[:comment.start[1]] if comment else line
        setting = re.match(r"(\w+) *=", code)
        if setting and comment:
            name = setting.group(1)
            comments[name] = comment.string[1:].strip()
        elif name and comment and not code.strip() and comment.start[1] > 0:
            comments[name] += " " + comment.string[1:].strip()
        else:
            name = None
    return comments


def _coerce(key, value, default):
    """Check an override against the type of the default it replaces."""
    if default is None or type(value) is type(default):
        return value
    if type(default) is float and type(value) is int:
        return float(value)
    if type(default) is tuple and type(value) is list:
        return tuple(value)
    raise TypeError(f"config key {key!r}: expected {type(default).__name__} (default {default!r}), "
                    f"got {type(value).__name__} {value!r}")


def _parse_value(raw, default):
    if type(default) is bool and raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # a bare word: a string
    # --out_dir=123 or --tag=1e-3 mean the string, when the key holds a string
    return raw if type(default) is str and not isinstance(value, str) else value


def configure(globals_dict, argv=None, given=None):
    """Override a script's configuration globals in place and return them as a dict.

    Each argument is a config file (a Python file of assignments, e.g. config/pretrain_base.py) or
    --key=value (value parsed as a Python literal, a bare word is a string; --key alone sets a bool to True).
    Later arguments win. A key the script does not define, a value of another type, one key in consecutive
    arguments, or a config file that would undo an earlier --key is an error naming it. Consecutive arguments
    catch an unquoted shell pattern: --data=wds:cc3m/{00000..00331}.tar reaches us as one --data argument per
    shard, of which only the last would be kept. --help prints the script's docstring and every setting.
    given: a set, to which the keys of the --key=value arguments are added (see take_run_settings).
    """
    argv = sys.argv[1:] if argv is None else argv
    keys = _config_keys(globals_dict)
    if "--help" in argv or "-h" in argv:
        print((globals_dict.get("__doc__") or "").strip() + "\n\nsettings and their defaults:")
        comments = _setting_comments(globals_dict.get("__file__"))
        for k in keys:
            setting = f"  --{k}={globals_dict[k]!r}"
            print(f"{setting:<36} {comments[k]}" if k in comments else setting)
        sys.exit(0)
    verbose = os.environ.get("RANK", "0") == "0"
    previous_key, from_command_line = None, set()
    for arg in argv:
        if not arg.startswith("--"):
            if not arg.endswith(".py"):
                raise ValueError(f"{arg!r}: expected a config file of settings (config/*.py) or --key=value")
            if not os.path.isfile(arg):
                raise FileNotFoundError(f"config file {arg!r}: no such file")
            ns = {}
            with open(arg) as f:
                exec(compile(f.read(), arg, "exec"), ns)
            overrides = {k: ns[k] for k in _config_keys(ns, constants=True)}
            source = arg
            previous_key = None
            undone = sorted(from_command_line & set(overrides))
            if undone:
                raise ValueError(f"config file {arg} comes after --{undone[0]} on the command line and would undo it "
                                 "(it sets " + ", ".join(undone) + "): put config files first")
        else:
            key, eq, raw = arg[2:].partition("=")
            if key not in keys:
                raise ValueError(f"unknown config key {key!r} (from {arg!r})")
            if key == previous_key:
                raise ValueError(f"config key {key!r} in consecutive arguments (the second is {arg!r}): quote a "
                                 "value that the shell would expand into several arguments")
            default = globals_dict[key]
            if not eq and type(default) is not bool:
                raise ValueError(f"config key {key!r} needs a value: --{key}=...")
            overrides = {key: _parse_value(raw, default) if eq else True}
            source = "command line"
            previous_key = key
            from_command_line.add(key)
            if given is not None:
                given.add(key)
        for key, value in overrides.items():
            if key not in keys:
                raise ValueError(f"unknown config key {key!r} (from {source})")
            globals_dict[key] = _coerce(key, value, globals_dict[key])
            if verbose:
                print(f"config: {key} = {globals_dict[key]!r} ({source})")
    return {k: globals_dict[k] for k in keys}


# what a setting must be, as (test, description), for check_settings
POSITIVE = (lambda v: v > 0, "> 0")
NOT_NEGATIVE = (lambda v: v >= 0, ">= 0")
FRACTION = (lambda v: 0 <= v <= 1, "in [0, 1]")
TRAINING_RULES = dict(  # the settings both training scripts share
    batch_size=POSITIVE, micro_batch_size=POSITIVE, max_steps=NOT_NEGATIVE, log_interval=POSITIVE,
    eval_interval=NOT_NEGATIVE, ckpt_interval=NOT_NEGATIVE, lr=NOT_NEGATIVE, warmup_ratio=FRACTION,
    weight_decay=NOT_NEGATIVE, adam_eps=POSITIVE, grad_clip=NOT_NEGATIVE, cpu_threads=NOT_NEGATIVE,
    num_workers=NOT_NEGATIVE, dropout=(lambda v: v is None or 0 <= v < 1, "None or in [0, 1)"),
    betas=(lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    # <s>, one token and </s> at least; RoBERTa's 514 positions hold 512 tokens
    max_text_len=(lambda v: 3 <= v <= 512, "in [3, 512]"),
)


def dropout_config(p):
    """BridgeTowerConfig fields for hidden and attention dropout p; for None, none (a checkpoint keeps its own)."""
    return {} if p is None else dict(hidden_dropout=p, attention_dropout=p)


def check_settings(config, **rules):
    """An error naming every setting that fails its rule (key=(test, description)), before anything runs."""
    def passes(test, value):
        try:
            return bool(test(value))
        except TypeError:  # e.g. a tuple of strings where numbers belong
            return False
    bad = [f"--{key}={config[key]!r} (must be {what})" for key, (test, what) in rules.items()
           if key in config and not passes(test, config[key])]
    if bad:
        raise ValueError("bad settings: " + "; ".join(bad))


# -----------------------------------------------------------------------------
# distributed setup (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE)

@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    is_master: bool = True


def setup_distributed(device="auto"):
    """Start the process group when launched by torchrun (NCCL on CUDA, gloo on CPU); else one process."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return Dist(rank, local_rank, world_size, device, rank == 0)


def resolve_device(device, local_rank=0):
    """--device: "auto" (CUDA when available, else CPU), "cpu", "cuda" (this process's GPU, cuda:LOCAL_RANK) or
    "cuda:N"."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device={device!r}: {e}") from None
    if device.type == "cuda" and device.index is not None and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ValueError(f"--device={device}: under torchrun each process takes its own GPU, cuda:LOCAL_RANK; "
                         "give --device=cuda (or restrict CUDA_VISIBLE_DEVICES)")
    return torch.device("cuda", local_rank) if device.type == "cuda" and device.index is None else device


def cleanup_distributed():
    if torch_dist.is_initialized():
        # wait for every rank (rank 0 may still be saving the final model): a rank that tears down its gloo
        # threads while a peer still holds the connection can abort ("terminate called without an active
        # exception", seen in tests/test_pretrain.py::test_torchrun_two_processes about 1 run in 5). The same
        # message from a process that exits milliseconds after its last backward is another race, in gloo: see
        # tests/conftest.py, end_ddp_worker. Training runs save and evaluate for seconds after theirs (a --bench run
        # on gloo does not, and may end so after printing its figures)
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def all_reduce_mean(values, dist):
    """Mean over ranks of a 1-D float tensor (gloo has no AVG, so SUM then divide). The result is on dist.device:
    NCCL reduces only CUDA tensors, so a CPU tensor is moved there first."""
    if dist is not None and dist.world_size > 1:
        values = values.to(dist.device, copy=True)
        torch_dist.all_reduce(values)
        values /= dist.world_size
    return values


def sum_over_ranks(count, dist):
    """An integer count (skipped samples) summed over ranks."""
    if dist is None or dist.world_size == 1:
        return count
    return round(all_reduce_mean(torch.tensor([float(count)]), dist).item() * dist.world_size)


# -----------------------------------------------------------------------------
# tokenizer files

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt")  # what a model directory carries besides weights


def tokenizer_dir_in(*dirs):
    """The first of dirs that holds tokenizer files, or None."""
    for d in dirs:
        if d and os.path.isdir(d) and any(os.path.exists(os.path.join(d, f)) for f in TOKENIZER_FILES):
            return d
    return None


def load_tokenizer(tokenizer_dir, out_dir, **init_paths):
    """(tokenizer, its directory, whose files go next to the final model): tokenizer_dir, else the first of the
    `init_paths` (init_from=..., text_init=...) that carries tokenizer files, else, for a model trained from
    scratch, the demo tokenizer cached in out_dir/tokenizer. A checkpoint without tokenizer files is an error: its
    token ids are another tokenizer's (RoBERTa's, for the released weights), not the demo tokenizer's."""
    from data import Tokenizer, demo_tokenizer
    for key, path in init_paths.items():
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"{key}={path!r}: no such file or directory")
    found = tokenizer_dir_in(*init_paths.values())
    if tokenizer_dir:
        if not tokenizer_dir_in(tokenizer_dir):
            raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in "
                                    f"tokenizer_dir={tokenizer_dir!r}")
        tokenizer = Tokenizer.from_dir(tokenizer_dir)
        if found and Tokenizer.from_dir(found).backend.get_vocab() != tokenizer.backend.get_vocab():
            # allowed (a vocabulary that extends the model's), but token ids that mean other words train silently
            print(f"warning: tokenizer_dir={tokenizer_dir!r} has another vocabulary than the tokenizer of the model "
                  f"it starts from ({found}): its token ids name other words there", file=sys.stderr)
        return tokenizer, tokenizer_dir
    if found:
        return Tokenizer.from_dir(found), found
    given = " or ".join(f"{key}={path!r}" for key, path in init_paths.items() if path)
    if given:
        raise FileNotFoundError(f"{given} carries no tokenizer files (a directory with tokenizer.json or vocab.json + "
                                "merges.txt; an original .ckpt has none): set --tokenizer_dir (roberta-base's "
                                "vocab.json + merges.txt for the released checkpoints)")
    cache = os.path.join(out_dir, "tokenizer")
    return demo_tokenizer(cache_dir=cache), cache


def check_tokenizer_fits(tokenizer, tokenizer_dir, config):
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer in {tokenizer_dir} has {tokenizer.vocab_size} token ids, more than the "
                         f"model's {config.vocab_size} word embeddings: a tokenizer from another model?")
    if tokenizer.pad_id != config.pad_token_id:
        # RoBERTa's position ids count from the pad id, and its embedding row gets no gradient
        raise ValueError(f"the tokenizer in {tokenizer_dir} has <pad> = {tokenizer.pad_id}, the model's pad_token_id "
                         f"is {config.pad_token_id}: a tokenizer from another model?")


def copy_tokenizer(src_dir, dst_dir):
    for f in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src_dir, f)):
            shutil.copy(os.path.join(src_dir, f), dst_dir)


# -----------------------------------------------------------------------------
# optimiser groups and learning-rate schedule

def accumulation_steps(batch_size, micro_batch_size, world_size):
    """Micro-steps per optimiser step, so that the global batch is the same whatever the number of processes."""
    per_step = micro_batch_size * world_size
    if batch_size % per_step:
        raise ValueError(f"batch_size={batch_size} is not a multiple of micro_batch_size={micro_batch_size} "
                         f"x {world_size} processes")
    return batch_size // per_step


DTYPES = ("auto", "bfloat16", "tf32", "float32")


def use_bf16(device, dtype):
    """dtype "auto": bf16 autocast on a GPU with bf16 tensor cores (Ampere, sm_80, and later), fp32 elsewhere (a
    V100 or T4 would emulate bf16); "bfloat16" forces it; "tf32" and "float32" are fp32 (see set_matmul_precision)."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype={dtype!r}: expected one of {', '.join(DTYPES)} (fp16 has no loss scaling here)")
    return dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda" and
                                   torch.cuda.get_device_capability(device) >= (8, 0))


def set_matmul_precision(dtype):
    """--dtype=tf32: fp32 with CUDA matmuls in TF32 on Ampere and later, what the original's fp32 was (it ran torch
    1.11, whose default allowed TF32 there; 1.12 turned it off), at about 8x the exact fp32 matmul peak of an
    A100 or H100. Other dtypes leave PyTorch's setting as it is (exact fp32 by default)."""
    if dtype == "tf32":
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
            torch.backends.cuda.matmul.fp32_precision = "tf32"  # torch >= 2.9; mixing in the legacy flag raises
        else:
            torch.backends.cuda.matmul.allow_tf32 = True


def load_optimizer_state(optimizer, state):
    """optimizer.load_state_dict, keeping this run's fused / foreach choice: the checkpoint's groups carry the
    choice made where it was written, so a run begun on a CPU would otherwise resume on a GPU without the fused
    AdamW. Fused AdamW keeps its step counts on the parameters' device, in fp32."""
    chosen = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flags in zip(optimizer.param_groups, chosen):
        group.update(flags)
        for p in group["params"] if group.get("fused") else ():
            if "step" in optimizer.state.get(p, {}):
                optimizer.state[p]["step"] = optimizer.state[p]["step"].to(p.device, torch.float32)


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16(device, dtype) else nullcontext()


def param_groups(model, weight_decay, lr_mults=None):
    """AdamW groups: no decay on biases and LayerNorm weights (every tensor with ndim < 2), and an lr multiplier
    per name prefix (the first prefix that matches wins; unmatched parameters get 1). Each group has "lr_mult".
    The original picks by name ("bias", "LayerNorm.weight", "norm.weight", ...), which misses CLIP's ln_1, ln_2,
    ln_pre and ln_post weights, its class embedding and the VQA head's LayerNorm weight: those are decayed there."""
    lr_mults = lr_mults or {}
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mult = next((m for prefix, m in lr_mults.items() if name.startswith(prefix)), 1.0)
        decay = weight_decay if p.ndim >= 2 else 0.0
        group = groups.setdefault((mult, decay), {"params": [], "weight_decay": decay, "lr_mult": mult})
        group["params"].append(p)
    return list(groups.values())


def lr_factor(step, max_steps, warmup_steps):
    """Linear warmup to 1 over warmup_steps, then linear decay to 0 at max_steps (the original's
    polynomial schedule with power 1). Warmup starts at 1/warmup_steps rather than 0, so step 0 is not wasted."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))


def set_lr(optimizer, base_lr, factor):
    for group in optimizer.param_groups:
        group["lr"] = base_lr * group.get("lr_mult", 1.0) * factor


# -----------------------------------------------------------------------------
# checkpoints and RNG state

CKPT_NAME = "ckpt.pt"


def save_checkpoint(run_dir, state):
    """Write to a temporary file, flush it to disk and rename: a crash leaves the previous checkpoint intact."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, CKPT_NAME)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    print(f"checkpoint: step {state.get('step')} -> {path}", flush=True)  # what --resume would continue from
    return path


_HELD_LOCKS = {}  # out_dir -> its open lock file: a lock lasts as long as its file stays open


def lock_out_dir(run_dir):
    """An exclusive lock on run_dir/run.lock for the rest of the process (rank 0 takes it): a second run in the
    same out_dir, e.g. a resumed job while the old one still runs, stops at once rather than write the same
    checkpoints and logs. The OS drops the lock when the process ends, however it ends; this process may take
    it again (a run, then its resume, in one notebook). A POSIX lock (lockf), not a flock: forked loader workers,
    which outlive a killed run by seconds, would share a flock and turn away its immediate --resume."""
    import fcntl  # POSIX only, like the rest of the GPU stack; imported here so that the module imports anywhere
    if os.path.realpath(run_dir) in _HELD_LOCKS:
        return
    os.makedirs(run_dir, exist_ok=True)
    f = open(os.path.join(run_dir, "run.lock"), "a")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise RuntimeError(f"{run_dir} is in use: another process holds {run_dir}/run.lock (a run still going?); "
                           "stop it first, or choose another --out_dir") from None
    _HELD_LOCKS[os.path.realpath(run_dir)] = f


def check_out_dir(run_dir, resume):
    """A run must not overwrite an earlier run's checkpoint or final model: without --resume, out_dir may hold
    neither; with it, a final model needs its checkpoint, else "resuming" would start over on top of it."""
    has_ckpt = os.path.exists(os.path.join(run_dir, CKPT_NAME))
    has_final = os.path.exists(os.path.join(run_dir, "final"))
    if not resume and (has_ckpt or has_final):
        held = " and ".join(name for name, there in ((CKPT_NAME, has_ckpt), ("final/", has_final)) if there)
        raise FileExistsError(f"{run_dir} holds an earlier run ({held}): " + ("--resume continues it; " if has_ckpt
                              else "") + "to start over, choose another --out_dir or delete this one")
    if resume and has_final and not has_ckpt:
        raise FileExistsError(f"{run_dir} holds a finished run's final/ but no {CKPT_NAME} to resume from: choose "
                              "another --out_dir to start a new run")


def take_run_settings(globals_dict, run_dir, given, kind):
    """--resume: each setting that no --key=value gives takes the checkpointed run's value, so that `--resume
    --out_dir=...` alone continues the run as it was, on the same data, and so does the run's own command with
    --resume added: a config file repeated there does not undo the run's --key overrides. A setting given anew is
    compared with the run's by resume_message. Returns the script's settings, as configure does.
    Without a readable checkpoint of this kind, nothing is taken (load_latest_checkpoint reports a damaged one)."""
    keys = _config_keys(globals_dict)
    try:
        saved = torch.load(os.path.join(run_dir, CKPT_NAME), map_location="cpu", weights_only=False, mmap=True)
        saved = saved["config"] if saved.get("kind", kind) == kind else {}
    except Exception:
        saved = {}
    taken = {k: saved[k] for k in keys if k in saved and k not in given and k not in ("resume", "out_dir")
             and saved[k] != globals_dict[k]}
    globals_dict.update(taken)
    if taken and os.environ.get("RANK", "0") == "0":
        print("resume: not given, so as in the checkpointed run: " + ", ".join(f"{k}={v!r}" for k, v in taken.items()))
    return {k: globals_dict[k] for k in keys}


def load_latest_checkpoint(run_dir, kind=None, map_location="cpu", dist=None):
    """The last complete checkpoint in run_dir, or None. A leftover .tmp from a killed write is ignored. kind
    ("pretrain", "finetune_vqa"): the script that must have written it.

    With dist, every rank must find the same checkpoint (rank 0 writes it, so out_dir must be on a file system
    that every node sees): a rank that resumed at another step would wait forever in a different collective."""
    path = os.path.join(run_dir, CKPT_NAME)
    ckpt = None
    if os.path.exists(path):
        try:
            # mmap: the ranks of a node share one copy of the file in the page cache instead of each reading all of
            # it into its own memory (4.4 GB at base size, 11 GB at large: the weights and AdamW's two moments)
            ckpt = torch.load(path, map_location=map_location, weights_only=False, mmap=True)
        except Exception as e:  # written by rename, so complete when written: damaged since
            raise RuntimeError(f"{path} cannot be read ({type(e).__name__}: {e}); restore it, or start over in "
                               "another out_dir") from e
        if kind is not None and ckpt.get("kind", kind) != kind:
            raise ValueError(f"{path} was written by {ckpt['kind']}.py, not {kind}.py: --out_dir names another "
                             "script's run")
    if dist is not None and dist.world_size > 1:
        steps = [None] * dist.world_size
        torch_dist.all_gather_object(steps, None if ckpt is None else ckpt["step"])
        if len(set(steps)) > 1:
            raise RuntimeError(f"{path}: the ranks found different checkpoints (step per rank, None = no file: "
                               f"{steps}); out_dir must be a directory that every node shares")
    return ckpt


def model_from_checkpoint(ckpt, dist):
    """The model of a checkpoint. Only as many processes as wrote it replay its data order (batch sizes, and so the
    micro-steps per process, are fixed settings on resume)."""
    from model import BridgeTower, BridgeTowerConfig
    if ckpt["world_size"] != dist.world_size:
        raise ValueError(f"checkpoint was written by {ckpt['world_size']} processes; resuming needs the same number "
                         f"(not {dist.world_size}) to keep the data order")
    model = BridgeTower(BridgeTowerConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model


def resume_message(run_dir, step, saved, now, fixed=()):
    """The resume line, with "key: old -> new" for each setting that differs from the checkpoint's config. Resuming
    applies those from the checkpoint's step on (a longer max_steps, a lower lr may be intended). A change to a
    `fixed` setting (what defines the model, the tokenizer or the data order) is an error instead."""
    changed = {k: (saved.get(k), v) for k, v in now.items() if k != "resume" and saved.get(k) != v}
    refused = [k for k in fixed if k in changed]
    if refused:
        raise ValueError(f"resuming {run_dir}/{CKPT_NAME} with other " + ", ".join(
            f"{k} ({changed[k][0]!r} in the checkpointed run, {changed[k][1]!r} now)" for k in refused) +
            ": these must stay as they were; start a new run in another --out_dir to change them")
    listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
    return f"resumed from {run_dir}/{CKPT_NAME} at step {step}" + (
        f"; settings that differ from the checkpointed run: {listed}" if listed else "")


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # the current GPU's only (setup_distributed sets it): the one this rank's dropout draws on. Not when CUDA
        # is unused (--device=cpu on a GPU machine): asking would start it.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states(dist):
    """Every rank's RNG state, as a list indexed by rank (each rank draws its own dropout masks)."""
    if dist is None or dist.world_size == 1:
        return [rng_state()]
    states = [None] * dist.world_size
    torch_dist.all_gather_object(states, rng_state())
    return states


# -----------------------------------------------------------------------------
# logging

def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


class MetricLogger:
    """One printed line per call (unless echo=False), and the same metrics as a JSON line in run_dir/metrics.jsonl.
    Only the master process writes.
    resume=None: a new run, which starts the file afresh (what is there was left by a run killed before its first
    checkpoint, whose steps this one does again). resume=(step, size): a run resumed from the checkpoint of that
    step, which recorded the file's size then (`size()`). The file is cut back to it (the lines after it, also a
    final evaluation logged after the last checkpoint, are logged again by the resumed run; a checkpoint from
    before 2026-11-29 has no size, and nothing is cut), and a {"kind": "resume", "step": step} line marks the
    seam. Both edit the file in place, so that `tail -f` keeps following it."""

    def __init__(self, run_dir, is_master=True, filename="metrics.jsonl", resume=None):
        self.is_master = is_master
        self.path = os.path.join(run_dir, filename)
        if not is_master:
            return
        os.makedirs(run_dir, exist_ok=True)
        if resume is None:
            open(self.path, "w").close()
            return
        step, size = resume
        if size is not None and os.path.exists(self.path) and os.path.getsize(self.path) > size:
            os.truncate(self.path, size)
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": "resume", "step": step, "time": time.time()}) + "\n")

    def size(self):
        """Bytes logged so far, all in whole lines: a checkpoint records it (see resume)."""
        return os.path.getsize(self.path) if self.is_master and os.path.exists(self.path) else 0

    def log(self, step, kind="train", echo=True, **metrics):
        if not self.is_master:
            return
        if echo:
            head = f"step {step}" if kind == "train" else f"{kind} step {step}"
            print(" | ".join([head] + [f"{k} {_fmt(v)}" for k, v in metrics.items()]), flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **metrics}) + "\n")


def format_eta(seconds):
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# -----------------------------------------------------------------------------
# FLOPs and MFU

# dense bf16 tensor-core peaks in FLOP/s; the first name fragment found in the device name wins
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200 NVL", 835e12), ("H200", 989e12),
    ("H800 PCIe", 756e12), ("H800", 989e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12),
    ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("A10G", 70e12), ("A10", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12),  # V100: fp16
]


def peak_flops(device, dtype="auto"):
    """The accelerator's own peak for `dtype` (as --dtype), or None: no MFU is reported on a CPU, on a GPU not in
    the table, or for exact fp32. bf16: the table; TF32: half of it on Ampere and later (A100 156 TFLOP/s, H100 SXM
    495), none before (a V100 has no TF32)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    peak = peak_flops_of(torch.cuda.get_device_name(device))
    if use_bf16(device, dtype) or peak is None:
        return peak
    return peak / 2 if dtype == "tf32" and torch.cuda.get_device_capability(device) >= (8, 0) else None


def peak_flops_of(name):
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def flops_per_sample(config, text_len, image_len=None, heads=(), mlm_tokens=None, vision=True):
    """Training FLOPs (forward + backward = 3x forward) of one sample through the model once, counting matrix
    multiplies only (as PaLM's MFU does): text layers, vision blocks, both cross-modal streams, and `heads`.
    It follows model.py's schedule: vision blocks above text_layers never run, and an MLM-only pass skips the
    last image-side cross layer and the poolers. mlm_tokens: positions the MLM head scores (model(...,
    mlm_positions=...)), default all text_len. image_len counts the class token; default from the config.
    vision=False: a pass given image_inputs= (no vision tower, no image input transforms)."""
    H, I, W = config.hidden_size, config.intermediate_size, config.vision_width
    T, N = text_len, config.cross_layers
    L = image_len or (config.image_size // config.patch_size) ** 2 + 1
    mlm_only = tuple(heads) == ("mlm",)

    def encoder_layer(n, d, ffn):  # q, k, v, o and the FFN over n tokens, plus QK^T and AV
        return 2 * n * (4 * d * d + 2 * d * ffn) + 2 * 2 * n * n * d

    def cross_layer(n, m):  # a BERT layer plus cross-attention: q/o on own n tokens, k/v on the other m tokens
        return encoder_layer(n, H, I) + 2 * n * 2 * H * H + 2 * m * 2 * H * H + 2 * 2 * n * m * H

    patch_conv = 2 * (L - 1) * 3 * config.patch_size ** 2 * W if vision else 0
    forward = config.text_layers * encoder_layer(T, H, I) + patch_conv
    if vision:
        forward += min(config.vision_layers, config.text_layers) * encoder_layer(L, W, 4 * W)
        forward += N * 2 * L * W * H  # the image input transform at each cross layer
    forward += N * 2 * T * H * H  # the text input transform at each cross layer
    forward += N * cross_layer(T, L) + (N - mlm_only) * cross_layer(L, T)
    forward += 0 if mlm_only else 2 * 2 * H * H  # the two poolers
    head_flops = {
        "mlm": 2 * (T if mlm_tokens is None else mlm_tokens) * (H * H + H * config.vocab_size),
        "itm": 2 * 2 * H * 2,
        "itc": 2 * (H + H + 2 * H) * config.contrastive_hidden_size,
        "vqa": 2 * (2 * H * 4 * H + 4 * H * config.num_vqa_answers),
    }
    forward += sum(head_flops[h] for h in heads)
    return 3 * forward - patch_conv  # the pixels need no gradient: the patch conv's backward is its weight grad only


# -----------------------------------------------------------------------------
# one optimiser step

def wrap_for_training(model, dist, grad_checkpointing=False, compile=False):
    """Activation checkpointing, torch.compile and DDP, as the script's settings ask; the caller keeps the raw model
    (to save, evaluate and count FLOPs of)."""
    if grad_checkpointing:
        apply_grad_checkpointing(model)
    if compile:
        model = torch.compile(model)
    if dist.world_size > 1:
        model = DDP(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    return model


def apply_grad_checkpointing(model):
    """Activation checkpointing from outside the model: each text/cross layer and CLIP block is wrapped so its
    activations are recomputed in the backward pass. The wrapper keeps state_dict keys unchanged and restores
    the RNG, so dropout masks (and results) are the same as without it."""
    from model import ResidualAttentionBlock, TextLayer
    # CrossLayer is a TextLayer
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, (TextLayer, ResidualAttentionBlock)))


def train_step(model, micro_batches, loss_fn, optimizer, grad_clip=0.0, dist=None, accum_steps=None):
    """Accumulate gradients over micro_batches (a list, or an iterator with accum_steps given), then clip and step.

    loss_fn(model, batch) -> (loss, metrics) or (loss, metrics, weight): loss a scalar mean over the micro-batch,
    metrics a dict of scalars, weight the micro-batch's weight in the logged averages (default 1; VQA gives 0 to a
    micro-batch with no readable image, whose loss and score would otherwise pull the step's figures towards 0).
    Each loss is divided by the number of micro-steps, so the gradient is the mean of the micro-batch means (as
    Lightning's accumulation and DDP make the original's); under DDP, gradients are all-reduced only on the last
    micro-step (no_sync on the others), which averages them over ranks. Returns the metrics averaged over
    micro-steps and ranks (weighted; all 0 if every weight is 0), plus "loss" and "grad_norm" (before clipping).
    """
    n = accum_steps or len(micro_batches)
    sums = weights = None
    for i, batch in enumerate(micro_batches):
        last = i == n - 1
        sync = model.no_sync() if isinstance(model, DDP) and not last else nullcontext()
        with sync:
            loss, metrics, *weight = loss_fn(model, batch)
            (loss / n).backward()
        # new_ones fills on the device: no copy from the host each micro-step
        weight = (torch.as_tensor(weight[0], dtype=torch.float32, device=loss.device) if weight else
                  loss.new_ones((), dtype=torch.float32))
        values = torch.stack([loss.detach().float()] + [torch.as_tensor(v, dtype=torch.float32, device=loss.device)
                                                        for v in metrics.values()]) * weight
        sums, weights = (values, weight) if sums is None else (sums + values, weights + weight)
    assert i == n - 1, f"got {i + 1} micro-batches, expected {n}"
    params = [p for g in optimizer.param_groups for p in g["params"]]
    # an infinite max_norm measures the norm without clipping
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # the step's metrics, their total weight and the grad norm (the same on every rank) come back to the host in
    # one transfer; the weighted sums and the weight are both averaged over ranks, so their ratio is the mean
    reduced = all_reduce_mean(torch.cat([sums, weights.view(1), grad_norm.float().view(1)]), dist)
    means = torch.cat([reduced[:-2] / reduced[-2].clamp_min(1e-12), reduced[-1:]]).tolist()
    return dict(zip(["loss"] + list(metrics) + ["grad_norm"], means))
