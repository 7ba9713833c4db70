# a character-level GPT on Tiny Shakespeare (first: python data/shakespeare_char/prepare.py);
# about 10M parameters: minutes on one GPU. On a laptop CPU, shrink it:
# --device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12
# --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

out_dir = 'out-shakespeare-char'
eval_interval = 250  # frequent: a model this size on 1M characters starts to overfit
eval_iters = 200
log_interval = 10

# keep the checkpoint of the best val loss rather than the latest
always_save_checkpoint = False

wandb_log = False
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256  # characters of context

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3  # a small model tolerates a large step
max_iters = 5000
lr_decay_iters = 5000  # the cosine ends with the run
min_lr = 1e-4  # learning_rate / 10
beta2 = 0.99  # few tokens per iteration: average the second moment over more steps

warmup_iters = 100
