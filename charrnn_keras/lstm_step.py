"""A fused LSTM step for generation: the model's Embedding, LSTM layers and Dense in few ops.

Generation runs one character per loop iteration, so at batch 1 to 8 a step is bound by the
number of ops the executor dispatches and by reading the weights, not by arithmetic. Keras's
cell call costs about a dozen ops per layer plus the embedding lookup; here:

- layer 1's input matmul is precomputed for every character: ``embeddings @ kernel`` is a
  ``[vocab, 4u]`` table, so the input side of the first layer is one gather (a row of the
  table is bit for bit the row's own matmul);
- every layer adds in Keras's order (``(x W + h U) + b``), so float32 gives Keras's numbers
  exactly, not merely close ones: the text cannot drift from the cells' at a near-tie;
- gates are split once, in Keras's order i, f, c, o;
- ``kernel="matvec"`` multiplies each row alone (a batched matmul of ``[rows, 1, n]``), which
  is the 1x1 model's own numbers and needs no padding rows; ``auto`` (``default_kernel``)
  picks it on AVX2 CPUs without AVX-512, where a lone row's product is fastest. Matrices of
  1 MiB or more are held in blocks of 64 columns, multiplied block by block, each block by
  every row while it is in the L2 cache: the same bits, and batches of several rows read
  the weights from L3 once a step instead of once a row;
- ``weights_dtype="bfloat16"`` stores the recurrent, upper-layer and output kernels in
  bfloat16 (half the memory read per step); the state and the gate arithmetic stay float32.
  The text then differs from the float32 model's, so it is opt-in.

The derived weights are computed from the model's variables once per call, outside the loop,
so a SavedModel still holds each variable once and the ``step`` signature reads the same ones.
Only standard TensorFlow ops (gather, matmul, split, sigmoid, tanh), so TF Serving runs it.
"""

from __future__ import annotations

import logging

import keras
import numpy as np
import tensorflow as tf

from charrnn_keras import cpu
from charrnn_keras.limits import KERNELS

log = logging.getLogger(__name__)

WEIGHTS_DTYPES = ("float32", "bfloat16")
# matvec's column blocks: 64 columns of 512 rows are 128 KiB, well inside a 512 KiB L2.
COLUMN_BLOCK = 64
# A 128-unit layer's 256 KiB matrix stays in L2 whole, where blocks only add ops; from
# 256 units (1 MiB) on they paid (BENCHMARKS.md, 3, "Column blocks").
BLOCKED_BYTES = 1 << 20


def default_kernel(cpuinfo: str | None = None) -> str:
    """The kernel ``auto`` means: the fastest measured on this kind of CPU.

    ``matvec`` on x86 CPUs with AVX2 and without AVX-512: there a 1-row product runs 2.5x
    faster than a 2-6-row one, so ``matmul``'s padding to 4 rows costs more than it saves
    (the export against the pre-issue-14 one: batch 1 1.9-3.4x against 0.7-1.0x, batch 8
    1.55-1.77x with the column blocks against 0.95-1.1x; BENCHMARKS.md, 3). ``matmul``
    elsewhere: on AVX-512 and AMX it was measured at 1.5x (batch 1) and 1.7x (batch 8) and
    ``matvec`` never was, and 8 rows there are one product, not 8.

    Args:
        cpuinfo: the text of /proc/cpuinfo (read when None).
    """
    return "matvec" if cpu.avx2_only(cpuinfo) else "matmul"


def padded_rows(batch):
    """The rows to run ``batch`` rows as, so that each row's matmul gets the same bits in any
    batch: at least 4, and never 1-3 rows more than a multiple of 6.

    oneDNN's float32 matmul rounds a row by the block of rows it shares in the kernel: on
    AVX2 rows go in blocks of 6, and a block of 1-3 rows sums in another order than one of
    4-6; on AVX-512 a lone row is a matrix-vector product. 4, 5, 6, 10, 11, 12, ... rows give
    every row the same bits on both (tests/test_lstm_step.py checks this machine's).

    Args:
        batch: the row count, an int or an int32 scalar tensor.

    Returns:
        The padded row count, ``batch`` or more, of ``batch``'s kind.
    """
    rows = tf.maximum(batch, 4) if tf.is_tensor(batch) else max(batch, 4)
    tail = rows % 6
    short = (tail >= 1) & (tail <= 3)
    return rows + (tf.where(short, 4 - tail, 0) if tf.is_tensor(batch) else short * (4 - tail))


def supported(model: keras.Model) -> bool:
    """Whether ``FusedStep`` computes this model's step: Embedding, LSTM layers with Keras's
    default activations and a bias, Dropout (off when generating), a linear Dense."""
    kinds = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.LSTM):
            cell = layer.cell
            ok = (cell.use_bias and cell.activation is keras.activations.tanh
                  and cell.recurrent_activation is keras.activations.sigmoid)  # fmt: skip
            kinds.append("lstm" if ok else "other")
        elif isinstance(layer, keras.layers.Embedding):
            kinds.append("embedding")
        elif isinstance(layer, keras.layers.Dense):
            kinds.append("dense" if layer.activation is keras.activations.linear else "other")
        elif not isinstance(layer, keras.layers.Dropout):
            kinds.append("other")
    return (len(kinds) >= 3 and kinds[0] == "embedding" and kinds[-1] == "dense"
            and all(k == "lstm" for k in kinds[1:-1]))  # fmt: skip


class FusedStep:
    """The step of a model that ``supported`` accepts, on explicit state.

    Args:
        model: the built model (any batch size), weights loaded.
        weights_dtype: ``float32`` (the same text as Keras's cells) or ``bfloat16``.
        kernel: ``matmul``, plain matmuls: Keras's cells' numbers at the same row count, bit
            for bit (``Generator`` pads the rows, ``padded_rows``); ``matvec``, one
            matrix-vector product per row: what Keras's 1x1 model computes for the row
            alone, so rows need no padding (bit for bit on AVX2, where it was measured);
            ``block``, ``tf.raw_ops.LSTMBlockCell``; ``auto``, ``default_kernel()``.
    """

    def __init__(self, model: keras.Model, weights_dtype: str = "float32", kernel: str = "matmul"):
        if weights_dtype not in WEIGHTS_DTYPES:
            raise ValueError(f"weights_dtype must be one of {WEIGHTS_DTYPES}, got {weights_dtype}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel}")
        self.kernel = default_kernel() if kernel == "auto" else kernel
        self.dtype = tf.as_dtype(weights_dtype)
        self.embedding = next(m for m in model.layers if isinstance(m, keras.layers.Embedding))
        self.cells = [m.cell for m in model.layers if isinstance(m, keras.layers.LSTM)]
        self.dense = next(m for m in model.layers if isinstance(m, keras.layers.Dense))

    def weights(self, frozen: bool = False, rows: int | None = None) -> list:
        """The derived weights, as tensors: call once, outside the loop.

        Args:
            frozen: return the matrices' values now, as numpy arrays (computed by the same
                TensorFlow kernels), for a graph that holds them as constants. Biases stay
                tensors: a constant bias lets Grappler fold ``(x W + h U) + b`` into a fused
                matmul with its bias, other rounding than Keras's and, at batch 8, about 3x
                slower than the plain matmul on oneDNN (BENCHMARKS.md, 3).
            rows: the batch's rows where the trace knows them. ``matvec`` holds its large
                matrices in column blocks (``_column_blocks``) unless there is one row, which
                reads each matrix once a step either way and pays for the blocks' extra ops.

        Returns:
            ``[table, U_1, b_1, (W_2, U_2, b_2), ..., dense kernel, dense bias]``: the layer-1
            table ``[vocab, 4u]`` is float32 (a gather reads one row), the kernels
            ``weights_dtype``.
        """
        if frozen:
            live = self.weights(rows=rows)
            with tf.init_scope():  # eagerly, even while a graph is traced
                values = [w.numpy() for w in self.weights(rows=rows)]
            return [v if v.ndim >= 2 else w for v, w in zip(values, live, strict=True)]
        if self.kernel == "block":
            return self._block_weights()
        return [self._table(_value(self.embedding.embeddings)), *self._kernels(rows != 1)]

    def once(self, char_ids, states: list):
        """One step from the variables, for a single call (the export's ``step``): the
        layer-1 table is made of the rows' own characters only. ``matvec`` only, where a
        table row is the row's own product, so this is ``__call__``'s step bit for bit.

        Args:
            char_ids: int32 ``[batch]``.
            states: float32 ``[h_1, c_1, ...]``, each ``[batch, units]``.

        Returns:
            ``(logits [batch, vocab] float32, new states)``.
        """
        if self.kernel != "matvec":
            raise ValueError(f"once() needs the matvec kernel, got {self.kernel}")
        rows = self._table(tf.gather(_value(self.embedding.embeddings), char_ids))
        return self([rows, *self._kernels()], tf.range(tf.shape(char_ids)[0]), states)

    def _table(self, embeddings):
        """``embeddings @ kernel`` of layer 1, ``[rows, 4u]`` float32."""
        kernel = _value(self.cells[0].kernel)
        if self.kernel == "matvec":
            return _rowwise(embeddings, kernel)
        vocab = embeddings.shape[0]  # padded as a batch is, for the cells' bits in every row
        padded = tf.pad(embeddings, [[0, padded_rows(vocab) - vocab], [0, 0]])
        return tf.matmul(padded, kernel)[:vocab]

    def _kernels(self, blocked: bool = True) -> list:
        def matrix(variable):
            w = tf.cast(_value(variable), self.dtype)
            big = (
                w.shape.num_elements() * w.dtype.size >= BLOCKED_BYTES
                and w.shape[1] % COLUMN_BLOCK == 0
            )
            return _column_blocks(w) if blocked and big and self.kernel == "matvec" else w

        first = self.cells[0]
        out = [matrix(first.recurrent_kernel), _value(first.bias)]
        for cell in self.cells[1:]:
            out += [matrix(cell.kernel), matrix(cell.recurrent_kernel), _value(cell.bias)]
        return out + [matrix(self.dense.kernel), _value(self.dense.bias)]

    def __call__(self, weights: list, char_ids, states: list):
        """One character per row through every layer.

        Args:
            weights: from ``weights()``.
            char_ids: int32 ``[batch]``.
            states: float32 ``[h_1, c_1, h_2, c_2, ...]``, each ``[batch, units]``.

        Returns:
            ``(logits [batch, vocab] float32, new states)``.
        """
        # numpy values become constants of the graph being traced (see draw_loop.draw).
        weights = [tf.constant(w) if isinstance(w, np.ndarray) else w for w in weights]
        if self.kernel == "block":
            return self._block_step(weights, char_ids, states)
        table, recurrent, bias = weights[:3]
        z = tf.gather(table, char_ids) + self._matmul(states[0], recurrent) + bias
        h, c = _gates(z, states[1])
        new = [h, c]
        for n in range(1, len(self.cells)):
            kernel, recurrent, bias = weights[3 * n : 3 * n + 3]
            z = self._matmul(h, kernel) + self._matmul(states[2 * n], recurrent) + bias
            h, c = _gates(z, states[2 * n + 1])
            new += [h, c]
        return self._matmul(h, weights[-2]) + weights[-1], new

    def _block_weights(self) -> list:
        """``[embeddings, (w, b) per layer, zeros, dense kernel, dense bias]`` for
        ``tf.raw_ops.LSTMBlockCell``: ``w = [W; U]`` and ``b`` with the gates in its order
        i, c, f, o."""
        out = [_value(self.embedding.embeddings)]
        for cell in self.cells:
            w = tf.concat([_value(cell.kernel), _value(cell.recurrent_kernel)], axis=0)
            out += [_icfo(w, cell.units), _icfo(_value(cell.bias), cell.units)]
        zeros = tf.zeros([self.cells[0].units], tf.float32)
        return out + [zeros, _value(self.dense.kernel), _value(self.dense.bias)]

    def _block_step(self, weights, char_ids, states):
        x, new, zeros = tf.gather(weights[0], char_ids), [], weights[-3]
        for n in range(len(self.cells)):
            w, b = weights[1 + 2 * n : 3 + 2 * n]
            # No forget bias, no clipping, no peepholes: Keras's cell exactly.
            out = tf.raw_ops.LSTMBlockCell(
                x=x, cs_prev=states[2 * n + 1], h_prev=states[2 * n], w=w, wci=zeros, wcf=zeros,
                wco=zeros, b=b, forget_bias=0.0, cell_clip=-1.0, use_peephole=False,
            )  # fmt: skip
            x = out[6]
            new += [out[6], out[1]]
        return tf.matmul(x, weights[-2]) + weights[-1], new

    def _matmul(self, x, w):
        if w.shape.rank == 4:
            product = _blockwise
        else:
            product = _rowwise if self.kernel == "matvec" else tf.matmul
        if self.dtype == tf.float32:
            return product(x, w)
        return tf.cast(product(tf.cast(x, self.dtype), w), tf.float32)


def _rowwise(x, w):
    """``x @ w`` as one matrix-vector product per row (a batched matmul of ``[rows, 1, n]``):
    each row's bits are its own in any batch, so rows need no padding, and on AVX2 a 1-row
    product runs 2.5x faster than a 2-6-row one (BENCHMARKS.md, 3)."""
    return tf.matmul(x[:, None, :], w)[:, 0, :]


def _column_blocks(w, width: int = COLUMN_BLOCK):
    """``w [n, m]`` as ``[m / width, 1, n, width]``, its blocks of ``width`` columns."""
    n, m = w.shape
    return tf.transpose(tf.reshape(w, [n, m // width, width]), [1, 0, 2])[:, None]


def _blockwise(x, blocks):
    """``x @ w`` from ``_column_blocks(w)``: one matrix-vector product per block and row, all
    rows of a block one after another (the batched matmul runs its batch in order), so the
    block is read from L2 for every row but the first. A column's sum is the same whatever
    columns are beside it, so these are ``_rowwise``'s bits (on AVX2 the batch-8 product ran
    1.2-2.6x faster for 256-1,024 units: BENCHMARKS.md, 3)."""
    y = tf.matmul(x[None, :, None, :], blocks)  # [blocks, rows, 1, width]
    columns = blocks.shape[0] * blocks.shape[3]
    return tf.reshape(tf.transpose(y[:, :, 0, :], [1, 0, 2]), [-1, columns])


def _gates(z, c):
    """Keras's LSTM update from the pre-activations ``z`` (gates i, f, c, o)."""
    i, f, g, o = tf.split(z, 4, axis=1)
    c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
    return tf.sigmoid(o) * tf.tanh(c), c


def _icfo(w, units: int):
    """Keras's gate blocks i, f, c, o (last axis) in LSTMBlockCell's order i, c, f, o."""
    i, f, c, o = tf.split(w, 4, axis=-1)
    return tf.concat([i, c, f, o], axis=-1)


def _value(variable):
    """The value of a Keras variable, read here: a variable used inside the loop would be read
    again on every character (a ReadVariableOp per weight per step)."""
    return tf.convert_to_tensor(getattr(variable, "value", variable))
