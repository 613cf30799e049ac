"""Documents of the `inhernet_text` lm-eval task: a local .txt (one document) or .jsonl file (a "text" field per
line, and optionally "tokens")."""

import json
import re
from pathlib import Path


def load(path=None, **metadata):
    """{"test": Dataset} of the documents in `path` (given with lm-eval's `--metadata '{"path": ...}'`)."""
    from datasets import Dataset, DatasetDict

    if path is None:
        raise ValueError("inhernet_text needs the documents' location: --metadata '{\"path\": \"docs.jsonl\"}' "
                         "(a .txt file is one document; a .jsonl file has one {\"text\": ...} per line).")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"inhernet_text: {file} is not a file.")
    if file.suffix == ".jsonl":
        rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        bad = [i for i, row in enumerate(rows) if not isinstance(row.get("text"), str)]
        if bad:
            raise ValueError(f"inhernet_text: lines {bad[:5]} of {file} have no string \"text\" field.")
    else:
        rows = [{"text": file.read_text(encoding="utf-8")}]
    tokens = [row.get("tokens", 0) for row in rows]
    return DatasetDict({"test": Dataset.from_dict({"text": [row["text"] for row in rows], "tokens": tokens})})


def process_results(doc, results):
    """Per-document (log-likelihood, count) pairs; lm-eval's weighted_perplexity turns them into exp(-Σll / Σcount).
    Words are counted as lm-eval's wikitext task counts them."""
    (loglikelihood,) = results
    n_bytes = len(doc["text"].encode("utf-8"))
    out = {"word_perplexity": (loglikelihood, len(re.split(r"\s+", doc["text"]))),
           "byte_perplexity": (loglikelihood, n_bytes), "bits_per_byte": (loglikelihood, n_bytes)}
    out["token_perplexity"] = (loglikelihood, doc["tokens"] or float("nan"))
    return out
