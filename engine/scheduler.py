"""Chooses the rows of the next step, all under one per-step token budget: running generations
first (decodes before prompt chunks, so streams keep flowing beside a long prompt), then new
requests in chunks, then the chunks of running perplexity requests with what is left."""

from __future__ import annotations

from collections import deque

from .kv_cache import KVCache
from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, kv_cache: KVCache | None, max_num_seqs: int, max_num_batched_tokens: int):
        """`kv_cache` None: the model keeps no KV (no causal mask), so nothing is reserved."""
        self.kv_cache = kv_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._budget = 0  # tokens left in the step being scheduled

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """[(sequence, number of its next tokens to compute)] for one step."""
        self._budget = self.max_num_batched_tokens
        batch: list[tuple[Sequence, int]] = []
        # decodes first, then prompt chunks: a long chunk takes only what the decodes leave
        running = sorted(self.running, key=lambda s: s.num_tokens - s.num_computed > 1)
        self._continue([s for s in running if s.scoring is None], batch)
        while self.waiting and self._budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_tokens - seq.num_computed, self._budget)
            if not self._reserve(seq, n):
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append((seq, n))
            self._budget -= n
        # scoring (perplexity) chunks last, with what new prompts leave: a long text is scored
        # beside other requests and never delays their admission by more than this step
        self._continue([s for s in running if s.scoring is not None], batch)
        return batch

    def _continue(self, seqs: list[Sequence], batch: list[tuple[Sequence, int]]) -> None:
        """Add the next tokens of running `seqs` to `batch`, preempting the latest-admitted
        sequences not yet in it when the KV cache is short."""
        for seq in seqs:
            if seq not in self.running:  # preempted below to make room for an earlier one
                continue
            n = min(seq.num_tokens - seq.num_computed, self._budget)
            if n <= 0:
                continue
            # A speculative round (drafts and verify in this step) computes and writes `ahead`
            # positions past the sequence's tokens: the step's budget pays for them too.
            ahead = seq.speculation.plan(seq, self._budget - n) if seq.speculation else 0
            while not self._reserve(seq, n + ahead):
                batched = {s for s, _ in batch}
                victim = next(s for s in reversed(self.running) if s not in batched)
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                batch.append((seq, n))
                self._budget -= n + ahead

    def finish(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its KV blocks."""
        seq.status = Status.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def _reserve(self, seq: Sequence, n: int) -> bool:
        kv = seq.kv  # most steps: the blocks are there already (every layer holds `capacity` positions)
        if self.kv_cache is None or (kv.num_layers >= seq.exit_layer and kv.capacity >= seq.num_computed + n):
            return True
        return self.kv_cache.reserve(kv, seq.exit_layer, seq.num_computed + n)

    def _release(self, seq: Sequence) -> None:
        if self.kv_cache is not None:
            self.kv_cache.release(seq.kv)

    def _preempt(self, seq: Sequence) -> None:
        """Free a sequence's KV and queue it first again; it is recomputed from its tokens."""
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.pending = None
        if seq.speculation:
            seq.speculation.reset()
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
