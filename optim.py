"""
The optimizer train.py steps, saves and loads. optimizer='adamw' (the default) is nanoGPT's AdamW,
model.configure_optimizers, unchanged. optimizer='muon' steps the matrices inside the Blocks (the
attention's and the MLP's weights) with Muon, PyTorch's torch.optim.Muon: each update is the momentum
made nearly orthogonal by a few Newton-Schulz iterations, so every direction of the matrix moves by a
similar amount (Keller Jordan, https://kellerjordan.github.io/posts/muon/). What Muon is not meant for
stays with AdamW, as its authors and PyTorch's docs advise: the token and position embeddings (the token
embedding is also the tied head), the biases and the LayerNorm gains.
"""
import torch

import runtime


def muon_parameter_names(model):
    """The parameters Muon steps: the 2-D weights inside the Blocks."""
    return [n for n, p in model.named_parameters() if n.startswith('transformer.h.') and p.dim() == 2]


class MuonAdamW:
    """Muon for the Blocks' matrices, AdamW for the rest, stepped, zeroed, saved and loaded as one optimizer.
    Muon's learning rate follows the same schedule as AdamW's, scaled by muon_lr / learning_rate."""

    def __init__(self, model, learning_rate, weight_decay, betas, muon_lr, muon_momentum, muon_weight_decay, fused,
                 float32_newton_schulz=False, pool=None, parts=1):
        muon_names = set(muon_parameter_names(model))
        rest = [(n, p) for n, p in model.named_parameters() if n not in muon_names]
        matrices = [p for n, p in model.named_parameters() if n in muon_names]
        self.muon = torch.optim.Muon(matrices, lr=muon_lr, momentum=muon_momentum, weight_decay=muon_weight_decay)
        # as in nanoGPT: the embeddings are decayed, biases and gains are not
        groups = [{'params': [p for _, p in rest if p.dim() >= 2], 'weight_decay': weight_decay},
                  {'params': [p for _, p in rest if p.dim() < 2], 'weight_decay': 0.0}]
        self.adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({'fused': True} if fused else {}))
        self.muon_lr_scale = muon_lr / learning_rate if learning_rate > 0 else 0.0
        self.float32_newton_schulz = float32_newton_schulz
        self.pool, self.parts = pool, parts  # cpu.split_batch's parts - 1 threads and this one share out the matrices
        print(f"Muon: {len(matrices)} matrices with {sum(p.numel() for p in matrices):,} parameters; AdamW: "
              f"{len(rest)} tensors (embeddings, biases, gains) with {sum(p.numel() for _, p in rest):,}")

    @property
    def param_groups(self):  # all of them, e.g. for GradScaler.unscale_
        return self.adamw.param_groups + self.muon.param_groups

    def step(self):
        self.adamw.step()
        in_parts = self.parts > 1 and hasattr(torch.optim._muon, '_single_tensor_muon')  # torch's step of some matrices
        muon_step = self.muon_step_in_parts if in_parts else self.muon.step
        if self.float32_newton_schulz and hasattr(torch.optim._muon, '_zeropower_via_newtonschulz'):
            bfloat16_iterations = torch.optim._muon._zeropower_via_newtonschulz
            torch.optim._muon._zeropower_via_newtonschulz = newton_schulz_in_float32
            try:
                muon_step()
            finally:
                torch.optim._muon._zeropower_via_newtonschulz = bfloat16_iterations
        else:
            muon_step()

    def muon_step_in_parts(self):
        """torch.optim.Muon's step, its matrices shared out among this thread and the pool's: each matrix's update
        (momentum, Newton-Schulz, weight) is its own, so the result is Muon.step's on one thread, bit for bit."""
        for group in self.muon.param_groups:
            params, grads, buffers = [], [], []
            self.muon._init_group(group, params, grads, buffers)  # the parameters with gradients, their momenta
            settings = {k: group[k] for k in ('lr', 'weight_decay', 'momentum', 'nesterov', 'ns_coefficients',
                                              'ns_steps', 'eps', 'adjust_lr_fn')}
            shares, load = [[] for _ in range(self.parts)], [0] * self.parts
            for i in sorted(range(len(params)), key=lambda i: -params[i].numel()):  # largest first, to the least loaded
                least = load.index(min(load))
                shares[least].append(i)
                load[least] += params[i].numel()

            def update(share):
                with torch.no_grad():  # grad mode is each thread's own
                    torch.optim._muon._single_tensor_muon([params[i] for i in share], [grads[i] for i in share],
                                                          [buffers[i] for i in share], has_complex=False, **settings)
            others = [self.pool.submit(update, share) for share in shares[1:]]
            update(shares[0])
            for f in others:
                f.result()

    def zero_grad(self, set_to_none=True):
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {'adamw': self.adamw.state_dict(), 'muon': self.muon.state_dict()}

    def load_state_dict(self, state_dict):
        self.adamw.load_state_dict(state_dict['adamw'])
        self.muon.load_state_dict(state_dict['muon'])


def newton_schulz_in_float32(grad, ns_coefficients, ns_steps, eps):
    """torch.optim.Muon's Newton-Schulz iterations (the same coefficients, steps and transposes) in float32, for
    CPUs where torch's bfloat16 products run emulated (AVX2 only), many times slower than float32's."""
    a, b, c = ns_coefficients
    x = grad.float().T if grad.size(0) > grad.size(1) else grad.float()  # (rows <= columns)
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a x + (b G + c G^2) x
    return x.T if grad.size(0) > grad.size(1) else x


def configure_optimizer(model, config, device_type):
    """The optimizer that config['optimizer'] names, for model's parameters."""
    c = config
    if c['optimizer'] == 'adamw':
        return model.configure_optimizers(c['weight_decay'], c['learning_rate'], (c['beta1'], c['beta2']), device_type)
    return MuonAdamW(model, c['learning_rate'], c['weight_decay'], (c['beta1'], c['beta2']), c['muon_lr'],
                     c['muon_momentum'], c['muon_weight_decay'], fused=device_type in ('cuda', 'mps', 'cpu'),
                     float32_newton_schulz=device_type == 'cpu' and not runtime.cpu_bf16_fast(),
                     pool=getattr(model, 'pool', None), parts=getattr(model, 'parts', 1))  # cpu.split_batch's threads


def set_lr(optimizer, lr):
    """This iteration's learning rate from the schedule: AdamW's, and Muon's scaled from it."""
    adamw = optimizer.adamw if isinstance(optimizer, MuonAdamW) else optimizer
    for group in adamw.param_groups:
        group['lr'] = lr
    if adamw is not optimizer:
        for group in optimizer.muon.param_groups:
            group['lr'] = lr * optimizer.muon_lr_scale


def load_state(model, optimizer, scaler, checkpoint, fsdp=False):
    """On resume (checkpoint not None), the checkpoint's optimizer and grad-scaler states; under FSDP each
    process takes its shards of the optimizer's."""
    if checkpoint is None:
        return
    if fsdp:
        from fsdp import load_full_optimizer_state
        load_full_optimizer_state(model, optimizer, checkpoint['optimizer'])
    else:
        optimizer.load_state_dict(checkpoint['optimizer'])
    if checkpoint.get('scaler'):
        scaler.load_state_dict(checkpoint['scaler'])


def check_resumable(checkpoint, optimizer, ckpt_path):
    """A ValueError unless the checkpoint was trained with this optimizer (nanoGPT's have no setting: AdamW)."""
    trained_with = checkpoint.get('config', {}).get('optimizer', 'adamw')
    if trained_with != optimizer:
        raise ValueError(f"{ckpt_path} was trained with optimizer='{trained_with}', whose state cannot go on in "
                         f"optimizer='{optimizer}': resume with --optimizer={trained_with}")
