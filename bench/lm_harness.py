"""lm-evaluation-harness against a live server, one run per exit layer chosen by model name.

    python bench/lm_harness.py                       # default model, exits 6 12 18 24
    python bench/lm_harness.py --depths 12 24 --limit 50

Builds two small local tasks from the bundled held-out text (models/default/heldout_sample.txt,
Austen's Persuasion, which the default model never trained on):

- `bitskip_lastword` (loglikelihood): a sentence's last word (with its leading space, as
  LAMBADA's task writes it) given the text before it; lm-eval reports `acc` (every token of the
  word is the greedy continuation) and `perplexity` (per word).
- `bitskip_nextword` (generate_until): the same word generated greedily; `exact_match` of the
  first generated word.

Starts `bitskip serve`, runs `lm_eval --model local-completions` once per depth with
`model=NAME@K` (the server's tokenizer through its /tokenize route), then checks one
loglikelihood lm-eval computed against /perplexity on the same tokens and depth. Nothing is
downloaded: the task files are local JSON, and the run is offline (HF_*_OFFLINE). Prints a table
and writes JSON (default bench/out/lm_harness.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from common import git_commit  # bench/ is the script's directory, first on sys.path
from serve import free_port, start_server

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "models" / "default" / "heldout_sample.txt"
TASKS = ("bitskip_lastword", "bitskip_nextword")

LASTWORD = """task: bitskip_lastword
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{' ' + target}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
"""

NEXTWORD = """task: bitskip_nextword
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n", ".", ",", ";", "!", "?"]
  max_gen_toks: 6
  do_sample: false
  temperature: 0
filter_list:
  - name: first_word
    filter:
      - function: regex
        regex_pattern: "^\\\\s*([A-Za-z']+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
"""


def examples(text: str, context_chars: int = 400) -> list[dict]:
    """(context, last word) of each sentence of at least 8 words that ends in a plain word; the
    context is up to `context_chars` of text before the word, cut at a word boundary."""
    out = []
    for m in re.finditer(r"[^.!?]+[.!?]", text):
        sentence = m.group(0).strip()
        words = sentence.rstrip(".!?\"'").split()
        if len(words) < 8 or not re.fullmatch(r"[A-Za-z]+", words[-1]):
            continue
        end = text.rfind(words[-1], m.start(), m.end())  # where the word starts
        context = text[max(0, end - context_chars):end].rstrip()
        context = context[context.find(" ") + 1:] if end > context_chars else context
        out.append({"context": " ".join(context.split()), "target": words[-1]})
    return out


def write_tasks(directory: Path) -> int:
    docs = examples(TEXT.read_text(encoding="utf-8"))
    data = directory / "lastword.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (directory / "bitskip_lastword.yaml").write_text(LASTWORD.format(data=data))
    (directory / "bitskip_nextword.yaml").write_text(NEXTWORD.format(data=data))
    return len(docs)


def run_lm_eval(name: str, port: int, tasks_dir: Path, out_dir: Path, limit: int | None) -> dict:
    """lm-eval's results and samples for one model name."""
    args = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
            f"model={name},base_url=http://127.0.0.1:{port}/v1/completions,tokenizer_backend=remote,"
            "tokenized_requests=True,num_concurrent=4,max_retries=1,max_length=256",
            "--tasks", ",".join(TASKS), "--include_path", str(tasks_dir), "--output_path", str(out_dir),
            "--log_samples", "--batch_size", "1"]
    if limit:
        args += ["--limit", str(limit)]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_EVALUATE_OFFLINE": "1", "HF_DATASETS_CACHE": str(out_dir / "hf-cache")}
    subprocess.run(args, check=True, env=env, cwd=out_dir, stdout=subprocess.DEVNULL)
    results = sorted(out_dir.rglob("results_*.json"))[-1]
    samples = {t: [json.loads(line) for p in out_dir.rglob(f"samples_{t}_*.jsonl") for line in p.open()]
               for t in TASKS}
    return {"results": json.loads(results.read_text())["results"], "samples": samples}


def check_against_perplexity(url: str, name: str, depth: int, sample: dict) -> dict:
    """lm-eval's loglikelihood of one (context, word) against /perplexity at the same depth:
    log p(word | context) = -(total NLL of context + word - total NLL of context)."""
    context, target = sample["arguments"]["gen_args_0"]["arg_0"], sample["arguments"]["gen_args_0"]["arg_1"]

    def ids(text):
        return httpx.post(f"{url}/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    whole, ctx = ids(context + target), ids(context)  # as lm-eval splits a pair

    def total_nll(token_ids):
        r = httpx.post(f"{url}/perplexity", json={"token_ids": token_ids, "exit_layers": [depth]}, timeout=60)
        r.raise_for_status()
        return r.json()["nll"][str(depth)] * r.json()["tokens"]
    expected = -(total_nll(whole) - total_nll(ctx))
    got = sample["resps"][0][0][0] if isinstance(sample["resps"][0][0], list) else sample["resps"][0][0]
    got = float(got[0] if isinstance(got, (list, tuple)) else got)
    return {"model": name, "lm_eval": got, "perplexity_route": expected, "abs_diff": abs(got - expected)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the bundled default model)")
    ap.add_argument("--depths", type=int, nargs="+", default=[6, 12, 18, 24])
    ap.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    ap.add_argument("--json", default=str(ROOT / "bench" / "out" / "lm_harness.json"))
    args = ap.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args.model, port, max_batch=8, extra=[])
    rows, checks = [], []
    try:
        name = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            n_docs = write_tasks(tmp)
            for k in args.depths:
                out = tmp / f"run-{k}"
                out.mkdir()
                res = run_lm_eval(f"{name}@{k}", port, tmp, out, args.limit)
                r = res["results"]
                rows.append({"exit_layer": k, "lastword_acc": r["bitskip_lastword"]["acc,none"],
                             "lastword_perplexity": r["bitskip_lastword"]["perplexity,none"],
                             "nextword_exact_match": r["bitskip_nextword"]["exact_match,first_word"]})
                checks.append(check_against_perplexity(url, f"{name}@{k}", k,
                                                       res["samples"]["bitskip_lastword"][0]))
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    print(f"lm-eval local-completions on {name}: {n_docs} held-out examples per task"
          + (f" (limit {args.limit})" if args.limit else ""))
    print(f"{'exit layer':>10} {'lastword acc':>13} {'lastword ppl':>13} {'nextword EM':>12}")
    for row in rows:
        print(f"{row['exit_layer']:>10} {row['lastword_acc']:>13.3f} {row['lastword_perplexity']:>13.1f} "
              f"{row['nextword_exact_match']:>12.3f}")
    for c in checks:
        print(f"loglikelihood check {c['model']}: lm-eval {c['lm_eval']:.6f}, /perplexity "
              f"{c['perplexity_route']:.6f}, |diff| {c['abs_diff']:.2e}")
    ok = all(c["abs_diff"] < 1e-3 * max(1.0, abs(c["perplexity_route"])) for c in checks)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        "commit": git_commit(), "machine": platform.platform(), "cpu_count": os.cpu_count(),
        "model": name, "examples": n_docs, "limit": args.limit, "rows": rows, "loglikelihood_checks": checks,
        "checks_pass": ok}, indent=2))
    if not ok or any(math.isnan(r["lastword_acc"]) for r in rows):
        sys.exit("loglikelihood check failed")


if __name__ == "__main__":
    main()
