"""How train.py is started outside the happy path (issue 28): from another directory, on two nodes, and with
Weights & Biases offline or without a login; real processes each."""
import glob
import os
import pickle
import socket
import subprocess
import sys

import pytest
import torch

from conftest import phrase_repo, run_script

VOCAB = 32
TINY = ['--device=cpu', '--compile=False', '--dtype=float32', '--dataset=tiny', '--out_dir=out',
        '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=16', '--batch_size=4', '--bias=True',
        '--gradient_accumulation_steps=2', '--eval_iters=2', '--log_interval=1', '--learning_rate=1e-2',
        '--warmup_iters=2', '--lr_decay_iters=40', '--dropout=0.1']


def load(path):
    return torch.load(path, weights_only=True)


def wandb_runs(cwd):
    """The offline runs wandb wrote under cwd/wandb/: their run ids, one per wandb.init, in order."""
    return [os.path.basename(d).rsplit('-', 1)[1] for d in sorted(glob.glob(os.path.join(cwd, 'wandb', 'offline-run-*')))]


@pytest.mark.slow
def test_a_resumed_run_logs_on_to_the_same_wandb_run(tmp_path):
    repo = phrase_repo(tmp_path, VOCAB)
    env = {'WANDB_MODE': 'offline'}
    run_script(repo, 'train.py', *TINY, '--wandb_log=True', '--max_iters=2', '--eval_interval=2', env=env, check=True)
    first = load(repo / 'out' / 'ckpt.pt')['wandb_run_id']
    assert wandb_runs(repo) == [first]
    run_script(repo, 'train.py', *TINY, '--wandb_log=True', '--max_iters=4', '--eval_interval=2', '--init_from=resume',
               env=env, check=True)
    assert wandb_runs(repo) == [first, first]  # the second wandb.init continued the first run's id
    assert os.path.isfile(glob.glob(str(repo / 'wandb' / 'offline-run-*'))[-1] + f'/run-{first}.wandb')
    assert load(repo / 'out' / 'ckpt.pt')['wandb_run_id'] == first


@pytest.mark.slow
def test_wandb_without_a_login_logs_offline_and_says_where(tmp_path):
    repo = phrase_repo(tmp_path / 'repo', VOCAB)
    # online mode, no API key anywhere (an empty home, no WANDB_API_KEY): wandb refuses to start online
    env = {'WANDB_MODE': 'online', 'HOME': str(tmp_path / 'home'), 'WANDB_CONFIG_DIR': str(tmp_path / 'home')}
    result = run_script(repo, 'train.py', *TINY, '--wandb_log=True', '--max_iters=2', '--eval_interval=2', env=env,
                        check=True)
    line = [l for l in result.stdout.splitlines() if l.startswith('wandb: ')]
    assert len(line) == 1 and 'logging offline to ' in line[0] and 'wandb sync ' in line[0], result.stdout[-2000:]
    where = line[0].rsplit('wandb sync ', 1)[1]
    run_id = load(repo / 'out' / 'ckpt.pt')['wandb_run_id']
    assert os.path.isfile(os.path.join(repo, where, f'run-{run_id}.wandb'))


@pytest.mark.slow
def test_train_and_sample_run_from_another_directory(tmp_path):
    """python /path/to/repo/train.py, as Slurm scripts start it: the config file and out_dir are the caller's
    (relative to the current directory), the data the repository's own data/<dataset>."""
    repo = phrase_repo(tmp_path / 'repo', VOCAB)
    chars = 'abcdefghijklmnopqrstuvwxyz .,;!?'
    with open(repo / 'data' / 'tiny' / 'meta.pkl', 'wb') as f:  # characters, for sample.py to decode
        pickle.dump({'vocab_size': VOCAB, 'itos': dict(enumerate(chars)), 'stoi': {c: i for i, c in enumerate(chars)}}, f)
    job = tmp_path / 'job'
    job.mkdir()
    (job / 'my_config.py').write_text("max_iters = 2\neval_interval = 2\nout_dir = 'out-job'\n")
    run_script(job, repo / 'train.py', 'my_config.py', *[a for a in TINY if not a.startswith('--out_dir')], check=True)
    assert os.path.isfile(job / 'out-job' / 'ckpt.pt') and not os.path.exists(repo / 'out-job')
    result = run_script(job, repo / 'sample.py', '--out_dir=out-job', '--device=cpu', '--num_samples=1',
                        '--max_new_tokens=5', '--start=FILE:prompt.txt')
    assert result.returncode == 1 and result.stderr.strip().endswith('sample.py: no prompt file prompt.txt')
    (job / 'prompt.txt').write_text('to be')  # found where the caller is
    result = run_script(job, repo / 'sample.py', '--out_dir=out-job', '--device=cpu', '--num_samples=1',
                        '--max_new_tokens=5', '--start=FILE:prompt.txt', check=True)
    assert f"Loading meta from {repo / 'data' / 'tiny' / 'meta.pkl'}" in result.stdout and '\nto be' in result.stdout


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_train_exactly_as_one_process(tmp_path):
    """README's two-machine launch, both nodes on this machine (one process each, gloo): the same losses and
    weights as one process with the same global batch."""
    repo = phrase_repo(tmp_path, VOCAB)
    args = [*TINY, '--gradient_accumulation_steps=4', '--max_iters=4', '--eval_interval=4']
    port, env = free_port(), {**os.environ, 'OMP_NUM_THREADS': '1'}
    nodes = [subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', f'--node_rank={rank}',
                               '--nproc_per_node=1', '--master_addr=127.0.0.1', f'--master_port={port}', 'train.py',
                               *args, '--out_dir=two_nodes'], cwd=repo, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, out[-2000:] + err[-3000:]
    run_script(repo, 'train.py', *args, '--out_dir=one', check=True)
    two, one = load(repo / 'two_nodes' / 'ckpt.pt'), load(repo / 'one' / 'ckpt.pt')
    assert two['iter_num'] == one['iter_num'] == 4
    for k in one['model']:
        torch.testing.assert_close(two['model'][k], one['model'][k], rtol=1e-4, atol=1e-5, msg=k)
    assert two['best_val_loss'] == pytest.approx(one['best_val_loss'], abs=1e-5)
    assert 'tokens per iteration will be: 256' in outputs[0][0]  # 4 micro-steps of 4 x 16 in all, 2 on each node
