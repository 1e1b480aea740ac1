"""Every input of the client-facing models, from the table in docs/serving.md: the table
matches the filled configs, and every case it implies (each bound crossed, NaN for floats, a
missing required input) is answered by a running server with INVALID_ARG naming the input,
while the rest of the request is valid. A new input without a row fails the first test."""

import math
import re

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from conftest import INSTANCES, ROOT
from helios_triton.fill_repository import fill, values

NUMPY = {"INT32": np.int32, "INT64": np.int64, "FP32": np.float32, "UINT8": np.uint8}


def input_table(heading: str = "The client-facing inputs") -> dict[str, dict]:
    text = (ROOT / "docs" / "serving.md").read_text()
    section = text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`"):
            name, dtype, shape, bounds, default = cells
            rows[name.strip("`")] = {"type": dtype, "shape": shape, "range": bounds,
                                     "required": default == "required"}
    return rows


TABLE = input_table()
UPDATE_TABLE = input_table("The update inputs")
VALID = {"PROMPT": "a red circle moving left", "NUM_FRAMES": 4}


def cases() -> list[tuple[str, object]]:
    """(input, a value outside its range) for every bound of every row."""
    out = []
    for name, row in TABLE.items():
        r, dtype = row["range"], row["type"]
        m = re.fullmatch(r"([\[(])(-?[\d.]+|-inf), (-?[\d.]+|inf)([\])])", r)
        if m:
            low, high = float(m.group(2)), float(m.group(3))
            info = np.iinfo(NUMPY[dtype]) if dtype.startswith("INT") else None
            below = low - 1 if m.group(1) == "[" else low
            above = high + 1 if m.group(4) == "]" else high
            for v in (below, above):
                if math.isinf(v) and info is not None:
                    continue
                if info is None or info.min <= v <= info.max:  # sendable in its dtype
                    out.append((name, int(v) if info is not None else v))
            if info is None:
                out.append((name, float("nan")))
        elif dtype == "BYTES" and r.endswith("UTF-8 bytes"):
            most = int(re.match(r"1 to (\d+) UTF-8 bytes", r).group(1))
            out += [(name, ""), (name, "x" * (most + 1))]
        elif dtype == "BYTES":  # an identifier: its length and its characters
            most = int(re.fullmatch(r"1 to (\d+) of A-Z a-z 0-9 _ -", r).group(1))
            out += [(name, ""), (name, "x" * (most + 1)), (name, "a/b")]
        elif dtype == "UINT8" and r.startswith("T "):
            t_lo, t_hi, lo, hi = map(int, re.fullmatch(r"T (\d+) to (\d+), H, W (\d+) to (\d+)",
                                                       r).groups())
            out += [(name, np.zeros((t_lo - 1, lo, lo, 3), np.uint8)),
                    (name, np.zeros((t_hi + 1, lo, lo, 3), np.uint8)),
                    (name, np.zeros((t_lo, lo - 1, lo, 3), np.uint8)),
                    (name, np.zeros((t_lo, lo, hi + 1, 3), np.uint8))]
        elif dtype == "UINT8":
            least = int(re.fullmatch(r"H, W >= (\d+)", r).group(1))
            out += [(name, np.zeros((least - 1, least, 3), np.uint8)),
                    (name, np.zeros((least, least - 1, 3), np.uint8))]
        else:
            raise AssertionError(f"no cases for the range of {name}: {r!r}")
    return out


def _tensor(name, value):
    dtype = TABLE[name]["type"]
    if dtype == "BYTES":
        array = np.array([value.encode("utf-8")], dtype=np.object_)
    elif isinstance(value, np.ndarray):
        array = value
    else:
        array = np.array([value], dtype=NUMPY[dtype])
    t = grpcclient.InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array)
    return t


def test_the_tables_are_the_models_inputs(tiny_checkpoint, tmp_path):
    fill(tmp_path / "repo", values(tiny_checkpoint, "cpu", 1, False, INSTANCES, 0.5),
         ROOT / "model_repository")
    for model, table in (("helios", TABLE), ("helios_video", TABLE),
                         ("helios_update", UPDATE_TABLE)):
        config = text_format.Parse((tmp_path / "repo" / model / "config.pbtxt").read_text(),
                                   model_config_pb2.ModelConfig())
        declared = {i.name: i for i in config.input}
        assert set(declared) == set(table), model
        for name, row in table.items():
            i = declared[name]
            dtype = model_config_pb2.DataType.Name(i.data_type).removeprefix("TYPE_")
            assert row["type"] == ("BYTES" if dtype == "STRING" else dtype), name
            names = ["T", "H", "W"][4 - len(i.dims):]  # [H, W, 3] or [T, H, W, 3]
            dims = ", ".join(names[k] if d == -1 else str(d) for k, d in enumerate(i.dims))
            assert row["shape"] == f"[{dims}]", name
            assert i.optional != row["required"], name


@pytest.mark.parametrize("name,value", cases(), ids=lambda x: repr(x)[:24])
def test_every_out_of_range_input_is_refused_naming_it(server, name, value):
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    inputs = dict(VALID, **{name: value})
    with pytest.raises(InferenceServerException) as e:
        client.infer("helios_video", [_tensor(n, v) for n, v in inputs.items()])
    assert e.value.message().startswith(f"{name} must "), e.value.message()
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"


@pytest.mark.parametrize("name", [n for n, r in TABLE.items() if r["type"] != "BYTES"])
def test_an_input_of_the_wrong_type_is_refused_naming_it(server, name):
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    wrong = "FP32" if TABLE[name]["type"] != "FP32" else "INT32"
    shape = {"IMAGE": [8, 8, 3], "VIDEO": [4, 8, 8, 3]}.get(name, [1])
    array = np.ones(shape, dtype=NUMPY[wrong])
    t = grpcclient.InferInput(name, shape, wrong)
    t.set_data_from_numpy(array)
    others = [_tensor(n, v) for n, v in VALID.items() if n != name]
    with pytest.raises(InferenceServerException) as e:
        client.infer("helios_video", others + [t])
    assert name in e.value.message(), e.value.message()


def test_a_missing_required_input_is_named(server):
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    for name, row in TABLE.items():
        if row["required"]:
            inputs = {n: v for n, v in VALID.items() if n != name}
            with pytest.raises(InferenceServerException) as e:
                client.infer("helios_video", [_tensor(n, v) for n, v in inputs.items()])
            assert name in e.value.message() and "AttributeError" not in e.value.message()
