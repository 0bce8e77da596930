"""TF Serving's warm-up file: requests a server replays before it reports a version AVAILABLE.

``export_run`` writes it into every SavedModel (``assets.extra/tf_serving_warmup_requests``,
``PredictionLog`` records in a TFRecord file); TF Serving and ``charrnn serve``
(``servable.LoadedVersion.warm_up``) replay it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

from charrnn_keras.serving import names

# Characters of the one-row warm-up request: as many as a typical request, so that the first
# client's request does not grow the loop's buffers.
SINGLE_ROW_CHARS = 200


def requests(model_name: str, max_chars: int | None = None) -> list:
    """The requests a server runs once before it reports a new version AVAILABLE.

    The first run of a Session prunes and optimises its graph, far slower than a request; TF
    Serving replays these (``assets.extra/tf_serving_warmup_requests``) so that no client pays
    for it. ``generate`` and ``serving_default`` once each, with rows that take every branch
    (both strategies, top-k and top-p on and off), then ``generate`` with one row as clients
    send it.

    Args:
        model_name: the model the requests name.
        max_chars: the export's cap on ``num_chars``: the one-row request asks for no more.

    Returns:
        ``PredictionLog`` messages.
    """
    chars = SINGLE_ROW_CHARS if max_chars is None else min(SINGLE_ROW_CHARS, int(max_chars))
    rows = {
        names.PRIME: np.array([b"", b"a"], object),
        names.NUM_CHARS: np.array([2, 1], np.int32),
        names.TEMPERATURE: np.array([1.0, 0.5], np.float32),
        names.TOP_K: np.array([0, 1], np.int32),
        names.TOP_P: np.array([1.0, 0.5], np.float32),
        names.SEED: np.array([[0, 0], [1, 0]], np.int64),
        names.STRATEGY: np.array([b"sample", b"words"], object),
    }
    # One row as most clients send it (no top-k or top-p, a few hundred characters): the
    # shapes of a one-row run, the branches that skip top-k and top-p, and a loop long enough
    # to grow the output buffers, none of which the rows above reach.
    single = {
        names.PRIME: np.array([b"The "[:chars]], object),
        names.NUM_CHARS: np.array([chars], np.int32),
        names.TEMPERATURE: np.array([1.0], np.float32),
        names.TOP_K: np.array([0], np.int32),
        names.TOP_P: np.array([1.0], np.float32),
        names.SEED: np.array([[0, 0]], np.int64),
        names.STRATEGY: np.array([b"sample"], object),
    }
    logs = []
    for signature, inputs in [(names.GENERATE, rows), (names.SERVING_DEFAULT, rows),
                              (names.GENERATE, single)]:  # fmt: skip
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model_name
        request.model_spec.signature_name = signature
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        logs.append(prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=request)))  # fmt: skip
    return logs


def write(saved_model_dir, model_name: str, max_chars: int | None = None) -> Path:
    """Writes TF Serving's warm-up file into a SavedModel folder.

    Args:
        saved_model_dir: the SavedModel folder.
        model_name: the model the requests name.
        max_chars: the export's cap on ``num_chars`` (``requests``).

    Returns:
        The path of the TFRecord file.
    """
    folder = Path(saved_model_dir) / names.WARMUP_DIR
    folder.mkdir(exist_ok=True)
    path = folder / names.WARMUP_FILE
    with tf.io.TFRecordWriter(str(path)) as writer:
        for log in requests(model_name, max_chars):
            writer.write(log.SerializeToString())
    return path
