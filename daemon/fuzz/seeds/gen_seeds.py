#!/usr/bin/env python3
"""Writes the seed inputs of the model_header fuzz target: small GGUF headers (no tensors) with
an architecture's shape keys and a complete tokenizer (byte-level BPE and SentencePiece-style) and
a chat template, so the fuzzer starts from inputs that reach the tokenizer and template code.

    . ~/.cache/halo-refstack/bin/activate    # needs gguf (gguf-py)
    python daemon/fuzz/seeds/gen_seeds.py
"""
import os

import gguf

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_header")

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_level_alphabet():
    """GPT-2's printable stand-ins for the 256 byte values."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


def shape(w, arch):
    w.add_uint32(f"{arch}.context_length", 128)
    w.add_uint32(f"{arch}.embedding_length", 64)
    w.add_uint32(f"{arch}.block_count", 2)
    w.add_uint32(f"{arch}.feed_forward_length", 128)
    w.add_uint32(f"{arch}.attention.head_count", 4)
    w.add_uint32(f"{arch}.attention.head_count_kv", 2)
    w.add_uint32(f"{arch}.vocab_size", 300)


def bpe(path, arch, pre):
    w = gguf.GGUFWriter(path, arch)
    shape(w, arch)
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + byte_level_alphabet()
    tokens += ["he", "ll", "hell", "hello", "Ġh", "Ġw", "Ġwo", "Ġwor", "ld"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(["h e", "l l", "he ll", "hell o", "Ġ h", "Ġ w", "Ġw o", "Ġwo r", "l d"])
    w.add_eos_token_id(2)
    w.add_bos_token_id(0)
    w.add_chat_template(TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()


def spm(path, arch):
    w = gguf.GGUFWriter(path, arch)
    shape(w, arch)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += ["▁", "▁h", "▁he", "▁hello", "ll", "o", "h", "e", "l", "▁w", "or", "ld"]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()


def main():
    os.makedirs(HERE, exist_ok=True)
    bpe(os.path.join(HERE, "qwen3-bpe.gguf"), "qwen3", "qwen2")
    bpe(os.path.join(HERE, "llama-bpe.gguf"), "llama", "llama-bpe")
    bpe(os.path.join(HERE, "glm4-bpe.gguf"), "glm4", "glm4")
    spm(os.path.join(HERE, "gemma3-spm.gguf"), "gemma3")
    for f in sorted(os.listdir(HERE)):
        print(f, os.path.getsize(os.path.join(HERE, f)))


if __name__ == "__main__":
    main()
