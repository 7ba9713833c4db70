# finetune GPT-2 XL on the works of Shakespeare (first: python data/shakespeare/prepare.py)
import time

out_dir = 'out-shakespeare'
eval_interval = 5
eval_iters = 40
wandb_log = False
wandb_project = 'shakespeare'
wandb_run_name = 'ft-' + str(time.time())

dataset = 'shakespeare'
init_from = 'gpt2-xl'  # the largest GPT-2, 1558M parameters

# only save when val improves
always_save_checkpoint = False

# 1 sequence * 32 micro-steps * 1024 tokens = 32,768 tokens per iteration;
# Shakespeare has 301,966 tokens, so one epoch is ~9.2 iterations
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

# finetune at a constant, small learning rate
learning_rate = 3e-5
decay_lr = False
