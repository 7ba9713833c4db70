# a small character-level Shakespeare model: good for debugging and playing on a MacBook and such
# (on a CPU add: --device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64
#  --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0)

out_dir = 'out-shakespeare-char'
eval_interval = 250  # evaluates often: this small model overfits
eval_iters = 200
log_interval = 10

# only save when val improves, since this model overfits
always_save_checkpoint = False

wandb_log = False
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256  # context of up to 256 previous characters

# a baby GPT
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3  # baby networks can afford a higher learning rate
max_iters = 5000
lr_decay_iters = 5000  # usually the same as max_iters
min_lr = 1e-4  # usually learning_rate / 10
beta2 = 0.99  # a bit larger because there are few tokens per iteration

warmup_iters = 100  # probably not needed at this size
