"""Prompt datasets for training and evaluation, and which prompts each epoch samples.

Two file formats:
- "geneval": JSON lines as GenEval's metadata files, one object per prompt with at least
  "prompt" (and "tag", "include", "exclude" for the checker); the whole object is the
  prompt's metadata, passed to the reward server with its images.
- "text": one prompt per line (OCR, PickScore prompt sets); blank lines are skipped and the
  metadata is {}.
A file that cannot be read, holds no prompts or has a malformed line raises PromptFileError
naming the file (and line).
"""
import dataclasses
import json

import numpy as np


class PromptFileError(ValueError):
    """A prompt file is missing, empty or malformed; the message names the file and line."""


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
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(number, line.strip()) for number, line in enumerate(f, 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise PromptFileError(f"prompt file {path} cannot be read: {e}") from None
    if not lines:
        raise PromptFileError(f"prompt file {path} holds no prompts")
    if format == "text":
        return PromptSet(tuple(line for _, line in lines), tuple({} for _ in lines))
    if format != "geneval":
        raise ValueError(f"unknown prompt file format {format!r}; expected 'geneval' or 'text'")
    metadata = []
    for number, line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{path}:{number} is not JSON: {e}") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            raise PromptFileError(f"{path}:{number} has no string 'prompt' field")
        for field in ("include", "exclude"):  # the checker's clauses: a list of objects
            clauses = entry.get(field, [])
            if not isinstance(clauses, list) or not all(isinstance(c, dict) for c in clauses):
                raise PromptFileError(f"{path}:{number}: '{field}' must be a list of objects, "
                                      f"got {json.dumps(clauses)[:80]}")
        metadata.append(entry)
    return PromptSet(tuple(m["prompt"] for m in metadata), tuple(metadata))


def epoch_prompt_indices(num_prompts: int, num_groups: int, seed: int, epoch: int) -> np.ndarray:
    """The prompts of one epoch's groups, a function of (seed, epoch) only, so a resumed run
    samples what the uninterrupted one would. Distinct prompts while the set is large enough."""
    rng = np.random.default_rng([seed, epoch])
    return rng.choice(num_prompts, size=num_groups, replace=num_groups > num_prompts)
