import os

os.environ["HF_HUB_OFFLINE"] = "1"

import argparse
import gzip
import io
import json
import logging
import multiprocessing
import pickle
import re
import tarfile
from collections import Counter

import pytest

from bigsid import data
from bigsid.config import DataConfig
from bigsid.data import DataError, build_prompt_stream, inspect, pack


def write_tar(path, samples) -> str:
    """samples: [(key, {extension: bytes})], written in order."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, payload in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return str(path)


def caption_shards(folder, shards: int, per_shard: int) -> str:
    """Shards of unique captions 'caption S I'; returns their brace pattern."""
    for s in range(shards):
        write_tar(folder / f"shard-{s:03d}.tar",
                  [(f"{s:03d}-{i:03d}", {"txt": f"caption {s} {i}".encode()}) for i in range(per_shard)])
    return f"{folder}/shard-{{000..{shards - 1:03d}}}.tar"


def shard_of(caption: str) -> int:
    return int(caption.split()[1])


def test_vocab_stream_is_a_seeded_function_of_seed_and_workers():
    vocabulary = [f"prompt {i}" for i in range(7)]

    def draws(seed, workers=0):
        stream = build_prompt_stream(DataConfig(num_workers=workers), seed=seed, vocabulary=vocabulary)
        try:
            return stream.next_batch(3000)
        finally:
            stream.close()

    first = draws(3)
    assert first == draws(3)
    assert first != draws(4) and first != draws(3, workers=2)
    counts = [first.count(p) for p in vocabulary]
    assert min(counts) > 0.8 * 3000 / 7 and max(counts) < 1.2 * 3000 / 7  # uniform draws from the whole list
    with pytest.raises(DataError, match="toy prompt list"):
        build_prompt_stream(DataConfig(), seed=0, vocabulary=None)


@pytest.mark.parametrize("workers", [0, 2])
def test_text_source_reads_each_line_once_per_epoch_and_counts_bad_lines(tmp_path, workers):
    path = tmp_path / "prompts.txt"
    lines = [f"line {i}".encode() for i in range(30)]
    path.write_bytes(b"\n".join(lines[:10] + [b"", b"  \t", b"\xff\xfe broken"] + lines[10:]) + b"\n")
    stream = build_prompt_stream(DataConfig(source="text", path=str(path), num_workers=workers), seed=5)
    try:
        epochs = [stream.next_batch(30) for _ in range(2)]
    finally:
        stream.close()
    for epoch in epochs:
        assert sorted(epoch) == sorted(line.decode() for line in lines)  # the workers' shares: disjoint, complete
    assert epochs[0] != epochs[1]  # reshuffled per epoch
    stats = stream.stats()
    assert stats["skipped"] == {"empty_caption": 2, "invalid_utf8": 1}
    assert stats["by_shard"] == {str(path): {"empty_caption": 2, "invalid_utf8": 1}}
    assert stats["prompts"] == 60


@pytest.mark.parametrize("workers", [0, 2])
def test_shard_streams_read_every_caption_once_per_epoch_and_workers_apart(tmp_path, workers):
    pattern = caption_shards(tmp_path, shards=8, per_shard=5)
    stream = build_prompt_stream(DataConfig(source="webdataset", path=pattern, num_workers=workers), seed=1)
    try:
        first_shards = []
        for _ in range(2):  # an epoch: 40 prompts, 8 shards (4 per worker)
            epoch = stream.next_batch(40)
            assert len(set(epoch)) == 40  # every caption once: no stream overlaps another
            shard_sets = [{shard_of(p) for p in epoch[w::max(1, workers)]} for w in range(max(1, workers))]
            assert sum(len(s) for s in shard_sets) == len(set().union(*shard_sets))  # workers read apart
            first_shards.append([shard_of(p) for p in epoch[:5]])
        assert first_shards[0] != first_shards[1]  # shards are dealt afresh each epoch
    finally:
        stream.close()


def test_samples_are_reshuffled_within_a_shard_each_epoch(tmp_path):
    stream = build_prompt_stream(DataConfig(source="webdataset", path=caption_shards(tmp_path, 1, 20)),
                                 seed=0)
    file_order = [f"caption 0 {i}" for i in range(20)]
    first, second = stream.next_batch(20), stream.next_batch(20)
    assert sorted(first) == sorted(second) == sorted(file_order)
    assert len({tuple(first), tuple(second), tuple(file_order)}) == 3


RESUME_CASES = {  # source -> (prompts to draw, cut points: block / shard / epoch boundaries and around them)
    "vocab": (8200, [0, 5, 4096, 8193]),
    "text": (30, [0, 3, 5, 9, 10, 11, 23]),
    "webdataset": (56, [0, 3, 4, 8, 9, 24, 25, 41]),
}


def resume_config(source, tmp_path, workers) -> tuple[DataConfig, dict, int]:
    """The config, the build keywords, and the prompts per epoch (0 for vocab)."""
    if source == "vocab":
        return DataConfig(num_workers=workers), {"vocabulary": [f"prompt {i}" for i in range(5)]}, 0
    if source == "text":
        path = tmp_path / "prompts.txt"
        path.write_text("".join(f"prompt {i}\n" for i in range(10)))
        return DataConfig(source="text", path=str(path), num_workers=workers), {}, 10
    return DataConfig(source="webdataset", path=caption_shards(tmp_path, 6, 4), num_workers=workers), {}, 24


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("source", list(RESUME_CASES))
def test_resume_continues_with_exactly_the_same_prompts(tmp_path, source, workers):
    cfg, extra, epoch = resume_config(source, tmp_path, workers)
    total, cuts = RESUME_CASES[source]

    def fresh():
        return build_prompt_stream(cfg, seed=11, **extra)

    reference = fresh()
    expected = reference.next_batch(total)
    reference.close()
    if epoch:  # the cut points do cross an epoch: the next epoch is the same prompts, reshuffled
        assert len(set(expected[:epoch])) == epoch
        assert sorted(expected[:epoch]) == sorted(expected[epoch:2 * epoch]) != expected[:epoch]
    for cut in cuts:
        first = fresh()
        assert first.next_batch(cut // 2) + first.next_batch(cut - cut // 2) == expected[:cut]
        state = json.loads(json.dumps(first.state_dict()))
        first.close()
        resumed = fresh()
        resumed.load_state_dict(state)
        assert resumed.next_batch(total - cut) == expected[cut:], f"cut at {cut}"
        resumed.close()


def test_state_of_another_sequence_or_malformed_is_refused(tmp_path):
    cfg = DataConfig(source="webdataset", path=caption_shards(tmp_path, 4, 3))
    stream = build_prompt_stream(cfg, seed=0)
    stream.next_batch(4)
    state = stream.state_dict()
    with pytest.raises(DataError, match="num_workers = 0 and this stream 2"):
        build_prompt_stream(DataConfig(**{**vars(cfg), "num_workers": 2}), seed=0).load_state_dict(state)
    with pytest.raises(DataError, match="seed = 0 and this stream 1"):
        build_prompt_stream(cfg, seed=1).load_state_dict(state)
    per_rank = {k: v for k, v in state.items() if k != "order"} | {"rank": 0, "world_size": 2}  # an older format
    with pytest.raises(DataError, match="order = None and this stream 'global'"):
        build_prompt_stream(cfg, seed=0).load_state_dict(per_rank)
    with pytest.raises(DataError, match="malformed"):
        build_prompt_stream(cfg, seed=0).load_state_dict({**state, "positions": [[0, 0]]})


def evil_pickle(marker) -> bytes:
    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    return pickle.dumps(Payload())


def bad_data_shards(folder) -> dict[str, str]:
    """One clean shard and four kinds of bad one; returns name -> path, in list order."""
    shards = {"good": write_tar(folder / "good.tar", [(f"g{i}", {"txt": f"good {i}".encode()}) for i in range(4)])}
    shards["mixed"] = write_tar(folder / "mixed.tar", [
        ("m0", {"txt": b"mixed ok 0"}),
        ("m1", {"jpg": b"\x89PNG not a caption"}),
        ("m2", {"txt": b"  \n\t "}),
        ("m3", {"txt": b"caf\xe9 \xff"}),
        ("m4", {"txt": b"one two three four five six seven eight nine ten"}),
        ("m5", {"pyd": evil_pickle(folder / "pwned"), "txt": b"pickle carrier"}),
        ("m6", {"txt": b"mixed ok 1"}),
    ])
    whole = folder / "whole.tar"
    write_tar(whole, [(f"c{i}", {"txt": f"cut {i} {'x' * 600}".encode()}) for i in range(5)])  # 2-block members
    with tarfile.open(whole) as tar:
        members = tar.getmembers()
    raw = whole.read_bytes()
    # Cut at a member boundary (Python's tarfile alone takes that for a smaller, whole archive) and mid-data:
    # whole captions before the cut are kept, 4 and 2 samples remain.
    (folder / "cut_boundary.tar").write_bytes(raw[:members[4].offset])
    (folder / "cut_mid.tar").write_bytes(raw[:members[2].offset_data + 300])
    shards["cut_boundary"], shards["cut_mid"] = str(folder / "cut_boundary.tar"), str(folder / "cut_mid.tar")
    (folder / "not_a_tar.tar").write_bytes(bytes(range(256)) * 8)
    shards["not_a_tar"] = str(folder / "not_a_tar.tar")
    whole.unlink()
    return shards


def test_bad_data_is_skipped_counted_per_shard_and_logged_once(tmp_path, caplog):
    (tmp_path / "proof").mkdir()
    pickle.loads(evil_pickle(tmp_path / "proof" / "pwned")).close()
    assert (tmp_path / "proof" / "pwned").exists()  # the payload does run when unpickled
    shards = bad_data_shards(tmp_path)
    cfg = DataConfig(source="webdataset", path="::".join(shards.values()))
    stream = build_prompt_stream(cfg, seed=2,
                                 token_count=lambda p: len(p.split()), max_tokens=8)
    caplog.set_level(logging.WARNING, logger="bigsid.data")
    epoch = stream.next_batch(14)  # 4 good + 4 mixed + 4 before the boundary cut + 2 before the mid-data cut
    assert sorted(epoch) == sorted([f"good {i}" for i in range(4)] + ["mixed ok 0", "mixed ok 1", "pickle carrier",
                                   "one two three four five six seven eight nine ten"]
                                   + [f"cut {i} {'x' * 600}" for i in (0, 1, 2, 3, 0, 1)])
    assert not (tmp_path / "pwned").exists()
    per_epoch = {
        shards["mixed"]: {"missing_caption": 1, "empty_caption": 1, "invalid_utf8": 1, "truncated": 1},
        shards["cut_boundary"]: {"bad_shard": 1},
        shards["cut_mid"]: {"bad_shard": 1},
        shards["not_a_tar"]: {"bad_shard": 1},
    }
    stats = stream.stats()
    assert stats["by_shard"] == per_epoch
    assert stats["skipped"] == {"missing_caption": 1, "empty_caption": 1, "invalid_utf8": 1, "bad_shard": 3}
    assert stats["repaired"] == {"truncated": 1}
    assert sorted(stream.next_batch(28)) == sorted(epoch * 2)  # two more epochs, still counted, not logged again
    assert stream.stats()["by_shard"] == {shard: {k: 3 * n for k, n in kinds.items()}
                                          for shard, kinds in per_epoch.items()}
    logged = [(r.getMessage().split(":")[0], r.getMessage()) for r in caplog.records if r.name == "bigsid.data"]
    assert len(logged) == sum(len(kinds) for kinds in per_epoch.values())
    assert {shard for shard, _ in logged} == set(per_epoch)
    assert not (tmp_path / "pwned").exists()


def test_problem_counts_survive_a_resume_without_loss_or_double_counting(tmp_path):
    """The counts travel in the state (as the trainer's checkpoint stores it, JSON): a resumed stream goes on
    counting from there, and ends with exactly the counts of an uninterrupted one."""
    shards = bad_data_shards(tmp_path)
    cfg = DataConfig(source="webdataset", path="::".join(shards.values()))

    def fresh():
        return build_prompt_stream(cfg, seed=2)

    whole = fresh()
    whole.next_batch(14 + 5)
    expected = whole.stats()
    assert expected["skipped"]["bad_shard"] == 4 and expected["prompts"] == 19  # one epoch and a bit
    for cut in range(20):
        first = fresh()
        first.next_batch(cut)
        resumed = fresh()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        resumed.next_batch(19 - cut)
        assert resumed.stats() == expected, f"cut at {cut}"
    # the per-rank states of an older checkpoint: their counts, summed, run on
    parts = [fresh(), fresh()]
    for part, n in zip(parts, (9, 14)):
        part.next_batch(n)
    restarted = fresh()
    restarted.load_counts(json.loads(json.dumps([part.state_dict() for part in parts])))
    counts = [part.stats()["by_shard"] for part in parts]
    assert restarted.stats()["prompts"] == 23 and restarted.stats()["by_shard"] == {
        shard: dict(Counter(counts[0].get(shard, {})) + Counter(counts[1].get(shard, {})))
        for shard in counts[0].keys() | counts[1].keys()}
    state = fresh().state_dict()
    for counts in ({"prompts": -1, "by_shard": {}}, {"prompts": 0, "by_shard": {"a.tar": {"no_such_kind": 1}}}):
        with pytest.raises(DataError, match="malformed prompt-stream state: counts"):
            fresh().load_state_dict({**state, "counts": counts})


def test_a_shard_cut_after_a_whole_member_keeps_it(tmp_path):
    """A shard that breaks off keeps every sample whose caption was read whole, the last one included; the cut
    still counts as a bad shard. A caption cut in its data is lost."""
    whole = tmp_path / "whole.tar"
    write_tar(whole, [(f"s{i}", {"txt": f"sample {i}".encode(), "jpg": b"\xff" * 600}) for i in range(3)])
    with tarfile.open(whole) as tar:
        last_txt, last_jpg = tar.getmembers()[-2:]
    raw = whole.read_bytes()
    # the 600-byte image fills two 512-byte blocks; after them only the end-of-archive zero blocks are cut
    cuts = {"end_blocks": last_jpg.offset_data + 1024,
            "mid_image": last_jpg.offset_data + 300,  # the last sample's caption is whole, its image is not
            "mid_caption": last_txt.offset_data + 3}
    for name, end in cuts.items():
        (tmp_path / f"{name}.tar").write_bytes(raw[:end])
        report = inspect(str(tmp_path / f"{name}.tar"))
        kept = 2 if name == "mid_caption" else 3
        assert report["prompts"] == kept and report["skipped"] == {"bad_shard": 1}, (name, report)
        assert report["examples"] == [f"sample {i}" for i in range(kept)], name


def test_inspect_reports_bad_items_per_kind_and_shard(tmp_path):
    shards = bad_data_shards(tmp_path)
    report = inspect("::".join(shards.values()), "txt", n=3)
    assert report["shards"] == 5 and report["prompts"] == 14
    assert report["samples"] == 4 + 7 + 4 + 2
    assert report["skipped"] == {"missing_caption": 1, "empty_caption": 1, "invalid_utf8": 1, "bad_shard": 3}
    assert set(report["errors"]) == {shards["cut_boundary"], shards["cut_mid"], shards["not_a_tar"]}
    assert report["examples"] == ["good 0", "good 1", "good 2"]
    assert report["members"] == {"txt": 4 + 6 + 4 + 2, "jpg": 1, "pyd": 1}
    assert not (tmp_path / "pwned").exists()


def test_json_caption_field(tmp_path):
    pattern = write_tar(tmp_path / "json.tar", [
        ("a", {"json": json.dumps({"caption": "a red cat", "url": "x"}).encode(), "jpg": b"..."}),
        ("b", {"json": b"{not json"}),
        ("c", {"json": json.dumps({"text": "no caption key"}).encode()}),
        ("d", {"json": json.dumps({"caption": 5}).encode()}),
        ("e", {"json": json.dumps({"caption": "   "}).encode()}),
        ("f", {"json": json.dumps({"caption": " a blue dog "}).encode()}),
        ("g", {"json": b'{"caption": "lone \\ud800 surrogate"}'}),
    ])
    stream = build_prompt_stream(DataConfig(source="webdataset", path=pattern, caption_key="json:caption"),
                                 seed=0)
    assert sorted(stream.next_batch(2)) == ["a blue dog", "a red cat"]
    assert stream.stats()["skipped"] == {"invalid_json": 1, "missing_caption": 2, "empty_caption": 1,
                                         "invalid_utf8": 1}


def test_pipe_and_gzip_shards_read_like_local_ones(tmp_path):
    pattern = caption_shards(tmp_path, 1, 6)
    local = tmp_path / "shard-000.tar"
    with open(local, "rb") as plain, gzip.open(tmp_path / "shard.tar.gz", "wb") as packed:
        packed.write(plain.read())
    expected = sorted(f"caption 0 {i}" for i in range(6))
    for path in (pattern, f"pipe:cat {local}", str(tmp_path / "shard.tar.gz")):
        stream = build_prompt_stream(DataConfig(source="webdataset", path=path), seed=0)
        assert sorted(stream.next_batch(6)) == expected, path
        assert stream.stats()["skipped"] == {}


def test_a_pipe_shard_cut_short_once_is_read_again_in_full(tmp_path):
    """A transient failure of a pipe (its second read, the first the stream makes after the build's probe, stops
    after one sample) is read again: the same prompts in the same order as from the file, nothing counted bad."""
    caption_shards(tmp_path, 1, 6)
    local, count = tmp_path / "shard-000.tar", tmp_path / "reads"
    flaky = (f"pipe:sh -c 'n=$(($(cat {count} 2>/dev/null || echo 0) + 1)); echo $n > {count}; "
             f"if [ $n -eq 2 ]; then head -c 1536 {local}; exit 1; fi; cat {local}'")
    expected = build_prompt_stream(DataConfig(source="webdataset", path=str(local)), seed=0).next_batch(6)
    stream = build_prompt_stream(DataConfig(source="webdataset", path=flaky), seed=0)
    assert stream.next_batch(6) == expected
    assert stream.stats()["skipped"] == {} and int(count.read_text()) >= 3


def test_unusable_sources_are_refused_at_build(tmp_path):
    assert issubclass(DataError, ValueError)
    pattern = caption_shards(tmp_path, 2, 3)

    def build(path, **fields):
        return build_prompt_stream(DataConfig(source="webdataset", path=path, **fields), seed=0)

    with pytest.raises(DataError, match="names no shards"):
        build("::")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/shard-002.tar")):
        build(f"{tmp_path}/shard-{{000..002}}.tar")
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(DataError, match="no prompt in the first shards"):
        build(str(tmp_path / "junk.tar"))
    with pytest.raises(DataError, match="exit 1"):
        build(f"pipe:cat {tmp_path}/absent.tar")
    with pytest.raises(DataError, match="members found: txt"):
        build(pattern, caption_key="json:caption")
    with pytest.raises(DataError, match="2 shards for 4 streams"):
        build(pattern, num_workers=4)
    with pytest.raises(DataError, match="caption key"):
        build(pattern, caption_key="json:")
    with pytest.raises(DataError, match="no such prompt file"):
        build_prompt_stream(DataConfig(source="text", path=str(tmp_path / "absent.txt")), seed=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_shards_gone_bad_after_build_raise_instead_of_looping(tmp_path, workers):
    pattern = caption_shards(tmp_path, 2, 3)
    stream = build_prompt_stream(DataConfig(source="webdataset", path=pattern, num_workers=workers),
                                 seed=0)
    for shard in tmp_path.glob("shard-*.tar"):
        shard.write_bytes(b"\0garbage" * 64)
    with pytest.raises(DataError, match="shards in a row without a prompt"):
        stream.next_batch(1)
    stream.close()


def test_close_stops_the_loader_workers(tmp_path):
    stream = build_prompt_stream(DataConfig(source="webdataset", path=caption_shards(tmp_path, 2, 3), num_workers=2),
                                 seed=0)
    before = set(multiprocessing.active_children())
    stream.next_batch(4)
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 2
    stream.close()
    assert not workers & set(multiprocessing.active_children())


def test_pack_txt_round_trip_and_overwrite_refusal(tmp_path):
    prompts = [f"prompt {i}" for i in range(23)]
    source = tmp_path / "prompts.txt"
    source.write_text("\n".join(prompts[:5] + ["   "] + prompts[5:]) + "\n")
    out = tmp_path / "shards"
    shards = pack(source, out, shard_size=5)
    assert [os.path.basename(s) for s in shards] == [f"shard-{i:06d}.tar" for i in range(5)]
    report = inspect(f"{out}/shard-{{000000..000004}}.tar", "txt", n=100)
    assert report["examples"] == prompts and report["skipped"] == {}
    with pytest.raises(DataError, match="not empty"):
        pack(source, out)
    assert pack(source, out, shard_size=100, force=True) == [str(out / "shard-000000.tar")]
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar"]  # the earlier pack's shards are gone


def test_pack_jsonl_round_trip_with_a_json_caption(tmp_path):
    source = tmp_path / "prompts.jsonl"
    rows = [json.dumps({"text": f"prompt {i}"}) for i in range(12)] + ["{broken", json.dumps({"other": 1})]
    source.write_text("\n".join(rows) + "\n")
    pack(source, tmp_path / "out", caption_field="json:caption", input_field="text", shard_size=4)
    cfg = DataConfig(source="webdataset", path=f"{tmp_path}/out/shard-{{000000..000002}}.tar",
                     caption_key="json:caption")
    stream = build_prompt_stream(cfg, seed=0)
    assert sorted(stream.next_batch(12)) == sorted(f"prompt {i}" for i in range(12))
    assert stream.stats()["skipped"] == {}


def test_pack_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    source = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"caption": ["a cat", None, "a dog", " "], "n": [1, 2, 3, 4]}), source)
    pack(source, tmp_path / "out")
    assert inspect(f"{tmp_path}/out/shard-000000.tar", "txt")["examples"] == ["a cat", "a dog"]
    with pytest.raises(DataError, match="no column 'prompt'"):
        pack(source, tmp_path / "other", input_field="prompt")


def test_cli_pack_and_inspect(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    data.add_cli(parser.add_subparsers(dest="command"))
    source = tmp_path / "prompts.txt"
    source.write_text("".join(f"prompt {i}\n" for i in range(7)))
    args = parser.parse_args(["data", "pack", str(source), str(tmp_path / "out"), "--shard-size", "3"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    pattern = re.search(r"data.path='([^']+)'", printed).group(1)
    assert pattern == f"{tmp_path}/out/shard-{{000000..000002}}.tar"
    args = parser.parse_args(["data", "inspect", pattern, "-n", "2"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "3 shards, 7 samples, 7 prompts" in printed and "samples per member: txt 7" in printed
    assert "prompt 1" in printed and "prompt 2" not in printed


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_shards_of_unequal_sizes_pass_each_prompt_once_per_epoch(tmp_path, workers):
    """Shards of 1 to 7 captions dealt to streams: the streams' shares of an epoch differ, and one that ends its
    share waits for the others, so every epoch is the 28 captions once, also across a resume inside one."""
    for s in range(7):
        write_tar(tmp_path / f"shard-{s:03d}.tar", [(f"{s}-{i}", {"txt": f"caption {s} {i}".encode()})
                                                  for i in range(s + 1)])
    cfg = DataConfig(source="webdataset", path=f"{tmp_path}/shard-{{000..006}}.tar", num_workers=workers)
    stream = build_prompt_stream(cfg, seed=3)
    expected = stream.next_batch(3 * 28)
    stream.close()
    for epoch in range(3):
        assert len(set(expected[28 * epoch:28 * (epoch + 1)])) == 28
    for cut in (20, 27, 30):  # streams waiting, all just done, the next epoch begun
        first = build_prompt_stream(cfg, seed=3)
        assert first.next_batch(cut) == expected[:cut]
        state = json.loads(json.dumps(first.state_dict()))
        first.close()
        resumed = build_prompt_stream(cfg, seed=3)
        resumed.load_state_dict(state)
        assert resumed.next_batch(3 * 28 - cut) == expected[cut:], f"cut at {cut}"
        resumed.close()


def test_more_workers_than_shards_are_refused_with_the_config(tmp_path):
    """Refused as the config is read, before any network is built (each worker reads its own shards)."""
    from bigsid.config import ConfigError, load_config

    pattern = caption_shards(tmp_path, 2, 3)
    with pytest.raises(ConfigError, match="data.num_workers = 4: data.path has 2 shards"):
        load_config(None, ["data.source=webdataset", f"data.path={pattern}", "data.num_workers=4"])
    assert load_config(None, ["data.source=webdataset", f"data.path={pattern}", "data.num_workers=2"])
