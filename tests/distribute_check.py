"""Runs in a fresh process for tests/test_distribute.py: the CPU is cut into 2 logical devices
before TensorFlow starts, which a process that already ran TensorFlow (pytest's) cannot do.

Prints one JSON object with what the tests assert on. Usage: ``distribute_check.py CORPUS OUT``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

from charrnn_keras import data as data_lib  # noqa: E402
from charrnn_keras import distribute, replicas  # noqa: E402
from charrnn_keras.callbacks import ValidationLoss  # noqa: E402
from charrnn_keras.config import load_config  # noqa: E402
from charrnn_keras.model import build_model, compile_model, rnn_layers  # noqa: E402
from charrnn_keras.train import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
corpus, out = Path(sys.argv[1]), Path(sys.argv[2])
B, T = 4, 8
result = {}


def config(mode: str, *extra):
    overrides = [f'train.distribute="{mode}"', "train.sample_chars=0", "train.epochs=3",
                 "train.grad_clip=0.5", *extra]  # fmt: skip
    if mode == "mirrored":
        overrides.append("train.replicas=2")
    return load_config(REPO / "configs" / "tiny.toml", overrides)


# 1. The rows each replica receives: replica k owns rows [2k, 2k + 2) of every global batch.
topology = distribute.make_topology(config("mirrored"))
ids = np.frombuffer(corpus.read_bytes(), np.uint8).astype(np.int32) % 16
xs, _ = data_lib.stream_batches(ids, B, T)
dataset, steps = distribute.distributed_dataset(topology, ids, B, T)
received = []
for _, (x, _y) in zip(range(steps + 2), dataset, strict=False):  # the 2nd epoch too
    received.append([r.numpy().tolist() for r in topology.strategy.experimental_local_results(x)])
result["rows_ok"] = all(
    received[s][k] == xs[s % steps, 2 * k : 2 * k + 2].tolist()
    for s in range(steps + 2)
    for k in range(2)
)


class Record(keras.callbacks.Callback):
    def __init__(self, into):
        super().__init__()
        self.into = into

    def on_train_batch_end(self, batch, logs=None):
        self.into.append(float(logs["loss"]))


def fit_steps(mode: str, steps: int, *extra, losses=None):
    """Builds the model as train() does and fits ``steps`` steps; returns (model, topology)."""
    cfg = config(mode, *extra)
    topo = distribute.make_topology(cfg)
    keras.utils.set_random_seed(7)
    with replicas.building(topo):
        model = build_model(cfg.model, 16, B // topo.replicas, T)
        compile_model(model, cfg.train, distributed=topo.strategy is not None)
    replicas.use_scope_strategy(model, topo)
    if topo.strategy is None:
        ds, _ = data_lib.make_dataset(ids, B, T)
    else:
        ds, _ = distribute.distributed_dataset(topo, ids, B, T)
    callbacks = [Record(losses)] if losses is not None else []
    with topo.scope():
        model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False,
                  callbacks=callbacks)  # fmt: skip
    return model, topo


# 2. Per-replica state: after 3 steps each replica's state is the one device's rows of it.
states = {}
for mode in ("none", "mirrored"):
    model, topo = fit_steps(mode, 3)
    layer = rnn_layers(model)[-1]
    h = replicas.replica_states(topo, layer.states[0])
    states[mode] = np.concatenate(h, axis=0)
    if mode == "mirrored":
        result["replica_states_differ"] = bool(np.abs(h[0] - h[1]).max() > 1e-3)
        # Validation in the middle of training leaves every replica's state as it was.
        val_ds, val_steps = distribute.distributed_dataset(topo, ids, B, T)
        loss = ValidationLoss(model, val_ds, topo, val_steps)()
        after = np.concatenate(replicas.replica_states(topo, layer.states[0]), axis=0)
        result["validation_keeps_state"] = bool(np.array_equal(after, states[mode]))
        result["validation_loss_finite"] = bool(np.isfinite(loss))
result["state_max_diff"] = float(np.abs(states["none"] - states["mirrored"]).max())

# 3. The other LSTM paths under the strategy: Keras' own LSTM, and FastLSTM in bf16.
for name, extra in [("keras_lstm", "model.fast_lstm=false"),
                    ("bf16", 'model.matmul_dtype="bfloat16"')]:  # fmt: skip
    per_mode = {}
    for mode in ("none", "mirrored"):
        per_mode[mode] = []
        fit_steps(mode, 6, extra, losses=per_mode[mode])
    diff = np.abs(np.subtract(per_mode["none"], per_mode["mirrored"]))
    result[f"{name}_loss_max_diff"] = float(diff.max())
    result[f"{name}_loss_moved"] = float(abs(per_mode["none"][-1] - per_mode["none"][0]))

# 4. The whole train(): the same loss at every step and the same history, clipping active.
losses, runs = {}, {}

for mode in ("none", "mirrored"):
    losses[mode] = []
    run = out / f"run-{mode}"
    r = train(config(mode), data=str(corpus), run_dir=run, verbose=0,
              extra_callbacks=[Record(losses[mode])])  # fmt: skip
    runs[mode] = (run / "history.csv").read_text().splitlines()
    result[f"best_{mode}"] = r.best_val_loss
result["steps"] = len(losses["none"])
result["loss_max_diff"] = float(np.abs(np.subtract(losses["none"], losses["mirrored"])).max())
result["history_rows"] = [len(runs["none"]), len(runs["mirrored"])]
hist = [np.array([row.split(",") for row in runs[m][1:]], float) for m in ("none", "mirrored")]
result["history_max_diff"] = float(np.abs(hist[0] - hist[1]).max())


def h5_arrays(path) -> list:
    """Every dataset of an HDF5 file, in the file's order."""
    arrays = []
    with h5py.File(path) as f:
        f.visititems(
            lambda _, obj: arrays.append(obj[()]) if isinstance(obj, h5py.Dataset) else None
        )
    return arrays


# 5. The weights' moving average and weight decay (train.ema, train.weight_decay) under the
# strategy: the same validation history (of the average) and best checkpoint as on one device.
hists, best = {}, {}
for mode in ("none", "mirrored"):
    run = out / f"run-ema-{mode}"
    train(config(mode, "train.ema=0.8", "train.weight_decay=0.5"), data=str(corpus), run_dir=run,
          verbose=0)  # fmt: skip
    rows = (run / "history.csv").read_text().splitlines()[1:]
    hists[mode] = np.array([row.split(",") for row in rows], float)
    best[mode] = h5_arrays(run / "checkpoints" / "best.weights.h5")
result["ema_history_max_diff"] = float(np.abs(hists["none"] - hists["mirrored"]).max())
result["ema_best_max_diff"] = max(
    float(np.abs(np.asarray(a, float) - np.asarray(b, float)).max())
    for a, b in zip(best["none"], best["mirrored"], strict=True)
)
print(json.dumps(result))
