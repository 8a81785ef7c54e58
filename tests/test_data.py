"""Data stage: readers, wiki markup stripping, splitting, packing, prepare_data resume. No downloads."""

import bz2
import dataclasses
import gzip
import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch

from puzzle.data import (DataConfig, Document, byte_tokenizer, load_token_splits, pack_documents, pack_eval_split,
                         packaged_text_path, prepare_data, read_documents, split_documents, strip_wiki_markup)
from puzzle.errors import PuzzleError


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


# ---------------------------------------------------------------- wiki markup


def test_strip_wiki_markup_removes_nested_templates_tables_refs_and_files():
    src = (
        "{{Infobox country|name=X|map={{Location map|lat={{coord|1|2}}}}}}\n"
        "'''Foo''' is a ''small'' [[town|village]] in [[France]]<ref name=\"a\">Cite {{cite web|url=x}}</ref>"
        " near the [[River Bar]]s.<ref name=b/> It has {{convert|3|km}} of road.<!-- hidden note -->\n"
        "{| class=\"wikitable\"\n|-\n! Year !! People\n|-\n| 1900 || {{n/a}}\n{| \n| nested\n|}\n|}\n"
        "[[File:Foo.jpg|thumb|The [[church]] of Foo [1905]]]\n"
        "== History ==\n"
        "* Founded in 1066 by [http://example.org the abbot]&nbsp;&amp; monks.\n"
        "<math>x^2</math>See <small>also</small> [[:Category:Towns]].\n"
        "== References ==\n{{reflist}}\n* a book\n"
        "[[Category:Towns in France]]\n[[de:Foo]]\n"
    )
    out = strip_wiki_markup(src)
    assert out.startswith("Foo is a small village in France near the River Bars. It has 3 km of road.")
    assert "History\n\nFounded in 1066 by the abbot & monks." in out
    assert "See also Category:Towns." in out
    for gone in ("{", "}", "[", "]", "|", "<", "'''", "Cite", "hidden", "1900", "nested", "church", "thumb",
                 "x^2", "a book", "Towns in France", "de:Foo", "References", "&amp;", "&nbsp;"):
        assert gone not in out, gone


def test_strip_wiki_markup_keeps_plain_prose_unchanged():
    prose = "The river flows north.\n\nIt is 40 km long, and (mostly) navigable."
    assert strip_wiki_markup(prose) == prose


def _write_dump(path, pages):
    redirect = '<redirect title="X" />'
    body = "".join(
        f"<page><title>{t}</title><ns>{ns}</ns><id>{i}</id>{redirect if red else ''}"
        f"<revision><id>9{i}</id><text xml:space=\"preserve\">{text}</text></revision></page>"
        for i, (t, ns, red, text) in enumerate(pages, start=10))
    xml = f'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">{body}</mediawiki>'
    path.write_bytes(bz2.compress(xml.encode()))


def test_wiki_dump_reader_skips_redirects_short_pages_and_other_namespaces(tmp_path):
    long_text = "'''Alpha''' is a letter. " * 20 + "&lt;ref&gt;note&lt;/ref&gt;"
    _write_dump(tmp_path / "enwiki-pages-articles.xml.bz2", [
        ("Alpha", 0, False, long_text),
        ("Beta", 0, True, "#REDIRECT [[Alpha]]"),
        ("Gamma", 0, False, "Too short."),
        ("Talk:Alpha", 1, False, long_text),
        ("Delta", 0, False, "#redirect [[Alpha]] " + "x" * 300),
    ])
    docs = read_documents(str(tmp_path / "enwiki-pages-articles.xml.bz2"))
    assert [d.doc_id for d in docs] == ["10"]
    assert docs[0].text.startswith("Alpha is a letter.") and "note" not in docs[0].text


# ---------------------------------------------------------------- readers


def test_text_reader_modes(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one line\nsecond line\n\n\nnext block\n  \nlast\n")
    assert [d.text for d in read_documents(str(f))] == ["one line\nsecond line", "next block", "last"]
    assert len(read_documents(str(f), txt_mode="line")) == 4
    assert len(read_documents(str(f), txt_mode="file")) == 1
    assert read_documents(str(f))[1] == Document("next block", "1", str(f))


def test_jsonl_reader_survives_what_scraped_and_exported_files_hold(tmp_path):
    """Breaker: a lone surrogate escape crashed the split's hashing with a traceback, oe-eval requests with a null
    doc_id or continuation crashed in int() and str +, and chat turns null and 3 became the text "None" and "3"."""
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "broken emoji \\ud83d here"}\n{"text": "a pair \\ud83d\\ude00"}\n'
                 '{"turns": ["Hi?", null, 3, "Bye."]}\n{"turns": [null]}\n', encoding="utf-8")
    # no text turn at all: a blank record, skipped and said (reviewer: "no 'text' field (nor 'messages' or 'turns')")
    with pytest.warns(UserWarning, match=r"1 record\(s\) of .*a.jsonl with blank text \('text', messages or turns; "
                                         r"line 4\), skipped"):
        assert len(read_documents(str(f))) == 3
    f.write_text(f.read_text().rsplit("\n", 2)[0] + "\n", encoding="utf-8")
    with pytest.warns(UserWarning, match=r"1 record \(line 1\) holds a lone surrogate escape"):
        docs = read_documents(str(f))
    assert [d.text for d in docs] == ["broken emoji \ufffd here", "a pair \U0001F600", "Hi?\n\nBye."]
    g = tmp_path / "requests.jsonl"
    for doc_id, continuation, says in [("null", '" end"', "doc_id is None"), ('"x1"', '" end"', "doc_id is 'x1'"),
                                       ("3", "null", "context or continuation is not a string")]:
        g.write_text('{"request": {"context": "A", "continuation": %s}, "doc_id": %s}\n' % (continuation, doc_id))
        with pytest.raises(PuzzleError, match=f"line 1: an oe-eval request whose {says}"):
            read_documents(str(g))
    g.write_text('{"request": {"context": "A", "continuation": " end"}, "doc_id": "12"}\n')
    assert read_documents(str(g)) == [Document("A end", "12", str(g))]
    g.write_text('{"request": {"context": "A", "continuation": " end"}, "doc_id": 12.0}\n')
    assert read_documents(str(g)) == [Document("A end", "12", str(g))]


def test_jsonl_reader_text_messages_turns_and_gz(tmp_path):
    f = tmp_path / "a.jsonl.gz"
    rows = [{"text": "plain", "id": "p1"},
            {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
            {"question_id": 81, "turns": ["Write a poem.", "Shorter."]}]
    with gzip.open(f, "wt") as g:
        g.write("\n".join(json.dumps(r) for r in rows) + "\n\n")
    docs = read_documents(str(f))
    assert [d.doc_id for d in docs] == ["p1", "1", "81"]
    assert docs[1].text == "User: Hi?\n\nAssistant: Hello."
    assert docs[2].text == "Write a poem.\n\nShorter."
    g = tmp_path / "b.jsonl"
    g.write_text(json.dumps({"body": "x"}) + "\n")
    assert read_documents(str(g), text_field="body")[0].text == "x"
    with pytest.raises(PuzzleError, match="no 'text' field"):
        read_documents(str(g))
    from puzzle.data import iter_json_lines

    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "ok"}\r\n')  # as Windows editors save it
    assert list(iter_json_lines(tmp_path / "bom.jsonl")) == [(1, {"text": "ok"})]
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    (tmp_path / "junk.jsonl.gz").write_bytes(b"not gzip")
    cut = gzip.compress(b'{"text": "ok"}\n' * 200)  # breaker: a cut-off file was told to be gzip-compressed
    (tmp_path / "cut.jsonl.gz").write_bytes(cut[:len(cut) // 2])
    for name, words in [("latin1.jsonl", "is not UTF-8 text"), ("junk.jsonl.gz", "must be gzip-compressed"),
                        ("cut.jsonl.gz", "ends before its gzip stream does .*: the file is cut short")]:
        with pytest.raises(PuzzleError, match=words):
            list(iter_json_lines(tmp_path / name))


def test_oe_eval_requests_become_passages_deduplicated(tmp_path):
    def req(doc_id, ctx, cont):
        return {"request_type": "loglikelihood", "doc_id": doc_id, "request": {"context": ctx, "continuation": cont}}

    f = tmp_path / "requests.jsonl.gz"
    with gzip.open(f, "wt") as g:
        for r in [req(3, "He opened the", " door"), req(3, "He opened the", " door"),
                  req(1_000_003, "He opened the", " door"), req(5, "She sang a", " song")]:
            g.write(json.dumps(r) + "\n")
    docs = read_documents(str(f))
    assert [(d.doc_id, d.text) for d in docs] == [("3", "He opened the door"), ("5", "She sang a song")]


def test_lee_cor_is_one_document_per_line(tmp_path):
    f = tmp_path / "news.cor"
    f.write_text("First article here.\n\nSecond article.\n")
    assert [d.text for d in read_documents(str(f), txt_mode="paragraph")] == ["First article here.", "Second article."]


def test_blank_jsonl_records_are_said_and_categorical_parquet_text_is_read(tmp_path):
    """Breaker: blank jsonl records were dropped without a word (a table's blank rows are said); pandas' Categorical
    text column was refused as "not text", with advice to name another column."""
    import pandas as pd

    f = tmp_path / "ws.jsonl"
    rows = [{"text": "one doc"}, {"text": "   \n "}, {"text": "two doc"}, {"text": ""},
            {"messages": [{"role": "user", "content": "  "}]}, {"turns": [" "]}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match=r"4 record\(s\) of .*ws.jsonl with blank text \('text', messages or turns; "
                                         r"line 2 and others\), skipped"):
        assert [d.text for d in read_documents(str(f))] == ["one doc", "two doc"]
    pd.DataFrame({"text": pd.Categorical(["a doc", "b doc", "a doc"])}).to_parquet(tmp_path / "cat.parquet")
    assert [d.text for d in read_documents(str(tmp_path / "cat.parquet"))] == ["a doc", "b doc", "a doc"]


def test_chat_parquet_is_read_as_chat_jsonl_is(tmp_path):
    """Breaker: a parquet of hub chat rows (`messages`) was refused with "name the text column with --text-field", and
    --text-field messages then as "not text"; the same records as .jsonl were read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    chats = [[{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello, friend"}], []]
    pq.write_table(pa.table({"messages": chats}), tmp_path / "chat.parquet")
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": chats[0]}) + "\n")
    want = [d.text for d in read_documents(str(tmp_path / "chat.jsonl"))]
    assert want == ["User: Hi there\n\nAssistant: Hello, friend"]
    for field in ("text", "messages"):
        with pytest.warns(UserWarning, match=r"1 row\(s\) of column 'messages' null or blank, skipped"):
            assert [d.text for d in read_documents(str(tmp_path / "chat.parquet"), text_field=field)] == want


def test_parquet_and_save_to_disk_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": ["alpha doc", "", "beta doc"], "n": [1, 2, 3]})
    pq.write_table(table, tmp_path / "t.parquet")
    with pytest.warns(UserWarning, match=r"1 row\(s\) of column 'text' null or blank, skipped"):
        assert [d.text for d in read_documents(str(tmp_path / "t.parquet"))] == ["alpha doc", "beta doc"]
    ds = tmp_path / "ds" / "train"
    ds.mkdir(parents=True)
    with pa.ipc.new_stream(ds / "data-00000-of-00001.arrow", table.schema) as w:
        w.write_table(table)
    (ds / "state.json").write_text("{}")
    (tmp_path / "ds" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    from puzzle.data import has_splits  # it may be gkd's --calib and --eval at once; a plain folder or file may not

    assert has_splits(tmp_path / "ds") and not has_splits(tmp_path / "ds" / "train")
    assert not has_splits(tmp_path / "t.parquet")
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [d.doc_id for d in read_documents(str(tmp_path / "ds"))] == ["0", "2"]
    assert [str(w.message) for w in caught if "left out" in str(w.message)] == []  # save_to_disk's metadata
    (ds / "notes.txt").write_text("a note")  # breaker: left out without a word
    with pytest.warns(UserWarning, match=r"1 file\(s\) or folder\(s\) beside the tables of .* left out.*\(notes.txt\)"):
        read_documents(str(tmp_path / "ds"))


def test_folder_of_files_and_packaged_text(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("A one.\n\nA two.")
    (tmp_path / "sub" / "b.txt").write_text("B one.")
    docs = read_documents(str(tmp_path))
    assert [d.doc_id for d in docs] == ["a.txt:0", "a.txt:1", "sub/b.txt:0"]
    assert {d.source for d in docs} == {str(tmp_path)}
    tiny = read_documents("package:tiny_corpus.txt")
    assert len(tiny) >= 10 and packaged_text_path("tiny_eval.txt").stat().st_size > 2000
    with pytest.raises(PuzzleError, match="no packaged text"):
        packaged_text_path("nope.txt")


def test_missing_and_empty_sources_raise(tmp_path):
    with pytest.raises(PuzzleError, match="does not exist; give an existing"):
        read_documents(str(tmp_path / "missing.txt"))
    with pytest.raises(PuzzleError, match="does not exist; it looks like a file pattern that the shell did not expand"):
        read_documents(str(tmp_path / "*.txt"))  # quoted on the command line
    (tmp_path / "empty.txt").write_text("\n \n\n")
    with pytest.raises(PuzzleError, match="is empty: give a file with text"):
        read_documents(str(tmp_path / "empty.txt"))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(PuzzleError, match="not UTF-8"):
        read_documents(str(tmp_path / "bin.txt"))


# ---------------------------------------------------------------- splitting


def _docs(n, source="s"):
    return [Document(f"document number {i} about topic {i * 7 % 13}", str(i), source) for i in range(n)]


def test_split_is_deterministic_disjoint_and_stable_under_additions():
    calib, ev = _docs(200), _docs(30, "e")
    ev = [Document("eval " + d.text, d.doc_id, "e") for d in ev]
    a = split_documents(calib, ev, score_fraction=0.25, seed=1)
    b = split_documents(list(reversed(calib)), ev, score_fraction=0.25, seed=1)
    assert [d.text for d in a["calib"]] == [d.text for d in b["calib"]]
    texts = {k: {d.text for d in v} for k, v in a.items()}
    assert not texts["calib"] & texts["score"] and not (texts["calib"] | texts["score"]) & texts["eval"]
    assert len(texts["calib"]) + len(texts["score"]) == 200
    assert 25 <= len(texts["score"]) <= 75  # about a quarter
    extra = [Document(f"an added document {i}", str(i), "added.txt") for i in range(50)]
    more = split_documents(calib + extra, ev, score_fraction=0.25, seed=1)
    assert texts["score"] <= {d.text for d in more["score"]}  # old documents stay in their split
    other_seed = split_documents(calib, ev, score_fraction=0.25, seed=2)
    assert {d.text for d in other_seed["score"]} != texts["score"]


def test_split_drops_duplicates_and_eval_texts_and_fills_tiny_score_split():
    calib = [Document("a", "0", "c"), Document("a", "1", "c"), Document("b", "2", "c"), Document("held", "3", "c")]
    ev = [Document("held", "0", "e")]
    s = split_documents(calib, ev, score_fraction=0.01, seed=0)
    assert len(s["score"]) == 1 and len(s["calib"]) == 1  # one of "a"/"b" moved to score
    assert {d.text for d in s["calib"] + s["score"]} == {"a", "b"}


# ---------------------------------------------------------------- packing


def test_pack_shapes_eos_and_budget(tok):
    docs = [Document("abc", "0", "s"), Document("defgh", "1", "s"), Document("ij", "2", "s")]
    tokens, used = pack_documents(docs, tok, seq_len=4, max_tokens=10)
    assert tokens.shape == (2, 4) and tokens.dtype == torch.int64
    assert tokens.flatten().tolist() == list(b"abc") + [256] + list(b"defg")
    assert [d.doc_id for d in used] == ["0", "1"]
    tokens, used = pack_documents(docs, tok, seq_len=3, max_tokens=1000)  # 13 tokens -> 4 sequences
    assert tokens.shape == (4, 3) and (tokens == 256).sum() == 2 and len(used) == 3  # last EOS is in the tail
    tokens, used = pack_documents(docs, tok, seq_len=2, max_tokens=100, max_doc_tokens=2)  # "ab" "de" "ij"
    assert tokens.flatten().tolist() == list(b"ab") + [256] + list(b"de") + [256] + list(b"ij")
    with pytest.raises(PuzzleError, match=r"fewer than one sequence of .*data.seq_len, in its preset's \[data\]"):
        pack_documents(docs[:1], tok, seq_len=64, max_tokens=128)


def test_pack_tokenizes_only_what_the_budget_needs(tok):
    calls = []

    class Counting:
        eos_token_id = tok.eos_token_id

        def __call__(self, texts, **kw):
            calls.append(len(texts))
            return tok(texts, **kw)

    docs = [Document("x" * 99, str(i), "s") for i in range(1000)]
    tokens, used = pack_documents(docs, Counting(), seq_len=50, max_tokens=400)
    assert tokens.shape == (8, 50) and len(used) == 4 and sum(calls) <= 8


# ---------------------------------------------------------------- prepare_data


def _config(tmp_path, **kw):
    return DataConfig(calib_sources=("package:tiny_corpus.txt",), eval_sources=("package:tiny_eval.txt",),
                      seq_len=64, calib_tokens=2048, score_tokens=512, eval_tokens=1024, score_fraction=0.25,
                      **kw)


def test_prepare_data_writes_manifest_and_resumes(tmp_path, tok):
    out = tmp_path / "data"
    splits = prepare_data(_config(tmp_path), tok, out)
    assert splits.calib.shape == (2048 // 64, 64) and splits.eval.shape == (1024 // 64, 64)
    assert 1 <= splits.score.shape[0] <= 512 // 64
    m = json.loads((out / "manifest.json").read_text())
    assert m["settings"]["seq_len"] == 64 and m["settings"]["seed"] == 0
    assert {s["spec"]: s["role"] for s in m["sources"]} == {"package:tiny_corpus.txt": "calib",
                                                            "package:tiny_eval.txt": "eval"}
    assert all(len(s["sha256"]) == 64 for s in m["sources"])
    ids = {k: set(m["splits"][k]["doc_ids"].get("package:tiny_corpus.txt", [])) for k in ("calib", "score")}
    assert ids["calib"] and ids["score"] and not ids["calib"] & ids["score"]
    assert m["splits"]["eval"]["tokens"] == splits.eval.numel()

    stamp = (out / "tokens.safetensors").stat().st_mtime_ns
    again = prepare_data(_config(tmp_path), tok, out)
    assert (out / "tokens.safetensors").stat().st_mtime_ns == stamp  # loaded, not rewritten
    assert torch.equal(again.calib, splits.calib) and again.manifest == m

    changed = prepare_data(_config(tmp_path, seed=3), tok, out)
    assert (out / "tokens.safetensors").stat().st_mtime_ns != stamp
    assert changed.manifest["settings"]["seed"] == 3

    (out / "tokens.safetensors").write_bytes(b"half a file")  # an interrupted write is redone
    with pytest.raises(PuzzleError, match="cannot be read"):
        load_token_splits(out)
    with pytest.warns(UserWarning, match="is damaged"):
        assert torch.equal(prepare_data(_config(tmp_path, seed=3), tok, out).calib, changed.calib)
    assert torch.equal(load_token_splits(out).score, changed.score)

    data = bytearray((out / "tokens.safetensors").read_bytes())
    data[-1] ^= 0x01  # one flipped bit in the last token: still a valid file, other tokens
    (out / "tokens.safetensors").write_bytes(bytes(data))
    with pytest.raises(PuzzleError, match="differ from those the manifest recorded"):
        load_token_splits(out)
    with pytest.warns(UserWarning, match="is damaged"):
        assert torch.equal(prepare_data(_config(tmp_path, seed=3), tok, out).eval, changed.eval)  # redone

    # a manifest written before the split hashes: the first load records them, later damage then shows
    old = json.loads((out / "manifest.json").read_text())
    for split in old["splits"].values():
        del split["sha256"]
    (out / "manifest.json").write_text(json.dumps(old))
    assert torch.equal(load_token_splits(out).eval, changed.eval)
    assert all(len(s["sha256"]) == 64 for s in json.loads((out / "manifest.json").read_text())["splits"].values())
    data = bytearray((out / "tokens.safetensors").read_bytes())
    data[-1] ^= 0x01
    (out / "tokens.safetensors").write_bytes(bytes(data))
    with pytest.raises(PuzzleError, match="differ from those the manifest recorded"):
        load_token_splits(out)


def _damage_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "damaged" in str(w.message)]


def test_damaged_splits_are_rebuilt_with_a_warning_that_names_the_file(tmp_path, tok):
    out = tmp_path / "data"
    first = prepare_data(_config(tmp_path), tok, out)
    tokens, manifest = out / "tokens.safetensors", out / "manifest.json"

    def flip_last_bit():  # a readable file whose last token differs
        data = bytearray(tokens.read_bytes())
        data[-1] ^= 0x01
        tokens.write_bytes(bytes(data))

    for damage, path in [(lambda: tokens.write_bytes(tokens.read_bytes()[:300]), tokens),  # truncated
                         (flip_last_bit, tokens),
                         (lambda: manifest.write_text(manifest.read_text()[:40]), manifest)]:
        damage()
        _rebuilt_with_one_warning(tmp_path, tok, out, path, first)
    with warnings.catch_warnings(record=True) as record:  # other settings: rebuilt without a word
        warnings.simplefilter("always")
        assert not prepare_data(_config(tmp_path, seed=3), tok, out).reloaded
        assert prepare_data(_config(tmp_path, seed=3), tok, out).reloaded
    assert _damage_warnings(record) == []


def _rebuilt_with_one_warning(tmp_path, tok, out, path, first):
    """prepare_data on damaged splits in `out`: one warning naming `path`, the same tokens as `first`, whole again."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        again = prepare_data(_config(tmp_path), tok, out)
    said = _damage_warnings(record)
    assert len(said) == 1 and said[0].startswith(f"{path} is damaged") and "rebuilding" in said[0], said
    assert not again.reloaded and torch.equal(again.calib, first.calib) and torch.equal(again.eval, first.eval)
    assert load_token_splits(out).reloaded  # whole again


def test_a_manifest_without_its_splits_or_a_missing_file_is_damage(tmp_path, tok):
    """A manifest whose "splits" is not an object describing every split, or one of the two files deleted, is
    rebuilt with a warning that names the file (not loaded unchecked, not rebuilt without a word)."""
    out = tmp_path / "data"
    first = prepare_data(_config(tmp_path), tok, out)
    tokens, manifest = out / "tokens.safetensors", out / "manifest.json"

    def edit(change):
        def damage():
            m = json.loads(manifest.read_text())
            change(m)
            manifest.write_text(json.dumps(m))
        return damage

    for damage, path, words in [(edit(lambda m: m.update(splits=None)), manifest, "'splits' is missing"),
                                (edit(lambda m: m.pop("splits")), manifest, "'splits' is missing"),
                                (edit(lambda m: m.update(splits=[])), manifest, "'splits' is list"),
                                (edit(lambda m: m["splits"].pop("eval")), manifest, "no description of the eval"),
                                (edit(lambda m: m["splits"].update(score=None)), manifest, "no description of the score"),
                                (manifest.unlink, manifest, "missing"),
                                (tokens.unlink, tokens, "missing")]:
        damage()
        with pytest.raises(PuzzleError, match=words):
            load_token_splits(out)
        _rebuilt_with_one_warning(tmp_path, tok, out, path, first)


def test_the_cli_says_on_one_line_that_damaged_splits_are_rebuilt(tmp_path, capsys):
    from puzzle.cli import main

    run = tmp_path / "run"
    assert main(["data", "--preset", "tiny", "--out", str(run), "--no-progress"]) == 0
    tokens = run / "data" / "tokens.safetensors"
    tokens.write_bytes(tokens.read_bytes()[:300])
    capsys.readouterr()
    assert main(["data", "--out", str(run), "--no-progress"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "warning" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith(f"puzzle: warning: {tokens} is damaged"), lines
    assert "rebuilding" in lines[0] and load_token_splits(run / "data").reloaded



def test_a_folder_where_a_split_file_belongs_is_refused_not_rebuilt(tmp_path, tok, capsys):
    """A folder at tokens.safetensors or manifest.json is no damage to rebuild (nothing can be written over it): one
    error saying to move it away, before any source is read, and no "damaged ... rebuilding" warning before it."""
    from puzzle.cli import main

    out = tmp_path / "data"
    prepare_data(_config(tmp_path), tok, out)
    for name in ("tokens.safetensors", "manifest.json"):
        kept = (out / name).read_bytes()
        (out / name).unlink()
        (out / name).mkdir()
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            with pytest.raises(PuzzleError, match=f"{re.escape(str(out / name))} is a folder where a file belongs; move it"):
                prepare_data(_config(tmp_path), tok, out)
            with pytest.raises(PuzzleError, match="is a folder where a file belongs"):
                load_token_splits(out)
        assert _damage_warnings(record) == []
        (out / name).rmdir()
        (out / name).write_bytes(kept)
    assert prepare_data(_config(tmp_path), tok, out).reloaded

    run = tmp_path / "run"
    assert main(["data", "--preset", "tiny", "--out", str(run), "--no-progress"]) == 0
    tokens = run / "data" / "tokens.safetensors"
    tokens.unlink()
    tokens.mkdir()
    capsys.readouterr()
    assert main(["data", "--out", str(run), "--no-progress"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"puzzle: error: {tokens} is a folder where a file belongs; move it away and run the command "
                     f"again"], lines


@pytest.mark.parametrize("max_doc_tokens", [0, 40])
def test_the_evaluation_split_alone_is_the_one_prepare_data_packs(tmp_path, tok, max_doc_tokens):
    config = _config(tmp_path, max_doc_tokens=max_doc_tokens)
    assert torch.equal(pack_eval_split(config, tok), prepare_data(config, tok, tmp_path / "data").eval)


def test_prepare_data_packs_its_evaluation_split_the_way_a_repack_checks_it(tmp_path, tok, monkeypatch):
    """One function packs the evaluation split for both, so `gkd --max-doc-tokens`' check cannot drift from it."""
    import puzzle.data as data

    calls, pack_eval = [], data._pack_eval
    monkeypatch.setattr(data, "_pack_eval", lambda *a, **k: calls.append(a[2]) or pack_eval(*a, **k))
    config = _config(tmp_path, max_doc_tokens=40)
    prepared, alone = prepare_data(config, tok, tmp_path / "data").eval, pack_eval_split(config, tok)
    assert len(calls) == 2 and calls[0] == calls[1] and torch.equal(prepared, alone)


def test_every_text_source_is_checked_before_long_work(tmp_path):
    """`check_sources` names a missing or unknown --eval / --calib source at once (parent-samples aside, assets not
    fetched); prepare_data makes it first."""
    from puzzle.data import check_sources

    text = tmp_path / "a.txt"
    text.write_text("some text\n")
    check_sources(DataConfig(calib_sources=("parent-samples", str(text)), eval_sources=("package:tiny_eval.txt",)))
    check_sources(DataConfig(calib_sources=("asset:lee-news",), eval_sources=(str(tmp_path),)))
    for calib, evals, words in [(("parent-samples",), (str(tmp_path / "gone.txt"),), f"{tmp_path / 'gone.txt'} does not"),
                                ((str(tmp_path / "nope"),), (str(text),), f"{tmp_path / 'nope'} does not exist"),
                                (("asset:no-such-asset",), (str(text),), "unknown asset 'no-such-asset'"),
                                (("package:no-such.txt",), (str(text),), "no packaged text 'no-such.txt'")]:
        with pytest.raises(PuzzleError, match=re.escape(words)):
            check_sources(DataConfig(calib_sources=calib, eval_sources=evals))


def test_splits_packed_from_a_deleted_source_are_still_used_and_only_for_the_same_settings(tmp_path, tok):
    """A text file deleted after its run packed it: the packed splits stand for it (one warning, nothing re-read);
    other settings or damaged splits need the file, and the error says so."""
    import shutil

    from puzzle.data import check_sources, packaged_text_path

    text = tmp_path / "calib.txt"
    shutil.copy(packaged_text_path("tiny_corpus.txt"), text)
    config = DataConfig(calib_sources=(str(text),), eval_sources=("package:tiny_eval.txt",), seq_len=64,
                        calib_tokens=2048, score_tokens=512, eval_tokens=1024, score_fraction=0.25)
    out = tmp_path / "data"
    packed = prepare_data(config, tok, out)
    manifest = (out / "manifest.json").read_text()
    text.unlink()
    assert check_sources(config, packed_in=out) == {str(text): json.loads(manifest)["settings"]["source_sha256"][str(text)]}
    with pytest.raises(PuzzleError, match="does not exist"):  # without the folder: refused as before
        check_sources(config)
    with pytest.warns(UserWarning, match=re.escape(f"{text} no longer exists; using the token splits packed from it")):
        again = prepare_data(config, tok, out)
    assert torch.equal(again.calib, packed.calib) and (out / "manifest.json").read_text() == manifest
    with pytest.raises(PuzzleError, match="made with other settings, so they cannot stand for it; restore the file"):
        prepare_data(dataclasses.replace(config, seed=1), tok, out)
    (out / "tokens.safetensors").write_bytes(b"half a file")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "rebuilding" warning: nothing can be rebuilt
        with pytest.raises(PuzzleError, match="are damaged or were made"):
            prepare_data(config, tok, out)
    (out / "manifest.json").unlink()  # no record of the source left: refused as any missing file
    with pytest.raises(PuzzleError, match=re.escape(f"data source {text} does not exist; give an existing")):
        prepare_data(config, tok, out)


def test_a_source_changed_since_packing_is_named_when_the_splits_are_packed_again(tmp_path, tok):
    import shutil

    from puzzle.data import packaged_text_path

    calib, evals = tmp_path / "calib.txt", tmp_path / "eval.txt"
    shutil.copy(packaged_text_path("tiny_corpus.txt"), calib)
    shutil.copy(packaged_text_path("tiny_eval.txt"), evals)
    config = DataConfig(calib_sources=(str(calib),), eval_sources=(str(evals),), seq_len=64, calib_tokens=2048,
                        score_tokens=512, eval_tokens=1024, score_fraction=0.25)
    out = tmp_path / "data"
    prepare_data(config, tok, out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_data(dataclasses.replace(config, seed=2), tok, out)  # other settings, same text: re-packed silently
        prepare_data(config, tok, out)
    changed = f"data source {calib} changed since the token splits in {out} were packed from it (its sha256 differs)"
    calib.write_text(calib.read_text() + "\n\n\n")  # (breaker: a folder's README, never read, said to spoil all)
    with pytest.warns(UserWarning, match=re.escape(f"{changed}, but the token splits packed again come out as before: "
                                                   f"what was made from them stands")):
        prepare_data(config, tok, out)
    calib.write_text(calib.read_text()[::-1])
    with pytest.warns(UserWarning, match=re.escape(f"{changed}: packed them again; the calib and score splits came out "
                                                   "otherwise, so a library (BLD) and a score table's quality scores "
                                                   "made from the old ones no longer match")):
        prepare_data(config, tok, out)
    # a paragraph added: the note names the splits that moved, as the manifests say (a breaker: "a library no longer
    # matches" where the calibration split came out as before and bld rightly kept the library)
    before = json.loads((out / "manifest.json").read_text())["splits"]
    calib.write_text(calib.read_text() + "\n\nOne more paragraph of calibration text, long enough to be a document.")
    with pytest.warns(UserWarning, match=re.escape(changed)) as caught:
        prepare_data(config, tok, out)
    after = json.loads((out / "manifest.json").read_text())["splits"]
    moved = [k for k in ("calib", "score", "eval") if before[k]["sha256"] != after[k]["sha256"]]
    said = next(str(w.message) for w in caught if str(w.message).startswith(changed))
    assert moved and f"the {' and '.join(moved)} split{'s' * (len(moved) > 1)} came out otherwise" in said, said
    calib.unlink()
    evals.unlink()  # both gone: both named
    with pytest.warns(UserWarning, match=re.escape(f"data source {evals}, {calib} no longer exists")):
        prepare_data(config, tok, out)
    shutil.copy(packaged_text_path("tiny_eval.txt"), evals)
    other = tmp_path / "other.txt"  # other files: said too (breaker: repacked without a word)
    shutil.copy(packaged_text_path("tiny_corpus.txt"), other)
    with pytest.warns(UserWarning, match=re.escape(f"the token splits in {out} were packed from other sources ({calib},"
                                                   f" {evals}; now {other}, {evals}): packed them again; the calib and "
                                                   "score splits came out otherwise")):
        prepare_data(dataclasses.replace(config, calib_sources=(str(other),)), tok, out)


def test_relative_source_paths_are_saved_absolute(tmp_path, monkeypatch):
    """A run's later commands may start in another folder: `--calib notes.txt` is saved as the file's absolute path
    (was resolved against wherever the next command ran: a warning that the file was gone, or another folder's
    file of the same name packed silently); asset:, package: and parent-samples specs stay as given."""
    import shutil

    from puzzle.cli import main
    from puzzle.data import packaged_text_path

    (tmp_path / "texts").mkdir()
    shutil.copy(packaged_text_path("tiny_corpus.txt"), tmp_path / "texts" / "notes.txt")
    monkeypatch.chdir(tmp_path / "texts")
    assert main(["data", "--preset", "tiny", "--out", str(tmp_path / "run"), "--calib", "notes.txt",
                 "package:tiny_corpus.txt", "--eval", "package:tiny_eval.txt", "--no-progress"]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["data"]
    assert saved["calib_sources"] == [str(tmp_path / "texts" / "notes.txt"), "package:tiny_corpus.txt"]
    assert saved["eval_sources"] == ["package:tiny_eval.txt"]
    stamp = (tmp_path / "run" / "data" / "manifest.json").read_bytes()
    assert main(["data", "--out", str(tmp_path / "run"), "--calib", "../texts/notes.txt", "package:tiny_corpus.txt",
                 "--no-progress"]) == 0  # another spelling of the same path: the same source, nothing re-packed
    assert (tmp_path / "run" / "data" / "manifest.json").read_bytes() == stamp


def test_the_data_stage_names_a_missing_eval_file_before_it_samples_the_parent(tmp_path, capsys, monkeypatch):
    import puzzle.samples
    from puzzle.cli import main

    def sample(*args, **kwargs):
        raise AssertionError("the parent was sampled before the sources were checked")

    monkeypatch.setattr(puzzle.samples, "ensure_parent_samples", sample)
    missing = tmp_path / "held-out.txt"
    assert main(["data", "--preset", "tiny", "--out", str(tmp_path / "run"), "--calib", "parent-samples", "--eval",
                 str(missing), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0], err


def test_prepare_data_errors(tmp_path, tok):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(PuzzleError, match="is empty"):
        prepare_data(DataConfig(calib_sources=(str(empty),), eval_sources=("package:tiny_eval.txt",),
                                seq_len=16, calib_tokens=64, score_tokens=64, eval_tokens=64), tok, tmp_path / "o")
    with pytest.raises(PuzzleError, match="does not exist"):
        prepare_data(DataConfig(calib_sources=(str(tmp_path / "nope.txt"),), seq_len=16, calib_tokens=64,
                                score_tokens=64, eval_tokens=64), tok, tmp_path / "o")
    with pytest.raises(PuzzleError, match="both calibration and evaluation"):
        DataConfig(calib_sources=("a.txt",), eval_sources=["a.txt"])
    with pytest.raises(PuzzleError, match="below data.seq_len"):
        DataConfig(seq_len=512, eval_tokens=100)
    assert not os.path.exists(tmp_path / "o" / "manifest.json")


def test_corrupt_files_raise_puzzle_errors(tmp_path):
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    for name, pattern in [("bad.jsonl.gz", "cannot be read"), ("bad.parquet", "cannot be read"),
                          ("list.jsonl", "not a JSON object")]:
        with pytest.raises(PuzzleError, match=pattern):
            read_documents(str(tmp_path / name))


# ---------------------------------------------------------------- calibration-source weights


def _two_sources(tmp_path):
    """Few long documents (60 x ~600 bytes), many short ones (1500 x ~40 bytes); byte tokenizer: 1 char = 1 token."""
    long_docs = [f"long {i} " + "lorem ipsum dolor sit amet " * 22 for i in range(60)]
    short_docs = [f"short note {i}: tea at {i % 24} o'clock." for i in range(1500)]
    (tmp_path / "long.txt").write_text("\n\n".join(long_docs))
    (tmp_path / "short.txt").write_text("\n\n".join(short_docs))
    return str(tmp_path / "long.txt"), str(tmp_path / "short.txt")


def _weighted_config(sources, **kw):
    return DataConfig(calib_sources=sources, eval_sources=("package:tiny_eval.txt",), seq_len=128,
                      calib_tokens=16384, score_tokens=4096, eval_tokens=512, score_fraction=0.25, **kw)


def _decoded_source_tokens(tokens, eos=256):
    """Tokens per source ("long"/"short", by each document's first letter) in a packed byte-token split."""
    counts, segment = {"long": 0, "short": 0}, []
    for t in tokens.flatten().tolist() + [None]:  # None: flush the cut-off last document
        if t is None or t == eos:
            if segment:
                counts["long" if segment[0] == ord("l") else "short"] += len(segment) + (t == eos)
            segment = []
        else:
            segment.append(t)
    return counts


@pytest.mark.parametrize("weights, long_share", [((1, 1), 0.5), ((3, 1), 0.75), ((1, 3), 0.25)])
def test_calib_weights_set_token_shares(tmp_path, tok, weights, long_share):
    long_src, short_src = _two_sources(tmp_path)
    out = prepare_data(_weighted_config((long_src, short_src), calib_weights=weights), tok, tmp_path / "data")
    m = out.manifest
    assert m["settings"]["calib_weights"] == [float(w) for w in weights]
    for split, tensor, tolerance in [("calib", out.calib, 0.02), ("score", out.score, 0.08)]:
        recorded = m["splits"][split]["source_tokens"]
        assert sum(recorded.values()) == tensor.numel() == m["splits"][split]["tokens"]
        decoded = _decoded_source_tokens(tensor)
        assert decoded == {"long": recorded[long_src], "short": recorded[short_src]}
        assert abs(decoded["long"] / tensor.numel() - long_share) < tolerance, (split, decoded)
    assert m["splits"]["eval"]["source_tokens"] == {"package:tiny_eval.txt": out.eval.numel()}
    # each source's documents keep their seeded-hash order (the unweighted split's order, per source)
    order = split_documents(read_documents(long_src) + read_documents(short_src), [], 0.25, seed=0)["calib"]
    for src in (long_src, short_src):
        ids = m["splits"]["calib"]["doc_ids"][src]
        assert ids == [d.doc_id for d in order if d.source == src][:len(ids)]


def test_calib_weights_a_source_that_runs_out_stops_contributing(tmp_path, tok):
    long_src, short_src = _two_sources(tmp_path)
    few = tmp_path / "few.txt"
    few.write_text("few one: a handful of words.\n\nfew two: another handful.\n\nfew three: the last one here.")
    out = prepare_data(_weighted_config((long_src, str(few)), calib_weights=(1, 1)), tok, tmp_path / "data")
    splits = out.manifest["splits"]
    assert out.calib.numel() == 16384 and out.score.numel() == 4096  # the other source fills the budgets
    few_texts = {d.doc_id: d.text for d in read_documents(str(few))}
    ids = {k: splits[k]["doc_ids"].get(str(few), []) for k in ("calib", "score")}
    assert ids["calib"] and sorted(ids["calib"] + ids["score"]) == sorted(few_texts)  # all of them used
    for split, budget in [("calib", 16384), ("score", 4096)]:
        few_tokens = sum(len(few_texts[i]) + 1 for i in ids[split])  # bytes + EOS
        expected = {long_src: budget - few_tokens, **({str(few): few_tokens} if few_tokens else {})}
        assert splits[split]["source_tokens"] == expected
    from puzzle.data import source_lines  # said as a warning (breaker: 1:1 gave 4 % / 96 %, said only per source)

    warned = [line for line in source_lines(out.manifest) if "warning" in line]
    assert len(warned) == 1 and warned[0].startswith(f"data: warning: --calib-weights asked {few} for 50% of the "
                                                     f"calibration tokens and it gave 0.")
    balanced = prepare_data(_weighted_config(_two_sources(tmp_path), calib_weights=(1, 1)), tok, tmp_path / "data2")
    assert not [line for line in source_lines(balanced.manifest) if "warning" in line]


def test_no_calib_weights_keep_the_old_order_and_settings(tmp_path, tok):
    from puzzle.data import _settings, _settings_sha, tokenizer_fingerprint

    long_src, short_src = _two_sources(tmp_path)
    config = _weighted_config((long_src, short_src))
    assert config.calib_weights == () and config.calib_source_weights() is None
    out = prepare_data(config, tok, tmp_path / "data")
    # the splits as before the weights existed: each split's documents in seeded-hash order, packed from the front
    docs = read_documents(long_src) + read_documents(short_src)
    order = split_documents(docs, read_documents("package:tiny_eval.txt"), 0.25, seed=0)
    for split, tensor in [("calib", out.calib), ("score", out.score), ("eval", out.eval)]:
        stream = [b for d in order[split] for b in list(d.text.encode()) + [256]]
        assert tensor.flatten().tolist() == stream[:tensor.numel()]
    # the settings (and so their sha256, which names existing data folders) are those built before the field existed
    settings = _settings(config, tok, None)
    assert "calib_weights" not in settings and "calib_weights" not in out.manifest["settings"]
    old_way = {f: getattr(config, f) for f in ("seq_len", "calib_tokens", "score_tokens", "eval_tokens",
                                              "score_fraction", "seed", "text_field", "txt_mode", "min_doc_chars",
                                              "max_doc_tokens")}
    old_way.update(calib_sources=[long_src, short_src], eval_sources=["package:tiny_eval.txt"],
                   source_sha256=settings["source_sha256"], tokenizer_sha256=tokenizer_fingerprint(tok), format=1)
    assert settings == old_way and out.manifest["settings_sha256"] == _settings_sha(old_way)
    weighted = _settings(_weighted_config((long_src, short_src), calib_weights=(1, 1)), tok, None)
    assert weighted["calib_weights"] == [1.0, 1.0] and _settings_sha(weighted) != _settings_sha(settings)


@pytest.mark.parametrize("weights, pattern", [
    ((1,), r"1 weight\(s\) for 2 calibration source"), ((1, 2, 3), r"3 weight\(s\) for 2"),
    ((1, 0), "has weight 0.0.*positive and finite"), ((-1, 1), "has weight -1.0"),
    ((1, float("nan")), "has weight nan"), ((float("inf"), 1), "has weight inf"),
    ((1, "x"), r"calib_weights\[1\] = 'x' is not a number"), ((True, 1), "is not a number")])
def test_bad_calib_weights_are_refused(weights, pattern):
    with pytest.raises(PuzzleError, match=pattern):
        DataConfig(calib_sources=("a.txt", "b.txt"), calib_weights=weights)


def test_calib_weights_from_presets_config_files_and_flags(tmp_path, monkeypatch):
    from puzzle.cli import _resolve_config, build_parser
    from puzzle.config import load_preset, load_run_config, save_run_config

    monkeypatch.chdir(tmp_path)  # the preset's a.txt is the file beside it, and --calib a.txt names the same one

    preset = tmp_path / "mix.toml"
    preset.write_text('[data]\ncalib_sources = ["a.txt", "b.txt"]\ncalib_weights = [3, 1]\n')
    config = load_preset(str(preset))
    assert config.data.calib_weights == (3.0, 1.0)
    save_run_config(config, tmp_path)
    assert load_run_config(tmp_path).data.calib_weights == (3.0, 1.0)
    (tmp_path / "bad.toml").write_text('[data]\ncalib_sources = ["a.txt", "b.txt"]\ncalib_weights = [1, "inf"]\n')
    with pytest.raises(PuzzleError, match="has weight inf"):
        load_preset(str(tmp_path / "bad.toml"))

    def resolve(*flags):
        return _resolve_config(build_parser().parse_args(["data", "--out", str(tmp_path), *flags]), tmp_path).data

    assert resolve().calib_weights == (3.0, 1.0)  # the saved config
    assert resolve("--calib-weights", "1", "2").calib_weights == (1.0, 2.0)
    assert resolve("--calib-weights").calib_weights == ()  # no values: back to document shares
    assert resolve("--calib", "a.txt", "b.txt").calib_weights == (3.0, 1.0)  # same sources keep their weights
    assert resolve("--calib", "c.txt").calib_weights == ()  # other sources drop them
    assert resolve("--calib", "b.txt", "a.txt").calib_weights == (1.0, 3.0)  # reordered: each keeps its own (breaker)
    assert resolve("--calib", "a.txt", "a.txt").calib_weights == ()
    new = resolve("--preset", "tiny", "--calib", "c.txt", "d.txt", "--calib-weights", "1", "1")
    assert new.calib_sources == (str(Path("c.txt").absolute()), str(Path("d.txt").absolute()))  # saved absolute
    assert new.calib_weights == (1.0, 1.0)
    with pytest.raises(PuzzleError, match=r"--calib-weights\) has 3 weight\(s\) for 2"):
        resolve("--calib-weights", "1", "1", "1")
    with pytest.raises(PuzzleError, match="--calib-weights 0 1: 0 is not a positive finite number"):
        resolve("--calib", "c.txt", "d.txt", "--calib-weights", "0", "1")


def test_calib_weights_one_long_document_still_gets_its_share(tmp_path, tok):
    """A source holding one document longer than the split is cut to its share, not left out (breaker find)."""
    long_src, short_src = _two_sources(tmp_path)
    one = tmp_path / "one.txt"
    one.write_text("one " + "very long single document " * 1500)  # ~40k bytes, > 2x the calib split
    for sources in ((short_src, str(one)), (str(one), short_src)):
        out = prepare_data(_weighted_config(sources, calib_weights=(1, 1)), tok, tmp_path / f"d{sources[0][-5]}")
        docs = read_documents(sources[0]) + read_documents(sources[1])
        where = [k for k, v in split_documents(docs, [], 0.25, seed=0).items() if any(d.source == str(one) for d in v)]
        assert len(where) == 1  # its one document lies in one split: there it gives half the tokens
        shares = out.manifest["splits"][where[0]]["source_tokens"]
        assert abs(shares.get(str(one), 0) / sum(shares.values()) - 0.5) < 0.02, (where, shares)


def test_calib_weights_are_relative_whatever_their_magnitude(tmp_path, tok):
    long_src, short_src = _two_sources(tmp_path)
    ref = prepare_data(_weighted_config((long_src, short_src), calib_weights=(1, 1)), tok, tmp_path / "ref")
    for weights in ((1e-320, 1e-320), (1e308, 1e308)):
        out = prepare_data(_weighted_config((long_src, short_src), calib_weights=weights), tok, tmp_path / str(weights[0]))
        assert torch.equal(out.calib, ref.calib) and torch.equal(out.score, ref.score)
    huge = DataConfig(calib_sources=("parent-samples", short_src), eval_sources=("package:tiny_eval.txt",),
                      calib_weights=(1e308, 1e308))
    half = DataConfig(calib_sources=("parent-samples", short_src), eval_sources=("package:tiny_eval.txt",),
                      calib_weights=(1, 1))
    assert huge.parent_sample_tokens() == half.parent_sample_tokens() > 0


def test_calib_weights_refuse_a_source_given_twice(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("text")
    for sources in (("a.txt", "a.txt"), ("a.txt", "./a.txt"), ("a.txt", str(tmp_path / "a.txt"))):
        with pytest.raises(PuzzleError, match="same source"):
            DataConfig(calib_sources=sources, calib_weights=(1, 3))
    DataConfig(calib_sources=("a.txt", "a.txt"))  # without weights nothing is lost (documents are kept once)


def test_calib_weights_leave_the_rest_of_a_split_to_the_sources_left(tmp_path, tok):
    """Caps follow the sources still present: a light source fills a split the heavy one is absent from
    or has run out of, with whole documents (second breaker pass: splits had shrunk or failed)."""
    long_src, short_src = _two_sources(tmp_path)
    few = tmp_path / "few.txt"
    few.write_text("\\n\\n".join(f"few {i}: " + "words and more words " * 8 for i in range(3)))
    out = prepare_data(_weighted_config((long_src, str(few)), calib_weights=(1, 1000)), tok, tmp_path / "d")
    assert out.calib.numel() == 16384 and out.score.numel() == 4096  # cut to 1/1001 of the split, they could not


def test_calib_weights_refuse_what_cannot_give_a_share(tmp_path, tok):
    long_src, short_src = _two_sources(tmp_path)
    for weights in ((1e308, 1e-308), (1e-320, 1), (1, 2e12)):
        with pytest.raises(PuzzleError, match="span more than"):
            _weighted_config((long_src, short_src), calib_weights=weights)
    copy = tmp_path / "copy.txt"
    copy.write_text(open(short_src).read())  # the same text under another name
    with pytest.raises(PuzzleError, match="copy.txt: every document repeats"):
        prepare_data(_weighted_config((short_src, str(copy)), calib_weights=(1, 1)), tok, tmp_path / "d")


def test_text_that_is_not_a_string_and_calibration_text_copied_from_evaluation_are_named(tmp_path, tok):
    """Breaker: {"text": null} was "no 'text' field", an integer parquet column "is empty", and calibration text
    that is a copy of the evaluation file "the calib split has no documents; add text"."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from puzzle.data import DataConfig, prepare_data, read_documents

    (tmp_path / "n.jsonl").write_text('{"text": "fine"}\n{"text": null}\n')
    with pytest.raises(PuzzleError, match=r"line 2: field 'text' is not a string \(got NoneType\)"):
        read_documents(str(tmp_path / "n.jsonl"))
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "ints.parquet")
    with pytest.raises(PuzzleError, match="column 'text' holds int64, not text"):
        read_documents(str(tmp_path / "ints.parquet"))
    text = "\n\n".join(f"Paragraph {i} of the shared text, long enough to be kept as a document." for i in range(40))
    (tmp_path / "eval.txt").write_text(text)
    (tmp_path / "copy.txt").write_text(text)
    config = DataConfig(calib_sources=(str(tmp_path / "copy.txt"),), eval_sources=(str(tmp_path / "eval.txt"),),
                        seq_len=16, calib_tokens=64, score_tokens=32, eval_tokens=32)
    with pytest.raises(PuzzleError, match=r"are the same file \(equal sha256\)"):
        prepare_data(config, tok, tmp_path / "data")


def test_a_split_short_because_documents_were_cut_names_max_doc_tokens(tmp_path, tok):
    """Fresh user: 14 long documents (52,058 tokens) gave 11,520 calibration tokens, and the warning said "add
    text": the demo presets cut each document at data.max_doc_tokens. It names the cap now, and 0 lifts it."""
    long_docs = [" ".join(f"word{i}-{j}" for j in range(300)) for i in range(8)]  # about 2,700 byte tokens each
    (tmp_path / "calib.txt").write_text("\n\n".join(long_docs))
    (tmp_path / "eval.txt").write_text("\n\n".join(f"Evaluation passage {i}, with words of its own." * 4
                                                    for i in range(20)))
    config = DataConfig(calib_sources=(str(tmp_path / "calib.txt"),), eval_sources=(str(tmp_path / "eval.txt"),),
                        seq_len=16, calib_tokens=8192, score_tokens=2048, eval_tokens=8192, max_doc_tokens=256)
    with pytest.warns(UserWarning) as caught:
        prepare_data(config, tok, tmp_path / "data")
    said = [str(w.message) for w in caught if str(w.message).startswith("calib split")]
    assert len(said) == 1 and "documents were cut at data.max_doc_tokens = 256 tokens each" in said[0], said
    assert "--max-doc-tokens 0" in said[0]
    with warnings.catch_warnings(record=True) as again:  # whole documents: enough tokens, no warning for calib
        warnings.simplefilter("always")
        whole = prepare_data(dataclasses.replace(config, max_doc_tokens=0), tok, tmp_path / "data-whole")
    assert whole.calib.numel() == 8192 and not any(str(w.message).startswith("calib split") for w in again)
    # breaker: the short evaluation split (short passages, none cut) named the cap; now only "add text"
    short_eval = [str(w.message) for w in caught if str(w.message).startswith("eval split")]
    assert len(short_eval) == 1 and "max_doc_tokens" not in short_eval[0] and "add text" in short_eval[0]
    # breaker: a cap so low that a split holds not one sequence failed without naming the cap
    with pytest.raises(PuzzleError, match=r"cut at data.max_doc_tokens = 2 tokens each: --max-doc-tokens 0"):
        prepare_data(dataclasses.replace(config, max_doc_tokens=2), tok, tmp_path / "data-tiny-cap")
    # two sources whose documents share doc ids ("0", "1", ...: both .txt files): every cut document is counted
    # (breaker: 39 of 64 were said, all 64 cut)
    (tmp_path / "other.txt").write_text("\n\n".join(" ".join(f"other{i}-{j}" for j in range(300)) for i in range(8)))
    two = dataclasses.replace(config, calib_sources=(str(tmp_path / "calib.txt"), str(tmp_path / "other.txt")),
                              calib_tokens=20000, score_tokens=256)
    with pytest.warns(UserWarning) as caught:
        data = prepare_data(two, tok, tmp_path / "data-two")
    said = [str(w.message) for w in caught if str(w.message).startswith("calib split")]
    documents = sum(map(len, data.manifest["splits"]["calib"]["doc_ids"].values()))
    assert len(said) == 1 and f"{documents} of its {documents} documents were cut" in said[0], said


def test_a_split_packed_short_and_calibration_text_shared_with_evaluation_are_said(tmp_path, tok):
    """Breaker leftover: an evaluation text shorter than eval_tokens was packed short, and calibration documents
    that copy evaluation documents were dropped, both without a word."""
    shared = [f"Paragraph {i} that both files hold, long enough to be kept as a document." for i in range(6)]
    (tmp_path / "eval.txt").write_text("\n\n".join(shared))  # about 450 byte tokens
    (tmp_path / "calib.txt").write_text("\n\n".join(shared[:2] + [f"Calibration paragraph {i} of its own text, "
                                                                   f"long enough." * 3 for i in range(80)]))
    config = DataConfig(calib_sources=(str(tmp_path / "calib.txt"),), eval_sources=(str(tmp_path / "eval.txt"),),
                        seq_len=16, calib_tokens=1024, score_tokens=256, eval_tokens=4096)
    with pytest.warns(UserWarning) as caught:
        packed = prepare_data(config, tok, tmp_path / "data")
    said = [str(w.message) for w in caught]
    assert any(m.startswith("eval split: its sources give") and f"{packed.eval.numel()} tokens, fewer than the 4096 "
               "asked for (data.eval_tokens, a preset's [data] setting)" in m for m in said), said
    assert any(m.startswith("2 calibration document(s) repeat the text of an evaluation document") for m in said), said
    assert not any(m.startswith(("calib split", "score split")) for m in said), said  # those got their budgets
    twice = dataclasses.replace(config, calib_sources=config.calib_sources * 2)  # a breaker: read once, unsaid
    with pytest.warns(UserWarning, match=f"^--calib lists {re.escape(str(tmp_path / 'calib.txt'))} more than once; "
                                         "documents are kept once"):
        again = prepare_data(twice, tok, tmp_path / "data-twice")
    assert torch.equal(again.calib, packed.calib)  # the same splits as the source given once
    with warnings.catch_warnings():  # the packaged tiny preset fills every budget it asks for
        warnings.simplefilter("error")
        from puzzle.config import load_preset
        from puzzle.tiny import tiny_tokenizer

        prepare_data(load_preset("tiny").data, tiny_tokenizer(), tmp_path / "tiny")  # the preset's own tokenizer


def test_breaker_inputs_an_empty_spec_a_fifo_a_run_inside_its_source_and_structured_files(tmp_path, tok, monkeypatch,
                                                                                           capsys):
    """Breaker: `--calib ""` read every file of the current folder; a FIFO hung; a run inside its --calib folder
    calibrated on its own config and token files; .json / .csv files were read as plain text; chat content given as
    a list of parts was written as its Python repr; a folder file name that is not UTF-8 gave a traceback."""
    from puzzle.cli import main

    with pytest.raises(PuzzleError, match=r"--calib \(data.calib_sources\) has an empty source"):
        DataConfig(calib_sources=("",), eval_sources=("package:tiny_eval.txt",))
    monkeypatch.chdir(tmp_path)
    assert main(["data", "--preset", "tiny", "--out", str(tmp_path / "r0"), "--calib", "", "--no-progress"]) == 2
    assert "has an empty source" in capsys.readouterr().err and not (tmp_path / "r0").exists()
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(PuzzleError, match="not a regular file or folder"):
        read_documents(str(tmp_path / "fifo"))
    # a run directory inside a calibration folder
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "c.txt").write_text(packaged_text_path("tiny_corpus.txt").read_text())
    assert main(["data", "--preset", "tiny", "--out", str(texts / "run"), "--calib", str(texts), "--no-progress"]) == 2
    assert "holds the run's own files" in capsys.readouterr().err
    # structured files: refused alone, left out of a folder with a warning
    (tmp_path / "a.json").write_text(json.dumps([{"text": "x" * 50}]))
    with pytest.raises(PuzzleError, match="json files are not read"):
        read_documents(str(tmp_path / "a.json"))
    (texts / "meta.json").write_text("{}")
    with pytest.warns(UserWarning, match=r"1 file\(s\) of a kind not read as text left out \(meta.json\)"):
        assert all("{}" not in d.text for d in read_documents(str(texts)))
    # chat content as parts, null, missing
    rows = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "What is 2+2?"},
                                                       {"type": "image_url", "image_url": {"url": "x"}}]},
                          {"role": "assistant", "content": "Four."}]},
            {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "Hi"}]}]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    docs = read_documents(str(tmp_path / "chat.jsonl"))
    assert [d.text for d in docs] == ["User: What is 2+2?\n\nAssistant: Four.", "Assistant: Hi"]
    # a folder file whose name is not UTF-8
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / os.fsdecode(b"caf\xe9.txt")).write_text("Some text of a document.\n\nAnother document here.")
    from puzzle.data import source_sha256

    assert len(source_sha256(str(odd))) == 64 and len(read_documents(str(odd))) == 2


def test_evaluation_text_rewrapped_in_calibration_is_still_held_out_and_one_document_is_named(tmp_path, tok):
    """Breaker: an evaluation passage copied into calibration with other spacing was trained on (exact-text check);
    a calibration file of one document was said to repeat evaluation text."""
    eval_docs = [Document(f"Evaluation passage number {i} with some words.", str(i), "e") for i in range(3)]
    calib_docs = [Document("Evaluation  passage number 1\nwith some words.", "x", "c"),
                  *[Document(f"Calibration document {i}.", f"c{i}", "c") for i in range(6)]]
    splits = split_documents(calib_docs, eval_docs, 0.3)
    assert "x" not in {d.doc_id for k in ("calib", "score") for d in splits[k]}
    (tmp_path / "one.txt").write_text(" ".join(["lorem ipsum dolor"] * 500))
    config = DataConfig(calib_sources=(str(tmp_path / "one.txt"),), eval_sources=("package:tiny_eval.txt",),
                        seq_len=16, calib_tokens=64, score_tokens=32, eval_tokens=32)
    with pytest.raises(PuzzleError, match="hold one document.*blank lines separate them"):
        prepare_data(config, tok, tmp_path / "data")


def test_a_preset_files_relative_paths_are_read_from_its_folder_and_saved_absolute(tmp_path, monkeypatch):
    """Breaker: calib_sources = ["c.txt"] in a preset file was resolved against the current folder and saved
    relative, so a later command from elsewhere reused or re-packed from the wrong file."""
    from puzzle.cli import main
    from puzzle.config import load_preset

    folder = tmp_path / "presets"
    folder.mkdir()
    (folder / "c.txt").write_text(packaged_text_path("tiny_corpus.txt").read_text())
    (folder / "my.toml").write_text('[parent]\npath = "tiny"\n[data]\ncalib_sources = ["c.txt", "asset:lee-news"]\n'
                                    'eval_sources = "package:tiny_eval.txt"\n')
    config = load_preset(str(folder / "my.toml"))
    assert config.data.calib_sources == (str(folder / "c.txt"), "asset:lee-news") and config.parent.path == "tiny"
    (folder / "my.toml").write_text('[parent]\npath = "tiny"\n[data]\ncalib_sources = ["c.txt"]\n'
                                    'eval_sources = "package:tiny_eval.txt"\nseq_len = 16\ncalib_tokens = 256\n'
                                    'score_tokens = 64\neval_tokens = 64\n')
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["data", "--preset", "../presets/my.toml", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["data"]
    assert saved["calib_sources"] == [str(folder / "c.txt")] and saved["eval_sources"] == ["package:tiny_eval.txt"]


def test_review_of_the_data_fixes(tmp_path, monkeypatch):
    """Code review: code that differs only in indentation is two documents (only the held-out check ignores
    spacing); .json.gz was read as text and .tar.gz named as "gz"; a preset path written, as before, relative to the
    current folder still works, with a warning."""
    from puzzle.config import load_preset

    docs = [Document("def f():\n    return 1", "a", "c"), Document("def f():\n        return 1", "b", "c"),
            Document("def f():\n    return 1", "c", "c"), *[Document(f"Doc {i}.", f"d{i}", "c") for i in range(4)]]
    kept = {d.doc_id for k in ("calib", "score") for d in split_documents(docs, [Document("E.", "e", "e")], 0.3)[k]}
    assert {"a", "b"} <= kept and "c" not in kept
    for name, words in (("e.json.gz", r"\.json\.gz files are not read"), ("d.tar.gz", r"\.tar\.gz files are not read")):
        (tmp_path / name).write_bytes(gzip.compress(b"[1, 2]"))
        with pytest.raises(PuzzleError, match=words):
            read_documents(str(tmp_path / name))
    (tmp_path / "configs").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("text")
    (tmp_path / "configs" / "p.toml").write_text('[data]\ncalib_sources = ["data/a.txt"]\n')
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="not found beside the preset"):
        config = load_preset("configs/p.toml")
    assert config.data.calib_sources == (str(tmp_path / "data" / "a.txt"),)


def test_a_preset_that_sets_an_infinite_value_is_not_said_to_replace_it(tmp_path, capsys):
    """Code review: config.json stores inf as the text "inf", which read as another value than the preset's inf."""
    from puzzle.cli import main

    (tmp_path / "p.toml").write_text('[parent]\npath = "tiny"\n[data]\ncalib_sources = ["package:tiny_corpus.txt"]\n'
                                     'eval_sources = ["package:tiny_eval.txt"]\nseq_len = 16\ncalib_tokens = 256\n'
                                     'score_tokens = 64\neval_tokens = 64\n[score]\nmax_contention = inf\n')
    for _ in range(2):
        assert main(["data", "--preset", str(tmp_path / "p.toml"), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert "replaces settings" not in capsys.readouterr().err


def test_the_text_field_is_a_flag_too(tmp_path):
    """text_field was settable in a preset only; --text-field sets it, is saved, and an empty name is refused."""
    from puzzle.cli import _resolve_config, build_parser
    from puzzle.config import save_run_config

    def resolve(*flags):
        return _resolve_config(build_parser().parse_args(["data", "--out", str(tmp_path), *flags]), tmp_path).data

    assert resolve("--preset", "tiny").text_field == "text"
    config = _resolve_config(build_parser().parse_args(["data", "--out", str(tmp_path), "--preset", "tiny",
                                                        "--text-field", "body"]), tmp_path)
    assert config.data.text_field == "body"
    save_run_config(config, tmp_path)
    assert resolve().text_field == "body"  # saved with the run
    with pytest.raises(PuzzleError, match="--text-field .* must name a field"):
        resolve("--text-field", " ")
    records = tmp_path / "r.jsonl"
    records.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(PuzzleError, match="no 'body' field .* with --text-field"):
        read_documents(str(records), text_field="body")


def test_max_doc_tokens_is_a_flag_saved_with_the_run(tmp_path):
    """Fresh user: the demo presets' cut of each document at 1024 tokens had no flag; --max-doc-tokens sets it."""
    from puzzle.cli import _check_number_flags, _resolve_config, build_parser
    from puzzle.config import save_run_config

    def resolve(*flags):
        args = build_parser().parse_args(["data", "--out", str(tmp_path), *flags])
        _check_number_flags(args)
        return _resolve_config(args, tmp_path)

    assert resolve("--preset", "smollm2-demo").data.max_doc_tokens == 1024
    config = resolve("--preset", "smollm2-demo", "--max-doc-tokens", "0")
    assert config.data.max_doc_tokens == 0
    save_run_config(config, tmp_path)
    assert resolve().data.max_doc_tokens == 0  # saved with the run
    with pytest.raises(PuzzleError, match="--max-doc-tokens must be a whole number >= 0"):
        resolve("--max-doc-tokens", "-5")


def test_a_hub_style_dataset_folder_reads_its_train_tables_only(tmp_path):
    """A folder as the hub ships it (README.md, data/train-*.parquet, data/test-*.parquet) mixed every split and read
    the dataset card as text; it now reads the train split's tables, and says what it left out."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ds = tmp_path / "ds"
    (ds / "data").mkdir(parents=True)
    (ds / "README.md").write_text("---\nlicense: mit\n---\n\n# A dataset card\n")
    pq.write_table(pa.table({"text": ["train one", "train two"]}), ds / "data" / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"text": ["train three"]}), ds / "data" / "train-00001-of-00002.parquet")
    pq.write_table(pa.table({"text": ["test one"]}), ds / "data" / "test-00000-of-00001.parquet")
    with pytest.warns(UserWarning) as caught:
        texts = sorted(d.text for d in read_documents(str(ds)))
    assert texts == ["train one", "train three", "train two"]
    said = " ".join(str(w.message) for w in caught)
    assert "splits ['test', 'train']: reading its train split only" in said and "README.md" in said
    assert [d.text for d in read_documents(str(ds / "data" / "test-00000-of-00001.parquet"))] == ["test one"]
    flat = tmp_path / "flat"  # the split files directly in the folder: a table folder, the same choice
    flat.mkdir()
    for name in ("train.parquet", "validation.parquet"):
        pq.write_table(pa.table({"text": [name]}), flat / name)
    with pytest.warns(UserWarning, match="reading its train split only"):
        assert [d.text for d in read_documents(str(flat))] == ["train.parquet"]
    (flat / "train.parquet").unlink()
    pq.write_table(pa.table({"text": ["t"]}), flat / "test.parquet")
    with pytest.raises(PuzzleError, match=r"holds the splits \['test', 'validation'\]; give the folder or files of one"):
        read_documents(str(flat))
    one = tmp_path / "one" / "shards"  # tables that name no split, or one: all of them, as before
    one.mkdir(parents=True)
    for i in range(2):
        pq.write_table(pa.table({"text": [f"part {i}"]}), one / f"part-{i}.parquet")
    assert sorted(d.text for d in read_documents(str(tmp_path / "one"))) == ["part 0", "part 1"]
    (tmp_path / "one" / "notes.txt").write_text("the user's own text")  # beside tables: still read (review)
    assert "the user's own text" in {d.text for d in read_documents(str(tmp_path / "one"))}
    from puzzle.data import _split_name

    names = ("train-00002-of-00003-5f3c2a1b.parquet", "test-00001.parquet", "train_sft-00000-of-00001.parquet",
             "test_sft-00000-of-00001.parquet", "val.parquet", "testing.parquet", "trainer.parquet")
    assert [_split_name(Path(n)) for n in names] == ["train", "test", "train", "test", "val", None, None]
    (ds / "LICENSE").write_text("Permission is hereby granted, free of charge, ...")  # (breaker) not calibration text
    with pytest.warns(UserWarning, match="LICENSE"):
        assert "Permission" not in " ".join(d.text for d in read_documents(str(ds)))


def test_calibration_text_sharing_13_words_with_the_evaluation_split_is_left_out(tmp_path, tok):
    """Reviewer: calibration text was dropped only when a whole document equalled an evaluation passage, so an
    evaluation passage inside a longer calibration document (or the calibration file copied and read into other
    documents) stayed in calibration and scoring; spacing variants of one text landed in both splits; and the
    evaluation passages depended on --seed."""
    import warnings as w

    from puzzle.data import contaminated, pack_eval_split, prepare_data, same_text_key, split_documents

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()
    passage = " ".join(words)
    evals = [f"Evaluation passage {i}: " + " ".join(words[i:] + words[:i]) + "." for i in range(6)]
    own = [f"Calibration paragraph {i} about its own subject, number {i}, with words of its own." * 3 for i in range(40)]
    inside = "Some lead-in text. " + evals[0].upper().replace(":", " -") + " And more after it."
    (tmp_path / "eval.txt").write_text("\n\n".join(evals))
    (tmp_path / "calib.txt").write_text("\n\n".join(own + [inside]))
    config = DataConfig(calib_sources=(str(tmp_path / "calib.txt"),), eval_sources=(str(tmp_path / "eval.txt"),),
                        seq_len=16, calib_tokens=256, score_tokens=64, eval_tokens=64)
    with w.catch_warnings(record=True) as caught:
        w.simplefilter("always")
        packed = prepare_data(config, tok, tmp_path / "out", write=False)
    assert any("1 calibration document(s) share a run of 13 words" in str(m.message) for m in caught)
    used = {d for split in ("calib", "score") for docs in packed.manifest["splits"][split]["doc_ids"].values()
            for d in docs}
    assert str(len(own)) not in used  # the document holding the passage (doc id: its index) is in neither split
    docs = [Document(t, str(i), "s") for i, t in enumerate([passage, passage.upper() + "!", "short text"])]
    assert contaminated(docs, [Document("x " + passage + " y", "e", "e")]) == {0, 1}
    # one text up to spacing is kept once, so it cannot be in calib and in score
    variants = [Document(f"text number {i} with some words", f"a{i}", "s") for i in range(30)]
    variants += [Document(f"text  number {i}\nwith some   words", f"b{i}", "s") for i in range(30)]
    splits = split_documents(variants, [], 0.5)
    keys = [same_text_key(d.text) for k in ("calib", "score") for d in splits[k]]
    assert len(keys) == len(set(keys)) == 30
    # the evaluation split does not depend on --seed
    other = dataclasses.replace(config, seed=1)
    assert torch.equal(pack_eval_split(config, tok), pack_eval_split(other, tok))


def test_a_data_breakers_findings(tmp_path, tok, capsys):
    """A breaker's user text: a Chinese evaluation passage copied into calibration (one "word" to the 13-gram test)
    went through; a binary file in a folder was read as a document and an image ended the source; a changed dotfile
    repacked the splits; a hub folder given as --eval was read from its train split; a source that gave no tokens,
    and a rerun that reused the splits, went unsaid; an evaluation file's edit was said to spoil the library."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from puzzle.data import contaminated, source_lines, source_sha256

    cjk = "在一个遥远的山村里住着一位老人他每天清晨都会去河边打水然后回家做饭"
    assert contaminated([Document("前言。" + cjk[1:] + "后记。", "c", "c")], [Document(cjk, "e", "e")]) == {0}
    assert contaminated([Document("完全不同的另一段文字内容没有任何重复的地方啊", "c", "c")], [Document(cjk, "e", "e")]) == set()

    folder = tmp_path / "texts"
    (folder / ".git").mkdir(parents=True)
    (folder / "a.txt").write_text("One text.\n\nAnother text.")
    (folder / "zz.dat").write_bytes(b"abc\x00\x01def")
    (folder / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / ".notes").write_text("hidden")
    (folder / "latin.jsonl").write_bytes(json.dumps({"text": "caf\u00e9"}).encode().replace(b"\\u00e9", b"\xe9"))
    with pytest.warns(UserWarning, match=r"3 file\(s\) that are not UTF-8 text .* \(image.png, latin.jsonl, zz.dat\)"):
        assert [d.text for d in read_documents(str(folder))] == ["One text.", "Another text."]
    with pytest.raises(PuzzleError, match="holds NUL bytes: a binary file"):
        read_documents(str(folder / "zz.dat"))  # given alone: refused
    (tmp_path / "binary").mkdir()  # a folder of binary files alone is named so (breaker: called empty)
    (tmp_path / "binary" / "zz.dat").write_bytes(b"abc\x00\x01def")
    with pytest.warns(UserWarning), pytest.raises(PuzzleError, match=r"gives no text: its 1 file\(s\) that are binary "
                                                                     r"or of another encoding were left out; give"):
        read_documents(str(tmp_path / "binary"))
    (tmp_path / "binary" / "short.txt").write_text("hi")  # and a text file too short (reviewer: unsaid)
    with pytest.warns(UserWarning), pytest.raises(PuzzleError, match=r"left out, and its 1 other file\(s\) hold no "
                                                                     r"text of 10 characters or more"):
        read_documents(str(tmp_path / "binary"), min_chars=10)
    digest = source_sha256(str(folder))
    (folder / ".notes").write_text("edited")
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/other\n")
    assert source_sha256(str(folder)) == digest  # neither read nor hashed

    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["train row"]}), hub / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"text": ["validation row"]}), hub / "data" / "validation-00000-of-00001.parquet")
    pq.write_table(pa.table({"text": ["test row"]}), hub / "data" / "test-00000-of-00001.parquet")
    with pytest.warns(UserWarning, match=r"reading its test split only \(an evaluation source: a held-out split\)"):
        assert [d.text for d in read_documents(str(hub), held_out=True)] == ["test row"]
    with pytest.warns(UserWarning, match="reading its train split only"):
        assert [d.text for d in read_documents(str(hub))] == ["train row"]
    (hub / "data" / "validation-00000-of-00001.parquet").unlink()
    (hub / "data" / "test-00000-of-00001.parquet").unlink()  # a train split alone: said for an evaluation (breaker)
    with pytest.warns(UserWarning, match="holds only a train split, read as the evaluation text"):
        assert [d.text for d in read_documents(str(hub), held_out=True)] == ["train row"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [d.text for d in read_documents(str(hub))] == ["train row"]  # calibration: nothing to say
    saved = tmp_path / "saved"  # a save_to_disk DatasetDict: the same choice
    for split in ("train", "validation"):
        (saved / split).mkdir(parents=True)
        pq.write_table(pa.table({"text": [f"{split} record"]}), saved / split / "data.parquet")
    (saved / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
    assert [d.text for d in read_documents(str(saved), held_out=True)] == ["validation record"]
    assert [d.text for d in read_documents(str(saved))] == ["train record"]
    (saved / "train" / "._data.parquet").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # a macOS copy's shadow file
    assert [d.text for d in read_documents(str(saved))] == ["train record"]  # not read (a hidden table)

    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"Calibration paragraph {i} about a subject of its own, number {i}." * 4
                                 for i in range(60)))
    copy = tmp_path / "copy.jsonl"
    copy.write_text("".join(json.dumps({"text": t}) + "\n" for t in calib.read_text().split("\n\n")))
    evals = tmp_path / "eval.txt"
    evals.write_text("\n\n".join(f"Evaluation passage {i} of its own words, item {i}." * 4 for i in range(20)))
    config = DataConfig(calib_sources=(str(calib), str(copy)), eval_sources=(str(evals),), seq_len=16,
                        calib_tokens=256, score_tokens=64, eval_tokens=64)
    packed = prepare_data(config, tok, tmp_path / "out")
    lines = source_lines(packed.manifest)
    assert lines[0].startswith(f"data: calib source {calib}: 60 documents read; tokens calib ")
    assert lines[1] == (f"data: calib source {copy}: 60 documents read, 0 of them kept (60 repeat a text read before "
                        f"or overlap the evaluation text); no tokens: every document repeats another source's text or "
                        f"overlaps the evaluation text")
    assert lines[2].startswith(f"data: eval source {evals}: 20 documents read; tokens eval 64")
    assert source_lines(packed.manifest, reloaded=True)[2].startswith(  # breaker: "read" of a file deleted since
        f"data: eval source {evals}: 20 documents read when packed; tokens eval 64")
    # (a passage added at the end left the 64 packed tokens as they were: now said as such)
    evals.write_text(evals.read_text().replace("Evaluation", "Held-out"))
    with pytest.warns(UserWarning, match="evaluations made on the old evaluation split no longer stand; a library"):
        prepare_data(config, tok, tmp_path / "out")
    (hub / "data" / "test-00000-of-00001.parquet").write_bytes(b"")  # the hub folder as --eval: its test split
    pq.write_table(pa.table({"text": [f"Held-out test passage {i}, words of its own." * 3 for i in range(8)]}),
                   hub / "data" / "test-00000-of-00001.parquet")
    config = DataConfig(calib_sources=(str(calib),), eval_sources=(str(hub),), seq_len=16, calib_tokens=256,
                        score_tokens=64, eval_tokens=64)
    with pytest.warns(UserWarning, match="reading its test split only"):
        packed = prepare_data(config, tok, tmp_path / "hub-out")
    assert packed.manifest["settings"]["eval_split"] == "held_out"
    used = set(packed.manifest["splits"]["eval"]["doc_ids"][str(hub)])
    assert used and used <= {f"data/test-00000-of-00001.parquet:{i}" for i in range(8)}
