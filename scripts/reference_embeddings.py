"""Reference embeddings from the model's reference implementation.

sentence-transformers over transformers' Gemma-3, float32 on CPU, one input per call (no
padding). Run it through `scripts/reference-embeddings`, which builds the pinned venv and
prepares the models; it writes

- the EmbeddingGemma-300M file (``--gemma DIR --gemma-out FILE``): ~40 texts of 3 to 2048
  tokens, with and without the model's prompts pasted in, around the 257- and 512-token
  boundaries, and in several scripts;
- the tiny test model file (``--tiny DIR --tiny-out FILE``): token-id inputs of 1 to 60
  tokens fed to the module stack directly, not through a tokenizer.

"Tokens" counts the ids the tokenizer produces including the <bos> … <eos> it adds.
The long texts are cut from the npm `sentiment` fixtures (``--data DIR``,
`scripts/fetch-data`), in file order, so regeneration is deterministic.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import sentence_transformers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

# The prompts of the model dir's config_sentence_transformers.json ("query", "document").
QUERY = "task: search result | query: "
DOCUMENT = "title: none | text: "
MAX_TOKENS = 2048  # EmbeddingGemma's max_position_embeddings

# (kind, text) of the short inputs; an input is named kind-tokens.
SHORT_TEXTS = [
    ("word", "Hello"),
    ("text", "Wow... Loved this place."),
    ("text", "The potatoes were like rubber and you could tell they had been made up "
             "ahead of time being kept under a warmer."),
    ("query-prompt", QUERY + "What is the capital of France?"),
    ("query-prompt", QUERY + "how to reset a forgotten router password"),
    ("query-prompt", QUERY + "Прогноз погоды на завтра в Москве"),
    ("document-prompt", DOCUMENT + "Paris is the capital and most populous city of France."),
    ("document-prompt", DOCUMENT + "The selection on the menu was great and so were the "
                                   "prices. Service was very prompt."),
    ("document-prompt", DOCUMENT + "東京は日本の首都であり、世界有数の大都市です。"),
    ("accents", "Crème brûlée, piñata, façade, naïve coöperation: São Paulo, Zürich, "
                "Ångström, œuvre, Dvořák, Łódź."),
    ("cjk-zh", "今天天气很好，我们去公园散步吧。"),
    ("cjk-ja", "吾輩は猫である。名前はまだ無い。"),
    ("cjk-ko", "안녕하세요, 만나서 반갑습니다. 오늘 날씨가 정말 좋네요."),
    ("emoji", "Great food 🍕🍔, terrible service 😡👎 — would not return! 🚫✨"),
    ("cyrillic", "Съешь же ещё этих мягких французских булок, да выпей чаю."),
    ("mixed-scripts", "Καλημέρα κόσμε · مرحبا بالعالم · नमस्ते दुनिया · שלום עולם · "
                      "Hello, world"),
    ("whitespace", "  leading and trailing spaces,\n\nblank lines\tand tabs  "),
]

# (kind, prompt, tokens) of the texts cut from the fixtures' prose, word by word.
LONG_TEXTS = (
    [("text", "", n) for n in (255, 256, 257, 258, 260, 297)]
    + [("text", "", n) for n in (510, 511, 512, 513, 520, 585)]
    + [("text", "", n) for n in (1024, 1500, MAX_TOKENS)]
    + [("query-prompt", QUERY, 257), ("document-prompt", DOCUMENT, 258),
       ("document-prompt", DOCUMENT, 513), ("query-prompt", QUERY, 1024),
       ("document-prompt", DOCUMENT, MAX_TOKENS)]
)
MULTILINGUAL_TOKENS = 300  # non-ASCII beyond the 257-token window, cut character by character
MULTILINGUAL_OPENING = "Deutsch: Grüße aus Köln, die Straße ist schön. "
NON_ASCII = ("accents", "cjk-zh", "cjk-ja", "cjk-ko", "emoji", "cyrillic", "mixed-scripts")

TINY_LENGTHS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 24, 32, 40, 48, 60]
TINY_SEED = 20240607  # the PRNG that draws the tiny model's token ids


def sha256(path: Path) -> str:
    """The hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load(model_dir: Path) -> SentenceTransformer:
    """The model on CPU in float32, with 2048-token inputs allowed."""
    model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    model = model.to(torch.float32).eval()
    model.max_seq_length = MAX_TOKENS
    dtypes = {p.dtype for p in model.parameters()}
    assert dtypes == {torch.float32}, dtypes
    return model


def token_ids(model: SentenceTransformer, text: str) -> list[int]:
    """The ids sentence-transformers feeds the model for `text` (with <bos>/<eos>)."""
    return model.preprocess([text])["input_ids"][0].tolist()


def count(model: SentenceTransformer, text: str) -> int:
    """The untruncated token count of `text` (fast path of `token_ids`, same tokenizer)."""
    return len(model.tokenizer(text, truncation=False, verbose=False)["input_ids"])


def cut(model: SentenceTransformer, prefix: str, units: list[str], start: int, target: int):
    """`prefix + "".join(units[start:start + k])` of exactly `target` tokens, not ending in
    whitespace, and k; None if no k gives that (a unit that adds several tokens jumps over it).

    The count grows with k (up to a merge across the last unit boundary), so a doubling then
    binary search finds the first k that reaches `target`; it and its neighbours are checked
    for an exact hit."""
    def text(k: int) -> str:
        return prefix + "".join(units[start:start + k]).lstrip()

    lo, hi, end = 0, 1, len(units) - start
    while count(model, text(hi)) < target:  # hi: some k that reaches target
        if hi == end:
            raise ValueError(f"not enough prose for {target} tokens")
        lo, hi = hi, min(2 * hi, end)
    while lo < hi:
        mid = (lo + hi) // 2
        if count(model, text(mid)) < target:
            lo = mid + 1
        else:
            hi = mid
    for k in range(max(1, lo - 2), lo + 3):
        if count(model, text(k)) == target and not text(k)[-1].isspace():
            return text(k), k
    return None


def prose_words(data_dir: Path) -> list[str]:
    """The sentiment fixtures' sentences (imdb, yelp, amazon, in file order) as " word" units."""
    words = []
    for name in ("imdb", "yelp", "amazon"):
        for item in json.loads((data_dir / f"{name}.json").read_text()):
            words += [" " + w for w in item["text"].split()]
    return words


def gemma_texts(model: SentenceTransformer, data_dir: Path) -> list[tuple[str, str]]:
    """(kind, text) of every EmbeddingGemma input. Each long text starts where the previous
    one ended, so no input is a prefix of another."""
    texts = list(SHORT_TEXTS)
    words, cursor = prose_words(data_dir), 0
    for kind, prompt, target in LONG_TEXTS:
        while (found := cut(model, prompt, words, cursor, target)) is None:
            cursor += 1
        texts.append((kind, found[0]))
        cursor += found[1]
    # an opening of its own (so no other input is a prefix), then the non-ASCII short texts,
    # cycled, cut character by character
    scripts = " ".join(t for k, t in SHORT_TEXTS if k in NON_ASCII)
    chars = list(" ".join([scripts] * 3))
    found = cut(model, MULTILINGUAL_OPENING, chars, 0, MULTILINGUAL_TOKENS)
    assert found is not None, "no multilingual text of the wanted length"
    texts.append(("multilingual", found[0]))
    return texts


def floats(vector: np.ndarray) -> list[float]:
    """A float32 vector as exact Python floats, after checking it is finite."""
    assert vector.dtype == np.float32 and np.isfinite(vector).all()
    return [float(x) for x in vector]


def reference_block() -> dict:
    """Which implementation and versions computed the vectors."""
    return {
        "implementation": "sentence-transformers",
        "sentence_transformers": sentence_transformers.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__.split("+")[0],
        "dtype": "float32",
        "device": "cpu",
        "generated_by": "scripts/reference-embeddings",
    }


def model_block(name: str, model_dir: Path) -> dict:
    """The model's name and the hashes of its config and weights."""
    return {
        "name": name,
        "config_sha256": sha256(model_dir / "config.json"),
        "weights_sha256": sha256(model_dir / "model.safetensors"),
    }


def describe(label: str, model: SentenceTransformer) -> None:
    """Prints the attention settings transformers derived from the model's config."""
    config = model[0].auto_model.config
    print(f"{label}: sliding_window={config.sliding_window} "
          f"use_bidirectional_attention={config.use_bidirectional_attention} "
          f"attn_implementation={config._attn_implementation}", file=sys.stderr)


def gemma_reference(model_dir: Path, data_dir: Path) -> dict:
    """EmbeddingGemma-300M's reference embeddings of `gemma_texts`, one `encode` per text."""
    model = load(model_dir)
    describe("embeddinggemma", model)
    inputs, names = [], set()
    for kind, text in gemma_texts(model, data_dir):
        ids = token_ids(model, text)
        assert len(ids) == count(model, text) <= MAX_TOKENS, f"{kind}: truncated"
        name, n = f"{kind}-{len(ids)}", 1
        while name in names:  # two texts of one kind and length: query-prompt-16, -16-2
            n += 1
            name = f"{kind}-{len(ids)}-{n}"
        names.add(name)
        embedding = model.encode(text, convert_to_numpy=True, normalize_embeddings=False)
        inputs.append({"name": name, "text": text, "token_ids": ids, "tokens": len(ids),
                       "embedding": floats(embedding)})
        print(f"  {name:<22} {len(ids):>5} tokens  norm {np.linalg.norm(embedding):.7f}",
              file=sys.stderr)
    return {"reference": reference_block(), "model": model_block("embeddinggemma-300m", model_dir),
            "inputs": inputs}


def tiny_reference(model_dir: Path) -> dict:
    """The tiny model's reference embeddings of token-id inputs (ordinary vocabulary ids
    drawn by a fixed-seed PRNG; the special ids 0..3 are skipped), through the module stack."""
    model = load(model_dir)
    describe("tiny-model", model)
    vocab = json.loads((model_dir / "tokenizer.json").read_text())
    special = {t["id"] for t in vocab.get("added_tokens", []) if t.get("special")}
    assert special == {0, 1, 2, 3}, f"special ids {sorted(special)}"
    vocab_size = model[0].auto_model.config.vocab_size
    assert len(vocab["model"]["vocab"]) == vocab_size, "tokenizer and config disagree"
    rng = random.Random(TINY_SEED)
    inputs = []
    for n in TINY_LENGTHS:
        ids = [rng.randrange(4, vocab_size) for _ in range(n)]
        features = {"input_ids": torch.tensor([ids]),
                    "attention_mask": torch.ones(1, n, dtype=torch.long)}
        with torch.inference_mode():
            embedding = model(features)["sentence_embedding"][0].numpy()
        inputs.append({"name": f"ids-{n}", "token_ids": ids, "tokens": n,
                       "embedding": floats(embedding)})
        print(f"  ids-{n:<4} norm {np.linalg.norm(embedding):.7f}", file=sys.stderr)
    return {"reference": reference_block(),
            "model": model_block("attncache tiny-model --seed 7", model_dir), "inputs": inputs}


def write(path: Path, doc: dict) -> None:
    """Writes `doc` as JSON with one line per field of each input, so diffs stay readable."""
    def line(value) -> str:
        return json.dumps(value, ensure_ascii=False)

    rows = []
    for item in doc["inputs"]:
        fields = ",\n     ".join(f"{line(k)}: {line(v)}" for k, v in item.items())
        rows.append("    {" + fields + "}")
    text = ("{\n"
            f'  "reference": {line(doc["reference"])},\n'
            f'  "model": {line(doc["model"])},\n'
            '  "inputs": [\n' + ",\n".join(rows) + "\n  ]\n}\n")
    assert json.loads(text) == doc
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path} ({len(doc['inputs'])} inputs)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gemma", type=Path, metavar="DIR", help="EmbeddingGemma-300M model dir")
    p.add_argument("--gemma-out", type=Path, metavar="FILE",
                   default=Path("benches/reference/embeddinggemma.json"))
    p.add_argument("--data", type=Path, metavar="DIR",
                   default=Path.home() / ".cache/attncache/data/sentiment",
                   help="the sentiment fixtures (scripts/fetch-data)")
    p.add_argument("--tiny", type=Path, metavar="DIR", help="a tiny model written with seed 7")
    p.add_argument("--tiny-out", type=Path, metavar="FILE",
                   default=Path("integration/tests/reference/tiny-model.json"))
    args = p.parse_args(argv)
    if not args.gemma and not args.tiny:
        p.error("nothing to do: give --gemma and/or --tiny")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    if args.tiny:
        write(args.tiny_out, tiny_reference(args.tiny))
    if args.gemma:
        write(args.gemma_out, gemma_reference(args.gemma, args.data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
