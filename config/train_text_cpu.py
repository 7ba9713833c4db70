# A small GPT on your own text, in minutes on a laptop CPU (first: python data/text/prepare.py book.txt)
# $ python train.py config/train_text_cpu.py
# GPT-2's defaults (40 micro-steps per iteration, 2000 warmup iterations, 200 eval batches) hardly move on a CPU:
# here every iteration is one small batch and the schedule fits a few hundred iterations.

out_dir = 'out-text'
dataset = 'text'
device = 'cpu'
compile = False

eval_interval = 50
eval_iters = 10
log_interval = 10

gradient_accumulation_steps = 1
batch_size = 8
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0

learning_rate = 1e-3  # a small model tolerates a large step
max_iters = 300
lr_decay_iters = 300  # the cosine ends with the run
min_lr = 1e-4
beta2 = 0.99  # few tokens per iteration: average the second moment over more steps
warmup_iters = 20
