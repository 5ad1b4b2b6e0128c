"""qtg.training.evaluate and the `qtg eval` / `qtg generate` commands."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import qtg
from qtg.data.pipeline import Document
from qtg.data.tokenizer import encode, eos_id
from qtg.training.evaluate import evaluate, score_windows, windows
from tests.conftest import run_qtg


def test_bits_per_byte_matches_a_hand_computation(tiny_checkpoint):
    model = qtg.load(tiny_checkpoint).eval()
    text = "Speak, speak. You are all resolved — ünïcødé too?"
    ids = [eos_id(model.tokenizer)] + encode(model.tokenizer, text)
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0]
    nll = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
    result = evaluate(model, [Document("t", text)])
    assert result.bytes == len(text.encode("utf-8")) > len(text)  # multi-byte characters count as bytes
    assert result.tokens == len(ids) - 1
    assert result.bits_per_byte == pytest.approx(nll / math.log(2) / result.bytes, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)


def test_windows_predict_every_token_exactly_once():
    ids = list(range(1000))
    chunks = windows(ids, 128)
    predicted = [t for c in chunks for t in c[1:]]
    assert predicted == ids[1:] and max(len(c) for c in chunks) == 129


def test_long_documents_span_several_windows(tiny_checkpoint):
    model = qtg.load(tiny_checkpoint).eval()
    text = "Speak, speak. " * 200
    result = evaluate(model, [Document("long", text)])
    assert result.tokens == len(encode(model.tokenizer, text))  # EOS context + every token predicted once
    assert result.tokens > 2 * model.cfg.max_seq_len


def test_padded_batches_score_as_windows_one_at_a_time():
    model = qtg.build("micro", seed=0)
    chunks = [list(range(1, n)) for n in (5, 40, 17, 90, 3)]  # uneven: batched, all but the longest are padded
    together = score_windows(model, chunks, batch_size=8)
    alone = [score_windows(model, [c], batch_size=1) for c in chunks]
    assert together[1] == sum(n for _, n in alone) == sum(len(c) - 1 for c in chunks)
    assert together[0] == pytest.approx(sum(nll for nll, _ in alone), rel=1e-5)


def test_scoring_restores_the_models_mode_even_when_a_pass_raises():
    model = qtg.build("micro", seed=0).train()
    score_windows(model, [[1, 2, 3]])
    assert model.training  # scored in eval mode, then back to training
    seen = []

    def failing_pass(*args, **kwargs):
        seen.append(model.training)
        raise RuntimeError("the pass failed")

    model.forward = failing_pass
    with pytest.raises(RuntimeError, match="the pass failed"):
        score_windows(model, [[1, 2, 3]])
    assert seen == [False] and model.training
    model.eval()
    with pytest.raises(RuntimeError, match="the pass failed"):
        score_windows(model, [[1, 2, 3]])
    assert not model.training


def test_eval_needs_text_and_a_tokenizer(tiny_checkpoint):
    with pytest.raises(qtg.QTGError, match="no tokenizer"):
        evaluate(qtg.build("micro"), [Document("t", "hello")])
    with pytest.raises(qtg.QTGError, match="no text"):
        evaluate(qtg.load(tiny_checkpoint), [Document("t", "")])


def test_eval_cli_json(tiny_checkpoint, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("All: Speak, speak.\n")
    r = run_qtg("eval", "--checkpoint", str(tiny_checkpoint), "--data", str(f), "--json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["bytes"] == len("All: Speak, speak.\n") and out["bits_per_byte"] > 0


def test_generate_cli_greedy_is_deterministic(tiny_checkpoint):
    args = ("generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "All:", "--temperature", "0",
            "--max-new-tokens", "12", "--json", "--device", "cpu")
    a, b = run_qtg(*args), run_qtg(*args)
    assert a.returncode == 0, a.stderr
    ja, jb = json.loads(a.stdout), json.loads(b.stdout)
    assert ja["text"] == jb["text"] and ja["text"].startswith("All:") and ja["new_tokens"] == 12


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt", ""], "empty prompt"),
        (["--prompt", "hi", "--temperature", "-1"], "temperature must be a finite number >= 0"),
        (["--prompt", "hi", "--intervene", "topo=sideways"], "topo must be one of"),
        (["--prompt", "hi", "--top-p", "0"], r"top_p must be in \(0, 1\]"),
        (["--prompt", "hi", "--top-k", "0"], "top_k must be an integer >= 1"),
        (["--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
        (["--prompt", "Speak " * 200], r"the prompt is \d+ tokens .* max_seq_len of micro \(128\)"),
        (["--prompt", "hi", "--max-new-tokens", "500"], "at most 12\\d new tokens fit"),
    ],
)
def test_generate_cli_refuses_bad_requests(tiny_checkpoint, extra, message):
    r = run_qtg("generate", "--checkpoint", str(tiny_checkpoint), "--device", "cpu", *extra)
    assert r.returncode == 2, r.stdout
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    import re

    assert re.search(message, r.stderr), r.stderr


def test_generate_cli_refuses_missing_unknown_and_pickled_checkpoints(tmp_path):
    pickled = tmp_path / "model.pt"
    torch.save({"x": torch.zeros(1)}, pickled)
    for source, message in [(["--checkpoint", str(tmp_path / "nope")], "cannot load"),
                            (["--tier", "13b"], "cannot load '13b'"),
                            (["--checkpoint", str(pickled)], "pickle")]:
        r = run_qtg("generate", *source, "--prompt", "hi", "--device", "cpu")
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_stop_escapes_are_read_as_the_characters_they_name():
    from qtg.cli.generate import unescape

    assert unescape("\\n\\n") == "\n\n" and unescape("a\\tb\\r") == "a\tb\r"
    assert unescape("\\\\n") == "\\n"  # an escaped backslash stays one backslash before an n
    assert unescape("plain é") == "plain é"


def test_generate_cli_stops_at_an_escaped_stop_string():
    """``--stop "\\n"`` as a shell passes it (backslash, n) stops at the first newline."""
    common = ("generate", "--tier", "nano", "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "40",
              "--json", "--device", "cpu")
    text = json.loads(run_qtg(*common).stdout)["text"][len("ROMEO:"):]
    assert "\n" in text.rstrip("\n")  # the shipped model writes verse: lines end within 40 tokens
    stopped = json.loads(run_qtg(*common, "--stop", "\\n").stdout)
    continuation = stopped["text"][len("ROMEO:"):]
    first = text.index("\n")  # the stop fires with the token that completes it, the rest is not generated
    assert continuation.startswith(text[:first + 1]) and len(continuation) < len(text)


def test_eval_cli_scores_an_intervention(tiny_checkpoint, tmp_path):
    (tmp_path / "t.txt").write_text("All: Speak, speak. First Citizen: You are all resolved.\n" * 6)
    common = ("eval", "--checkpoint", str(tiny_checkpoint), "--data", str(tmp_path), "--json", "--device", "cpu")
    plain, off = (json.loads(run_qtg(*common, *extra).stdout) for extra in ((), ("--intervene", "topo=off")))
    assert plain["intervention"] == "plain" and off["intervention"] == "topo=off"
    assert off["tokens"] == plain["tokens"] and off["loss"] != plain["loss"]


def test_generate_cli_stream_prints_the_same_text(tiny_checkpoint):
    common = ("generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "All: é", "--temperature", "0",
              "--max-new-tokens", "10", "--device", "cpu")
    plain, streamed = run_qtg(*common), run_qtg(*common, "--stream")
    assert plain.returncode == streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == plain.stdout
