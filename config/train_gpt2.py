# GPT-2 (124M) on OpenWebText, nanoGPT's recipe: one node of 8 A100 40GB GPUs, about 4 days to a val loss of ~2.85
# first: python data/openwebtext/prepare.py
# $ torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
# the same run with the fork's toggles: config/train_gpt2_alibi.py, config/train_gpt2_pretrained_embeddings.py

wandb_log = True
wandb_project = 'owt'
wandb_run_name = 'gpt2-124M'

# 12 sequences * 1024 tokens * 40 micro-steps (5 per GPU on 8 GPUs) = 491,520 tokens per iteration
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

# 300B tokens in all
max_iters = 600000
lr_decay_iters = 600000

eval_interval = 1000
eval_iters = 200
log_interval = 10

weight_decay = 1e-1
