"""`chunked_cross_entropy`: the output head and cross-entropy chunk by chunk over tokens, the logits never whole.

A plain language-model step keeps batch x seq x vocab logits in float32 for the loss, plus their softmax and their
gradient: with a large vocabulary they are the largest tensors of the step, and checkpointing does not touch them.
`chunked_cross_entropy` computes, for one chunk of tokens at a time, the head's logits, the loss and, already in the
forward, the gradients of the hidden states, the head weight and bias (Liger-Kernel's fused linear cross-entropy, in
plain PyTorch): only one chunk's logits are live at any time, nothing vocab-sized is kept for backward, and backward
only scales the kept gradients by the incoming gradient instead of running the head a second time.

Under torch.compile the `torch.autograd.Function` is traced whole (Dynamo's autograd_function_apply: the chunk loop
unrolled in the forward graph, the in-place scaling functionalised in the backward one), so the compiled step keeps
the same memory; the label check becomes an in-graph assertion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.autograd.function import once_differentiable

REDUCTIONS = ("mean", "sum", "none")

# ----------------------------------------------------------------------------------------------------------------
# The function


def default_chunk_size(tokens: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk when none is given: one chunk's float32 logits about the size of the hidden states
    (Liger-Kernel's rule: tokens / ceil(vocab / hidden), rounded up to a power of two), and at least 256 tokens so that
    the matmuls stay large enough to run at full speed. Integer comparisons only: under torch.compile with a dynamic
    token count this guards the power-of-two bucket, not the count itself."""
    per = -(-tokens // max(1, -(-vocab // hidden)))  # ceil(tokens / ceil(vocab / hidden))
    size = 256
    while size < per:
        size *= 2
    return size


def _spans(tokens: int, chunk: int) -> list[tuple[int, int]]:
    """(start, end) of each chunk of tokens. Under torch.compile with a dynamic token count the loop (unrolled in
    the graph) guards the number of chunks only, so every count of tokens with that many chunks reuses the graph."""
    spans = []
    for j in range(-(-tokens // chunk)):
        start = j * chunk
        spans.append((start, torch.sym_min(start + chunk, tokens)))
    return spans


@dataclass(frozen=True)
class _Options:
    ignore_index: int
    label_smoothing: float
    softcap: float | None
    chunk_size: int
    reduction: str
    dtype: torch.dtype  # the head's matmul dtype (autocast's where it was on, else the weight's)


def _chunk(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, opts: _Options,
    row_scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Loss per token of one chunk, and (if `row_scale` is given) d(sum of row_scale * loss)/d(logits).

    h (C, H) and weight (V, H) in one compute dtype; y (C,) int64; row_scale (C,) float32.
    Returns (loss (C,) float32, grad_logits (C, V) float32 or None). The softmax and the gradient are written over
    the logits: one (C, V) float32 buffer (two with soft-capping)."""
    logits = torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()  # (C, V) compute dtype
    z = logits.float()  # (C, V) float32; the same storage when the compute dtype is float32
    del logits
    capped = None
    if opts.softcap is not None:
        capped = z.div_(opts.softcap).tanh_()  # (C, V), kept for d tanh = 1 - tanh^2
        z = capped * opts.softcap
    valid = y != opts.ignore_index
    target = torch.where(valid, y, 0).unsqueeze(1)  # (C, 1)
    eps, vocab = opts.label_smoothing, z.shape[1]
    z_target = z.gather(1, target)  # (C, 1)
    z_mean = z.mean(dim=-1, keepdim=True) if eps else None
    z_max = z.amax(dim=-1, keepdim=True)  # (C, 1)
    exp_sum = z.sub_(z_max).exp_().sum(dim=-1, keepdim=True)  # z now holds exp(z - max): (C, V)
    lse = z_max + exp_sum.log()  # (C, 1)
    loss = lse - z_target
    if eps:
        loss = (1 - eps) * loss + eps * (lse - z_mean)
    loss = torch.where(valid, loss.squeeze(1), 0.0)  # (C,)
    if row_scale is None:
        return loss, None
    # d loss / d z = softmax - (1 - eps) * onehot - eps / V, times the row's scale (0 for ignored tokens).
    scale = torch.where(valid, row_scale, 0.0).unsqueeze(1)  # (C, 1)
    grad = z.mul_(scale / exp_sum)
    if eps:
        grad.sub_(scale * (eps / vocab))
    grad.scatter_add_(1, target, scale * -(1 - eps))
    if capped is not None:
        grad.mul_(capped.square_().neg_().add_(1))  # d(cap * tanh(x / cap))/dx = 1 - tanh^2
    return loss, grad


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's where it is on (as F.linear would run), else the weight's."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def _loss_only(hidden, weight, bias, labels, scale, opts) -> torch.Tensor:
    """Forward without gradients: (N,) losses for reduction='none', else the reduced scalar."""
    dtype = opts.dtype
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        losses = [_chunk(hidden[i:j].to(dtype), w, b, labels[i:j], opts, None)[0]
                  for i, j in _spans(hidden.shape[0], opts.chunk_size)]
    loss = torch.cat(losses) if losses else hidden.new_zeros(0, dtype=torch.float32)
    return loss if opts.reduction == "none" else loss.sum() * scale


class _ChunkedCrossEntropy(torch.autograd.Function):
    """hidden (N, H), weight (V, H), bias (V,) or None, labels (N,), scale: 0-dim float32 (1 / denominator).

    reduction 'mean'/'sum': the gradients are computed chunk by chunk in forward and kept (N x H, V x H, V), backward
    multiplies them by the incoming gradient. reduction 'none': the incoming gradient differs per token, so backward
    recomputes each chunk's logits (one more head forward) from the kept hidden states and weight."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, scale, opts: _Options):
        ctx.opts = opts
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        if opts.reduction == "none":
            ctx.save_for_backward(hidden, weight, bias, labels)
            return _loss_only(hidden, weight, bias, labels, scale, opts)
        ctx.used = False
        loss, grads = _forward_with_grads(hidden, weight, bias, labels, scale, opts, need_h, need_w, need_b)
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        opts = ctx.opts
        if opts.reduction == "none":
            hidden, weight, bias, labels = ctx.saved_tensors
            needs = ctx.needs_input_grad
            grads = _grads_per_token(hidden, weight, bias, labels, grad_out, opts, needs[0], needs[1],
                                     bias is not None and needs[2])
            return (*grads, None, None, None)
        if ctx.used:
            raise RuntimeError(
                "backward through memopt.chunked_cross_entropy ran twice (retain_graph=True): its gradients are "
                "computed in the forward and scaled in place by the first backward; recompute the loss for each backward"
            )
        ctx.used = True
        grads = ctx.saved_tensors
        for g in grads:
            if g is not None:
                g.mul_(grad_out.to(g.dtype))  # in place: these buffers are this backward's results
        return (*grads, None, None, None)


def _forward_with_grads(hidden, weight, bias, labels, scale, opts, need_h, need_w, need_b):
    """Loss and the gradients of (hidden, weight, bias) for a unit incoming gradient, chunk by chunk; None for those
    not needed."""
    dtype = opts.dtype
    w = weight.to(dtype)  # a (V, H) copy only under autocast or for a hidden/weight dtype mismatch
    b = None if bias is None else bias.to(dtype)
    grad_h = torch.empty_like(hidden) if need_h else None  # (N, H)
    # The weight's gradient sums over every chunk: accumulated in float32 even for a half-precision weight.
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    row_scale = scale.to(torch.float32).expand(torch.sym_min(opts.chunk_size, hidden.shape[0]))
    with torch.autocast(hidden.device.type, enabled=False):
        for i, j in _spans(hidden.shape[0], opts.chunk_size):
            h = hidden[i:j].to(dtype)  # (C, H)
            loss, g = _chunk(h, w, b, labels[i:j], opts, row_scale[: j - i])
            total += loss.sum()
            if need_b:
                grad_b += g.sum(0)
            g = g.to(dtype)  # (C, V): the head's backward runs in its forward dtype, as F.linear's would
            if need_h:
                grad_h[i:j] = g @ w  # (C, H)
            if need_w:
                if dtype == torch.float32:
                    grad_w.addmm_(g.t(), h)  # (V, H) += (V, C) @ (C, H)
                else:
                    grad_w += g.t() @ h
            del g
    grad_w = grad_w.to(weight.dtype) if need_w else None
    grad_b = grad_b.to(bias.dtype) if need_b else None
    return total * scale, (grad_h, grad_w, grad_b)


def _grads_per_token(hidden, weight, bias, labels, grad_out, opts, need_h, need_w, need_b):
    """reduction='none' backward: each chunk's logits again, weighted by its tokens' incoming gradients (in the
    forward's matmul dtype: backward runs outside autocast)."""
    dtype = opts.dtype
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
    for i, j in _spans(hidden.shape[0], opts.chunk_size):
        h = hidden[i:j].to(dtype)
        _, g = _chunk(h, w, b, labels[i:j], opts, grad_out[i:j].float())
        if need_b:
            grad_b += g.sum(0)
        g = g.to(dtype)
        if need_h:
            grad_h[i:j] = g @ w
        if need_w:
            grad_w += (g.t() @ h).float()
    return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype))


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(softcap(hidden @ weight.T + bias), labels)`` without the (tokens x vocab) logits.

    The tokens are processed `chunk_size` at a time: each chunk's logits (float32), its loss and, in a training
    forward, its share of the gradients of `hidden`, `weight` and `bias`, which are kept until backward. Gradients
    are only computed for the inputs that require them (a frozen head weight costs no (vocab x hidden) buffer).

    Memory: one chunk's logits (a few x chunk_size x vocab x 4 bytes) instead of tokens x vocab x 4 bytes several
    times over; kept for backward: hidden's gradient (tokens x hidden, hidden's dtype) and, for a trainable weight,
    its gradient (vocab x hidden x 4 bytes: accumulated in float32, even for a half-precision weight). Time: the head's
    three matmuls, all in the forward; backward only scales the kept gradients. A forward that is never backpropagated
    still pays the two gradient matmuls; under `torch.no_grad()` or with nothing requiring grad only the loss is
    computed. ``reduction="none"`` keeps `hidden` and `weight` instead and recomputes each chunk's logits in backward.

    Args:
        hidden: (..., hidden) the head's input.
        weight: (vocab, hidden) the head's weight (tied to the input embedding or not).
        labels: (...) int64 class indices, shaped as `hidden` without its last dimension; already aligned with the
            positions (shift them yourself for next-token prediction).
        bias: (vocab,) the head's bias, if it has one.
        ignore_index: labels with this value add no loss and no gradient. Any other label outside [0, vocab)
            raises a ValueError naming it (checked with one reduction over the labels; a host sync on CUDA in eager,
            an in-graph assertion under torch.compile).
        reduction: ``"mean"`` (over the labels that are not `ignore_index`), ``"sum"`` or ``"none"`` (per token).
        num_items_in_batch: transformers' gradient-accumulation denominator: the loss is the sum divided by it
            (overrides `reduction`'s mean).
        label_smoothing: as in `F.cross_entropy`.
        softcap: ``softcap * tanh(logits / softcap)`` before the softmax (Gemma 2's final_logit_softcapping).
        chunk_size: tokens per chunk; None: `default_chunk_size`.

    Returns:
        The loss in float32: a scalar, or (...) per token for ``reduction="none"``.

    Raises:
        ValueError / TypeError: shapes or options that do not fit, naming them; a label outside [0, vocab) that is
            not `ignore_index`.
    """
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("chunked_cross_entropy expects tensors hidden (..., hidden), weight (vocab, hidden) and "
                        f"labels (...); got {type(hidden).__name__}, {type(weight).__name__}, {type(labels).__name__}")
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"chunked_cross_entropy: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} do not "
                         "fit; weight must be (vocab, hidden) with hidden = hidden.shape[-1], as nn.Linear's weight")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"chunked_cross_entropy: labels {tuple(labels.shape)} must have hidden's shape without its "
                         f"last dimension, {tuple(hidden.shape[:-1])}")
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"chunked_cross_entropy: labels must be integer class indices, got {labels.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"chunked_cross_entropy: bias {tuple(bias.shape)} must be (vocab,) = ({weight.shape[0]},)")
    if reduction not in REDUCTIONS:
        raise ValueError(f"chunked_cross_entropy(reduction={reduction!r}) is not supported; use one of {REDUCTIONS}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunked_cross_entropy(chunk_size={chunk_size!r}) must be a positive int or None")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"chunked_cross_entropy(label_smoothing={label_smoothing!r}) must be in [0, 1]")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"chunked_cross_entropy(softcap={softcap!r}) must be positive or None")
    if num_items_in_batch is not None and reduction == "none":
        raise ValueError("chunked_cross_entropy: num_items_in_batch divides the summed loss; it cannot be combined "
                         "with reduction='none' (divide the per-token losses yourself)")

    return _chunked(hidden, weight, labels, bias, ignore_index, reduction, num_items_in_batch, label_smoothing,
                    softcap, chunk_size, compute_dtype(hidden, weight))


def _chunked(hidden, weight, labels, bias, ignore_index, reduction, num_items_in_batch, label_smoothing, softcap,
             chunk_size, dtype) -> torch.Tensor:
    """`chunked_cross_entropy` on checked arguments, its head matmuls in `dtype` (the loss-patched head passes the
    dtype its call ran in)."""
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    y = labels.reshape(-1).to(h.device, torch.long)  # (N,)
    tokens = h.shape[0]
    _check_labels(y, weight.shape[0], ignore_index)
    opts = _Options(ignore_index, float(label_smoothing), None if softcap is None else float(softcap),
                    chunk_size or default_chunk_size(tokens, weight.shape[1], weight.shape[0]), reduction, dtype)
    if num_items_in_batch is not None:
        denominator = torch.as_tensor(num_items_in_batch, device=h.device).float()
    elif reduction == "mean":
        denominator = (y != ignore_index).sum().float()
    else:
        denominator = torch.ones((), device=h.device)
    scale = denominator.reciprocal()
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        loss = _ChunkedCrossEntropy.apply(h, weight, bias, y, scale, opts)
    else:
        loss = _loss_only(h, weight, bias, y, scale, opts)
    return loss.reshape(lead) if reduction == "none" else loss


def _check_labels(y: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """A label outside [0, vocab) that is not `ignore_index` (padding with -1 while ignore_index is -100, nanoGPT's
    case) raises naming the fix, instead of an index-out-of-bounds error deep in a gather. Eager: one reduction over
    the labels and its value read back (a host sync on CUDA). Under torch.compile: an in-graph assertion, no sync (on
    CUDA a failure then shows as a device-side assert). Fake tensors (memopt.estimate) have no values to check."""
    bad = (y != ignore_index) & ((y < 0) | (y >= vocab))  # (N,)
    if torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), _labels_message(vocab, ignore_index, None))
    elif not is_fake(y) and bool(bad.any()):
        raise ValueError(_labels_message(vocab, ignore_index, int(y[bad][0])))


def _labels_message(vocab: int, ignore_index: int, found: int | None) -> str:
    what = "a label" if found is None else f"label {found}"
    return (f"chunked_cross_entropy: {what} outside [0, vocab={vocab}) that is not ignore_index={ignore_index}; pass "
            "the value your padding uses as ignore_index (nanoGPT pads with -1: ignore_index=-1; for a transformers "
            "model's loss='chunked': memopt.LossConfig(ignore_index=-1))")
