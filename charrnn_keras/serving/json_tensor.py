"""TF Serving's JSON tensor formats: a REST predict body to TensorProtos, outputs back to JSON.

A port of ``tensorflow_serving/util/json_tensor.cc``, with its checks and its error messages:
the row format (``{"instances": [...]}``, one item per batch row, answered with
``{"predictions": [...]}``) and the columnar format (``{"inputs": ...}``, answered with
``{"outputs": ...}``). Strings are JSON strings (UTF-8); binary values are ``{"b64": "..."}``
objects, and outputs whose alias ends in ``_bytes`` are written that way.
"""

from __future__ import annotations

import base64
import binascii
import json

import grpc
import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

from charrnn_keras.serving.lanes import RequestError

ROW, COLUMNAR = "row", "columnar"
_DT = types_pb2.DataType
# The TensorProto field each dtype's values go to, and the JSON values it accepts (rapidjson's
# IsInt, IsInt64, ...: a JSON number without a fraction, in range; IsNumber for floats).
_INT32 = (-(2**31), 2**31 - 1)
_FIELDS = {
    _DT.DT_FLOAT: ("float_val", None), _DT.DT_DOUBLE: ("double_val", None),
    _DT.DT_INT32: ("int_val", _INT32), _DT.DT_INT16: ("int_val", _INT32),
    _DT.DT_INT8: ("int_val", _INT32), _DT.DT_UINT8: ("int_val", _INT32),
    _DT.DT_INT64: ("int64_val", (-(2**63), 2**63 - 1)),
    _DT.DT_UINT32: ("uint32_val", (0, 2**32 - 1)), _DT.DT_UINT64: ("uint64_val", (0, 2**64 - 1)),
    _DT.DT_STRING: ("string_val", None), _DT.DT_BOOL: ("bool_val", None),
}  # fmt: skip
_MAX_DEBUG = 256  # kMaxJsonDebugStringBytes


def _bad(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _dtype_name(dtype: int) -> str:
    """TensorFlow's DataTypeString: ``float``, ``int32``, ``string``..."""
    return _DT.Name(dtype).removeprefix("DT_").lower()


def _debug(value) -> str:
    """The JSON value as an error message shows it, cut at 256 bytes as TF Serving cuts it."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text if len(text) <= _MAX_DEBUG else text[:_MAX_DEBUG] + "..."


def _json_type(value) -> str:
    if value is None or isinstance(value, bool):
        return str(value).replace("None", "Null")
    kinds = {dict: "Object", list: "Array", str: "String"}
    return kinds.get(type(value), "Number")


def _is_b64(value) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def _is_object(value) -> bool:
    return isinstance(value, dict) and not _is_b64(value)


def _scalar(value, dtype: int):
    """One JSON leaf as the value its dtype's TensorProto field holds; raises RequestError."""
    if dtype not in _FIELDS:
        raise RequestError(
            grpc.StatusCode.UNIMPLEMENTED,
            f"Conversion of JSON Value: {_debug(value)} to type: {_dtype_name(dtype)}",
        )
    _, bounds = _FIELDS[dtype]
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if dtype == _DT.DT_STRING and isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    if dtype == _DT.DT_BOOL and isinstance(value, bool):
        return value
    if dtype in (_DT.DT_FLOAT, _DT.DT_DOUBLE) and number:
        try:
            number = float(value)
        except OverflowError:  # a JSON integer beyond any double; rapidjson reads it as inf
            number = float("inf") if value > 0 else float("-inf")
        if dtype == _DT.DT_FLOAT:
            with np.errstate(over="ignore"):
                return float(np.float32(number))
        return number
    if bounds is not None and number and isinstance(value, int) and bounds[0] <= value <= bounds[1]:
        return value
    raise _bad(
        f"JSON Value: {_debug(value)} Type: {_json_type(value)} is not of expected type: "
        f"{_dtype_name(dtype)}"
    )


def _shape(value) -> list[int]:
    """GetDenseTensorShape: the sizes of the first list at each level."""
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def _fill(value, dims: list[int], dtype: int, out: list, level: int = 0) -> None:
    """FillTensorProto: appends the leaves of ``value`` to ``out``, checking a dense shape."""
    if not isinstance(value, list):
        if level != len(dims):
            raise _bad(
                f"JSON Value: {_debug(value)} found at incorrect level: {level + 1} in the "
                f"JSON DOM. Expected at level: {len(dims)}"
            )
        if isinstance(value, dict) and dtype == _DT.DT_STRING:
            if not _is_b64(value):
                raise _bad(f"JSON Value: {_debug(value)} not formatted correctly for base64 data")
            try:
                out.append(base64.b64decode(value["b64"], validate=True))
            except (binascii.Error, ValueError):
                raise _bad("Unable to base64 decode") from None
        else:
            out.append(_scalar(value, dtype))
        return
    if level >= len(dims):
        raise _bad(f"Encountered list at unexpected level: {level} expected < {len(dims)}")
    if len(value) != dims[level]:
        raise _bad(
            f"Encountered list at unexpected size: {len(value)} at level: {level} expected "
            f"size: {dims[level]}"
        )
    for item in value:
        _fill(item, dims, dtype, out, level + 1)


def _proto(dtype: int, dims: list[int], values: list) -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto(dtype=dtype)
    proto.tensor_shape.dim.extend(tensor_shape_pb2.TensorShapeProto.Dim(size=n) for n in dims)
    getattr(proto, _FIELDS[dtype][0]).extend(values)
    return proto


def _from_instances(instances: list, infos) -> dict:
    """FillTensorMapFromInstancesList: the row format, one item per batch row."""
    if not isinstance(instances[0], dict) and len(infos) > 1:
        raise _bad(
            "instances is a plain list, but expecting list of objects as multiple input tensors "
            "required as per tensorinfo_map"
        )
    objects, wanted = _is_object(instances[0]), set(infos)
    only = next(iter(sorted(infos)))
    values: dict[str, list] = {}
    shapes: dict[str, tuple[int, list[int]]] = {}

    def add(item, name: str) -> None:  # AddInstanceItem
        if name not in infos:
            raise _bad(f"JSON object: does not have named input: {name}")
        leaves, dims = [], _shape(item)
        _fill(item, dims, infos[name].dtype, leaves)
        size, first = shapes.setdefault(name, (len(leaves), dims))
        if size != len(leaves):
            raise _bad(f"Expecting tensor size: {size} but got: {len(leaves)}")
        if first != dims:
            raise _bad(
                f"Expecting shape [{','.join(map(str, first))}] but got: "
                f"[{','.join(map(str, dims))}]"
            )
        values.setdefault(name, []).extend(leaves)

    for i, element in enumerate(instances):
        if objects != _is_object(element):
            got, want = ("list", "object") if objects else ("object", "value/list")
            raise _bad(f"Expecting {want} but got {got} at item {i} of input list")
        for name, item in element.items() if objects else [(only, element)]:
            try:
                add(item, name)
            except RequestError as e:
                where = f"{i} key: {name}" if objects else str(i)
                raise _bad(
                    f"Failed to process element: {where} of 'instances' list. Error: "
                    f"{e.code.name}: {e}"
                ) from None
        if objects and set(element) != wanted:
            raise _bad(
                f"Failed to process element: {i} of 'instances' list. JSON object: "
                f"{_debug(element)} keys must be equal to: {','.join(sorted(wanted))}"
            )
    return {
        name: _proto(infos[name].dtype, [len(instances), *shapes[name][1]], values[name])
        for name in values
    }


def _from_inputs(inputs, infos) -> dict:
    """FillTensorMapFromInputsMap: the columnar format, one named value per input."""
    if not isinstance(inputs, dict) or _is_b64(inputs):
        if len(infos) > 1:
            raise _bad(
                "inputs is a plain value/list, but expecting an object as multiple input "
                "tensors required as per tensorinfo_map"
            )
        inputs = {next(iter(infos)): inputs}
    tensors = {}
    for name in sorted(infos):
        if name not in inputs:
            raise _bad(f"Missing named input: {name} in 'inputs' object.")
        leaves, dims = [], _shape(inputs[name])
        _fill(inputs[name], dims, infos[name].dtype, leaves)
        tensors[name] = _proto(infos[name].dtype, dims, leaves)
    return tensors


def parse_body(body: bytes) -> dict:
    """ParseJson: the request body as a JSON object; raises RequestError INVALID_ARGUMENT."""
    if not body:
        raise _bad("JSON Parse error: The document is empty")
    try:
        doc = json.loads(body)
    except json.JSONDecodeError as e:
        raise _bad(f"JSON Parse error: {e.msg} at offset: {e.pos}") from None
    except UnicodeDecodeError as e:
        raise _bad(f"JSON Parse error: Invalid encoding in string. at offset: {e.start}") from None
    except RecursionError:
        raise _bad("JSON Parse error: the document is nested too deeply") from None
    if not isinstance(doc, dict):
        raise _bad(f"JSON Value: {_debug(doc)} Is not object")
    name = doc.get("signature_name", "")
    if not isinstance(name, str):
        raise _bad(
            f"JSON Value: {_debug(doc)} not formatted correctly. 'signature_name' key "
            f"must be a string value."
        )
    return doc


def fill_inputs(doc: dict, infos) -> tuple[dict, str]:
    """FillPredictRequestFromJson: returns ({alias: TensorProto}, ROW or COLUMNAR).

    Args:
        doc: the parsed body (``parse_body``).
        infos: the signature's inputs, {alias: TensorInfo}.

    Returns:
        The input tensors and the format the answer must use.
    """
    if "instances" in doc and "inputs" in doc:
        raise _bad(
            f"JSON Value: {_debug(doc)} Not formatted correctly expecting only one of "
            f"'inputs' or 'instances' keys to exist "
        )
    if "instances" in doc:
        if not isinstance(doc["instances"], list):
            raise _bad(f"JSON Value: {_debug(doc)} Expecting 'instances' to be an list/array")
        if not doc["instances"]:
            raise _bad(f"JSON Value: {_debug(doc)} No values in 'instances' array")
        return _from_instances(doc["instances"], infos), ROW
    if "inputs" in doc:
        return _from_inputs(doc["inputs"], infos), COLUMNAR
    raise _bad("Missing 'inputs' or 'instances' key")


def _values(array: np.ndarray, as_b64: bool):
    """A numpy value as nested JSON lists; float32 as its shortest decimal, as TF Serving
    writes it (0.2, not 0.20000000298023224)."""
    if array.dtype == object or array.dtype.kind == "S":

        def leaf(b):
            return {"b64": base64.b64encode(b).decode()} if as_b64 else b.decode("utf-8", "replace")
    elif array.dtype == np.float32:

        def leaf(x):
            return float(str(x))
    else:
        return array.tolist()
    flat = np.array([leaf(v) for v in array.ravel()] + [None], dtype=object)[:-1]
    return flat.reshape(array.shape).tolist()


def make_json(outputs: dict, fmt: str) -> dict:
    """MakeJsonFromTensors: {"predictions": ...} for ROW, {"outputs": ...} for COLUMNAR.

    Args:
        outputs: {alias: numpy value}, as LoadedVersion.predict returns them.
        fmt: the format the request used.

    Returns:
        The answer, ready for json.dumps.
    """
    if not outputs:
        raise _bad("Cannot convert empty tensor map to JSON")
    arrays = {name: np.asarray(outputs[name]) for name in sorted(outputs)}
    columns = {
        name: _values(a, name.endswith("_bytes") and a.dtype == object)
        for name, a in arrays.items()
    }
    single = next(iter(columns.values())) if len(columns) == 1 else None
    if fmt == COLUMNAR:
        return {"outputs": columns if single is None else single}
    batch = None
    for name, a in arrays.items():
        if a.ndim == 0:
            raise _bad(f"Tensor name: {name} has no shape information ")
        if batch is not None and a.shape[0] != batch:
            raise _bad(
                f"Tensor name: {name} has inconsistent batch size: {a.shape[0]} expecting: {batch}"
            )
        batch = a.shape[0]
    if single is not None:
        return {"predictions": single}
    return {
        "predictions": [{name: column[i] for name, column in columns.items()} for i in range(batch)]
    }
