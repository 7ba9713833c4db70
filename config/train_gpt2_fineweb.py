# GPT-2 (124M) on 10B tokens of FineWeb-Edu, build-nanogpt's recipe, with HellaSwag every 250 steps.
# First: python data/fineweb/prepare.py (sample-10BT; see data/fineweb/readme.md). Then:
#   8 GPUs:  torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_fineweb.py
#            (80 GB each: --batch_size=64 --gradient_accumulation_steps=8, build-nanogpt's own micro-batch, is faster)
#   2 GPUs of 24 GB (the 2x RTX 4090 reproduction):
#            torchrun --standalone --nproc_per_node=2 train.py config/train_gpt2_fineweb.py
#   1 GPU:   python train.py config/train_gpt2_fineweb.py
# A stopped run continues from its last checkpoint (every 250 steps) with the same command and --init_from=resume.
# Memory and time (batch_size=16 fits 24 GB; 8.55e18 FLOPs, 2.4 h on 8x A100 at 40% MFU): assets/notes/2026-12-04-fineweb-gpt2-budget.md

out_dir = 'out-gpt2-fineweb'
wandb_log = False  # --wandb_log=True to follow the run on Weights & Biases
wandb_project = 'fineweb'
wandb_run_name = 'gpt2-124M-fineweb-edu-10B'

dataset = 'fineweb'  # data/fineweb/train.bin and val.bin; no meta.pkl, so vocab_size is 50304 (GPT-2's 50257 padded)

# GPT-2 small, with GPT-2's biases
n_layer = 12
n_head = 12
n_embd = 768
bias = True
dropout = 0.0
block_size = 1024

# 16 sequences * 1024 tokens * 32 micro-steps (4 a GPU on 8, 16 on 2) = 524,288 = 2**19 tokens an iteration
batch_size = 16
gradient_accumulation_steps = 32

# one pass over the 10B tokens: 19,073 iterations; 715 of warmup (375M tokens, as GPT-3), cosine down to 10%
max_iters = 19073
lr_decay_iters = 19073
warmup_iters = 715
learning_rate = 6e-4
min_lr = 6e-5
decay_lr = True
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

# val loss and HellaSwag every 250 steps, as build-nanogpt; a checkpoint at each evaluation keeps the run resumable
eval_interval = 250
eval_iters = 80  # 80 * 16 * 1024 = 1.3M tokens of each split, build-nanogpt's 20 * 64 * 1024
hellaswag_interval = 250
always_save_checkpoint = True
log_interval = 10
