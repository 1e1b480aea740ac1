"""See benchmarks/diag/count_models.py."""
from benchmarks.diag.count_models import count_model

TritonPythonModel = count_model("cancel")
