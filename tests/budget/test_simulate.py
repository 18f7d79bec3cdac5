"""The meta-device simulation behind the predictor agrees with the real step on CPU."""
import pytest
import torch

from edgetrain.budget.estimate import estimate_peak
from edgetrain.budget.simulate import LiveBytes, eval_peak, train_peak
from edgetrain.config import RunConfig
from edgetrain.method.loop import make_trainer, train_step
from edgetrain.regimes.run import build_run


def test_live_bytes_counts_storages_once_and_frees():
    m = LiveBytes()
    with m:
        a = torch.empty(1000, device="meta")  # 4000 B
        b = a * 2  # +4000
        v = b.view(10, 100)  # a view: nothing new
        assert m.now == 8000
        del b
        assert m.now == 8000  # the view keeps b's storage
        del v
        assert m.now == 4000 and m.peak == 8000
        a.add_(1)  # in place: nothing new
        assert m.now == 4000
    del a


def _cfg(**kw):
    base = dict(data="synthetic", input_shape=(3, 16, 16), synthetic_size=80, model="resnet8",
                modules=2, mode="parallel", batch_size=16, epochs=1, augment=False,
                transport=True)
    base.update(kw)
    return RunConfig(**base)


@pytest.mark.parametrize("kw", [dict(), dict(transport=False), dict(mode="e2e", modules=1),
                                dict(optimizer="adamw", transport_scaling="sample")])
def test_simulated_step_peak_equals_the_real_step_on_cpu(kw):
    """The same chain stepped for real (train.train_step, CPU tensors) under LiveBytes peaks
    at the bytes the meta simulation predicts (statistics' scalars aside)."""
    real, sim = real_and_simulated_step_peaks(_cfg(**kw))
    assert sim == pytest.approx(real, rel=0.01, abs=4096)


def real_and_simulated_step_peaks(cfg: RunConfig) -> tuple[int, int]:
    """Peak live bytes of two real `train_step`s of cfg's chain on CPU tensors (LiveBytes),
    and the meta simulation's `train_peak` of the same chain (tests/method/test_precision.py too)."""
    run = build_run(cfg)
    n = len(run.stages)
    real_trainers = [make_trainer(st, cfg, k, n, 10) for k, st in enumerate(run.stages)]
    g = torch.Generator().manual_seed(0)
    m = LiveBytes()
    with m:
        m.register(run.stages)
        for _ in range(2):
            x = torch.randn(cfg.batch_size, *cfg.input_shape, generator=g)
            y = torch.randint(0, 10, (cfg.batch_size,), generator=g)
            train_step(real_trainers, x, y, 0.0, cfg.transport_scaling, cfg.precision)
            del x, y
    meta = [st.to("meta") for st in build_run(cfg).stages]
    sim = train_peak([make_trainer(st, cfg, k, n, 10) for k, st in enumerate(meta)],
                     cfg.input_shape, cfg)
    return m.peak, sim


def test_eval_peak_equals_real_evaluation_and_is_below_training():
    from edgetrain.method.loop import evaluate_chain
    cfg = _cfg()
    run = build_run(cfg)
    x = torch.randn(cfg.batch_size, *cfg.input_shape)
    y = torch.zeros(cfg.batch_size, dtype=torch.long)
    m = LiveBytes()
    with m:
        m.register(run.stages)
        m.register([x, y])
        evaluate_chain(run.stages, [(x, y)])
    stages = [st.to("meta") for st in build_run(cfg).stages]
    sim = eval_peak(stages, cfg.input_shape, cfg.batch_size)
    assert sim == pytest.approx(m.peak, rel=0.01, abs=4096)
    trainers = [make_trainer(st, cfg, k, 2, 10) for k, st in enumerate(stages)]
    assert sim < train_peak(trainers, cfg.input_shape, cfg)


def test_one_module_resident_predicts_less_than_the_chain():
    """Sequential holds one module: its predicted train peak is below parallel's."""
    par = estimate_peak(_cfg(model="resnet20", modules=3), (3, 16, 16), 10, n_train=64)
    seq = estimate_peak(_cfg(model="resnet20", modules=3, mode="sequential"), (3, 16, 16), 10,
                       n_train=64)
    assert seq.train_step_bytes < par.train_step_bytes
    assert seq.params_bytes < par.params_bytes
    assert par.build_bytes <= par.peak_bytes and seq.build_bytes <= seq.peak_bytes


def test_prediction_does_not_touch_the_global_rng():
    torch.manual_seed(3)
    a = torch.rand(3)
    torch.manual_seed(3)
    estimate_peak(_cfg(), (3, 16, 16), 10)
    assert torch.equal(torch.rand(3), a)
