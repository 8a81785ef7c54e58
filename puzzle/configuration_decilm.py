"""Hugging Face configuration of an exported Puzzle child: model_type "nemotron-nas" (DeciLM).

Copied verbatim into every exported folder, next to `architecture.py`, `modeling.py` and
`modeling_decilm.py`. It imports only transformers and (relatively) `architecture.py`, so the same
file works as `puzzle.configuration_decilm` and, through `trust_remote_code=True`, from the folder.

config.json holds the standard Llama fields plus `block_configs`, one nemotron-nas entry per layer
(see `architecture.block_config_entry`). `num_key_value_heads` and `intermediate_size` are the
parent's; each layer's own sizes come from its entry.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from .architecture import AttentionConfig, BlockConfig, FFNConfig, ModelConfig, block_config_entry, block_from_entry


class BlockEntry(dict):
    """One `block_configs` entry: a plain dict (it serializes as JSON) that also reads by attribute.

    vLLM's DeciLM code reads `config.block_configs[i].attention.no_op` and `.ffn.ffn_mult`, as
    NVIDIA's own configuration class allows; a missing key raises AttributeError, so `hasattr` works.
    """

    def __init__(self, entry: dict):
        super().__init__({k: BlockEntry(v) if isinstance(v, dict) else v for k, v in entry.items()})

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _rope_type(scaling: dict | None) -> str:
    scaling = scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def config_dict_from_model_config(config: ModelConfig) -> dict:
    """The config.json fields that describe the model: model_type, the Llama fields and block_configs.

    Export adds architectures, auto_map, dtype and provenance. `rope_scaling` is None for plain RoPE,
    else HF's dict (rope_type "linear" or "llama3" and that type's parameters).
    """
    H, C = config.num_attention_heads, config.hidden_size
    return {
        "model_type": DeciLMConfig.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": H,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": config.rms_norm_eps,
        "use_cache": True,
        "rope_theta": config.rope_theta,
        "rope_scaling": dict(config.rope_scaling) if _rope_type(config.rope_scaling) != "default" else None,
        "attention_bias": config.attention_bias,
        "attention_dropout": 0.0,
        "mlp_bias": config.mlp_bias,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "block_configs": [block_config_entry(b, H, C) for b in config.blocks],
    }


class DeciLMConfig(PretrainedConfig):
    """Llama fields plus per-layer `block_configs`; `to_model_config()` gives Puzzle's ModelConfig.

    Without `block_configs` every layer is the parent block (a homogeneous Llama). RoPE is read from
    `rope_theta` and `rope_scaling` (Llama's keys), or from `rope_parameters` when transformers 5
    re-saved the config; it is kept in `rope_parameters` (transformers 5's place for it).

    Raises:
        ValueError (ArchitectureError): block_configs that cannot be built (see `to_model_config`),
            or a `num_hidden_layers` that disagrees with the number of entries.
    """

    model_type = "nemotron-nas"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        intermediate_size: int = 11008,
        num_hidden_layers: int | None = None,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-5,
        use_cache: bool = True,
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        rope_parameters: dict | None = None,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        mlp_bias: bool = False,
        tie_word_embeddings: bool = False,
        block_configs: list[dict] | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        if hidden_act != "silu":
            raise ValueError(f"hidden_act={hidden_act!r} is not supported: Puzzle blocks are SwiGLU (silu)")
        num_key_value_heads = num_key_value_heads or num_attention_heads
        head_dim = head_dim or hidden_size // num_attention_heads
        if block_configs is None:
            parent = BlockConfig(AttentionConfig("gqa", num_key_value_heads), FFNConfig("swiglu", intermediate_size))
            block_configs = [block_config_entry(parent, num_attention_heads, hidden_size)] * (num_hidden_layers or 32)
        if num_hidden_layers is not None and num_hidden_layers != len(block_configs):
            raise ValueError(f"num_hidden_layers={num_hidden_layers} but block_configs has {len(block_configs)} "
                             "entries; they must agree (one entry per layer)")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = len(block_configs)
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.mlp_bias = mlp_bias
        self.block_configs = [BlockEntry(entry) for entry in block_configs]

        # RoPE: Llama's rope_theta + rope_scaling, or transformers 5's rope_parameters (which holds both).
        if rope_scaling is None and rope_parameters:
            rope_theta = rope_parameters.get("rope_theta", rope_theta)
            rope_scaling = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
        scaling = {k: v for k, v in (rope_scaling or {}).items() if k != "type"}
        scaling["rope_type"] = _rope_type(rope_scaling)
        self.rope_theta = rope_theta
        self.rope_parameters = {**scaling, "rope_theta": rope_theta}

        super().__init__(tie_word_embeddings=tie_word_embeddings, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
        self.to_model_config()  # fail early on entries that cannot be built

    def to_model_config(self) -> ModelConfig:
        """Puzzle's ModelConfig for this checkpoint (blocks parsed with `architecture.block_from_entry`).

        Raises ArchitectureError (a ValueError) for an entry this toolkit cannot run.
        """
        H, C = self.num_attention_heads, self.hidden_size
        scaling = {k: v for k, v in self.rope_parameters.items() if k != "rope_theta"}
        return ModelConfig(
            vocab_size=self.vocab_size,
            hidden_size=C,
            num_attention_heads=H,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate_size,
            blocks=tuple(block_from_entry(entry, H, C) for entry in self.block_configs),
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_parameters.get("rope_theta", self.rope_theta),
            rope_scaling=scaling if _rope_type(scaling) != "default" else None,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=bool(self.tie_word_embeddings),
            attention_bias=self.attention_bias,
            mlp_bias=self.mlp_bias,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )

    @classmethod
    def from_model_config(cls, config: ModelConfig, **kwargs) -> "DeciLMConfig":
        """The DeciLMConfig of a Puzzle ModelConfig (kwargs override or add config fields)."""
        fields = config_dict_from_model_config(config)
        fields.pop("model_type")
        return cls(**{**fields, **kwargs})
