"""The LM head and its cross-entropy over the answer rows, a chunk of rows at a time.

With Gemma 3's 262,144-token vocabulary, the logits of one batch's answer rows are the largest tensors of
a training step: a batch of long NER answers has ~800 answer rows, i.e. 840 MB per float32 copy of its
logits, and the soft-cap, the log-softmax and their gradients make several such copies. `HeadLoss` runs the
head on `chunk_rows` rows at a time and computes each chunk's gradients (of the hidden rows, and of the head
weight when it trains) in the same pass, so no tensor wider than `chunk_rows` x vocabulary ever exists and
the backward pass only scales the stored gradients (the approach of Liger Kernel's fused linear
cross-entropy). The value and the gradients are those of the cross-entropy of the model's own (soft-capped)
logits: tests/test_golden.py compares them on Gemma 3 and Llama shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lingtune.config import SFTConfig


def capped_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Mean cross-entropy of (soft-capped, as the model's own head does) logits, in float32."""
    logits = logits.float()
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, targets)


def chunk_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, cap: float | None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, d loss_sum / d logits) of one chunk of rows, computed in float32.

    With the soft-cap s = cap * tanh(z / cap): d loss / d z = (softmax(s) - onehot) * (1 - tanh(z / cap)^2)."""
    z = logits.float()
    squash = torch.tanh(z / cap) if cap else None
    capped = squash * cap if cap else z
    log_norm = torch.logsumexp(capped, dim=-1, keepdim=True)
    picked = capped.gather(1, targets[:, None])
    grad = torch.exp(capped - log_norm)
    grad.scatter_add_(1, targets[:, None], torch.full_like(picked, -1.0))
    if cap:
        grad = grad * (1 - squash * squash)
    return (log_norm - picked).sum(), grad


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` (soft-capped) against `targets`, chunked over rows."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, cap, chunk_rows, chunk_math, compute_dtype, grad_hidden, grad_weight):
        rows = hidden.shape[0]
        h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        d_hidden = torch.empty_like(h) if grad_hidden else None
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_weight else None
        # a chunk's weight gradient in the compute dtype, added to the float32 sum: one buffer for all chunks
        d_weight_part = torch.empty(weight.shape, dtype=compute_dtype, device=weight.device) \
            if grad_weight and compute_dtype != torch.float32 else None
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are explicit here
            for start in range(0, rows, chunk_rows):
                part = slice(start, start + chunk_rows)
                loss, d_logits = chunk_math(F.linear(h[part], w), targets[part], cap)
                total += loss
                d_logits = d_logits.to(compute_dtype)
                if d_hidden is not None:
                    d_hidden[part] = d_logits @ w
                if d_weight_part is not None:
                    d_weight += torch.mm(d_logits.T, h[part], out=d_weight_part)
                elif d_weight is not None:
                    d_weight.addmm_(d_logits.T, h[part])
        ctx.save_for_backward(d_hidden, d_weight)
        ctx.rows, ctx.dtypes = rows, (hidden.dtype, weight.dtype)
        return total / rows

    @staticmethod
    def backward(ctx, grad_out):
        d_hidden, d_weight = ctx.saved_tensors
        scale = grad_out / ctx.rows
        return ((d_hidden * scale).to(ctx.dtypes[0]) if d_hidden is not None else None,
                (d_weight * scale).to(ctx.dtypes[1]) if d_weight is not None else None,
                None, None, None, None, None, None, None)


@dataclass(frozen=True)
class HeadLoss:
    """The answer rows' loss through an LM head: chunked (`chunk_rows` > 0) or on the whole logits at once.

    `chunk_math` and `whole` are `chunk_loss_and_grad` and `capped_cross_entropy` or their compiled forms
    (`lingtune.train.sft.compile_for_training`)."""

    chunk_rows: int = SFTConfig.model_fields["loss_chunk_rows"].default  # params.yaml's default, one source
    chunk_math: Callable = field(default=chunk_loss_and_grad)
    whole: Callable = field(default=capped_cross_entropy)

    def __call__(self, hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                 cap: float | None) -> torch.Tensor:
        if not self.chunk_rows or not _is_plain_projection(head):
            return self.whole(head(hidden), targets, cap)
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head.weight.dtype
        grads = torch.is_grad_enabled()
        return _ChunkedHeadCrossEntropy.apply(hidden, head.weight, targets, cap, self.chunk_rows, self.chunk_math,
                                              dtype, grads and hidden.requires_grad,
                                              grads and head.weight.requires_grad)


WHOLE_OR_CHUNKED = HeadLoss()
"""Eager, chunks of the default size: `answer_loss`'s default (benchmarks, tests)."""


def _is_plain_projection(head: torch.nn.Module) -> bool:
    # A head with a bias, or wrapped (a LoRA on lm_head, a quantized layer), is not `hidden @ weight.T`:
    # it runs as itself on the whole logits, which is exact for any head.
    return type(head) is torch.nn.Linear and head.bias is None
