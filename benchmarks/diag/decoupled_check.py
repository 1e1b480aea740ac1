"""Which decoupled paths answer on this machine: gRPC streams straight to a decoupled model
that sends from execute or from a worker thread, and the same through a BLS relay.
    python benchmarks/diag/decoupled_check.py [URL]   (server on benchmarks/diag/decoupled_repo)"""
import queue
import sys
import time

import numpy as np
import tritonclient.grpc as grpcclient

url = sys.argv[1] if len(sys.argv) > 1 else "localhost:8001"


def stream(model, target=None, n=5, timeout=15.0):
    got, done = [], queue.Queue()
    client = grpcclient.InferenceServerClient(url)

    def callback(result, error):
        if error is not None:
            done.put(f"error: {error}")
            return
        if result.get_response().parameters["triton_final_response"].bool_param:
            done.put("final")
        elif result.as_numpy("I") is not None:
            got.append(int(result.as_numpy("I")[0]))

    client.start_stream(callback=callback)
    inputs = [grpcclient.InferInput("N", [1], "INT32")]
    inputs[0].set_data_from_numpy(np.array([n], np.int32))
    if target:
        inputs.append(grpcclient.InferInput("TARGET", [1], "BYTES"))
        inputs[1].set_data_from_numpy(np.array([target.encode()], np.object_))
    t0 = time.perf_counter()
    client.async_stream_infer(model, inputs, enable_empty_final_response=True)
    try:
        end = done.get(timeout=timeout)
    except queue.Empty:
        end = "TIMEOUT"
    client.stop_stream(cancel_requests=True)
    print(f"{model + (' -> ' + target if target else ''):26s} {end:8s} {len(got)}/{n} responses "
          f"in {time.perf_counter() - t0:.2f} s", flush=True)


MODELS = [f"count_{way}" for way in ("inline", "thread", "metric", "torch", "cancel", "view", "extra")]
for m in MODELS:
    stream(m)
for m in MODELS:
    stream("relay", m)
