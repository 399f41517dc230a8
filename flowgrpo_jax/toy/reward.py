"""The toy checker as a registered reward, "toy_geneval", for the reward server.

The score is the partial credit by default (what Flow-GRPO trains GenEval on); "strict" and
"partial" are always returned as sub-scores, so both are logged.
"""
from flowgrpo_jax.rewards.registry import register
from flowgrpo_jax.toy.checker import score_batch

SCORES = ("partial", "strict")


@register("toy_geneval")
def toy_geneval(score: str = "partial"):
    if score not in SCORES:
        raise ValueError(f"toy_geneval score={score!r}; expected one of {SCORES}")

    def reward(images, prompts, metadata):
        mismatched = [i for i, (p, m) in enumerate(zip(prompts, metadata)) if p != m.get("prompt")]
        if len(prompts) != len(metadata) or mismatched:
            raise ValueError(f"prompts and metadata disagree (lengths {len(prompts)}, {len(metadata)};"
                             f" mismatched rows {mismatched[:5]})")
        scores = score_batch(images, metadata)
        return {"score": scores[score], **scores}

    return reward
