"""Crash-safe training backup: weights, optimizer state and epoch, safe against a kill at any
moment, on Keras' public callback API only."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import keras

from charrnn_keras import atomic
from charrnn_keras.errors import BackupError, option

logger = logging.getLogger(__name__)

# The names Keras' BackupAndRestore(double_checkpoint=True) uses, so that a backup written by
# an earlier version of this package still resumes.
WEIGHTS = "latest.weights.h5"
METADATA = "training_metadata.json"
PREVIOUS = ".bkp"  # suffix of the previous epoch's copy of each file


class RunBackup(keras.callbacks.Callback):
    """Backs up the model after every whole, finite epoch; ``restore()`` resumes from it.

    Guarantees:

    * every file is written under a temporary name and renamed, so no backup file is ever
      half written (a kill between the weights and the metadata at worst repeats one epoch);
    * two copies are kept, the newest and the previous epoch's: when the newest fails to load
      for any reason, ``restore()`` falls back to the previous one, and raises a one-line
      BackupError when neither loads;
    * nothing is saved for an epoch whose loss is not finite, nor for an epoch cut short
      (``model.stop_training`` before its last step), so a resume never starts from NaN
      weights nor counts a partial epoch as done;
    * nothing is deleted when training ends: ``discard()`` deletes the backup once the caller
      has recorded the run as finished, so a kill just after ``fit`` does not lose the run.

    Call ``restore()`` after ``set_model`` and before ``fit``, and pass what it returns as
    ``fit(initial_epoch=...)``. Put the callback last in the list, so that an epoch is backed
    up only after the callbacks before it (ModelCheckpoint, CSVLogger) have recorded it: a
    kill in between makes the resume train that epoch again, never skip its record.

    Args:
        backup_dir: the directory for the backup; nothing else may write there.
        replicas: the replicas training runs on (``tf.distribute``); recorded with each
            backup, and a backup made with another count is refused: each replica's streams
            would be other rows.
        restore_from: the backup to restore (default ``backup_dir``): a multi-worker run's
            workers all restore the chief's and each writes its own.
    """

    def __init__(self, backup_dir, replicas: int = 1, restore_from=None):
        super().__init__()
        if not backup_dir or not str(backup_dir).strip():
            raise ValueError(f"backup_dir must name a directory, received: {backup_dir!r}")
        if not (isinstance(replicas, int) and replicas >= 1):
            raise ValueError(f"replicas must be an integer, 1 or more, received: {replicas!r}")
        self.backup_dir = Path(backup_dir)
        self.replicas = replicas
        self.restore_from = Path(restore_from) if restore_from else self.backup_dir
        self.saved_epoch = 0  # whole epochs completed according to the backup
        self._restored = False
        self._batches = 0

    def _pairs(self, folder: Path | None = None) -> list[tuple[Path, Path]]:
        """(weights, metadata) of the newest backup, then of the previous epoch's."""
        folder = folder or self.backup_dir
        newest = (folder / WEIGHTS, folder / METADATA)
        return [newest, tuple(p.with_name(p.name + PREVIOUS) for p in newest)]

    def restore(self) -> int:
        """Loads the newest loadable backup into the model (call ``set_model`` first).

        Returns:
            The number of whole epochs it holds: the epoch to resume from (0 = none).
        """
        if self.model is None:
            raise RuntimeError("RunBackup.restore() needs a model: call set_model(model) first")
        pairs = self._pairs(self.restore_from)
        failures = []
        for i, (weights, meta) in enumerate(pairs):
            if not weights.exists():
                continue
            try:
                epoch = self._load(weights, meta)
            except BackupError:
                raise
            except Exception as e:  # h5py, Keras and json raise many types for a bad file
                failures.append(f"{weights} ({type(e).__name__}: {' '.join(str(e).split())[:160]})")
                continue
            if failures:
                logger.warning("backup %s is damaged; resuming from the previous epoch's copy",
                               failures[0])  # fmt: skip
            if i > 0 and self.restore_from == self.backup_dir:
                # The good copy becomes the newest, so the next save keeps it as the fallback.
                for src, dst in zip(pairs[i], pairs[0], strict=True):
                    if src.exists():
                        atomic.copy(src, dst)
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

    def _load(self, weights: Path, meta: Path) -> int:
        """Loads one weights/metadata pair; returns its epoch (0 if it has no metadata)."""
        epoch, made_with = 0, 1  # no metadata, or none of replicas (before tf.distribute)
        if meta.exists():
            epoch, made_with = _read_metadata(meta)
        if made_with != self.replicas:
            raise BackupError(
                f"cannot resume: the backup in {self.restore_from} was made on {made_with} "
                f"replicas and this run has {self.replicas}; run it as before "
                f"(train.distribute, train.replicas, the same workers), or pass "
                f"{option('overwrite', True)} to start a new run"
            )
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)  # its variables are in the file
        if weights.name.endswith(atomic.WEIGHTS_SUFFIX):
            self.model.load_weights(str(weights))
        else:  # Keras reads only *.weights.h5 names, so the .bkp copy is read under one,
            # made in our own backup folder: another worker's may be the chief's to write.
            self.backup_dir.mkdir(parents=True, exist_ok=True)
            tmp = atomic.temp_path(self.backup_dir / (weights.name + atomic.WEIGHTS_SUFFIX))
            try:
                shutil.copyfile(weights, tmp)
                self.model.load_weights(str(tmp))
            finally:
                tmp.unlink(missing_ok=True)
        return epoch

    def resumable_epoch(self) -> int:
        """The whole epochs a rerun would resume after, read from the backup it restores.

        On a worker other than the chief that is the chief's backup, which can be an epoch
        ahead of this worker's own ``saved_epoch`` when the chief stopped at an epoch end.

        Returns:
            The epoch of the newest metadata under ``restore_from`` that reads, else
            ``saved_epoch``.
        """
        for _, meta in self._pairs(self.restore_from):
            try:
                return _read_metadata(meta)[0]
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return self.saved_epoch

    def discard(self) -> None:
        """Deletes the backup (call once the run is recorded as finished)."""
        shutil.rmtree(self.backup_dir, ignore_errors=True)

    def on_train_begin(self, logs=None):
        if not self._restored:
            # Without it, fit would start at epoch 0 over a backup of later epochs.
            raise RuntimeError(
                "call RunBackup.restore() before fit and pass its result as initial_epoch"
            )

    def on_epoch_begin(self, epoch, logs=None):
        self._batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            logger.warning("epoch %d: loss is %s; keeping the backup of epoch %d",
                           epoch + 1, loss, self.saved_epoch)  # fmt: skip
            return
        steps = (self.params or {}).get("steps")
        if steps and self._batches < steps:
            logger.info("epoch %d stopped after %d of %d steps; keeping the backup of epoch %d",
                        epoch + 1, self._batches, steps, self.saved_epoch)  # fmt: skip
            return
        self._save(epoch + 1)
        self.saved_epoch = epoch + 1

    def _save(self, epoch: int) -> None:
        """Writes the backup of ``epoch`` whole epochs, keeping the previous one as fallback."""
        self.backup_dir.mkdir(parents=True, exist_ok=True)
        newest, previous = self._pairs()
        # Weights first, so that a kill between the two copies pairs newer weights with an
        # older epoch (one epoch repeated), not the reverse (one epoch skipped).
        for src, dst in zip(newest, previous, strict=True):
            if src.exists():
                atomic.copy(src, dst)
        with atomic.replacing(newest[0]) as tmp:
            self.model.save_weights(str(tmp))
        atomic.write_json(newest[1], {"epoch": epoch, "replicas": self.replicas})


def _read_metadata(meta: Path) -> tuple[int, int]:
    """(epoch, replicas) of a backup's metadata file; ValueError for an epoch that is not one."""
    facts = json.loads(meta.read_text(encoding="utf-8"))
    epoch, replicas = facts["epoch"], facts.get("replicas", 1)
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise ValueError(f"{meta}: epoch must be an integer, 0 or more, got {epoch!r}")
    return epoch, replicas
