"""A gRPC test app written with the official SDK's `dapr.ext.grpc.App`."""

from __future__ import annotations

import json
import sys

from dapr.clients.grpc._request import InvokeMethodRequest
from dapr.clients.grpc._response import InvokeMethodResponse
from dapr.ext.grpc import App

app = App()


@app.method("echo")
def echo(request: InvokeMethodRequest) -> InvokeMethodResponse:
    meta = {k: v[0] if isinstance(v, list) and v else v for k, v in request.metadata.items()}
    payload = {
        "data": request.data.decode("utf-8", "replace"),
        "content_type": request.content_type,
        "verb": request.http_verb,
        "metadata": meta,
    }
    return InvokeMethodResponse(json.dumps(payload).encode(), "application/json")


@app.method("fail")
def fail(request: InvokeMethodRequest) -> InvokeMethodResponse:
    raise ValueError("the app failed on purpose")


if __name__ == "__main__":
    port = int(sys.argv[1])
    print(f"grpc app listening on {port}", flush=True)
    app.run(port)
