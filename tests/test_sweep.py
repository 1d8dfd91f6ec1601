import json

from cambackdoor.sweep import point_config, point_done


def test_a_point_is_done_only_with_the_same_config_parent_data_and_limit(tmp_path):
    point, extra = {"lambda": 0.5}, ["--epochs", "1", "--limit", "20", "--set", "batch_size=25"]
    record = {"config": point_config(point, "default", extra), "limit": 20, "parent_sha256": "p1",
              "data_fingerprint": "d1"}
    (tmp_path / "implant.json").write_text(json.dumps(record))
    assert point_done(tmp_path, point, "default", extra, "p1", "d1")
    assert not point_done(tmp_path, point, "default", extra, "p2", "d1")  # another stage-1 model
    assert not point_done(tmp_path, point, "default", extra, "p1", "d2")  # other data
    assert not point_done(tmp_path, point, "default", extra[:2] + ["--limit", "40"] + extra[4:], "p1", "d1")
    assert not point_done(tmp_path, point, "default", extra[:4], "p1", "d1")  # another config (batch size)
    assert not point_done(tmp_path, {"lambda": 1.0}, "default", extra, "p1", "d1")
    assert not point_done(tmp_path / "missing", point, "default", extra, "p1", "d1")
