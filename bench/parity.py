"""Ours against the PyTorch reference from the same initial weights on the same batches.

Usage::

    python bench/parity.py                                   # 2 x 128, 300 steps, float32
    python bench/parity.py --units 512 --emb 128 --batch 100 --seq 100 --chars 1200000 \\
        --dtype bfloat16 --dropout 0.35 --weight-decay 0.5 --ema 0.995 --steps 400 --every 50
    python bench/parity.py ... --epsilon 1e-9 --bias-lr 2 --lr-decay 0.97   # PyTorch's Adam
    python bench/parity.py ... --seed 1 --ours-only [--own-draw]   # ours alone, from a draw

``torch_ref.Trainer`` draws its weights; ours (``build_model`` and ``compile_model``, FastLSTM on
``--loop``) gets the same values (LSTM kernels transposed, ``b_ih + b_hh`` as the one bias).
Both then train step for step on the same stateful batches of tinyshakespeare's first
``--chars`` characters, in one process, and every ``--every`` steps the script prints both
mean training losses and both validation losses (last 10%, from a zero state, averaged weights
with ``--ema``). With no dropout, float32 and a negligible epsilon the two agree to rounding;
what is left when a setting is turned on is that setting's difference between the two
frameworks (BENCHMARKS.md, section 2: Keras's epsilon placement). ``--ours-only`` trains ours
alone (from PyTorch's draw of ``--seed``, or from its own with ``--own-draw``): how much the
draw alone moves the curve.
"""

from __future__ import annotations

import argparse
import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import common  # noqa: E402
import numpy as np  # noqa: E402


def copy_weights(torch_model, ours) -> None:
    """Gives ours the PyTorch reference's weights (kernels transposed, the two biases summed)."""
    w = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    ours.get_layer("embedding").embeddings.assign(w["embedding.weight"])
    for layer in range(2):
        cell = ours.get_layer(f"lstm_{layer + 1}").cell
        cell.kernel.assign(w[f"lstm.weight_ih_l{layer}"].T)
        cell.recurrent_kernel.assign(w[f"lstm.weight_hh_l{layer}"].T)
        cell.bias.assign(w[f"lstm.bias_ih_l{layer}"] + w[f"lstm.bias_hh_l{layer}"])
    ours.get_layer("logits").kernel.assign(w["logits.weight"].T)
    ours.get_layer("logits").bias.assign(w["logits.bias"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=50, help="steps between validations")
    p.add_argument("--units", type=int, default=128)
    p.add_argument("--emb", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=50)
    p.add_argument("--chars", type=int, default=400_000, help="of tinyshakespeare, from its start")
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--lr-decay", type=float, default=1.0, help="per pass over the split")
    p.add_argument("--bias-lr", type=float, default=1.0, help="ours: the LSTM biases' lr factor")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema", type=float, default=0.0)
    p.add_argument("--epsilon", type=float, default=1e-7, help="ours: train.epsilon")
    p.add_argument("--torch-epsilon", type=float, default=1e-7, help="PyTorch's Adam eps")
    p.add_argument("--single-bias", action="store_true", help="PyTorch: b_hh frozen at zero")
    p.add_argument("--loop", default="auto", help="ours: model.lstm_loop")
    p.add_argument("--dtype", default="float32", help="float32, or bfloat16 (torch: autocast)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="both draws' seed (torch and Keras)")
    p.add_argument("--own-draw", action="store_true", help="ours keeps its own initial weights")
    p.add_argument("--init", default="keras", help="ours with --own-draw: model.init")
    p.add_argument("--ours-only", action="store_true", help="train ours alone (no PyTorch)")
    a = p.parse_args()

    import keras
    import tensorflow as tf
    import torch
    import torch_ref

    from charrnn_keras import data as data_lib
    from charrnn_keras.averaging import averaged_weights
    from charrnn_keras.callbacks import ValidationLoss
    from charrnn_keras.config import ModelConfig, TrainConfig
    from charrnn_keras.model import build_model, compile_model, reset_states

    # The two take turns, so each may use every core.
    torch.set_num_threads(a.threads)
    tf.config.threading.set_intra_op_parallelism_threads(a.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)

    ids, vocab = common.tinyshakespeare_ids()
    train_ids, val_ids = data_lib.split(ids[: a.chars], 0.1)
    xs, ys = data_lib.stream_batches(train_ids, a.batch, a.seq)
    vx, vy = data_lib.stream_batches(val_ids, a.batch, a.seq)

    ref = torch_ref.Trainer(vocab, a.emb, a.units, 2, a.batch, learning_rate=a.lr, grad_clip=5.0,
                            bf16=a.dtype == "bfloat16", seed=a.seed, dropout=a.dropout,
                            weight_decay=a.weight_decay, ema=a.ema)  # fmt: skip
    for group in ref.optimizer.param_groups:
        group["eps"] = a.torch_epsilon
    if a.single_bias:
        for layer in range(2):
            bias = getattr(ref.model.lstm, f"bias_hh_l{layer}")
            with torch.no_grad():
                bias.zero_()
            bias.requires_grad_(False)

    cfg = ModelConfig(rnn_size=a.units, embedding_dim=a.emb, num_layers=2, dropout=a.dropout,
                      fast_lstm=True, matmul_dtype=a.dtype, lstm_loop=a.loop,
                      init=a.init)  # fmt: skip
    keras.utils.set_random_seed(a.seed)
    ours = build_model(cfg, vocab, a.batch, a.seq)
    compile_model(ours, TrainConfig(learning_rate=a.lr, grad_clip=5.0, epsilon=a.epsilon,
                                    weight_decay=a.weight_decay, ema=a.ema))  # fmt: skip
    if a.bias_lr != 1:
        common.scale_bias_lr(ours, a.bias_lr)
    if not a.own_draw:
        copy_weights(ref.model, ours)

    val_ds = tf.data.Dataset.from_tensor_slices((vx.astype("int32"), vy.astype("int32")))
    validation = ValidationLoss(ours, val_ds)
    vxt, vyt = (torch.from_numpy(v.astype(np.int64)) for v in (vx, vy))
    ref_losses, our_losses = [], []
    for step in range(a.steps):
        k = step % len(xs)
        if k == 0:  # an epoch starts from a zero state and a decayed learning rate in both
            ref.reset()
            reset_states(ours)
            lr = a.lr * a.lr_decay ** (step // len(xs))
            for group in ref.optimizer.param_groups:
                group["lr"] = lr
            ours.optimizer.learning_rate.assign(lr)
        x, y = xs[k], ys[k]
        if not a.ours_only:
            ref_loss = ref.train_step(torch.from_numpy(x.astype(np.int64)),
                                      torch.from_numpy(y.astype(np.int64)))  # fmt: skip
            ref_losses.append(float(ref_loss))
        our_losses.append(float(ours.train_on_batch(x.astype("int32"), y.astype("int32"))[0]))
        if (step + 1) % a.every == 0:
            with averaged_weights(ours):
                ours_val = validation()
            ref_val = math.nan if a.ours_only else ref.evaluate(vxt, vyt)
            ref_train = np.mean(ref_losses[-a.every :]) if ref_losses else math.nan
            print(f"step {step + 1:5d}  train torch {ref_train:.4f} "
                  f"ours {np.mean(our_losses[-a.every:]):.4f}  val torch {ref_val:.4f} "
                  f"ours {ours_val:.4f} ({ours_val - ref_val:+.4f})", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
