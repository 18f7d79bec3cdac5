"""Module store: bit-exact round trips, one module resident, atomic writes under ENOSPC."""
import errno
import json

import pytest
import torch

from edgetrain.errors import UserError
from edgetrain.method.loop import make_trainer, train_step
from edgetrain.regimes.run import build_run
from edgetrain.storage import atomic as store_mod
from edgetrain.storage.codec import read_tensors, tensors_digest
from edgetrain.storage.modules import ModuleStore
from tests.conftest import tiny_cfg


def _trained_store(tmp_path, optimizer):
    run = build_run(tiny_cfg(mode="sequential", optimizer=optimizer, modules=3, depth=3))
    st = ModuleStore(tmp_path, run.stages, run.device)
    st.adopt(write=True)
    st.load(0)
    with torch.no_grad():
        x = run.stages[0].features(run.data.normalize(run.data.train.x[:16]))
    stage = st.load(1)
    tr = make_trainer(stage, run.cfg, 1, 3, 100)
    for _ in range(3):
        train_step([tr], x, run.data.train.y[:16], 0.0, "mean")
    st.save(1, tr)
    return run, st, tr


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_round_trip_is_bit_exact_for_weights_and_optimizer_state(tmp_path, optimizer):
    run, st, tr = _trained_store(tmp_path, optimizer)
    weights = {k: v.clone() for k, v in tr.stage.state_dict().items()}
    opt = tr.opt.state_dict()
    hist, tau_state = list(tr.history), tr.weighting.state_dict()
    st.load(2)  # unloads module 1
    assert all(p.is_meta for p in run.stages[1].parameters())
    stage = st.load(1)
    tr2 = make_trainer(stage, run.cfg, 1, 3, 100)
    st.restore_trainer(1, tr2)
    for k, v in stage.state_dict().items():
        assert v.dtype == weights[k].dtype and torch.equal(v, weights[k]), k
    opt2 = tr2.opt.state_dict()
    assert opt2["param_groups"] == opt["param_groups"]
    for pid, s in opt["state"].items():
        for name, v in s.items():
            v2 = opt2["state"][pid][name]
            assert torch.equal(v, v2) if torch.is_tensor(v) else v == v2
    assert tr2.step == tr.step == 3 and tr2.history == hist
    assert tr2.weighting.state_dict() == tau_state


def test_loading_one_module_unloads_every_other(tmp_path):
    run = build_run(tiny_cfg(mode="sequential", modules=3, depth=3))
    st = ModuleStore(tmp_path, run.stages, run.device)
    st.adopt(write=True)
    assert st.resident == set()
    for k in (0, 2, 1, 1, 0):
        st.load(k)
        assert st.resident == {k}
        on = [j for j, s in enumerate(run.stages) if not next(s.parameters()).is_meta]
        assert on == [k]
    assert st.max_resident == 1


def test_weights_digest_reads_the_file_and_ignores_optimizer_state(tmp_path):
    run, st, tr = _trained_store(tmp_path, "sgd")
    assert st.weights_digest(1) == tensors_digest(tr.stage.state_dict())
    assert any(n.startswith("optim.") for n in read_tensors(st.path(1)))
    st.strip(1)
    assert not any(n.startswith("optim.") for n in read_tensors(st.path(1)))
    assert st.weights_digest(1) == tensors_digest(tr.stage.state_dict())


def test_disk_full_gives_a_clear_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    store_mod.atomic_write_json(target, {"v": 1})

    def full(f, data):
        f.write(data[:3])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod, "atomic_write",
                        lambda p, w, *a, orig=store_mod.atomic_write: orig(p, lambda f: full(f, b"{}xx"), *a))
    with pytest.raises(UserError, match="no space left.*--resume"):
        store_mod.atomic_write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary left


def test_resume_removes_the_temp_file_a_kill_inside_an_atomic_write_left(tmp_path):
    """SIGKILL between mkstemp and rename leaves `.NAME.XXXX.tmp`; resuming (under the run's
    lock) deletes it, so a resumed run directory holds what an uninterrupted one holds."""
    from edgetrain.regimes.schedule import resume, train
    from edgetrain.storage.atomic import remove_stale_temps
    from tests.conftest import tiny_cfg
    run = tmp_path / "run"
    train(tiny_cfg(mode="parallel", epochs=1), run)
    stale = [run / "modules" / ".01.safetensors.next.ab12cd.tmp", run / ".state.json.x1y2.tmp"]
    for p in stale:
        p.write_bytes(b"half a file")
    (run / "modules" / "keep.tmp").write_bytes(b"not ours: no leading dot")
    resume(run)
    assert not any(p.exists() for p in stale) and (run / "modules" / "keep.tmp").exists()
    assert remove_stale_temps(tmp_path / "missing") == []
