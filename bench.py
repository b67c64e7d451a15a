"""
Speed of our BridgeTower against transformers' on the same weights and inputs (fp32, CPU by default).

    python bench.py                          # base size, batch 4, 288 px, 40 tokens: forward and forward+backward
    python bench.py --size=tiny --runs=3     # quick check
    python bench.py --profile=True           # also a torch.profiler table of our forward and training step

forward:          eval mode, no_grad; HF BridgeTowerModel vs ours with heads=() (the same three feature tensors).
forward+backward: train mode (dropout on), MLM loss on ~15% masked tokens; HF BridgeTowerForMaskedLM(labels=...)
                  vs ours with heads=("mlm",) and mlm_positions (logits only where there are labels).
Runs of the two implementations alternate, so that a slow spell of a shared machine hits both; we report medians.

Measured (2 vCPU AMD EPYC, torch 2.13 CPU, 2 threads, base, batch 4, 288 px, 40 tokens), three quiet runs:
    forward  transformers 2.80-2.97 s, ours 2.60-2.84 s: 1.05-1.08x   forward+backward 9.35-9.53 s vs 8.73-9.25 s
The forward is 451 GFLOP, 94% of it GEMMs that both run through the same MKL calls in the same time (profiler:
2.28 s). Our gains: SDPA for attention (HF: eager softmax in the text and cross layers), a batch-first vision
tower with no sequence-first copies, and in training no last image-side cross layer in the MLM pass and MLM
logits only where there are labels. gemm_bound() prints the ceiling on any speed-up (README, Benchmarks).
On CPU, attention dropout sends SDPA to its math path in training, as eager.
"""

import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

import train_utils
from model import BridgeTower, BridgeTowerConfig

# -----------------------------------------------------------------------------
size = "base"        # BridgeTowerConfig preset: tiny | base | large
batch_size = 4
text_len = 40
runs = 5             # timed runs per measurement (median reported)
warmup = 2           # untimed runs first
threads = 2          # torch.set_num_threads; 0 = leave torch's default
mlm_prob = 0.15      # share of text tokens with an MLM label
device = "cpu"
profile = False      # print torch.profiler tables of our two passes
seed = 0
# -----------------------------------------------------------------------------


def _figure(x):
    """Whole numbers from 10 up, two significant digits below (the tiny size's forward is a fraction of a GFLOP)."""
    return f"{x:.0f}" if x >= 10 else f"{x:.2g}"


def hf_config(c):
    """transformers' BridgeTowerConfig for our config (the same values save_pretrained writes)."""
    from model import config_to_hf
    from transformers import BridgeTowerConfig as HFConfig
    hf = config_to_hf(c)
    return HFConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type", "heads",
                                                                "num_vqa_answers", "cross_layer_norm_eps")})


def build_models(config):
    """HF BridgeTowerForMaskedLM with random weights, and ours loaded from its save_pretrained directory."""
    from transformers import BridgeTowerForMaskedLM
    hf = BridgeTowerForMaskedLM(hf_config(config)).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = BridgeTower.from_pretrained(tmp).to(device)
    return hf, ours


def make_inputs(config, generator):
    B, T = batch_size, text_len
    ids = torch.randint(5, config.vocab_size, (B, T), generator=generator)
    ids[:, 0], ids[:, -1] = 0, 2  # <s> ... </s>
    mask = torch.ones(B, T, dtype=torch.long)
    pixels = torch.randn(B, 3, config.image_size, config.image_size, generator=generator)
    masked = (torch.rand(B, T, generator=generator) < mlm_prob) & (ids > 2)
    masked[:, 1] = True  # at least one label per row
    labels = torch.where(masked, ids, torch.full_like(ids, -100))
    mlm_ids = torch.where(masked, torch.full_like(ids, 4), ids)
    return [t.to(device) for t in (ids, mask, pixels, mlm_ids, labels)]


def sync():
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn):
    """(wall seconds, CPU seconds of this process). On a shared machine the wall clock also counts the time our
    threads wait for a core; CPU time does not (it does count OpenMP spin-waits), so we report both."""
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - t0, time.process_time() - c0


def compare(name, fns):
    """Alternate the implementations run by run; print each one's medians and the speed-up of ours."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    wall = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{name:>16} {k:>12}: median {wall[k]:.3f} s wall, {cpu[k]:.3f} s CPU   wall runs "
              + " ".join(f"{w:.2f}" for w, _ in v))
    print(f"{name:>16} speed-up of ours: {wall['transformers'] / wall['ours']:.2f}x wall, "
          f"{cpu['transformers'] / cpu['ours']:.2f}x CPU time")
    return wall


def gemm_bound(config, wall, forward):
    """How fast can any implementation of these FLOPs be here? Count the forward's FLOPs (matrix products,
    attention) and time the machine's GEMM on the model's largest shape (vision MLP: batch x image tokens rows,
    width -> 4 x width): FLOPs / that rate is a floor on the forward time, and transformers' time over it a
    ceiling on any speed-up."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        forward()
    flops = counter.get_total_flops()  # GEMMs, the patch convolution, and SDPA where the counter knows it
    counted = counter.get_flop_counts().get("Global", {})
    if not any("attention" in str(op) for op in counted):  # the counter skips CPU SDPA: count attention here
        B, Lv, Lt, H = batch_size, config.image_grid ** 2 + 1, text_len, config.hidden_size
        flops += 4 * B * config.text_layers * (Lv * Lv * config.vision_width + Lt * Lt * H)  # uni-modal attention
        flops += 4 * B * config.cross_layers * H * (Lv + Lt) ** 2  # cross: self and cross attention of both streams
    rows, width = batch_size * (config.image_grid ** 2 + 1), config.vision_width
    x, w, b = (torch.randn(rows, width, device=device), torch.randn(4 * width, width, device=device),
               torch.randn(4 * width, device=device))
    gemms = {"F.linear": lambda: F.linear(x, w, b)}
    if device == "cpu" and torch.backends.mkldnn.is_available():  # oneDNN's GEMM (what inductor uses), often faster
        gemms["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    best = {}
    for name, gemm in gemms.items():
        times = [timed(gemm)[0] for _ in range(warmup + 10)]
        best[name] = min(times[warmup:])
    rate = 2 * rows * width * 4 * width / min(best.values())
    floor = flops / rate
    fastest = min(best, key=best.get)
    print(f"forward: {_figure(flops / 1e9)} GFLOP in matrix products and attention; GEMM {rows}x{width} @ "
          f"{width}x{4 * width} best {_figure(rate / 1e9)} GFLOP/s here ({fastest}); overall transformers "
          f"{_figure(flops / wall['transformers'] / 1e9)}, ours {_figure(flops / wall['ours'] / 1e9)} GFLOP/s")
    print(f"forward: floor {_figure(floor)} s at that GEMM rate with attention and everything else free, so no "
          f"implementation of these FLOPs beats transformers by more than {wall['transformers'] / floor:.2f}x here")


def main():
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    config = BridgeTowerConfig.preset(size, heads=("mlm",))
    print(f"{size}: batch {batch_size}, {config.image_size} px ({config.image_grid ** 2 + 1} image tokens), "
          f"{text_len} tokens, {torch.get_num_threads()} threads, {device}")
    hf, ours = build_models(config)
    ids, mask, pixels, mlm_ids, labels = make_inputs(config, torch.Generator().manual_seed(seed))

    # forward: same features from the same weights
    hf.eval(), ours.eval()
    with torch.no_grad():
        a = hf.bridgetower(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        b = ours(ids, attention_mask=mask, pixel_values=pixels, heads=())
        diff = max((a[k] - b_k).abs().max().item() for k, b_k in
                   (("text_features", b.text_features), ("image_features", b.image_features),
                    ("pooler_output", b.pooler_output)))
        print(f"max |ours - transformers| over the features: {diff:.2e}")
        wall = compare("forward", {
            "transformers": lambda: hf.bridgetower(input_ids=ids, attention_mask=mask, pixel_values=pixels),
            "ours": lambda: ours(ids, attention_mask=mask, pixel_values=pixels, heads=()),
        })
        gemm_bound(config, wall, lambda: ours(ids, attention_mask=mask, pixel_values=pixels, heads=()))

    # forward + backward of the MLM loss, train mode
    hf.train(), ours.train()
    labelled = labels != -100

    def hf_step():
        hf.zero_grad(set_to_none=True)
        hf(input_ids=mlm_ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss.backward()

    def our_step():
        ours.zero_grad(set_to_none=True)
        out = ours(mlm_ids, attention_mask=mask, pixel_values=pixels, heads=("mlm",), mlm_positions=labelled)
        logits = out.mlm_logits
        F.cross_entropy(logits, labels[labelled]).backward()

    compare("forward+backward", {"transformers": hf_step, "ours": our_step})

    if profile:
        from torch.profiler import profile as torch_profile
        for name, fn in (("forward", lambda: ours(ids, attention_mask=mask, pixel_values=pixels, heads=())),
                         ("forward+backward", our_step)):
            ours.train(name != "forward")
            with torch.no_grad() if name == "forward" else torch.enable_grad(), torch_profile() as prof:
                fn()
            print(f"ours, {name}:")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    train_utils.configure(globals())
    main()
