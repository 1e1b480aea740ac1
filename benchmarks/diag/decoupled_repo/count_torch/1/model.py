"""count_thread, and torch work in the worker thread before every response (as the
ar_backbone model decodes)."""
import queue
import threading

import numpy as np
import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.w = torch.randn(512, 512)
        self.jobs = queue.Queue()
        threading.Thread(target=self._work, daemon=True).start()

    def _work(self):
        while True:
            n, sender = self.jobs.get()
            for i in range(n):
                x = torch.softmax(self.w @ self.w, -1).sum().item()
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("I", np.array([i + 0 * x], np.int32))]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def execute(self, requests):
        for request in requests:
            n = int(pb_utils.get_input_tensor_by_name(request, "N").as_numpy()[0])
            self.jobs.put((n, request.get_response_sender()))
        return None
