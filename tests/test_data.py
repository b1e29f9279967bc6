"""TextDataModule and the byte tokenizer: sources, splits, packing, order, calibration, bad input.

Everything is local: the stdlib corpus, files written to tmp_path, JSON Lines read through `datasets`."""
import json
import random

import pytest
import torch

from gradprune.calibration import sample_windows
from gradprune.data import TextDataModule
from gradprune.loaders import ResumableDataLoader
from gradprune.tokenizer import byte_tokenizer

# small caps keep every stdlib test well under a second of tokenising
CAPS = dict(max_train_tokens=40_000, max_val_tokens=8_000)
SAMPLES = [
    "",
    "plain ascii\n\tand tabs  ",
    "héllo wörld — ünïcödé, 日本語, Ελληνικά, emoji 🙂👍🏽",
    "\x00\x01 control bytes \x7f and \r\n line endings",
    "a literal <|endoftext|> and <pad> in text",
]


# ------------------------------------------------------------------------------------------- tokenizer
def test_byte_tokenizer_ids_are_bytes_and_round_trip():
    tok = byte_tokenizer()
    assert len(tok) == 258
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 256
    assert tok.pad_token == "<pad>" and tok.pad_token_id == 257
    for text in SAMPLES[:4]:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    # special tokens written in text are recognised by the tokenizer and still decode to the same text
    assert tok.decode(tok.encode(SAMPLES[4])) == SAMPLES[4]
    # any byte sequence that is valid UTF-8 round-trips, including random code points
    rng = random.Random(0)
    text = "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0xA0, 0xD7FF), rng.randrange(0x10000, 0x10FFFF)])) for _ in range(500))
    assert tok.decode(tok.encode(text)) == text


def test_byte_tokenizer_save_and_reload(tmp_path):
    from transformers import AutoTokenizer

    byte_tokenizer().save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(reloaded) == 258
    assert (reloaded.eos_token_id, reloaded.pad_token_id) == (256, 257)
    for text in SAMPLES:
        assert reloaded.decode(reloaded.encode(text)) == text
    assert reloaded.encode(SAMPLES[2]) == list(SAMPLES[2].encode("utf-8"))


def test_vocab_size_is_known_right_after_init():
    dm = TextDataModule(**CAPS)
    assert dm.vocab_size == len(dm.tokenizer) == 258
    assert dm._plan is None and not dm._streams  # nothing read or tokenised yet


# --------------------------------------------------------------------------------------------- stdlib
def test_stdlib_split_by_file_is_disjoint_and_deterministic():
    a, b = TextDataModule(**CAPS), TextDataModule(**CAPS)
    train, val = a.split_files()
    assert len(train) > 100 and len(val) > 10
    assert not set(train) & set(val)
    assert all(p.suffix == ".py" for p in train + val)
    assert (train, val) == b.split_files()
    # a different seed holds out other files (same file-level rule, different hash)
    _, val_other = TextDataModule(seed=1, **CAPS).split_files()
    assert set(val_other) != set(val)
    a.setup("fit")
    b.setup("fit")
    assert torch.equal(a.train_ids(), b.train_ids()) and torch.equal(a.heldout_ids(), b.heldout_ids())
    assert a.train_ids().numel() == CAPS["max_train_tokens"]
    assert a.heldout_ids().numel() == CAPS["max_val_tokens"]


def test_stdlib_streams_come_from_their_own_side():
    dm = TextDataModule(block_size=64, **CAPS)
    dm.setup("fit")
    train_files, val_files = dm.split_files()
    eos = dm.tokenizer.eos_token_id
    for ids, files in ((dm.train_ids(), train_files), (dm.heldout_ids(), val_files)):
        # the stream is the side's files, in order, each followed by EOS, cut at the cap
        expected = []
        for path in files:
            expected += list(path.read_text(encoding="utf-8", errors="replace").encode("utf-8")) + [eos]
            if len(expected) >= ids.numel():
                break
        assert ids.tolist() == expected[: ids.numel()]


# ------------------------------------------------------------------------------------------ local data
def _write_corpus(root, n=6):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"doc{i}.txt").write_text(f"document {i} ünïcödé " + "lorem ipsum dolor " * (20 + i), encoding="utf-8")
    (root / "ignored.bin").write_bytes(b"\x00\x01")
    return root


def test_local_directory_and_glob_sources_split_by_file(tmp_path):
    root = _write_corpus(tmp_path / "corpus")
    by_dir = TextDataModule(sources=str(root), block_size=16, val_fraction=0.3)
    by_glob = TextDataModule(sources=[str(root / "*.txt")], block_size=16, val_fraction=0.3)
    train, val = by_dir.split_files()
    assert sorted(p.name for p in train + val) == [f"doc{i}.txt" for i in range(6)]
    assert train and val and not set(train) & set(val)
    assert by_glob.split_files() == (train, val)
    by_dir.setup("fit")
    texts = {p: p.read_text(encoding="utf-8") for p in train}
    expected = []
    for path in train:
        expected += list(texts[path].encode("utf-8")) + [by_dir.tokenizer.eos_token_id]
    assert by_dir.train_ids().tolist() == expected


def test_single_file_holds_out_the_end_of_its_tokens(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("x" * 900 + "y" * 100, encoding="utf-8")
    dm = TextDataModule(sources=str(path), block_size=10, val_fraction=0.1)
    dm.setup("fit")
    train, val = dm.train_ids(), dm.heldout_ids()
    assert train.numel() + val.numel() == 1001  # 1000 bytes + EOS
    assert val.numel() == 100
    assert torch.equal(torch.cat([train, val]), torch.tensor(list(b"x" * 900 + b"y" * 100) + [256]))


def test_jsonl_source_uses_text_field_and_splits_by_record(tmp_path):
    path = tmp_path / "code.jsonl"
    records = [{"code": f"def f{i}():\n    return {i}  # ü\n" * 3, "lang": "python"} for i in range(20)]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    dm = TextDataModule(sources=str(path), text_field="code", block_size=16, val_fraction=0.2, seed=3)
    dm.setup("fit")
    eos = dm.tokenizer.eos_token_id
    decoded = {}
    for side, ids in (("train", dm.train_ids()), ("val", dm.heldout_ids())):
        pieces, current = [], []
        for t in ids.tolist():
            if t == eos:
                pieces.append(bytes(current).decode("utf-8"))
                current = []
            else:
                current.append(t)
        decoded[side] = pieces
    assert len(decoded["val"]) == 4 and len(decoded["train"]) == 16
    assert sorted(decoded["train"] + decoded["val"]) == sorted(r["code"] for r in records)
    assert not set(decoded["train"]) & set(decoded["val"])
    again = TextDataModule(sources=str(path), text_field="code", block_size=16, val_fraction=0.2, seed=3)
    assert torch.equal(again.heldout_ids(), dm.heldout_ids())


def test_jsonl_missing_text_field_names_the_fields(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"code": "x = 1"}) + "\n" + json.dumps({"code": "y = 2"}) + "\n", encoding="utf-8")
    dm = TextDataModule(sources=str(path), block_size=2)
    with pytest.raises(ValueError, match=r"text_field='text' is not a field.*\['code'\]"):
        dm.setup("fit")


# --------------------------------------------------------------------------------------- blocks, order
def test_blocks_have_the_documented_shape_and_validation_covers_every_block():
    dm = TextDataModule(block_size=32, batch_size=4, **CAPS)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].shape == (4, 32) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["attention_mask"], torch.ones(4, 32, dtype=torch.long))
    assert int(batch["input_ids"].max()) < dm.vocab_size
    val_blocks = torch.cat([b["input_ids"] for b in dm.val_dataloader()])
    n = CAPS["max_val_tokens"] // 32
    assert torch.equal(val_blocks, dm.heldout_ids()[: n * 32].view(n, 32))
    assert len(dm.train_dataloader().dataset) == CAPS["max_train_tokens"] // 32


def _order(dm, epoch=0):
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return torch.cat([b["input_ids"] for b in loader])


def test_train_order_is_seeded_and_changes_per_epoch():
    a = _order(TextDataModule(block_size=64, seed=7, **CAPS))
    b = _order(TextDataModule(block_size=64, seed=7, **CAPS))
    assert torch.equal(a, b)
    other_seed = TextDataModule(block_size=64, seed=8, **CAPS)
    dm = TextDataModule(block_size=64, seed=7, **CAPS)
    assert not torch.equal(_order(dm, epoch=1), a)
    assert torch.equal(_order(dm, epoch=0), a)  # a pure function of (seed, epoch)
    # every block exactly once per epoch
    blocks = dm.train_ids()[: (dm.train_ids().numel() // 64) * 64].view(-1, 64)
    assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, blocks.tolist()))
    assert not torch.equal(_order(other_seed), a)


def test_split_seed_fixes_the_held_out_text_while_seed_moves_the_run():
    fixed = [TextDataModule(block_size=64, seed=s, split_seed=0, **CAPS) for s in (0, 1)]
    plain = TextDataModule(block_size=64, seed=0, **CAPS)
    # split_seed=None is seed: seed 0 with split_seed 0 is the plain seed-0 module, file for file
    assert fixed[0].split_files() == plain.split_files()
    assert fixed[1].split_files() == plain.split_files()
    assert TextDataModule(seed=1, **CAPS).split_files() != plain.split_files()
    for dm in fixed + [plain]:
        dm.setup("fit")
    assert torch.equal(fixed[1].heldout_ids(), plain.heldout_ids())
    # the run seed still picks the training order and the calibration windows
    assert torch.equal(_order(fixed[0]), _order(plain))
    assert not torch.equal(_order(fixed[1]), _order(plain))
    assert not torch.equal(fixed[1].calibration_batches(nsamples=4, seqlen=64)[0],
                           plain.calibration_batches(nsamples=4, seqlen=64)[0])


def test_train_loader_resumes_mid_epoch_from_its_state_dict():
    dm = TextDataModule(block_size=64, batch_size=8, **CAPS)
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableDataLoader)
    loader.sampler.set_epoch(2)
    full = [b["input_ids"] for b in loader]
    it = iter(loader)
    seen = [next(it)["input_ids"] for _ in range(5)]
    state = loader.state_dict()
    assert state == {"epoch": 2, "consumed": 5}
    fresh = dm.train_dataloader()
    fresh.load_state_dict(state)
    fresh.sampler.set_epoch(2)
    rest = [b["input_ids"] for b in fresh]
    assert all(torch.equal(x, y) for x, y in zip(seen + rest, full)) and len(seen + rest) == len(full)
    # a state from another epoch (e.g. saved at an epoch's end) does not skip anything
    fresh.load_state_dict(state)
    fresh.sampler.set_epoch(3)
    assert len(list(fresh)) == len(full)


@pytest.mark.parametrize("stop", [4, 6, 8], ids=["mid-epoch", "epoch-end", "second-epoch"])
def test_lightning_resume_sees_the_same_batches(tmp_path, stop):
    import lightning.pytorch as pl

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch["input_ids"][:, 0].clone())
            return (self.weight * batch["input_ids"].float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def trainer(max_steps, **kwargs):
        return pl.Trainer(
            max_steps=max_steps, limit_train_batches=6, limit_val_batches=0, logger=False,
            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
            default_root_dir=tmp_path, enable_checkpointing=bool(kwargs.get("callbacks")), **kwargs
        )

    def data():
        return TextDataModule(block_size=64, batch_size=4, **CAPS)

    straight = Recorder()
    trainer(10).fit(straight, datamodule=data())
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=stop, save_top_k=-1)
    first = Recorder()
    trainer(stop, callbacks=[checkpoint]).fit(first, datamodule=data())
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    resumed = Recorder()
    trainer(10).fit(resumed, datamodule=data(), ckpt_path=str(path))
    assert len(straight.seen) == 10 and len(first.seen) == stop  # epochs are 6 batches long
    assert all(torch.equal(x, y) for x, y in zip(first.seen + resumed.seen, straight.seen))
    assert len(first.seen) + len(resumed.seen) == 10


# ---------------------------------------------------------------------------------------- calibration
def test_calibration_windows_are_seeded_shaped_and_from_train_files():
    dm = TextDataModule(**CAPS)
    windows = dm.calibration_batches(nsamples=16, seqlen=128)
    assert len(windows) == 16
    assert all(w.shape == (1, 128) and w.dtype == torch.long for w in windows)
    again = TextDataModule(**CAPS).calibration_batches(nsamples=16, seqlen=128)
    assert all(torch.equal(x, y) for x, y in zip(windows, again))
    other = dm.calibration_batches(nsamples=16, seqlen=128, seed=1)
    assert not all(torch.equal(x, y) for x, y in zip(windows, other))
    train_files, val_files = dm.split_files()
    train_text = [p.read_bytes() for p in train_files]
    for w in windows:
        chunk = bytes(w[0].tolist())  # a window lies inside one document: no EOS (256) inside
        assert any(chunk in text for text in train_text)
    assert len({tuple(w[0].tolist()) for w in windows}) > 1


def test_calibration_falls_back_to_the_stream_and_rejects_impossible_requests(tmp_path):
    root = _write_corpus(tmp_path / "corpus")
    dm = TextDataModule(sources=str(root), block_size=16, val_fraction=0.3)
    # documents are ~400 bytes; a 1000-token window has to span documents
    windows = dm.calibration_batches(nsamples=3, seqlen=1000)
    assert [tuple(w.shape) for w in windows] == [(1, 1000)] * 3
    with pytest.raises(ValueError, match=r"seqlen=100000 is longer than every training document"):
        dm.calibration_batches(nsamples=2, seqlen=100_000)
    with pytest.raises(ValueError, match=r"nsamples must be a positive integer \(>= 1\), got 0"):
        dm.calibration_batches(nsamples=0)


def test_calibration_batches_draw_with_the_one_window_sampler(tmp_path):
    """calibration_batches is calibration.sample_windows over the training documents: same windows."""
    root = _write_corpus(tmp_path / "corpus")
    dm = TextDataModule(sources=str(root), block_size=16, val_fraction=0.3, seed=3)
    stream_ids, spans = dm.train_ids(), dm._streams["train"].spans
    expected = sample_windows(lambda i: stream_ids[spans[i][0] : spans[i][1]], len(spans), 5, 64, seed=3)
    assert torch.equal(torch.cat(dm.calibration_batches(nsamples=5, seqlen=64)), expected)


# ------------------------------------------------------------------------------------------ bad input
def test_bad_arguments_are_all_reported_before_anything_is_read():
    with pytest.raises(ValueError) as info:
        TextDataModule(block_size=0, batch_size=-1, val_fraction=1.0, seed=-3, split_seed=-1, max_train_tokens=10,
                       num_workers=-1)
    message = str(info.value)
    for expected in (
        "block_size must be a positive integer (>= 1), got 0",
        "batch_size must be a positive integer (>= 1), got -1",
        "val_fraction must be in (0, 1)",
        "seed must be a non-negative integer, got -3",
        "split_seed must be None (use seed) or a non-negative integer, got -1",
        "num_workers must be a non-negative integer",
    ):
        assert expected in message
    with pytest.raises(ValueError, match=r"max_train_tokens must be None or at least block_size=256"):
        TextDataModule(max_train_tokens=100)
    with pytest.raises(TypeError, match=r"block_size must be a positive integer, got 2.5"):
        TextDataModule(block_size=2.5)
    with pytest.raises(TypeError, match=r"sources entries must be non-empty strings"):
        TextDataModule(sources=["stdlib", 3])
    with pytest.raises(ValueError, match=r"sources must be .* non-empty list"):
        TextDataModule(sources=[])


def test_missing_local_sources_and_unloadable_tokenizers_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"sources entry '.*nope\.txt' looks like a local path but no file"):
        TextDataModule(sources=str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match=r"sources entry '.*\*\.jsonl' looks like a local path"):
        TextDataModule(sources=str(tmp_path / "*.jsonl"))
    with pytest.raises(ValueError, match=r"tokenizer='.*no-such-dir': no such local directory or file; allowed: 'bytes'"):
        TextDataModule(tokenizer=str(tmp_path / "no-such-dir"))


def test_hub_dataset_offline_gives_a_clear_error():
    dm = TextDataModule(sources="gradprune-tests/no-such-dataset", block_size=8)  # a name: nothing read yet
    with pytest.raises(RuntimeError, match=r"could not load 'gradprune-tests/no-such-dataset'.*need network access"):
        dm.setup("fit")


def test_too_little_data_for_one_block(tmp_path):
    root = _write_corpus(tmp_path / "corpus", n=2)
    dm = TextDataModule(sources=str(root), block_size=4096)
    with pytest.raises(ValueError, match=r"has \d+ tokens, fewer than block_size=4096"):
        dm.setup("fit")


def test_a_hub_tokenizer_directory_is_used_for_encoding(tmp_path):
    """Any tokenizer load_tokenizer accepts works; here a saved one (the slow generic path)."""
    byte_tokenizer().save_pretrained(tmp_path / "tok")
    root = _write_corpus(tmp_path / "corpus")
    generic = TextDataModule(sources=str(root), tokenizer=str(tmp_path / "tok"), block_size=16, val_fraction=0.3)
    builtin = TextDataModule(sources=str(root), block_size=16, val_fraction=0.3)
    assert generic.vocab_size == 258
    assert torch.equal(generic.train_ids(), builtin.train_ids())
    assert torch.equal(generic.heldout_ids(), builtin.heldout_ids())


def test_validate_stage_tokenises_only_the_validation_side():
    dm = TextDataModule(**CAPS)
    dm.setup("validate")
    assert set(dm._streams) == {"val"}
    dm.setup("fit")
    assert set(dm._streams) == {"train", "val"}


def test_a_long_tokenisation_logs_its_progress(monkeypatch, gradprune_logs, tmp_path):
    import gradprune.data as data

    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(f"document {i} " * 50)
    monkeypatch.setattr(data, "TOKENIZE_LOG_SECONDS", 0.0)  # a line per document instead of one per 30 s
    gradprune_logs.at_info()
    module = TextDataModule(sources=[str(tmp_path / "*.txt")], block_size=8, val_fraction=0.34, max_train_tokens=2000)
    module.train_ids()
    lines = [m for m in gradprune_logs.messages() if m.startswith("tokenising ")]
    assert lines and all(" of at most 2000, " in line for line in lines), lines


def test_the_stdlib_sources_non_utf8_files_are_read_without_a_warning(monkeypatch, tmp_path, gradprune_logs):
    import gradprune.corpus as corpus

    (tmp_path / "lib").mkdir()
    for path in (tmp_path / "lib" / "module_koi8_r.py", tmp_path / "mine.py"):
        path.write_bytes(bytes(range(128, 256)) * 4)
    monkeypatch.setattr(corpus, "stdlib_root", lambda: tmp_path / "lib")
    assert "\ufffd" in corpus.read_text(tmp_path / "lib" / "module_koi8_r.py")  # read as before, quietly
    assert gradprune_logs.messages() == []
    corpus.read_text(tmp_path / "mine.py")  # a file the user chose still warns
    assert [f"{tmp_path / 'mine.py'} does not look like UTF-8 text" in m for m in gradprune_logs.messages()] == [True]
