"""Which versions of a model are served, managed as TF Serving's manager manages them.

TF Serving's file system source aspires the versions its ``model_version_policy`` names
(``policy.ModelPolicy``; by default ``latest``, one version: the highest folder); its manager
loads them, retries a failed load (``--max_num_load_retries`` 5, every
``--load_retry_interval_micros`` 1 minute) and unloads a version whose folder is gone, serving
the highest left, or nothing. GetModelStatus reports each version's state and, for a
failed load, the error in ``status.error_code`` / ``status.error_message``. Here, as there:

- a version folder that is deleted is unloaded; the highest remaining one is loaded, if any;
- a failed load is retried up to ``max_load_retries`` times, every ``load_retry_seconds``,
  and at once when the folder's files change (a copy that was still being written), then the
  version is END with its error;
- while a newer version fails, the one already served stays served;
- several versions may be served at once (``all``, ``specific``, ``latest {num_versions: 2}``);
  a request without a version gets the highest, one with ``version_label`` the labelled one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import tensorflow as tf
from google.protobuf.message import DecodeError
from tensorflow_serving.apis import get_model_status_pb2

from charrnn_keras.errors import ServingError
from charrnn_keras.serving import names, tensors
from charrnn_keras.serving.lanes import Outcomes, RequestError
from charrnn_keras.serving.policy import ModelPolicy, check_labels
from charrnn_keras.serving.servable import INTRA_OP_THREADS, LoadedVersion

log = logging.getLogger(__name__)

_STATE = get_model_status_pb2.ModelVersionStatus
MAX_LOAD_RETRIES = 5  # TF Serving's --max_num_load_retries default
LOAD_RETRY_SECONDS = 60.0  # TF Serving's --load_retry_interval_micros default


@dataclass
class _Record:
    """What the manager knows of one version: state, last load error, retries."""

    state: int
    error: tuple[grpc.StatusCode, str] | None = None
    attempts: int = 0
    next_try: float = 0.0
    fingerprint: tuple = ()


def _fingerprint(path: Path) -> tuple:
    """(relative path, size, mtime) of every file under ``path``: changes while it is copied."""
    found = []
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                stat = os.stat(os.path.join(root, name))
                found.append((os.path.relpath(os.path.join(root, name), path), stat.st_size,
                              stat.st_mtime_ns))  # fmt: skip
    return tuple(sorted(found))


def _load_error(e: Exception) -> tuple[grpc.StatusCode, str]:
    """The status a failed load reports, with TF's codes where TF gives one."""
    if isinstance(e, tf.errors.OpError):
        code = tensors.CODES.get(e.error_code, grpc.StatusCode.UNKNOWN)
    elif isinstance(e, DecodeError):
        code = grpc.StatusCode.DATA_LOSS  # TF's ReadBinaryProto: "Can't parse ... as binary proto"
    elif isinstance(e, OSError):
        code = grpc.StatusCode.NOT_FOUND
    else:
        code = grpc.StatusCode.UNKNOWN
    message = " ".join(str(e).split()) or type(e).__name__
    return code, message


class ModelManager:
    """Serves the versions of one model its policy wants, following its folder as it changes.

    Args:
        export_dir: TF Serving's base directory.
        model_name: the model's folder name under ``export_dir``.
        max_load_retries: load attempts after the first failure (TF Serving's default 5).
        load_retry_seconds: seconds between attempts (TF Serving's default 60).
        heavy_slots: long generations run at once per version (see ``LoadedVersion``).
        heavy_queue: long generations that may wait for a slot.
        intra_op_threads: each version's threads within one op (see ``LoadedVersion``).
        inter_op_threads: each version's threads running ops side by side.
        clock: the monotonic clock retries are timed with.
        policy: which versions to serve and their labels (default: the highest version).
    """

    def __init__(self, export_dir, model_name: str, max_load_retries: int = MAX_LOAD_RETRIES,
                 load_retry_seconds: float = LOAD_RETRY_SECONDS, heavy_slots: int = 1,
                 heavy_queue: int = 8, intra_op_threads: int = INTRA_OP_THREADS,
                 inter_op_threads: int = 0, clock=time.monotonic,
                 policy: ModelPolicy | None = None):  # fmt: skip
        self.model_name = names.check_model_name(model_name)
        self.policy = policy or ModelPolicy()
        self.model_dir = self.policy.base_path or Path(export_dir) / model_name
        if self.policy.base_path is None and not Path(export_dir).is_dir():
            raise ServingError(f"export directory {export_dir} does not exist; run charrnn export")
        if not names.list_versions(self.model_dir):
            raise ServingError(
                f"{self.model_dir} holds no exported version; export one there first "
                f"(charrnn export)"
            )
        self.max_load_retries, self.load_retry_seconds = max_load_retries, load_retry_seconds
        self._version_args = {"heavy_slots": heavy_slots, "heavy_queue": heavy_queue,
                              "intra_op_threads": intra_op_threads,
                              "inter_op_threads": inter_op_threads}  # fmt: skip
        self._clock = clock
        self.outcomes = Outcomes()
        self._lock, self._refresh_lock = threading.Lock(), threading.Lock()
        self._served: dict[int, LoadedVersion] = {}
        self._records: dict[int, _Record] = {}
        self.refresh()
        try:
            check_labels(self.policy, model_name, set(self.served))
        except ServingError:
            self.close()
            raise

    @property
    def current(self) -> LoadedVersion | None:
        """The highest version served now, if any (what a request without a version gets)."""
        with self._lock:
            return self._served[max(self._served)] if self._served else None

    @property
    def served(self) -> list[int]:
        """The versions served now, lowest first."""
        with self._lock:
            return sorted(self._served)

    def refresh(self) -> None:
        """Loads the versions the policy wants; unloads the others, and those whose folder is
        gone. Under ``latest``, a version that fails to load leaves the next lower one served."""
        with self._refresh_lock:
            on_disk = names.list_versions(self.model_dir)
            with self._lock:
                for version, record in self._records.items():
                    if version not in on_disk and record.state == _STATE.LOADING:
                        record.state = _STATE.END  # deleted while its load was being retried
            keep, limit = set(), self.policy.limit
            for version in self.policy.wanted(on_disk):
                if limit is not None and len(keep) >= limit:
                    break
                if version in self._served or self._try_load(version):
                    keep.add(version)
            with self._lock:
                gone = [self._served.pop(v) for v in sorted(self._served) if v not in keep]
                for old in gone:
                    self._records[old.version].state = _STATE.END
            for old in gone:
                if old.version not in on_disk:
                    log.warning("%s version %d was deleted", self.model_name, old.version)
                log.info("unloading %s version %d", self.model_name, old.version)
                old.retire()

    def _try_load(self, version: int) -> bool:
        record = self._records.get(version)
        path = self.model_dir / str(version)
        if record is not None and record.error is not None:
            fingerprint = _fingerprint(path)
            if fingerprint != record.fingerprint:
                record.attempts = 0  # new files (a copy went on): worth trying at once
            elif record.attempts > self.max_load_retries or self._clock() < record.next_try:
                return False
        with self._lock:
            record = self._records.setdefault(version, _Record(_STATE.START))
            record.state = _STATE.LOADING
        loaded = None
        try:
            loaded = LoadedVersion(path, version, outcomes=self.outcomes, **self._version_args)
            loaded.warm_up()
        except Exception as e:  # a broken version must not stop the one already served
            if loaded is not None:  # loaded, then its warm-up failed: free its Sessions
                loaded.retire()
            with self._lock:
                record.error = _load_error(e)
                record.attempts += 1
                record.next_try = self._clock() + self.load_retry_seconds
                record.fingerprint = _fingerprint(path)
                given_up = record.attempts > self.max_load_retries
                record.state = _STATE.END if given_up else _STATE.LOADING
            log.error(
                "cannot load %s version %d (attempt %d of %d): %s", self.model_name, version,
                record.attempts, self.max_load_retries + 1, record.error[1],
            )  # fmt: skip
            return False
        with self._lock:
            record.error, record.attempts = None, 0
            record.state = _STATE.AVAILABLE
            self._served[version] = loaded
        log.info("serving %s version %d from %s", self.model_name, version, loaded.path)
        return True

    @contextlib.contextmanager
    def acquire(self, model_spec):
        """Yields the LoadedVersion a ModelSpec asks for, in use until the block ends.

        Args:
            model_spec: the request's ModelSpec (name; a version, a version_label, or neither
                for the highest version served).

        Raises RequestError with TF Serving's code and message: INVALID_ARGUMENT for a label
        the config does not define, NOT_FOUND when no such version is served.
        """
        specific, version = model_spec.HasField("version"), model_spec.version.value
        if model_spec.version_label:  # TF Serving's label map is per model name
            labels = self.policy.labels if model_spec.name == self.model_name else {}
            if model_spec.version_label not in labels:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Unrecognized servable version label: {model_spec.version_label}",
                )
            specific, version = True, self.policy.labels[model_spec.version_label]
        with self._lock:
            current = self._served.get(version) if specific else (
                self._served[max(self._served)] if self._served else None)  # fmt: skip
            if model_spec.name != self.model_name or current is None:
                what = f"Specific({model_spec.name}, {version})" if specific \
                    else f"Latest({model_spec.name})"  # fmt: skip
                raise RequestError(
                    grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {what}"
                )
            use = current.use()
            use.__enter__()  # under the lock, so the version cannot be closed in between
        try:
            yield current
        finally:
            use.__exit__(None, None, None)

    def status(self, model_spec) -> list:
        """Returns ModelVersionStatus messages, as ModelService.GetModelStatus answers.

        A version whose load failed carries the error in ``status.error_code`` and
        ``status.error_message``, as TF Serving reports it.

        Args:
            model_spec: the request's ModelSpec (name, optional version).

        Returns:
            ModelVersionStatus messages, lowest version first.
        """
        with self._lock:
            records = {v: (r.state, r.error) for v, r in self._records.items()
                       if model_spec.name == self.model_name}  # fmt: skip
        if not records:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {model_spec.name}"
            )
        if model_spec.HasField("version"):
            v = model_spec.version.value
            if v not in records:
                raise RequestError(
                    grpc.StatusCode.NOT_FOUND,
                    f"Could not find version {v} of model {model_spec.name}",
                )
            records = {v: records[v]}
        answer = []
        for version, (state, error) in sorted(records.items()):
            status = _STATE(version=version, state=state)
            if error is not None:
                status.status.error_code = error[0].value[0]
                status.status.error_message = error[1]
            answer.append(status)
        return answer

    def close(self) -> None:
        with self._lock:
            served, self._served = list(self._served.values()), {}
        for loaded in served:
            loaded.retire()
