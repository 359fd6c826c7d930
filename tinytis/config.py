"""ModelArgs: the shape of a Mistral-architecture model (or a Qwen3 one: the same plus q/k RMSNorm), read from HF
config.json or params.json."""
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from tinytis.errors import UserError

MAX_LAYERS, MAX_SIZE = 1024, 1 << 30  # beyond any released model: a config past them is corrupt, not big
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    hidden_dim: int = 14336
    vocab_size: int = 32768
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_seq_len: int = 32768
    sliding_window: int | None = None
    tie_embeddings: bool = False
    rope_scaling: dict | None = None  # llama3: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on each query and key head before RoPE

    def __post_init__(self):
        """A config of the wrong types or out of range is a UserError here, not a crash in the model."""
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size", "max_seq_len"):
            if not _integer(getattr(self, name), 1, MAX_LAYERS if name == "n_layers" else MAX_SIZE):
                raise UserError(f"model config: {name} = {getattr(self, name)!r} is not a positive integer in range")
        for name, low in (("norm_eps", 0.0), ("rope_theta", 1.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v < math.inf:
                raise UserError(f"model config: {name} = {v!r} is not a finite number >= {low:g}; fix the config")
        if self.sliding_window is not None and not _integer(self.sliding_window, 1, MAX_SIZE):
            raise UserError(f"model config: sliding_window = {self.sliding_window!r} is neither null nor a positive integer")
        if not isinstance(self.tie_embeddings, bool):
            raise UserError(f"model config: tie_word_embeddings = {self.tie_embeddings!r} is not true or false")
        if self.rope_scaling is not None and not all(
                not isinstance(v, bool) and isinstance(v, (int, float)) and 0 < v < math.inf for v in self.rope_scaling.values()):
            raise UserError(f"model config: rope_scaling {self.rope_scaling!r} holds a value that is not a positive number")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}; fix the model config")

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        model_type = cfg.get("model_type")
        if model_type not in ("mistral", "llama", "qwen3"):
            raise UserError(f"unknown model_type {model_type!r} in config.json; tinytis runs 'mistral', 'llama' and 'qwen3' models")
        if cfg.get("hidden_act", "silu") != "silu":
            raise UserError(f"hidden_act {cfg['hidden_act']!r} in config.json: tinytis implements the SiLU (SwiGLU) MLP only")
        if cfg.get("attention_bias"):
            raise UserError("config.json asks for biases on the attention projections; tinytis implements them without")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise UserError(f"rope type {rope_type!r} in config.json is not supported; tinytis implements plain and llama3 RoPE")
        n_heads = cfg["num_attention_heads"]
        return cls(
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            hidden_dim=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=cfg.get("rope_theta") or rope.get("rope_theta", 1e4),
            max_seq_len=cfg.get("max_position_embeddings", 32768),
            sliding_window=sliding_window(cfg),
            tie_embeddings=cfg.get("tie_word_embeddings", False),
            rope_scaling={k: rope[k] for k in LLAMA3_ROPE_KEYS} if rope_type == "llama3" else None,
            qk_norm=model_type == "qwen3",
        )

    @classmethod
    def from_params_json(cls, params: dict) -> "ModelArgs":
        n_heads = params["n_heads"]
        return cls(
            dim=params["dim"],
            n_layers=params["n_layers"],
            n_heads=n_heads,
            n_kv_heads=params.get("n_kv_heads") or n_heads,
            head_dim=params.get("head_dim") or params["dim"] // n_heads,
            hidden_dim=params["hidden_dim"],
            vocab_size=params["vocab_size"],
            norm_eps=params.get("norm_eps", 1e-5),
            rope_theta=params.get("rope_theta", 1e4),
            max_seq_len=params.get("max_seq_len", 32768),
            sliding_window=params.get("sliding_window"),
            tie_embeddings=params.get("tie_embeddings", False),
        )

    @classmethod
    def from_dir(cls, path: Path) -> "ModelArgs":
        """Read config.json (HF layout) or params.json (consolidated layout) from a model directory."""
        for name, reader in (("config.json", cls.from_hf_config), ("params.json", cls.from_params_json)):
            f = path / name
            if f.exists():
                try:
                    return reader(json.loads(f.read_text()))
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                    raise UserError(f"{f} is not a valid model config ({type(e).__name__}: {e}); re-download or fix it")
        raise UserError(f"{path} has no config.json or params.json; point --model at a model directory")

    def to_hf_config(self) -> dict:
        """The config.json that transformers' MistralForCausalLM (Qwen3ForCausalLM with qk_norm) reads for this shape."""
        return {
            "architectures": ["Qwen3ForCausalLM" if self.qk_norm else "MistralForCausalLM"],
            "model_type": "qwen3" if self.qk_norm else "mistral",
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.hidden_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_seq_len,
            "sliding_window": self.sliding_window,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "float32",
        } | ({"rope_scaling": {"rope_type": "llama3", **self.rope_scaling}} if self.rope_scaling else {})

    def to_dict(self) -> dict:
        return asdict(self)


def sliding_window(cfg: dict) -> int | None:
    """The attention window of an HF config; Qwen3 configs name a window that only applies with use_sliding_window."""
    if cfg.get("model_type") != "qwen3":
        return cfg.get("sliding_window")
    if cfg.get("use_sliding_window"):
        raise UserError("config.json enables Qwen3's per-layer sliding window; tinytis runs Qwen3 with full attention only")
    return None


def _integer(v, low: int, high: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


MISTRAL_7B_V03 = ModelArgs()
