"""Training logs: TensorBoard scalars and image grids (tensorboardX), wandb when asked.

Only process 0 writes; the other processes get a writer that does nothing, so the trainer
calls it unconditionally.
"""
import math
import sys

import numpy as np


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """uint8 (N, H, W, 3) -> one uint8 (rows*H, columns*W, 3) image; empty cells stay black."""
    images = np.asarray(images)
    count, height, width, channels = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.zeros((rows * height, columns * width, channels), np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * height:(r + 1) * height, c * width:(c + 1) * width] = image
    return grid


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported with torch hidden when torch is not loaded yet:
    tensorboardX imports torch (1.6 s of a start) only to accept torch tensors, and this writer
    is handed floats and numpy arrays alone."""
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX allows
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide_torch:
            del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    """TensorBoard in `logdir`, and with `wandb_project` a wandb run (its files in `logdir`):
    named `wandb_name` in group `wandb_group` (a population's members and their ablation),
    resumed when the run resumes. WANDB_MODE=offline keeps it off the network."""

    def __init__(self, logdir: str, *, enabled: bool = True, wandb_project: str | None = None,
                 run_config: dict | None = None, wandb_group: str | None = None,
                 wandb_name: str | None = None):
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self._tb = _summary_writer_class()(logdir)
        if wandb_project:
            import wandb  # optional dependency: only when logging.wandb is set

            self._wandb = wandb.init(project=wandb_project, dir=logdir, config=run_config,
                                     group=wandb_group, name=wandb_name, resume="allow",
                                     reinit="create_new")

    def scalars(self, step: int, values: dict) -> None:
        if self._tb is None:
            return
        for name, value in values.items():
            self._tb.add_scalar(name, float(value), step)
        if self._wandb:
            self._wandb.log({k: float(v) for k, v in values.items()}, step=step)
        self._tb.flush()

    def images(self, step: int, name: str, images: np.ndarray, captions=()) -> None:
        if self._tb is None or len(images) == 0:
            return
        self._tb.add_image(name, image_grid(images), step, dataformats="HWC")
        if captions:
            self._tb.add_text(f"{name}/prompts", "  \n".join(
                f"{i}: {c}" for i, c in enumerate(captions)), step)
        if self._wandb:
            import wandb

            self._wandb.log({name: [wandb.Image(im, caption=c) for im, c in
                                    zip(images, list(captions) or [""] * len(images))]}, step=step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb:
            self._wandb.finish()
