"""Scoring behind the reward server: one batch at a time on the reward models, each batch id
scored at most once.

Results are cached by batch id, in memory and, with a cache folder, on disk (so that they
survive a restart); a re-send that arrives while the first copy is still being scored waits
for that copy. The HTTP layer (server.py) only decodes requests and encodes answers.
"""

import collections
import json
import os
import pathlib
import threading
import time

from flowgrpo_jax.rewards.protocol import ProtocolError, encode_result


class RewardService:
    def __init__(self, reward, cache_dir=None, cache_size: int = 4096):
        self.reward = reward
        self.cache_dir = pathlib.Path(cache_dir) if cache_dir else None
        if self.cache_dir:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.cache_size = cache_size
        self.stats = collections.Counter(scored_batches=0, scored_images=0, cache_hits=0)
        self._lock = threading.Lock()  # guards the dicts and stats
        self._models = threading.Lock()  # one batch at a time on the reward models
        self._done = collections.OrderedDict()  # batch_id -> (digest, result)
        self._pending = {}  # batch_id -> (digest, Event) while being scored

    def score(self, batch_id: str, digest: str, images, prompts, metadata) -> dict:
        """The answer of protocol.encode_result plus "cached"; ProtocolError (409) when the id
        was used for a batch of another digest."""
        while True:
            with self._lock:
                entry = self._done.get(batch_id) or self._read_disk(batch_id)
                if entry is not None:
                    _check_same_batch(batch_id, entry[0], digest)
                    self.stats["cache_hits"] += 1
                    return dict(entry[1], cached=True)
                pending = self._pending.get(batch_id)
                if pending is None:
                    event = threading.Event()
                    self._pending[batch_id] = (digest, event)
                    break
            _check_same_batch(batch_id, pending[0], digest)
            pending[1].wait()  # then loop: the result is cached, or that attempt failed
        try:
            start = time.perf_counter()
            with self._models:
                total, components = self.reward(images, prompts, metadata)
            result = encode_result(batch_id, total, components, time.perf_counter() - start)
            with self._lock:
                self._remember(batch_id, digest, result)
                self.stats["scored_batches"] += 1
                self.stats["scored_images"] += len(images)
            return dict(result, cached=False)
        finally:
            with self._lock:
                del self._pending[batch_id]
            event.set()

    def stats_snapshot(self) -> dict:
        with self._lock:
            return dict(self.stats)

    def _remember(self, batch_id, digest, result) -> None:
        if self.cache_dir:
            path = self.cache_dir / f"{batch_id}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"digest": digest, "result": result}, allow_nan=False))
            os.replace(tmp, path)  # atomic: a crash leaves the old state or the whole entry
        self._done[batch_id] = (digest, result)
        while len(self._done) > self.cache_size:
            self._done.popitem(last=False)

    def _read_disk(self, batch_id):
        path = self.cache_dir / f"{batch_id}.json" if self.cache_dir else None
        if path is None or not path.exists():
            return None
        entry = json.loads(path.read_text())
        return entry["digest"], entry["result"]


def _check_same_batch(batch_id, known_digest, digest) -> None:
    if known_digest != digest:
        raise ProtocolError(f"batch_id {batch_id!r} was already used for a different batch", 409)
