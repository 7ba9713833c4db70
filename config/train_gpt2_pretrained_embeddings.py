# The fork's pretrained-embeddings experiment on nanoGPT's GPT-2 (124M) run: the token embeddings (tied to the
# output layer) start from data/openwebtext/pretrained_embeddings.pt instead of random ones.
# first: python data/openwebtext/prepare.py, and either of
#   python data/openwebtext/pretrained_embeddings.py --model gpt2                       (GPT-2's own embeddings)
#   python data/openwebtext/pretrained_embeddings.py --glove glove.840B.300d.txt        (word vectors, fitted to 768)
# $ torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_pretrained_embeddings.py
exec(open('config/train_gpt2.py').read())  # the same recipe, but for these

out_dir = 'out-gpt2-pretrained-embeddings'
wandb_run_name = 'gpt2-124M-pretrained-embeddings'
pretrained_embeddings = True
