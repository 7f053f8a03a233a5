"""The MLflow model registry as lingtune uses it: versions, aliases, and `models:/` loading.

A version holds only what was trained: a LoRA adapter folder, or a whole model when there is
no base to share (the INT4 model). Its tags say what it needs to run:

* `lingtune.kind`: `lora` (load `lingtune.base_model` and apply the adapter) or `model`;
* `lingtune.base_model`: the base model folder the adapter was trained on;
* `lingtune.variant`, lineage (`git_commit`, `data.train_md5`, `params_sha256`) and `eval.*` scores.

Shared by `lingtune register`, `lingtune eval --model models:/name@alias` and serving; it
imports no stage.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from lingtune.artifacts import publishing, write_text
from lingtune.errors import RegistryError

PREFIX = "models:/"
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[A-Za-z0-9_\-]+)|/(?P<version>\d+))$")
__all__ = ["PREFIX", "Fetched", "RegistryError", "alias_version", "client", "fetch", "get_version", "parse"]


@dataclass
class Fetched:
    """A registered version downloaded to a local folder, and what it needs to run."""

    folder: Path
    name: str
    version: str
    kind: str
    """`lora` or `model`."""
    base_model: str | None
    tags: dict


def client(tracking_uri: str):
    from mlflow import MlflowClient

    logging.getLogger("alembic").setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def store_exists(tracking_uri: str) -> bool:
    if not tracking_uri.startswith("sqlite:///"):
        return True  # a server or another database: ask it
    return Path(tracking_uri[len("sqlite:///"):]).is_file()


def parse(spec: str) -> tuple[str, str | None, str | None]:
    """`models:/name@alias` or `models:/name/3` -> (name, alias, version)."""
    match = _URI.match(spec)
    if not match:
        raise RegistryError(f"{spec}: expected models:/<name>@<alias> or models:/<name>/<version>")
    return match["name"], match["alias"], match["version"]


def get_version(mlflow_client, name: str, alias: str | None = None, version: str | None = None):
    from mlflow.exceptions import MlflowException

    try:
        if alias:
            return mlflow_client.get_model_version_by_alias(name, alias)
        return mlflow_client.get_model_version(name, version)
    except MlflowException as exc:
        what = f"@{alias}" if alias else f"version {version}"
        raise RegistryError(f"models:/{name}{'@' + alias if alias else '/' + str(version)}: no {what} of "
                            f"'{name}' in the MLflow model registry ({exc.message.splitlines()[0][:160]})") from None


def fetch(spec: str, tracking_uri: str, cache_dir: str | Path) -> Fetched:
    """Resolve a `models:/` URI and download that version's files to `cache_dir/<name>/<version>`
    (once: a version's files never change)."""
    import mlflow

    name, alias, version = parse(spec)
    if not store_exists(tracking_uri):
        raise RegistryError(f"{spec}: no MLflow model registry at {tracking_uri} (run `lingtune register` first)")
    found = get_version(client(tracking_uri), name, alias, version)
    target = Path(cache_dir) / name / str(found.version)
    if not (target / ".complete").is_file():
        with publishing(target) as partial:
            # models:/name/N puts the version's files straight into dst_path, wherever its source lives
            mlflow.artifacts.download_artifacts(artifact_uri=f"{PREFIX}{name}/{found.version}",
                                                dst_path=str(partial), tracking_uri=tracking_uri)
            write_text(partial / ".complete", found.source + "\n")
    tags = dict(found.tags)
    return Fetched(target, name, str(found.version), tags.get("lingtune.kind", "model"),
                   tags.get("lingtune.base_model"), tags)


def set_alias(mlflow_client, name: str, alias: str, version: str) -> None:
    mlflow_client.set_registered_model_alias(name, alias, str(version))


def alias_version(mlflow_client, name: str, alias: str):
    """The version behind an alias, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
