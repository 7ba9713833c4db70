"""
The loss over the vocabulary in chunks of rows (model(X, Y, chunked_loss=True); train.py's chunked_loss setting):
never holds the whole (rows, vocab) logits or their gradient.
"""
import torch
from torch.nn import functional as F


def rows_per_chunk(vocab_size, device_type):
    """Rows of chunked_cross_entropy's chunks: 32 MB of float32 logits on a CPU, 256 MB elsewhere."""
    return max(1, (2 ** 23 if device_type == 'cpu' else 2 ** 26) // vocab_size)


def loss_and_grads_by_chunks(x, weight, targets, with_grads, chunk_rows=None):
    """F.cross_entropy(x @ weight.T, targets, ignore_index=-1) over chunk_rows rows at a time and, with_grads, its
    gradients for x and weight in the same pass. The matrix products run in autocast's dtype when it is on, the
    softmax in float32, with one exp per logit. Chunks of rows_per_chunk by default, in buffers that every chunk
    reuses: on a CPU, fresh memory this large page-faults each time."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    rows = min(x.size(0), chunk_rows or rows_per_chunk(weight.size(0), device))
    with torch.autocast(device, enabled=False):
        w = weight.to(dtype)
        valid = targets != -1
        n_valid = valid.sum()
        loss = torch.zeros((), device=x.device)
        logits_buffer = torch.empty(rows, weight.size(0), device=x.device)  # float32
        # the logits, then their gradient, in dtype (float32: the same buffer, and its copies into itself do nothing)
        products = logits_buffer if dtype == torch.float32 else torch.empty(rows, weight.size(0), dtype=dtype, device=x.device)
        if with_grads:
            grad_x = torch.empty_like(x)
            grad_w = torch.zeros(weight.shape, device=x.device)
            grad_w_chunk = torch.empty(weight.shape, device=x.device)  # float32, as grad_w: a mixed-dtype += allocates
        for i in range(0, x.size(0), rows):
            xs, ts, keep = x[i:i + rows].to(dtype), targets[i:i + rows].clamp(min=0), valid[i:i + rows]
            n = len(ts)
            logits = logits_buffer[:n]
            logits.copy_(torch.mm(xs, w.t(), out=products[:n]))
            target_logits = logits.gather(1, ts[:, None]).squeeze(1)
            row_max = logits.amax(1, keepdim=True)
            exps = logits.sub_(row_max).exp_()  # the softmax times sum_exps
            sum_exps = exps.sum(1, keepdim=True)
            loss += ((row_max + sum_exps.log()).squeeze(1) - target_logits).mul_(keep).sum()
            if with_grads:
                # (softmax - one at the target) * sum_exps; each row's 1 / sum_exps goes into its scale
                exps[torch.arange(n, device=x.device), ts] -= sum_exps.squeeze(1)
                grad_logits = products[:n].copy_(exps)
                scale = (keep / n_valid)[:, None] / sum_exps  # and each row's share of the mean; 0 if ignored
                grad_x[i:i + rows] = (grad_logits @ w).float() * scale
                grad_w += grad_w_chunk.copy_(grad_logits.t() @ (xs * scale).to(dtype))
    return loss / n_valid, (grad_x if with_grads else None), (grad_w if with_grads else None)


class ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows):
        loss, grad_x, grad_w = loss_and_grads_by_chunks(x, weight, targets, with_grads=True, chunk_rows=chunk_rows)
        ctx.save_for_backward(grad_x, grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors  # made for this one backward: scaled in place, no fresh (vocab, n_embd)
        return grad_x.mul_(grad_loss), grad_w.mul_(grad_loss), None, None


def chunked_cross_entropy(x, weight, targets, chunk_rows=None):
    """F.cross_entropy(x @ weight.T, targets, ignore_index=-1), to float rounding, never holding the whole
    (rows, vocab) logits or their gradient: on a CPU, a fresh 200 MB tensor every step (GPT-2's vocabulary)
    costs more in page faults than its matrix product; on a GPU it is memory saved. The gradients are made
    in the forward pass, while each chunk's logits are at hand. Rows that fit in one chunk take torch's own
    loss, in fewer operations."""
    chunk_rows = chunk_rows or rows_per_chunk(weight.size(0), x.device.type)
    if chunk_rows >= x.size(0):
        return F.cross_entropy(F.linear(x, weight), targets, ignore_index=-1)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return ChunkedCrossEntropy.apply(x, weight, targets, chunk_rows)
    return loss_and_grads_by_chunks(x, weight, targets, with_grads=False, chunk_rows=chunk_rows)[0]
