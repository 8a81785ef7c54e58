"""The block library on disk: one safetensors file per trained (layer, subblock variant) plus an index.

Layout (under the run directory's `library/`):

    meta.json                              parent fingerprint, BLD settings, the space last built
    entries/L{layer:03d}/{variant}.{stage}.safetensors   weights, named as in the layer
    entries/L{layer:03d}/{variant}.{stage}.json          info: tokens seen, normalized MSE, sha256,
                                                         loss curve, status, ...
    entries/L{layer:03d}/{variant}.bld.partial.pt        training checkpoint of an unfinished entry
    index.csv                              one row per entry, rebuilt from the info files

`variant` is a subblock id ("attn-kv1", "ffn-768"; kind "attention" / "ffn", decoupled BLD) or a
block id ("attn-kv1+ffn-768"; kind "block", coupled BLD, whose file holds both subblocks).
`stage` is "init" (initialised from the parent, untrained) or "bld" (after blockwise local
distillation). Each entry is written atomically and carries the sha256 of its weights file, so a
rerun trusts exactly the complete, intact entries and redoes the rest (a corrupt file is reported
and retrained). Info files instead of one shared index keep concurrent writers (ranks) safe. A
subblock in training is checkpointed now and then (weights, optimizer state, step); a rerun after a
crash continues from the checkpoint and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load as load_safetensors

from .errors import PuzzleError, differing_settings
from .io import atomic_save_safetensors, atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file

STAGES = ("init", "bld")
KINDS = ("attention", "ffn", "block")
INDEX_COLUMNS = ["layer", "subblock", "variant", "stage", "init", "tokens", "init_nmse", "final_nmse", "status",
                 "lr", "params", "train_s", "file", "sha256"]
# BLD settings that change where and how fast a library is built, never its decoupled entries: a rerun may change
# them (a coupled block trained on another coupled_tokens is trained again: bld.run_jobs)
RESOURCE_SETTINGS = ("checkpoint_s", "layers_per_group", "coupled_top_k", "coupled_tokens")
# Meta keys that say which entries were asked for, not how an entry is made: an entry depends only on
# the parent, the calibration tokens, the BLD settings and its own variant, so a rerun may widen or
# narrow the space and keep every finished entry.
INFORMATIONAL = ("space",)


def kind_of(variant: str) -> str:
    """"block" for a block id ('attn-kv1+ffn-768'), else "attention" or "ffn" from the id's prefix."""
    if "+" in variant:
        return "block"
    return "attention" if variant.startswith("attn-") else "ffn"


def comparable_meta(meta: dict) -> dict:
    meta = {k: v for k, v in json.loads(json.dumps(meta, default=str)).items() if k not in INFORMATIONAL}
    if isinstance(meta.get("bld"), dict):
        meta["bld"] = {k: v for k, v in meta["bld"].items() if k not in RESOURCE_SETTINGS}
    return meta


def meta_digest(meta: dict) -> str:
    """A short sha256 of `comparable_meta(meta)`: what each entry records of the library's meta.json
    (`library_meta_sha`), so a damaged or lost meta.json can be written again from entries that all agree."""
    return hashlib.sha256(json.dumps(comparable_meta(meta), sort_keys=True).encode()).hexdigest()[:16]


def safetensors_complete(path: Path) -> bool:
    """Whether a .safetensors file is as long as its header says (a cheap check for a cut file, without hashing or
    loading it: its first 8 bytes give the header's length, the header each tensor's data offsets); False for a
    missing or unreadable file or header. Format: https://huggingface.co/docs/safetensors (8-byte little-endian
    header size, JSON header, data)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 0 < n < 100_000_000 else None
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        return Path(path).stat().st_size == 8 + n + max(ends, default=0)
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return False


class Library:
    """Read and write library entries under `root`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._meta_sha: str | None = None  # `meta_digest` of the meta `check_meta` accepted, recorded by `save`

    # -- paths ---------------------------------------------------------------------------------
    def _stem(self, layer: int, variant: str, stage: str) -> Path:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        return self.root / "entries" / f"L{layer:03d}" / f"{variant}.{stage}"

    def weights_path(self, layer: int, variant: str, stage: str) -> Path:
        return self._stem(layer, variant, stage).with_suffix(f".{stage}.safetensors")

    def info_path(self, layer: int, variant: str, stage: str) -> Path:
        return self._stem(layer, variant, stage).with_suffix(f".{stage}.json")

    def partial_path(self, layer: int, variant: str) -> Path:
        return self._stem(layer, variant, "bld").with_suffix(".bld.partial.pt")

    # -- meta ------------------------------------------------------------------------------------
    def check_meta(self, meta: dict, replace_unbuilt: bool = True) -> None:
        """Write meta.json on first use; refuse a library built for another parent or settings.

        BLD settings in RESOURCE_SETTINGS (checkpointing, layer groups, the coupled stage's size) and
        the space (INFORMATIONAL) may differ between runs: they do not change the entries. meta.json
        then records the latest of them.

        A meta.json of a library with no entry yet (a refused or interrupted first call) is replaced, unless
        `replace_unbuilt` is False (ranks split by hand, without a process group to check that they agree: one
        started later with other settings must not take over a library the others are about to fill).

        Raises:
            PuzzleError: meta.json exists and differs from `meta` while entries were built, or is damaged (not a JSON
                object, a folder), or is missing while entries were built.
        """
        path = self.root / "meta.json"
        self._meta_sha = meta_digest(meta)
        if not path.exists() and any((self.root / "entries").glob("L*/*")):  # breaker: entries of bld.tokens 1024
            if self._entries_record_meta("is missing"):
                atomic_write_json(path, meta)
                return
            # (a breaker's rerun with --bld-tokens 2048 had taken 1024-token entries as its own)
            raise PuzzleError(f"{path} is missing beside the library's entries, and they do not all record these "
                              f"settings (some record other settings, or none: an earlier version's), so they cannot "
                              f"be matched to this parent and these settings; delete {self.root} to rebuild the "
                              f"library (or restore the file)")
        if path.exists():
            try:
                recorded = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                recorded = e
            if not isinstance(recorded, dict) and path.is_file() and self._entries_record_meta("is damaged"):
                atomic_write_json(path, meta)
                return
            if not isinstance(recorded, dict):  # the entries' parent and settings can no longer be checked
                unchecked = "" if not path.is_file() else (  # (a folder there: the entries were not asked)
                    ", and the library's entries do not all record these settings (some record other settings, or "
                    "none: an earlier version's)")
                raise PuzzleError(f"{path} is damaged ({recorded}){unchecked}, so the entries cannot be matched to "
                                  f"this parent and these settings; delete {self.root} to rebuild the library (or "
                                  f"restore the file)")
            old, new = comparable_meta(recorded), comparable_meta(meta)
            if old != new and replace_unbuilt and not any((self.root / "entries").glob("L*/*")):  # nothing built yet
                atomic_write_json(path, meta)
                return
            if old != new:
                diff = differing_settings(old, new)  # "bld.tokens: 2048 -> 1024" (breaker: "bld differ" named none)
                raise PuzzleError(
                    f"the library in {self.root} was built with other settings (differing: {', '.join(diff)}); "
                    f"use another --out directory or delete {self.root} to rebuild it")
            if recorded == json.loads(json.dumps(meta, default=str)):
                return
        atomic_write_json(path, meta)

    def _recorded_meta_sha(self) -> str | None:
        """`meta_digest` of the library's meta.json, for an entry saved by a process that did not check it (the
        coupled stage's; reviewer: its entries carried no digest); None where the file is missing or damaged."""
        try:
            recorded = json.loads((self.root / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        return meta_digest(recorded) if isinstance(recorded, dict) else None

    def _entries_record_meta(self, what: str) -> bool:
        """Whether every entry info of the library records the meta `check_meta` was given (`library_meta_sha`), so
        meta.json, which `what` ("is missing", "is damaged"), may be written again from them (stop 76's leftover: the
        whole library had to be deleted); warns when so. False where an entry lacks the record (an earlier
        version's) or names other settings, or an info file cannot be read."""
        infos = sorted((self.root / "entries").glob("L*/*.json"))
        try:
            recorded = {json.loads(f.read_text()).get("library_meta_sha") for f in infos}
        except (OSError, ValueError, AttributeError, TypeError):  # TypeError: a digest edited into a list
            return False
        if not infos or recorded != {self._meta_sha}:
            return False
        warnings.warn(f"{self.root / 'meta.json'} {what}; each of the library's {len(infos)} entries records the "
                      f"parent and settings it was built for, and they all match this run's, so it is written again")
        return True

    # -- entries ---------------------------------------------------------------------------------
    def has(self, layer: int, variant: str, stage: str) -> bool:
        """True when the entry is complete and its weights match the recorded sha256.

        A corrupt or truncated file is reported with a warning and treated as missing.
        """
        info_path, weights = self.info_path(layer, variant, stage), self.weights_path(layer, variant, stage)
        if not info_path.is_file():
            return False
        try:
            info = json.loads(info_path.read_text())
        except json.JSONDecodeError:
            warnings.warn(f"library entry info {info_path} is corrupt; it will be redone")
            return False
        if not weights.is_file() or sha256_file(weights) != info.get("sha256"):
            warnings.warn(f"library entry {weights} is missing or does not match its checksum; it will be redone")
            return False
        return True

    def recorded(self, layer: int, variant: str, stage: str) -> dict:
        """The entry's info as its file holds it, weights unchecked ({} when missing or unreadable)."""
        try:
            info = json.loads(self.info_path(layer, variant, stage).read_text())
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def recorded_sha256(self, layer: int, variant: str, stage: str) -> str | None:
        """The sha256 the entry's info records for its weights, unchecked (None when its info cannot be read):
        what a score of the entry is keyed by."""
        sha = self.recorded(layer, variant, stage).get("sha256")
        return sha if isinstance(sha, str) else None

    def info(self, layer: int, variant: str, stage: str) -> dict:
        """The entry's info (tokens, normalized MSEs, status, loss curve, ...).

        Raises:
            PuzzleError: the entry is missing or corrupt.
        """
        if not self.has(layer, variant, stage):
            raise PuzzleError(f"library entry layer {layer} {variant} ({stage}) is missing or corrupt in {self.root}; "
                              f"run `puzzle bld` on this directory to (re)build it")
        return json.loads(self.info_path(layer, variant, stage).read_text())

    def save(self, layer: int, subblock: str, variant: str, stage: str, state: dict[str, torch.Tensor], info: dict) -> None:
        """Write one entry's weights, then its info (with the weights' sha256) last; drop its checkpoint."""
        self._meta_sha = self._meta_sha or self._recorded_meta_sha()  # read once per process, not per entry
        weights = atomic_save_safetensors({k: v.detach().cpu() for k, v in state.items()},
                                          self.weights_path(layer, variant, stage))
        params = sum(t.numel() for t in state.values())
        atomic_write_json(self.info_path(layer, variant, stage), {
            "layer": layer, "subblock": subblock, "variant": variant, "stage": stage, "params": params,
            **info, "file": str(weights.relative_to(self.root)), "sha256": sha256_file(weights),
            **({"library_meta_sha": self._meta_sha} if self._meta_sha else {})})
        if stage == "bld":
            self.partial_path(layer, variant).unlink(missing_ok=True)

    # -- training checkpoints --------------------------------------------------------------------
    def save_partial(self, layer: int, variant: str, checkpoint: dict) -> None:
        """Atomically write a training checkpoint (tensors, numbers, lists; read back by `load_partial`)."""
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        atomic_write_bytes(self.partial_path(layer, variant), buf.getvalue())

    def load_partial(self, layer: int, variant: str) -> dict | None:
        """The entry's training checkpoint, or None (none, or unreadable: warned about and ignored)."""
        path = self.partial_path(layer, variant)
        if not path.is_file():
            return None
        try:
            return torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is redone from the start
            warnings.warn(f"training checkpoint {path} cannot be read ({type(e).__name__}); that entry restarts")
            return None

    def load(self, layer: int, variant: str, stage: str) -> dict[str, torch.Tensor]:
        """The entry's weights (names as inside the layer, e.g. 'self_attn.k_proj.weight').

        Raises:
            PuzzleError: the entry is missing or corrupt (rerun `puzzle bld` to rebuild it).
        """
        # read into memory (not mmap) once, check that copy: the tensors stay valid whatever happens to the file
        info_path, weights = self.info_path(layer, variant, stage), self.weights_path(layer, variant, stage)
        try:
            sha = json.loads(info_path.read_text()).get("sha256")
            data = weights.read_bytes()
        except (OSError, json.JSONDecodeError):
            sha, data = None, b""
        if sha is None or hashlib.sha256(data).hexdigest() != sha:
            raise PuzzleError(f"library entry layer {layer} {variant} ({stage}) is missing or corrupt in {self.root}; "
                              f"run `puzzle bld` on this directory to (re)build it")
        return load_safetensors(data)

    def index(self) -> pd.DataFrame:
        """All entries' info as a table (rebuilt from the info files), sorted by layer and variant."""
        rows = []
        for path in sorted((self.root / "entries").glob("L*/*.json")):
            try:
                rows.append(json.loads(path.read_text()))
            except json.JSONDecodeError:
                continue
        df = pd.DataFrame(rows)
        for col in INDEX_COLUMNS:
            if col not in df.columns:
                df[col] = pd.Series(dtype=object)
        return df[INDEX_COLUMNS].sort_values(["layer", "subblock", "variant", "stage"], kind="stable").reset_index(drop=True)

    def write_index(self) -> pd.DataFrame:
        df = self.index()
        atomic_write_text(self.root / "index.csv", df.to_csv(index=False))
        return df
