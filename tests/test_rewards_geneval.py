"""geneval_remote speaks the reference implementation's GenEval server protocol (pickle over
HTTP). A stand-in server here answers in that format from what it decoded, so the test checks
the bytes our client sends and how it maps the answer."""

import io
import pickle
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
from PIL import Image

from flowgrpo_jax.rewards import registry


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


@pytest.fixture
def geneval_server():
    server = HTTPServer(("127.0.0.1", 0), GenEvalFormatHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    GenEvalFormatHandler.requests = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


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
