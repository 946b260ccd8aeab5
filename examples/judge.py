#!/usr/bin/env python3
"""AlpacaEval-style judging through onecard: the ``candidate`` answers, the ``judge`` grades.

Each item is one instruction. A worker asks the candidate model for an answer, then asks the judge model to
rate that answer from 1 to 10, and parses the first number it finds in the verdict (leniently: "Score: 7/10",
"**8**", "I'd say seven" -> 7; nothing usable -> ``--default-score``, counted as unparsed). The two models need
not fit on the card together: onecard batches the queued requests per model, so a loop like this costs a few
swaps, not one per request. Only the official ``openai`` SDK is used, as any lab script would::

    python examples/judge.py --base-url http://gpu-box:8000/v1 --items 50 --workers 8
    python examples/judge.py --instructions prompts.jsonl --json   # one {"instruction": ...} per line

Pairwise, AlpacaEval style (``--reference MODEL``): the reference model answers too, and the judge picks the
better of the two answers. Judges favour a position, so which answer is shown first is drawn at random per
item (seeded by ``--seed``, so a rerun asks the same questions) and the verdict is mapped back; the score is
1 when the candidate wins, 0 when the reference does, and the summary gives the candidate's win rate::

    python examples/judge.py --reference workhorse --items 50 --seed 0

Prints one line per item and a summary (items, graded, mean score, elapsed); ``--json`` prints the summary as
one JSON object instead (per-item records included). Exits 1 if any item failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import openai

BUILTIN_INSTRUCTIONS: tuple[str, ...] = (
    "Explain why the sky is blue in two sentences.",
    "Write a haiku about a GPU that runs too hot.",
    "Give three tips for writing a clear commit message.",
    "What is the difference between a list and a tuple in Python?",
    "Summarise the plot of Romeo and Juliet in one sentence.",
    "Suggest a name for a cat that likes to sit on keyboards.",
    "How do I boil an egg so the yolk stays soft?",
    "Translate 'good morning, how are you?' into French.",
    "List the planets of the solar system in order from the sun.",
    "Why do we use version control?",
    "Write a short, polite email declining a meeting invitation.",
    "What does a learning rate do when training a neural network?",
    "Describe the smell of rain to someone who has never smelled it.",
    "Give an example of a prime number greater than 100 and explain why it is prime.",
    "What are the pros and cons of working from home?",
    "Explain recursion to a ten-year-old.",
)

JUDGE_SYSTEM = "You are a strict, fair grader of answers written by an AI assistant."
JUDGE_TEMPLATE = (
    "Rate the quality of the response to the instruction below on a scale of 1 to 10, where 1 is useless and "
    "10 is excellent. Consider helpfulness, correctness and clarity.\n\n"
    "[Instruction]\n{instruction}\n\n[Response]\n{answer}\n\n"
    "Reply with the score only, as a single number from 1 to 10."
)

PAIR_TEMPLATE = (
    "Which response follows the instruction better? Consider helpfulness, correctness and clarity.\n\n"
    "[Instruction]\n{instruction}\n\n[Response A]\n{a}\n\n[Response B]\n{b}\n\n"
    "Reply with exactly one letter: A or B."
)
_CHOICE = re.compile(r"\b([AB])\b")

WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}
_NUMBER = re.compile(r"(?<![\d.])(10|[1-9])(?:\.\d+)?(?![\d])")
_WORD = re.compile(r"\b(" + "|".join(WORDS) + r")\b", re.IGNORECASE)
_SCORE_AFTER_LABEL = re.compile(r"(?:score|rating|grade)\s*[:=\-]?\s*\**\s*(10|[1-9])(?![\d])", re.IGNORECASE)


def parse_score(text: str | None) -> int | None:
    """The score in a judge's verdict, 1-10, or None when there is none.

    A number after "score"/"rating"/"grade" wins; else the first standalone 1-10 (digits, then number words).

    >>> parse_score("Score: 7/10"), parse_score("**8**"), parse_score("I'd say seven."), parse_score("n/a")
    (7, 8, 7, None)
    >>> parse_score("Of 3 points, rating = 9"), parse_score("42"), parse_score(None)
    (9, None, None)
    """
    if not text:
        return None
    for pattern in (_SCORE_AFTER_LABEL, _NUMBER):
        match = pattern.search(text)
        if match:
            return int(match.group(1))
    word = _WORD.search(text)
    return WORDS[word.group(1).lower()] if word else None


def candidate_first(seed: int, index: int) -> bool:
    """Whether item ``index`` shows the candidate's answer as A: a fair coin per item, the same on every run.

    >>> [candidate_first(0, i) for i in range(6)] == [candidate_first(0, i) for i in range(6)]
    True
    """
    return random.Random(f"{seed}-{index}").random() < 0.5


def parse_choice(text: str | None) -> str | None:
    """``"A"`` or ``"B"`` from a pairwise verdict, or None.

    >>> parse_choice("B"), parse_choice("Response A is better."), parse_choice("both"), parse_choice(None)
    ('B', 'A', None, None)
    """
    match = _CHOICE.search(text or "")
    return match.group(1) if match else None


@dataclass
class Result:
    index: int
    instruction: str
    answer: str = ""
    verdict: str = ""
    score: float | None = None
    parsed: bool = False
    reference: str = ""  # pairwise: the reference model's answer
    candidate_shown_first: bool | None = None  # pairwise: whether the candidate's answer was A
    error: str | None = None
    seconds: float = 0.0


async def judge_one(client: openai.AsyncOpenAI, index: int, instruction: str, args: argparse.Namespace) -> Result:
    result = Result(index, instruction)
    started = time.monotonic()
    try:
        answer = await client.chat.completions.create(
            model=args.candidate,
            messages=[{"role": "user", "content": instruction}],
            max_tokens=args.answer_tokens,
            temperature=args.temperature,
        )
        result.answer = answer.choices[0].message.content or ""
        if args.reference:
            await judge_pair(client, result, args)
            result.seconds = time.monotonic() - started
            return result
        verdict = await client.chat.completions.create(
            model=args.judge,
            messages=[
                {"role": "system", "content": JUDGE_SYSTEM},
                {"role": "user", "content": JUDGE_TEMPLATE.format(instruction=instruction, answer=result.answer)},
            ],
            max_tokens=args.verdict_tokens,
            temperature=0,
        )
        result.verdict = verdict.choices[0].message.content or ""
        score = parse_score(result.verdict)
        result.parsed = score is not None
        result.score = float(score) if score is not None else args.default_score
    except openai.OpenAIError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.seconds = time.monotonic() - started
    return result


async def judge_pair(client: openai.AsyncOpenAI, result: Result, args: argparse.Namespace) -> None:
    """The reference answers, the judge picks A or B with the two answers in this item's drawn order."""
    reference = await client.chat.completions.create(
        model=args.reference,
        messages=[{"role": "user", "content": result.instruction}],
        max_tokens=args.answer_tokens,
        temperature=args.temperature,
    )
    result.reference = reference.choices[0].message.content or ""
    first = candidate_first(args.seed, result.index)
    a, b = (result.answer, result.reference) if first else (result.reference, result.answer)
    verdict = await client.chat.completions.create(
        model=args.judge,
        messages=[
            {"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": PAIR_TEMPLATE.format(instruction=result.instruction, a=a, b=b)},
        ],
        max_tokens=args.verdict_tokens,
        temperature=0,
    )
    result.verdict = verdict.choices[0].message.content or ""
    result.candidate_shown_first = first
    choice = parse_choice(result.verdict)
    result.parsed = choice is not None
    result.score = args.default_score if choice is None else float(choice == ("A" if first else "B"))


async def run(instructions: list[str], args: argparse.Namespace) -> list[Result]:
    client = openai.AsyncOpenAI(
        base_url=args.base_url, api_key=args.api_key, timeout=args.timeout, max_retries=args.retries
    )
    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    for item in enumerate(instructions):
        queue.put_nowait(item)
    results: list[Result] = []

    async def worker() -> None:
        while True:
            try:
                index, instruction = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            result = await judge_one(client, index, instruction, args)
            results.append(result)
            if not args.json:
                shown = "error" if result.error else f"{result.score:g}{'' if result.parsed else ' (default)'}"
                print(f"[{len(results)}/{len(instructions)}] item {index}: {shown}  {instruction[:50]!r}", flush=True)

    try:
        await asyncio.gather(*(worker() for _ in range(max(1, args.workers))))
    finally:
        await client.close()
    return sorted(results, key=lambda r: r.index)


def load_instructions(args: argparse.Namespace) -> list[str]:
    if args.instructions:
        text = Path(args.instructions).read_text()
        rows: list[Any] = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
        found = [r if isinstance(r, str) else r["instruction"] for r in rows]
    else:
        found = list(BUILTIN_INSTRUCTIONS)
    if args.items is not None:  # cycle the list when more items are asked for than it has
        found = [found[i % len(found)] for i in range(args.items)]
    return found


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--base-url",
        default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"),
        help="the gateway's OpenAI endpoint (default: $OPENAI_BASE_URL or %(default)s)",
    )
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "unused"))
    p.add_argument("--items", type=int, default=None, help="how many items (default: every instruction)")
    p.add_argument("--instructions", help="a JSON list or JSONL file of instructions (strings or {instruction})")
    p.add_argument("--workers", type=int, default=4, help="items in flight at once (default %(default)s)")
    p.add_argument("--candidate", default="candidate", help="model that answers (default %(default)s)")
    p.add_argument("--judge", default="judge", help="model that grades (default %(default)s)")
    p.add_argument("--reference", help="pairwise: the model whose answers the candidate's are compared with")
    p.add_argument("--seed", type=int, default=0, help="pairwise: seed of the per-item answer order")
    p.add_argument("--answer-tokens", type=int, default=128)
    p.add_argument("--verdict-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0, help="the candidate's sampling temperature")
    p.add_argument(
        "--default-score",
        type=float,
        default=None,
        help="score when the verdict has no usable answer (default 5, pairwise 0.5)",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request (swaps included)")
    p.add_argument("--retries", type=int, default=2, help="the SDK's retries per request")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    args = p.parse_args(argv)
    if args.items is not None and args.items < 1:
        p.error("--items must be at least 1")
    if args.default_score is None:
        args.default_score = 0.5 if args.reference else 5.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    instructions = load_instructions(args)
    started = time.monotonic()
    results = asyncio.run(run(instructions, args))
    elapsed = time.monotonic() - started
    graded = [r for r in results if r.error is None]
    scores = [r.score for r in graded if r.score is not None]
    summary: dict[str, Any] = {
        "items": len(results),
        "graded": len(graded),
        "parsed": sum(r.parsed for r in graded),
        "errors": len(results) - len(graded),
        "mean_score": round(sum(scores) / len(scores), 3) if scores else None,
        "elapsed_s": round(elapsed, 2),
        "candidate": args.candidate,
        "judge": args.judge,
    }
    if args.reference:  # the mean score is the candidate's win rate against the reference
        summary["reference"] = args.reference
        summary["candidate_shown_first"] = sum(bool(r.candidate_shown_first) for r in graded)
    if args.json:
        print(json.dumps({**summary, "results": [asdict(r) for r in results]}))
    else:
        for r in results:
            if r.error:
                print(f"item {r.index} failed: {r.error}", file=sys.stderr)
        mean = "n/a" if summary["mean_score"] is None else f"{summary['mean_score']:.2f}"
        print(
            f"\n{summary['items']} items, {summary['graded']} graded ({summary['parsed']} with a parsed score, "
            f"{summary['errors']} errors); mean score {mean}; {elapsed:.1f} s "
            f"({args.candidate} answers, {args.judge} grades)"
        )
    return 0 if summary["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
