#!/usr/bin/env python3
"""Write tests/fixtures/estimate_accuracy.jsonl: generated chat requests with `max_tokens`,
and the usage each one is taken to have had, counted by litellm.

The Rust test `estimates::estimates_cover_the_actual_cost_of_the_fixtures` estimates every
line as `/v1/reserve` would (`Limiter::estimate`: the messages counted by our rule for the
model, plus `max_tokens` of output, priced by the builtin catalog), prices the line's actual
usage with the same catalog, and checks issue 22's target: the estimate covers the actual
cost in >= 99 % of lines, and the median of estimate / actual is <= 1.5.

    python3 -m venv target/venv-litellm
    target/venv-litellm/bin/pip install litellm==1.110.2
    target/venv-litellm/bin/python scripts/estimate_fixtures.py

Deterministic (seeded). Offline: models whose litellm tokenizer needs a download from
Hugging Face (llama, cohere command-r) are left out.

What a line is taken to have used (there is no provider here to ask, so this is a model of
traffic, written down so that the figures can be read for what they are):

* **prompt tokens**: for the models tiktoken knows (OpenAI's), their encoding over each
  whole text, as OpenAI's cookbook counts a chat (3 per message, role and content, 3 for the
  reply): what OpenAI bills. litellm's `token_counter` encodes in 1 024-character chunks,
  which splits tokens at each cut and over-counts by about one token per chunk, so it is not
  used for them. For the rest, litellm's `token_counter(model, messages)`: the Anthropic
  tokenizer litellm bundles for the Claude models it maps to it, the DeepSeek one for
  DeepSeek models, tiktoken's `cl100k_base` (chunked) for the others;
* **output tokens**: a quarter of the calls run to `max_tokens` (finish reason `length`);
  the others stop on their own, uniformly between half of `max_tokens` and all of it (a
  caller sets `max_tokens` a little above the answers it expects). How close calls end to
  their `max_tokens` is the caller's choice and sets most of the estimate's excess: the test
  prints the ratio for outputs uniform over the whole range too.

Messages (slices of `tests/fixtures/estimate_corpus.txt`, by character offset): 1 to 10 turns (system, user, assistant), each a slice of a corpus mixing English
prose (this repository's docs), Rust code (its sources), JSON, and German, Spanish,
French, Chinese, Japanese and Russian text; slice lengths log-uniform from 8 to 24 000 characters.
"""
import json
import math
import os
import pathlib
import random
import sys

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # the packaged catalog, no network
os.environ.setdefault("LITELLM_LOG", "ERROR")

ROOT = pathlib.Path(__file__).resolve().parent.parent
CATALOG = ROOT / "src" / "pricing" / "data" / "model_prices_and_context_window.json"
OUT = ROOT / "tests" / "fixtures" / "estimate_accuracy.jsonl"
CORPUS = ROOT / "tests" / "fixtures" / "estimate_corpus.txt"
CASES = 1200
MAX_TOKENS = [16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384]

FOREIGN = [
    # German, Spanish, French, Chinese, Japanese, Russian: ordinary prose.
    "Die Abrechnung erfolgt monatlich. Wenn das Budget eines Teams erschöpft ist, werden "
    "weitere Anfragen abgelehnt, bis das Zeitfenster zurückgesetzt wird. Überschreitungen "
    "werden protokolliert und dem Betreiber gemeldet.",
    "El presupuesto de cada equipo se reinicia al comienzo de cada mes. Cuando se agota, las "
    "solicitudes se rechazan con un error claro y el operador recibe una alerta. Los gastos "
    "se registran de forma duradera antes de responder.",
    "Chaque clé dispose de son propre budget, créé lors de la première utilisation. Les "
    "dépenses sont comptées une seule fois, même lorsque le réseau est coupé pendant "
    "plusieurs minutes, puis répliquées vers les autres nœuds.",
    "每个团队的预算在每个月初重置。预算用完后，请求会被拒绝，并返回明确的错误信息。"
    "所有花费在回复之前都会被持久记录，即使进程崩溃也不会丢失。",
    "各チームの予算は毎月の初めにリセットされます。予算を使い切ると、リクエストは明確な"
    "エラーで拒否され、運用者に通知が送られます。支出は応答の前に確実に記録されます。",
    "Бюджет каждой команды сбрасывается в начале месяца. Когда он исчерпан, запросы "
    "отклоняются с понятной ошибкой, а оператор получает уведомление. Расходы записываются "
    "надёжно до ответа.",
]


def in_scope(key: str, entry: dict) -> bool:
    if key == "sample_spec" or not isinstance(entry, dict):
        return False
    if entry.get("mode") not in (None, "chat", "completion", "responses"):
        return False
    if not entry.get("input_cost_per_token") or not entry.get("output_cost_per_token"):
        return False
    if "tiered_pricing" in entry or "off_peak_pricing" in entry:
        return False
    return True


def corpus() -> str:
    """The text messages are cut from (written beside the fixtures: a line names its slices)."""
    parts = [(ROOT / "docs" / "design.md").read_text(encoding="utf-8")[:60_000]]
    parts.append((ROOT / "src" / "limiter" / "reserve.rs").read_text(encoding="utf-8")[:40_000])
    parts.append(CATALOG.read_text(encoding="utf-8")[:30_000])  # JSON
    parts.extend(text * 20 for text in FOREIGN)
    return "\n".join(parts)


def message(rng: random.Random, text: str, role: str) -> dict:
    """A message: `role` and the corpus slice `[start, start + len)` (in characters)."""
    length = int(math.exp(rng.uniform(math.log(8), math.log(24_000))))
    start = rng.randrange(0, max(1, len(text) - length))
    return {"role": role, "start": start, "len": length}


def messages(rng: random.Random, text: str) -> list:
    out = [message(rng, text, "system")] if rng.random() < 0.6 else []
    turns = rng.randint(1, 5)
    for i in range(turns):
        out.append(message(rng, text, "user"))
        if i + 1 < turns:
            out.append(message(rng, text, "assistant"))
    return out


def output_tokens(rng: random.Random, max_tokens: int) -> int:
    if rng.random() < 0.25:
        return max_tokens
    return rng.randint(max(1, max_tokens // 2), max_tokens)


def openai_tokens(model: str, chat: list):
    """The exact count of a chat for a model tiktoken knows, else None. tiktoken's encodings
    are read from the copies litellm ships (offline)."""
    import litellm
    import tiktoken

    os.environ.setdefault(
        "TIKTOKEN_CACHE_DIR", str(pathlib.Path(litellm.__file__).parent / "litellm_core_utils" / "tokenizers")
    )
    bare = model.split("/", 1)[1] if "/" in model.strip("/") and not model.startswith("/") else model
    try:
        name = tiktoken.encoding_name_for_model(bare)
    except KeyError:
        return None
    if name not in ("o200k_base", "o200k_harmony", "cl100k_base"):
        return None
    enc = tiktoken.get_encoding(name)
    count = lambda text: len(enc.encode(text, disallowed_special=()))  # noqa: E731
    return 3 + sum(3 + count(m["role"]) + count(m["content"]) for m in chat)


def models(litellm, catalog: dict) -> list:
    from litellm.utils import huggingface_tokenizer_kind

    out = []
    for key, entry in sorted(catalog.items()):
        if not in_scope(key, entry):
            continue
        if huggingface_tokenizer_kind(key) in ("llama2", "llama3", "cohere"):
            continue  # a download from Hugging Face; offline here
        out.append(key)
    return out


def main() -> None:
    import litellm

    catalog = json.loads(CATALOG.read_text())
    rng = random.Random(2212)
    text = corpus()
    keys = models(litellm, catalog)
    # Every family litellm counts with its own tokenizer, well represented.
    favoured = [k for k in keys if "claude" in k or "deepseek" in k or k.startswith(("gpt-", "o1", "o3", "o4"))]
    lines = []
    for i in range(CASES):
        model = rng.choice(favoured if i % 3 == 0 else keys)
        msgs = messages(rng, text)
        max_tokens = rng.choice(MAX_TOKENS)
        chat = [{"role": m["role"], "content": text[m["start"] : m["start"] + m["len"]]} for m in msgs]
        prompt = openai_tokens(model, chat)
        if prompt is None:
            prompt = litellm.token_counter(model=model, messages=chat)
        lines.append(
            json.dumps(
                {
                    "model": model,
                    "messages": msgs,
                    "max_tokens": max_tokens,
                    "usage": {"input": prompt, "output": output_tokens(rng, max_tokens)},
                    "whole_range_output": rng.randint(1, max_tokens),
                },
                ensure_ascii=False,
                sort_keys=True,
            )
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    CORPUS.write_text(text, encoding="utf-8")
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{OUT}: {len(lines)} cases over {len(set(json.loads(l)['model'] for l in lines))} models", file=sys.stderr)


if __name__ == "__main__":
    main()
