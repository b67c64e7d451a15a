# BridgeTower-Large pre-training, the original's scripts/pre_train_large.sh: the base recipe (config/pretrain_base.py,
# every setting below not marked "large" is the same) with roberta-large + CLIP ViT-L/14 (24 + 24 layers, width
# 1024, 16 heads; cross-modal layers of width 1024), 294 px (21 x 21 patches of 14 px + 1 = 442 image tokens),
# 16 samples per GPU and micro-step (the original ran 64 GPUs: 8 nodes x 8, so 4 micro-steps a step of 4096).
#   torchrun --nnodes=8 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HEAD_NODE:29500 \
#       pretrain.py config/pretrain_large.py            (on each node; out_dir on a file system every node sees)
# The paths below are where the unimodal checkpoints and the datasets are expected; override them on the
# command line (--text_init=..., --data=...).
out_dir = "out/pretrain_large"
text_init = "checkpoints/roberta-large"         # large: HF RobertaModel dir, with its tokenizer files
vision_init = "checkpoints/ViT-L-14.pt"         # large: OpenAI CLIP archive (or HF openai/clip-vit-large-patch14)
model_size = "large"
image_size = 294             # large
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
micro_batch_size = 16        # large: per GPU and micro-step, the original's. Another size changes the objective a
                             # little: MLM averages over each micro-batch's masked tokens, ITM negatives come from it
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
