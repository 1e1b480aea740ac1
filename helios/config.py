"""Named configurations of Helios, all in one place.

Each stage has its own small config dataclass (saved as the ``config.json`` of its checkpoint
folder); ``HeliosConfig`` groups them with the video geometry and the request limits.
``CONFIGS`` holds the named presets: ``tiny`` (CPU demo, CI, tests) and ``14b`` (the
real-time 720p target on one H100).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import HeliosError

# The AR's vocabulary: the plan vocabulary (``plan_vocab_size`` ids: the refiner's learned
# codebook rows, then its geometry bins) comes first, then the special tokens.
NUM_SPECIAL_TOKENS = 3  # pad, begin-of-video, end-of-video

# Config fields under their earlier names, read from older checkpoints.
_RENAMED = {"speculative_tokens": "num_draft_tokens", "codebook_size": "plan_vocab_size"}


def _renamed(d: dict) -> dict:
    return {_RENAMED.get(k, k): v for k, v in d.items()}


@dataclass(frozen=True)
class TextEncoderConfig:
    """Byte-level transformer encoder (UTF-8 bytes, no vocabulary file)."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 512
    max_prompt_bytes: int = 256
    # Output projections into the prefix-embedding space of the AR backbone and the draft.
    ar_hidden_size: int = 128
    draft_hidden_size: int = 64

    @property
    def vocab_size(self) -> int:
        return 256 + 2  # bytes + begin / end of text


@dataclass(frozen=True)
class ARConfig:
    """Decoder-only transformer in HuggingFace ``LlamaConfig`` terms."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 344
    # Plan-token ids the model generates (the refiner's ``plan_vocab_size``).
    plan_vocab_size: int = 256
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False

    @property
    def vocab_size(self) -> int:
        return self.plan_vocab_size + NUM_SPECIAL_TOKENS

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def pad_token_id(self) -> int:
        return self.plan_vocab_size

    @property
    def bos_token_id(self) -> int:
        return self.plan_vocab_size + 1

    @property
    def eos_token_id(self) -> int:
        return self.plan_vocab_size + 2

    def to_hf_dict(self) -> dict:
        """The ``config.json`` that ``transformers.LlamaForCausalLM`` and TensorRT-LLM read."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32",
            # Helios' own field, ignored by transformers: the plan part of the vocabulary.
            "plan_vocab_size": self.plan_vocab_size,
        }

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ARConfig":
        d = _renamed(d)
        return cls(
            hidden_size=d["hidden_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d["num_key_value_heads"],
            intermediate_size=d["intermediate_size"],
            plan_vocab_size=d["plan_vocab_size"],
            max_position_embeddings=d["max_position_embeddings"],
            rope_theta=d["rope_theta"],
            rms_norm_eps=d["rms_norm_eps"],
            tie_word_embeddings=d["tie_word_embeddings"],
        )


@dataclass(frozen=True)
class RefinerConfig:
    """Diffusion transformer that renders one latent frame in a few steps."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    latent_channels: int = 16
    patch_size: int = 2
    # History frames are embedded with a coarser patch (patch_size * history_pool): the
    # "compressed" history of the architecture brief. The tiny model keeps full resolution:
    # its 64 tokens a frame are cheap, and a coarser history could not carry a small object's
    # edges from one latent frame to the next.
    history_pool: int = 1
    history_frames: int = 2
    # Rows of the learned codebook (the region tokens' vocabulary).
    codebook_size: int = 256
    plan_tokens_per_frame: int = 8
    num_steps: int = 3
    # Flow-matching timestep shift of the distilled few-step schedule.
    shift: float = 3.0
    # Geometry tokens after the region tokens of each frame: the salient mass's centre row,
    # centre column and size, measured on the latent frame (not learned) and quantised into
    # this many bins each. Their ids follow the codebook's: the AR's plan vocabulary is
    # ``plan_vocab_size``. () for none. Why: docs/training.md, "Geometry tokens".
    geometry_bins: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "geometry_bins", tuple(self.geometry_bins))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def region_tokens(self) -> int:
        """Plan tokens of a frame that are codebook rows (the rest are geometry tokens)."""
        return self.plan_tokens_per_frame - len(self.geometry_bins)

    @property
    def plan_vocab_size(self) -> int:
        """Plan-token ids the refiner reads: the codebook's rows, then every geometry bin."""
        return self.codebook_size + sum(self.geometry_bins)


@dataclass(frozen=True)
class VAEConfig:
    latent_channels: int = 16
    frames_per_latent: int = 4
    channels: tuple = (64, 32, 16)  # decoder widths from the latent side to the pixel side
    downsample: int = 8

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(self.channels))


@dataclass(frozen=True)
class HeliosConfig:
    name: str = "tiny"
    height: int = 128
    width: int = 128
    fps: int = 24
    # AR context: text prefix, begin-of-video, then at most this many latent frames of plan
    # tokens. Frames follow each other with no separator: every plan_tokens_per_frame tokens.
    ar_context_frames: int = 8
    # Memory and time per frame stay flat however long a video runs (the AR context is a
    # window, the refiner's history a few frames): the bound is one of patience, 10 minutes.
    max_duration_s: float = 600.0
    kv_block_size: int = 16
    num_draft_tokens: int = 4  # tokens the draft proposes per speculative round
    # A prompt switch dissolves from the last frame shown before it into the new prompt's
    # frames over this long (0: a cut), and a continuation from its clip's last frame into
    # its own. Without it the frame at a switch changes 12x the median frame change, against
    # 4x at the same place in a video without a switch, and a continuation's first frame 4x
    # (docs/sessions.md, "What a switch looks like", "Continuing a video").
    switch_fade_s: float = 0.5
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    ar_backbone: ARConfig = field(default_factory=ARConfig)
    draft: ARConfig = field(default_factory=lambda: ARConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=172))
    refiner: RefinerConfig = field(default_factory=RefinerConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)

    @property
    def plan_tokens_per_frame(self) -> int:
        """Plan tokens per latent frame: the refiner's (the AR generates what it reads)."""
        return self.refiner.plan_tokens_per_frame

    @property
    def latent_height(self) -> int:
        return self.height // self.vae.downsample

    @property
    def latent_width(self) -> int:
        return self.width // self.vae.downsample

    @property
    def frames_per_latent(self) -> int:
        return self.vae.frames_per_latent

    @property
    def switch_fade_frames(self) -> int:
        return round(self.switch_fade_s * self.fps)

    def num_latent_frames(self, num_frames: int) -> int:
        return math.ceil(num_frames / self.frames_per_latent)

    def kv_blocks_per_stream(self) -> int:
        """Paged-KV blocks one stream can need: its longest context in blocks."""
        return math.ceil(self.max_ar_positions() / self.kv_block_size)

    def max_ar_positions(self) -> int:
        # prefix (bytes + begin/end of text) + begin-of-video + a full window of frames + the
        # draft tokens a speculative verification holds for a moment past the window.
        return (self.text_encoder.max_prompt_bytes + 2 + 1
                + self.ar_context_frames * self.plan_tokens_per_frame + self.num_draft_tokens + 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HeliosConfig":
        d = _renamed(d)
        # Older checkpoints stored plan_tokens_per_frame here too; the refiner's is the one.
        d.pop("plan_tokens_per_frame", None)
        d["text_encoder"] = TextEncoderConfig(**d["text_encoder"])
        d["ar_backbone"] = ARConfig(**_renamed(d["ar_backbone"]))
        d["draft"] = ARConfig(**_renamed(d["draft"]))
        d["refiner"] = RefinerConfig(**d["refiner"])
        d["vae"] = VAEConfig(**d["vae"])
        return cls(**d)


def _tiny() -> HeliosConfig:
    # 8 region tokens (a 2 x 4 split) + 3 geometry tokens a frame. An object moves 4 pixels a
    # latent frame (1/32 of the frame), so 32 position bins make a moving object's position
    # token change every latent frame, by one bin, whatever the object looks like.
    geometry = (32, 32, 8)
    plan = 8 + len(geometry)
    vocab = 256 + sum(geometry)
    return HeliosConfig(
        ar_backbone=ARConfig(plan_vocab_size=vocab),
        draft=ARConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=172, plan_vocab_size=vocab),
        refiner=RefinerConfig(plan_tokens_per_frame=plan, geometry_bins=geometry))


def _14b() -> HeliosConfig:
    codebook = 8192
    # 4 plan tokens per latent frame: at 24 FPS a latent frame has 167 ms, and next to the
    # refiner that leaves room for at most about 8 full-size decode steps. Measured on an H100
    # (bf16, docs/performance.md), 8 tokens cost 110 ms (about 8.6 rounds of 12.9 ms) beside a
    # refiner of 75-89 ms, which cannot reach 24 FPS; 4 tokens take 55-66 ms. Parameter counts
    # do not depend on it.
    plan = 4
    max_prompt = 512
    context_frames = 16
    max_pos = max_prompt + 3 + context_frames * plan + 5
    return HeliosConfig(
        name="14b",
        height=720,
        width=1280,
        fps=24,
        ar_context_frames=context_frames,
        max_duration_s=600.0,
        kv_block_size=64,
        num_draft_tokens=4,
        text_encoder=TextEncoderConfig(
            hidden_size=2048, num_layers=20, num_heads=16, intermediate_size=8192,
            max_prompt_bytes=max_prompt, ar_hidden_size=5120, draft_hidden_size=1024),
        ar_backbone=ARConfig(
            hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
            num_key_value_heads=8, intermediate_size=13824, plan_vocab_size=codebook,
            max_position_embeddings=max(1024, max_pos)),
        draft=ARConfig(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
            num_key_value_heads=4, intermediate_size=2816, plan_vocab_size=codebook,
            max_position_embeddings=max(1024, max_pos)),
        refiner=RefinerConfig(
            hidden_size=2048, num_layers=20, num_heads=16, latent_channels=16, patch_size=2,
            history_pool=4, history_frames=3, codebook_size=codebook,
            plan_tokens_per_frame=plan, num_steps=3),
        vae=VAEConfig(latent_channels=16, frames_per_latent=4, channels=(512, 256, 128)),
    )


def _14b_384p() -> HeliosConfig:
    # The 14b model at 640x384, the resolution Helios itself reports its speed at: only the
    # frame size changes (the refiner renders 24 x 40 = 960 tokens a latent frame, not 3600).
    return dataclasses.replace(_14b(), name="14b-384p", height=384, width=640)


CONFIGS = {"tiny": _tiny, "14b": _14b, "14b-384p": _14b_384p}


def with_plan_tokens(cfg: HeliosConfig, n: int) -> HeliosConfig:
    """``cfg`` with ``n`` plan tokens per latent frame (the AR's output and the refiner's
    conditioning change together; parameter counts do not)."""
    return dataclasses.replace(cfg, refiner=dataclasses.replace(cfg.refiner, plan_tokens_per_frame=n))


def get_config(name: str) -> HeliosConfig:
    if name not in CONFIGS:
        raise HeliosError("config", f"must be one of {sorted(CONFIGS)}, got {name!r}")
    return CONFIGS[name]()


# A checkpoint folder's model_index.json: its format, and the config it holds. Read here
# rather than in helios.checkpoint (which builds the modules) so that a process that only
# checks requests against a checkpoint's limits needs no torch.
FORMAT_VERSION = 1


def check_config(cfg: HeliosConfig) -> None:
    """The stages must agree on the sizes they exchange."""
    def need(ok, what):
        if not ok:
            raise HeliosError("checkpoint", f"config is inconsistent: {what}")
    ar, dr, te, rf = cfg.ar_backbone, cfg.draft, cfg.text_encoder, cfg.refiner
    need(te.ar_hidden_size == ar.hidden_size, "text_encoder.ar_hidden_size != ar_backbone.hidden_size")
    need(te.draft_hidden_size == dr.hidden_size, "text_encoder.draft_hidden_size != draft.hidden_size")
    need(dr.plan_vocab_size == ar.plan_vocab_size == rf.plan_vocab_size,
         "plan_vocab_size differs between ar_backbone, draft and refiner")
    need(rf.region_tokens > 0, "the refiner needs at least one region token a frame")
    need(rf.latent_channels == cfg.vae.latent_channels, "latent_channels differ")
    need(cfg.max_ar_positions() <= ar.max_position_embeddings,
         "the AR context window exceeds max_position_embeddings")
    need(0 <= cfg.switch_fade_s <= 5, "switch_fade_s must be in [0, 5] seconds")


def read_config(path: str | Path) -> HeliosConfig:
    """The config of a checkpoint folder (its model_index.json), checked for consistency."""
    path = Path(path)
    index_file = path / "model_index.json"
    if path.exists() and not path.is_dir():
        raise HeliosError("checkpoint", f"must be a checkpoint folder, {str(path)!r} is a file")
    if not path.is_dir():
        raise HeliosError("checkpoint", f"must be a checkpoint folder, {str(path)!r} does not exist")
    if not index_file.is_file():
        raise HeliosError("checkpoint", f"{str(path)!r} has no model_index.json; is it a Helios checkpoint?")
    try:
        index = json.loads(index_file.read_text())
        cfg = HeliosConfig.from_dict(index["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise HeliosError("checkpoint", f"{index_file} is not a valid model index: {e}") from None
    if index.get("format_version") != FORMAT_VERSION:
        raise HeliosError("checkpoint", f"{index_file}: format_version must be {FORMAT_VERSION}, "
                                        f"got {index.get('format_version')!r}")
    check_config(cfg)
    return cfg
