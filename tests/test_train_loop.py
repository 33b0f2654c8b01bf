"""The shared training loop: schedule, optimizer groups, accumulation, learning, exact resume, interruption."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
from train_helpers import CountingTask, fast_config, losses, tiny_gpt

from chatforge.errors import ChatforgeError, ConfigError
from chatforge.model.checkpoint import latest_checkpoint
from chatforge.train import trainer as trainer_module
from chatforge.train.loop import Micro, TrainingInterrupted, lm_loss, lr_at, train
from chatforge.train.optim import batched_muon_step, make_optimizer
from chatforge.train.trainer import clip_gradients


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    cfg = fast_config(lr=1.0, min_lr=0.1, warmup_steps=10, steps=110)
    assert [lr_at(s, cfg) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    decay = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))  # monotone after warm-up
    assert lr_at(60, cfg) == pytest.approx(0.55)  # cosine midpoint: halfway between lr and min_lr
    assert lr_at(110, cfg) == pytest.approx(0.1) and lr_at(160, cfg) == pytest.approx(0.1)
    # under a time budget the decay follows whichever of steps and time is further along
    assert lr_at(20, cfg, time_progress=0.5) == pytest.approx(0.55)
    assert lr_at(20, cfg, time_progress=1.0) == pytest.approx(0.1)
    assert lr_at(60, cfg, time_progress=0.1) == pytest.approx(0.55)
    linear = fast_config(lr=1.0, min_lr=0.0, warmup_steps=0, schedule="linear", steps=100)
    assert [lr_at(s, linear) for s in (0, 25, 100)] == pytest.approx([1.0, 0.75, 0.0])
    constant = fast_config(lr=0.5, warmup_steps=2, schedule="constant", steps=100)
    assert [lr_at(s, constant, 0.9) for s in (0, 1, 50, 99)] == pytest.approx([0.25, 0.5, 0.5, 0.5])


def test_weight_decay_skips_norms_biases_and_embeddings():
    model = tiny_gpt()
    decay, no_decay = make_optimizer(model, fast_config(weight_decay=0.1), "cpu").param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decayed and all(n.endswith("weight") and ".ln_" not in n for n in decayed)
    assert {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias", "h.0.attn.c_attn.bias"} <= {
        names[id(p)] for p in no_decay["params"]
    }
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_grad_accumulation_matches_the_full_batch(tmp_path):
    full, accumulated = tiny_gpt(), tiny_gpt()
    train(full, CountingTask(), fast_config(steps=4), tmp_path / "full")
    summary = train(accumulated, CountingTask(), fast_config(steps=4, micro_batch_size=2), tmp_path / "micro")
    assert summary["grad_accum_steps"] == 4
    a, b = losses(tmp_path / "full"), losses(tmp_path / "micro")
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    assert [a[s] for s in a] == pytest.approx([b[s] for s in a], abs=1e-5)
    for p, q in zip(full.parameters(), accumulated.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


def test_loss_decreases_and_outputs_are_written(tmp_path):
    cfg = fast_config(steps=40, eval_every=20, lr=1e-2, min_lr=1e-3)
    summary = train(tiny_gpt(), CountingTask(), cfg, tmp_path, meta={"stage": "demo"})
    curve = losses(tmp_path)
    assert curve[1] > 0.9 * math.log(64)  # starts near chance
    assert max(list(curve.values())[-5:]) < 0.3 * curve[1]  # the counting rule is learnt
    assert summary["final_val_loss"] < 0.3 * math.log(64)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["steps"] == 40 and saved["tokens_seen"] == 40 * 8 * 16 and saved["stage"] == "demo"
    assert saved["params"] == sum(p.numel() for p in tiny_gpt().parameters())
    assert saved["tokens_per_s"] > 0 and saved["wall_time_s"] > 0 and saved["stopped_by"] == "steps"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 20, 40]
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert latest_checkpoint(tmp_path).name == "step_00000040"


def test_resume_is_exact(tmp_path):
    """20 steps straight == 10 steps, a crash, and a resume from the step-10 checkpoint: same losses 11-20."""
    train(tiny_gpt(), CountingTask(), fast_config(steps=20), tmp_path / "straight")
    cut = tmp_path / "cut"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_gpt(), CountingTask(crash_at=14), fast_config(steps=20, ckpt_every=10), cut)
    assert latest_checkpoint(cut).name == "step_00000010"
    # a different initialisation proves the weights come from the checkpoint
    train(tiny_gpt(seed=123), CountingTask(), fast_config(steps=20, ckpt_every=10), cut, resume=True)
    straight, resumed = losses(tmp_path / "straight"), losses(cut)
    assert sorted(resumed) == list(range(1, 21))
    assert [resumed[s] for s in range(11, 21)] == [straight[s] for s in range(11, 21)]


def test_muon_recipe_groups_learns_and_resumes_exactly(tmp_path):
    """Muon takes exactly the blocks' matrices, AdamW the rest; its state survives a resume bit for bit."""
    modern = dict(arch="modern", bias=False)
    model = tiny_gpt(**modern)
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = make_optimizer(model, fast_config(optimizer="muon", lr=0.02), "cpu")
    muon = {names[id(p)] for g in optimizer.muon.param_groups for p in g["params"]}
    assert muon == {n for n in names.values() if n.startswith("h.") and n.endswith("weight") and "ve_gate" not in n}
    embed, head, scalars = (sorted(names[id(p)] for p in g["params"]) for g in optimizer.adamw.param_groups)
    assert embed == ["value_embeds.1.weight", "wte.weight"] and head == ["lm_head.weight"]
    assert "resid_lambdas" in scalars and "h.1.attn.ve_gate.weight" in scalars
    # the AdamW groups keep the reference ratios to Muon's rate, widths scaled by (width / 768)^-1/2
    assert optimizer.adamw.param_groups[0]["lr"] == pytest.approx(0.02 * 15 * (768 / 32) ** 0.5)

    recipe = dict(optimizer="muon", lr=0.02, min_lr=0.0, schedule="wsd", warmup_steps=2, steps=20)
    train(tiny_gpt(**modern), CountingTask(), fast_config(**recipe), tmp_path / "straight")
    straight = losses(tmp_path / "straight")
    assert straight[20] < straight[1] - 1.0
    cut = tmp_path / "cut"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_gpt(**modern), CountingTask(crash_at=14), fast_config(**recipe, ckpt_every=10), cut)
    train(tiny_gpt(seed=5, **modern), CountingTask(), fast_config(**recipe, ckpt_every=10), cut, resume=True)
    resumed = losses(cut)
    assert [resumed[s] for s in range(11, 21)] == [straight[s] for s in range(11, 21)]


@pytest.mark.parametrize("decay", [0.0, 0.1])
def test_batched_muon_step_takes_torch_muons_steps(decay):
    """Same-shaped matrices orthogonalised together move every matrix as torch.optim.Muon moves it alone."""
    torch.manual_seed(0)
    shapes = [(8, 8), (8, 8), (24, 8), (24, 8), (8, 24), (16, 8)]  # square, tall, wide, a shape of its own
    ours = [torch.nn.Parameter(torch.randn(*shape)) for shape in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kwargs = dict(lr=0.02, weight_decay=decay, momentum=0.9, adjust_lr_fn="original")
    batched, reference = torch.optim.Muon(ours, **kwargs), torch.optim.Muon(theirs, **kwargs)
    for _ in range(3):
        grads = [torch.randn(*shape) for shape in shapes]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        batched_muon_step(batched)
        reference.step()
    for p, q in zip(ours, theirs):
        # equal bit for bit here; elsewhere batched and single bf16 matmuls may round an update (~0.02) apart by
        # an ulp or two, while a wrong shape rule or momentum would move it by ~1e-2
        torch.testing.assert_close(p, q, atol=5e-4, rtol=0)
        torch.testing.assert_close(batched.state[p]["momentum_buffer"], reference.state[q]["momentum_buffer"])


def test_clip_gradients_scales_only_above_the_bound():
    weights = [torch.nn.Parameter(torch.zeros(size)) for size in (2, 1, 3)]
    weights[0].grad, weights[1].grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])  # norm 5; the last has none
    assert clip_gradients(weights, 10.0) == pytest.approx(5.0)
    assert weights[0].grad.tolist() == [3.0, 0.0] and weights[1].grad.tolist() == [4.0]  # untouched
    assert clip_gradients(weights, 0.0) == pytest.approx(5.0) and weights[1].grad.tolist() == [4.0]  # 0 = never
    assert clip_gradients(weights, 1.0) == pytest.approx(5.0)
    assert weights[0].grad.tolist() == pytest.approx([0.6, 0.0]) and weights[1].grad.tolist() == pytest.approx([0.8])


def test_wsd_schedule_is_flat_then_linear_to_min_lr():
    cfg = fast_config(lr=1.0, min_lr=0.0, warmup_steps=10, steps=110, schedule="wsd", flat_fraction=0.5)
    assert lr_at(9, cfg) == pytest.approx(1.0) and lr_at(60, cfg) == pytest.approx(1.0)
    assert lr_at(85, cfg) == pytest.approx(0.5) and lr_at(110, cfg) == pytest.approx(0.0)
    assert lr_at(20, cfg, time_progress=0.75) == pytest.approx(0.5)  # a time budget moves the decay the same way


def test_sigint_stops_with_a_checkpoint_and_resumes_exactly(tmp_path):
    straight = tmp_path / "straight"
    train(tiny_gpt(), CountingTask(), fast_config(steps=12), straight)
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match="interrupted at step 5"):
        train(tiny_gpt(), CountingTask(signal_at=4), fast_config(steps=12), run)
    assert latest_checkpoint(run).name == "step_00000005" and not (run / "summary.json").exists()
    train(tiny_gpt(seed=9), CountingTask(), fast_config(steps=12), run, resume=True)
    assert losses(run) == losses(straight)


class GradCacheLikeTask(CountingTask):
    """Runs its own backward, in two halves, as gradient caching does."""

    def backward(self, model, batch, micro: Micro):
        x, y = batch
        half = len(x) // 2
        total = 0.0
        for i, rows in enumerate((slice(0, half), slice(half, None))):
            with micro.autocast():
                loss = model(x[rows], y[rows])[1] / 2
            with micro.no_sync() if i == 0 else contextlib.nullcontext():
                (loss * micro.scale).backward()
            total += float(loss.detach())
        return {"loss": torch.tensor(total), "tokens": x.numel()}


def test_a_task_may_run_its_own_backward(tmp_path):
    plain, custom = tiny_gpt(), tiny_gpt()
    train(plain, CountingTask(), fast_config(steps=3), tmp_path / "plain")
    train(custom, GradCacheLikeTask(), fast_config(steps=3, micro_batch_size=4), tmp_path / "custom")
    assert list(losses(tmp_path / "plain").values()) == pytest.approx(
        list(losses(tmp_path / "custom").values()), abs=1e-5
    )
    for p, q in zip(plain.parameters(), custom.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


def test_sequences_are_counted_when_a_task_reports_no_tokens(tmp_path):
    class NoTokens(CountingTask):
        def loss(self, model, batch):
            return lm_loss(model, batch)["loss"]

    summary = train(tiny_gpt(), NoTokens(), fast_config(steps=2), tmp_path)
    assert summary["sequences_seen"] == 16 and "tokens_seen" not in summary


def test_bad_batch_splits_and_settings_are_named(tmp_path):
    with pytest.raises(ConfigError, match="micro_batch_size 3 must divide"):
        train(tiny_gpt(), CountingTask(), fast_config(micro_batch_size=3), tmp_path / "a")
    with pytest.raises(ConfigError, match="train.schedule"):
        train(tiny_gpt(), CountingTask(), fast_config(schedule="step"), tmp_path / "b")
    with pytest.raises(ChatforgeError, match="loss became nan"):
        train(tiny_gpt(), CountingTask(), fast_config(lr=1e30, warmup_steps=0, grad_clip=0), tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


class SteadyClock:
    """A ``time`` whose every reading is 10 ms after the last: the loop's clock-driven decisions then do not depend
    on how loaded the machine is (a real 2-second budget allowed only 2 steps on a busy machine)."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 0.01
        return self.now


def test_a_time_budget_fits_the_decay_and_stops_in_time(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "time", SteadyClock())
    cfg = fast_config(steps=1_000_000, max_minutes=2.0 / 60, warmup_steps=2, lr=1e-2, min_lr=1e-3, ckpt_every=0)
    summary = train(tiny_gpt(), CountingTask(), cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert summary["stopped_by"] == "max_minutes" and 10 < summary["steps"] < 1_000_000
    assert lrs[2] > 0.9e-2 and lrs[-1] < 1e-3 + 0.1 * (1e-2 - 1e-3)  # decayed by the clock, not by the steps
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert summary["wall_time_s"] < 2.0 + 1.0
