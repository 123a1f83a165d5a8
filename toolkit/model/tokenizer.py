"""The real CLIP BPE tokenizer, built offline from the vocabulary that ships in `open_clip_torch`.

Converted the way OpenAI's CLIP does it (256 byte tokens, their `</w>` forms, the first 48894
merges, then the two special tokens), the ids equal those of openai/clip-vit-large-patch14,
which is what SD 1.5's tokenizer is.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from lftk.errors import NotAvailableError

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # OpenAI CLIP: vocab 49408 = 512 byte tokens + merges + 2 specials
SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def find_bpe_vocab() -> Path:
    """Locate the gzipped BPE file inside the installed open_clip package (not imported: it needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / VOCAB_FILE
        if path.is_file():
            return path
    raise NotAvailableError(
        f"CLIP vocabulary {VOCAB_FILE} not found: install it with "
        "`pip install --no-deps open_clip_torch` (only its data file is used)"
    )


def _bytes_to_unicode() -> list[str]:
    # GPT-2/CLIP byte-level mapping: printable bytes map to themselves, the rest to 256+.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def write_tokenizer_files(out_dir: Path, bpe_path: Path | None = None) -> Path:
    """Write vocab.json + merges.txt (+ special-token config) that `CLIPTokenizer.from_pretrained` reads."""
    bpe_path = bpe_path or find_bpe_vocab()
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    byte_tokens = _bytes_to_unicode()
    vocab_list = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m) for m in merges] + list(SPECIALS)
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    config = {
        "model_max_length": 77,
        "bos_token": SPECIALS[0],
        "eos_token": SPECIALS[1],
        "unk_token": SPECIALS[1],
        "pad_token": SPECIALS[1],
        "do_lower_case": True,
        "tokenizer_class": "CLIPTokenizer",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def build_clip_tokenizer(out_dir: Path, bpe_path: Path | None = None):
    from transformers import CLIPTokenizer

    write_tokenizer_files(out_dir, bpe_path)
    return CLIPTokenizer.from_pretrained(str(out_dir))
