"""
Fully sharded data parallel (FSDP2, torch.distributed.fsdp.fully_shard) for train.py --fsdp=True.
Every process keeps 1/N of the parameters, gradients and optimizer states; a Block's parameters are
gathered whole just for its forward and backward (Muon's orthogonalisation gathers each matrix it steps).
The states move in and out whole, in the layout of a plain GPT and optimizer (AdamW, or optim.py's
Muon and AdamW), so ckpt.pt is the same file whether the run that wrote it was sharded or not.
"""
import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)


def shard_model(model, param_dtype=None):
    """Shard every Block, then the model itself, whose unit holds the rest: the position embeddings,
    ln_f and the wte/lm_head weight, which stays one parameter (tied). param_dtype: what forward and
    backward compute in (None: float32); the gradients are averaged across processes in float32."""
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, mp_policy=mp_policy)
    fully_shard(model, mp_policy=mp_policy)


def optimizer_parameter_names(model, optimizer):
    """The parameters' names in the order a plain optimizer numbers them in its state dict."""
    names = {p: n for n, p in model.named_parameters()}
    return [names[p] for group in optimizer.param_groups for p in group['params']]


def full_state_dicts(model, optimizer):
    """The model's and the optimizer's state dicts, whole, on the first process's CPU (the others get
    empty dicts). Every process must call it: the shards are gathered one tensor at a time."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    if hasattr(optimizer, 'muon'):  # optim.MuonAdamW: its two optimizers, each in a plain one's layout
        optimizer_state = {k: full_optimizer_state(model, getattr(optimizer, k), options) for k in ('adamw', 'muon')}
    else:
        optimizer_state = full_optimizer_state(model, optimizer, options)
    if model_state:
        model_state['lm_head.weight'] = model_state['transformer.wte.weight']  # tied: one tensor in the file, as a plain GPT saves it
    return model_state, optimizer_state


def full_optimizer_state(model, optimizer, options):
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    if not optimizer_state:
        return optimizer_state
    # torch.distributed keys the optimizer's state by parameter name; a plain optimizer numbers it
    number = {name: i for i, name in enumerate(optimizer_parameter_names(model, optimizer))}
    return {'state': {number[n]: s for n, s in optimizer_state['state'].items()},
            'param_groups': [{**{k: tuple(v) if isinstance(v, list) else v for k, v in g.items()},  # betas: lists after torch.distributed
                              'params': [number[n] for n in g['params']]} for g in optimizer_state['param_groups']]}


def load_full_optimizer_state(model, optimizer, state_dict):
    """Load a plain optimizer's state dict (every process holds it whole) into the sharded optimizer."""
    if hasattr(optimizer, 'muon'):  # optim.MuonAdamW
        for k in ('adamw', 'muon'):
            load_full_optimizer_state(model, getattr(optimizer, k), state_dict[k])
        return
    names = optimizer_parameter_names(model, optimizer)
    by_name = {'state': {names[i]: s for i, s in state_dict['state'].items()},
               'param_groups': [{**g, 'params': [names[i] for i in g['params']]} for g in state_dict['param_groups']]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
