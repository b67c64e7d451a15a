r"""
Pre-train BridgeTower with the original's two objectives, masked language modelling (MLM) and image-text
matching (ITM), as two separate forward passes whose losses are summed.

  python pretrain.py                                  # demo: tiny model, synthetic scenes, CPU, about 3 minutes
  torchrun --nproc_per_node=2 pretrain.py --out_dir=out/pretrain_2proc
                                                      # the same on 2 processes (gloo on CPU, NCCL on GPU)
  python pretrain.py --resume                         # continue a killed run from out_dir/ckpt.pt (none: start)
  torchrun --nproc_per_node=8 pretrain.py config/pretrain_base.py    # the paper's recipe (paths in the config)
  torchrun --nproc_per_node=8 pretrain.py config/pretrain_base.py \
      --data=coco:dataset_coco.json@coco,vg:region_descriptions.json@vg    # the same on COCO + VG only
  python pretrain.py config/pretrain_base.py --bench --micro_batch_size=2 --batch_size=2   # speed of the base model

Configuration is the module globals below, overridden by config files and --key=value (train_utils.configure).
The run directory (out_dir) gets metrics.jsonl, ckpt.pt (the latest checkpoint), final/ (save_pretrained, the
tokenizer files and HF's preprocessor_config.json), which finetune_vqa.py can start from, from scratch,
tokenizer/ (the demo tokenizer), and, with tar shards, shard_index/ (their sample counts, for a fast --resume).
`python pretrain.py --help` lists every setting with its default.
"""
import os
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import train_utils as tu
from data import ImageProcessor, build_pretrain_loader, parse_sources, spec_shards, validation_spec
from model import BridgeTower, BridgeTowerConfig, CheckpointError, ModelTypeError

# -----------------------------------------------------------------------------
# default config: the CPU demo (config/pretrain_base.py has the paper's recipe)
# I/O
out_dir = "out/pretrain"     # run directory
log_interval = 10            # steps between printed lines (every step goes to metrics.jsonl)
eval_interval = 100          # steps between validation passes (and one at the end)
eval_batches = 8             # held-out micro-batches per validation pass and rank
retrieval_size = 16          # held-out images x captions, all pairs scored by ITM, for recall@1
ckpt_interval = 100          # steps between checkpoints (0: only at the end)
resume = False               # continue from out_dir/ckpt.pt, with the run's settings where none are given; with
                             # no checkpoint there, start a new run (one command for a job that may be pre-empted)
# initialisation: a BridgeTower checkpoint, or RoBERTa + CLIP, or random (neither)
init_from = ""               # BridgeTower checkpoint (HF dir, original .ckpt, our own dir) -> from_pretrained
text_init = ""               # RoBERTa HF dir (roberta-base) -> from_unimodal
vision_init = ""             # CLIP: HF dir (openai/clip-vit-base-patch16) or OpenAI ViT-B-16.pt
model_size = "tiny"          # BridgeTowerConfig preset when not init_from: tiny | base | large
image_size = 64              # pixels (288 in the paper)
dropout = None               # hidden and attention dropout (0.1 in the paper); None: init_from's own, else 0.0 (the
                             # demo's data never repeats)
# data
data = "synthetic"           # build_pretrain_loader sources: synthetic | wds:... | coco:...@... | vg:...@..., comma-joined
tokenizer_dir = ""           # "" -> the tokenizer of init_from or text_init, else the demo tokenizer trained on synthetic text
val_data = ""                # validation sources, read whole, e.g. wds:cc3m_val/{00000..00001}.tar; "" -> the sources
                             # of data with a val split of their own (synthetic, COCO's Karpathy val; shards, VG: none)
max_text_len = 20            # tokens (50 in the paper; synthetic captions are at most 17)
mlm_prob = 0.3               # 0.15 in the paper; on the demo's ~10-word captions ITM then starts learning later
itm_neg_prob = 0.5
num_workers = 0
# optimisation
batch_size = 32              # global batch: all ranks and micro-steps together
micro_batch_size = 16        # per rank and micro-step; accumulation = batch_size / (micro_batch_size * world size)
max_steps = 450
lr = 3e-4                     # with the x5 multipliers below; 1e-3 and 5e-4 left ITM at chance in 500 steps
warmup_ratio = 0.1           # of max_steps, then linear decay to 0
weight_decay = 0.01
betas = (0.9, 0.98)
adam_eps = 1e-8
lr_mult_cross_modal = 5.0    # for every cross_modal* parameter
lr_mult_heads = 5.0          # for mlm_score and itm_score
grad_clip = 1.0              # 0: no clipping
# system
device = "auto"              # auto: cuda when available, else cpu
dtype = "auto"               # auto: bfloat16 autocast on an Ampere or newer GPU, float32 elsewhere;
                             # tf32: fp32 with TF32 matmuls (the original's fp32, in effect)
compile = False              # torch.compile the model
grad_checkpointing = False   # recompute text, vision and cross layers in the backward pass (less memory, ~1/3 more compute)
cpu_threads = 1              # torch threads per process on CPU (0: torch's default, one per core). Measured on 2 shared
                             # cores: 2 threads took 1.5-2.7 s/step (OpenMP threads spin-waiting for a busy core), 1 thread 0.5 s
seed = 0
bench = False                # time bench_steps steps on random tensors instead of training
bench_steps = 10
bench_profile = False        # --bench: then one more step under torch.profiler: how busy it kept the GPU, top kernels
# -----------------------------------------------------------------------------

HEADS = ("mlm", "itm")
# what --resume may not change: the model (dropout included) and its tokenizer come from the checkpoint, the
# optimiser's groups (decay, multipliers, betas, eps) from its state, and the data position is counted in
# batches of these data settings (the loader's order also depends on num_workers). A changed `data` is only
# listed: its paths may have moved.
RESUME_FIXED = ("init_from", "text_init", "vision_init", "model_size", "image_size", "dropout", "tokenizer_dir",
                "max_text_len", "mlm_prob", "itm_neg_prob", "batch_size", "micro_batch_size", "num_workers", "seed",
                "weight_decay", "betas", "adam_eps", "lr_mult_cross_modal", "lr_mult_heads")


def pretrain_loss(model, batch, device, autocast=nullcontext()):
    """MLM on the masked caption with its own image, ITM on the clean caption with the paired image (itself or a
    random other one); separate forward passes through the text and cross-modal layers as in the original, one
    through the vision tower. Returns (mlm_loss + itm_loss, metrics)."""
    # where a token is predicted, as row-major indices, and its label: found while the batch is still on the host,
    # so that picking those rows on the GPU needs no host sync (a boolean mask there would: the host waits for the
    # GPU to count its Trues before it can launch anything that follows)
    flat_labels = batch["mlm_labels"].flatten()
    positions = torch.nonzero(flat_labels != -100).flatten()
    targets = torch.stack([positions, flat_labels[positions].long()])
    n_masked = max(1, targets.shape[1])  # 0, not NaN, if none is masked (bench's random batches; mask_tokens picks one)
    if torch.device(device).type == "cuda":
        # the batch comes pinned (the loader's pin_memory); these are new. A copy from pageable memory may make the
        # host wait for the GPU's queued work first ("the driver may synchronize with the stream", CUDA's API
        # synchronization behavior), one from pinned memory does not
        targets = targets.pin_memory()
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
    positions, labels = targets.to(device, non_blocking=True)
    with autocast:
        # the vocabulary projection only where a token is predicted (15% in the paper): the head's largest matmul
        mlm = model(batch["mlm_input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                    heads=("mlm",), mlm_positions=positions, return_image_inputs=True)
        # the ITM pass's images are rows of the MLM pass's, and CLIP has no dropout: its vision tower's output is
        # reused, not recomputed (the same values and gradients; a quarter of the step's FLOPs saved)
        image_inputs = [x[batch["itm_image_index"]] for x in mlm.image_inputs]
        itm_logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], image_inputs=image_inputs,
                           heads=("itm",)).itm_logits
        mlm_logits = mlm.mlm_logits
    itm_labels = batch["itm_labels"]
    mlm_loss = F.cross_entropy(mlm_logits.float(), labels, reduction="sum") / n_masked
    itm_loss = F.cross_entropy(itm_logits.float(), itm_labels)
    metrics = {
        "mlm_loss": mlm_loss.detach(),
        "mlm_acc": (mlm_logits.argmax(-1) == labels).sum() / n_masked,
        "itm_loss": itm_loss.detach(),
        "itm_acc": (itm_logits.argmax(-1) == itm_labels).float().mean(),
    }
    return mlm_loss + itm_loss, metrics


@torch.no_grad()
def retrieval_recall(model, batch, device, autocast=nullcontext()):
    """Score every (image i, caption j) pair of a batch of matching pairs by the ITM log-probability of "match".
    Returns (image->text recall@1, text->image recall@1)."""
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    pixels = batch["pixel_values"].to(device)
    n = ids.shape[0]
    scores = torch.empty(n, n)
    with autocast:  # the vision tower once for the n images, then image i against all n captions
        image_inputs = model.encode_image(pixels)
    for i in range(n):
        with autocast:
            logits = model(ids, attention_mask=mask, image_inputs=[x[i:i + 1].expand(n, -1, -1) for x in image_inputs],
                           heads=("itm",)).itm_logits
        scores[i] = logits.float().log_softmax(-1)[:, 1].cpu()
    target = torch.arange(n)
    return (scores.argmax(1) == target).float().mean().item(), (scores.argmax(0) == target).float().mean().item()


def eval_spec():
    """The validation sources. Training shards are never read for validation: it would score seen samples."""
    spec = val_data or validation_spec(data)
    if not spec:
        raise ValueError(f"no validation data: data={data!r} holds out none (tar shards and VG have no val split); "
                         "give held-out sources with --val_data=wds:<held-out shards> (or coco:...)")
    trained_on = spec_shards(val_data) & spec_shards(data)
    if trained_on:
        raise ValueError(f"--val_data names {len(trained_on)} shards that --data trains on, e.g. {min(trained_on)}: "
                         "validation would score samples the model has seen")
    return spec


@torch.no_grad()
def evaluate(model, tokenizer, dist, autocast):
    """MLM/ITM loss and accuracy on held-out batches (each rank its shard, averaged), and ITM retrieval recall@1.
    Leaves every RNG as it found it, so that a run with validation passes and a resumed run draw the same."""
    state = tu.rng_state()
    model.eval()
    spec = eval_spec()
    loader = build_pretrain_loader(spec, tokenizer, split="val", image_size=image_size, batch_size=micro_batch_size,
                                   max_text_len=max_text_len, mlm_prob=mlm_prob, itm_neg_prob=itm_neg_prob,
                                   rank=dist.rank, world_size=dist.world_size, seed=seed,
                                   pin_memory=dist.device.type == "cuda")
    sums = 0
    for _ in range(eval_batches):
        _, metrics = pretrain_loss(model, next(loader), dist.device, autocast)
        sums = sums + torch.stack(list(metrics.values())).float()
    means = tu.all_reduce_mean(sums / eval_batches, dist).tolist()
    out = dict(zip(metrics, means))
    # all ranks score the same pairs (cheap), so no rank waits on another
    pairs = next(build_pretrain_loader(spec, tokenizer, split="val", image_size=image_size, batch_size=retrieval_size,
                                       max_text_len=max_text_len, itm_neg_prob=0.0, seed=seed + 1))
    out["itm_r1_i2t"], out["itm_r1_t2i"] = retrieval_recall(model, pairs, dist.device, autocast)
    model.train()
    tu.set_rng_state(state)
    return out


def build_model(vocab_size):
    if init_from:
        return BridgeTower.from_pretrained(init_from, image_size=image_size, heads=HEADS, **tu.dropout_config(dropout))
    config = BridgeTowerConfig.preset(model_size, vocab_size=vocab_size, image_size=image_size, heads=HEADS,
                                      **tu.dropout_config(dropout or 0.0))
    if text_init or vision_init:
        try:
            return BridgeTower.from_unimodal(config, text_path=text_init or None, vision_path=vision_init or None)
        except ModelTypeError:  # another kind of model: no size would fit it
            raise
        except CheckpointError as e:
            raise CheckpointError(f"{e}\n(the model is built at --model_size={model_size}: roberta-base and CLIP "
                                  "ViT-B/16 take --model_size=base, as config/pretrain_base.py sets; roberta-large and "
                                  "ViT-L/14 take --model_size=large, as config/pretrain_large.py sets)") from None
    return BridgeTower(config)


def step_flops(cfg):
    """Model FLOPs of one optimiser step (both passes, forward + backward), for MFU; the MLM head runs on the
    expected number of masked positions."""
    mlm_tokens = mlm_prob * max_text_len
    return batch_size * (tu.flops_per_sample(cfg, max_text_len, heads=("mlm",), mlm_tokens=mlm_tokens) +
                         tu.flops_per_sample(cfg, max_text_len, heads=("itm",), vision=False))


def wrap_for_training(model, dist):
    """Activation checkpointing, torch.compile and DDP, as this run's settings ask."""
    return tu.wrap_for_training(model, dist, grad_checkpointing, compile)


def make_optimizer(model, device):
    groups = tu.param_groups(model, weight_decay, {"cross_modal": lr_mult_cross_modal, "mlm_score": lr_mult_heads,
                                                   "itm_score": lr_mult_heads})
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=adam_eps, fused=device.type == "cuda")


def main():
    given = set()
    config = tu.configure(globals(), given=given)
    if resume:
        config = tu.take_run_settings(globals(), out_dir, given, "pretrain")
    tu.check_settings(config, **tu.TRAINING_RULES, eval_batches=tu.POSITIVE, retrieval_size=tu.POSITIVE,
                      image_size=tu.POSITIVE, mlm_prob=(lambda v: 0 < v <= 1, "in (0, 1]"),
                      itm_neg_prob=tu.FRACTION, bench_steps=tu.POSITIVE)
    if init_from and (text_init or vision_init) and os.environ.get("RANK", "0") == "0":
        # e.g. --init_from over config/pretrain_base.py, which names the encoders: the whole model wins
        print(f"init_from={init_from!r} is a whole BridgeTower: text_init and vision_init are not used")
    dist = tu.setup_distributed(device)
    tu.set_matmul_precision(dtype)
    if dist.device.type == "cpu" and cpu_threads:
        torch.set_num_threads(cpu_threads)
    if bench:
        return run_bench(dist)
    accum = tu.accumulation_steps(batch_size, micro_batch_size, dist.world_size)
    parse_sources(eval_spec(), "val", image_size)  # a missing or empty validation source: an error before training
    torch.manual_seed(seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    if dist.is_master:
        tu.lock_out_dir(out_dir)
    tu.check_out_dir(out_dir, resume)
    tokenizer, tok_dir = tu.load_tokenizer(tokenizer_dir, out_dir, init_from=init_from,
                                           text_init="" if init_from else text_init)
    ckpt = tu.load_latest_checkpoint(out_dir, "pretrain", dist=dist) if resume else None
    if ckpt is not None:  # every rank checks the settings, before anything is built from them
        message = tu.resume_message(out_dir, ckpt["step"], ckpt["config"], config, fixed=RESUME_FIXED)
        model = tu.model_from_checkpoint(ckpt, dist)
    else:
        if resume and dist.is_master:
            print(f"resume: no checkpoint in {out_dir}, starting from scratch")
        model = build_model(tokenizer.vocab_size)
    tu.check_tokenizer_fits(tokenizer, tok_dir, model.config)
    model.to(dist.device)
    optimizer = make_optimizer(model, dist.device)
    step, skipped, data_position, metrics_resume = 0, 0, 0, None
    if ckpt is not None:
        tu.load_optimizer_state(optimizer, ckpt["optimizer"])
        step, skipped, data_position = ckpt["step"], ckpt["skipped"], ckpt["data_position"]
        metrics_resume = (step, ckpt.get("metrics_size"))
        tu.set_rng_state(ckpt["rng"][dist.rank])
        if dist.is_master:
            print(message)
    else:
        torch.manual_seed(seed + dist.rank)  # each rank draws its own dropout masks
    start_step = step
    del ckpt
    raw_model = model
    model = wrap_for_training(model, dist)
    autocast = tu.autocast(dist.device, dtype)
    loss_fn = lambda m, b: pretrain_loss(m, b, dist.device, autocast)

    # each rank reads its own stream; start_batch skips the micro-batches the checkpointed run had consumed (per rank)
    loader = build_pretrain_loader(data, tokenizer, split="train", image_size=image_size, batch_size=micro_batch_size,
                                   max_text_len=max_text_len, mlm_prob=mlm_prob, itm_neg_prob=itm_neg_prob,
                                   rank=dist.rank, world_size=dist.world_size, num_workers=num_workers, seed=seed,
                                   start_batch=data_position, pin_memory=dist.device.type == "cuda",
                                   shard_index_dir=os.path.join(out_dir, "shard_index"))
    logger = tu.MetricLogger(out_dir, dist.is_master, resume=metrics_resume)
    warmup_steps = int(warmup_ratio * max_steps)
    cfg = raw_model.config
    flops = step_flops(cfg)
    peak = tu.peak_flops(dist.device, dtype)
    if dist.is_master:
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"model {n_params / 1e6:.2f}M parameters | {dist.world_size} process(es) x {accum} micro-steps x "
              f"{micro_batch_size} = batch {batch_size} | {max_steps} steps | device {dist.device}")

    def checkpoint_now():
        state = {"kind": "pretrain", "model": raw_model.state_dict(), "model_config": asdict(cfg),
                 "optimizer": optimizer.state_dict(),
                 "step": step, "data_position": step * accum, "accum": accum, "world_size": dist.world_size,
                 "config": config, "skipped": skipped, "rng": tu.gather_rng_states(dist),
                 "metrics_size": logger.size()}
        if dist.is_master:
            tu.save_checkpoint(out_dir, state)

    skipped_local = 0  # this rank's, over one step's micro-batches

    def micro_batches():
        nonlocal skipped_local
        for _ in range(accum):
            batch = next(loader)
            skipped_local += int(batch.get("skipped", 0))
            yield batch

    dt_avg, t_train = None, time.time()
    while step < max_steps:
        if step > start_step or step == 0:  # a resumed run already did these at its start step
            if eval_interval and step % eval_interval == 0:
                logger.log(step, kind="eval", **evaluate(raw_model, tokenizer, dist, autocast))
            if ckpt_interval and step % ckpt_interval == 0 and step > 0:
                checkpoint_now()
        t0 = time.time()
        factor = tu.lr_factor(step, max_steps, warmup_steps)
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
        metrics.update(eta=tu.format_eta((max_steps - step) * dt_avg), skipped=skipped)
        logger.log(step, echo=step % log_interval == 0 or step == max_steps, **metrics)

    # saved before the last validation, so that a failure there (bad validation data, memory) loses no training
    if step > start_step:
        checkpoint_now()
    if dist.is_master:
        final_dir = os.path.join(out_dir, "final")
        raw_model.save_pretrained(final_dir)
        tu.copy_tokenizer(tok_dir, final_dir)
        ImageProcessor(cfg.image_size).save_pretrained(final_dir)  # for transformers' BridgeTowerProcessor
        print(f"saved {final_dir} | {step} steps in {time.time() - t_train:.0f}s")
    final = evaluate(raw_model, tokenizer, dist, autocast)
    logger.log(step, kind="eval", **final)
    if dist.is_master:
        keys = ["mlm_acc", "itm_acc"] + [k for k in final if k not in ("mlm_acc", "itm_acc")]
        print("eval: " + " ".join(f"{k}={final[k]:.2f}" for k in keys), flush=True)
    tu.cleanup_distributed()


# -----------------------------------------------------------------------------
# benchmark: the training step (both passes, backward, AdamW) on random tensors, no data loading

def random_batch(n, vocab_size, generator):
    """Random tensors shaped like a training micro-batch. Captions are padded to max_text_len as in training, so
    the text attention takes its masked path; real captions fill about 10-20 of the 50 tokens, these a quarter
    to all of max_text_len."""
    ids = torch.randint(5, vocab_size, (n, max_text_len), generator=generator)  # past the demo tokenizer's special ids
    lengths = torch.randint(max(1, max_text_len // 4), max_text_len + 1, (n,), generator=generator)
    attention_mask = (torch.arange(max_text_len)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(attention_mask == 0, 1)  # RoBERTa's <pad>
    labels = torch.full_like(ids, -100)
    masked = (torch.rand(ids.shape, generator=generator) < mlm_prob) & attention_mask.bool()
    labels[masked] = ids[masked]
    return {"pixel_values": torch.randn(n, 3, image_size, image_size, generator=generator), "input_ids": ids,
            "attention_mask": attention_mask, "mlm_input_ids": ids.masked_fill(masked, 4),  # the demo's <mask>
            "mlm_labels": labels, "itm_image_index": torch.randperm(n, generator=generator),
            "itm_labels": torch.randint(0, 2, (n,), generator=generator)}


def run_bench(dist):
    accum = tu.accumulation_steps(batch_size, micro_batch_size, dist.world_size)
    torch.manual_seed(seed)
    cfg = BridgeTowerConfig.preset(model_size, image_size=image_size, heads=HEADS,
                                   **tu.dropout_config(dropout or 0.0))  # random weights: speed does not depend on them
    model = BridgeTower(cfg).to(dist.device)
    optimizer = make_optimizer(model, dist.device)
    model = wrap_for_training(model, dist)
    autocast = tu.autocast(dist.device, dtype)
    loss_fn = lambda m, b: pretrain_loss(m, b, dist.device, autocast)
    g = torch.Generator().manual_seed(seed + dist.rank)
    batches = [random_batch(micro_batch_size, cfg.vocab_size, g) for _ in range(accum)]
    if dist.device.type == "cuda":  # as the training loader's: a copy from pageable memory would stall the step
        batches = [{k: v.pin_memory() for k, v in b.items()} for b in batches]
    flops = step_flops(cfg)
    peak = tu.peak_flops(dist.device, dtype)
    if dist.is_master:
        print(f"bench: {model_size} {image_size}px text {max_text_len} | batch {batch_size} = {dist.world_size} x "
              f"{accum} x {micro_batch_size} | {flops / batch_size / 1e9:.1f} GFLOP/sample | dtype "
              f"{'bf16' if tu.use_bf16(dist.device, dtype) else 'tf32' if dtype == 'tf32' else 'fp32'} | "
              f"{torch.get_num_threads()} threads")
    times = []
    for step in range(bench_steps):
        if dist.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        tu.train_step(model, batches, loss_fn, optimizer, grad_clip, dist)
        if dist.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        times.append(dt)
        if dist.is_master:
            mfu = f" | mfu {flops / dt / (peak * dist.world_size):.3f}" if peak else ""
            print(f"bench step {step} | ms {dt * 1e3:.0f} | samples/s {batch_size / dt:.2f}{mfu}", flush=True)
    dt = statistics.median(times[1:] or times)  # first (warm-up) step dropped
    if dist.is_master:
        mfu = f" mfu={flops / dt / (peak * dist.world_size):.3f}" if peak else ""
        print(f"bench: median ms/step={dt * 1e3:.0f} samples/s={batch_size / dt:.2f} "
              f"samples/s/process={batch_size / dt / dist.world_size:.2f}{mfu}", flush=True)
    if bench_profile:  # after the figures, which a failure here cannot then lose
        profile_step(lambda: tu.train_step(model, batches, loss_fn, optimizer, grad_clip, dist), dist, dt)
    tu.cleanup_distributed()


def profile_step(step, dist, unprofiled, top=12):
    """Run step() once under torch.profiler and print where its time went. On a GPU: how long the GPU was busy
    (kernels and copies), as a share of the profiled step and of the unprofiled one (`unprofiled` seconds, the
    benchmark's median; the profiler slows the host, not the GPU); well below 100 % of the latter means the host's
    kernel launches or its syncs keep the GPU waiting, which larger micro-batches or CUDA graphs would help. Then
    the kernels that took longest, and how often the host waited for the GPU (cudaStreamSynchronize: a .item(),
    .tolist() or boolean index of a GPU tensor, a blocking copy; not the profiler's closing synchronize).
    On a CPU: the operators that took longest (their own time, not their callees').
    Every rank runs it (DDP's all-reduce); rank 0 prints its own."""
    cuda = dist.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with profile(activities=activities) as prof:
        t0 = time.time()
        step()
        sync()
        wall = time.time() - t0
    events = prof.key_averages()
    if cuda:  # kernels and copies, not the GPU-side ranges of record_function (optimizer.step's, DDP's), which
        # span kernels already counted. On one process they run one at a time on one stream, so their times add
        # up; under DDP, NCCL's stream overlaps the compute and the sum can pass the step's time
        timed = [(e.self_device_time_total, e) for e in events
                 if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    else:
        timed = [(e.self_cpu_time_total, e) for e in events]
    total = sum(t for t, _ in timed) / 1e6  # seconds
    if not dist.is_master:
        return
    if total == 0:  # e.g. no CUPTI, which records the GPU's activity
        print(f"profile: one step {wall * 1e3:.0f} ms under the profiler, which recorded no time")
        return
    where = (f"the GPU busy for {total * 1e3:.0f} ms ({total / wall:.0%} of it, {total / unprofiled:.0%} of the "
             f"unprofiled {unprofiled * 1e3:.0f} ms)" if cuda else "operators' own time")
    print(f"profile: one step {wall * 1e3:.0f} ms under the profiler, {where}; the top {top}:")
    for t, e in sorted(timed, key=lambda x: -x[0])[:top]:
        print(f"profile: {t / 1e3:9.1f} ms {t / 1e6 / total:6.1%} {e.count:6d} x {e.key[:100]}")
    if cuda:  # CUDA runtime calls, host-side events
        syncs = [e for e in events if e.key == "cudaStreamSynchronize"]
        waited = sum(e.self_cpu_time_total for e in syncs) / 1e3
        print(f"profile: the host waited for the GPU {sum(e.count for e in syncs)} times in the step "
              f"(cudaStreamSynchronize), {waited:.1f} ms in all")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("\ninterrupted" + ("" if bench else ": --resume continues from the last checkpoint (the last "
                                                     "'checkpoint:' line above)"))
