"""The BitSkip training recipe (DESIGN section 2) on the reference modules.

- Ternary weights and quantized activations, trained through the straight-through estimator.
- Quadratic layer dropout: block l is the identity for a sample with p_l = p_max * (l / L)^2.
- Two phases: standard next-token training, then the same plus the early-exit loss
  L = L_main + lambda * sum_l w_l * CE(exit l), one shared head, next-token targets, with
  w_l = l / sum(S) over the exits S used in that step (growing with depth, summing to 1). S is
  the config's exit points plus `extra_exits` other layers drawn at random each step, so every
  layer is trained as an exit over the run while a step pays for a few heads only.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import latent_state, load_checkpoint, load_reference_model, pack_checkpoint, save_checkpoint
from .config import BitSkipConfig
from .model import BitSkipForCausalLM

STATE_FILE = "trainer_state.pt"


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    p_max: float = 0.5                  # layer dropout; 0 turns it off
    early_exit_lambda: float = 0.3      # 0 turns the early-exit loss off
    early_exit_start: float = 0.5       # fraction of steps in phase 1 (no early-exit loss)
    extra_exits: int = 2                # random extra exit layers per phase-2 step
    eval_every: int = 100
    eval_batches: int = 4
    checkpoint_every: int = 200
    seed: int = 0
    device: str = "cpu"


def layer_dropout_probs(num_layers: int, p_max: float) -> torch.Tensor:
    """p_l = p_max * (l / L)^2 for l = 1..L."""
    layers = torch.arange(1, num_layers + 1, dtype=torch.float32)
    return p_max * (layers / num_layers) ** 2


def sample_layer_keep(batch_size: int, num_layers: int, p_max: float,
                      generator: torch.Generator) -> torch.Tensor:
    """[B, L] bool: False where block l is skipped for that sample (probability p_l)."""
    return torch.rand(batch_size, num_layers, generator=generator) >= layer_dropout_probs(num_layers, p_max)


def early_exit_weights(exits: list[int]) -> dict[int, float]:
    """w_l = l / sum(exits): growing with depth, summing to 1."""
    total = sum(exits)
    return {l: l / total for l in exits}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class TokenStream:
    """Random windows [BOS] + ids[i : i + seq_len] of a token stream, drawn from a seeded generator."""

    def __init__(self, ids: torch.Tensor, seq_len: int, bos_id: int, seed: int):
        self.ids, self.seq_len, self.bos_id = ids, seq_len, bos_id
        self.generator = torch.Generator().manual_seed(seed)

    def batch(self, batch_size: int) -> torch.Tensor:
        starts = torch.randint(0, len(self.ids) - self.seq_len, (batch_size,), generator=self.generator)
        rows = torch.stack([self.ids[s:s + self.seq_len] for s in starts.tolist()])
        return torch.cat([torch.full((batch_size, 1), self.bos_id), rows], dim=1)


def loss_terms(model: BitSkipForCausalLM, batch: torch.Tensor, exits: list[int],
               keep: torch.Tensor | None) -> dict[int, torch.Tensor]:
    """Next-token cross-entropy at each exit layer in `exits` (one forward, shared head)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    states = model.hidden_states(inputs, max(exits), keep)
    return {l: F.cross_entropy(model.exit_logits(states[l]).flatten(0, 1), targets.flatten())
            for l in exits}


def training_loss(model: BitSkipForCausalLM, batch: torch.Tensor, cfg: TrainConfig, step: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, dict[int, float]]:
    c = model.config
    L = c.num_hidden_layers
    keep = None
    if cfg.p_max > 0:
        keep = sample_layer_keep(batch.shape[0], L, cfg.p_max, generator).to(batch.device)
    exits = [L]
    phase2 = cfg.early_exit_lambda > 0 and step >= cfg.early_exit_start * cfg.steps
    if phase2:
        others = [l for l in range(1, L) if l not in c.exit_points]
        pick = torch.randperm(len(others), generator=generator)[:cfg.extra_exits].tolist()
        exits = sorted(set(c.exit_points) | {others[i] for i in pick}) + [L]
    terms = loss_terms(model, batch, exits, keep)
    loss = terms[L]
    if phase2:
        weights = early_exit_weights(exits[:-1])
        loss = loss + cfg.early_exit_lambda * sum(weights[l] * terms[l] for l in exits[:-1])
    return loss, {l: float(v.detach()) for l, v in terms.items()}


@torch.no_grad()
def evaluate(model: BitSkipForCausalLM, stream: TokenStream, cfg: TrainConfig) -> dict[int, float]:
    """Mean cross-entropy at every exit layer over fixed held-out batches (no dropout)."""
    model.eval()
    L = model.config.num_hidden_layers
    gen_state = stream.generator.get_state()
    stream.generator.manual_seed(cfg.seed + 1)
    totals = {l: 0.0 for l in range(1, L + 1)}
    for _ in range(cfg.eval_batches):
        batch = stream.batch(cfg.batch_size).to(cfg.device)
        for l, v in loss_terms(model, batch, list(range(1, L + 1)), None).items():
            totals[l] += float(v) / cfg.eval_batches
    stream.generator.set_state(gen_state)
    model.train()
    return totals


def train(model_config: BitSkipConfig, cfg: TrainConfig, train_ids: torch.Tensor, heldout_ids: torch.Tensor,
          tokenizer, generation_config: dict, out_dir: Path, resume: bool = False, log=print) -> Path:
    """Train, writing `out_dir/latest` (latent checkpoint + trainer state) every
    `checkpoint_every` steps, then `out_dir/latent` and `out_dir/packed`. Returns the packed path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    latest = out_dir / "latest"
    torch.manual_seed(cfg.seed)
    model = BitSkipForCausalLM(model_config)
    step = 0
    opt_state = None
    if resume and (latest / STATE_FILE).exists():
        model = load_reference_model(load_checkpoint(latest))
        state = torch.load(latest / STATE_FILE, weights_only=True)
        step, opt_state = state["step"], state["optimizer"]
        log(f"resumed from {latest} at step {step}")
    model.to(cfg.device).train()
    model.set_exact_attention(False)
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    bos = generation_config["bos_token_id"]
    data = TokenStream(train_ids, cfg.seq_len, bos, cfg.seed)
    heldout = TokenStream(heldout_ids, cfg.seq_len, bos, cfg.seed)
    noise = torch.Generator().manual_seed(cfg.seed + 2)
    if resume and step:
        state = torch.load(latest / STATE_FILE, weights_only=True)
        data.generator.set_state(state["data_rng"])
        noise.set_state(state["noise_rng"])
    log_file = (out_dir / "train_log.jsonl").open("a")
    t_start, tokens = time.perf_counter(), 0

    def save_latest():
        save_checkpoint(latest, model_config, latent_state(model), tokenizer, generation_config)
        torch.save({"step": step, "optimizer": opt.state_dict(), "data_rng": data.generator.get_state(),
                    "noise_rng": noise.get_state(), "train_config": asdict(cfg)}, latest / STATE_FILE)

    while step < cfg.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = data.batch(cfg.batch_size).to(cfg.device)
        loss, terms = training_loss(model, batch, cfg, step, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        tokens += batch.numel() - batch.shape[0]
        record = {"step": step, "loss": float(loss.detach()), "lr": lr_at(step - 1, cfg),
                  "train_ce": {str(k): v for k, v in terms.items()},
                  "tokens_per_s": tokens / (time.perf_counter() - t_start)}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            record["heldout_ce"] = {str(k): v for k, v in evaluate(model, heldout, cfg).items()}
            ce = record["heldout_ce"]
            L = model_config.num_hidden_layers
            shown = sorted(set(model_config.exit_points) | {L})
            log(f"step {step}/{cfg.steps} loss {record['loss']:.3f} lr {record['lr']:.2e} "
                f"{record['tokens_per_s']:.0f} tok/s | held-out ppl " +
                " ".join(f"@{k}={math.exp(ce[str(k)]):.1f}" for k in shown))
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_latest()
    log_file.close()
    model.set_exact_attention(True)
    save_checkpoint(out_dir / "latent", model_config, latent_state(model.cpu()), tokenizer, generation_config)
    pack_checkpoint(out_dir / "latent", out_dir / "packed")
    log(f"wrote {out_dir / 'latent'} and {out_dir / 'packed'}")
    return out_dir / "packed"
