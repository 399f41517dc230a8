"""OCR reward: does the image show the text quoted in the prompt?

target = the text between the first pair of double quotes of the prompt; both it and the
recognised text are lower-cased with spaces removed; r = 1 when the target occurs in the
recognised text, else r = 1 - min(edit_distance, len(target)) / len(target).
Recognition uses rapidocr-onnxruntime, whose wheel ships the PP-OCR models (works offline).
"""

import numpy as np

from flowgrpo_jax.rewards.registry import register


def quoted_target(prompt: str) -> str:
    parts = prompt.split('"')
    if len(parts) < 3 or not parts[1].strip():
        raise ValueError(f"the ocr reward needs a non-empty \"quoted\" text in the prompt: {prompt!r}")
    return parts[1]


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1,
                               previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def text_match(target: str, recognised: str) -> float:
    target = target.replace(" ", "").lower()
    recognised = recognised.replace(" ", "").lower()
    if target in recognised:
        return 1.0
    return 1.0 - min(edit_distance(recognised, target), len(target)) / len(target)


@register("ocr")
def ocr():
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError as e:
        raise ImportError(
            "the ocr reward needs rapidocr-onnxruntime: pip install 'flowgrpo-jax[rewards]'") from e
    engine = RapidOCR()

    def read_text(image: np.ndarray) -> str:
        # RapidOCR takes arrays as BGR (OpenCV order).
        lines, _ = engine(np.ascontiguousarray(image[..., ::-1]), use_cls=False)
        return "".join(text for _, text, _ in lines or [])

    def fn(images, prompts, metadata):
        targets = [quoted_target(p) for p in prompts]
        return {"score": np.array([text_match(t, read_text(im)) for t, im in zip(targets, images)])}

    return fn
