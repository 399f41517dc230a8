"""Prompt datasets for training and evaluation, and which prompts each epoch samples.

Two file formats:
- "geneval": JSON lines as GenEval's metadata files, one object per prompt with at least
  "prompt" (and "tag", "include", "exclude" for the checker); the whole object is the
  prompt's metadata, passed to the reward server with its images.
- "text": one prompt per line (OCR, PickScore prompt sets); blank lines are skipped and the
  metadata is {}.
"""
import dataclasses
import json

import numpy as np


@dataclasses.dataclass(frozen=True)
class PromptSet:
    prompts: tuple
    metadata: tuple  # one JSON-able dict per prompt

    def __len__(self):
        return len(self.prompts)

    def take(self, indices):
        """(prompts, metadata) lists of the given indices."""
        return [self.prompts[i] for i in indices], [self.metadata[i] for i in indices]

    def subset(self, indices) -> "PromptSet":
        prompts, metadata = self.take(indices)
        return PromptSet(tuple(prompts), tuple(metadata))


def load_prompts(path: str, format: str) -> PromptSet:
    with open(path) as f:
        lines = [(number, line.strip()) for number, line in enumerate(f, 1) if line.strip()]
    if not lines:
        raise ValueError(f"prompt file {path} holds no prompts")
    if format == "text":
        return PromptSet(tuple(line for _, line in lines), tuple({} for _ in lines))
    if format != "geneval":
        raise ValueError(f"unknown prompt file format {format!r}; expected 'geneval' or 'text'")
    metadata = []
    for number, line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number} is not JSON: {e}") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            raise ValueError(f"{path}:{number} has no string 'prompt' field")
        metadata.append(entry)
    return PromptSet(tuple(m["prompt"] for m in metadata), tuple(metadata))


def epoch_prompt_indices(num_prompts: int, num_groups: int, seed: int, epoch: int) -> np.ndarray:
    """The prompts of one epoch's groups, a function of (seed, epoch) only, so a resumed run
    samples what the uninterrupted one would. Distinct prompts while the set is large enough."""
    rng = np.random.default_rng([seed, epoch])
    return rng.choice(num_prompts, size=num_groups, replace=num_groups > num_prompts)
