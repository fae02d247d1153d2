"""Native checkpoints (DESIGN section 3): read and validate, write, pack latent weights.

A checkpoint directory holds config.json, model.safetensors, tokenizer.json and optionally
generation_config.json and tokenizer_config.json (chat template). A Hugging Face BitNet directory
(config.json model_type "bitnet") is read by models.hf_bitnet into the same Checkpoint. Loading checks all of it and raises one CheckpointError that lists every
problem, each naming the file it is about, so a user fixes a broken checkpoint in one pass.
Tensors are read with safetensors only; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from .config import BitSkipConfig, ConfigError
from .mapped import map_tensor, release
from .model import BitSkipForCausalLM
from .packing import has_invalid_code, pack_ternary
from .quant import ternarize

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
GENERATION_FILE = "generation_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# The 7 projections of one block, in config.projection_shapes() order.
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PACKED_DTYPES = (torch.uint8,)
SCALE_DTYPES = (torch.float32,)

TensorSpec = tuple[tuple[int, ...], tuple[torch.dtype, ...]]


class CheckpointError(Exception):
    """A checkpoint that cannot be served; `problems` lists every reason, each naming its file."""

    def __init__(self, path: str | Path, problems: list[str]):
        self.path = str(path)
        self.problems = list(problems)
        super().__init__(f"invalid checkpoint {self.path}:" + "".join(f"\n  - {p}" for p in self.problems))


@dataclass
class Checkpoint:
    """A validated checkpoint in memory: float tensors are float32, weight scales are 0-dim."""

    path: Path
    config: BitSkipConfig
    tensors: dict[str, torch.Tensor]
    tokenizer: Tokenizer | None   # None: token ids only (generation_config token_ids_only)
    generation_config: dict = field(default_factory=dict)
    tokenizer_config: dict = field(default_factory=dict)  # tokenizer_config.json, if any

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template the checkpoint ships (for /v1/chat/completions), or None."""
        return self.tokenizer_config.get("chat_template")

    @property
    def form(self) -> str:
        """"packed", "latent" or "mixed", by how the projections are stored."""
        forms = {"packed" if f"{projection_prefix(i, name)}.qweight" in self.tensors else "latent"
                 for i in range(self.config.num_hidden_layers) for name in self.config.projection_shapes()}
        return forms.pop() if len(forms) == 1 else "mixed"


def projection_prefix(layer0: int, name: str) -> str:
    """Checkpoint name prefix of projection `name` in block `layer0` (0-based)."""
    return f"model.layers.{layer0}.{name}"


def projection_specs(prefix: str, shape: tuple[int, int], form: str) -> dict[str, TensorSpec]:
    """The tensors that store one projection of stored shape [N, Kin] in `form`."""
    n, k = shape
    if form == "latent":
        return {f"{prefix}.weight": ((n, k), FLOAT_DTYPES)}
    if form == "packed":
        return {f"{prefix}.qweight": ((n, k // 4), PACKED_DTYPES),
                f"{prefix}.weight_scale": ((), SCALE_DTYPES)}
    raise ValueError(f"form must be 'packed' or 'latent', got {form!r}")


def base_specs(config: BitSkipConfig) -> dict[str, TensorSpec]:
    """The non-projection tensors: embedding, norms (with the sub-norms the config enables) and
    (untied) head."""
    v, h = config.vocab_size, config.hidden_size
    params = ("weight", "bias") if config.norm_type == "layer" else ("weight",)
    specs = {"model.embed_tokens.weight": ((v, h), FLOAT_DTYPES)}
    if config.learned_positions:
        specs["model.embed_positions.weight"] = ((config.max_position_embeddings, h), FLOAT_DTYPES)
    for i in range(config.num_hidden_layers):
        for name, size in config.norm_shapes().items():
            for param in params:
                specs[f"model.layers.{i}.{name}.{param}"] = ((size,), FLOAT_DTYPES)
    for param in params:
        specs[f"model.norm.{param}"] = ((h,), FLOAT_DTYPES)
    if not config.tie_word_embeddings:
        specs["lm_head.weight"] = ((v, h), FLOAT_DTYPES)
    return specs


def expected_tensors(config: BitSkipConfig, form: str = "packed") -> dict[str, TensorSpec]:
    """Every tensor a checkpoint of `config` holds with all projections in `form`:
    name -> (shape, allowed dtypes)."""
    specs = base_specs(config)
    for i in range(config.num_hidden_layers):
        for name, shape in config.projection_shapes().items():
            specs.update(projection_specs(projection_prefix(i, name), shape, form))
    return specs


# ---- reading the files ---------------------------------------------------------------------

def read_json(path: Path, problems: list[str]) -> dict | None:
    """The JSON object in `path`, or None after recording why it cannot be had."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"{path.name}: cannot be read ({e})")
        return None
    except json.JSONDecodeError as e:
        problems.append(f"{path.name}: not valid JSON ({e})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path.name}: top level must be a JSON object, got {type(data).__name__}")
        return None
    return data


def _read_config(directory: Path, problems: list[str]) -> BitSkipConfig | None:
    path = directory / CONFIG_FILE
    if not path.is_file():
        problems.append(f"{CONFIG_FILE}: missing")
        return None
    data = read_json(path, problems)
    if data is None:
        return None
    try:
        return BitSkipConfig.from_dict(data, CONFIG_FILE)
    except ConfigError as e:
        problems += [f"{CONFIG_FILE}: {p}" for p in e.problems]
    except (TypeError, ValueError) as e:  # a field of the wrong JSON type can fail before validation
        problems.append(f"{CONFIG_FILE}: invalid ({e})")
    return None


def _header_problem(path: Path) -> str | None:
    """Why the safetensors header cannot describe this file (truncated, garbage), or None."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"file is {size} bytes, too short for a safetensors header"
        n = int.from_bytes(head, "little")
        if n > size - 8:
            return f"header claims {n} bytes but the file holds only {size} bytes"
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"header is not valid JSON ({e})"
    if not isinstance(header, dict):
        return "header is not a JSON object"
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict)
            and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2]
    data_end = 8 + n + max(ends, default=0)
    if data_end > size:
        return f"truncated: tensor data ends at byte {data_end} but the file holds only {size} bytes"
    return None


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool}


# An untied float32 embedding this large stays in the file (models/mapped.py): a step reads a few
# of its rows. So does the untied head: greedy steps read an int8 copy and a few of its rows
# (engine/kernels/native/screened_head.py); others fault it in whole. A tied one is the head, read
# whole by every sampled step: it is loaded.
MAP_EMBEDDING_BYTES = 1 << 24


def _read_data(path: Path, dtypes: dict[str, str]) -> dict[str, torch.Tensor]:
    """Each tensor read from the file straight into its own memory, but for a large untied
    embedding and head, which are mapped. (safetensors' get_tensor copies out of a memory map, so
    a large file is resident twice until it is closed.)"""
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        tensors = {}
        for name in dtypes:
            entry = header[name]
            begin, end = entry["data_offsets"]
            if name in ("model.embed_tokens.weight", "lm_head.weight") and "lm_head.weight" in header \
                    and dtypes[name] == "F32" and end - begin >= MAP_EMBEDDING_BYTES:
                tensors[name] = map_tensor(f, 8 + n + begin, entry["shape"], torch.float32)
                continue
            t = torch.empty(entry["shape"], dtype=_DTYPES[dtypes[name]])
            f.seek(8 + n + begin)
            if end > begin and f.readinto(t.reshape(-1).view(torch.uint8).numpy()) != end - begin:
                raise ValueError(f"tensor '{name}' is truncated")
            tensors[name] = t
        return tensors


def read_safetensors(path: Path, problems: list[str]) -> dict[str, torch.Tensor] | None:
    """Every tensor of the safetensors file `path`, or None after recording why not."""
    if not path.is_file():
        problems.append(f"{path.name}: missing")
        return None
    try:
        reason = _header_problem(path)
        if reason is None:
            with safe_open(str(path), framework="pt") as f:  # safetensors checks the header
                dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
            return _read_data(path, dtypes)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        reason = f"{type(e).__name__}: {e}"
    problems.append(f"{path.name}: cannot be read ({reason})")
    return None


def read_tokenizer(directory: Path, problems: list[str]) -> Tokenizer | None:
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        problems.append(f"{TOKENIZER_FILE}: missing")
        return None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for any parse error
        problems.append(f"{TOKENIZER_FILE}: cannot be read by tokenizers ({e})")
        return None


def read_tokenizer_config(directory: Path, problems: list[str]) -> dict:
    """tokenizer_config.json (empty when absent); a chat_template.jinja file beside it is the
    chat template, as transformers writes it. A list of named templates yields the "default"."""
    path = directory / TOKENIZER_CONFIG_FILE
    data = read_json(path, problems) or {}
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        try:
            data["chat_template"] = (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            problems.append(f"{CHAT_TEMPLATE_FILE}: cannot be read ({e})")
    template = data.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = data["chat_template"] = named.get("default")
    if template is not None and not isinstance(template, str):
        problems.append(f"{TOKENIZER_CONFIG_FILE}: chat_template must be a string, got {type(template).__name__}")
    return data


# ---- validation ----------------------------------------------------------------------------

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _content_problems(name: str, t: torch.Tensor) -> list[str]:
    """Value checks that need no config: finite floats, valid 2-bit codes, positive scales."""
    where = f"{WEIGHTS_FILE}: tensor '{name}'"
    if name.endswith(".qweight") and t.dtype == torch.uint8:
        return [f"{where} contains the 2-bit code 3, which encodes no ternary value"] \
            if has_invalid_code(t.reshape(1, -1)) else []
    if not t.is_floating_point():
        return []
    if name.endswith(".weight_scale"):
        bad = [v for v in t.reshape(-1).tolist() if not (math.isfinite(v) and v > 0)]
        return [f"{where} must be finite and > 0, got {bad[0]}"] if bad else []
    nan = inf = 0
    for c in t.reshape(-1).split(1 << 22):  # a 1B model's embedding checked without 0.2 GB of masks
        nan, inf = nan + int(torch.isnan(c).sum()), inf + int(torch.isinf(c).sum())
        release(c)  # a mapped tensor's pages go back once checked
    return [f"{where} contains {nan} NaN and {inf} Inf values"] if nan or inf else []


def _projection_form(tensors: dict, prefix: str, default: str, problems: list[str]) -> list[str]:
    """The form(s) projection `prefix` is stored in; records a tensor stored both ways."""
    latent = f"{prefix}.weight" in tensors
    packed = f"{prefix}.qweight" in tensors or f"{prefix}.weight_scale" in tensors
    if latent and packed:
        problems.append(f"{WEIGHTS_FILE}: projection '{prefix}' is stored both latent (.weight) "
                        f"and packed (.qweight/.weight_scale); keep exactly one form")
        return ["latent", "packed"]
    return ["latent"] if latent else ["packed"] if packed else [default]


def _config_hints(config: BitSkipConfig, tensors: dict) -> list[str]:
    """Lines that blame config.json when its sizes contradict the tensors."""
    hints = []
    embed = tensors.get("model.embed_tokens.weight")
    if embed is not None and embed.dim() == 2:
        if embed.shape[0] != config.vocab_size:
            hints.append(f"{CONFIG_FILE} vocab_size={config.vocab_size} but "
                         f"model.embed_tokens.weight has {embed.shape[0]} rows")
        if embed.shape[1] != config.hidden_size:
            hints.append(f"{CONFIG_FILE} hidden_size={config.hidden_size} but "
                         f"model.embed_tokens.weight has {embed.shape[1]} columns")
    layers = {int(n.split(".")[2]) for n in tensors
              if n.startswith("model.layers.") and n.split(".")[2].isdigit()}
    if layers and max(layers) + 1 != config.num_hidden_layers:
        hints.append(f"{CONFIG_FILE} num_hidden_layers={config.num_hidden_layers} but "
                     f"{WEIGHTS_FILE} holds tensors for {max(layers) + 1} layers")
    if config.tie_word_embeddings and "lm_head.weight" in tensors:
        hints.append(f"{CONFIG_FILE} tie_word_embeddings=true but {WEIGHTS_FILE} holds lm_head.weight")
    return hints


def _tensor_problems(config: BitSkipConfig, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Missing, unexpected, mis-shaped and mis-typed tensors against `config`."""
    problems: list[str] = []
    default = "packed" if any(n.endswith(".qweight") for n in tensors) else "latent"
    specs = base_specs(config)
    for i in range(config.num_hidden_layers):
        for name, shape in config.projection_shapes().items():
            prefix = projection_prefix(i, name)
            for form in _projection_form(tensors, prefix, default, problems):
                specs.update(projection_specs(prefix, shape, form))
    for name, (shape, dtypes) in specs.items():
        if name not in tensors:
            problems.append(f"{WEIGHTS_FILE}: missing tensor '{name}'")
            continue
        t = tensors[name]
        got = tuple(t.shape)
        if got != shape and not (shape == () and got == (1,)):
            problems.append(f"{WEIGHTS_FILE}: tensor '{name}' has shape {list(got)}, expected {list(shape)}")
        if t.dtype not in dtypes:
            allowed = " or ".join(_dtype_name(d) for d in dtypes)
            problems.append(f"{WEIGHTS_FILE}: tensor '{name}' has dtype {_dtype_name(t.dtype)}, "
                            f"expected {allowed}")
    problems += [f"{WEIGHTS_FILE}: unexpected tensor '{n}'" for n in tensors if n not in specs]
    return problems


def generation_problems(gen: dict, vocab_size: int | None) -> list[str]:
    """bos/eos ids must be token ids of the model (any non-negative int without a config)."""
    problems = []
    top = "" if vocab_size is None else f" in 0..{vocab_size - 1}"
    for key in ("bos_token_id", "eos_token_id"):
        value = gen.get(key)
        if value is None:
            continue
        ids = value if key == "eos_token_id" and isinstance(value, list) else [value]
        bad = [v for v in ids if not isinstance(v, int) or isinstance(v, bool) or v < 0
               or (vocab_size is not None and v >= vocab_size)]
        if bad or not ids:
            kind = "an int or a non-empty list of ints" if key == "eos_token_id" else "an int"
            problems.append(f"{GENERATION_FILE}: {key} must be {kind}{top}, got {value!r}")
    return problems


# ---- public API ----------------------------------------------------------------------------

def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and fully validate the checkpoint directory `path`.

    Raises one CheckpointError listing every problem found; on success float tensors are
    float32 and every weight_scale has shape [].
    """
    directory = Path(path)
    if not directory.exists():
        raise CheckpointError(directory, [f"{directory}: directory does not exist"])
    if not directory.is_dir():
        raise CheckpointError(directory, [f"{directory}: is not a directory"])
    from .hf_bitnet import is_bitnet_config, load_bitnet_checkpoint  # it builds on this module
    problems: list[str] = []
    if (directory / CONFIG_FILE).is_file() and is_bitnet_config(read_json(directory / CONFIG_FILE, [])):
        return load_bitnet_checkpoint(directory)
    config = _read_config(directory, problems)
    tensors = read_safetensors(directory / WEIGHTS_FILE, problems)
    tokenizer_config = read_tokenizer_config(directory, problems)
    generation = {}
    if (directory / GENERATION_FILE).exists():
        generation = read_json(directory / GENERATION_FILE, problems) or {}
        problems += generation_problems(generation, config.vocab_size if config else None)
    # Imported checkpoints may come without a tokenizer: then they serve token ids only.
    tokenizer = None
    if not (generation.get("token_ids_only") is True and not (directory / TOKENIZER_FILE).exists()):
        tokenizer = read_tokenizer(directory, problems)
    if tensors is not None:
        if config is not None:
            problems += _config_hints(config, tensors) + _tensor_problems(config, tensors)
        for name, t in tensors.items():
            problems += _content_problems(name, t)
    if config is not None and tokenizer is not None and tokenizer.get_vocab_size() > config.vocab_size:
        problems.append(f"{TOKENIZER_FILE} has {tokenizer.get_vocab_size()} tokens but "
                        f"{CONFIG_FILE} vocab_size={config.vocab_size}")
    if problems:
        raise CheckpointError(directory, problems)
    tensors = {n: _normalise(n, t) for n, t in tensors.items()}
    return Checkpoint(directory, config, tensors, tokenizer, generation, tokenizer_config)


def _normalise(name: str, t: torch.Tensor) -> torch.Tensor:
    if name.endswith(".weight_scale"):
        return t.reshape(())
    return t.float() if t.is_floating_point() else t


def save_checkpoint(path: str | Path, config: BitSkipConfig, tensors: dict[str, torch.Tensor],
                    tokenizer: Tokenizer | None, generation_config: dict | None = None,
                    tokenizer_config: dict | None = None) -> Path:
    """Write a checkpoint directory (created if needed) that `load_checkpoint` reads back.

    A tied lm_head is not written; generation_config.json and tokenizer_config.json are written
    only when given.
    """
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    config.save(directory / CONFIG_FILE)
    # safetensors refuses shared or strided storage, so every tensor gets its own contiguous copy.
    out = {n: t.detach().contiguous().clone() for n, t in tensors.items()
           if not (config.tie_word_embeddings and n == "lm_head.weight")}
    # A new file renamed over the old one: a server mapping the old file keeps reading it intact.
    tmp = directory / f".{WEIGHTS_FILE}.{os.getpid()}.tmp"
    save_file(out, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / WEIGHTS_FILE)
    if tokenizer is not None:
        tokenizer.save(str(directory / TOKENIZER_FILE))
    if generation_config is not None:
        (directory / GENERATION_FILE).write_text(json.dumps(generation_config, indent=2) + "\n")
    if tokenizer_config:
        (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return directory


def latent_state(model: BitSkipForCausalLM) -> dict[str, torch.Tensor]:
    """The model's persistent weights as detached float32 copies, checkpoint-named
    (lm_head.weight left out when it is tied to the embedding)."""
    state = {n: t.detach().to(torch.float32, copy=True) for n, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def pack_state(tensors: dict[str, torch.Tensor], config: BitSkipConfig) -> dict[str, torch.Tensor]:
    """Every latent projection replaced by its qweight (2-bit codes) and float32 0-dim
    weight_scale; all other tensors, and projections already packed, are passed through."""
    out = dict(tensors)
    for i in range(config.num_hidden_layers):
        for name in PROJECTIONS:
            prefix = projection_prefix(i, name)
            weight = out.pop(f"{prefix}.weight", None)
            if weight is None:
                continue
            codes, gamma = ternarize(weight.detach())
            out[f"{prefix}.qweight"] = pack_ternary(codes)
            out[f"{prefix}.weight_scale"] = gamma.detach().to(torch.float32).reshape(())
    return out


def load_reference_model(ckpt: Checkpoint | str | Path) -> BitSkipForCausalLM:
    """The trainable reference module holding a latent checkpoint's weights."""
    if not isinstance(ckpt, Checkpoint):
        ckpt = load_checkpoint(ckpt)
    packed = sorted(n for n in ckpt.tensors if n.endswith(".qweight"))
    if packed:
        raise CheckpointError(ckpt.path, [
            f"{WEIGHTS_FILE}: packed projections cannot be loaded into the trainable reference "
            f"module ({len(packed)} packed, e.g. '{packed[0]}')"])
    model = BitSkipForCausalLM(ckpt.config)
    missing, unexpected = model.load_state_dict(ckpt.tensors, strict=False)
    # A tied head shares the embedding's parameter, so its absence from the file is expected.
    missing = [n for n in missing if not (ckpt.config.tie_word_embeddings and n == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(ckpt.path, [f"{WEIGHTS_FILE}: missing tensor '{n}'" for n in missing]
                              + [f"{WEIGHTS_FILE}: unexpected tensor '{n}'" for n in unexpected])
    return model


def pack_checkpoint(src: str | Path, dst: str | Path) -> Checkpoint:
    """Validate `src` (native, or a Hugging Face BitNet directory), pack its projections, write
    the native format to `dst` with the same tokenizer, generation config and tokenizer config,
    and return the validated packed checkpoint read back from `dst`."""
    ckpt = load_checkpoint(src)
    save_checkpoint(dst, ckpt.config, pack_state(ckpt.tensors, ckpt.config), ckpt.tokenizer,
                    ckpt.generation_config or None, ckpt.tokenizer_config or None)
    return load_checkpoint(dst)
