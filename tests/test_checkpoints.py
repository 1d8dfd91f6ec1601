import json

import pytest
import torch

from cambackdoor import checkpoints as C
from cambackdoor.errors import CamBackdoorError
from cambackdoor.models import build_model


def test_round_trip_is_bit_exact(tmp_path):
    model = build_model(width=4)
    with torch.no_grad():  # make BN buffers non-trivial too
        model.train()(torch.rand(8, 3, 32, 32))
    path = C.save_model(tmp_path / "m", model, {"metrics": {"test_acc": 0.5}, "data_fingerprint": "abc"})
    loaded, meta = C.load_model(path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert meta["model"] == {"name": "resnet18", "num_classes": 10, "width": 4}
    assert meta["metrics"]["test_acc"] == 0.5 and meta["data_fingerprint"] == "abc"
    assert meta["package_version"] and "git_commit" in meta
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), loaded.eval()(x))


def test_sidecar_is_required(tmp_path):
    path = C.save_model(tmp_path / "m", build_model(width=4))
    C.sidecar_path(path).unlink()
    with pytest.raises(CamBackdoorError, match="has no sidecar m.json"):
        C.load_model(path)


def test_corrupt_weights_are_detected(tmp_path):
    path = C.save_model(tmp_path / "m", build_model(width=4))
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CamBackdoorError, match="does not match its sidecar"):
        C.load_model(path)


def test_corrupt_sidecar_is_detected(tmp_path):
    path = C.save_model(tmp_path / "m", build_model(width=4))
    C.sidecar_path(path).write_text("{not json")
    with pytest.raises(CamBackdoorError, match="not valid JSON"):
        C.load_model(path)


def test_other_architecture_is_refused(tmp_path):
    path = C.save_model(tmp_path / "m", build_model(width=4))
    with pytest.raises(CamBackdoorError, match="width=4, not width=16"):
        C.load_model(path, expect={"width": 16})
    # weights of width 4 behind a sidecar claiming width 8
    meta = json.loads(C.sidecar_path(path).read_text())
    meta["model"]["width"] = 8
    C.sidecar_path(path).write_text(json.dumps(meta))
    with pytest.raises(CamBackdoorError, match="another architecture"):
        C.load_model(path)


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def broken(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(C, "save_file", broken)
    with pytest.raises(CamBackdoorError, match="cannot write"):
        C.save_model(tmp_path / "m", build_model(width=4))
    assert list(tmp_path.iterdir()) == []


def test_training_state_round_trip_without_pickle(tmp_path):
    model = build_model(width=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    opt.step()
    g = torch.Generator().manual_seed(5)
    state = {"optimizer": opt.state_dict(), "generator": g.get_state(), "epoch": 3, "t": (1, 2.5, None)}
    C.save_state(tmp_path / "state", state)
    back = C.load_state(tmp_path / "state")
    assert back["epoch"] == 3 and back["t"] == (1, 2.5, None)
    assert torch.equal(back["generator"], g.get_state())
    opt2 = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])
    for k in opt.state_dict()["state"]:
        assert torch.equal(opt.state_dict()["state"][k]["exp_avg"], opt2.state_dict()["state"][k]["exp_avg"])


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CamBackdoorError, match="not writable"):
        C.ensure_writable_dir(blocker / "sub")


@pytest.mark.parametrize("edit,match", [
    (lambda meta: [meta], "not a cambackdoor checkpoint sidecar"),
    (lambda meta: {**meta, "model": {}}, "no valid 'model' entry"),
    (lambda meta: {**meta, "model": {**meta["model"], "width": "4"}}, "no valid 'model' entry"),
    (lambda meta: {k: v for k, v in meta.items() if k != "weights_sha256"}, "no weights_sha256"),
])
def test_malformed_sidecars_are_one_line_errors(tmp_path, edit, match):
    path = C.save_model(tmp_path / "m", build_model(width=4))
    meta = json.loads(C.sidecar_path(path).read_text())
    C.sidecar_path(path).write_text(json.dumps(edit(meta)))
    with pytest.raises(CamBackdoorError, match=match):
        C.load_model(path)


def test_modified_weights_without_sha_in_sidecar_are_not_loaded(tmp_path):
    path = C.save_model(tmp_path / "m", build_model(width=4))
    meta = json.loads(C.sidecar_path(path).read_text())
    del meta["weights_sha256"]
    C.sidecar_path(path).write_text(json.dumps(meta))
    other = C.save_model(tmp_path / "o", build_model(width=4))
    path.write_bytes(other.read_bytes())
    with pytest.raises(CamBackdoorError, match="no weights_sha256"):
        C.load_model(path)


def test_full_disk_in_safetensors_is_a_one_line_error(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(C, "save_file", full)
    with pytest.raises(CamBackdoorError, match="cannot write .*No space left"):
        C.save_model(tmp_path / "m", build_model(width=4))
    assert list(tmp_path.iterdir()) == []


def test_state_is_one_file_and_old_two_file_states_still_load(tmp_path):
    state = {"epoch": 2, "config_hash": "abc", "w": torch.arange(3.0), "history": "[]"}
    C.save_state(tmp_path / "state", state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.safetensors"]
    assert C.state_config_hash(tmp_path / "state") == "abc" and C.state_config_hash(tmp_path / "none") is None
    back = C.load_state(tmp_path / "state")
    assert back["epoch"] == 2 and torch.equal(back["w"], torch.arange(3.0))
    # cambackdoor-state/1: tensors in the .safetensors, the JSON skeleton in a .json beside it
    from safetensors.torch import save_file

    save_file({"s.w": torch.ones(2)}, str(tmp_path / "old.safetensors"))
    (tmp_path / "old.json").write_text(json.dumps({"format": "cambackdoor-state/1", "state": {
        "__dict__": [["epoch", 1], ["w", {"__tensor__": "s.w"}]]}}))
    old = C.load_state(tmp_path / "old")
    assert old["epoch"] == 1 and torch.equal(old["w"], torch.ones(2))


def test_load_model_honours_map_location(tmp_path):
    path = C.save_model(tmp_path / "m", build_model(width=4))
    model, _ = C.load_model(path, map_location="meta")  # a device that exists on every machine
    assert all(p.device.type == "meta" for p in model.parameters())


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    out = tmp_path / "eval"
    with C.atomic_dir(out) as d:
        (d / "a.json").write_text("1")
        (d / "fig.png").write_text("x")
    with pytest.raises(RuntimeError):
        with C.atomic_dir(out) as d:
            (d / "a.json").write_text("2")
            raise RuntimeError("killed before the figure")
    assert (out / "a.json").read_text() == "1" and (out / "fig.png").exists()
    with C.atomic_dir(out) as d:
        (d / "a.json").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["a.json"]  # nothing of the older run is left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]


def test_run_folder_needs_resume_or_overwrite(tmp_path):
    (tmp_path / "model.safetensors").write_text("")
    with pytest.raises(CamBackdoorError, match="--resume to continue it, --overwrite to start over"):
        C.claim_run_dir(tmp_path, ("model.safetensors",), resume=False, overwrite=False)
    C.claim_run_dir(tmp_path, ("model.safetensors",), resume=True, overwrite=False)
    C.claim_run_dir(tmp_path, ("model.safetensors",), resume=False, overwrite=True)


def test_the_models_kept_in_the_repository_load_with_their_digests():
    # benchmarks/models holds the weights later sessions and outside checks start from: each must load with
    # its sha256 checked, and the implant must name the stage-1 model it came from by that model's digest
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "benchmarks" / "models"
    found = {p.parent.name: C.load_model(p) for p in sorted(root.glob("*/model.safetensors"))}
    assert {"stage1-cpu", "stage1-holdout", "persistent-p1-s0"} <= set(found)
    for name, (model, meta) in found.items():
        assert meta["model"]["width"] == 16, name
        assert model.eval()(torch.full((1, 3, 32, 32), 0.5)).isfinite().all(), name
    parent = json.loads((root / "persistent-p1-s0" / "model.json").read_text())["parent"]
    assert parent["sha256"] == found["stage1-cpu"][1]["weights_sha256"]
