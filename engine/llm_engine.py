"""The engine: add requests, call `step()` until they finish. Each step the scheduler picks rows,
the runner computes them (each row to its own exit layer), the sampler picks tokens."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from models.checkpoint import Checkpoint
from models.ref_import import NO_TOKENIZER_NOTE, NON_CAUSAL_WARNING

from .backends import make_backend
from .detokenizer import Detokenizer
from .device_sampler import sample_batch
from .exit_policy import ConfidenceRule
from .kv_cache import KVCache, SequenceKV
from .logprobs import logprobs_of, record_prompt_logprobs
from .model_runner import ModelRunner, Row, RowResult
from .perplexity import PerplexityResult, Scoring
from .sampler import adjust_logits, reads_only_argmax, sample
from .scheduler import Scheduler
from .sequence import SamplingParams, Sequence
from .speculative import MAX_DRAFT_TOKENS, Speculation, SpeculativeRule
from .weights import ModelWeights

log = logging.getLogger("bitskip.engine")


@dataclass(frozen=True)
class EngineConfig:
    device: str = "cpu"                 # "auto" (CUDA when a GPU and Triton are there), "cpu", "cuda"
    backend: str = "auto"               # kernels: "auto", "torch" (CPU), "triton" (engine/backends)
    enforce_eager: bool = False         # GPU: no CUDA graphs for decode steps (vLLM's name)
    max_num_seqs: int = 32              # rows running at once
    max_num_batched_tokens: int = 512   # tokens one step may compute (decodes plus prefill chunks)
    block_size: int = 16
    num_kv_blocks: int | None = None    # default: max_num_seqs full-context sequences at full depth
    num_threads: int | None = None      # torch CPU threads (default: torch's choice)


@dataclass
class StepOutput:
    """What one step did for one sequence: the token it added and the text now final."""

    seq: Sequence
    token_id: int | None
    text_delta: str
    finished: bool
    error: str | None = None
    exit_layer: int | None = None  # the depth the token's logits came from
    speculated: tuple[int, int] | None = None  # (drafted, accepted) of the verify that emitted this token first


class LLMEngine:
    def __init__(self, ckpt: Checkpoint, config: EngineConfig = EngineConfig()):
        self.backend = make_backend(config.device, config.backend)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.config = config
        self.model_config = mc = ckpt.config
        self.tokenizer = ckpt.tokenizer
        gen = ckpt.generation_config
        self.bos_id: int | None = gen.get("bos_token_id")
        eos = gen.get("eos_token_id")
        self.eos_ids: set[int] = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.generation_config = gen
        self.weights = ModelWeights.from_checkpoint(ckpt, self.backend)
        # Said with every response of the server, and here once at startup.
        self.warnings: list[str] = [] if mc.causal else [NON_CAUSAL_WARNING]
        if self.tokenizer is None:
            self.warnings.append(NO_TOKENIZER_NOTE)
        for warning in self.warnings:
            log.warning("%s", warning)
        blocks_per_seq = -(-mc.max_position_embeddings // config.block_size) * mc.num_hidden_layers
        # A model without a causal mask recomputes every sequence each step: it has no KV cache.
        self.kv_cache = KVCache(config.num_kv_blocks or config.max_num_seqs * blocks_per_seq,
                                config.block_size, mc.num_key_value_heads, mc.head_dim,
                                device=self.backend.device) if mc.causal else None
        self.runner = ModelRunner(self.weights, self.kv_cache, max_decode_rows=config.max_num_seqs,
                                  cuda_graphs=not config.enforce_eager)
        self.scheduler = Scheduler(self.kv_cache, config.max_num_seqs, config.max_num_batched_tokens)
        self._detokenizers: dict[Sequence, Detokenizer] = {}
        self.last_batch: list[Sequence] = []  # the sequences of the latest step

    # ---- requests --------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Tokenizer ids of `text`, with the BOS id prepended when the checkpoint defines one
        (and `add_bos`)."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (it was imported without --tokenizer): "
                             "send token_ids instead of text")
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if self.bos_id is not None and add_bos else []) + ids

    def special_tokens(self) -> dict[str, str]:
        """bos_token and eos_token as text (what chat templates call them)."""
        if self.tokenizer is None:
            return {}
        out = {"bos_token": self.tokenizer.id_to_token(self.bos_id)} if self.bos_id is not None else {}
        if self.eos_ids:
            out["eos_token"] = self.tokenizer.id_to_token(min(self.eos_ids))
        return out

    def confidence_rule(self, threshold: float, min_exit_layer: int | None = None,
                        measure: str = "probability",
                        exit_points: list[int] | None = None) -> ConfidenceRule:
        """The confidence policy over `exit_points` (default: the model's); ValueError names a
        bad field. A model that declares no exit points (it was not trained for early exit, like
        a plain BitNet) gets the policy only when asked explicitly: with `exit_points`, or with
        `min_exit_layer`, which then makes every layer from it up an exit point."""
        L = self.model_config.num_hidden_layers
        if min_exit_layer is not None and (type(min_exit_layer) is not int or not 1 <= min_exit_layer <= L):
            raise ValueError(f"min_exit_layer must be in 1..{L}, got {min_exit_layer!r}")
        if exit_points is not None:
            if any(type(p) is not int or not 1 <= p < L for p in exit_points):
                raise ValueError(f"exit_points must be layers in 1..{L - 1}, got {list(exit_points)}")
            points = tuple(sorted(set(exit_points)))
        elif self.model_config.exit_points:
            points = self.model_config.exit_points
        elif min_exit_layer is not None:
            points = tuple(range(min_exit_layer, L))
        else:
            raise ValueError("exit_points: this model declares no exit points (it was not trained for "
                             "early exit), so the confidence policy needs exit_points (layers in "
                             f"1..{L - 1}) or min_exit_layer given explicitly")
        return ConfidenceRule(threshold, points, min_exit_layer or 1, measure)

    def speculative_rule(self, draft_exit_layer: int | None = None, num_draft_tokens: int | None = None,
                         draft_confidence: float | None = None) -> SpeculativeRule:
        """The speculative policy; unset fields come from generation_config.json, else E is the
        shallowest exit point, k is 4 and drafting never stops early. ValueError names a bad field."""
        L, gen = self.model_config.num_hidden_layers, self.generation_config
        if not self.model_config.causal:
            raise ValueError("policy 'speculative' needs a causal model (this one recomputes every "
                             "position per token); use the fixed policy")
        if draft_exit_layer is None:
            shallow = [p for p in self.model_config.exit_points if p < L]
            draft_exit_layer = gen.get("draft_exit_layer", shallow[0] if shallow else max(1, L // 4))
        if num_draft_tokens is None:  # the checkpoint's default, within what this engine's budget allows
            num_draft_tokens = min(gen.get("num_draft_tokens", 4), self.speculative_draft_limit)
        if draft_confidence is None:
            draft_confidence = gen.get("draft_confidence", 0.0)
        if type(draft_exit_layer) is not int or not 1 <= draft_exit_layer < L:
            raise ValueError(f"draft_exit_layer must be in 1..{L - 1}, got {draft_exit_layer!r}")
        limit = self.speculative_draft_limit
        if type(num_draft_tokens) is int and num_draft_tokens > limit:
            raise ValueError(f"num_draft_tokens must be in 1..{limit} (a round computes "
                             f"k + 1 tokens in one step, within its budget), got {num_draft_tokens}")
        return SpeculativeRule(draft_exit_layer, num_draft_tokens, draft_confidence)

    @property
    def speculative_draft_limit(self) -> int:
        """The most drafts a round may take: its step computes them and one more."""
        return min(MAX_DRAFT_TOKENS, self.config.max_num_batched_tokens - 1)

    def validate_request(self, prompt_ids: list[int], params: SamplingParams = SamplingParams(),
                         exit_layer: int | None = None, confidence: ConfidenceRule | None = None,
                         speculative: SpeculativeRule | None = None) -> Sequence:
        """A new Sequence for this request (a fixed `exit_layer`, default L, a `confidence` rule
        or a `speculative` rule); raises ValueError naming the field when it cannot be served.
        Touches no engine state, so any thread may call it."""
        mc = self.model_config
        if (confidence is not None or speculative is not None) and exit_layer is not None:
            raise ValueError("exit_layer applies to the fixed policy only; the confidence policy "
                             "takes threshold and min_exit_layer, the speculative policy "
                             "draft_exit_layer and num_draft_tokens")
        if confidence is not None and speculative is not None:
            raise ValueError("a request takes one policy: confidence or speculative")
        exit_layer = mc.num_hidden_layers if exit_layer is None else exit_layer
        if type(exit_layer) is not int or not 1 <= exit_layer <= mc.num_hidden_layers:
            raise ValueError(f"exit_layer must be in 1..{mc.num_hidden_layers}, got {exit_layer!r}")
        if not prompt_ids:
            raise ValueError("the prompt must contain at least one token")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none")
        bad = [t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < mc.vocab_size]
        if bad:
            raise ValueError(f"token ids must be in 0..{mc.vocab_size - 1}, got {bad[:5]}")
        bad = [t for t in (*params.stop_token_ids, *(t for t, _ in params.logit_bias))
               if not 0 <= t < mc.vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids and logit_bias token ids must be in 0..{mc.vocab_size - 1}, "
                             f"got {bad[:5]}")
        if len(prompt_ids) >= mc.max_position_embeddings:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the context holds "
                             f"{mc.max_position_embeddings} including at least one generated token")
        if self.kv_cache is not None:  # a model without a causal mask keeps no KV
            need = self.kv_cache.blocks_needed(SequenceKV(), exit_layer, min(
                len(prompt_ids) + params.max_tokens, mc.max_position_embeddings))
            if need > self.kv_cache.num_blocks:
                raise ValueError(f"request needs {need} KV blocks; the cache has {self.kv_cache.num_blocks}")
        return Sequence(list(prompt_ids), params, exit_layer, confidence,
                        Speculation(speculative, mc.max_position_embeddings) if speculative else None)

    def validate_scoring(self, ids: list[int], exit_layers: list[int]) -> Sequence:
        """A perplexity request as a Sequence: its windows run as prompt chunks at the deepest
        requested exit, scheduled like prefill. ValueError names a bad field."""
        mc = self.model_config
        bad = [k for k in exit_layers if type(k) is not int or not 1 <= k <= mc.num_hidden_layers]
        if bad or not exit_layers:
            raise ValueError(f"exit_layers must be in 1..{mc.num_hidden_layers}, got {bad[:5] or exit_layers}")
        bad = [t for t in ids if type(t) is not int or not 0 <= t < mc.vocab_size]
        if bad:
            raise ValueError(f"token ids must be in 0..{mc.vocab_size - 1}, got {bad[:5]}")
        scoring = Scoring(list(ids), exit_layers, mc.max_position_embeddings)
        window = scoring.window_ids()
        if self.kv_cache is not None and (  # a model without a causal mask keeps no KV
                self.kv_cache.blocks_needed(SequenceKV(), scoring.depth, len(window)) > self.kv_cache.num_blocks):
            raise ValueError(f"a {len(window)}-token window needs more KV blocks than the cache has")
        return Sequence(window, SamplingParams(max_tokens=1), scoring.depth, scoring=scoring)

    def add_sequence(self, seq: Sequence) -> None:
        """Queue a validated sequence; it joins the running batch at the next step."""
        if seq.scoring is None:
            self._detokenizers[seq] = Detokenizer(self.tokenizer, seq.params.stop)
        self.scheduler.add(seq)

    def add_request(self, prompt_ids: list[int], params: SamplingParams = SamplingParams(),
                    exit_layer: int | None = None, request_id: str | None = None,
                    confidence: ConfidenceRule | None = None,
                    speculative: SpeculativeRule | None = None) -> Sequence:
        """Validate and queue a request; raises ValueError naming the field when it cannot be served."""
        seq = self.validate_request(prompt_ids, params, exit_layer, confidence, speculative)
        if request_id is not None:
            seq.request_id = request_id
        self.add_sequence(seq)
        return seq

    def abort(self, seq: Sequence, reason: str = "abort") -> None:
        """Stop a request now and free its KV blocks."""
        if not seq.finished:
            seq.finish_reason = reason
            self._finish(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        batch = self.scheduler.schedule()
        self.last_batch = [seq for seq, _ in batch]
        if not batch:
            return []
        now = time.perf_counter()
        for seq, _ in batch:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
        # The speculative rounds' drafts first; their verifies join the step's main call.
        outputs = self._draft([seq for seq, _ in batch if seq.speculation and seq.speculation.length])
        rows = [None if seq.finished else self._row(seq, n) for seq, n in batch]
        computed = [r for r in rows if r is not None]
        results = iter(self.runner.forward(computed) if computed else [])
        drawn = []  # (sequence, its row's result: the logits of its next token, or the token)
        for (seq, n), row in zip(batch, rows):
            if seq.finished:  # failed while drafting
                continue
            if seq.speculation is not None and seq.speculation.length:
                outputs += self._verified(seq, None if row is None else next(results))
                continue
            seq.num_computed += n
            if row is None:
                continue
            res = next(results)
            if seq.confidence is not None and self.model_config.causal:
                seq.pending = res.pending
            if seq.wants_prompt_logprobs:
                record_prompt_logprobs(seq.prompt_logprobs, seq.prompt_ids, row.start,
                                       res.logits[res.exit_layer], seq.params.prompt_logprobs, res.exit_layer)
            if seq.scoring is not None:  # a perplexity request: every chunk is scored
                try:
                    if (out := self._score_chunk(seq, res.logits)) is not None:
                        outputs.append(out)
                except Exception as e:
                    outputs.append(self._failed(seq, e))
            elif seq.num_computed == seq.num_tokens:
                drawn.append((seq, res))
        for (seq, res), token in zip(drawn, self._sample(drawn)):
            try:
                if isinstance(token, Exception):
                    raise token
                logits = res.logits[res.exit_layer][-1] if res.token is None else None
                outputs.append(self._append_token(seq, token, logits, res.exit_layer))
            except Exception as e:
                outputs.append(self._failed(seq, e))
        return outputs

    def _score_chunk(self, seq: Sequence, logits: dict[int, torch.Tensor]) -> StepOutput | None:
        """Add a scoring row's predictions (the latest chunk; without a causal mask, the whole
        window); at the end of a window start the next one (its KV freed, recomputed from its
        tokens), after the last one finish the request."""
        scoring = seq.scoring
        scoring.add(seq.num_computed - logits[scoring.depth].shape[0], logits)
        if seq.num_computed < seq.num_tokens:
            return None
        if scoring.next_window():
            if self.kv_cache is not None:
                self.kv_cache.release(seq.kv)
            seq.prompt_ids, seq.num_computed = scoring.window_ids(), 0
            return None
        seq.finish_reason = "stop"
        self._finish(seq)
        return StepOutput(seq, None, "", True)

    def _stop_ids(self, seq: Sequence) -> frozenset[int]:
        if seq.stop_ids is None:  # once a request: its params never change
            p = seq.params
            seq.stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_ids)
        return seq.stop_ids

    def _sample(self, drawn: list[tuple[Sequence, RowResult]]) -> list[int | Exception]:
        """Each row's token from its adjusted logits (penalties, bias, min_tokens): on the device
        for the whole batch when the backend computes there (engine/device_sampler.py), else row
        by row from each request's generator. Greedy rows whose head drew the token keep it."""
        rows: list[torch.Tensor | int | Exception] = []
        for seq, res in drawn:
            try:
                rows.append(res.token if res.token is not None else adjust_logits(
                    res.logits[res.exit_layer][-1], seq.params, seq.prompt_ids, seq.output_ids, self._stop_ids(seq)))
            except Exception as e:
                rows.append(e)
        ok = [i for i, r in enumerate(rows) if isinstance(r, torch.Tensor)]
        if self.backend.sample_on_device and ok:
            seqs = [drawn[i][0] for i in ok]
            try:
                tokens = sample_batch(torch.stack([rows[i].double() for i in ok]), [s.params for s in seqs],
                                      [s.generator.initial_seed() for s in seqs], [len(s.output_ids) for s in seqs])
            except Exception as e:
                tokens = [e] * len(ok)
            for i, token in zip(ok, tokens):
                rows[i] = token
            return rows
        out: list[int | Exception] = []
        for (seq, _), row in zip(drawn, rows):
            try:
                out.append(sample(row, seq.params, seq.generator) if isinstance(row, torch.Tensor) else row)
            except Exception as e:
                out.append(e)
        return out

    def _row(self, seq: Sequence, n: int) -> Row | None:
        """The runner's view of the sequence's next `n` tokens. Logits are wanted only when they
        complete the sequence, or for every token when prompt logprobs are wanted; prompt chunks
        before that run to the shallowest depth a token could leave at (their deeper KV is filled
        later if a token goes deeper). Prompt logprobs of a confidence request come from full
        depth, and so does its first token (the chunk that scores the prompt's end produces it).
        A perplexity request's row wants logits at every position of every requested exit.

        A model without a causal mask has no KV cache to fill (a later token changes every
        earlier position): once the tokens are complete, the whole sequence is recomputed."""
        completes = seq.num_computed + n == seq.num_tokens
        depth = seq.exit_layer
        if seq.scoring is not None:
            heads = seq.scoring.heads
            if not self.model_config.causal:
                return Row(seq.all_ids, 0, depth, None, heads) if completes else None
            return Row(seq.ids(seq.num_computed, seq.num_computed + n), seq.num_computed, depth, seq.kv, heads)
        scoring = seq.wants_prompt_logprobs
        if not self.model_config.causal:
            if not completes:
                return None
            return Row(seq.all_ids, 0, depth, None, {depth: "all" if scoring else "last"},
                       None if scoring else seq.confidence)
        if seq.speculation is not None and seq.speculation.length:
            return seq.speculation.next_row(seq, self._stop_ids(seq))  # the round's verify
        tokens = seq.ids(seq.num_computed, seq.num_computed + n)
        if scoring:
            return Row(tokens, seq.num_computed, depth, seq.kv, {depth: "all"})
        if seq.confidence is not None and not completes:
            depth = seq.confidence.first_exit(self.model_config.num_hidden_layers)
        return Row(tokens, seq.num_computed, depth, seq.kv, {depth: "last"} if completes else {},
                   seq.confidence, seq.pending, argmax_only=seq.confidence is None and reads_only_argmax(
                       seq.params, seq.output_ids, self._stop_ids(seq)))

    def _adjuster(self, seq: Sequence):
        """adjust(logits, output_ids): the request's penalties, biases and masks after those outputs."""
        return lambda logits, output_ids: adjust_logits(logits, seq.params, seq.prompt_ids, output_ids,
                                                        self._stop_ids(seq))

    def _failed(self, seq: Sequence, e: Exception) -> StepOutput:
        """One request's failure must not end the others: abort it, say why."""
        self.abort(seq, reason="error")
        return StepOutput(seq, None, "", True, f"{type(e).__name__}: {e}")

    def _draft(self, seqs: list[Sequence]) -> list[StepOutput]:
        """Run the rounds of `seqs` up to their verify: one runner call per draft position, of
        the rounds still drafting (a round may stop early, at an unsure draft). Emits nothing,
        unless a round fails."""
        outputs = []
        if self.runner.native_drafts is not None:  # greedy rounds: every draft in one native call
            rounds: dict[tuple[int, int, int | None], list[Sequence]] = {}
            for seq in seqs:
                spec, stop_ids = seq.speculation, self._stop_ids(seq)
                if spec.greedy(seq, stop_ids):  # and the verify too where it reads only argmaxes
                    key = (spec.rule.draft_exit_layer, spec.length, seq.exit_layer if spec.whole(seq, stop_ids) else None)
                    rounds.setdefault(key, []).append(seq)
            for (depth, m, layers), group in rounds.items():
                kvs, x0, starts = [seq.kv for seq in group], [seq.all_ids[-1] for seq in group], [seq.num_computed for seq in group]
                if layers is not None:
                    for seq, verified in zip(group, self.runner.greedy_rounds(kvs, x0, starts, depth, layers, m)):
                        seq.speculation.take_round(verified)
                    continue
                drafts, states = self.runner.greedy_drafts(kvs, x0, starts, depth, m)
                for seq, d, st in zip(group, drafts.tolist(), states):
                    seq.speculation.take(d, st)
        while seqs := [seq for seq in seqs if not seq.finished and seq.speculation.drafting]:
            rows = [seq.speculation.next_row(seq, self._stop_ids(seq)) for seq in seqs]
            for seq, res in zip(seqs, self.runner.forward(rows)):
                try:
                    seq.speculation.draft(seq, res, self._adjuster(seq))
                except Exception as e:
                    outputs.append(self._failed(seq, e))
        return outputs

    def _verified(self, seq: Sequence, res) -> list[StepOutput]:
        """A verified speculative round emits its tokens, each with its logits at L."""
        emitted = []
        try:
            for j, token in enumerate(seq.speculation.verify(seq, res, self._adjuster(seq))):
                emitted.append(self._append_token(seq, token, seq.speculation.verified[j], seq.exit_layer))
                if seq.finished:
                    break
        except Exception as e:
            return emitted + [self._failed(seq, e)]
        # Each verify's (drafted, accepted) rides on the first token it emitted.
        first = 0
        for drafted, accepted in seq.speculation.verifies:
            if first < len(emitted):
                emitted[first].speculated = (drafted, accepted)
            first += accepted + 1
        return emitted

    def _append_token(self, seq: Sequence, token: int, logits: torch.Tensor, exit_layer: int) -> StepOutput:
        p = seq.params
        stop_ids = self._stop_ids(seq)
        if p.logprobs is not None:
            seq.logprobs += logprobs_of(logits[None], [token], p.logprobs, exit_layer)
        seq.output_ids.append(token)
        seq.exit_layers.append(exit_layer)
        if seq.first_token_time is None:
            seq.first_token_time = time.perf_counter()
        detok = self._detokenizers[seq]
        stop_token = token in stop_ids  # never before min_tokens: the sampler masks them
        # A stop token's text is not part of the output; stop strings count from min_tokens on.
        text, hit_stop = detok.update(seq.output_ids[:-1] if stop_token else seq.output_ids,
                                      check_stop=len(seq.output_ids) >= p.min_tokens)
        seq.text = text
        if hit_stop or stop_token:
            seq.finish_reason = "stop"
        elif (len(seq.output_ids) >= seq.params.max_tokens
              or seq.num_tokens >= self.model_config.max_position_embeddings):
            seq.finish_reason = "length"
        if seq.finish_reason:
            self._finish(seq)
        return StepOutput(seq, token, detok.release(text, seq.finished), seq.finished, exit_layer=exit_layer)

    def _finish(self, seq: Sequence) -> None:
        seq.finish_time = time.perf_counter()
        self.scheduler.finish(seq)
        self._detokenizers.pop(seq, None)

    # ---- start-up ------------------------------------------------------------------------------
    def warm_up(self) -> int:
        """With CUDA graphs: compile, autotune and capture every decode batch bucket (and the
        prefill shapes its prompts give) before the first request, so no request waits for it.
        A few greedy requests per bucket, at full depth (every depth segment). Returns the
        number of graphs captured; 0 where decode steps run eagerly (CPU, --enforce-eager)."""
        graphs = self.runner.decode_graphs
        if graphs is None or not graphs.cuda_graphs or self.has_unfinished():
            return 0
        params = SamplingParams(max_tokens=4, ignore_eos=True)
        vocab = self.model_config.vocab_size
        for b in graphs.buckets:
            length = max(2, min(16, self.config.max_num_batched_tokens // b))
            self.generate([[(7 * i + j) % vocab for j in range(length)] for i in range(b)], params)
        return len(graphs.graphs)

    # ---- offline use -------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams = SamplingParams(),
                 exit_layers: list[int] | int | None = None) -> list[Sequence]:
        """Run requests to completion, batched; returns them in the order given."""
        if not isinstance(exit_layers, list):
            exit_layers = [exit_layers] * len(prompts)
        seqs = [self.add_request(p, params, k) for p, k in zip(prompts, exit_layers)]
        while self.has_unfinished():
            self.step()
        return seqs

    def perplexity(self, ids: list[int], exit_layers: list[int]) -> PerplexityResult:
        """Score `ids` through the scheduler (as the server does) and return the result."""
        seq = self.validate_scoring(ids, exit_layers)
        self.add_sequence(seq)
        while self.has_unfinished():
            self.step()
        if seq.finish_reason != "stop":
            raise RuntimeError(f"scoring ended with {seq.finish_reason}")
        return seq.scoring.result()

