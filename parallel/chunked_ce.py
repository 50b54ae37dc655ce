"""Linear + cross-entropy over token chunks: the [tokens, vocab] logits are never materialised whole.

The plain token loss runs lm_head on every position and keeps [tokens, vocab] logits (plus their fp32
copy and its gradient) alive until backward: 8 x 2048 x 128k x 4 B = 8.6 GB at a 128k vocabulary. Here
the decoder's hidden states of the label positions only go through `ChunkedLinearCE`, which computes
each chunk's logits and drops them. The gradients of the hidden states and of the head weight come from
the same chunk's logits in forward (the default: no second head matmul) or from logits recomputed in
backward (recompute=True). The value is the same summed cross-entropy as parallel.trainer.summed_ce (fp32
softmax of logits in the compute dtype).

Under a vocab-parallel head each tp rank holds a slice of the vocabulary: the softmax's max, sum and the
target logit are all-reduced over the tp group per chunk, and the hidden states' gradient (a partial sum
over the vocabulary) is all-reduced in backward.

The trainer computes it inside the model's own forward (`loss_in_forward`), so it runs unchanged under
FSDP2 (ZeRO-2/3), where lm_head is in the root module's parameter group: see that function.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from parallel.distributed.pipeline import find_decoder

IGNORE_INDEX = -100
# Config attributes of families whose logits are not the plain head projection.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def logits_transformed(name: str, value) -> bool:
    """Whether config attribute `name` (one of _LOGIT_TRANSFORMS) at `value` changes the head's logits:
    a scale of 1 does not, any soft-capping does (tanh(x / 1) is not x)."""
    if name.endswith("softcapping"):
        return value is not None
    return value not in (None, 1, 1.0)


def auto_chunk_tokens(num_tokens: int, hidden: int, vocab: int) -> int:
    """A chunk whose logits are about the size of the hidden states it comes from, at least 1024 tokens (the
    head's matmuls stay large: 1024 x 128k fp32 logits are 0.5 GB, against 8.6 GB for 8 x 2048 tokens)."""
    target = max(1024, -(-num_tokens * hidden // vocab))
    return 1 << (target - 1).bit_length()


def why_not_chunked(model: nn.Module) -> str | None:
    """Why the token loss of `model` cannot be computed from its hidden states and head weight (None: it can)."""
    _, decoder, head_path, head = find_decoder(model)
    if type(head) is not nn.Linear:
        return f"its head is a {type(head).__name__} (adapters or a wrapper on lm_head)"
    if head.bias is not None:
        return "its head has a bias"
    if head.out_features != decoder.config.vocab_size:
        return "its head is not a vocabulary projection"
    owner = model.get_submodule(head_path.rpartition(".")[0])
    if "logits_to_keep" not in inspect.signature(owner.forward).parameters:
        return f"{type(owner).__name__}.forward takes no logits_to_keep"
    for name in _LOGIT_TRANSFORMS:
        value = getattr(decoder.config, name, None)
        if logits_transformed(name, value):
            return f"its logits are transformed ({name}={value})"
    return None


class ChunkedLinearCE(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight^T, target_i) over rows of hidden [n, h] with targets [n] (none ignored),
        chunk rows at a time. weight [v, h] is this rank's vocabulary slice when `group` is a tp group
        (vocab_start: its first token id); the result is then the full loss on every rank of the group.

        recompute: backward recomputes each chunk's logits (a second head matmul; forward keeps one
        log-sum-exp per row). Otherwise forward, which has each chunk's logits at hand, also computes the
        unscaled gradients and backward only scales them: the same peak memory (the head's gradients are the
        first ones backward allocates anyway, while every activation is still held) and one head matmul fewer:
    the plain loss's three."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, group, vocab_start, recompute):
        ctx.chunk, ctx.group, ctx.vocab_start, ctx.recompute = chunk, group, vocab_start, recompute
        ctx.dtypes, ctx.used = (hidden.dtype, weight.dtype), False
        grads = not recompute and (hidden.requires_grad or weight.requires_grad)
        grad_hidden, grad_weight = _zero_grads(hidden, weight) if grads else (None, None)
        # fused: one log_softmax pass per chunk (no lse kept); each row's loss is summed once at the end,
        # like cross_entropy's, in `per_row`, which otherwise keeps each row's log-sum-exp for backward.
        fused = grads and group is None
        per_row = lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = (hidden[rows] @ weight.t()).float()
            if fused:
                # One pass (log_softmax) instead of logsumexp's max, subtract, exp and sum passes over the
                # chunk; its exp is the softmax the gradient needs.
                log_probs = torch.log_softmax(logits, dim=1)
                del logits
                per_row[rows] = -log_probs.gather(1, targets[rows][:, None]).squeeze(1)
                _add_chunk_grads(ctx, log_probs, targets[rows], hidden, weight, rows, grad_hidden, grad_weight)
                continue
            chunk_lse, target_logit = _lse_and_target(logits, targets[rows], group, vocab_start)
            lse[rows] = chunk_lse
            total += (chunk_lse - target_logit).sum()
            if grads:
                log_probs = logits.sub_(chunk_lse[:, None])  # in place: the chunk's logits are not needed again
                _add_chunk_grads(ctx, log_probs, targets[rows], hidden, weight, rows, grad_hidden, grad_weight)
        if fused:
            total = per_row.sum()
        if grads:
            ctx.save_for_backward(grad_hidden, grad_weight)
        else:
            ctx.save_for_backward(hidden, weight, targets, lse)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        if ctx.recompute:
            hidden, weight, targets, lse = ctx.saved_tensors
            grad_hidden, grad_weight = _zero_grads(hidden, weight)
            for start in range(0, hidden.shape[0], ctx.chunk):
                rows = slice(start, start + ctx.chunk)
                log_probs = (hidden[rows] @ weight.t()).float().sub_(lse[rows, None])
                _add_chunk_grads(ctx, log_probs, targets[rows], hidden, weight, rows, grad_hidden, grad_weight)
        else:
            if ctx.used:
                raise RuntimeError("ChunkedLinearCE: backward through the same forward twice (retain_graph)")
            ctx.used = True
            grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        if grad_hidden is not None:  # in place: no second fp32 copy at the start of backward
            grad_hidden = grad_hidden.mul_(grad_total)
            if ctx.group is not None:  # each rank's vocabulary slice gave a partial sum
                dist.all_reduce(grad_hidden, group=ctx.group)
            grad_hidden = grad_hidden.to(hidden_dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_total).to(weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def _zero_grads(hidden, weight):
    """fp32 buffers for the gradients of hidden (rows written once) and weight (summed over chunks); None
    for one that needs none (a frozen head under LoRA)."""
    return tuple(
        torch.zeros(t.shape, dtype=torch.float32, device=t.device) if t.requires_grad else None
        for t in (hidden, weight)
    )


def _add_chunk_grads(ctx, log_probs, targets, hidden, weight, rows, grad_hidden, grad_weight):
    """d CE / d logits = softmax - one_hot(target) from a chunk's log-probs (overwritten), through the
    head's matmuls in the compute dtype."""
    grad_logits = log_probs.exp_()
    local = targets - ctx.vocab_start
    mine = (local >= 0) & (local < weight.shape[0])
    grad_logits[mine.nonzero().squeeze(1), local[mine]] -= 1.0
    grad_logits = grad_logits.to(hidden.dtype)
    fp32 = hidden.dtype == torch.float32  # straight into the fp32 buffers: no temporaries per chunk
    if grad_hidden is not None:
        if fp32:
            torch.mm(grad_logits, weight, out=grad_hidden[rows])
        else:
            grad_hidden[rows] = grad_logits @ weight
    if grad_weight is not None:
        if fp32:
            grad_weight.addmm_(grad_logits.t(), hidden[rows])
        else:
            grad_weight += grad_logits.t() @ hidden[rows]


def _lse_and_target(logits, targets, group, vocab_start):
    """Per-row log-sum-exp of the (vocab-sharded over `group`) logits and each row's target logit, in fp32."""
    if group is None:
        return torch.logsumexp(logits, dim=1), logits.gather(1, targets[:, None]).squeeze(1)
    top = logits.max(dim=1).values
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    sum_exp = torch.exp(logits - top[:, None]).sum(dim=1)
    dist.all_reduce(sum_exp, group=group)
    local = targets - vocab_start
    mine = (local >= 0) & (local < logits.shape[1])
    target_logit = torch.where(mine, logits.gather(1, local.clamp(0, logits.shape[1] - 1)[:, None]).squeeze(1), 0.0)
    dist.all_reduce(target_logit, group=group)
    return top + torch.log(sum_exp), target_logit


def chunked_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int | None = None,
    *,
    recompute: bool = False,
):
    """Summed next-token cross-entropy of hidden states [rows, seq, h] through a head weight [vocab, h]
    (a vocab-sharded DTensor under a vocab-parallel head) against labels [rows, seq]: the value of
    summed_ce(hidden @ weight^T, labels). Under autocast the matmuls run in its dtype, like lm_head's.
    chunk_tokens: None picks auto_chunk_tokens. recompute: see ChunkedLinearCE."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    hidden = hidden[:, :-1][keep]  # only label positions: the others have no loss and no gradient
    targets = targets[keep]
    group, vocab_start = None, 0
    if isinstance(weight, DTensor):
        mesh = weight.device_mesh
        group = mesh.get_group()
        vocab_start = mesh.get_local_rank() * (weight.shape[0] // mesh.size())
        weight = weight.to_local()
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    chunk = chunk_tokens or auto_chunk_tokens(hidden.shape[0], hidden.shape[1], weight.shape[0] * _size(group))
    with torch.autocast(device, enabled=False):
        return ChunkedLinearCE.apply(hidden, weight, targets, chunk, group, vocab_start, recompute)


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


@contextmanager
def loss_in_forward(model: nn.Module, labels: torch.Tensor, chunk_tokens: int | None, hidden_fn=None):
    """Within it, `model(**inputs, logits_to_keep=1)` returns the summed token loss of `labels` (chunked_ce
    of the decoder's output and lm_head's weight) instead of its output. hidden_fn: applied to the
    decoder's output first (the trainer gathers a sequence-parallel slice with it).

    Why inside the forward: under FSDP2 lm_head sits in the root module's parameter group (with the
    embedding and the final norm). FSDP's pre-forward hook gathers that group once; the loss hook is
    registered in front of FSDP's post-forward hook, so the chunks use the gathered weight before ZeRO-3
    reshards it. The chunks' head gradient (computed in forward, so backward needs no weight) is
    accumulated in backward into the gathered parameter's .grad, which FSDP's root post-backward
    reduce-scatters with the rest of the group, as it does the plain loss's. The loss is the root's
    output, so FSDP's pre-backward hook on it gathers the group again (ZeRO-3) before the final norm's
    backward. Outside the forward (FSDPModule.unshard()/reshard() around the call) the group would be
    gathered twice per micro-batch and nothing would gather it for backward. logits_to_keep=1: the
    head's own forward projects one position per row, whose logits are dropped."""
    _, decoder, _, head = find_decoder(model)
    kept = {}

    def keep(module, args, output):
        kept["hidden"] = output.last_hidden_state

    def loss(module, args, output):
        hidden = kept.pop("hidden")
        hidden = hidden_fn(hidden) if hidden_fn is not None else hidden
        return chunked_ce(hidden[:, : labels.shape[1]], head.weight, labels, chunk_tokens)

    handles = [decoder.register_forward_hook(keep), model.register_forward_hook(loss, prepend=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def chunk_stage_loss(stage: nn.Module, chunk_tokens: int | None, hidden_fn=None) -> None:
    """Hooks on a pipeline stage module (parallel.distributed.pipeline.StageModule) for the life of the
    trainer: a `labels` keyword (the schedule splits it into micro-batches like the inputs) is taken off
    every stage's forward; on the last stage the forward then returns the micro-batch's summed token loss
    (chunked_ce of the final norm's output and lm_head's weight) instead of its logits, and lm_head
    projects one position per row. Computed inside the stage's forward for the reasons of
    loss_in_forward (the stage module is FSDP's root under ZeRO-2/3). Without `labels` (a custom
    objective's logits) the stage is unchanged.

    recompute: a schedule holds several micro-batches' forwards before their backwards (gpipe: all of
    them), each of which would otherwise keep a [vocab, hidden] fp32 head gradient; and zero-bubble
    schedules run a node's backward twice (input, then weight gradients). Under ZeRO-3 the saved head
    weight is the gathered parameter, which FSDP's pre-backward gathers again, as for any layer's."""
    _, _, _, norm, head = stage._parts
    state = {}

    def take_labels(module, args, kwargs):
        state["labels"] = kwargs.pop("labels", None)
        return args, kwargs

    stage.register_forward_pre_hook(take_labels, prepend=True, with_kwargs=True)
    if not stage.is_last:
        return

    def keep(module, args, output):
        if state["labels"] is not None:
            state["hidden"] = output

    def one_position(module, args):
        if state["labels"] is not None:
            return (args[0][:, -1:],)

    def loss(module, args, output):
        labels = state.pop("labels")
        if labels is None:
            return None
        hidden = state.pop("hidden")
        hidden = hidden_fn(hidden) if hidden_fn is not None else hidden
        # [1]: the schedule concatenates the micro-batches' outputs
        return chunked_ce(hidden[:, : labels.shape[1]], head.weight, labels, chunk_tokens, recompute=True).reshape(1)

    norm.register_forward_hook(keep)
    head.register_forward_pre_hook(one_position, prepend=True)
    stage.register_forward_hook(loss, prepend=True)
