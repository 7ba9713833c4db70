"""optim.py: --optimizer=muon steps exactly the Blocks' matrices with torch.optim.Muon, resumes exactly after a
kill -9, gives one process's figures under DDP and FSDP, and a bad setting is one line."""
import pytest
import torch

from conftest import exit_message, phrase_repo, save_tiny_run, tiny_model
from test_train import KILLED_IN_SAVE, TINY, VOCAB, iter_losses, load_ckpt, read_log, run

import optim

MUON = [*TINY, '--optimizer=muon', '--muon_lr=0.05']


@pytest.fixture
def repo(tmp_path):
    return phrase_repo(tmp_path, VOCAB)


def test_muon_steps_exactly_the_blocks_matrices_and_adamw_the_rest():
    model = tiny_model(n_layer=2, bias=True)
    matrices = [f'transformer.h.{i}.{m}.weight' for i in range(2) for m in ('attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj')]
    assert optim.muon_parameter_names(model) == matrices
    config = dict(optimizer='muon', learning_rate=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.95, muon_lr=0.02,
                  muon_momentum=0.95, muon_weight_decay=0.0)
    opt = optim.configure_optimizer(model, config, 'cpu')
    name = {p: n for n, p in model.named_parameters()}
    names = lambda groups: [[name[p] for p in g['params']] for g in groups]
    assert names(opt.muon.param_groups) == [matrices]
    decayed, not_decayed = names(opt.adamw.param_groups)
    assert decayed == ['transformer.wte.weight', 'transformer.wpe.weight']  # wte is also the tied lm_head
    assert not_decayed == [n for n, p in model.named_parameters() if p.dim() == 1]  # biases and LayerNorm gains
    assert [g['weight_decay'] for g in opt.adamw.param_groups] == [0.1, 0.0]
    optim.set_lr(opt, 5e-4)  # halfway down the schedule: Muon's rate halves too
    assert [g['lr'] for g in opt.param_groups] == [5e-4, 5e-4, 0.01]
    assert type(optim.configure_optimizer(model, {**config, 'optimizer': 'adamw'}, 'cpu')) is torch.optim.AdamW


def test_muon_resumes_exactly_after_a_kill_during_a_save(repo):
    """Killed (-9) while saving iter 10: ckpt.pt keeps iter 5, and the resume from it is the uninterrupted run."""
    run(repo, *MUON, '--max_iters=10', '--eval_interval=5', '--out_dir=straight')
    run(repo, *MUON, '--max_iters=5', '--eval_interval=5')
    killed = run(repo, *MUON, '--max_iters=10', '--eval_interval=5', '--init_from=resume', python_code=KILLED_IN_SAVE,
                 check=False)
    assert killed.returncode == -9 and 'saving checkpoint' in killed.stdout
    assert load_ckpt(repo / 'out' / 'ckpt.pt')['iter_num'] == 5
    run(repo, *MUON, '--max_iters=10', '--eval_interval=5', '--init_from=resume')
    straight, resumed = load_ckpt(repo / 'straight' / 'ckpt.pt'), load_ckpt(repo / 'out' / 'ckpt.pt')
    assert iter_losses(read_log(repo, 'out')) == iter_losses(read_log(repo, 'straight'))  # dropout is on too
    for k in straight['model']:
        assert torch.equal(resumed['model'][k], straight['model'][k]), k
    assert set(resumed['optimizer']) == {'adamw', 'muon'} and resumed['config']['optimizer'] == 'muon'
    for which in ('adamw', 'muon'):
        for i, state in straight['optimizer'][which]['state'].items():
            for name, value in state.items():
                assert torch.equal(resumed['optimizer'][which]['state'][i][name], value), (which, i, name)


def test_muon_under_ddp_and_fsdp_trains_like_one_process(repo):
    """Two processes, DDP or FSDP (stopped at iter 2 and resumed under FSDP), give one process's figures. Muon's
    Newton-Schulz iterations run in bfloat16, where the float32 roundings of summing gradients in another order show."""
    args = [*MUON, '--gradient_accumulation_steps=4', '--max_iters=4', '--eval_interval=2']
    run(repo, *args, '--out_dir=single')
    run(repo, *args, '--out_dir=ddp', torchrun=True)
    run(repo, *args, '--out_dir=fsdp', '--fsdp=True', '--max_iters=2', torchrun=True)
    run(repo, *args, '--out_dir=fsdp', '--fsdp=True', '--init_from=resume', torchrun=True)
    evals = lambda out_dir: {r['step']: r['val_loss'] for r in read_log(repo, out_dir) if 'step' in r}
    single = load_ckpt(repo / 'single' / 'ckpt.pt')
    for out_dir in ('ddp', 'fsdp'):
        assert sorted(evals(out_dir)) == [0, 2, 4] and evals(out_dir) == pytest.approx(evals('single'), rel=5e-4), out_dir
        other = load_ckpt(repo / out_dir / 'ckpt.pt')
        for k in single['model']:
            # summed in another order (DDP) or rounded in other places (FSDP, next test), the gradients' float32
            # differences go through bfloat16 Newton-Schulz products, which round at up to 5e-3 a step (next test)
            torch.testing.assert_close(other['model'][k], single['model'][k], rtol=0, atol=1e-2, msg=k)
        assert other['optimizer']['muon']['param_groups'] == single['optimizer']['muon']['param_groups'], out_dir
        for which in ('adamw', 'muon'):  # the state in the plain layout, parameter for parameter
            for i, state in single['optimizer'][which]['state'].items():
                for name, value in state.items():
                    torch.testing.assert_close(other['optimizer'][which]['state'][i][name], value, rtol=1e-2, atol=1e-3)


FSDP_MUON_STEP = """
import sys, torch, torch.distributed as dist
import optim
from model import GPT, GPTConfig
from fsdp import shard_model
dist.init_process_group('gloo')
config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=32, bias=True, dropout=0.0)
models = []
for dtype in (torch.float32, torch.float32, torch.float64):  # sharded, one process's, exact
    torch.manual_seed(0)
    models.append(GPT(config).to(dtype))
shard_model(models[0])
names = optim.muon_parameter_names(models[1])
sharded, single, exact = (dict(m.named_parameters()) for m in models)
x = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(1))  # one batch for every process
for m in models[:2]:
    m(x, x)[1].backward()
for n in names:
    exact[n].grad = single[n].grad.double()
for params in (sharded, single):
    torch.optim.Muon([params[n] for n in names], lr=0.05, weight_decay=0.0).step()
torch.Tensor.bfloat16 = lambda t: t.double()  # Muon's Newton-Schulz iterations in float64 instead
torch.optim.Muon([exact[n] for n in names], lr=0.05, weight_decay=0.0).step()
for n in names:
    w = sharded[n].full_tensor()
    if dist.get_rank() == 0:
        print(n, (w - single[n]).abs().max().item(), (single[n].double() - exact[n]).abs().max().item())
dist.barrier()
dist.destroy_process_group()  # a process that exits with gloo's threads still up can abort ('terminate called')
"""


def test_fsdp_muon_step_differs_from_one_process_by_less_than_bfloat16s_rounding(repo):
    """From the same gradients, Muon's step on FSDP's row shards (torch.distributed's DTensors gather what each
    product needs) is one process's up to rounding: the two differ by less than either differs from float64."""
    (repo / 'fsdp_muon_step.py').write_text(FSDP_MUON_STEP)
    result = run(repo, torchrun=True, script='fsdp_muon_step.py')
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith('transformer.h.')]
    assert [n for n, _, _ in rows] == [f'transformer.h.{i}.{m}.weight' for i in range(2)
                                      for m in ('attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj')]
    for name, sharded_vs_single, single_vs_exact in rows:
        assert float(sharded_vs_single) < float(single_vs_exact), name


@pytest.mark.parametrize('args, fragments', [
    (['--optimizer=sgd'], ["optimizer='sgd' is not 'adamw' (nanoGPT's) or 'muon'"]),
    (['--optimizer=muon', '--muon_lr=-0.02'], ['muon_lr=-0.02 is not a number >= 0']),
    (['--optimizer=muon', '--muon_weight_decay=-1'], ['muon_weight_decay=-1.0 is not a number >= 0']),
    (['--optimizer=muon', '--muon_momentum=1.0'], ['muon_momentum=1.0 is not in [0, 1)']),
    (['--optimizer=muon', '--muon_lr=fast'], ["muon_lr expects float (default 0.02), got str 'fast'"]),
])
def test_bad_optimizer_settings_get_a_one_line_error(repo, monkeypatch, args, fragments):
    message = exit_message(monkeypatch, repo, 'train.py', *TINY, *args)
    for fragment in fragments:
        assert fragment in message, message


def test_changing_optimizer_on_resume_is_one_line(repo, monkeypatch):
    save_tiny_run(repo / 'out' / 'ckpt.pt', tiny_model(block_size=16, vocab_size=VOCAB, n_embd=32, bias=True),
                  'tiny', nanogpt_style=True)  # nanoGPT's ckpt.pt: no optimizer setting, AdamW's state
    message = exit_message(monkeypatch, repo, 'train.py', *TINY, '--optimizer=muon', '--init_from=resume')
    assert message == ("train.py: out/ckpt.pt was trained with optimizer='adamw', whose state cannot go on in "
                       "optimizer='muon': resume with --optimizer=adamw"), message


def test_float32_newton_schulz_is_torchs_iteration_without_bfloat16s_rounding():
    """On CPUs whose bfloat16 products run emulated (AVX2 only), Muon's Newton-Schulz iterations run in float32:
    torch's own iteration (same coefficients, steps, transposes) to bfloat16's rounding, closer to float64's, and
    torch's function is back in place after each step."""
    from torch.optim import _muon
    torch.manual_seed(0)
    args = (_muon.DEFAULT_A, _muon.DEFAULT_B, _muon.DEFAULT_C), _muon.DEFAULT_NS_STEPS, 1e-7
    for shape in ((32, 96), (96, 32)):
        g = torch.randn(shape)
        ours, torchs = optim.newton_schulz_in_float32(g, *args), _muon._zeropower_via_newtonschulz(g, *args).float()
        exact = _float64_iteration(g.double(), *args)
        assert ours.dtype == torch.float32 and ours.shape == shape
        assert (ours - torchs).abs().max() < 0.05  # bfloat16's rounding, compounded over 5 iterations
        assert (ours.double() - exact).abs().max() < 1e-4 < (torchs.double() - exact).abs().max()
    model = tiny_model(n_embd=32)
    model(torch.randint(0, 50304, (2, 16)), torch.randint(0, 50304, (2, 16)))[1].backward()
    original = _muon._zeropower_via_newtonschulz
    optimizer = optim.MuonAdamW(model, 1e-3, 0.1, (0.9, 0.95), 0.02, 0.95, 0.0, fused=False, float32_newton_schulz=True)
    before = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    optimizer.step()
    assert _muon._zeropower_via_newtonschulz is original
    assert not torch.equal(model.transformer.h[0].mlp.c_fc.weight, before)


def _float64_iteration(g, ns_coefficients, ns_steps, eps):
    a, b, c = ns_coefficients
    x = g.T if g.size(0) > g.size(1) else g
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if g.size(0) > g.size(1) else x


@pytest.mark.parametrize('float32_newton_schulz', [False, True])
def test_muon_step_shared_out_over_a_split_batchs_threads_is_muons_step(float32_newton_schulz, one_thread):
    """Where cpu.split_batch splits the batch over threads, Muon's matrices are shared out among them too: over a
    few steps (momentum kept, weight decay on), the weights and momenta are torch.optim.Muon's own, bit for bit."""
    from test_cpu import split_copy
    plain = tiny_model(n_layer=2, n_embd=48).train()
    split = split_copy(plain, 3)
    config = dict(optimizer='muon', learning_rate=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.95, muon_lr=0.05,
                  muon_momentum=0.95, muon_weight_decay=0.1)
    optimizers = [optim.configure_optimizer(m, config, 'cpu') for m in (plain, split)]
    assert (optimizers[0].parts, optimizers[1].parts) == (1, 3) and optimizers[1].pool is split.pool
    for opt in optimizers:
        opt.float32_newton_schulz = float32_newton_schulz
    torch.manual_seed(0)
    for _ in range(3):  # the same gradients for both (the split's own differ by float rounding): only the steps differ
        idx = torch.randint(0, 50304, (6, 16))
        plain(idx, idx)[1].backward()
        for a, b in zip(plain.parameters(), split.parameters()):
            b.grad = a.grad.clone()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (name, a), b in zip(plain.named_parameters(), split.parameters()):
        assert torch.equal(a, b), name
    for i, state in optimizers[0].muon.state_dict()['state'].items():
        assert torch.equal(optimizers[1].muon.state_dict()['state'][i]['momentum_buffer'], state['momentum_buffer']), i
