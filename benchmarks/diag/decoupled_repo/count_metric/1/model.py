"""count_thread, and a custom metric set from the worker thread before every response (as
the ar_backbone model publishes its KV-cache gauges)."""
import queue
import threading

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.family = family = pb_utils.MetricFamily(name="diag_count", description="responses sent",
                                       kind=pb_utils.MetricFamily.GAUGE)
        self.metric = family.Metric(labels={"model": "count_metric"})
        self.jobs = queue.Queue()
        threading.Thread(target=self._work, daemon=True).start()

    def _work(self):
        while True:
            n, sender = self.jobs.get()
            for i in range(n):
                self.metric.set(i)
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("I", np.array([i], np.int32))]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def execute(self, requests):
        for request in requests:
            n = int(pb_utils.get_input_tensor_by_name(request, "N").as_numpy()[0])
            self.jobs.put((n, request.get_response_sender()))
        return None
