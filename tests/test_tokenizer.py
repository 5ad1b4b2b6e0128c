"""Byte-level BPE: exact round trips on any Unicode, vocabulary size, errors, save/load, the CLI."""

from __future__ import annotations

import json
import random

import pytest

from qtg.cli import main
from qtg.data.tokenizer import (
    EOS_TOKEN,
    decode,
    encode,
    load_tokenizer,
    save_tokenizer,
    token_strings,
    tokenizer_fingerprint,
    train_tokenizer,
)
from qtg.errors import ConfigError, DataError
from tests.conftest import run_qtg

NASTY = [
    "",
    " ",
    "   ",
    "\n",
    "\n\n\n",
    "  leading and trailing  ",
    "tabs\tand\r\nCRLF\rCR",
    "multiple    spaces   inside",
    "\x00\x01\x07\x1b[31m\x7f control",
    "caf\u00e9 vs cafe\u0301 (NFC vs NFD must both survive)",
    "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319 zalgo",
    "漢字かなカナ한국어",
    "emoji 🤖🎭 family 👨\u200d👩\u200d👧\u200d👦 flag 🇬🇧 skin 👍🏽",
    "\ufeffBOM at start",
    "RTL \u202eevil\u202c text עברית العربية",
    "line\u2028separator\u2029paragraph",
    "\U0010ffff\U000e0001 max and tag code points",
    "\ufffd replacement char and \uffff noncharacter",
    EOS_TOKEN,
    f"text{EOS_TOKEN}more text {EOS_TOKEN}",
    "<|endoftext",  # a prefix of the special token is plain text
    "'s 're 'll n't -- ... ?! “smart quotes” — em dash",
]

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "th", "ee"]


def generated_text(n_lines: int = 400, seed: int = 0) -> str:
    """Pseudo-words from a few syllables: many frequent pairs, so BPE has plenty to merge."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 3))) for _ in range(300)]
    lines = [" ".join(rng.choices(words, k=rng.randint(3, 12))).capitalize() + "." for _ in range(n_lines)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(generated_text(), 300)


def random_unicode(rng: random.Random, length: int) -> str:
    """Random code points from the whole range, surrogates excluded (not encodable in UTF-8)."""
    out = []
    while len(out) < length:
        cp = rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0xFFFF), rng.randint(0x10000, 0x10FFFF)])
        if not 0xD800 <= cp <= 0xDFFF:
            out.append(chr(cp))
    return "".join(out)


@pytest.mark.parametrize("text", NASTY, ids=range(len(NASTY)))
def test_round_trip_nasty_strings(tok, text):
    assert decode(tok, encode(tok, text)) == text


def test_round_trip_random_code_points(tok):
    rng = random.Random(1234)
    for _ in range(300):
        text = random_unicode(rng, rng.randint(1, 40))
        ids = encode(tok, text)
        assert decode(tok, ids) == text, ascii(text)
        assert all(0 <= i < tok.get_vocab_size() for i in ids)


def test_token_strings_are_one_label_per_token_and_rebuild_the_text(tok):
    text = "Kalo mine rusa.\nTithee vo ka!"
    ids = encode(tok, text)
    labels = token_strings(tok, ids)
    assert len(labels) == len(ids) and "".join(labels) == text
    assert token_strings(tok, [0]) == [EOS_TOKEN]


def test_special_token_is_id_zero_and_a_single_token(tok):
    assert tok.token_to_id(EOS_TOKEN) == 0
    assert encode(tok, f"ka{EOS_TOKEN}lo").count(0) == 1


def test_vocab_size_is_respected():
    text = generated_text()
    for size in (257, 300, 400):
        assert train_tokenizer(text, size).get_vocab_size() == size
    # a tiny text has fewer pairs than asked for: the vocabulary stops short, never exceeds
    assert 257 <= train_tokenizer("abab abab", 1000).get_vocab_size() < 1000


def test_merges_compress_the_training_text(tok):
    text = generated_text(seed=7)  # same syllables, other lines
    assert len(text.encode()) / len(encode(tok, text)) > 1.5


def test_too_small_vocab_is_refused():
    with pytest.raises(ConfigError, match=r"vocab_size 256 is too small.*at least 257"):
        train_tokenizer("some text", 256)
    with pytest.raises(ConfigError, match=r"at least 259 \(256 byte tokens \+ 3 special\)"):
        train_tokenizer("some text", 258, special_tokens=[EOS_TOKEN, "<|a|>", "<|b|>"])


def test_special_tokens_must_include_eos():
    with pytest.raises(ConfigError, match="must include '<\\|endoftext\\|>'"):
        train_tokenizer("some text", 300, special_tokens=["<|pad|>"])


@pytest.mark.parametrize("data", [[], [""], ["", ""], ""], ids=["no-texts", "one-empty", "two-empty", "empty-str"])
def test_empty_data_is_refused(data):
    with pytest.raises(DataError, match="no text to train the tokenizer on"):
        train_tokenizer(data, 300)


def test_trains_from_a_path_and_documents(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text(generated_text())
    from_path = train_tokenizer(f, 300)
    from_text = train_tokenizer(generated_text(), 300)
    assert tokenizer_fingerprint(from_path) == tokenizer_fingerprint(from_text)
    with pytest.raises(DataError, match="data path not found"):
        train_tokenizer(tmp_path / "missing.txt", 300)


def test_save_and_load_give_the_same_tokenizer(tok, tmp_path):
    path = save_tokenizer(tok, tmp_path / "sub" / "tok.json")
    loaded = load_tokenizer(path)
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tok)
    text = "Kalo mine 🤖 " + EOS_TOKEN
    assert encode(loaded, text) == encode(tok, text)


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="tokenizer file not found"):
        load_tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="is not a tokenizer JSON file"):
        load_tokenizer(bad)


# --- the CLI -----------------------------------------------------------------------------------
def test_cli_tokenizer_train_writes_a_tokenizer(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text(generated_text())
    out = tmp_path / "out" / "tok.json"
    r = run_qtg("tokenizer", "train", "--data", str(data), "--vocab-size", "300", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["vocab_size"] == 300 and summary["documents"] == 1
    assert summary["bytes"] == len(data.read_bytes()) and summary["bytes_per_token"] > 1.5
    tok = load_tokenizer(out)
    assert tok.get_vocab_size() == 300
    assert decode(tok, encode(tok, data.read_text())) == data.read_text()


@pytest.mark.parametrize("args, message", [
    (["--vocab-size", "100"], "vocab_size 100 is too small"),
    (["--data", "MISSING"], "data path not found"),
])
def test_cli_tokenizer_errors_are_one_line(tmp_path, capsys, args, message):
    args = [str(tmp_path / "missing") if a == "MISSING" else a for a in args]
    data = tmp_path / "d.txt"
    data.write_text("abc")
    argv = ["tokenizer", "train", "--data", str(data), "--out", str(tmp_path / "t.json"), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qtg tokenizer: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "t.json").exists()


def test_cli_tokenizer_help_teaches(capsys):
    with pytest.raises(SystemExit) as e:
        main(["tokenizer", "train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "byte-level BPE" in text and "examples:" in text and "--vocab-size" in text
