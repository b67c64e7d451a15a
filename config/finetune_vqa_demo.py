# The demo that `python finetune_vqa.py` runs with no arguments (these are finetune_vqa.py's defaults, spelled
# out; tests/test_vqa.py checks that they agree): the synthetic VQA set (1500 training images x 3 questions,
# 300 held-out validation images), written to out/vqa_synthetic in the VQAv2 schema, fine-tuned on the CPU from
# the pre-training demo's out/pretrain/final when it exists, else from a random tiny model.
# Tuning notes (tiny model, 600-1000 steps of batch 32, one seed each, held-out accuracy on 900 questions):
# - both starts learn the answer prior of each question kind first (0.44, against 0.13 for the majority answer),
#   then, between steps ~300 and ~1000, start using the image: 0.57 at 980 steps from random weights, 0.57 at
#   1000 steps from the pre-training demo (its cross-modal layers were pre-trained at 64 px, so 64 px here);
# - the paper's multipliers (head x50, cross-modal x5) at these learning rates kept the model at the prior:
#   lr 1e-3 with no multipliers or lr 3e-4 with head x5 both moved on; cross-modal x5 slowed a from-scratch
#   colour probe from 100% to 72% accuracy at step 200;
# - one CPU thread per process: on 2 shared cores, 2 threads spin-wait (about 2x slower per step).
out_dir = "out/vqa"
init_from = "auto"
model_size = "tiny"
image_size = 64
dropout = None
synthetic_dir = "out/vqa_synthetic"
synthetic_images = 1500
train_splits = "train2014"
eval_split = "val2014"
test_split = "test2015"
min_answer_count = 9
crop_scale = (0.5, 1.0)
randaugment = (2, 5)
batch_size = 32
micro_batch_size = 32
epochs = 7
lr = 3e-4
warmup_ratio = 0.06
weight_decay = 0.05
lr_mult_heads = 5.0
lr_mult_cross_modal = 1.0
grad_clip = 0.0
cpu_threads = 1
