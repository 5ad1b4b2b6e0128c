"""Data pipeline: loading, whole-document splits, the token cache, windows and exact resumption."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import re

import numpy as np
import pytest
import torch

from qtg.data import pipeline as qdata
from qtg.data.pipeline import (
    Document,
    WindowLoader,
    default_corpus_path,
    load_documents,
    make_split,
    prepare_data,
    split_documents,
    tokenize_documents,
)
from qtg.data.tokenizer import EOS_TOKEN, decode, train_tokenizer
from qtg.errors import ConfigError, DataError

WORDS = "the king doth wake tonight and takes his rouse keeps wassail swaggering upspring reels".split()


def text_of(seed: int, n_words: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n_words)) + "\n"


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([text_of(s, 400) for s in range(5)], 300)


@pytest.fixture(scope="module")
def tok_other():
    return train_tokenizer([text_of(s, 400) for s in range(5)], 280)


@pytest.fixture
def corpus(tmp_path):
    """A folder of 6 works of different sizes, one gzipped, plus things to skip."""
    root = tmp_path / "corpus"
    root.mkdir()
    for i, n in enumerate([300, 120, 800, 50, 400]):
        (root / f"work{i}.txt").write_text(text_of(i, n))
    (root / "work5.txt.gz").write_bytes(gzip.compress(text_of(5, 200).encode()))
    (root / "README.md").write_text("not data")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "skip.txt").write_text("hidden")
    return root


@pytest.fixture
def count_encodes(monkeypatch):
    """Counts calls of the one function that turns text into ids."""
    calls = []
    real = qdata._encode_texts

    def counting(tokenizer, texts):
        calls.append(len(texts))
        return real(tokenizer, texts)

    monkeypatch.setattr(qdata, "_encode_texts", counting)
    return calls


# --- loading -----------------------------------------------------------------------------------
def test_load_directory_reads_txt_and_gz_and_skips_the_rest(corpus):
    docs = load_documents(corpus)
    assert [d.name for d in docs] == [f"work{i}" for i in range(6)]
    assert docs[5].text == text_of(5, 200)  # decompressed
    assert docs[0].text == (corpus / "work0.txt").read_text()


def test_load_nested_directory_names_by_relative_path(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.txt").write_text("x")
    (tmp_path / "y.txt").write_text("y")
    assert [d.name for d in load_documents(tmp_path)] == ["a/b/x", "y"]


def test_load_single_file_keeps_bytes_exactly(tmp_path):
    f = tmp_path / "one.txt"
    f.write_bytes("a\r\nb\u2028c 🤖\n".encode())
    [doc] = load_documents(f)
    assert doc.name == "one" and doc.text == "a\r\nb\u2028c 🤖\n" and doc.n_bytes == len(f.read_bytes())


def test_load_jsonl(tmp_path):
    f = tmp_path / "recs.jsonl"
    lines = [json.dumps({"text": "first\u2028record", "name": "intro"}), "", json.dumps({"text": "second"}),
             json.dumps({"text": "", "name": "empty"}), json.dumps({"text": "third 🤖", "meta": 1})]
    f.write_text("\n".join(lines) + "\n")
    docs = load_documents(f)
    assert [(d.name, d.text) for d in docs] == [("intro", "first\u2028record"), ("recs:3", "second"),
                                                ("recs:5", "third 🤖")]


def test_malformed_jsonl_names_the_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n\n{"text": "broken\n{"text": "ok"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON line"):
        load_documents(f)
    f.write_text('{"text": "ok"}\n["not", "an", "object"]\n')
    with pytest.raises(DataError, match=r'bad\.jsonl:2: expected an object with a string "text" field, got list'):
        load_documents(f)
    f.write_text('{"body": "no text field"}\n')
    with pytest.raises(DataError, match=r'bad\.jsonl:1: expected an object with a string "text"'):
        load_documents(f)


def test_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="data path not found: .*nowhere"):
        load_documents(tmp_path / "nowhere")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no text in .*empty.txt: every document is empty"):
        load_documents(tmp_path / "empty.txt")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.md").write_text("x")
    with pytest.raises(DataError, match=r"no data files \(.txt, .txt.gz, .jsonl, .jsonl.gz\) under"):
        load_documents(tmp_path / "d")
    (tmp_path / "d" / "a.txt").write_text("one")
    (tmp_path / "d" / "a.txt.gz").write_bytes(gzip.compress(b"two"))
    with pytest.raises(DataError, match="duplicate document names in .*: a "):
        load_documents(tmp_path / "d")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt is not UTF-8 text \(invalid byte at offset 3\)"):
        load_documents(tmp_path / "latin1.txt")


def test_bundled_corpus_matches_its_provenance():
    root = default_corpus_path()
    files = sorted(root.glob("*.txt.gz"))
    provenance = (root / "PROVENANCE.md").read_text()
    assert len(files) == 39 and sum(f.stat().st_size for f in files) < 3_000_000
    for f in files:
        raw = gzip.decompress(f.read_bytes())
        row = re.search(rf"\| `{re.escape(f.name)}` \| .*? \| ([\d,]+) \| [\d,]+ \| `([0-9a-f]{{64}})` \|", provenance)
        assert row, f"{f.name} missing from PROVENANCE.md"
        assert int(row.group(1).replace(",", "")) == len(raw)
        assert row.group(2) == hashlib.sha256(raw).hexdigest(), f.name
    assert "public domain" in provenance.lower()


# --- splits ------------------------------------------------------------------------------------
def test_split_is_by_whole_documents(corpus):
    docs = load_documents(corpus)
    train, val, test = split_documents(docs, val_fraction=0.3, seed=0)
    assert test == []  # no test fraction, no test split
    assert sorted(train + val, key=lambda d: d.name) == docs  # every document once, text untouched
    assert not {d.name for d in train} & {d.name for d in val}
    total = sum(d.n_bytes for d in docs)
    assert sum(d.n_bytes for d in val) >= 0.3 * total  # the fraction counts bytes


def test_split_is_deterministic_in_the_seed(corpus):
    docs = load_documents(corpus)
    names = lambda split: [d.name for d in split[1]]  # noqa: E731
    first = names(split_documents(docs, val_fraction=0.2, seed=7))
    assert names(split_documents(docs, val_fraction=0.2, seed=7)) == first
    assert names(split_documents(list(reversed(docs)), val_fraction=0.2, seed=7)) == sorted(first, reverse=True)
    others = {tuple(names(split_documents(docs, val_fraction=0.2, seed=s))) for s in range(10)}
    assert len(others) > 1, "the seed does not change the split"


def test_split_by_names_and_its_errors(corpus):
    docs = load_documents(corpus)
    train, val, _ = split_documents(docs, val_names=["work3", "work1"])
    assert [d.name for d in val] == ["work1", "work3"] and len(train) == 4
    with pytest.raises(DataError, match="unknown validation document.*: hamlet; documents include: work0"):
        split_documents(docs, val_names=["hamlet"])
    with pytest.raises(DataError, match="the training split is empty"):
        split_documents(docs, val_names=[d.name for d in docs])
    with pytest.raises(DataError, match=r"the validation split is empty .*val_names=\[\]"):
        split_documents(docs, val_names=[])
    with pytest.raises(DataError, match=r"the training split is empty \(1 document\(s\).*at least 2"):
        split_documents(docs[:1], val_fraction=0.1)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ConfigError, match="val_fraction must be in \\(0, 1\\)"):
            split_documents(docs, val_fraction=bad)


def test_three_way_split_keeps_the_test_works_apart_and_the_old_validation_draw(corpus):
    docs = load_documents(corpus)
    works = split_documents(docs, val_fraction=0.2, test_fraction=0.2, seed=3)
    sets = [{d.name for d in part} for part in works]
    assert all(sets) and not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set().union(*sets) == {d.name for d in docs}
    total = sum(d.n_bytes for d in docs)
    assert sum(d.n_bytes for d in works.test) >= 0.2 * total
    # without a test fraction the validation draw is the one earlier runs used
    two_way = split_documents(docs, val_fraction=0.2, seed=3)
    assert [d.name for d in two_way.test] == []
    # the test works come first in the seeded order, so they are the old two-way validation works
    assert [d.name for d in works.test] == [d.name for d in two_way.val]
    by_name = split_documents(docs, val_names=["work1"], test_names=["work2"])
    assert [d.name for d in by_name.val] == ["work1"] and [d.name for d in by_name.test] == ["work2"]
    with pytest.raises(DataError, match="in both the validation and the test split: work1"):
        split_documents(docs, val_names=["work1"], test_names=["work1"])
    with pytest.raises(ConfigError, match=r"test_fraction must be in \[0, 1\)"):
        split_documents(docs, test_fraction=1.0)


# --- the token cache ---------------------------------------------------------------------------
def test_cache_is_created_then_reused(corpus, tok, tmp_path, count_encodes):
    cache = tmp_path / "cache"
    first = prepare_data(corpus, tok, cache_dir=cache, val_fraction=0.2)
    assert not first.from_cache and count_encodes == [6]
    npy = first.cache_path
    assert npy.parent == cache and npy.suffix == ".npy" and npy.with_suffix(".json").is_file()
    mtime = npy.stat().st_mtime_ns

    second = prepare_data(corpus, tok, cache_dir=cache, val_fraction=0.2)
    assert second.from_cache and count_encodes == [6], "the second load tokenized again"
    assert npy.stat().st_mtime_ns == mtime and second.cache_path == npy
    np.testing.assert_array_equal(second.train.tokens, first.train.tokens)
    np.testing.assert_array_equal(second.val.tokens, first.val.tokens)
    assert isinstance(np.load(npy, mmap_mode="r"), np.memmap)

    # another split of the same data reuses the same cache
    prepare_data(corpus, tok, cache_dir=cache, seed=5)
    assert count_encodes == [6]


def test_cache_is_invalidated_by_data_or_tokenizer(corpus, tok, tok_other, tmp_path, count_encodes):
    cache = tmp_path / "cache"
    base = prepare_data(corpus, tok, cache_dir=cache).cache_path
    (corpus / "work2.txt").write_text(text_of(99, 800))  # same size class, new content
    changed_data = prepare_data(corpus, tok, cache_dir=cache)
    assert not changed_data.from_cache and changed_data.cache_path != base
    changed_tok = prepare_data(corpus, tok_other, cache_dir=cache)
    assert not changed_tok.from_cache and len({base, changed_data.cache_path, changed_tok.cache_path}) == 3
    assert count_encodes == [6, 6, 6]
    assert len(list(cache.glob("tokens-*.npy"))) == 3


def test_a_broken_cache_is_rebuilt(corpus, tok, tmp_path, count_encodes):
    cache = tmp_path / "cache"
    npy = prepare_data(corpus, tok, cache_dir=cache).cache_path
    npy.write_bytes(b"garbage")
    again = prepare_data(corpus, tok, cache_dir=cache)
    assert not again.from_cache and count_encodes == [6, 6]
    assert prepare_data(corpus, tok, cache_dir=cache).from_cache


def test_default_cache_is_next_to_the_data_else_the_user_cache(corpus, tok, tmp_path, monkeypatch):
    assert prepare_data(corpus, tok).cache_path.parent == corpus / ".qtg_cache"
    assert load_documents(corpus)[-1].name == "work5"  # the cache folder is not read as data

    real = qdata._is_writable
    monkeypatch.setattr(qdata, "_is_writable", lambda p: p.name != ".qtg_cache" and real(p))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert prepare_data(corpus, tok).cache_path.parent == tmp_path / "xdg" / "qtg"
    monkeypatch.setattr(qdata, "_is_writable", lambda p: False)
    with pytest.raises(DataError, match="cache folder is not writable: .*mine"):
        prepare_data(corpus, tok, cache_dir=tmp_path / "mine")


def test_no_cache_writes_nothing(corpus, tok):
    out = prepare_data(corpus, tok, use_cache=False)
    assert out.cache_path is None and not (corpus / ".qtg_cache").exists()


# --- split streams -----------------------------------------------------------------------------
def test_split_stream_is_documents_each_followed_by_eos(corpus, tok):
    docs = load_documents(corpus)
    td = tokenize_documents(docs, tok)
    split = make_split("val", td, ["work3", "work1"])
    eos = tok.token_to_id(EOS_TOKEN)
    assert split.tokens[-1] == eos and int((split.tokens == eos).sum()) == 2
    by_name = {d.name: d for d in docs}
    assert decode(tok, split.tokens.tolist()) == by_name["work3"].text + EOS_TOKEN + by_name["work1"].text + EOS_TOKEN
    assert split.n_bytes == by_name["work3"].n_bytes + by_name["work1"].n_bytes
    assert split.n_tokens == len(split.tokens) and split.bytes_per_token == split.n_bytes / split.n_tokens
    assert split.bits_per_byte(math.log(2)) == pytest.approx(split.n_tokens / split.n_bytes)


def test_prepare_data_counts_bytes_per_split(corpus, tok):
    out = prepare_data(corpus, tok, val_names=["work0"], use_cache=False)
    assert out.val.doc_names == ["work0"] and out.val.n_bytes == len((corpus / "work0.txt").read_bytes())
    assert out.train.n_bytes + out.val.n_bytes == sum(d.n_bytes for d in load_documents(corpus))
    assert out.summary()["val"]["documents"] == 1 and out.summary()["train"]["documents"] == 5


# --- windows and batches -----------------------------------------------------------------------
def test_windows_stride_shapes_and_shifted_targets():
    stream = np.arange(100, dtype=np.uint16)
    loader = WindowLoader(stream, seq_len=8, batch_size=3, stride=4, shuffle=False)
    assert loader.n_windows == (100 - 9) // 4 + 1 == 23 and len(loader) == 7
    batches = list(loader)
    assert len(batches) == 7
    x, y = batches[0]
    assert x.shape == y.shape == (3, 8) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[0], torch.arange(0, 8)) and torch.equal(y[0], torch.arange(1, 9))
    assert torch.equal(x[1], torch.arange(4, 12))  # the stride
    assert torch.equal(y[:, :-1], x[:, 1:])
    tail = list(WindowLoader(stream, 8, 3, stride=4, shuffle=False, drop_last=False))
    assert len(tail) == 8 and tail[-1][0].shape == (2, 8) and tail[-1][0][-1, 0] == 22 * 4


def test_default_stride_predicts_each_token_once():
    loader = WindowLoader(np.arange(50), seq_len=7, batch_size=2, shuffle=False, drop_last=False)
    targets = torch.cat([y.flatten() for _, y in loader])
    assert torch.equal(targets, torch.arange(1, 1 + loader.n_windows * 7))


def test_shuffle_is_a_seeded_permutation_per_epoch():
    stream = np.arange(200)

    def epoch_starts(loader):
        return [int(s) for x, _ in loader for s in x[:, 0]]

    a = WindowLoader(stream, 4, 7, seed=1)
    e0, e1 = epoch_starts(a), epoch_starts(a)
    assert sorted(e0) == sorted(e1) == list(range(0, 196, 4))  # every window once per epoch
    assert e0 != e1 and a.epoch == 1
    assert epoch_starts(WindowLoader(stream, 4, 7, seed=1)) == e0
    assert epoch_starts(WindowLoader(stream, 4, 7, seed=2)) != e0


@pytest.mark.parametrize("k", [0, 3, 10, 11, 25])  # 10 batches per epoch: inside, at and past the boundary
def test_resume_gives_exactly_the_batches_of_an_uninterrupted_run(k):
    stream = np.random.default_rng(0).integers(0, 300, 413)
    make = lambda: WindowLoader(stream, seq_len=8, batch_size=4, stride=5, seed=3)  # noqa: E731
    reference = make()
    expected = [reference.next_batch() for _ in range(k + 15)][k:]

    first = make()
    for _ in range(k):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint file
    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.step == k
    got = [resumed.next_batch() for _ in range(15)]
    for (x, y), (ex, ey) in zip(got, expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_resume_inside_a_for_loop():
    stream = np.arange(300)
    full = [x for x, _ in WindowLoader(stream, 6, 4, seed=0)]
    first = WindowLoader(stream, 6, 4, seed=0)
    for i, _ in enumerate(first):
        if i == 4:
            state = first.state_dict()
            break
    resumed = WindowLoader(stream, 6, 4, seed=0)
    resumed.load_state_dict(state)
    rest = [x for x, _ in resumed]
    assert len(rest) == len(full) - 5 and all(torch.equal(a, b) for a, b in zip(rest, full[5:]))


def test_load_state_refuses_another_loader():
    stream = np.arange(300)
    state = WindowLoader(stream, 8, 4).state_dict()
    with pytest.raises(DataError, match="loader state does not match.*seq_len: saved 8, here 16"):
        WindowLoader(stream, 16, 4).load_state_dict(state)
    with pytest.raises(DataError, match="n_windows: saved 37, here 12"):
        WindowLoader(stream[:100], 8, 4).load_state_dict(state)
    with pytest.raises(DataError, match="position out of range: epoch 0, index 99"):
        WindowLoader(stream, 8, 4).load_state_dict({**state, "index": 99})


def test_loader_errors():
    with pytest.raises(DataError, match=r"has 8 tokens, too few for one window of seq_len \+ 1 = 9"):
        WindowLoader(np.arange(8), 8, 1)
    with pytest.raises(DataError, match="only 2 windows .* fewer than batch_size 4.*drop_last=False"):
        WindowLoader(np.arange(20), 8, 4)
    assert len(WindowLoader(np.arange(20), 8, 4, drop_last=False)) == 1
    for kwargs, name in (({"stride": 0}, "stride"), ({"batch_size": 0}, "batch_size")):
        with pytest.raises(ConfigError, match=f"{name} must be >= 1, got 0"):
            WindowLoader(np.arange(20), **{"seq_len": 4, "batch_size": 1, **kwargs})


def test_loader_over_a_prepared_split(corpus, tok):
    out = prepare_data(corpus, tok, val_names=["work2"], use_cache=False)
    x, y = out.train.loader(seq_len=16, batch_size=2, seed=0).next_batch()
    assert x.shape == (2, 16) and int(x.max()) < tok.get_vocab_size()


def test_document_bytes_are_utf8_bytes():
    assert Document("d", "é🤖").n_bytes == 2 + 4
