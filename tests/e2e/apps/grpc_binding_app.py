"""A gRPC app taking the input binding `ticker` with the official SDK's `dapr.ext.grpc.App`."""

from __future__ import annotations

import json
import os
import sys

from dapr.ext.grpc import App, BindingRequest

app = App()
EVENTS = os.environ["EVENTS_FILE"]


@app.binding("ticker")
def ticker(request: BindingRequest) -> None:
    with open(EVENTS, "a") as f:
        f.write(json.dumps({"data": request.text(), "metadata": dict(request.binding_metadata)}))
        f.write("\n")


if __name__ == "__main__":
    port = int(sys.argv[1])
    print(f"grpc binding app listening on {port}", flush=True)
    app.run(port)
