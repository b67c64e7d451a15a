# BridgeTower-Large VQAv2 fine-tuning, the original's scripts/ftfpt_large_vqa.sh: the base recipe
# (config/finetune_vqa_base.py; every setting below not marked "large" is the same, and so is what its header says
# about evaluation) from the pre-trained BridgeTower-Large (roberta-large + CLIP ViT-L/14, width 1024), at 574 px
# (41 x 41 patches of 14 px + 1 = 1682 image tokens, the position table interpolated from 294 px), lr 4e-6 (base:
# 1e-5), 4 questions per GPU and micro-step (the original's, 16 micro-steps a step of 512 on 8 GPUs; the loss is a
# mean over questions, so a larger micro-batch where memory allows gives the same gradients, dropout masks aside,
# and runs faster). The paper reports 81.15 on test-std (base: 78.73).
#   torchrun --nproc_per_node=8 finetune_vqa.py config/finetune_vqa_large.py
# The paths are where the checkpoint and VQAv2 are expected; override them on the command line.
out_dir = "out/vqa_large"
init_from = "checkpoints/bridgetower-large-itm-mlm"  # large: HF dir (with tokenizer) or BridgeTower_pt_large.ckpt
tokenizer_dir = ""                           # needed with an original .ckpt: roberta-large's vocab.json + merges.txt
image_size = 574                 # large
data_dir = "data/vqav2"          # v2_OpenEnded_mscoco_*_questions.json, v2_mscoco_*_annotations.json
image_root = "data/coco"         # train2014/ val2014/ test2015/ with COCO_{split}_{id:012d}.jpg
train_splits = "train2014,val2014"
vocab_splits = "train2014,val2014"
min_answer_count = 9             # -> 3129 answers
eval_split = ""
eval_holdout = 0
test_split = "test2015"
max_text_len = 50
crop_scale = (0.5, 1.0)
randaugment = (2, 5)
num_workers = 8
batch_size = 512                 # global; accumulation fills it whatever the number of GPUs
micro_batch_size = 4             # large: per GPU and micro-step
epochs = 10
max_steps = 0
lr = 4e-6                        # large
warmup_ratio = 0.06
weight_decay = 0.05
betas = (0.9, 0.98)
adam_eps = 1e-8
lr_mult_heads = 50.0
lr_mult_cross_modal = 5.0
grad_clip = 0.0
dtype = "auto"               # bf16 autocast on an Ampere or newer GPU, else fp32
log_interval = 10
eval_interval = 0
ckpt_interval = 500
