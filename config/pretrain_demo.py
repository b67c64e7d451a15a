# The demo that `python pretrain.py` runs with no arguments (these are pretrain.py's defaults, spelled out;
# tests/test_pretrain.py checks that they agree): a tiny BridgeTower from random weights on the synthetic
# scenes at 64 px, on the CPU in about 3 minutes. Its final model (out/pretrain/final) is where the VQA
# fine-tuning demo starts.
# Tuning notes (tiny model, batch 32, dropout 0; 1-3 seeds per setting): with the paper's 15% masking, ITM
# sits at chance for ~200-320 steps, then climbs to ~0.8-0.9 by step 500 at lr 2e-4..3e-4 with the x5
# multipliers; at lr 5e-4 or 1e-3, without the multipliers, with batch 16, or with 2% warmup or no clipping,
# it was still at chance after 300-500 steps. Masking 30% of the (short) captions starts ITM earlier
# (~180-250 steps): MLM on colour and shape words needs the image, and ITM builds on that grounding.
out_dir = "out/pretrain"
model_size = "tiny"
image_size = 64
dropout = None
data = "synthetic"
max_text_len = 20
mlm_prob = 0.3
batch_size = 32
micro_batch_size = 16
max_steps = 450
lr = 3e-4
warmup_ratio = 0.1
weight_decay = 0.01
lr_mult_cross_modal = 5.0
lr_mult_heads = 5.0
grad_clip = 1.0
eval_interval = 100
eval_batches = 8
ckpt_interval = 100
