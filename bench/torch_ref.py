"""The PyTorch reference: the same model, loss, optimiser and state handling as ours.

Embedding, ``num_layers`` stacked ``nn.LSTM`` (no dropout), Linear logits; mean cross-entropy
over all characters; Adam (lr 0.002, betas 0.9/0.999, eps 1e-7) with gradients clipped to
global norm 5; the LSTM state is carried from batch to batch and detached, as Keras's stateful
layers do. The same eps is not the same Adam: PyTorch adds it after the bias correction, Keras
before, where early in training it weighs up to 31x more (``bench/parity.py``; BENCHMARKS.md,
2). Benchmark-only: the package never imports torch.
"""

from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import torch
from torch import nn


def set_threads(threads: int, interop: int = 1) -> None:
    """Sets PyTorch's intra-op (OpenMP) threads and inter-op threads (once per process)."""
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # interop threads can be set only once
        torch.set_num_interop_threads(interop)


class CharLSTM(nn.Module):
    """Embedding -> stacked LSTM -> Linear, like ``charrnn_keras.model.build_model``.

    ``dropout`` follows every LSTM layer, as in ours: ``nn.LSTM`` applies it between layers,
    and one more ``nn.Dropout`` after the last.
    """

    def __init__(self, vocab, embedding_dim, rnn_size, num_layers, dropout=0.0):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, rnn_size, num_layers, batch_first=True, dropout=dropout)
        self.dropout = nn.Dropout(dropout)
        self.logits = nn.Linear(rnn_size, vocab)

    def forward(self, x, state):
        out, state = self.lstm(self.embedding(x), state)
        return self.logits(self.dropout(out)), state


class Trainer:
    """One model, its optimiser and its carried state.

    Args:
        vocab, embedding_dim, rnn_size, num_layers: the model.
        batch_size: rows per batch (state rows).
        learning_rate: Adam's learning rate.
        grad_clip: global gradient norm clip.
        bf16: run forward and backward under CPU autocast to bfloat16 (weights stay float32).
        seed: torch's seed.
        dropout: dropout rate after each LSTM layer while training.
        weight_decay: AdamW's decoupled decay of every weight but biases (0 = Adam), as ours.
        ema: momentum of a moving average of the weights that ``evaluate`` scores (0 = none),
            torch's own ``AveragedModel``.
        device: where the model trains ("cpu", or "cuda" for ``bench/sweep.py``); batches
            must be on it.
    """

    def __init__(
        self,
        vocab,
        embedding_dim,
        rnn_size,
        num_layers,
        batch_size,
        learning_rate=0.002,
        grad_clip=5.0,
        bf16=False,
        seed=0,
        dropout=0.0,
        weight_decay=0.0,
        ema=0.0,
        device="cpu",
    ):
        torch.manual_seed(seed)
        self.device = torch.device(device)
        model = CharLSTM(vocab, embedding_dim, rnn_size, num_layers, dropout)
        self.model = model.to(self.device)
        named = list(self.model.named_parameters())
        groups = [
            {"params": [p for n, p in named if "bias" not in n], "weight_decay": weight_decay},
            {"params": [p for n, p in named if "bias" in n], "weight_decay": 0.0},
        ]
        adam = torch.optim.AdamW if weight_decay else torch.optim.Adam
        self.optimizer = adam(groups, lr=learning_rate, eps=1e-7)
        self.averaged = None
        if ema:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.averaged = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(ema))
        self.grad_clip = grad_clip
        self.bf16 = bf16
        self.vocab = vocab
        zeros = torch.zeros(num_layers, batch_size, rnn_size, device=self.device)
        self.state = (zeros, zeros.clone())
        self.loss_fn = nn.CrossEntropyLoss()

    def reset(self) -> None:
        self.state = tuple(torch.zeros_like(s) for s in self.state)

    def _autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, x, y) -> float:
        """One optimiser step on a ``[batch, seq]`` int64 batch; returns the loss (nats)."""
        self.model.train()
        state = tuple(s.detach() for s in self.state)
        with self._autocast():
            logits, state = self.model(x, state)
            loss = self.loss_fn(logits.reshape(-1, self.vocab).float(), y.reshape(-1))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        if self.averaged is not None:
            self.averaged.update_parameters(self.model)
        self.state = tuple(s.float() for s in state)
        return loss.detach()

    @torch.no_grad()
    def evaluate(self, xs, ys) -> float:
        """Mean loss (nats/char) over validation batches, from a zero state; keeps train state.

        With ``ema`` it is the loss of the averaged weights.
        """
        model = self.model if self.averaged is None else self.averaged.module
        model.eval()
        saved = self.state
        self.reset()
        total = 0.0
        for x, y in zip(xs, ys, strict=True):
            with self._autocast():
                logits, self.state = model(x, self.state)
            total += float(self.loss_fn(logits.reshape(-1, self.vocab).float(), y.reshape(-1)))
        self.state = saved
        return total / max(len(xs), 1)


def batches(ids: np.ndarray, batch_size: int, seq_length: int):
    """The stateful stream layout of ``charrnn_keras.data.stream_batches``, as int64 tensors."""
    from charrnn_keras.data import stream_batches  # numpy only: no TensorFlow in this process

    x, y = stream_batches(ids, batch_size, seq_length)
    return torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64))


def timed_windows(trainer: Trainer, xs, ys, warmup: int, windows: int, steps: int) -> list[float]:
    """Returns the seconds of each of ``windows`` windows of ``steps`` steps, after a warm-up."""
    n, k = len(xs), 0
    for _ in range(warmup):
        trainer.train_step(xs[k % n], ys[k % n])
        k += 1
    times = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(steps):
            loss = trainer.train_step(xs[k % n], ys[k % n])
            k += 1
        float(loss)
        times.append(time.perf_counter() - start)
    if not math.isfinite(float(loss)):
        raise RuntimeError("the PyTorch reference diverged (loss is not finite)")
    return times
