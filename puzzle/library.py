"""The block library on disk: one safetensors file per trained (layer, subblock variant) plus an index.

Layout (under the run directory's `library/`):

    meta.json                              parent fingerprint, space and BLD settings
    entries/L{layer:03d}/{variant}.{stage}.safetensors   weights, named as in the layer
    entries/L{layer:03d}/{variant}.{stage}.json          info: tokens seen, normalized MSE, sha256, ...
    index.csv                              one row per entry, rebuilt from the info files

`stage` is "init" (initialised from the parent, untrained) or "bld" (after blockwise local
distillation). Each entry is written atomically and carries the sha256 of its weights file, so a
rerun trusts exactly the complete, intact entries and redoes the rest (a corrupt file is reported
and retrained). Info files instead of one shared index keep concurrent writers (ranks) safe.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load as load_safetensors

from .errors import PuzzleError
from .io import atomic_save_safetensors, atomic_write_json, atomic_write_text

STAGES = ("init", "bld")
INDEX_COLUMNS = ["layer", "subblock", "variant", "stage", "init", "tokens", "init_nmse", "final_nmse", "params",
                 "train_s", "file", "sha256"]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Library:
    """Read and write library entries under `root`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- paths ---------------------------------------------------------------------------------
    def _stem(self, layer: int, variant: str, stage: str) -> Path:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        return self.root / "entries" / f"L{layer:03d}" / f"{variant}.{stage}"

    def weights_path(self, layer: int, variant: str, stage: str) -> Path:
        return self._stem(layer, variant, stage).with_suffix(f".{stage}.safetensors")

    def info_path(self, layer: int, variant: str, stage: str) -> Path:
        return self._stem(layer, variant, stage).with_suffix(f".{stage}.json")

    # -- meta ------------------------------------------------------------------------------------
    def check_meta(self, meta: dict) -> None:
        """Write meta.json on first use; refuse a library built for another parent or settings.

        Raises:
            PuzzleError: meta.json exists and differs from `meta`.
        """
        path = self.root / "meta.json"
        if path.is_file():
            old = json.loads(path.read_text())
            if old != json.loads(json.dumps(meta, default=str)):
                diff = sorted(k for k in set(old) | set(meta) if old.get(k) != json.loads(json.dumps(meta.get(k), default=str)))
                raise PuzzleError(
                    f"the library in {self.root} was built with other settings ({', '.join(diff)} differ); "
                    f"use another --out directory or delete {self.root} to rebuild it")
        else:
            atomic_write_json(path, meta)

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

    def save(self, layer: int, subblock: str, variant: str, stage: str, state: dict[str, torch.Tensor], info: dict) -> None:
        """Write one entry's weights, then its info (with the weights' sha256) last."""
        weights = atomic_save_safetensors(state, self.weights_path(layer, variant, stage))
        params = sum(t.numel() for t in state.values())
        atomic_write_json(self.info_path(layer, variant, stage), {
            "layer": layer, "subblock": subblock, "variant": variant, "stage": stage, "params": params,
            **info, "file": str(weights.relative_to(self.root)), "sha256": sha256_file(weights)})

    def load(self, layer: int, variant: str, stage: str) -> dict[str, torch.Tensor]:
        """The entry's weights (names as inside the layer, e.g. 'self_attn.k_proj.weight').

        Raises:
            PuzzleError: the entry is missing or corrupt (rerun `puzzle bld` to rebuild it).
        """
        if not self.has(layer, variant, stage):
            raise PuzzleError(f"library entry layer {layer} {variant} ({stage}) is missing or corrupt in {self.root}; "
                              f"run `puzzle bld` on this directory to (re)build it")
        # read into memory (not mmap): the tensors stay valid whatever happens to the file later
        return load_safetensors(self.weights_path(layer, variant, stage).read_bytes())

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
