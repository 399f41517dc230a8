"""Client for the GenEval reward server used by the reference Flow-GRPO implementation.

That server speaks pickle over HTTP: the request body is pickle.dumps({"images": [JPEG bytes],
"meta_datas": [dict per image], "only_strict": bool}) and the answer is a pickled dict with
per-image "scores", "rewards" and "strict_rewards" lists. Unpickling an answer runs whatever
code the sender chose, so this client talks only to a server on this machine unless told
`trust_remote=1`; run it on localhost or over a tunnel you control. (Our own reward server never
unpickles anything.)
"""

import http.client
import io
import ipaddress
import pickle
import socket
import urllib.parse

import numpy as np
from PIL import Image

from flowgrpo_jax.rewards.registry import register

DEFAULT_URL = "http://127.0.0.1:18085"


def _is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None))
    except socket.gaierror:
        return False


def _flag(value) -> bool:
    """Options arrive as strings from the server's command line: "1"/"true" or a bool."""
    return str(value).lower() in ("1", "true", "yes")


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG")
    return buffer.getvalue()


@register("geneval_remote")
def geneval_remote(url=DEFAULT_URL, only_strict=True, batch_size=64, timeout=120.0,
                   trust_remote=False):
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "http" or not parsed.hostname:
        raise ValueError(f"geneval_remote needs an http://host:port URL, got {url!r}")
    only_strict, trust_remote = _flag(only_strict), _flag(trust_remote)
    if not trust_remote and not _is_loopback(parsed.hostname):
        raise ValueError(
            f"geneval_remote unpickles the server's answers, so it only talks to loopback hosts; "
            f"{parsed.hostname!r} is not one (pass geneval_remote.trust_remote=1 for a host you control)")
    batch_size, timeout = int(batch_size), float(timeout)

    def post(images, metadata) -> dict:
        body = pickle.dumps({"images": [_jpeg(im) for im in images],
                             "meta_datas": list(metadata), "only_strict": only_strict})
        connection = http.client.HTTPConnection(parsed.hostname, parsed.port or 80, timeout=timeout)
        try:
            connection.request("POST", parsed.path or "/", body=body)
            response = connection.getresponse()
            content = response.read()
        finally:
            connection.close()
        if response.status != 200:
            raise RuntimeError(f"GenEval server at {url} answered HTTP {response.status}: {content[:200]!r}")
        return pickle.loads(content)

    def fn(images, prompts, metadata):
        keys = {"scores": "score", "rewards": "accuracy", "strict_rewards": "strict_accuracy"}
        outputs = {name: [] for name in keys.values()}
        for start in range(0, len(images), batch_size):
            answer = post(images[start:start + batch_size], metadata[start:start + batch_size])
            for key, name in keys.items():
                outputs[name].extend(answer[key])
        return {name: np.asarray(values, np.float64) for name, values in outputs.items()}

    return fn
