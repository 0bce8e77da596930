"""``models.config``: which versions to serve, as TF Serving's ``--model_config_file`` says.

``write_models_config`` writes it after every export; ``read_model_config`` reads it for
``charrnn serve --model_config_file``.

A ``ModelServerConfig`` text proto (``export/models.config``, read with TF Serving's own message)
gives each model a ``base_path``, a ``model_version_policy`` and ``version_labels``:

- ``latest { num_versions: N }`` (the default, N = 1): the N highest versions on disk;
- ``all {}``: every version on disk;
- ``specific { versions: 1 versions: 3 }``: those versions, when on disk;
- ``version_labels { key: "stable" value: 1 }``: requests may ask for ``version_label``.

TF Serving refuses a config whose label names a version that is not AVAILABLE; here the server
refuses to start with the same message (``check_labels``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from charrnn_keras import atomic
from charrnn_keras.errors import ServingError
from charrnn_keras.serving import names


@dataclass
class ModelPolicy:
    """One model's versions policy.

    Args:
        kind: ``latest``, ``all`` or ``specific``.
        num_versions: for ``latest``, how many of the highest versions.
        versions: for ``specific``, the versions to serve.
        labels: version label -> version.
        base_path: the model's folder, if the config gave one.
    """

    kind: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()
    labels: dict[str, int] = field(default_factory=dict)
    base_path: Path | None = None

    def wanted(self, on_disk: list[int]) -> list[int]:
        """The versions to serve, highest first; for ``latest``, every version on disk in the
        order to try (the manager keeps the first ``num_versions`` that load, so a version
        that fails to load leaves the one below it served).

        Args:
            on_disk: the complete versions found, lowest first.

        Returns:
            Versions, highest first.
        """
        if self.kind == "specific":
            return sorted(set(self.versions) & set(on_disk), reverse=True)
        return sorted(on_disk, reverse=True)

    @property
    def limit(self) -> int | None:
        """How many versions are served at most (None: every wanted one)."""
        return self.num_versions if self.kind == "latest" else None


def read_model_config(path, model_name: str) -> ModelPolicy:
    """Reads a model's policy from a ModelServerConfig text proto (``models.config``).

    Args:
        path: the file, as TF Serving's ``--model_config_file``.
        model_name: the model to serve; must be listed.

    Returns:
        The ModelPolicy.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
        config = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    except OSError as e:
        raise ServingError(f"cannot read {path}: {e.strerror}") from None
    except (text_format.ParseError, UnicodeDecodeError) as e:
        message = " ".join(str(e).split())
        raise ServingError(f"{path} is not a ModelServerConfig text proto: {message}") from None
    models = {c.name: c for c in config.model_config_list.config}
    if model_name not in models:
        raise ServingError(
            f"{path} lists no model named {model_name!r} (it lists: "
            f"{', '.join(sorted(models)) or 'none'})"
        )
    model = models[model_name]
    choice = model.model_version_policy.WhichOneof("policy_choice") or "latest"
    policy = ModelPolicy(
        kind=choice,
        labels=dict(model.version_labels),
        base_path=Path(model.base_path) if model.base_path else None,
    )
    if choice == "latest":
        num = model.model_version_policy.latest.num_versions
        policy.num_versions = num if num > 0 else 1  # TF Serving's default for 0
    elif choice == "specific":
        policy.versions = tuple(model.model_version_policy.specific.versions)
        if not policy.versions:  # it would serve nothing: surely a mistake
            raise ServingError(f"{path}: model_version_policy specific lists no versions")
    return policy


def check_labels(policy: ModelPolicy, model_name: str, available: set[int]) -> None:
    """Raises TF Serving's error for a label on a version that is not available.

    Args:
        policy: the model's policy.
        model_name: the model, named in the message.
        available: the versions AVAILABLE now.
    """
    for label, version in sorted(policy.labels.items()):
        if version not in available:
            raise ServingError(
                f"Request to assign label to version {version} of model {model_name}, which "
                f"is not currently available for inference (label {label!r})"
            )


def write_models_config(export_dir, base_path: str | None = None) -> Path:
    """Writes ``export_dir/models.config`` listing every model folder, in TF Serving's format.

    The file is a ``ModelServerConfig`` text proto built with TF Serving's own message and
    ``text_format``, so any path (quotes, backslashes, non-ASCII) is escaped as TF Serving reads it.
    A model already listed keeps its ``model_version_policy`` and ``version_labels``, so a
    policy written by hand survives the next export.

    Args:
        export_dir: TF Serving's base directory.
        base_path: where the server sees ``export_dir``; default its absolute path here, so
            ``tensorflow_model_server --model_config_file=...`` works as written, and Docker
            does with ``export_dir`` mounted at the same path (see export/README.md).

    Returns:
        The path of the written file.
    """
    export_dir = Path(export_dir)
    base_path = str(export_dir.resolve()) if base_path is None else base_path
    models = sorted(p.name for p in export_dir.iterdir() if p.is_dir() and names.list_versions(p))
    path = export_dir / names.MODELS_CONFIG
    before = {}
    try:
        old = text_format.Parse(
            path.read_text("utf-8"), model_server_config_pb2.ModelServerConfig()
        )
        before = {c.name: c for c in old.model_config_list.config}
    except (OSError, UnicodeDecodeError, text_format.ParseError):
        pass  # none yet, or unreadable: written anew
    config = model_server_config_pb2.ModelServerConfig()
    for name in models:
        model = config.model_config_list.config.add(
            name=name, base_path=f"{base_path.rstrip('/')}/{name}", model_platform="tensorflow"
        )
        if name in before:
            model.model_version_policy.CopyFrom(before[name].model_version_policy)
            model.version_labels.update(before[name].version_labels)
    atomic.write_text(path, text_format.MessageToString(config, as_utf8=True))
    return path
