#!/usr/bin/env python3
"""Write a tiny random-weight LLaMA-architecture model as a GGUF file, for tests against llama-server.

Usage: make-tiny-gguf.py OUT.gguf

The model is useless as a language model (its weights are random) but it is a valid, complete LLaMA
for llama.cpp: 2 layers, embedding 64, 4 heads, a 2048-token context and f32 tensors (~0.5 MB), so it
loads in well under a second and generates hundreds of tokens per second on 2 CPU cores. Everything
is deterministic (fixed seed), so the same file comes out on every run.

The tokenizer is a SentencePiece-style ("llama") vocabulary built here, without any download:
  * <unk>, <s>, </s> (ids 0, 1, 2) and the ChatML markers <|im_start|>, <|im_end|> as control tokens;
  * the 256 byte-fallback tokens <0x00>..<0xFF>, so any text can be encoded;
  * every printable ASCII character, and "▁" (SentencePiece's space), as single-character pieces;
  * all prefixes of a few hundred common English words, with and without a leading "▁", so ordinary
    English text takes about one token per word (SPM merges only through pieces that exist).
A ChatML chat template (tokenizer.chat_template) makes /v1/chat/completions work.
"""

from __future__ import annotations

import sys

import gguf
import numpy as np

SEED = 1234
N_LAYER = 2
N_EMBD = 64
N_HEAD = 4
N_FF = 128
N_CTX = 2048
HEAD_DIM = N_EMBD // N_HEAD

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Common English words (and a few from the test prompts); all their prefixes become pieces.
WORD_TEXT = """
the of and to in is was for that on as with by at from his her it an are were which be this has
had not but or have they one their all been who more when there can she would new also will its
up after other what about into out only time first two some over may very like just than then
year years you your we our us me my he him them these those most many such made where much each
how here any because could should does did do said say says use used using work world day way
people make know take see come think look want give good well back even now long great little
own old right big high small large next early young important few public same able last never
under while through before between both life being during without again place around
however home water number part against end government still find line program city
question answer hello assistant user system message model token tokens cache prompt prefix test
request response gateway payment price pay call api server client chat completion stream usage
cost per quick brown fox jumps lazy dog lorem ipsum dolor sit amet consectetur adipiscing
elit sed eiusmod tempor incididunt labore dolore magna aliqua enim minim veniam quis nostrud
exercitation ullamco laboris nisi aliquip commodo consequat please tell short story
write explain why three four five six seven eight nine ten
"""


def build_vocab() -> tuple[list[str], list[float], list[int]]:
    """Token pieces, their SPM merge scores (higher merges first) and their token types."""
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    seen: set[str] = set()

    def add(piece: str, score: float, kind: gguf.TokenType) -> None:
        if piece in seen:
            return
        seen.add(piece)
        tokens.append(piece)
        scores.append(score)
        types.append(int(kind))

    add("<unk>", 0.0, gguf.TokenType.UNKNOWN)  # id 0
    add("<s>", 0.0, gguf.TokenType.CONTROL)  # id 1: bos
    add("</s>", 0.0, gguf.TokenType.CONTROL)  # id 2: eos
    add("<|im_start|>", 0.0, gguf.TokenType.CONTROL)  # id 3: ChatML turn start
    add("<|im_end|>", 0.0, gguf.TokenType.CONTROL)  # id 4: ChatML turn end (end of generation)
    for b in range(256):  # byte fallback for anything not covered by a piece (e.g. "\n", UTF-8)
        add(f"<0x{b:02X}>", 0.0, gguf.TokenType.BYTE)
    # Single characters: low score, so longer pieces win when SPM picks which neighbours to merge.
    add("\u2581", -1000.0, gguf.TokenType.NORMAL)
    for c in range(0x21, 0x7F):
        add(chr(c), -1000.0, gguf.TokenType.NORMAL)
    # Word prefixes, with and without a leading space (a word at the start of a line has none); longer
    # pieces score higher, so "▁hello" is preferred over "▁hel" + "lo".
    for word in WORD_TEXT.split():
        for piece in ("\u2581" + word, word):
            for n in range(2, len(piece) + 1):
                add(piece[:n], float(n), gguf.TokenType.NORMAL)
    return tokens, scores, types


def main(out: str) -> None:
    rng = np.random.default_rng(SEED)
    tokens, scores, types = build_vocab()
    n_vocab = len(tokens)

    w = gguf.GGUFWriter(out, "llama")
    w.add_name("tollway-tiny-random")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    # Hyperparameters (stored under the "llama." prefix).
    w.add_vocab_size(n_vocab)
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    # Tokenizer.
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    w.add_chat_template(CHATML)

    def rand(*shape: int, scale: float = 0.1) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    ones = np.ones(N_EMBD, dtype=np.float32)
    # numpy shapes are (rows, cols) = (out, in); gguf stores them reversed, as ggml expects.
    w.add_tensor("token_embd.weight", rand(n_vocab, N_EMBD, scale=1.0))
    for i in range(N_LAYER):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.attn_q.weight", rand(N_EMBD, N_EMBD))
        w.add_tensor(f"blk.{i}.attn_k.weight", rand(N_EMBD, N_EMBD))
        w.add_tensor(f"blk.{i}.attn_v.weight", rand(N_EMBD, N_EMBD))
        w.add_tensor(f"blk.{i}.attn_output.weight", rand(N_EMBD, N_EMBD))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.ffn_gate.weight", rand(N_FF, N_EMBD))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rand(N_FF, N_EMBD))
        w.add_tensor(f"blk.{i}.ffn_down.weight", rand(N_EMBD, N_FF))
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", rand(n_vocab, N_EMBD))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT.gguf")
    main(sys.argv[1])
