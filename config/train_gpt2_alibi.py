# The fork's ALiBi experiment on nanoGPT's GPT-2 (124M) run: no position embeddings, trained on windows of 512
# tokens and evaluated on 1024 (eval_block_size), twice what it saw; then eval_length.py scores longer contexts.
# first: python data/openwebtext/prepare.py
# $ torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_alibi.py
exec(open('config/train_gpt2.py').read())  # the same recipe, but for these

out_dir = 'out-gpt2-alibi'
wandb_run_name = 'gpt2-124M-alibi'
alibi = True
block_size = 512
batch_size = 24  # 24 * 512 tokens: the same 491,520 tokens per iteration
eval_block_size = 1024
