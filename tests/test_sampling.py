"""Inverse-CDF sampling in `generate` (lingtune.train.sampling): the same distribution as the library's
`torch.multinomial` draw, without it."""

from __future__ import annotations

import pytest


def within_binomial_noise(counts, probs, draws: int, sigmas: float = 4.5) -> bool:
    expected = probs * draws
    spread = (draws * probs * (1 - probs)).sqrt().clamp(min=1.0)
    return bool(((counts - expected).abs() <= sigmas * spread).all())


def test_the_draw_follows_the_softmax_and_never_picks_a_masked_token():
    import torch

    from lingtune.train.sampling import InverseCdfDraw

    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, float("-inf"), 0.0, -1.0, float("-inf")],
                           [float("-inf"), 0.5, 0.5, 3.0, float("-inf"), -2.0]])
    draws = 20_000
    scores = logits.repeat_interleave(draws, dim=0)
    drawn = InverseCdfDraw()(None, scores)
    assert torch.isfinite(drawn).sum(dim=1).eq(1).all()  # one token left per row, at 0
    tokens = drawn.argmax(dim=1).view(2, draws)
    for row, picked in zip(logits, tokens):
        counts = torch.bincount(picked, minlength=row.numel()).double()
        assert counts[torch.isinf(row)].sum() == 0
        assert within_binomial_noise(counts, torch.softmax(row.double(), dim=0), draws), counts


def test_the_policy_samples_from_the_warped_distribution_without_multinomial(tiny_sft, monkeypatch):
    """Through `generate` on the policy the stages load: temperature and top-k are applied before the draw
    (only the top 3 tokens appear, in softmax(top-3 logits / T) proportions) and `torch.multinomial` is never
    called (it fails the test if the policy falls back to it)."""
    import torch

    from lingtune.train.scoring import load_policy

    policy, tokenizer = load_policy(tiny_sft, trainable=False)
    prompt = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        logits = policy(input_ids=prompt).logits[0, -1].double()
    top = logits.topk(3)
    temperature = 0.02 / float(top.values[0] - top.values[2])  # a spread the draws can tell apart

    def no_multinomial(*_args, **_kwargs):
        raise AssertionError("torch.multinomial was called")

    monkeypatch.setattr(torch, "multinomial", no_multinomial)
    torch.manual_seed(0)
    draws = 3000
    with torch.no_grad():
        out = policy.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                              temperature=temperature, top_k=3, top_p=1.0, max_new_tokens=1,
                              num_return_sequences=draws, pad_token_id=tokenizer.pad_token_id)
    first = out[:, prompt.shape[1]]
    assert set(first.tolist()) == set(top.indices.tolist())
    counts = torch.stack([(first == t).sum() for t in top.indices]).double()
    assert within_binomial_noise(counts, torch.softmax(top.values / temperature, dim=0), draws), counts


def test_seeded_sampling_repeats_and_beam_search_is_refused(tiny_sft):
    import torch

    from lingtune.errors import ModelError
    from lingtune.train.scoring import load_policy

    policy, tokenizer = load_policy(tiny_sft, trainable=False)
    enc = tokenizer.pad({"input_ids": [[5, 6, 7, 8, 9], [5, 6]]}, padding_side="left", return_tensors="pt")

    def sampled(seed: int):
        torch.manual_seed(seed)
        with torch.no_grad():
            return policy.generate(**enc, do_sample=True, top_k=0, max_new_tokens=6,
                                   pad_token_id=tokenizer.pad_token_id)

    assert torch.equal(sampled(1), sampled(1))
    with pytest.raises(ModelError, match="generation mode"):
        policy.generate(**enc, num_beams=2, max_new_tokens=2, pad_token_id=tokenizer.pad_token_id)
