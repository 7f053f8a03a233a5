"""Sampling in `transformers.generate` without `torch.multinomial`, for the policies the `rl` and `reward`
stages sample on CPU.

`generate` draws every sampled token with `torch.multinomial(probs, 1)`, which on CPU fills a tensor the
size of the logits with exponential random numbers on one thread: for 8 sequences x Gemma 3's 262k-token
vocabulary that is ~60 ms a token, a third of a bf16 RL rollout (benchmarks/rl_generate.py). An
inverse-CDF draw (one uniform number per sequence against the cumulative sum of the same probabilities)
picks from the same distribution in about a millisecond.

`transformers` offers the hook: `generate(custom_generate=callable)` prepares everything as usual (the
logits processors and warpers for temperature, top-k, top-p, min-p, minimum length, the stopping
criteria, the cache) and then calls the callable for the decoding loop. `sample_by_inverse_cdf` runs the
library's own loop (`_sample`) with one more logits processor, `InverseCdfDraw`, last in
the list: it draws the token from the softmax of the already-warped scores, exactly what the library's
sampler would draw from, and leaves only that token finite, so the loop's greedy branch picks it.
"""

from __future__ import annotations

import copy
import functools

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.configuration_utils import GenerationMode

from lingtune.errors import ModelError


class InverseCdfDraw(LogitsProcessor):
    """Draws one token per row from softmax(scores) and masks every other token to -inf."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # The probabilities are the library's (float32 softmax); their running sum is float64 so that the
        # last of 262k terms still moves it.
        cdf = torch.softmax(scores.float(), dim=-1).cumsum(dim=-1, dtype=torch.float64)
        total = cdf[:, -1:]
        u = torch.rand(total.shape, dtype=torch.float64, device=scores.device) * total
        # u < total keeps the draw inside the vocabulary; the first index whose cumulative sum exceeds u
        # has a probability above zero, so a masked (-inf) token is never drawn.
        u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
        token = torch.searchsorted(cdf, u, right=True)
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)


def sample_by_inverse_cdf(model, input_ids, logits_processor, stopping_criteria, generation_config, **kwargs):
    """The decoding loop of `generate` for sampling and greedy search (a `custom_generate` callable)."""
    mode = generation_config.get_generation_mode()
    if mode not in (GenerationMode.SAMPLE, GenerationMode.GREEDY_SEARCH):
        raise ModelError(f"this policy samples or decodes greedily; generation mode {mode.value!r} is not "
                          "supported (num_beams and assistant models are not used by the rl and reward stages)")
    if mode is GenerationMode.GREEDY_SEARCH or generation_config.output_scores or generation_config.output_logits:
        # Greedy needs no draw; asked-for scores must be the warped ones, not the one-hot mask.
        return type(model)._sample(model, input_ids, logits_processor, stopping_criteria, generation_config,
                                       **kwargs)
    greedy = copy.copy(generation_config)  # keeps the prepared private fields (pad token tensor, ...)
    greedy.do_sample = False
    return type(model)._sample(model, input_ids, LogitsProcessorList([*logits_processor, InverseCdfDraw()]),
                                   stopping_criteria, greedy, **kwargs)


def use_inverse_cdf_sampling(model) -> None:
    """`model.generate` decodes with `sample_by_inverse_cdf` (the way transformers installs a Hub
    `custom_generate`: a partial on the instance). TRL's trainers call `model.generate` on this object."""
    model.generate = functools.partial(model.generate, custom_generate=sample_by_inverse_cdf)
