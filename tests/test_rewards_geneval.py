"""geneval_remote speaks the reference implementation's GenEval server protocol (pickle over
HTTP). A stand-in server here answers in that format from what it decoded, so the test checks
the bytes our client sends and how it maps the answer; another one decides as the reference's
server does with `only_strict`, and a training run logs GenEval accuracy from its evaluation."""

import contextlib
import io
import pickle
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import ml_collections
import numpy as np
import pytest
from PIL import Image

from flowgrpo_jax import config as config_lib
from flowgrpo_jax.prompts import load_prompts
from flowgrpo_jax.rewards import registry
from flowgrpo_jax.train import train
from train_runs import make_tiny_model


class GenEvalFormatHandler(BaseHTTPRequestHandler):
    requests = []

    def do_POST(self):
        request = pickle.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append(request)
        brightness = [float(np.asarray(Image.open(io.BytesIO(jpeg))).mean()) for jpeg in request["images"]]
        answer = pickle.dumps({
            "scores": brightness,
            "rewards": [m["n"] % 2 for m in request["meta_datas"]],
            "strict_rewards": [float(request["only_strict"])] * len(brightness),
            "group_rewards": {}, "group_strict_rewards": {}})
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


# The tags a stand-in detector gets right: its verdict depends on the prompt alone.
RIGHT_TAGS = ("two_object", "colors")
GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


class ReferenceGenEvalHandler(GenEvalFormatHandler):
    """Answers as the reference's GenEval server decides: `rewards` (GenEval's correctness) is
    False for every image when only_strict is set (it is not computed then), `strict_rewards`
    always computed, per-tag lists with -10 for the images of other tags."""

    def do_POST(self):
        request = pickle.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append(request)
        strict = [float(m["tag"] in RIGHT_TAGS) for m in request["meta_datas"]]
        correct = [0.0] * len(strict) if request["only_strict"] else strict
        per_tag = lambda values: {tag: [v if m["tag"] == tag else -10.0 for v, m in
                                        zip(values, request["meta_datas"])] for tag in GENEVAL_TAGS}
        answer = pickle.dumps({"scores": strict, "rewards": correct, "strict_rewards": strict,
                               "group_rewards": per_tag(correct),
                               "group_strict_rewards": per_tag(strict)})
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


@contextlib.contextmanager
def _serving(handler):
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    handler.requests = []
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def geneval_server():
    with _serving(GenEvalFormatHandler) as url:
        yield url


@pytest.fixture
def reference_geneval_server():
    with _serving(ReferenceGenEvalHandler) as url:
        yield url


def test_geneval_remote_wire_format_and_batching(geneval_server):
    images = np.stack([np.full((24, 24, 3), v, np.uint8) for v in (10, 120, 250)])
    metadata = [{"n": i, "tag": "counting"} for i in range(3)]
    fn = registry.build("geneval_remote", url=geneval_server, batch_size="2")
    out = fn(images, ["p"] * 3, metadata)
    np.testing.assert_allclose(out["score"], [10, 120, 250], atol=2)  # JPEG decoded server-side
    assert out["accuracy"].tolist() == [0, 1, 0] and out["strict_accuracy"].tolist() == [1, 1, 1]
    sent = GenEvalFormatHandler.requests
    assert [len(r["images"]) for r in sent] == [2, 1]
    assert sent[0]["meta_datas"] == metadata[:2] and sent[0]["only_strict"] is True
    assert Image.open(io.BytesIO(sent[1]["images"][0])).format == "JPEG"


def test_geneval_remote_refuses_hosts_that_are_not_loopback():
    with pytest.raises(ValueError, match="only talks to loopback hosts"):
        registry.build("geneval_remote", url="http://192.0.2.1:18085")
    registry.build("geneval_remote", url="http://192.0.2.1:18085", trust_remote="1")


def test_training_scores_strictly_and_evaluation_logs_geneval_accuracy(reference_geneval_server,
                                                                      tmp_path):
    """The toy world's GenEval-format prompts through sd35m_geneval's reward settings: training
    asks for strict scores only, evaluation (reward.eval_options) for GenEval's accuracy."""
    config = config_lib.load_file("configs/toy_geneval.py:tiny")
    reference = config_lib.load_file("configs/sd35m_geneval.py")
    config.model.path = make_tiny_model(tmp_path / "model")
    config.reward.rewards, config.reward.eval_options = "geneval_remote:1.0", reference.reward.eval_options
    config.reward.options = ml_collections.ConfigDict(
        {"geneval_remote": {"url": reference_geneval_server}})
    config.num_epochs, config.eval_every = 1, 1
    history = train(config, str(tmp_path / "run"))
    trained = [m for m in history if "train/loss" in m][0]
    evals = [m for m in history if "eval/reward_mean" in m]
    assert trained["reward/geneval_remote/accuracy_mean"] == 0.0  # only_strict: never computed
    test_tags = [m["tag"] for m in load_prompts(config.prompts.test_file, "geneval").metadata][:8]
    expected = np.mean([tag in RIGHT_TAGS for tag in test_tags])
    for metrics in evals:  # before and after training
        assert metrics["eval/geneval_remote/accuracy_mean"] == pytest.approx(expected)
        for tag in set(test_tags):
            assert metrics[f"eval/geneval_remote/accuracy_mean/{tag}"] == float(tag in RIGHT_TAGS)
    assert 0 < expected < 1 and len(evals) == 2
    modes = [r["only_strict"] for r in ReferenceGenEvalHandler.requests]
    assert set(modes) == {True, False}
