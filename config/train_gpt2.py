# GPT-2 (124M) on OpenWebText, on one node of 8 A100 40GB:
# $ torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
# first: python data/openwebtext/prepare.py and python data/openwebtext/embmatrix.py

wandb_log = True
wandb_project = 'owt'
wandb_run_name = 'gpt2-124M'

# 24 sequences * 512 tokens * 40 micro-steps (5 per GPU on 8 GPUs) = 491,520 tokens per iteration,
# the batch of nanoGPT's recipe (12 * 1024 * 40)
batch_size = 24
block_size = 512
gradient_accumulation_steps = 5 * 8

# 300B tokens in all
max_iters = 600000
lr_decay_iters = 600000

eval_interval = 1000
eval_iters = 200
log_interval = 10

weight_decay = 1e-1

# this fork's recipe: ALiBi, trained at 512 tokens and evaluated at 1024; embeddings start from emb_mat.pt
flash_attn = True
alibi = True
pre_trained_embs = True
eval_block_size = 1024
