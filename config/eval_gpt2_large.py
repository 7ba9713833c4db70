# evaluate OpenAI's gpt2-large on OpenWebText (first: python data/openwebtext/prepare.py)
# n_layer, n_head and n_embd come from the pretrained model
batch_size = 8
eval_iters = 500  # more batches for a better estimate
eval_only = True
wandb_log = False
init_from = 'gpt2-large'
