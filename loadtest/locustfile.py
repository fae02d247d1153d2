"""Load test for BitSkip Serve: users mix fixed exits (18 and 24 of a 24-layer model) with the
confidence and speculative policies, streamed and not, on the prompts in prompts.txt.

    locust -f loadtest/ --headless -u 32 -r 8 -t 1m -H http://localhost:8000
    locust -f loadtest/ --headless -u 8 -r 8 -t 30s -H http://localhost:8000 \\
        --exit-layers 6,12,18,24 --confidence-share 0 --stream-share 0.5 --prompt-lengths long

Every option below also reads an environment variable (LOCUST_EXIT_LAYERS, ...; the API key
BITSKIP_API_KEY, as the server does). Exit layers are given for a model of --reference-layers (24)
layers and scaled to the served model's depth, read from /v1/models at start: against the 4-layer
tiny-test model, 18 and 24 become 3 and 4.

Locust entries: `/generate exit=K` (and `... stream`, whose time is time to response headers),
`/generate policy=confidence`, `/generate policy=speculative`, and for streams `ttft exit=K` (request sent to first token event)
and `inter-token exit=K` (one sample per gap between token events), request type SSE. A server
that answers policy="confidence" (or "speculative") with 422 naming the field `policy` does not
support that policy yet: such answers are counted under `/generate policy=confidence (not
supported)`, not as failures.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

from locust import HttpUser, events, task

log = logging.getLogger("bitskip.loadtest")

PROMPTS_FILE = Path(__file__).with_name("prompts.txt")
LENGTH_CLASSES = ("short", "medium", "long")  # up to 8 words, 9-30 words, more


def length_class(prompt: str) -> str:
    n = len(prompt.split())
    return "short" if n <= 8 else "medium" if n <= 30 else "long"


def load_prompts(path: Path = PROMPTS_FILE) -> dict[str, list[str]]:
    """Prompts by length class; blank lines and # comments are skipped."""
    by_class: dict[str, list[str]] = {c: [] for c in LENGTH_CLASSES}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            by_class[length_class(line)].append(line)
    return by_class


def scale_exit_layer(nominal: int, num_layers: int, reference_layers: int) -> int:
    """Exit `nominal` of a `reference_layers`-layer model at the same relative depth of this one."""
    return max(1, min(num_layers, round(nominal * num_layers / reference_layers)))


def clip_prompt(prompt: str, max_bytes: int) -> str:
    """At most `max_bytes` UTF-8 bytes: a byte-level or BPE token covers at least one byte, so the
    prompt then has at most that many tokens (plus BOS)."""
    return prompt.encode()[:max(1, max_bytes)].decode(errors="ignore").rstrip() or prompt[:1]


@events.init_command_line_parser.add_listener
def add_arguments(parser):
    parser.add_argument("--exit-layers", env_var="LOCUST_EXIT_LAYERS", default="18,24",
                   help="fixed exit layers, comma-separated, of a --reference-layers model (default 18,24)")
    parser.add_argument("--exit-weights", env_var="LOCUST_EXIT_WEIGHTS", default="",
                   help="relative weights of --exit-layers, comma-separated (default: equal)")
    parser.add_argument("--reference-layers", env_var="LOCUST_REFERENCE_LAYERS", type=int, default=24,
                   help="depth the exit layers refer to; they are scaled to the served model's (default 24)")
    parser.add_argument("--confidence-share", env_var="LOCUST_CONFIDENCE_SHARE", type=float, default=0.1,
                   help="fraction of requests with policy=confidence (default 0.1)")
    parser.add_argument("--confidence-threshold", env_var="LOCUST_CONFIDENCE_THRESHOLD", type=float, default=0.9,
                   help="threshold sent with confidence requests (default 0.9)")
    parser.add_argument("--speculative-share", env_var="LOCUST_SPECULATIVE_SHARE", type=float, default=0.1,
                   help="fraction of requests with policy=speculative (server's default draft exit; default 0.1)")
    parser.add_argument("--stream-share", env_var="LOCUST_STREAM_SHARE", type=float, default=0.3,
                   help="fraction of requests streamed as server-sent events (default 0.3)")
    parser.add_argument("--prompt-lengths", env_var="LOCUST_PROMPT_LENGTHS", default="short,medium,long",
                   help="prompt length classes to draw from: short (<=8 words), medium (9-30), long")
    parser.add_argument("--max-tokens", env_var="LOCUST_MAX_TOKENS", type=int, default=32,
                   help="max_tokens per request (default 32; lowered to fit small contexts)")
    parser.add_argument("--temperature", env_var="LOCUST_TEMPERATURE", type=float, default=0.8)
    parser.add_argument("--think-time", env_var="LOCUST_THINK_TIME", default="0.05,0.5",
                   help="seconds a user waits between requests, MIN,MAX (default 0.05,0.5)")
    parser.add_argument("--api-key", env_var="BITSKIP_API_KEY", default="", is_secret=True,
                   help="sent as 'Authorization: Bearer KEY' when the server has one")


@dataclass(frozen=True)
class LoadMix:
    exit_layers: tuple[int, ...]
    exit_weights: tuple[float, ...]
    reference_layers: int
    confidence_share: float
    confidence_threshold: float
    speculative_share: float
    stream_share: float
    prompt_lengths: tuple[str, ...]
    max_tokens: int
    temperature: float
    think_time: tuple[float, float]
    api_key: str

    @classmethod
    def from_options(cls, o) -> "LoadMix":
        """From locust's parsed options (or any object with the same attributes)."""
        def numbers(text, kind, what):
            try:
                return tuple(kind(x) for x in str(text).split(",") if x.strip())
            except ValueError:
                raise ValueError(f"{what}={text!r}: expected comma-separated numbers") from None
        layers = numbers(o.exit_layers, int, "--exit-layers")
        weights = numbers(o.exit_weights, float, "--exit-weights") or (1.0,) * len(layers)
        think = numbers(o.think_time, float, "--think-time")
        lengths = tuple(x.strip() for x in o.prompt_lengths.split(",") if x.strip())
        problems = []
        if o.reference_layers < 1:
            problems.append(f"--reference-layers={o.reference_layers}: must be >= 1")
        if any(not 1 <= k <= o.reference_layers for k in layers):
            problems.append(f"--exit-layers={o.exit_layers}: each must be in 1..{o.reference_layers}")
        if len(weights) != len(layers) or any(w < 0 for w in weights) or (layers and not sum(weights)):
            problems.append(f"--exit-weights={o.exit_weights}: one weight >= 0 per exit layer, not all 0")
        for name in ("confidence_share", "speculative_share", "stream_share"):
            if not 0 <= getattr(o, name) <= 1:
                problems.append(f"--{name.replace('_', '-')}={getattr(o, name)}: must be in 0..1")
        if o.confidence_share + o.speculative_share > 1:
            problems.append("--confidence-share plus --speculative-share must be at most 1")
        if not layers and o.confidence_share + o.speculative_share < 1:
            problems.append("--exit-layers is empty: then the policy shares must add up to 1")
        if not lengths or set(lengths) - set(LENGTH_CLASSES):
            problems.append(f"--prompt-lengths={o.prompt_lengths}: choose from {', '.join(LENGTH_CLASSES)}")
        if o.max_tokens < 1:
            problems.append(f"--max-tokens={o.max_tokens}: must be >= 1")
        if len(think) != 2 or not 0 <= think[0] <= think[1]:
            problems.append(f"--think-time={o.think_time}: expected MIN,MAX with 0 <= MIN <= MAX")
        if problems:
            raise ValueError("bad load-test options: " + "; ".join(problems))
        return cls(layers, weights, o.reference_layers, o.confidence_share, o.confidence_threshold,
                   o.speculative_share, o.stream_share, lengths, o.max_tokens, o.temperature, (think[0], think[1]), o.api_key or "")


def _defaults():
    """The options' defaults (and environment variables) when locust runs without its parser."""
    from locust.argument_parser import LocustArgumentParser
    p = LocustArgumentParser()
    add_arguments(p)
    return p.parse_args([])


@events.init.add_listener
def check_options(environment, **_kwargs):
    if environment.parsed_options is not None:  # fail at start, not in every user
        LoadMix.from_options(environment.parsed_options)


@dataclass(frozen=True)
class ServedModel:
    name: str
    num_layers: int
    max_model_len: int


_served: ServedModel | None = None
_unsupported = {"confidence": 0, "speculative": 0}


class BitSkipUser(HttpUser):
    """One client: each task sends one request drawn from the mix."""

    def on_start(self):
        global _served
        opts = self.environment.parsed_options or _defaults()
        self.mix = LoadMix.from_options(opts)
        if self.mix.api_key:
            self.client.headers["Authorization"] = f"Bearer {self.mix.api_key}"
        if _served is None:
            r = self.client.get("/v1/models", name="/v1/models")
            r.raise_for_status()
            m = r.json()["data"][0]
            _served = ServedModel(m["id"], int(m["num_layers"]), int(m["max_model_len"]))
            log.info("load-testing %s (%d layers, context %d)", _served.name, _served.num_layers,
                     _served.max_model_len)
        self.model = _served
        self.exits = [scale_exit_layer(k, self.model.num_layers, self.mix.reference_layers)
                      for k in self.mix.exit_layers]
        prompts = load_prompts()
        self.prompts = [p for c in self.mix.prompt_lengths for p in prompts[c]]
        # Fit prompt + completion into the context: byte budget >= token count.
        self.max_tokens = min(self.mix.max_tokens, self.model.max_model_len // 2)
        self.prompt_bytes = self.model.max_model_len - self.max_tokens - 2

    def wait_time(self):
        return random.uniform(*self.mix.think_time)

    @task
    def generate(self):
        body = {"prompt": clip_prompt(random.choice(self.prompts), self.prompt_bytes),
                "max_tokens": self.max_tokens, "temperature": self.mix.temperature, "top_p": 0.95}
        stream = random.random() < self.mix.stream_share
        policy = random.random()
        if policy < self.mix.confidence_share:
            body.update(policy="confidence", threshold=self.mix.confidence_threshold)
            self.request("/generate", body, stream, "policy=confidence", "confidence", None)
        elif policy < self.mix.confidence_share + self.mix.speculative_share:
            body.update(policy="speculative")  # every token is the full model's
            self.request("/generate", body, stream, "policy=speculative", "speculative", self.model.num_layers)
        else:
            k = random.choices(self.exits, weights=self.mix.exit_weights)[0]
            self.request(f"/generate?exit_layer={k}", body, stream, f"exit={k}", f"exit={k}", k)

    def request(self, url: str, body: dict, stream: bool, name: str, sse_name: str, exit_layer: int | None):
        """POST one /generate; mark failures (status, malformed output, wrong exits)."""
        entry = f"/generate {name}" + (" stream" if stream else "")
        sent = time.perf_counter()
        with self.client.post(url, json={**body, "stream": stream}, name=entry, stream=stream,
                              catch_response=True) as r:
            try:
                if r.status_code == 422 and body.get("policy") in _unsupported and _error_param(r) == "policy":
                    self.not_supported(r, body["policy"], entry)
                    return
                if r.status_code != 200:
                    r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                    return
                result = self.read_stream(r, sent, sse_name) if stream else r.json()
                problem = check_result(result, exit_layer, self.model.num_layers)
                if problem:
                    r.failure(problem)
                else:
                    r.success()
            except Exception as e:  # a broken stream or body is a failed request, not a crashed user
                r.failure(f"{type(e).__name__}: {e}")

    def read_stream(self, r, sent: float, sse_name: str) -> dict | None:
        """The final result of an SSE stream; fires ttft and inter-token entries on the way."""
        fire = self.environment.events.request.fire
        last, final, done = None, None, False
        for line in r.iter_lines(decode_unicode=True):
            if not line or not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"error event: {event['error']}")
            if "token_id" in event:
                now = time.perf_counter()
                if last is None:
                    name, ms = f"ttft {sse_name}", now - sent
                else:
                    name, ms = f"inter-token {sse_name}", now - last
                fire(request_type="SSE", name=name, response_time=ms * 1000, response_length=len(line),
                     exception=None, context={})
                last = now
            elif "finish_reason" in event:
                final = event
        if not done:
            raise RuntimeError("stream ended without [DONE]")
        return final

    def not_supported(self, r, feature: str, entry: str) -> None:
        if not _unsupported[feature]:
            log.warning("the server does not support policy=%s yet (422 naming 'policy'): those requests are "
                        "counted as not supported, not as failures", feature)
        _unsupported[feature] += 1
        r.request_meta["name"] = f"{entry} (not supported)"
        r.success()


def _error_param(r) -> str | None:
    try:
        return r.json()["error"]["param"]
    except (ValueError, KeyError, TypeError):
        return None


def check_result(result: dict | None, exit_layer: int | None, num_layers: int) -> str | None:
    """None if `result` is a complete /generate answer run at `exit_layer` (any depth if None)."""
    if not isinstance(result, dict) or "finish_reason" not in result:
        return f"no final result: {str(result)[:200]}"
    if result["finish_reason"] not in ("stop", "length"):
        return f"finish_reason={result['finish_reason']!r}"
    exits = result.get("exit_layers", [])
    if len(exits) != len(result.get("token_ids", [])):
        return f"{len(exits)} exit layers for {len(result.get('token_ids', []))} tokens"
    wrong = [k for k in exits if (k != exit_layer if exit_layer is not None else not 1 <= k <= num_layers)]
    if wrong:
        return f"tokens ran to layers {sorted(set(wrong))}, expected {exit_layer or f'1..{num_layers}'}"
    return None


@events.test_stop.add_listener
def report_unsupported(environment, **_kwargs):
    for feature, n in _unsupported.items():
        if n:
            log.warning("%d requests with policy=%s were answered 422 (not supported by this server)", n, feature)
