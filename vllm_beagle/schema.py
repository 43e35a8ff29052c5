"""The Beagle checkpoint schema: what `config.json` holds and which tensors `model.safetensors` holds.

A checkpoint is an HF-style directory. `config.json` is a Llama-style one-layer config that vLLM can
parse, whose `architectures` name one of the classes the plugin registers, plus a `beagle` section
with what only Beagle needs. This module knows nothing of vLLM, of the trainer or of torch modules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .verifier import speculators_section, verifier_of

SCHEMA_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# The state the draft's keys and values read. `method: eagle` feeds the target's final, post-norm state;
# `method: eagle3` feeds pre-norm residuals after chosen target layers (vLLM's aux hidden-state ids: 0 is
# the embedding output, `l` is the output of decoder layer `l - 1`): one layer's as it is ("layer"), or
# several layers' concatenated and projected by the draft's own `fc` to the hidden width ("fused",
# EAGLE-3's inputs), which vLLM applies through the draft's combine_hidden_states.
STATE_FINAL_NORM = "final_norm"
STATE_LAYER = "layer"
STATE_FUSED = "fused"
ARCH_BY_STATE = {
    STATE_FINAL_NORM: "EagleBeagleLlamaForCausalLM",
    STATE_LAYER: "Eagle3BeagleLlamaForCausalLM",
    STATE_FUSED: "Eagle3BeagleLlamaForCausalLM",
}
METHOD_BY_STATE = {STATE_FINAL_NORM: "eagle", STATE_LAYER: "eagle3", STATE_FUSED: "eagle3"}
# concat: draft steps also attend to the states the draft predicted in earlier steps (the paper's
# default); true_states: they attend to the target's true states only (the paper's no-concat mode).
KV_MODES = ("concat", "true_states")
# chain: K forward passes per round, each feeding back the previous step's prediction; parallel: one
# forward per round (vLLM's `parallel_drafting`), the rows after the first carrying a mask token and the
# draft's learned placeholder state `mask_hidden`.
DRAFTINGS = ("chain", "parallel")
MASK_HIDDEN = "mask_hidden"
# What a row's query (and the residual the block adds to) starts from: "token", the paper's, its token's
# embedding alone; "token+state", that plus a learned projection of the row's own state (the target's, or
# the draft's ĥ fed back), so that the query knows the context before its token and can match two tokens
# where a token's embedding matches one (prompt lookup's n-grams).
QUERY_TOKEN = "token"
QUERY_TOKEN_STATE = "token+state"
QUERIES = (QUERY_TOKEN, QUERY_TOKEN_STATE)
# The one integer tensor: the target token id of each row of a reduced draft vocabulary.
DRAFT_TO_TARGET = "draft_to_target"


class CheckpointError(ValueError):
    """A Beagle checkpoint that cannot be served; the message names the checkpoint and the field."""

    def __init__(self, checkpoint: str, message: str):
        super().__init__(f"Beagle checkpoint {checkpoint}: {message}")
        self.checkpoint = checkpoint


@dataclasses.dataclass
class BeagleConfig:
    """Everything needed to build a Beagle draft; widths and RoPE are copied from the target."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_parameters: dict[str, Any]
    max_position_embeddings: int
    state: str = STATE_FINAL_NORM
    state_layer: int | None = None
    state_layers: list[int] | None = None  # the fused kind's target layers, ascending (the order `fc` reads them)
    kv_mode: str = "concat"
    drafting: str = "chain"
    query: str = QUERY_TOKEN
    mask_token_id: int | None = None  # the token of a parallel draft's mask rows (its embedding is the target's)
    # Drafts over the N most frequent tokens of the training data with their own LM head and map the
    # result back to the target's ids (tensor `draft_to_target`); None: the target's full vocabulary.
    draft_vocab_size: int | None = None
    # The target vLLM serves the draft with when given the draft folder alone (verifier.py): a hub id or a
    # folder; None: not recorded, and the target must be named wherever the draft is served.
    verifier: str | None = None
    # Free-form facts the trainer records (data size, epochs, command); never read by the model.
    training: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "vocab_size", "max_position_embeddings"):
            check_positive_integer(name, getattr(self, name))
        if isinstance(self.rms_norm_eps, bool) or not isinstance(self.rms_norm_eps, (int, float)) \
                or not self.rms_norm_eps > 0:
            raise ValueError(f"field 'rms_norm_eps' must be a positive number, got {self.rms_norm_eps!r}")
        for name in ("state_layer", "draft_vocab_size", "mask_token_id"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"beagle.{name} must be an integer, got {value!r}")
        if not isinstance(self.training, dict):
            raise ValueError(f"beagle.training must be an object, got {self.training!r}")
        if self.state not in ARCH_BY_STATE:
            raise ValueError(f"beagle.state must be one of {sorted(ARCH_BY_STATE)}, got {self.state!r}")
        if (self.state == STATE_LAYER) != (self.state_layer is not None):
            raise ValueError("beagle.state_layer is required with state 'layer' and forbidden otherwise")
        if (self.state == STATE_FUSED) != (self.state_layers is not None):
            raise ValueError("beagle.state_layers is required with state 'fused' and forbidden otherwise")
        if self.state_layers is not None:
            layers = self.state_layers
            if (not isinstance(layers, list) or not layers
                    or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)
                    or layers != sorted(set(layers))):
                # Ascending: vLLM concatenates the aux states in layer order, whatever order the config lists.
                raise ValueError(f"beagle.state_layers must be a list of distinct layer ids in ascending order, "
                                 f"got {layers!r}")
        if self.kv_mode not in KV_MODES:
            raise ValueError(f"beagle.kv_mode must be one of {KV_MODES}, got {self.kv_mode!r}")
        if self.drafting not in DRAFTINGS:
            raise ValueError(f"beagle.drafting must be one of {DRAFTINGS}, got {self.drafting!r}")
        if self.query not in QUERIES:
            raise ValueError(f"beagle.query must be one of {QUERIES}, got {self.query!r}")
        if (self.drafting == "parallel") != (self.mask_token_id is not None):
            raise ValueError("beagle.mask_token_id is required with drafting 'parallel' and forbidden otherwise")
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"beagle.mask_token_id must be a token id below vocab_size {self.vocab_size}, "
                             f"got {self.mask_token_id}")
        if self.drafting == "parallel" and self.kv_mode != "concat":
            # vLLM writes the mask rows' K/V in the same forward pass as the true rows', and the plugin's
            # true-states backend cannot tell the two apart there.
            raise ValueError("drafting 'parallel' needs kv_mode 'concat': the mask rows attend to the "
                             "placeholder states of the rows before them")
        if self.draft_vocab_size is not None and not 0 < self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"beagle.draft_vocab_size must be between 1 and vocab_size {self.vocab_size}, "
                             f"got {self.draft_vocab_size}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )

    @property
    def architecture(self) -> str:
        return ARCH_BY_STATE[self.state]

    @property
    def aux_layers(self) -> list[int]:
        """The target layers whose pre-norm residuals vLLM hands to the draft (none for the final state)."""
        return {STATE_FINAL_NORM: [], STATE_LAYER: [self.state_layer]}.get(self.state, self.state_layers)

    @property
    def state_width(self) -> int:
        """The width of the target state a draft reads before its own projection (if any)."""
        return self.hidden_size * max(1, len(self.aux_layers))

    @property
    def method(self) -> str:
        """The vLLM speculative method that feeds this draft the state it was trained on."""
        return METHOD_BY_STATE[self.state]

    @classmethod
    def from_target(cls, target: Mapping[str, Any], intermediate_size: int | None = None, **beagle) -> BeagleConfig:
        """A draft config whose widths, heads, vocabulary and RoPE are the target's."""
        return cls(
            **dims_of(target),
            intermediate_size=intermediate_size or target["intermediate_size"],
            rms_norm_eps=target.get("rms_norm_eps", 1e-6),
            max_position_embeddings=target["max_position_embeddings"],
            **beagle,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json: a one-layer Llama config that vLLM parses, plus the `beagle` section."""
        d = {
            "architectures": [self.architecture],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_hidden_layers": 1,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": dict(self.rope_parameters),
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "beagle": {
                "version": SCHEMA_VERSION,
                "state": self.state,
                "state_layer": self.state_layer,
                "state_layers": self.state_layers,
                "kv_mode": self.kv_mode,
                "drafting": self.drafting,
                "query": self.query,
                "mask_token_id": self.mask_token_id,
                "draft_vocab_size": self.draft_vocab_size,
                "training": self.training,
            },
        }
        if self.aux_layers:
            # Read by vLLM to choose which target layers' residuals it hands to the draft.
            d["eagle_aux_hidden_state_layer_ids"] = list(self.aux_layers)
            d["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(self.aux_layers),
                                 "use_aux_hidden_state": True}
            d["target_hidden_size"] = self.hidden_size
            d["draft_vocab_size"] = self.vocab_size
        if self.drafting == "parallel":
            d["mask_token_id"] = self.mask_token_id  # where vLLM's parallel drafter looks for it
        if self.verifier is not None:
            d.update(speculators_section(self.speculators_type, self.verifier))
        return d

    @property
    def speculators_type(self) -> str:
        """The speculators type that makes vLLM pick this draft's method by itself: "peagle" is eagle3 with
        parallel drafting; no type means eagle with it, so a parallel top-state draft served by its folder
        alone also needs --speculative-config '{"parallel_drafting": true}' (the model says so)."""
        return "peagle" if self.drafting == "parallel" and self.method == "eagle3" else self.method

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], checkpoint: str = "<config>") -> BeagleConfig:
        beagle = d.get("beagle")
        if not isinstance(beagle, Mapping):
            raise CheckpointError(checkpoint, "config.json has no 'beagle' section; is this a Beagle checkpoint?")
        version = beagle.get("version")
        if version != SCHEMA_VERSION:
            raise CheckpointError(
                checkpoint, f"field 'beagle.version' is {version!r} but this vllm-beagle reads version {SCHEMA_VERSION}"
            )
        try:
            cfg = cls(
                **dims_of(d),
                intermediate_size=d["intermediate_size"],
                rms_norm_eps=d["rms_norm_eps"],
                max_position_embeddings=d["max_position_embeddings"],
                state=beagle.get("state", STATE_FINAL_NORM),
                state_layer=beagle.get("state_layer"),
                state_layers=beagle.get("state_layers"),
                kv_mode=beagle.get("kv_mode", "concat"),
                drafting=beagle.get("drafting", "chain"),
                query=beagle.get("query", QUERY_TOKEN),
                mask_token_id=beagle.get("mask_token_id"),
                draft_vocab_size=beagle.get("draft_vocab_size"),
                verifier=verifier_of(d),
                training=beagle.get("training") or {},
            )
        except KeyError as e:
            raise CheckpointError(checkpoint, f"config.json lacks the field {e.args[0]!r}") from None
        except (ValueError, TypeError, AttributeError) as e:
            # TypeError/AttributeError: a field of the wrong JSON type met before the checks in __post_init__.
            raise CheckpointError(checkpoint, f"config.json: {e}") from None
        archs = d.get("architectures")
        if archs != [cfg.architecture]:
            raise CheckpointError(
                checkpoint,
                f"field 'architectures' is {archs} but beagle.state {cfg.state!r} needs [{cfg.architecture!r}]",
            )
        return cfg

    def tensor_shapes(self) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
        """(required, optional) tensor names and shapes of model.safetensors."""
        H, inter, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        required = {
            "query_norm.weight": (H,),
            "state_norm.weight": (H,),
            "q_proj.weight": (q, H),
            "k_proj.weight": (kv, H),
            "v_proj.weight": (kv, H),
            "o_proj.weight": (H, q),
            "mlp_norm.weight": (H,),
            "mlp.gate_proj.weight": (inter, H),
            "mlp.up_proj.weight": (inter, H),
            "mlp.down_proj.weight": (H, inter),
        }
        if self.state != STATE_FINAL_NORM:
            # A pre-norm state needs the target's final norm before the LM head.
            required["final_norm.weight"] = (H,)
        if self.state == STATE_FUSED:
            required["fc.weight"] = (H, self.state_width)
        if self.query == QUERY_TOKEN_STATE:
            required["row_norm.weight"] = (H,)
            required["row_proj.weight"] = (H, H)
        if self.drafting == "parallel":
            # In the target's state space (before fc): vLLM puts it through combine_hidden_states itself.
            required[MASK_HIDDEN] = (self.state_width,)
        # Absent means "use the target's": that is how a draft stays a few MB.
        optional = {"embed_tokens.weight": (self.vocab_size, H), "lm_head.weight": (self.vocab_size, H)}
        if self.draft_vocab_size is not None:
            del optional["lm_head.weight"]
            required["lm_head.weight"] = (self.draft_vocab_size, H)
            required[DRAFT_TO_TARGET] = (self.draft_vocab_size,)
        return required, optional


def state_name(cfg: BeagleConfig) -> str:
    """The one text form of a state kind (shards and `beagle data --state` use it): final_norm,
    layer:<l> or fused:<a>,<b>,..."""
    if cfg.state == STATE_FINAL_NORM:
        return STATE_FINAL_NORM
    return f"{cfg.state}:{','.join(map(str, cfg.aux_layers))}"


def state_fields(name: str, num_target_layers: int | None = None) -> dict[str, Any]:
    """The BeagleConfig fields of a state named as state_name writes it. "fused" alone means EAGLE-3's
    default layers (2, L/2, L-3) of a target of L layers. ValueError names what is wrong."""
    kind, _, layers = name.partition(":")
    try:
        ids = [int(x) for x in layers.split(",")] if layers else []
    except ValueError:
        ids = None
    if kind == STATE_FINAL_NORM and not layers:
        return {"state": STATE_FINAL_NORM}
    if kind == STATE_LAYER and ids and len(ids) == 1:
        fields = {"state": STATE_LAYER, "state_layer": ids[0]}
    elif kind == STATE_FUSED and ids is not None:
        if not ids:
            if num_target_layers is None:
                raise ValueError("state 'fused' without layer ids needs the target's number of layers")
            ids = default_fused_layers(num_target_layers)
        fields = {"state": STATE_FUSED, "state_layers": sorted(ids)}
    else:
        raise ValueError(f"unknown state {name!r}: expected final_norm, layer:<l> or fused[:<a>,<b>,...]")
    if num_target_layers is not None and not all(0 <= i <= num_target_layers for i in ids):
        raise ValueError(f"state {name!r} names a layer outside the target's 0..{num_target_layers}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"state {name!r} names a layer twice")
    return fields


def default_fused_layers(num_layers: int) -> list[int]:
    """EAGLE-3's choice, as vLLM's default aux layers: low, middle and high."""
    return [2, num_layers // 2, num_layers - 3]


def check_positive_integer(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"field {name!r} must be a positive integer, got {value!r}")


def dims_of(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The widths, head layout, vocabulary and RoPE of a Llama-style config (a target's or a draft's): the
    BeagleConfig fields a draft copies from its target and must match."""
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim")
    if not head_dim:
        # Checked here: the width below divides by it before BeagleConfig's own checks run.
        check_positive_integer("num_attention_heads", heads)
        head_dim = hidden // heads
    return {
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": cfg.get("num_key_value_heads") or heads,
        "head_dim": head_dim,
        "vocab_size": cfg["vocab_size"],
        "rope_parameters": rope_parameters_of(cfg),
    }


def rope_parameters_of(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """RoPE settings in transformers 5 form, also from configs written with the older top-level keys."""
    params = cfg.get("rope_parameters")
    if params:
        params = dict(params)
    else:
        params = dict(cfg.get("rope_scaling") or {})
        if "type" in params and "rope_type" not in params:
            params["rope_type"] = params.pop("type")
        params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    params.setdefault("rope_type", "default")
    params["rope_theta"] = float(params["rope_theta"])
    return params


def check_against_target(cfg: BeagleConfig, target: Mapping[str, Any], checkpoint: str, target_name: str,
                         num_target_layers: int | None = None) -> None:
    """Refuse a draft whose width, head layout, vocabulary or RoPE differ from the target's."""
    for field, theirs in dims_of(target).items():
        value = getattr(cfg, field)
        if value != theirs:
            raise CheckpointError(
                checkpoint,
                f"field '{field}' is {value!r} in the draft but {theirs!r} in the target {target_name}",
            )
    layers = num_target_layers if num_target_layers is not None else target.get("num_hidden_layers")
    field = "state_layer" if cfg.state == STATE_LAYER else "state_layers"
    value = cfg.state_layer if cfg.state == STATE_LAYER else cfg.state_layers
    if layers is not None and not all(0 <= layer <= layers for layer in cfg.aux_layers):
        raise CheckpointError(
            checkpoint, f"field 'beagle.{field}' is {value} but the target {target_name} "
            f"has {layers} layers (valid: 0..{layers})"
        )
