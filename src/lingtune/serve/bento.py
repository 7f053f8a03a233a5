"""`lingtune bento`: a Bento that carries the model it serves.

The registered version (default: `models:/<register.model_name>@<register.champion_alias>`) is resolved
from the MLflow registry at build time, packed into a build folder with a params.yaml that serves exactly
that folder, and built with BentoML's own build (`bentoml.bentos.build_bentofile`, the project's
bentofile.yaml). The Bento needs no registry, no checkout and no network at run time:

    build folder (temporary, under serve.merge_cache_dir: the weights are hard links, not copies)
      bentofile.yaml       the project's, plus labels and a description naming the version
      src/lingtune/        this lingtune's code (python.is_src_layout: src/lingtune in the Bento)
      requirements/        what bentofile.yaml's python.requirements_txt names
      params.yaml          the project's `serve:` with model: model, fallback_model: null, adapters: {}
      model/               an adapter merged into its base (serve.merge_adapter, as the service serves
                           it), or a whole model (INT4) as registered
      base/                serve.merge_adapter false only: the base; model/ is then the adapter on it

`bentoml serve` runs the service in the Bento's src/ folder, so these relative paths are the packed
folders. Labels say what it carries: `lingtune.model` (the version, `models:/lingtune/3`),
`lingtune.requested`, `lingtune.variant`, `lingtune.content_sha256` (the version's registered hash),
`lingtune.served_sha256` (the content hash of the Bento's model/ folder), and for an adapter
`lingtune.base_model`.

Fails closed, before BentoML builds anything (a LingtuneError that starts "no Bento built"): no registry
or no such alias or version (RegistryMissing: never a fallback model), a registry that fails, a version
that is not a lingtune MLflow model or whose base is gone or changed (RegistryError), a reference that
is not a registered version, or a model vLLM cannot run here (ModelError).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

import lingtune
from lingtune.artifacts import content_hash
from lingtune.config import Params, ServeConfig, parse_params
from lingtune.errors import ConfigError, LingtuneError, ModelError
from lingtune.models import ADAPTER_CONFIG, ModelRef, merged_model, registered, unsupported_here
from lingtune.registry import BASE_TAG, CONTENT_TAG, PREFIX, Fetched

BENTOFILE = "bentofile.yaml"
MODEL, BASE = "model", "base"
"""The packed folders, relative to the Bento's src/ (the service's working directory)."""
PARAMS = "params.yaml"


@dataclass(frozen=True)
class Packed:
    """A build folder ready for BentoML, and the labels that say what it carries."""

    folder: Path
    labels: dict[str, str]


def champion_uri(params: Params) -> str:
    return f"{PREFIX}{params.register_.model_name}@{params.register_.champion_alias}"


def build_bento(params: Params, spec: str | None = None, project: Path = Path(".")):
    """Pack `spec` (default: the champion) and build a Bento of it in the Bento store of $BENTOML_HOME;
    (bentoml.Bento, its labels)."""
    spec = spec or champion_uri(params)
    scratch = Path(params.serve.merge_cache_dir)
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch, prefix="bento-") as ctx:
        try:
            packed = pack(params, spec, Path(ctx), project)
        except LingtuneError as exc:
            raise type(exc)(f"no Bento built: {exc}") from None
        import bentoml

        bento = bentoml.bentos.build_bentofile(str(packed.folder / BENTOFILE), build_ctx=str(packed.folder))
    return bento, packed.labels


def pack(params: Params, spec: str, ctx: Path, project: Path = Path(".")) -> Packed:
    """Write the build folder of `spec` into `ctx` (see the module docstring)."""
    if not spec.startswith(PREFIX):
        raise ModelError(f"{spec}: a Bento packs a registered version (models:/<name>@<alias> or "
                         "models:/<name>/<version>); register it first, or serve a folder with `bentoml serve`")
    ref, version = registered(spec, params.tracking.uri, params.register_.cache_dir)
    if reason := unsupported_here(ref.base):
        raise ModelError(f"cannot serve {spec} (v{version.version}): {reason}")
    how = pack_model(ref, params.serve, ctx)
    labels = bento_labels(spec, version, how, content_hash(ctx / MODEL))
    write_params(ctx / PARAMS, packed_serve(params.serve), labels)
    shutil.copytree(Path(lingtune.__file__).resolve().parent, ctx / "src" / "lingtune",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    write_bentofile(project, ctx, labels, description(labels))
    return Packed(ctx, labels)


def pack_model(ref: ModelRef, cfg: ServeConfig, ctx: Path) -> str:
    """The served weights into ctx/model (and ctx/base); how they were packed."""
    if ref.adapter is None:
        link_tree(ref.base, ctx / MODEL)
        return "as-registered"
    if cfg.merge_adapter:  # the service would merge it at start; merged now, it needs no base at run time
        link_tree(merged_model(ref.base, ref.adapter, Path(cfg.merge_cache_dir)), ctx / MODEL)
        return "merged"
    link_tree(ref.base, ctx / BASE)
    link_tree(ref.adapter, ctx / MODEL)
    rebase_adapter(ctx / MODEL, BASE)
    return "lora"


def link_tree(source: Path, target: Path) -> None:
    """A copy of `source` made of hard links where the file system allows (BentoML copies the files into
    its store anyway; a second full copy of the weights would only cost disk)."""
    shutil.copytree(source, target, copy_function=_link_or_copy)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, target)


def rebase_adapter(adapter: Path, base: str) -> None:
    """Point the packed adapter at the packed base (a path relative to the service's working directory):
    the adapter as registered records a base in the build machine's registry cache."""
    config = adapter / ADAPTER_CONFIG
    recorded = json.loads(config.read_text())
    config.unlink()  # a hard link to the registry cache: write a new file, never through the link
    config.write_text(json.dumps({**recorded, "base_model_name_or_path": base}, indent=2))


def packed_serve(cfg: ServeConfig) -> ServeConfig:
    """The project's `serve:` serving the packed folder: no models:/ URI, no fallback, no local adapters
    (they are not in the Bento, and are deltas of an unmerged base), and no path of the build machine
    (the merge cache: a packed model is never merged at run time)."""
    return cfg.model_copy(update={"model": MODEL, "fallback_model": None, "adapters": {},
                                  "task_model": cfg.served_model_name,
                                  "merge_cache_dir": ServeConfig.model_fields["merge_cache_dir"].default})


def write_params(path: Path, serve: ServeConfig, labels: dict[str, str]) -> None:
    raw = {"serve": serve.model_dump(mode="json")}
    parse_params(raw, str(path))  # what the service will read must validate now, not at its start
    header = (f"# Written by `lingtune bento`: serves {labels['lingtune.model']} ({labels['lingtune.variant']}), "
              f"packed {labels['lingtune.packed']} in {MODEL}/.\n# No registry is read at run time.\n")
    path.write_text(header + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")


def bento_labels(spec: str, version: Fetched, how: str, served_sha256: str) -> dict[str, str]:
    labels = {"lingtune.model": f"{PREFIX}{version.name}/{version.version}", "lingtune.requested": spec,
              "lingtune.variant": version.tags.get("lingtune.variant", "unknown"), "lingtune.packed": how,
              CONTENT_TAG: version.tags.get(CONTENT_TAG, "unknown"), "lingtune.served_sha256": served_sha256}
    if version.base_model:
        labels[BASE_TAG] = version.base_model
    return labels


def description(labels: dict[str, str]) -> str:
    """The Bento's README.md."""
    held = {"as-registered": "the registered model folder, as it is",
            "merged": f"the adapter merged into its base {labels.get(BASE_TAG)}",
            "lora": f"the adapter, on its base {labels.get(BASE_TAG)} in src/{BASE}/ (vLLM's LoRA)"}
    return (f"# lingtune: {labels['lingtune.model']} ({labels['lingtune.variant']})\n\n"
            f"Built by `lingtune bento` from `{labels['lingtune.requested']}`. src/{MODEL}/ holds "
            f"{held[labels['lingtune.packed']]} (content sha256 {labels['lingtune.served_sha256']}); "
            f"src/{PARAMS} serves it. No MLflow registry is needed at run time.\n\n"
            "Run it: `bentoml serve <this tag>`, or `bentoml containerize <this tag>`.\n")


def write_bentofile(project: Path, ctx: Path, labels: dict[str, str], text: str) -> None:
    """The project's bentofile.yaml with the labels and description, and the requirements file it names."""
    path = project / BENTOFILE
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (run `lingtune bento` from the project root)")
    config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if requirements := (config.get("python") or {}).get("requirements_txt"):
        (ctx / requirements).parent.mkdir(parents=True, exist_ok=True)
        if not (project / requirements).is_file():
            raise ConfigError(f"{project / requirements}: no such file (named by {path}: python.requirements_txt)")
        shutil.copy2(project / requirements, ctx / requirements)
    config.update(labels={**(config.get("labels") or {}), **labels}, description=text)
    (ctx / BENTOFILE).write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
