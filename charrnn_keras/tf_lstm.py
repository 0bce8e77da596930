"""``keras.layers.LSTM``'s sequence loop on TensorFlow ops, faster on a CPU: ``FastLSTM``'s
loop where oneDNN's fused op (``native_lstm.lstm_sequence``) is not built or not used.

What makes it faster on a CPU (figures in BENCHMARKS.md):

- The input projection is done for many time steps in one matmul outside the recurrence, and
  the weight gradients likewise (``x^T dz``, ``h^T dz``, ``dz W^T``), as in cuDNN. Keras
  multiplies ``[batch, in]`` blocks step by step, and its automatic gradient does four small
  matmuls per step; large matmuls run near the CPU's peak, small ones at about half.
- The backward pass is written by hand (``tf.custom_gradient``): the element-wise factors of
  every step are computed for all steps at once, so the serial part of each backward step is 7
  small ops instead of about 25.
- The loop is unrolled in the graph (the sequence length is fixed in training), which removes
  the per-iteration cost of ``tf.while_loop``.
- ``chains`` and ``time_chunks`` give TF's inter-op threads independent work: batch rows split
  into separate recurrences, and blocks of the large matmuls that overlap the recurrence. On a
  2-core machine, 1 intra-op and 2 inter-op threads with ``chains=2`` and blocks of about 10
  steps were fastest.
- Optionally (``matmul_dtype="bfloat16"``) the training matmuls take bfloat16 operands, which
  CPUs with native bf16 (AVX512_BF16, AMX) multiply about twice as fast; the cell state, the
  gate arithmetic, the weights and the outputs stay float32.
"""

from __future__ import annotations

import tensorflow as tf

from charrnn_keras import native_lstm


def _swap_c_o(w, units: int):
    """Swaps the c and o gate blocks along the last axis: Keras's i, f, c, o <-> i, f, o, c.

    With the three sigmoid gates side by side each step needs one sigmoid and one tanh. The
    swap is its own inverse, so the same function puts gradients back in Keras order.
    """
    u = units
    return tf.concat([w[..., : 2 * u], w[..., 3 * u :], w[..., 2 * u : 3 * u]], axis=-1)


def lstm_sequence(
    x, h0, c0, kernel, recurrent_kernel, bias, matmul_dtype=None, chains=1, time_chunks=1
):
    """Runs an LSTM over a whole sequence (tanh activation, sigmoid gates, with bias).

    Computes what ``keras.layers.LSTM`` computes, step for step:
    ``z = x_t W + h_{t-1} U + b``, ``c_t = f c_{t-1} + i tanh(z_c)``, ``h_t = o tanh(c_t)``,
    with a hand-written gradient.

    Args:
        x: ``[batch, time, in]`` inputs; ``time`` must be known when the graph is built.
        h0: ``[batch, units]`` initial output state.
        c0: ``[batch, units]`` initial cell state.
        kernel: ``[in, 4 * units]``, gates in Keras order i, f, c, o.
        recurrent_kernel: ``[units, 4 * units]``, same order.
        bias: ``[4 * units]``, same order.
        matmul_dtype: dtype of the matmul operands (e.g. ``"bfloat16"``), or None for ``x``'s
            dtype. oneDNN accumulates the products in float32; everything else (gates, cell
            state, outputs, gradients) stays in ``x``'s dtype.
        chains: split the batch rows into this many independent recurrences, which TF's
            inter-op threads run side by side (rows never interact, so the result is the
            same); 1 when the batch size is unknown or smaller than ``chains``.
        time_chunks: do the input projection and the weight-gradient matmuls in this many
            blocks of time steps, so that an inter-op thread runs one block's matmuls while
            the recurrence works on another (same result up to float summation order).

    Returns:
        ``(outputs [batch, time, units], h_last, c_last)``.
    """
    dtype = x.dtype
    mm_dtype = tf.as_dtype(matmul_dtype or dtype)
    batch, steps, n_in = x.shape
    units = recurrent_kernel.shape[0]
    if batch is None or batch < chains:
        chains = 1
    sizes = native_lstm.row_sizes(batch, chains) if batch else [-1]
    batch = batch if batch is not None else tf.shape(x)[0]
    n = max(1, min(time_chunks, steps))
    bounds = [(steps * j // n, steps * (j + 1) // n) for j in range(n)]

    def rows(t, axis=0):
        """Splits a tensor into the chains' batch rows (``axis`` is the batch axis)."""
        return tf.split(t, sizes, axis=axis) if chains > 1 else [t]

    def join(parts, axis=0):
        return tf.concat(parts, axis=axis) if chains > 1 else parts[0]

    def block(per_chain, start, end, width):
        """Stacks steps ``[start, end)`` of per-chain lists into ``[steps * batch, width]``."""
        stacked = join([tf.stack(p[start:end]) for p in per_chain], axis=1)
        return tf.reshape(stacked, [-1, width])

    def compute(t):
        """Casts a matmul product back to the compute dtype (a no-op without matmul_dtype)."""
        return tf.cast(t, dtype)

    @tf.custom_gradient
    def core(x_tm, h0, c0, kernel, recurrent_kernel, bias):
        # x_tm is time-major, so that a step's slice of a [time, batch, ...] tensor is a view
        # and a block of steps is a block of rows of x_flat.
        # Internally the gates are in i, f, o, c order; gradients are put back in Keras order.
        w_mm = tf.cast(_swap_c_o(kernel, units), mm_dtype)
        u_mm = tf.cast(_swap_c_o(recurrent_kernel, units), mm_dtype)
        b = _swap_c_o(bias, units)
        x_flat = tf.cast(tf.reshape(x_tm, [-1, n_in]), mm_dtype)  # rows in (time, batch) order
        x_blocks = [x_flat[start * batch : end * batch] for start, end in bounds]
        # The input projection of many steps in one matmul, outside the recurrence.
        xw = [[] for _ in range(chains)]
        for (start, end), xb in zip(bounds, x_blocks, strict=True):
            proj = tf.reshape(compute(tf.matmul(xb, w_mm)) + b, [end - start, batch, 4 * units])
            for k, part in enumerate(rows(proj, axis=1)):
                xw[k].extend(tf.unstack(part))
        h, c = rows(h0), rows(c0)
        h_ins, cs, sigs, gs, hs = ([[] for _ in range(chains)] for _ in range(5))
        for t in range(steps):
            for k in range(chains):
                h_in = tf.cast(h[k], mm_dtype)
                z = xw[k][t] + compute(tf.matmul(h_in, u_mm))
                z_ifo, z_c = tf.split(z, [3 * units, units], axis=1)
                sig = tf.sigmoid(z_ifo)
                g = tf.tanh(z_c)
                i, f, o = tf.split(sig, 3, axis=1)
                c[k] = f * c[k] + i * g
                h[k] = o * tf.tanh(c[k])
                h_ins[k].append(h_in)
                cs[k].append(c[k])
                sigs[k].append(sig)
                gs[k].append(g)
                hs[k].append(h[k])
        outputs = join([tf.stack(hk, axis=1) for hk in hs])
        c0_rows = rows(c0)

        def chain_factors(k):
            """The element-wise factors of every step of chain k, for all steps at once."""
            sig_all, g_all, c_all = tf.stack(sigs[k]), tf.stack(gs[k]), tf.stack(cs[k])
            i_all, f_all, o_all = tf.split(sig_all, 3, axis=2)
            c_prev = tf.concat([c0_rows[k][None], c_all[:-1]], axis=0)
            tc = tf.tanh(c_all)
            factors = tf.concat(
                [
                    g_all * i_all * (1 - i_all),
                    c_prev * f_all * (1 - f_all),
                    tc * o_all * (1 - o_all),
                    i_all * (1 - g_all * g_all),
                ],
                axis=2,
            )
            return tf.unstack(factors), tf.unstack(o_all * (1 - tc * tc)), tf.unstack(f_all)

        def grad(d_outputs, d_h, d_c):
            # A few large ops per chain compute the factors, so that the serial loop below
            # has 7 small ops per step instead of about 25.
            factors, dc_from_dh, forget = zip(
                *(chain_factors(k) for k in range(chains)), strict=True
            )
            d_out = [tf.unstack(p, axis=1) for p in rows(d_outputs)]
            dh_rec, dc_next = rows(d_h), rows(d_c)
            dzs = [[None] * steps for _ in range(chains)]
            dw, du, db, dx = [], [], [], []
            for j in reversed(range(n)):
                start, end = bounds[j]
                for t in reversed(range(start, end)):
                    for k in range(chains):
                        dh = d_out[k][t] + dh_rec[k]
                        dc = dc_next[k] + dh * dc_from_dh[k][t]
                        dz = tf.concat([dc, dc, dh, dc], axis=1) * factors[k][t]
                        dzs[k][t] = tf.cast(dz, mm_dtype)
                        dc_next[k] = dc * forget[k][t]
                        # At t == 0 this is h0's gradient; TF prunes it when nothing uses it.
                        dh_rec[k] = compute(tf.matmul(dzs[k][t], u_mm, transpose_b=True))
                # This block's weight gradients: large matmuls that need none of the steps
                # before it, so they overlap the recurrence of the earlier blocks.
                dz_b = block(dzs, start, end, 4 * units)
                h_prev = block(h_ins, start, end, units)  # h_{t-1} as the matmul saw it
                dw.append(compute(tf.matmul(x_blocks[j], dz_b, transpose_a=True)))
                du.append(compute(tf.matmul(h_prev, dz_b, transpose_a=True)))
                # A matmul with a row of ones: oneDNN sums rows much faster than reduce_sum.
                ones = tf.ones([1, tf.shape(dz_b)[0]], mm_dtype)
                db.append(compute(tf.matmul(ones, dz_b))[0])
                dx.insert(0, compute(tf.matmul(dz_b, w_mm, transpose_b=True)))
            return (
                tf.reshape(tf.concat(dx, axis=0), [steps, batch, n_in]),
                join(dh_rec),
                join(dc_next),
                _swap_c_o(tf.add_n(dw), units),
                _swap_c_o(tf.add_n(du), units),
                _swap_c_o(tf.add_n(db), units),
            )

        return (outputs, join(h), join(c)), grad

    return core(tf.transpose(x, [1, 0, 2]), h0, c0, kernel, recurrent_kernel, bias)
