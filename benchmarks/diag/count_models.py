"""The decoupled models of decoupled_repo/ (benchmarks/diag/decoupled_check.py): each sends N
responses, then the final flag, in one of these ways:

    inline   from execute itself
    thread   from a long-lived worker thread (as helios.serving.ARScheduler does)
    metric   thread, and a custom metric set in that thread before every response
    torch    thread, and torch work in that thread before every response
    cancel   thread, and sender.is_cancelled() asked in that thread before every response
    view     thread, responses as ar_backbone made them: a reshaped numpy array (a view of
             another) and a second output, "L", that a BLS caller asking for "I" did not request
    extra    view without the view: fresh arrays, and the unrequested "L"

Each model's model.py is ``TritonPythonModel = count_model("<way>")``.
"""

import queue
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _outputs(way: str, i: int) -> list:
    if way == "view":
        out = np.array([i, i], np.int32).reshape(1, 1, -1)
        return [pb_utils.Tensor("I", out[0, 0, :1]), pb_utils.Tensor("L", np.array([[2]], np.int32))]
    if way == "extra":
        return [pb_utils.Tensor("I", np.array([i], np.int32)),
                pb_utils.Tensor("L", np.array([[2]], np.int32))]
    return [pb_utils.Tensor("I", np.array([i], np.int32))]


def count_model(way: str):
    class TritonPythonModel:
        def initialize(self, args):
            if way == "metric":  # the family must outlive its metrics
                self.family = pb_utils.MetricFamily(name="diag_count", description="responses sent",
                                                    kind=pb_utils.MetricFamily.GAUGE)
                self.metric = self.family.Metric(labels={"model": "count_metric"})
            if way == "torch":
                import torch  # noqa: PLC0415

                self.w = torch.randn(512, 512)
            self.jobs = queue.Queue()
            if way != "inline":
                threading.Thread(target=self._work, daemon=True).start()

        def _send_all(self, n, sender):
            for i in range(n):
                if way == "metric":
                    self.metric.set(i)
                elif way == "torch":
                    (self.w @ self.w).softmax(-1).sum().item()
                elif way == "cancel" and sender.is_cancelled():
                    break
                sender.send(pb_utils.InferenceResponse(_outputs(way, i)))
            sender.send(flags=FINAL)

        def _work(self):
            while True:
                self._send_all(*self.jobs.get())

        def execute(self, requests):
            for request in requests:
                n = int(pb_utils.get_input_tensor_by_name(request, "N").as_numpy()[0])
                if way == "inline":
                    self._send_all(n, request.get_response_sender())
                else:
                    self.jobs.put((n, request.get_response_sender()))
            return None

    return TritonPythonModel
