"""The BLS token streams of helios_triton.bls against a real tritonserver: a stream's
responses, and the numpy arrays they hold, are freed on the thread that reads them, under
the GIL, never by the stub's message thread (which holds no GIL: tritonserver 2.51's python
backend frees arrays there without it, and the helios stub crashed from it at prompt
switches on the H200).

Two small models: ``tokens`` (decoupled) answers each request with COUNT responses of 8
token ids and then the final flag alone, or with the final flag alone for a stop request;
``reader`` reads ROUNDS streams of it through ``bls._TokenStream``, every other one closed
after its first response (a switch), and watches each response's array: the thread it is
freed on. Each response read logs a line first, so the stub's message thread is busy when
the final response's cleanup is queued behind it, as it is in the helios stub."""

import textwrap

import numpy as np
import pytest

from conftest import free_ports
from helios_triton.server import TritonServer

COUNT = 4

TOKENS = '''
import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            if pb_utils.get_input_tensor_by_name(request, "STOP") is None:
                count = int(pb_utils.get_input_tensor_by_name(request, "COUNT").as_numpy()[0])
                for k in range(count):
                    ids = (np.arange(8, dtype=np.int32) + 8 * k)[None]
                    sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("output_ids", ids)]))
            sender.send(flags=FINAL)
        return None
'''

READER = '''
import threading
import weakref

import numpy as np
import triton_python_backend_utils as pb_utils

from helios_triton.bls import _TokenStream
from helios_triton.calls import CallWatch


class Watched:
    """A BLS response iterator whose responses' arrays report the thread that frees them."""

    def __init__(self, responses, freed):
        self.responses, self.freed = responses, freed

    def __iter__(self):
        return self

    def __next__(self):
        pb_utils.Logger.log_info("reader: next response")
        response = next(self.responses)
        out = pb_utils.get_output_tensor_by_name(response, "output_ids")
        if out is not None:
            freed = self.freed  # not self: the finalizer would keep the stream alive
            weakref.finalize(out.as_numpy(), lambda: freed.append(threading.get_ident()))
        return response


def tokens(freed, **inputs):
    request = pb_utils.InferenceRequest(
        model_name="tokens", requested_output_names=["output_ids"],
        inputs=[pb_utils.Tensor(k, np.array([v], np.int32)) for k, v in inputs.items()])
    return Watched(request.exec(decoupled=True), freed)


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            rounds = int(pb_utils.get_input_tensor_by_name(request, "ROUNDS").as_numpy()[0])
            freed, main = [], threading.get_ident()

            def stop():
                responses = tokens(freed, STOP=1)
                for _ in responses:
                    pass
                return responses

            for i in range(rounds):
                stream = _TokenStream(tokens(freed, COUNT=%(count)d), 8 * %(count)d, stop,
                                      request.is_cancelled, CallWatch(None))
                for toks in stream:
                    if i %% 2:
                        break  # a switch: the rest is stopped and drained
                stream.close()
                del stream
                junk = [(j, str(j)) for j in range(20000)]  # Python at work meanwhile
                del junk
            on_main = sum(t == main for t in freed)
            out.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("ON_MAIN", np.array([on_main], np.int32)),
                pb_utils.Tensor("ELSEWHERE", np.array([len(freed) - on_main], np.int32))]))
        return out
''' % {"count": COUNT}


def config(name, inputs, outputs, decoupled=False):
    def tensors(kind, specs):
        return ",\n".join(f'{{ name: "{n}" data_type: {t} dims: [ {d} ] optional: {o} }}'
                          if kind == "input" else f'{{ name: "{n}" data_type: {t} dims: [ {d} ] }}'
                          for n, t, d, o in specs)
    policy = "model_transaction_policy { decoupled: true }" if decoupled else ""
    return textwrap.dedent(f"""\
        name: "{name}"
        backend: "python"
        max_batch_size: 0
        {policy}
        input [ {tensors("input", inputs)} ]
        output [ {tensors("output", outputs)} ]
        instance_group [ {{ kind: KIND_CPU count: 1 }} ]
        """)


@pytest.fixture(scope="module")
def bls_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("bls") / "repo"
    models = {
        "tokens": (TOKENS, config("tokens", [("COUNT", "TYPE_INT32", 1, "true"),
                                             ("STOP", "TYPE_INT32", 1, "true")],
                                  [("output_ids", "TYPE_INT32", "1, 8", None)], decoupled=True)),
        "reader": (READER, config("reader", [("ROUNDS", "TYPE_INT32", 1, "false")],
                                  [("ON_MAIN", "TYPE_INT32", 1, None),
                                   ("ELSEWHERE", "TYPE_INT32", 1, None)])),
    }
    for name, (code, cfg) in models.items():
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.py").write_text(code)
        (repo / name / "config.pbtxt").write_text(cfg)
    http, grpc, metrics = free_ports(3)
    srv = TritonServer(repo, http, grpc, metrics, log_file=repo.parent / "server.log",
                       backends=repo.parent / "backends")
    srv.start(timeout=120)
    yield srv
    srv.stop()


def test_a_token_streams_responses_are_freed_on_the_reading_thread(bls_server):
    import tritonclient.http as httpclient

    rounds = 40
    client = httpclient.InferenceServerClient(f"127.0.0.1:{bls_server.http}")
    given = httpclient.InferInput("ROUNDS", [1], "INT32")
    given.set_data_from_numpy(np.array([rounds], np.int32))
    result = client.infer("reader", [given])
    # Every response's array freed (the stopped streams were drained to their end), each on
    # the reader's own thread.
    assert result.as_numpy("ELSEWHERE")[0] == 0
    assert result.as_numpy("ON_MAIN")[0] == rounds * COUNT
