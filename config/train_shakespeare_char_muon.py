# config/train_shakespeare_char.py with Muon (optim.py) for the Blocks' matrices, AdamW for the rest:
# $ python train.py config/train_shakespeare_char_muon.py
# Tuned at the quick start's size (assets/notes/2026-12-04-muon.md); at this size it is not timed yet.
exec(open('config/train_shakespeare_char.py').read())  # everything else as the AdamW recipe

out_dir = 'out-shakespeare-char-muon'
wandb_run_name = 'mini-gpt-muon'
optimizer = 'muon'
muon_lr = 0.02  # Muon's peak: PyTorch's docs' example and Keller Jordan's write-up; best of 0.01-0.08 at the quick shape
muon_momentum = 0.95  # torch.optim.Muon's default, as in the write-up and modded-nanogpt
