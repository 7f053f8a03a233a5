"""The MLflow model registry as lingtune uses it: versions, aliases, and `models:/` loading.

Every version is an MLflow model (the pyfunc flavor of lingtune.pyfunc) whose artifact `weights` holds
only what was trained: a LoRA adapter folder, or a whole model when there is no base to share (the INT4
model; the base model itself, registered once as its own registered model). Its tags say what it needs
to run:

* `lingtune.format`: `pyfunc` (versions registered before lingtune logged MLflow models lack it, and are
  refused: their files are a bare folder, and their base a path on the machine that registered them);
* `lingtune.kind`: `lora` (the base model, then the adapter) or `model`;
* `lingtune.base_model`: the base's registered version, `models:/<base name>/<n>`, and
  `lingtune.base_sha256` its content hash, so a base that is gone or holds another model is an error;
* `lingtune.content_sha256`: the content hash of the `weights` folder (`lingtune.artifacts.content_hash`);
* `lingtune.variant`, lineage (`git_commit`, `data.train_md5`, `params_sha256`) and `eval.*` scores.

Errors: a RegistryMissing (a RegistryError) only when the store, the registered model, the alias or
the version does not exist; whatever else MLflow or its database raises (a locked or corrupt sqlite
file, a schema to migrate, a server error) is a plain RegistryError that says so. Only the former
means "no champion yet".

The download cache (`cache_dir/<name>/<version>`) is reused only when its record names the same
source and run as the version, and its files still hash to the version's `lingtune.content_sha256`: a
recreated store numbers its versions from 1 again, and a cached folder can be edited.

Shared by `lingtune register`, `lingtune eval --model models:/name@alias` and serving; it
imports no stage.
"""

from __future__ import annotations

import json
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lingtune.artifacts import content_hash, publishing, write_json
from lingtune.errors import RegistryError, RegistryMissing

PREFIX = "models:/"
CONTENT_TAG = "lingtune.content_sha256"
FORMAT_TAG, FORMAT = "lingtune.format", "pyfunc"
BASE_TAG, BASE_SHA_TAG = "lingtune.base_model", "lingtune.base_sha256"
WEIGHTS = "weights"
"""The pyfunc artifact that holds the registered folder."""
COMPLETE = ".complete"
"""The cache record of a finished download: source, run and content hash of the version."""
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[A-Za-z0-9_\-]+)|/(?P<version>\d+))$")
__all__ = ["PREFIX", "Fetched", "RegistryError", "RegistryMissing", "alias_version", "client", "ensure_model",
           "fetch", "fetch_base", "get_version", "parse", "weights_dir"]
log = logging.getLogger(__name__)
_NOT_MISSING = "; not a missing model: retry once the store is no longer locked, or repair or migrate it"


@dataclass
class Fetched:
    """A registered version downloaded to a local folder, and what it needs to run."""

    folder: Path
    """The version's `weights` folder inside its downloaded MLflow model."""
    name: str
    version: str
    kind: str
    """`lora` or `model`."""
    base_model: str | None
    tags: dict


@contextmanager
def registry_errors(what: str, missing: str = "") -> Iterator[None]:
    """MLflow's and its database's errors as RegistryError; RegistryMissing (saying `missing`) only for
    MLflow's RESOURCE_DOES_NOT_EXIST (no such registered model or version), nothing else."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except MlflowException as exc:
        if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            detail = f"{missing} ({_first_line(exc.message)})" if missing else _first_line(exc.message)
            raise RegistryMissing(f"{what}: {detail}") from None
        raise RegistryError(f"{what}: the MLflow registry failed ({exc.error_code}: {_first_line(exc.message)})"
                            + _NOT_MISSING) from exc
    except SQLAlchemyError as exc:  # raised before MLflow wraps it: opening a file that is not a database
        raise RegistryError(f"{what}: the MLflow registry's database failed ({_first_line(str(exc))})"
                            + _NOT_MISSING) from exc


def _first_line(message: str) -> str:
    return str(message).splitlines()[0][:200] if message else ""


def client(tracking_uri: str):
    from mlflow import MlflowClient

    logging.getLogger("alembic").setLevel(logging.WARNING)
    with registry_errors(f"MLflow registry at {tracking_uri}"):  # opening checks the schema
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
    """The model version an alias or number names; RegistryMissing when there is none."""
    spec = f"models:/{name}{'@' + alias if alias else '/' + str(version)}"
    missing = f"no {f'@{alias}' if alias else f'version {version}'} of '{name}' in the MLflow model registry"
    with registry_errors(spec, missing):
        found = _by_alias(mlflow_client, name, alias) if alias else mlflow_client.get_model_version(name, version)
    if found is None:
        raise RegistryMissing(f"{spec}: {missing}")
    return found


def _by_alias(mlflow_client, name: str, alias: str):
    """None when the registered model has no such alias. MLflow answers a missing alias with
    INVALID_PARAMETER_VALUE, as it does other bad requests: the model's own alias table tells them apart."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode

    try:
        return mlflow_client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(INVALID_PARAMETER_VALUE):
            raise
        if alias not in mlflow_client.get_registered_model(name).aliases:
            return None
        raise


def alias_version(mlflow_client, name: str, alias: str):
    """The version behind an alias; None only when the model or the alias does not exist."""
    try:
        return get_version(mlflow_client, name, alias=alias)
    except RegistryMissing:
        return None


def set_alias(mlflow_client, name: str, alias: str, version: str) -> None:
    with registry_errors(f"models:/{name}@{alias} -> v{version}"):
        mlflow_client.set_registered_model_alias(name, alias, str(version))


def ensure_model(mlflow_client, name: str, description: str) -> None:
    """Create the registered model unless it exists (any other failure is raised)."""
    try:
        with registry_errors(f"registered model {name}"):
            mlflow_client.get_registered_model(name)
    except RegistryMissing:
        with registry_errors(f"registered model {name}"):
            mlflow_client.create_registered_model(name, description=description)


def fetch(spec: str, tracking_uri: str, cache_dir: str | Path) -> Fetched:
    """Resolve a `models:/` URI and download that version's MLflow model to `cache_dir/<name>/<version>`
    (once per version content: see the module docstring)."""
    name, alias, version = parse(spec)
    if not store_exists(tracking_uri):
        raise RegistryMissing(f"{spec}: no MLflow model registry at {tracking_uri} (run `lingtune register` first)")
    found = get_version(client(tracking_uri), name, alias, version)
    tags, what = dict(found.tags), f"{spec} (v{found.version})"
    if tags.get(FORMAT_TAG) != FORMAT:
        raise RegistryError(f"{what} is not an MLflow model lingtune can load (no {FORMAT_TAG} tag: registered by an "
                            "older lingtune or by hand); run `lingtune register` again")
    target = Path(cache_dir) / name / str(found.version)
    record = {"source": found.source, "run_id": found.run_id, "content_sha256": tags.get(CONTENT_TAG)}
    if not _cached(target, record):
        _download(what, f"{PREFIX}{name}/{found.version}", target, record, tracking_uri)
    return Fetched(weights_dir(target, what), name, str(found.version), tags.get("lingtune.kind", "model"),
                   tags.get(BASE_TAG), tags)


def fetch_base(base_uri: str | None, base_sha256: str | None, what: str, tracking_uri: str,
               cache_dir: str | Path) -> Path:
    """The weights of the base an adapter version names. Any doubt is a RegistryError, never
    RegistryMissing (which may be answered with a fallback model): the adapter was trained on that base,
    and on another one it computes something else."""
    if not base_uri or not base_uri.startswith(PREFIX):
        raise RegistryError(f"{what}: a LoRA version whose {BASE_TAG} tag is {base_uri!r}, not a models:/ URI of "
                            "its base; run `lingtune register` again")
    try:
        base = fetch(base_uri, tracking_uri, cache_dir)
    except RegistryMissing as exc:
        raise RegistryError(f"{what}: its base model is not in the registry ({exc}); restore that version "
                            "or register the adapter again") from None
    got = base.tags.get(CONTENT_TAG)
    if base.kind != "model" or not base_sha256 or got != base_sha256:
        raise RegistryError(f"{what}: was trained on a base with {CONTENT_TAG} {str(base_sha256)[:12]}..., but "
                            f"{base_uri} is a {base.kind} version with {str(got)[:12]}... (a recreated or edited "
                            "registry?); register the adapter again")
    return base.folder


def weights_dir(model_dir: Path, what: str) -> Path:
    """The `weights` artifact of a downloaded version, where its MLmodel file says it is."""
    import yaml
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    try:
        folder = model_dir / Model.load(str(model_dir)).flavors["python_function"]["artifacts"][WEIGHTS]["path"]
    except (MlflowException, OSError, yaml.YAMLError, KeyError, TypeError) as exc:  # no MLmodel, not YAML, no weights
        raise RegistryError(f"{what}: not a lingtune MLflow model (no pyfunc artifact {WEIGHTS!r} in its MLmodel: "
                            f"{exc!r})") from None
    if not folder.is_dir():
        raise RegistryError(f"{what}: its MLmodel names the artifact {WEIGHTS!r} at {folder}, which is not there")
    return folder


def _cached(target: Path, record: dict) -> bool:
    """The folder holds this version's files: same record, and (when the version has one) the same content hash."""
    try:
        saved = json.loads((target / COMPLETE).read_text())
    except (OSError, ValueError):  # no finished download, or the plain-text record of an older lingtune
        return False
    if saved != record:
        log.info("%s: cached for another registry version (a recreated store?); downloading again", target)
        return False
    if record["content_sha256"] and cached_hash(target) != record["content_sha256"]:
        log.warning("%s: its files no longer hash to the version's %s; downloading again", target, CONTENT_TAG)
        return False
    return True


def cached_hash(folder: Path) -> str | None:
    """The content hash of a downloaded version's weights, as `lingtune register` computed it; None when
    its MLmodel no longer says where they are."""
    try:
        return content_hash(weights_dir(folder, str(folder)))
    except RegistryError:
        return None


def _download(what: str, uri: str, target: Path, record: dict, tracking_uri: str) -> None:
    """Into a fresh staging folder (publishing), checked against the version's content hash, then swapped in."""
    import mlflow

    with publishing(target) as partial:
        with registry_errors(what):
            # models:/name/N puts the version's files straight into dst_path, wherever its source lives. MLflow
            # looks the version up in the process's global registry, whatever tracking_uri (or registry_uri) says:
            # without this, a stage that has not yet set its store would search ./mlflow.db (MLflow's default)
            mlflow.set_registry_uri(tracking_uri)
            mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(partial), tracking_uri=tracking_uri)
        expected = record["content_sha256"]
        if expected and (got := content_hash(weights_dir(partial, what))) != expected:
            raise RegistryError(f"{what}: the downloaded files hash to {got[:12]}..., but the version was registered "
                                f"with {CONTENT_TAG} {expected[:12]}...: its stored artifacts are not what was "
                                "registered; nothing cached (register it again)")
        write_json(partial / COMPLETE, record)
