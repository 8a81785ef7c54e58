"""Where BLD reads the parent from: a model in memory, or a folder of safetensors read layer by layer.

BLD walks the parent one layer at a time (bld.py): it needs the embedding once, then each layer's
weights while that layer's subblocks train, never two distant layers together. A *parent source*
gives exactly that:

    config                 the parent's ModelConfig
    embed(ids, device)     (N, T) int64 -> (N, T, C) fp32 input of layer 0
    rope(ids, device)      cos, sin (N, T, D) fp32 for positions 0..T-1
    layer(i, device)       layer i as a fp32 DecoderBlock on `device` (a copy unless it already is one)
    release(i)             drop what `layer(i)` loaded

`InMemoryParent` wraps a PuzzleForCausalLM (layers are used in place when they are fp32 on the
compute device, copied there otherwise: the rest of the parent stays where it is, e.g. on the CPU
while a GPU trains). `SafetensorsParent` reads an HF Llama or nemotron-nas folder lazily: the
embedding, then each layer's tensors from the safetensors files when asked, so a parent larger
than the memory of the machine (or of the device) can be distilled: what is resident at a time is
one layer group's weights (bld.BLDConfig.layers_per_group) plus the calibration activations at the
group boundary (and the embedding while layer 0's input is computed, which the byte counts below leave
out). `resident_bytes` / `peak_resident_bytes` account for the parent weights held. This path is the
Python API's (`bld.build_library(SafetensorsParent(folder), ...)`): the commands (`puzzle run`, `bld`,
`baselines`) load the whole parent, since scoring, search and evaluation need it anyway.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from .architecture import ModelConfig
from .errors import PuzzleError
from .modeling import DecoderBlock, PuzzleForCausalLM, RotaryEmbedding


def _rope(config: ModelConfig, ids: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    rotary = RotaryEmbedding(config).to(device)
    N, T = ids.shape
    pos = torch.arange(T, device=device).unsqueeze(0).expand(N, T)  # (N, T)
    return rotary(pos, torch.float32)


class InMemoryParent:
    """A PuzzleForCausalLM already in memory, as a parent source."""

    def __init__(self, model: PuzzleForCausalLM):
        self.model, self.config = model, model.config
        self.resident_bytes = self.peak_resident_bytes = 0

    @torch.no_grad()
    def embed(self, ids: torch.Tensor, device) -> torch.Tensor:
        w = self.model.model.embed_tokens.weight
        return F.embedding(ids.to(w.device), w).to(device=device, dtype=torch.float32)  # (N, T, C)

    @torch.no_grad()
    def rope(self, ids: torch.Tensor, device):
        return _rope(self.config, ids, device)

    def layer(self, i: int, device) -> DecoderBlock:
        layer = self.model.model.layers[i]
        p = next(layer.parameters(), None)
        if p is None or (p.device == torch.device(device) and p.dtype == torch.float32):
            return layer
        copy = DecoderBlock(self.config, layer.block_config, i).to(device)
        copy.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
        self.resident_bytes += sum(t.numel() * t.element_size() for t in copy.state_dict().values())
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
        return copy.eval()

    def release(self, i: int, layer: DecoderBlock) -> None:
        if layer is not self.model.model.layers[i]:
            self.resident_bytes -= sum(t.numel() * t.element_size() for t in layer.state_dict().values())


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


class SafetensorsParent:
    """A parent read lazily from an HF Llama or nemotron-nas folder of safetensors files.

    Args:
        folder: holds config.json and model.safetensors (or sharded files with an index).

    Raises:
        PuzzleError: no config.json, no safetensors files, or a missing tensor.
    """

    def __init__(self, folder: str | Path):
        from .parent import NAS_MODEL_TYPES, _weight_files, model_config_from_hf, model_config_from_nemotron_nas

        self.folder = Path(folder)
        path = self.folder / "config.json"
        if not path.is_file():
            raise PuzzleError(f"{self.folder} has no config.json; give the folder of an HF or nemotron-nas checkpoint")
        d = json.loads(path.read_text())
        nas = d.get("model_type") in NAS_MODEL_TYPES or "block_configs" in d
        self.config = model_config_from_nemotron_nas(d) if nas else model_config_from_hf(d)
        # the files load_parent reads: an index's shards (missing ones named), else the single file (reviewer: every
        # *.safetensors was read, and a stale model.safetensors beside indexed shards won)
        files = _weight_files(self.folder) if any(self.folder.glob("*.safetensors")) else []
        if not files or any(f.suffix != ".safetensors" for f in files):
            raise PuzzleError(f"{self.folder} has no .safetensors files; layer-by-layer loading reads safetensors only "
                              f"(convert the checkpoint, or load the whole parent in memory)")
        self.where: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as handle:
                for name in handle.keys():
                    if name in self.where:
                        raise PuzzleError(f"{self.folder}: tensor {name} is in both {self.where[name].name} and "
                                          f"{f.name}; keep one checkpoint in the folder")
                    self.where[name] = f
        # each file as first read: one replaced during the run would mix two parents in one library (reviewer)
        self.stamps = {f: _stamp(f) for f in files}
        self.resident_bytes = self.peak_resident_bytes = 0

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in self.where]
        if missing:
            raise PuzzleError(f"{self.folder}: tensors {missing[:3]} are missing from the safetensors files")
        out = {}
        for f in sorted({self.where[n] for n in names}):
            try:
                if _stamp(f) != self.stamps[f]:
                    raise PuzzleError(f"{f} changed while the parent was being read layer by layer; restore it "
                                      f"and run again (the library would mix two parents)")
                with safe_open(str(f), framework="pt") as handle:  # closed (unmapped) right after reading
                    for n in names:
                        if self.where[n] == f:
                            out[n] = handle.get_tensor(n)
            except (OSError, SafetensorError) as e:
                raise PuzzleError(f"cannot read {f} ({e}); restore the parent's files and run again") from e
        return out

    @torch.no_grad()
    def embed(self, ids: torch.Tensor, device) -> torch.Tensor:
        w = self._read(["model.embed_tokens.weight"])["model.embed_tokens.weight"]
        return F.embedding(ids.to(w.device), w).to(device=device, dtype=torch.float32)  # (N, T, C)

    @torch.no_grad()
    def rope(self, ids: torch.Tensor, device):
        return _rope(self.config, ids, device)

    def layer(self, i: int, device) -> DecoderBlock:
        prefix = f"model.layers.{i}."
        with torch.device("meta"):
            layer = DecoderBlock(self.config, self.config.blocks[i], i)
        names = [prefix + k for k in layer.state_dict()]
        tensors = self._read(names)
        state = {k[len(prefix):]: v.to(device=device, dtype=torch.float32) for k, v in tensors.items()}
        del tensors
        layer.load_state_dict(state, assign=True, strict=True)
        self.resident_bytes += sum(t.numel() * t.element_size() for t in state.values())
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
        return layer.eval()

    def release(self, i: int, layer: DecoderBlock) -> None:
        self.resident_bytes -= sum(t.numel() * t.element_size() for t in layer.state_dict().values())


def as_parent_source(parent):
    """A parent source for BLD: a PuzzleForCausalLM (wrapped), a source as is, or a safetensors folder path."""
    if isinstance(parent, PuzzleForCausalLM):
        return InMemoryParent(parent)
    if isinstance(parent, (str, Path)):
        return SafetensorsParent(parent)
    if all(hasattr(parent, a) for a in ("config", "embed", "rope", "layer", "release")):
        return parent
    raise TypeError(f"cannot read a parent from {type(parent).__name__}; give a PuzzleForCausalLM or a folder")
