"""Crash-safe training backup: Keras' BackupAndRestore, hardened against a kill at any moment."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

import keras

from charrnn_keras.errors import BackupError, option

logger = logging.getLogger(__name__)


def _replace_atomically(write, path: Path) -> None:
    """Calls ``write(tmp)`` for a temporary name beside ``path``, then renames it to ``path``.

    The temporary name carries the process id, like ``CharRNN.save_weights``'s, so that
    ``rundir.remove_stale_temps`` can tell a file left by a killed process from a live one.
    """
    stem = path.name.removesuffix(".weights.h5")
    suffix = ".weights.h5" if stem != path.name else ".part"  # Keras wants .weights.h5
    tmp = path.with_name(f".{stem}.tmp{os.getpid()}{suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _copy_atomically(src, dst) -> None:
    _replace_atomically(lambda tmp: shutil.copyfile(src, tmp), Path(dst))


class RunBackup(keras.callbacks.BackupAndRestore):
    """``BackupAndRestore(double_checkpoint=True)`` that survives being killed at any moment.

    Keras' callback writes ``training_metadata.json`` and the ``.bkp`` copies in place, falls
    back to the previous copy only for an ``OSError`` from the weights, and saves in its own
    ``on_epoch_end``. This one:

    * writes every file under a temporary name and renames it, so no backup file is ever half
      written (a kill between the weights and the metadata rename at worst repeats one epoch);
    * is restored by ``restore()`` before ``fit``, so the caller knows the epoch it resumes
      from before the history and the best checkpoint's threshold are set up;
    * falls back to the previous epoch's copy when the newest one fails to load for any reason,
      and raises a one-line BackupError when neither loads;
    * saves nothing for an epoch whose loss is not finite, so a resume never starts from NaN
      weights;
    * keeps the backup when training ends (``discard()`` deletes it once the run is recorded
      as finished), so a kill just after ``fit`` does not lose the run.

    Put it last in the callback list, so an epoch is backed up only after the callbacks before
    it (ModelCheckpoint, CSVLogger) have recorded it: a kill in between makes the resume train
    that epoch again, never skip its record.

    Args:
        backup_dir: the directory for the backup; nothing else may write there.
    """

    def __init__(self, backup_dir):
        super().__init__(str(backup_dir), double_checkpoint=True, delete_checkpoint=False)
        self.saved_epoch = 0  # epochs completed according to the backup
        self._restored = False

    def restore(self) -> int:
        """Loads the newest loadable backup into the model (``set_model`` first).

        Returns:
            The number of completed epochs it holds, the epoch to resume from (0 = none).
        """
        pairs = [
            (self._weights_path, self._training_metadata_path),
            (self._prev_weights_path, self._prev_training_metadata_path),
        ]
        failures = []
        for i, (weights, meta) in enumerate(pairs):
            if not os.path.exists(weights):
                continue
            try:
                epoch = self._load(weights, meta)
            except Exception as e:  # h5py, Keras and json raise many types for a bad file
                failures.append(f"{weights} ({type(e).__name__}: {' '.join(str(e).split())[:160]})")
                continue
            if failures:
                logger.warning("backup %s is damaged; resuming from the previous epoch's copy",
                               failures[0])  # fmt: skip
            if i > 0:  # make the good copy the newest, so the next save keeps it as the fallback
                for src, dst in zip(pairs[i], pairs[0], strict=True):
                    if os.path.exists(src):
                        _copy_atomically(src, dst)
            self.saved_epoch = epoch
            self._restored = True
            return epoch
        if failures:
            raise BackupError(
                f"cannot resume: the backup does not load: {'; '.join(failures)}. Delete "
                f"{self.backup_dir} to train this run again from epoch 1, or pass "
                f"{option('overwrite', True)} to start a new run"
            )
        self._restored = True
        return 0

    def _load(self, weights: str, meta: str) -> int:
        """Loads one weights/metadata pair; returns its epoch (0 if it has no metadata)."""
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)  # its variables are in the file
        if weights.endswith(".weights.h5"):
            self.model.load_weights(weights)
        else:  # Keras reads only *.weights.h5 names, so the .bkp copy is read under one
            tmp = Path(weights).with_name(f".{Path(weights).name}.tmp{os.getpid()}.weights.h5")
            try:
                shutil.copyfile(weights, tmp)
                self.model.load_weights(str(tmp))
            finally:
                tmp.unlink(missing_ok=True)
        if not os.path.exists(meta):
            return 0
        epoch = json.loads(Path(meta).read_text(encoding="utf-8"))["epoch"]
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"{meta}: epoch must be an integer, 0 or more, got {epoch!r}")
        return epoch

    def discard(self) -> None:
        """Deletes the backup (call once the run is recorded as finished)."""
        shutil.rmtree(self.backup_dir, ignore_errors=True)

    def on_train_begin(self, logs=None):
        if not self._restored:  # when used without an explicit restore()
            self.model._initial_epoch = self.restore()

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            logger.warning("epoch %d: loss is %s; keeping the backup of epoch %d",
                           epoch + 1, loss, self.saved_epoch)  # fmt: skip
            return
        super().on_epoch_end(epoch, logs)
        self.saved_epoch = epoch + 1

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        # The previous epoch's pair becomes the fallback; weights first, so that a kill between
        # the two copies pairs newer weights with an older epoch (one epoch repeated), not the
        # reverse (one epoch skipped).
        for src, dst in [
            (self._weights_path, self._prev_weights_path),
            (self._training_metadata_path, self._prev_training_metadata_path),
        ]:
            if os.path.exists(src):
                _copy_atomically(src, dst)
        # CharRNN.save_weights already writes under a temporary name and renames.
        self.model.save_weights(self._weights_path, overwrite=True)
        meta = json.dumps({"epoch": self._current_epoch, "batch": self._last_batch_seen})
        _replace_atomically(
            lambda tmp: tmp.write_text(meta, encoding="utf-8"), Path(self._training_metadata_path)
        )
