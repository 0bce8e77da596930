"""The matvec kernel's products whole and in column blocks: time per product and bits.

Usage::

    python bench/matvec_blocks.py                        # 128-1,024 units, rows 1 and 8
    python bench/matvec_blocks.py --units 512 --blocks 32 64 128 --windows 9
    python bench/matvec_blocks.py --units 512 --blocks 64 --tall   # and the transposed matmul

For each ``units`` (an LSTM layer's ``[units, 4 units]`` matrix), three random matrices are
multiplied in turn, each product feeding the next, in a ``tf.while_loop`` of ``--steps``
steps on one intra-op thread (``charrnn serve``'s): ``lstm_step._rowwise`` on the whole matrix
against ``lstm_step._blockwise`` on blocks of each ``--blocks`` width. Windows alternate
between the variants; medians of microseconds per product are printed. Before timing, every
variant's product is checked bit for bit against the whole matrix's for 1, 2, 3, 8 and 16
rows (``lstm_step`` relies on it: a row alone and the same row in a batch get the same text).

``--tall`` adds ``(w^T x^T)^T``, one matmul of the transposed matrix by the rows (``[4u, u] @
[u, rows]``): it reads each weight once for all rows, but its bits are never the whole
matrix's (so the check above reports it at every row count); it also prints at which row
counts a row gets the bits it gets among 8 (issue 14's search for a product that keeps a
lone row's bits and runs faster at 8 rows).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import common  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from charrnn_keras import lstm_step  # noqa: E402


def chain(products, units: int, steps: int):
    """A compiled loop of ``steps`` x ``len(products)`` products, each fed by the last."""

    @tf.function(autograph=False)
    def run(x):
        def body(i, x):
            y = x
            for product in products:
                y = product(y[:, :units] * 0.01)
            return i + 1, x + 0.0 * y[:, :units]

        return tf.while_loop(lambda i, _: i < steps, body, [0, x])[1]

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--blocks", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--windows", type=int, default=7)
    parser.add_argument("--tall", action="store_true", help="also the transposed matmul")
    args = parser.parse_args()
    common.set_tf_threads(1, 2)
    print(common.machine())
    rng = np.random.default_rng(0)
    for units in args.units:
        mats = [tf.constant(rng.normal(size=(units, 4 * units)).astype(np.float32) * 0.05)
                for _ in range(3)]  # fmt: skip
        variants = {"whole": [lambda x, w=w: lstm_step._rowwise(x, w) for w in mats]}
        for width in args.blocks:
            blocked = [lstm_step._column_blocks(w, width) for w in mats]
            variants[f"blocks of {width}"] = [lambda x, b=b: lstm_step._blockwise(x, b)
                                              for b in blocked]  # fmt: skip
        if args.tall:
            tall = [tf.transpose(w) for w in mats]
            variants["tall"] = [lambda x, t=t: tf.transpose(tf.matmul(t, x, transpose_b=True))
                                for t in tall]  # fmt: skip
            xs = rng.normal(size=(16, units)).astype(np.float32)
            among_8 = variants["tall"][0](tf.constant(xs[:8])).numpy()
            shared = [rows for rows in (1, 2, 3, 4, 5, 8, 9, 16)
                      if np.array_equal(variants["tall"][0](tf.constant(xs[:rows])).numpy()[:8],
                                        among_8[:rows])]  # fmt: skip
            print(f"{units} units: tall, rows whose bits are those they get among 8 at {shared}")
        for rows in (1, 2, 3, 8, 16):
            x = tf.constant(rng.normal(size=(rows, units)).astype(np.float32))
            whole = variants["whole"][0](x).numpy()
            for name, products in variants.items():
                same = np.array_equal(products[0](x).numpy(), whole)
                if not same:
                    print(f"{units} units, {rows} rows: {name} has other bits than the whole")
        for rows in args.rows:
            x = tf.constant(rng.normal(size=(rows, units)).astype(np.float32))
            runs = {name: chain(p, units, args.steps) for name, p in variants.items()}
            times = {name: [] for name in runs}
            for run in runs.values():
                run(x)  # trace and warm up
            for _ in range(args.windows):
                for name, run in runs.items():
                    start = time.perf_counter()
                    run(x).numpy()
                    times[name].append((time.perf_counter() - start) / (3 * args.steps) * 1e6)
            cells = ", ".join(f"{n} {statistics.median(t):,.1f}" for n, t in times.items())
            print(f"{units} units, {rows} rows, us per product: {cells}")


if __name__ == "__main__":
    main()
