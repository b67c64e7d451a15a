# The demo that `python pretrain.py` runs with no arguments (these are pretrain.py's defaults, spelled out;
# tests/test_pretrain.py checks that they agree): a tiny BridgeTower from random weights on the synthetic
# scenes at 64 px, on the CPU in about 3 minutes. Its final model (out/pretrain/final) is where the VQA
# fine-tuning demo starts.
out_dir = "out/pretrain"
model_size = "tiny"
image_size = 64
dropout = 0.1
data = "synthetic"
max_text_len = 20
batch_size = 64
micro_batch_size = 32
max_steps = 500
lr = 1e-3
warmup_ratio = 0.1
weight_decay = 0.01
grad_clip = 1.0
eval_interval = 100
ckpt_interval = 100
