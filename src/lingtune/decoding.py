"""What the engine is given for a task request and how its output becomes the trained answer;
shared by evaluation and serving.

Prompts are token ids exactly as SFT encoded them (tasks.base.prompt_ids). Constraints follow the
trained answer format (each task's `constraint()`: a `choice` among the label answers, or the NER
answer's regular expression). Where the tokenizer allows it, a classification answer is one step
instead: the shared answer prefix goes into the prompt and the next token is restricted to the label
tokens.

Free first, then the constraint (`TaskDecoder.first_try`, `accepts`): a multi-token constrained answer
(the NER regex, a choice) is first decoded without the grammar, and kept only when the whole text is one
the constraint allows and decoding stopped on its own; otherwise the request runs again constrained.
Greedy decoding makes this exact: every prefix of an allowed text is allowed, so the unconstrained
argmax token was never masked and the constrained run picks the same tokens (for the text; which stop
token ends it may differ). The grammar's per-step token bitmask over Gemma's 262k vocabulary costs
~20-30% of a CPU decode step (benchmarks/ner_decode.py); a trained model's answers almost always pass,
so the constraint is paid for only by the answers that need it. An untrained model's first tries
mostly fail: up to twice the decode work offline, less in the service, which stops a first try as soon
as its text can no longer become an allowed answer (`may_accept`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import regex

from lingtune import tasks
from lingtune.errors import DataError
from lingtune.records import Record
from lingtune.tasks.base import ClassificationTask, answer_ids, prompt_ids


@dataclass(frozen=True)
class LabelStep:
    """A classification answer as tokens: a prefix all labels share, then one token that decides."""

    prefix_ids: tuple[int, ...]
    labels: dict[int, str]


def label_step(tokenizer, task: ClassificationTask) -> LabelStep | None:
    """None when the tokenizer does not tell the labels apart by one token after a shared prefix."""
    answers = {label: answer_ids(tokenizer, Record(text="x", task=task.name, label=label)) for label in task.labels}
    shared = _common_prefix(list(answers.values()))
    deciding = {ids[shared]: label for label, ids in answers.items() if len(ids) > shared}
    first = next(iter(answers.values()))
    return LabelStep(tuple(first[:shared]), deciding) if len(deciding) == len(answers) else None


def _common_prefix(sequences: list[list[int]]) -> int:
    n = 0
    while all(len(s) > n for s in sequences) and len({s[n] for s in sequences}) == 1:
        n += 1
    return n


class TaskDecoder:
    """Engine input for a task request, and the trained answer text from the engine's output.

    Prompts are token ids exactly as SFT encoded them. A text prompt would be tokenized again by
    vLLM with special tokens added: a second <bos> after the one Gemma's chat template writes.
    Constrained classification: the answer's shared prefix (`{"label": "`) is part of the prompt and
    the label is one step restricted to the label tokens, so the prefill yields the answer and no
    decode step runs (the same argmax a choice constraint reaches after forcing the prefix). A
    tokenizer that splits the labels otherwise gets the choice constraint over the whole answer.
    """

    def __init__(self, tokenizer, max_tokens_ner: int):
        self.tokenizer = tokenizer
        self.max_tokens_ner = max_tokens_ner
        self.label_steps = {name: label_step(tokenizer, task) for name, task in tasks.TASKS.items()
                            if isinstance(task, ClassificationTask)}

    def _one_step(self, task: str, constrained: bool) -> LabelStep | None:
        return self.label_steps.get(task) if constrained else None

    def prompt(self, task: str, text: str, constrained: bool = True) -> dict:
        ids = prompt_ids(self.tokenizer, tasks.get(task), text)
        if step := self._one_step(task, constrained):
            ids += step.prefix_ids
        return {"prompt_token_ids": ids}

    def fitting_prompt(self, task: str, text: str, max_model_len: int, index: int = 0) -> dict:
        """The engine prompt of `text`; a DataError (naming it by `index`) when the prompt plus its answer
        budget exceeds the context: the engine would cut the answer off, and a cut answer does not parse."""
        prompt = self.prompt(task, text)
        used, budget = len(prompt["prompt_token_ids"]), self.sampling(task).max_tokens
        if used + budget > max_model_len:
            raise DataError(f"text {index} is too long: {used} prompt tokens + {budget} answer tokens exceed "
                            f"the model's context of {max_model_len} tokens (max_model_len)")
        return prompt

    def sampling(self, task: str, constrained: bool = True):
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        if step := self._one_step(task, constrained):
            return SamplingParams(temperature=0, max_tokens=1, allowed_token_ids=list(step.labels))
        spec = tasks.get(task)
        max_tokens = spec.max_tokens(self.max_tokens_ner)
        if not constrained:
            return SamplingParams(temperature=0, max_tokens=max_tokens)
        return SamplingParams(temperature=0, max_tokens=max_tokens,
                              structured_outputs=StructuredOutputsParams(**spec.constraint()))

    def first_try(self, task: str, constrained: bool = True):
        """Unconstrained greedy params for the first try at a constrained answer, with the constrained
        answer's budget; None where the constrained answer is one step or nothing is to check."""
        from vllm import SamplingParams

        if not constrained or self._one_step(task, constrained) or task not in self._patterns:
            return None
        return SamplingParams(temperature=0, max_tokens=tasks.get(task).max_tokens(self.max_tokens_ner))

    def accepts(self, task: str, output) -> bool:
        """A first try's output is the constrained answer: it stopped on a stop token, not the budget,
        and its whole text matches the constraint."""
        return output.finish_reason == "stop" and self._patterns[task].fullmatch(output.text) is not None

    def may_accept(self, task: str, text: str) -> bool:
        """`text` (a first try so far) can still grow into an answer the constraint allows."""
        return self._patterns[task].fullmatch(text, partial=True) is not None

    @cached_property
    def _patterns(self) -> dict:
        """The constraint of each multi-token constrained task as a compiled pattern (`regex`, which,
        unlike `re`, matches partially). The NER regex uses the syntax both engines read alike."""
        patterns = {}
        for name, task in tasks.TASKS.items():
            rule = task.constraint()
            if "regex" in rule:
                patterns[name] = regex.compile(rule["regex"])
            elif "choice" in rule:
                patterns[name] = regex.compile("|".join(regex.escape(c) for c in rule["choice"]))
        return patterns

    def answer(self, task: str, output, constrained: bool = True) -> str:
        """The answer in the trained format from a vLLM CompletionOutput."""
        step = self._one_step(task, constrained)
        if step and output.token_ids:
            label = step.labels.get(output.token_ids[0])
            if label is not None:
                return tasks.get(task).answer(Record(text="x", task=task, label=label))
        return output.text
