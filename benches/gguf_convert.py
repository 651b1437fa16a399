"""Convert a benchmark checkpoint to GGUF with llama.cpp's own convert_hf_to_gguf.py.

The converter identifies a BPE tokenizer's pre-tokenizer by hashing its output on a test text and
refuses vocabularies it has not seen. The benchmark checkpoints carry the test fixtures' small BPE,
whose pre-tokenizer is plain GPT-2 byte-level (tokenizer.json: ByteLevel, use_regex true), which is
llama.cpp's `gpt-2` pre-tokenizer: this wrapper answers that for such a tokenizer, and refuses any
other unknown one. Everything else is the converter's own code.

    python gguf_convert.py <llama.cpp dir> <checkpoint> <out.gguf> [outtype]
"""

import json
import sys
from pathlib import Path

llama_cpp, ckpt, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
outtype = sys.argv[4] if len(sys.argv) > 4 else "f32"
sys.path.insert(0, str(llama_cpp))
sys.path.insert(1, str(llama_cpp / "gguf-py"))
from conversion import base  # noqa: E402

pre = json.loads((ckpt / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
original = base.TextModel.get_vocab_base_pre


def vocab_base_pre(self, tokenizer):
    try:
        return original(self, tokenizer)
    except NotImplementedError:
        if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
            return "gpt-2"
        raise


base.TextModel.get_vocab_base_pre = vocab_base_pre
sys.argv = ["convert_hf_to_gguf.py", str(ckpt), "--outtype", outtype, "--outfile", str(out)]
import runpy  # noqa: E402

runpy.run_path(str(llama_cpp / "convert_hf_to_gguf.py"), run_name="__main__")
