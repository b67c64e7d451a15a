# BridgeTower-Base pre-training, the paper's recipe (the original's scripts):
# roberta-base + CLIP ViT-B/16, 288 px, MLM + ITM, global batch 4096, 100k steps, AdamW (0.9, 0.98) eps 1e-8,
# lr 1e-5 with warmup 10% then linear to 0, weight decay 0.01 (none on biases and LayerNorms), lr x5 for
# cross_modal* and the heads, captions up to 50 tokens. bf16 autocast on an Ampere or newer GPU (the original
# trained in fp32).
#   torchrun --nproc_per_node=8 pretrain.py config/pretrain_base.py
# The paths below are where the unimodal checkpoints and the datasets are expected; override them on the
# command line (--text_init=..., --data=...).
out_dir = "out/pretrain_base"
text_init = "checkpoints/roberta-base"          # HF RobertaModel dir, with its tokenizer files
vision_init = "checkpoints/ViT-B-16.pt"         # OpenAI CLIP archive (or an HF openai/clip-vit-base-patch16 dir)
model_size = "base"
image_size = 288
dropout = 0.1
# COCO (Karpathy train+restval), Visual Genome region captions, SBU and CC3M (img2dataset shards)
data = ("coco:data/coco/dataset_coco.json@data/coco,"
        "vg:data/vg/region_descriptions.json@data/vg/images,"
        "wds:data/cc3m/{00000..00331}.tar,"
        "wds:data/sbu/{00000..00099}.tar")
max_text_len = 50
mlm_prob = 0.15              # 80% <mask>, 10% random, 10% kept (the demo masks 30%)
itm_neg_prob = 0.5
num_workers = 8
batch_size = 4096            # global; accumulation fills it whatever the number of GPUs
micro_batch_size = 32        # per GPU and micro-step, the original's. Another size changes the objective a little:
                             # MLM averages over each micro-batch's masked tokens, ITM negatives come from it
max_steps = 100_000
lr = 1e-5
warmup_ratio = 0.1
weight_decay = 0.01
betas = (0.9, 0.98)
adam_eps = 1e-8
lr_mult_cross_modal = 5.0
lr_mult_heads = 5.0
grad_clip = 0.0              # the original does not clip
dtype = "auto"               # bf16 autocast on an Ampere or newer GPU (the original trained in fp32), else fp32
log_interval = 10
eval_interval = 2000
eval_batches = 8
ckpt_interval = 1000
