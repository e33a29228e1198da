"""An OpenAI-protocol embeddings server for benchmarks: as fast as a server in Python can
answer, or with a fixed latency per request.

`POST /v1/embeddings` answers one unit vector per input (base64 float32, or a list of
floats when asked), derived from a hash of the text as a real model's answer is a function
of the text: the same text always gets the same vector, and distinct texts get distinct
vectors (`embedding_pipeline.testing.fake_vector`, the tests' too: Gaussian components from a
generator seeded by the text's SHA-256, normalised), so an HNSW index built over the
answers is built over as many distinct vectors as there are texts. Such vectors have no
neighbourhood structure (the worst case for an HNSW graph; real embeddings of related
texts cluster). `GET /stats` returns the inputs and requests received so far. Run it as a
separate process, as a real provider would be:

    python benchmarks/fake_openai.py --port 18080 --dimensions 1536 --latency 0.2
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from embedding_pipeline.testing.vectors import b64, fake_vector


class _State:
    def __init__(self, dimensions: int, latency: float) -> None:
        self.dimensions = dimensions
        self.latency = latency
        self.inputs = 0
        self.requests = 0
        self.lock = threading.Lock()


def _handler(state: _State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _send(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            with state.lock:
                stats = {"inputs": state.inputs, "requests": state.requests}
            self._send(json.dumps(stats).encode())

        def do_POST(self) -> None:
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            texts = request["input"]
            with state.lock:
                state.inputs += len(texts)
                state.requests += 1
            if state.latency:
                time.sleep(state.latency)
            as_base64 = request.get("encoding_format") == "base64"
            data = []
            for i, text in enumerate(texts):
                vector = fake_vector(text, state.dimensions)
                embedding = b64(vector) if as_base64 else vector.tolist()
                data.append({"object": "embedding", "index": i, "embedding": embedding})
            usage = {"prompt_tokens": len(texts), "total_tokens": len(texts)}
            body = {"object": "list", "data": data, "model": request["model"], "usage": usage}
            self._send(json.dumps(body).encode())

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dimensions", type=int, default=1536)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    args = parser.parse_args()
    server = ThreadingHTTPServer(
        ("127.0.0.1", args.port), _handler(_State(args.dimensions, args.latency))
    )
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
