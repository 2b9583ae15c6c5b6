"""Train the small SentencePiece tokenizer shipped with the demo models.

Run once; the result is committed as job/udquant/data/demo-tokenizer.model so the demo
and the tests make identical models offline. Usage: python scripts/train-demo-tokenizer.py
"""

import io
import pydoc
from pathlib import Path

import sentencepiece as spm

MODULES = ["json", "pathlib", "argparse", "collections", "itertools", "functools", "re",
           "subprocess", "typing", "dataclasses", "logging", "os", "string", "textwrap"]


def main() -> None:
    out = Path(__file__).resolve().parent.parent / "job/udquant/data/demo-tokenizer"
    text = "\n".join(pydoc.plain(pydoc.render_doc(name)) for name in MODULES)
    sentences = [line.strip() for line in text.splitlines() if len(line.strip()) > 20]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=1024,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, num_threads=1,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
    )
    out.with_suffix(".model").write_bytes(model.getvalue())


if __name__ == "__main__":
    main()
