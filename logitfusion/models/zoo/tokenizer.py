"""The zoo's tokenizer: a real `tokenizers` WordPiece tokenizer derived deterministically from the world.

Every word the world writes is one token; numbers are split into digits ("1743" -> "1", "##7", "##4", "##3") so
years are multi-token answers and decode back to "1743"; "\\n" is a token (few-shot prompts use it as the example
separator). The tokenizer lower-cases its input, prepends BOS, and is saved with transformers'
``PreTrainedTokenizerFast`` files so ``AutoTokenizer.from_pretrained(dir)`` loads it like any checkpoint's.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from transformers import PreTrainedTokenizerFast

from logitfusion.models.zoo.world import World

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
NEWLINE = "\n"
PUNCTUATION = (".", ",", "?", ":", ";", "!", "'", "-", "(", ")")
DIGITS = tuple("0123456789")


def vocabulary(world: World) -> list[str]:
    """The id -> token list: specials, newline, punctuation, digits, digit continuations, then sorted words."""
    words = sorted(world.words())
    return [*SPECIALS, NEWLINE, *PUNCTUATION, *DIGITS, *(f"##{d}" for d in DIGITS), *words]


def build_tokenizer(world: World) -> Tokenizer:
    """The `tokenizers` tokenizer for ``world`` (pure function of the world's words)."""
    vocab = {tok: i for i, tok in enumerate(vocabulary(world))}
    tok = Tokenizer(WordPiece(vocab, unk_token=UNK, continuing_subword_prefix="##", max_input_chars_per_word=64))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # drop spaces and tabs, keep newlines as their own token
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"\n|[^\s\w]|\d+"), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok.add_special_tokens(list(SPECIALS))
    return tok


def hf_tokenizer(world: World) -> PreTrainedTokenizerFast:
    """The transformers wrapper with BOS/EOS/PAD/UNK declared."""
    return PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(world),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        model_max_length=256,
    )


def save_tokenizer(world: World, out_dir: str | Path) -> None:
    """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json into ``out_dir``."""
    hf_tokenizer(world).save_pretrained(str(out_dir))
