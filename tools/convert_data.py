"""Convert math RL datasets to the layout rollout.data reads: ``{"prompt", "answer", ...}`` records.

    python tools/convert_data.py IN [IN ...] --out data/tir_train.parquet [--strip TEXT] [--skip-unlabeled]

IN is a ``.parquet``, ``.jsonl`` or ``.json`` (one object per line, or one JSON array) file, or a
folder holding such files (e.g. a ``huggingface-cli download --repo-type dataset`` copy). Each
record is recognised by its fields, in this order:

- verl / SimpleTIR / ALP-reference parquet: ``prompt`` = chat messages ``[{"role", "content"}]``,
  answer at ``reward_model.ground_truth`` (what ``verl/examples/data_preprocess`` writes and the
  ALP multi-turn datasets use). The messages are kept as they are.
- HF dataset dumps: the question in ``problem`` / ``question`` / ``prompt`` / ``query`` (a
  string: it becomes one user message), the answer in ``answer`` / ``gt_answer`` / ``gt`` /
  ``ground_truth`` / ``final_answer`` / ``target`` or, failing those, the last ``\\boxed{}`` of
  ``solution`` (DeepScaleR, DAPO-Math-17k, MATH, SimpleRL-Zoo's data use these names).

``--prompt-key`` / ``--answer-key`` force a (dotted) field instead. ``--strip`` removes a phrase
from the prompt text (SimpleTIR removed the datasets' own "Let's think step by step and output the
final answer within \\boxed{}." because the tool instruction replaces it). The output keeps
``data_source`` and ``extra_info`` when present. A record whose question or answer is missing
stops the conversion (naming file and record) unless ``--skip-unlabeled`` (then it is counted).
Use the output with the default ``rollout.data.prompt_key: prompt`` / ``label_key: answer``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Any, Dict, Iterable, List, Optional, Tuple

QUESTION_KEYS = ("problem", "question", "prompt", "query")
ANSWER_KEYS = ("reward_model.ground_truth", "answer", "gt_answer", "gt", "ground_truth", "final_answer", "target")
KEEP_KEYS = ("data_source", "extra_info")


def input_files(paths: Iterable[str]) -> List[str]:
    out: List[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = [f for ext in ("parquet", "jsonl", "json")
                     for f in glob.glob(os.path.join(p, "**", f"*.{ext}"), recursive=True)]
            if not found:
                raise SystemExit(f"{p}: no .parquet/.jsonl/.json file inside")
            out += sorted(found)
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise SystemExit(f"{p}: no such file or folder")
    return out


def read_any(path: str) -> List[Dict[str, Any]]:
    """Records of a parquet, JSONL or JSON-array file."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with open(path) as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return list(json.loads(text))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _get(rec: Dict[str, Any], key: str) -> Any:
    from rollout.data import get_field

    value = get_field(rec, key, None)
    return None if value is None or (isinstance(value, str) and not value.strip()) else value


def find_prompt(rec: Dict[str, Any], key: Optional[str]) -> Any:
    for k in ([key] if key else QUESTION_KEYS):
        value = _get(rec, k)
        if isinstance(value, list) and value and isinstance(value[0], dict):
            return [{"role": str(m.get("role", "user")), "content": str(m.get("content", ""))} for m in value]
        if isinstance(value, str):
            return [{"role": "user", "content": value}]
    return None


def find_answer(rec: Dict[str, Any], key: Optional[str]) -> Optional[str]:
    from rollout.rewards.math import extract_boxed

    for k in ([key] if key else ANSWER_KEYS):
        value = _get(rec, k)
        if value is not None:
            return str(value)
    solution = None if key else _get(rec, "solution")
    return extract_boxed(solution) if isinstance(solution, str) else None


def strip_phrase(prompt: List[Dict[str, str]], phrase: Optional[str]) -> List[Dict[str, str]]:
    if not phrase:
        return prompt
    return [dict(m, content=m["content"].replace(phrase, "").strip()) for m in prompt]


def convert(records: Iterable[Dict[str, Any]], where: str, *, prompt_key: Optional[str] = None,
            answer_key: Optional[str] = None, strip: Optional[str] = None,
            skip_unlabeled: bool = False) -> Tuple[List[Dict[str, Any]], int]:
    """(converted records, number skipped) of one input file."""
    out, skipped = [], 0
    for i, rec in enumerate(records):
        prompt, answer = find_prompt(rec, prompt_key), find_answer(rec, answer_key)
        if prompt is None or answer is None:
            if skip_unlabeled:
                skipped += 1
                continue
            what = "question" if prompt is None else "answer"
            raise SystemExit(f"{where}: record {i} has no {what} (fields: {sorted(rec)}); "
                             f"name it with --{'prompt' if prompt is None else 'answer'}-key or --skip-unlabeled")
        row = {"prompt": strip_phrase(prompt, strip), "answer": answer}
        row.update({k: rec[k] for k in KEEP_KEYS if k in rec and rec[k] is not None})
        out.append(row)
    return out, skipped


def write(records: List[Dict[str, Any]], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    elif path.endswith(".jsonl"):
        with open(path, "w") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    else:
        raise SystemExit(f"--out {path}: use a .parquet or .jsonl name")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", help="files or folders (.parquet, .jsonl, .json)")
    ap.add_argument("--out", required=True, help="output .parquet or .jsonl")
    ap.add_argument("--prompt-key", help="(dotted) field of the question, instead of the detection")
    ap.add_argument("--answer-key", help="(dotted) field of the answer, instead of the detection")
    ap.add_argument("--strip", help="phrase removed from the prompt text")
    ap.add_argument("--skip-unlabeled", action="store_true", help="drop records without question or answer")
    args = ap.parse_args(argv)
    rows: List[Dict[str, Any]] = []
    for path in input_files(args.inputs):
        got, skipped = convert(read_any(path), path, prompt_key=args.prompt_key, answer_key=args.answer_key,
                               strip=args.strip, skip_unlabeled=args.skip_unlabeled)
        print(f"{path}: {len(got)} records" + (f" ({skipped} without question or answer skipped)" if skipped else ""))
        rows += got
    if not rows:
        raise SystemExit("no record converted")
    write(rows, args.out)
    print(f"wrote {len(rows)} records to {args.out} (rollout.data.prompt_key=prompt, label_key=answer)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
