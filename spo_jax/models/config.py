"""Architecture hyperparameters of the supported families and their mapping from / to an HF ``config.json``.

Llama 2/3/3.1/3.2 (llama3 RoPE scaling), Mistral, Qwen2/2.5, Qwen3 and GPT-2 are one ``ModelConfig``: GPT-2
differs from Llama only in fields (LayerNorm with bias, learned absolute positions instead of RoPE, a
non-gated MLP with a GELU, biases everywhere).
"""

from __future__ import annotations

import dataclasses
import functools

import jax

__all__ = ["SUPPORTED_MODEL_TYPES", "ACTIVATIONS", "ModelConfig"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
_LAYER_TYPES = ("full_attention", "sliding_attention")
_HF_DEFAULT_WINDOW = 4096  # MistralConfig / Qwen2Config / Qwen3Config fill a missing sliding_window with it

# HF activation names -> functions. The "gelu_new" family is GELU's tanh approximation.
ACTIVATIONS = {
    "silu": jax.nn.silu, "swish": jax.nn.silu, "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyperparameters; ``from_hf`` / ``to_hf`` convert from / to an HF ``config.json`` dict.

    ``rms_norm_eps`` is the epsilon of every norm (GPT-2's ``layer_norm_epsilon`` too).
    ``eos_token_id`` is an int, a tuple of ints (Llama 3.x lists several) or None.
    """
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    sliding_window: int | None = None  # the window of the "sliding_attention" layers; None = no window
    # per layer "full_attention" | "sliding_attention" (transformers' Qwen2/Qwen3 layer_types);
    # None = every layer windowed when sliding_window is set (Mistral), else full attention
    layer_types: tuple | None = None
    norm_type: str = "rms"  # "rms" (RMSNorm, scale only) or "layer" (LayerNorm with bias)
    position_embedding: str = "rope"  # "rope" or "learned" (absolute, indexed by ``positions``)
    hidden_act: str = "silu"  # a key of ACTIVATIONS
    gated_mlp: bool = True  # down(act(gate(x)) * up(x)); False: down(act(up(x)))
    mlp_bias: bool = False
    attention_out_bias: bool = False  # o_proj bias (attention_bias covers q/k/v)

    def __post_init__(self):
        if self.sliding_window is not None and self.model_type not in ("mistral", "qwen2", "qwen3"):
            raise ValueError(f"{self.model_type} config: sliding_window is not a field of this family in "
                             f"transformers (set it to None)")
        if self.layer_types is not None:
            if self.model_type not in ("qwen2", "qwen3"):
                raise ValueError(f"{self.model_type} config: per-layer layer_types are supported for qwen2 / qwen3 "
                                 f"only (a Mistral with alternating attention is a Ministral model)")
            bad = [t for t in self.layer_types if t not in _LAYER_TYPES]
            if bad or len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(f"{self.model_type} config: layer_types must list one of {_LAYER_TYPES} for each "
                                 f"of the {self.num_hidden_layers} layers; got {list(self.layer_types)}")

    @property
    def layer_windows(self) -> tuple:
        """Each layer's attention window (None = full causal attention), as transformers applies it."""
        if self.layer_types is None:
            return (self.sliding_window,) * self.num_hidden_layers
        return tuple(self.sliding_window if t == "sliding_attention" else None for t in self.layer_types)

    @property
    def eos_token_ids(self) -> tuple:
        """All EOS ids as a tuple (empty when there is none)."""
        e = self.eos_token_id
        return () if e is None else tuple(e) if isinstance(e, (tuple, list)) else (int(e),)

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        mt = d.get("model_type") or _type_from_architectures(d.get("architectures"))
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if mt == "gpt2":
            return cls._from_gpt2(d)
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if k not in d:
                raise ValueError(f"model config is missing {k!r}")
        heads = int(d["num_attention_heads"])
        rope = d.get("rope_scaling") or d.get("rope_parameters")
        theta = d.get("rope_theta") or (rope or {}).get("rope_theta", 10000.0)
        if rope and rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = None
        attention_bias = bool(d.get("attention_bias", mt == "qwen2"))
        return cls(
            model_type=mt, vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]), num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads, num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
            rope_scaling=tuple(sorted(rope.items())) if rope else None,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=attention_bias, qk_norm=mt == "qwen3",
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            bos_token_id=d.get("bos_token_id"), eos_token_id=_eos(d.get("eos_token_id")),
            pad_token_id=d.get("pad_token_id"),
            **_window_fields(mt, d),
            hidden_act=_act(d.get("hidden_act", "silu"), "hidden_act"),
            mlp_bias=bool(d.get("mlp_bias", False)),
            attention_out_bias=attention_bias and mt != "qwen2")  # Qwen2: q/k/v biases only

    @classmethod
    def _from_gpt2(cls, d: dict) -> "ModelConfig":
        """GPT-2 names (n_embd, n_layer, n_head, n_positions, n_inner, ...) -> ModelConfig."""
        for k in ("vocab_size", "n_embd", "n_layer", "n_head"):
            if k not in d:
                raise ValueError(f"gpt2 config is missing {k!r}")
        if d.get("scale_attn_by_inverse_layer_idx", False):
            raise ValueError("gpt2 config: scale_attn_by_inverse_layer_idx=True is not supported "
                             "(set it to false or use another implementation)")
        if not d.get("scale_attn_weights", True):
            raise ValueError("gpt2 config: scale_attn_weights=False is not supported (only 1/sqrt(head_dim))")
        if d.get("add_cross_attention", False):
            raise ValueError("gpt2 config: add_cross_attention=True (encoder-decoder) is not supported")
        # reorder_and_upcast_attn only changes the order/precision of the same product: accepted.
        D, H = int(d["n_embd"]), int(d["n_head"])
        if D % H:
            raise ValueError(f"gpt2 config: n_embd={D} is not divisible by n_head={H}")
        return cls(
            model_type="gpt2", vocab_size=int(d["vocab_size"]), hidden_size=D,
            intermediate_size=int(d.get("n_inner") or 4 * D), num_hidden_layers=int(d["n_layer"]),
            num_attention_heads=H, num_key_value_heads=H, head_dim=D // H,
            rms_norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            attention_bias=True, attention_out_bias=True, mlp_bias=True,
            max_position_embeddings=int(d.get("n_positions", 1024)),
            bos_token_id=d.get("bos_token_id"), eos_token_id=_eos(d.get("eos_token_id")),
            pad_token_id=d.get("pad_token_id"),
            norm_type="layer", position_embedding="learned", gated_mlp=False,
            hidden_act=_act(d.get("activation_function", "gelu_new"), "activation_function"))

    def to_hf(self) -> dict:
        """An HF config.json dict (without ``architectures``) that the family's config class loads."""
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        if self.model_type == "gpt2":
            return dict(model_type="gpt2", vocab_size=self.vocab_size, n_embd=self.hidden_size,
                        n_layer=self.num_hidden_layers, n_head=self.num_attention_heads,
                        n_positions=self.max_position_embeddings, n_inner=self.intermediate_size,
                        layer_norm_epsilon=self.rms_norm_eps, activation_function=self.hidden_act,
                        tie_word_embeddings=self.tie_word_embeddings, scale_attn_weights=True,
                        bos_token_id=self.bos_token_id, eos_token_id=eos, pad_token_id=self.pad_token_id)
        d = dataclasses.asdict(self)
        for k in ("qk_norm", "norm_type", "position_embedding", "gated_mlp", "attention_out_bias"):
            d.pop(k)
        if self.model_type != "llama" and not self.mlp_bias:
            d.pop("mlp_bias")  # a LlamaConfig field only
        d.pop("layer_types")
        d.pop("sliding_window")
        d.update(self._window_to_hf())
        d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        d["eos_token_id"] = eos
        return d

    def _window_to_hf(self) -> dict:
        """The window fields so that transformers reloads the same attention: written explicitly (a missing
        ``sliding_window`` means 4096 to MistralConfig), Qwen's ``use_sliding_window`` kept."""
        if self.model_type == "mistral":
            return dict(sliding_window=self.sliding_window)
        if self.model_type not in ("qwen2", "qwen3"):
            return {}
        if self.sliding_window is None:
            return dict(use_sliding_window=False, sliding_window=None)
        types = list(self.layer_types or ("sliding_attention",) * self.num_hidden_layers)
        out = dict(use_sliding_window=True, sliding_window=self.sliding_window, layer_types=types)
        first = types.index("sliding_attention") if "sliding_attention" in types else len(types)
        if types == ["full_attention"] * first + ["sliding_attention"] * (len(types) - first):
            out["max_window_layers"] = first  # what older transformers versions read instead of layer_types
        return out


#: HF ``architectures`` names of the supported families (a config.json without ``model_type``).
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3", "GPT2LMHeadModel": "gpt2"}


def _type_from_architectures(architectures) -> str:
    """The family of a config without ``model_type``, from its ``architectures``; never a guess."""
    names = list(architectures or [])
    types = {ARCHITECTURES.get(a) for a in names}
    if len(types) == 1 and None not in types:
        return types.pop()
    raise ValueError(f"the model config has no model_type, and its architectures {names} "
                     f"{'name no supported family' if names else 'are not given either'} (supported: "
                     f"{', '.join(ARCHITECTURES)}); set model_type to one of {', '.join(SUPPORTED_MODEL_TYPES)} "
                     "if the model is one of them")


def _eos(e):
    """HF eos_token_id (int, list or None) -> int, tuple or None (hashable)."""
    if isinstance(e, (list, tuple)):
        return tuple(int(x) for x in e) if len(e) != 1 else int(e[0])
    return None if e is None else int(e)


def _act(name: str, field: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported {field} {name!r}; supported: {', '.join(ACTIVATIONS)}")
    return name


def _window_fields(model_type: str, d: dict) -> dict:
    """``sliding_window`` / ``layer_types`` as transformers reads the family's config.json.

    Mistral: ``sliding_window`` on every layer, 4096 when the key is absent (MistralConfig's default), null =
    full attention; ``layer_types`` is refused (alternating attention is Ministral's). Qwen2/Qwen3: a window
    only when ``use_sliding_window``, then only on the layers in ``layer_types`` marked "sliding_attention"
    (by default those at index >= ``max_window_layers``, 28 when absent). Llama has no window.
    """
    if model_type == "mistral":
        if "layer_types" in d:
            raise ValueError("mistral config: layer_types (alternating sliding / full attention) is not supported; "
                             "remove it (transformers' MistralForCausalLM ignores it) or convert to qwen2 layout")
        return dict(sliding_window=_window(d.get("sliding_window", _HF_DEFAULT_WINDOW)))
    if model_type not in ("qwen2", "qwen3") or not d.get("use_sliding_window", False):
        return dict(sliding_window=None)
    window = _window(d.get("sliding_window", _HF_DEFAULT_WINDOW))
    if window is None:
        return dict(sliding_window=None)
    types = d.get("layer_types")
    if types is None:
        first = int(d.get("max_window_layers", 28))
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(int(d["num_hidden_layers"]))]
    return dict(sliding_window=window, layer_types=tuple(types))


def _window(w) -> int | None:
    return int(w) if w else None
