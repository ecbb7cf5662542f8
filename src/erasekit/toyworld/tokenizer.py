"""The real CLIP BPE tokenizer (49408 tokens), rebuilt offline from OpenAI's vocabulary file.

``bpe_simple_vocab_16e6.txt.gz`` ships with OpenAI CLIP and inside the ``open-clip-torch`` wheel
(``open_clip/bpe_simple_vocab_16e6.txt.gz``). ``build_tokenizer_files`` derives from it the
``vocab.json`` + ``merges.txt`` that transformers' ``CLIPTokenizer`` reads, exactly as
``clip/simple_tokenizer.py`` builds its encoder:

* merges = lines 1 .. 49152-256-2 of the file (line 0 is a version header);
* vocab  = the 256 ``bytes_to_unicode`` characters, then each of them + ``</w>``, then every merge
  joined, then ``<|startoftext|>`` and ``<|endoftext|>`` (ids 49406, 49407).

    python -m erasekit.toyworld.tokenizer /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz OUT_DIR

CLIP's code and vocabulary are MIT-licensed (Copyright (c) 2021 OpenAI); the licence text is
written next to the files as ``LICENSE-CLIP.txt``.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

CLIP_LICENSE = """MIT License

Copyright (c) 2021 OpenAI

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""

# Published ids of the original CLIP tokenizer (openai/clip-vit-large-patch14), used as checks.
KNOWN_IDS: dict[str, list[int]] = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
}


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's reversible byte -> printable unicode character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build_vocab(bpe_path: str | Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab.extend("".join(m) for m in merges)
    vocab.extend([BOS, EOS])
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    return {tok: i for i, tok in enumerate(vocab)}, merges  # type: ignore[return-value]


def build_tokenizer_files(bpe_path: str | Path, out_dir: str | Path, model_max_length: int = 77) -> Path:
    """Write ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``
    and ``LICENSE-CLIP.txt`` to ``out_dir`` (a diffusers pipeline's ``tokenizer/`` folder)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    encoder, merges = build_vocab(bpe_path)
    (out / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False), encoding="utf-8")
    # transformers' CLIPTokenizer skips the first line of merges.txt (a version header)
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "LICENSE-CLIP.txt").write_text(CLIP_LICENSE)
    return out


def check_tokenizer(path: str | Path) -> None:
    """Raise if the tokenizer at ``path`` does not reproduce the published CLIP ids."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
    if len(tok) != VOCAB_SIZE:
        raise AssertionError(f"vocabulary has {len(tok)} tokens, expected {VOCAB_SIZE}")
    for text, ids in KNOWN_IDS.items():
        got = tok(text)["input_ids"]
        if got != ids:
            raise AssertionError(f"{text!r} -> {got}, expected {ids}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m erasekit.toyworld.tokenizer BPE_VOCAB_GZ OUT_DIR")
    d = build_tokenizer_files(sys.argv[1], sys.argv[2])
    check_tokenizer(d)
    print(f"wrote {d}", file=sys.stderr)
