"""Hugging Face model class of an exported Puzzle child: DeciLMForCausalLM over Puzzle's own blocks.

Copied verbatim into every exported folder (with `configuration_decilm.py`, `architecture.py` and
`modeling.py`), so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` needs only
torch and transformers. The modules are those of `modeling.py`, hence the state-dict keys are
Puzzle's (= HF Llama's / DeciLM's): `model.embed_tokens.weight`, `model.layers.{i}....`,
`model.norm.weight`, `lm_head.weight` (tied to the embedding when configured).

Generation: layers whose attention is no_op or linear keep no keys and values, so a cache that
reads its length from layer 0 would restart positions at 0 when layer 0 has no attention.
`DeciLMCache` reads it from the first layer that has attention; `generate` uses it by default, and
`forward` asks any cache for the length of that layer. Position ids follow the attention mask, so
left-padded batches decode like their rows alone.

Notation: B batch, T new tokens, S cached + new positions, C hidden size, V vocab size.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_decilm import DeciLMConfig
from .modeling import PuzzleDecoder, RMSNorm, RotaryEmbedding, rope_inv_freq

# transformers 5 names the cache field "cache"; 4.x called it "past_key_values".
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


class DeciLMCache(DynamicCache):
    """A DynamicCache whose sequence length comes from a layer that has attention.

    Every layer gets a DynamicLayer; only GQA layers ever fill theirs. `get_seq_length(i)` for a
    layer without attention (layer 0 included, the default) answers for the first GQA layer; a model
    without any attention layer has no positions to track and answers 0.
    """

    def __init__(self, config: DeciLMConfig):
        super().__init__()
        blocks = config.to_model_config().blocks
        self.attention_layers = tuple(i for i, b in enumerate(blocks) if b.attention.kind == "gqa")
        self.layers = [DynamicLayer() for _ in blocks]
        self.layer_class_to_replicate = None

    def _tracking_layer(self, layer_idx: int) -> int | None:
        if layer_idx in self.attention_layers:
            return layer_idx
        return self.attention_layers[0] if self.attention_layers else None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Cached positions (S - T of the next call)."""
        idx = self._tracking_layer(layer_idx)
        return 0 if idx is None else super().get_seq_length(idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """(kv_length, kv_offset) as HF's mask builders expect, read from a layer that has attention."""
        idx = self._tracking_layer(layer_idx)
        return (query_length, 0) if idx is None else super().get_mask_sizes(query_length, idx)


class DeciLMForCausalLM(PreTrainedModel, GenerationMixin):
    """Heterogeneous Llama-family causal LM (nemotron-nas `block_configs`) built from Puzzle's modules.

    `forward` accepts what `generate` passes and returns CausalLMOutputWithPast with logits
    (B, T, V) in the weights' dtype.
    """

    config_class = DeciLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["DecoderBlock"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    supports_gradient_checkpointing = False

    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        self.puzzle_config = config.to_model_config()
        self.model = PuzzleDecoder(self.puzzle_config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.attention_layers = tuple(i for i, b in enumerate(self.puzzle_config.blocks) if b.attention.kind == "gqa")
        self.post_init()

    # -- HF plumbing ------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Init for weights missing from a checkpoint, and the RoPE table (a buffer never saved)."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, RotaryEmbedding):
            inv_freq = rope_inv_freq(self.puzzle_config)
            module.inv_freq.copy_(inv_freq.to(device=module.inv_freq.device, dtype=module.inv_freq.dtype))

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """As GenerationMixin's, but the default dynamic cache becomes a DeciLMCache (see the module doc)."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if getattr(generation_config, "cache_implementation", None) not in (None, "dynamic"):
            return
        for key in ("cache", "past_key_values"):
            cache = model_kwargs.get(key)
            if type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False):
                model_kwargs[key] = DeciLMCache(self.config)

    def _past_length(self, cache) -> int:
        """Positions already in `cache`, read from the first attention layer (0 without cache or attention)."""
        if cache is None or not self.attention_layers:
            return 0
        return cache.get_seq_length(self.attention_layers[0])

    # -- forward ----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        """Logits for input_ids (B, T) int64, or inputs_embeds (B, T, C).

        Args:
            attention_mask: (B, S) with 1 for real tokens and 0 for padding, over cached + new
                positions (left padding). Position ids are derived from it when not given.
            position_ids: (B, T) int64; default: from the mask, else continuing after the cache.
            cache: an HF Cache (DeciLMCache by default; `past_key_values=` is accepted as well).
            labels: (B, T) int64 targets, -100 ignored; the loss is the mean next-token cross
                entropy in nats (labels shifted by one inside).
            use_cache: create a DeciLMCache when none is given (default: config.use_cache).
            logits_to_keep: int k > 0 keeps the last k positions; a tensor selects positions.
            output_hidden_states: also return (embeddings, output of each layer), before the final norm.
            kwargs: `cache_position` and other generate extras are accepted and ignored (positions
                come from position_ids, the mask or the cache).

        Returns:
            CausalLMOutputWithPast (a tuple when return_dict=False).

        Raises:
            ValueError: both or neither of input_ids and inputs_embeds, or a non-2D attention mask (a 4D one:
                a static or compiled cache, which this model does not support).
        """
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, T) or inputs_embeds (B, T, C)")
        if attention_mask is not None and attention_mask.dim() != 2:
            # a 4D mask is what generate() builds for a static or compiled cache (breaker: named as the user's mask)
            static = (" (generate() builds such a mask for cache_implementation='static' or a compiled cache, which "
                      "this model does not support: leave cache_implementation unset for its own dynamic cache)"
                      if attention_mask.dim() == 4 else "")
            raise ValueError(f"attention_mask must be (B, S) with 1 = token, 0 = padding; got shape "
                             f"{tuple(attention_mask.shape)}{static}")
        if kwargs.get("output_attentions"):  # breaker: attentions came back None without a word
            warnings.warn("output_attentions is not supported (attention runs in fused SDPA kernels): the output's "
                          "attentions is None")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if not use_cache:
            cache = None
        elif cache is None:
            cache = DeciLMCache(self.config)

        h = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T = h.shape[:2]
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]  # (B, T)
            else:
                past = self._past_length(cache)
                position_ids = torch.arange(past, past + T, device=h.device).unsqueeze(0).expand(B, T)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # plain causal attention, SDPA's fast path
        cos, sin = self.model.rotary_emb(position_ids, h.dtype)  # (B, T, D) each

        hidden_states = [h] if output_hidden_states else None
        for layer in self.model.layers:
            h = layer(h, cos, sin, cache, attention_mask)
            if hidden_states is not None:
                hidden_states.append(h)
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep > 0 else h
        else:
            h = h[:, logits_to_keep]
        logits = self.lm_head(self.model.norm(h))  # (B, T', V)

        loss = None
        if labels is not None:
            shifted = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(shifted, labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        out = CausalLMOutputWithPast(**{
            "loss": loss,
            "logits": logits,
            _CACHE_FIELD: cache,
            "hidden_states": tuple(hidden_states) if hidden_states is not None else None,
        })
        return out.to_tuple() if return_dict is False else out
