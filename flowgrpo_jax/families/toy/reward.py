"""The toy checker as a registered reward, "toy_geneval", for the reward server.

The score is one of the checker's scores, or the mean of several joined by "+":
"partial" (the default, what Flow-GRPO trains GenEval on), "strict" (GenEval's 0/1 rule) or
"exact" (strict, and no object beyond those asked for). Alone, each teaches a bias: strict lets
extra objects pass outside counting prompts, exact punishes a stray object as hard as a wrong
one, partial pays for drawing only one of two objects (docs/demo.md). Every checker score is
also returned as a sub-score, so all are logged.
"""
import numpy as np

from flowgrpo_jax.rewards.registry import register
from flowgrpo_jax.families.toy.checker import score_batch

SCORES = ("partial", "strict", "exact")


@register("toy_geneval")
def toy_geneval(score: str = "partial"):
    parts = score.split("+")
    if not all(part in SCORES for part in parts):
        raise ValueError(f"toy_geneval score={score!r}; expected one of {SCORES} or several "
                         f"joined by '+' (their mean)")

    def reward(images, prompts, metadata):
        mismatched = [i for i, (p, m) in enumerate(zip(prompts, metadata)) if p != m.get("prompt")]
        if len(prompts) != len(metadata) or mismatched:
            raise ValueError(f"prompts and metadata disagree (lengths {len(prompts)}, {len(metadata)};"
                             f" mismatched rows {mismatched[:5]})")
        scores = score_batch(images, metadata)
        return {"score": np.mean([scores[part] for part in parts], axis=0), **scores}

    return reward
