"""Bad input never hangs: rotten shards, malformed tar headers, hostile YAML, absurd numbers.

Every test runs under an alarm (``limit``), so a regression to a loop that never ends fails the
test instead of stalling the suite.
"""
from __future__ import annotations

import io
import itertools
import tarfile

import numpy as np
import pytest

from data_fixtures import write_wds_shards
from shared_parts import time_limit
from mfrecipes.data.shards import Shards
from mfrecipes.data.tar import TarError, iter_members, iter_samples
from mfrecipes.errors import DataError




# -- shards whose samples never decode -----------------------------------------------------------

def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def test_wrong_sample_shape_is_one_error_naming_the_shard(tmp_path):
    write_wds_shards(tmp_path, 40, 10)  # [2] points; the recipe says [3]
    ds = Shards(urls=str(tmp_path / "shard-{000000..000003}.tar"), sample_shape=[3],
                max_consecutive_corrupt=25)
    with time_limit(), pytest.raises(DataError, match=r"25 samples in a row.*shard-00000\d\.tar.*"
                                                 r"shape") as err:
        next(ds.batches(4))
    assert err.value.path == "data.params"
    assert ds.counters()["data/skipped"] == 25


def test_default_bound_stops_a_large_undecodable_set(tmp_path):
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "shard-000000.tar")) as w:
        for i in range(3000):  # object arrays: never decodable (pickles are refused)
            w.write({"__key__": f"{i:06d}", "x.npy": b"\x93NUMPY garbage", "cls": 0})
    ds = Shards(urls=str(tmp_path / "shard-000000.tar"), sample_shape=[2], num_classes=10)
    with time_limit(), pytest.raises(DataError, match="1000 samples in a row"):
        next(ds.batches(8))


def test_an_epoch_with_nothing_decodable_is_an_error(tmp_path):
    # Fewer samples than the consecutive bound: the epoch rule must catch it.
    write_wds_shards(tmp_path, 6, 3)
    ds = Shards(urls=str(tmp_path / "shard-{000000..000001}.tar"), sample_shape=[5])
    with time_limit(), pytest.raises(DataError, match=r"no decodable sample in 3 epoch.*shape"):
        next(ds.batches(2))
    assert ds.counters()["data/skipped"] == 18


def test_workers_raise_the_same_error(tmp_path):
    write_wds_shards(tmp_path, 8, 4)
    ds = Shards(urls=str(tmp_path / "shard-{000000..000001}.tar"), sample_shape=[3],
                num_workers=1)
    with time_limit(60), pytest.raises(DataError, match="no decodable sample"):
        next(ds.batches(2))


def test_a_few_bad_samples_in_a_row_are_still_skipped(tmp_path):
    write_wds_shards(tmp_path, 20, 10, bad={3, 4, 5})
    ds = Shards(urls=str(tmp_path / "shard-{000000..000001}.tar"), shuffle_buffer=1,
                max_consecutive_corrupt=4)
    with time_limit():
        got = [int(x[0, 0]) for x, _ in itertools.islice(ds.batches(1), 17)]
    assert sorted(got) == [i for i in range(20) if i not in (3, 4, 5)]
    assert ds.counters()["data/skipped"] == 3


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e300])
def test_non_finite_sample_is_skipped_and_counted(tmp_path, bad):
    import webdataset as wds

    path = tmp_path / "shard-000000.tar"
    with wds.TarWriter(str(path)) as w:
        for i in range(6):
            x = np.array([i, -i], np.float64)
            if i == 2:
                x[1] = bad  # 1e300 is finite in float64 but inf once cast to float32
            w.write({"__key__": f"{i:06d}", "x.npy": _npy(x), "cls": b"%d" % (i % 10)})
    ds = Shards(urls=str(path), sample_shape=[2], num_classes=10, shuffle_buffer=1)
    with time_limit():
        x, _ = next(ds.batches(5))
    assert np.isfinite(x.numpy()).all()
    assert x[:, 0].tolist() == [0, 1, 3, 4, 5]
    assert ds.counters()["data/skipped"] == 1


# -- malformed tar headers -----------------------------------------------------------------------

def _tar_with_pax(records: bytes) -> bytes:
    """A tar whose first member is a pax header holding ``records``, then one regular file."""
    from mfrecipes.data.tar import _header

    pad = lambda b: b + b"\0" * (-len(b) % 512)  # noqa: E731
    body = b"x" * 5
    return (_header(b"././@PaxHeader", len(records), b"x") + pad(records)
            + _header(b"000001.cls", len(body)) + pad(body) + b"\0" * 1024)


@pytest.mark.parametrize("records", [b"0 path=a\n", b"00 path=a\n", b"ab path=a\n",
                                     b"-5 path=a\n", b"99999 path=a\n",
                                     b"9" * 400 + b" path=a\n", b"3 path=a\n", b"nospace"])
def test_malformed_pax_lengths_are_tar_errors(records):
    with time_limit(), pytest.raises(TarError, match="pax header"):
        list(iter_members(io.BytesIO(_tar_with_pax(records))))


def test_wellformed_pax_still_reads():
    from mfrecipes.data.tar import _pax_record

    got = list(iter_members(io.BytesIO(_tar_with_pax(_pax_record("path", "a/0001.cls")))))
    assert got == [("a/0001.cls", b"xxxxx")]


def _one_member(size_field: bytes) -> bytes:
    from mfrecipes.data.tar import _header

    h = bytearray(_header(b"000001.cls", 5))
    h[124:136] = size_field
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h) + b"x" * 5 + b"\0" * 507 + b"\0" * 1024


@pytest.mark.parametrize("size_field, why", [
    (b"77777777777\0", "end of data"),                    # 8 GiB, beyond this 2 KiB file
    (b"\x80" + b"\xff" * 11, "not a member size"),      # base-256: 2**88 bytes
    (b"-0000000001\0", "not a member size"),              # negative: would read the whole file
    (b"notoctal!!!\0", "bad size field"),
])
def test_size_fields_beyond_the_file_are_tar_errors(size_field, why):
    with time_limit(), pytest.raises(TarError, match=why):
        list(iter_members(io.BytesIO(_one_member(size_field))))


def test_corrupt_headers_in_a_shard_are_skipped_and_counted(tmp_path):
    good = tmp_path / "shard-000000.tar"
    write_wds_shards(tmp_path / "src", 4, 4)
    good.write_bytes((tmp_path / "src" / "shard-000000.tar").read_bytes())
    (tmp_path / "shard-000001.tar").write_bytes(_tar_with_pax(b"0 path=a\n"))
    (tmp_path / "shard-000002.tar").write_bytes(_one_member(b"\x80" + b"\xff" * 11))
    ds = Shards(urls=str(tmp_path / "shard-{000000..000002}.tar"), sample_shape=[2],
                num_classes=10, shuffle_buffer=1)
    with time_limit():
        x, _ = next(ds.batches(8))  # two epochs of the good shard
    assert sorted(x[:, 0].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert ds.counters()["data/skipped"] >= 2
    # and tarfile agrees the good shard is a tar
    with tarfile.open(good) as t:
        assert len(t.getnames()) == 8
    assert len(list(iter_samples(open(good, "rb")))) == 4


# -- hostile YAML and absurd numbers in recipes --------------------------------------------------



def _check(tmp_path, capsys, recipe_text: str | None = None, overrides=()):
    """``mfr check`` under an alarm; returns (exit code, stderr)."""
    from pathlib import Path

    from mfrecipes.cli import main

    path = Path(__file__).resolve().parents[1] / "recipes" / "toy2d_meanflow.yaml"
    if recipe_text is not None:
        path = tmp_path / "r.yaml"
        path.write_text(f"base: {Path(__file__).resolve().parents[1]}/recipes/"
                        f"toy2d_meanflow.yaml\n" + recipe_text)
    with time_limit(30):
        rc = main(["check", str(path), *overrides])
    return rc, capsys.readouterr().err


LAUGHS = "\n".join(["data:", "  name: toy2d", "  params:", "    kind: checkerboard",
                    "x0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
                   + [f"x{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]"
                      for i in range(1, 10)])


def test_billion_laughs_in_a_file_is_refused(tmp_path, capsys):
    text = LAUGHS + "\nbackbone: {name: mlp, params: {hidden: 8, extra: *a9}}\n"
    rc, err = _check(tmp_path, capsys, text)
    assert rc != 0 and "expands to more than" in err


def test_billion_laughs_in_an_override_is_refused(tmp_path, capsys):
    value = "{" + ", ".join(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}" if i else "lol"] * 10)
                            + "]" for i in range(10)) + "}"
    rc, err = _check(tmp_path, capsys, overrides=[f"data.params={value}"])
    assert rc != 0 and "expands to more than" in err and "data.params" in err


def test_recursive_alias_is_refused(tmp_path, capsys):
    rc, err = _check(tmp_path, capsys, "backbone: {name: mlp, params: &p {hidden: 8, me: *p}}\n")
    assert rc != 0 and "recursive alias" in err


@pytest.mark.parametrize("where", ["file", "override", "dotted"])
def test_deep_nesting_is_refused(tmp_path, capsys, where):
    deep = "[" * 2000 + "]" * 2000
    if where == "file":
        rc, err = _check(tmp_path, capsys, f"data: {{name: toy2d, params: {{kind: {deep}}}}}\n")
    elif where == "override":
        rc, err = _check(tmp_path, capsys, overrides=[f"data.params.kind={deep}"])
    else:
        rc, err = _check(tmp_path, capsys, overrides=[".".join(["a"] * 2000) + "=1"])
    assert rc != 0 and "deeper than" in err


@pytest.mark.parametrize("override, path, why", [
    ("backbone.params.depth=1e30", "backbone.params.depth", "depth must be an integer in"),
    ("backbone.params.depth=1000000000000000000000000000000", "backbone.params.depth",
     "depth"),
    ("backbone.params.hidden=100000000", "backbone.params.hidden", "hidden must be an integer in"),
    ("run.seed=1e30", "run.seed", "beyond any value"),
    ("run.seed=4294967296", "run.seed", "a seed must be"),
    ("eval.seed=-1", "eval.seed", "a seed must be"),
    ("train.lr=.inf", "train.lr", "finite"),
    ("train.lr=1e30", "train.lr", "must be <= 1"),
    ("train.weight_decay=.inf", "train.weight_decay", "finite"),
    ("train.weight_decay=1e5", "train.weight_decay", "lr \\* weight_decay"),
    ("train.grad_clip=.nan", "train.grad_clip", "finite"),
    ("train.betas=[.nan, 0.9]", "train.betas[0]", "finite"),
    ("train.ema_decays=[]", "train.ema_decays", "at least one"),
    ("eval.nfe=[]", "eval.nfe", "non-empty"),
    ("train.micro_batch_size=100", "train.micro_batch_size", "does not divide"),
    ("train.global_batch_size=1e30", "train.global_batch_size", "beyond"),
    ("timestep_sampler.params.sigma=1e300", "timestep_sampler.params.sigma", "sigma"),
    ("timestep_sampler.params.mu=-1e300", "timestep_sampler.params.mu", "mu"),
    ("gap_schedule.name=progressive", None, None),  # fine as it is ...
    ("data.params.num_points=-.inf", "data.params.num_points", "num_points"),
    ("data.params.num_points=1000000000000000000000000000000", "data.params.num_points",
     "num_points"),
])
def test_absurd_numbers_are_refused_with_the_key_path(tmp_path, capsys, override, path, why):
    rc, err = _check(tmp_path, capsys, overrides=[override])
    if why is None:
        assert rc == 0, err
        return
    assert rc != 0 and f"error: {path}" in err, err
    assert pytest.importorskip("re").search(why, err), err
    assert "Traceback" not in err


def test_mc_draws_beyond_range_is_refused(tmp_path, capsys):
    rc, err = _check(tmp_path, capsys, overrides=["gap_schedule.name=progressive",
                                                  "gap_schedule.params.mc_draws=1e30"])
    assert rc != 0 and "mc_draws" in err
