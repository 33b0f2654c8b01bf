"""Each training stage under torchrun (2 gloo processes on the CPU) ends with the parameters of one process
trained on the same global batch (the scenarios are in ``dist_scenarios.py``).

Tolerance: fp32 throughout; the two runs differ only in summation order (a gradient summed over 2 ranks by
all-reduce vs over one batch, micro-batches accumulated in another grouping), ~1e-7 relative per step. Adam and
Muon normalise updates, so a rounding difference in a near-zero gradient coordinate can move its update by up to
~lr; after 3 steps AdamW-trained parameters agree to 1e-4 absolute, while a real fault (local negatives,
unsynchronised gradients, mean-of-means weighting) moves them by 1e-3 or more. Muon orthogonalises in bf16
(torch.optim.Muon's Newton–Schulz), so a rounding difference flips bf16 ulps (2^-8 relative) of updates of
size ~lr·√(fan ratio) ≈ 0.04: ~1e-4 per step, hence 5e-4 for the Muon scenario (measured 1.2e-4 to 2.5e-4
between one process and DDP; DDP and FSDP agree exactly). Measured AdamW gaps: SFT 3.4e-6, embed 2.1e-7, reward
3.8e-5, code and fim 1.2e-7; PPO (learning rate 10x) 1.3e-4 against 1e-3, and 0 between DDP and FSDP. The SFT check
has teeth: weighting micro-batches equally (the old mean of means) moves the parameters by 1.5e-2.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dist_scenarios
import pytest
import torch
from safetensors.torch import load_file
from train_helpers import losses

from chatforge.model.checkpoint import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = Path(__file__).resolve().parent / "dist_scenarios.py"
ADAMW_TOLERANCE, MUON_TOLERANCE = 1e-4, 5e-4
# held-out figures of the same model, split across ranks vs one process: a batch's float32 value can differ in its
# last bits with the thread count (torchrun gives each process one thread), ~1e-7 relative; a mean of the ranks'
# means or one rank's share alone is 1e-3 or more away
EVAL_RTOL = 1e-5


def run_scenario(name: str, out_dir: Path, processes: int = 1, **options) -> dict[str, torch.Tensor]:
    """Run scenario ``name`` in this process or under torchrun; the parameters it ended with."""
    checkpoint = options.pop("checkpoint", True)
    extra = [f"{key}={json.dumps(value)}" for key, value in options.items()]
    if processes == 1:
        dist_scenarios.main([name, str(out_dir), *extra])
    else:
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env["PYTHONPATH"] = str(ROOT)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   str(SCENARIOS), name, str(out_dir), *extra]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        # a worker's own error (a C++ abort's message, a traceback) comes before torchrun's summary of the failure
        errors = [line for line in done.stderr.splitlines() if any(w in line for w in ("rror", "terminate", "what()"))]
        assert done.returncode == 0, "\n".join(errors[:30]) + "\n...\n" + done.stderr[-3000:]
    return load_file(str(latest_checkpoint(out_dir) / "model.safetensors")) if checkpoint else {}


def val_losses(out_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["val_loss"] for row in rows if "val_loss" in row}


def max_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def resumable_copy(run: Path, copy: Path, step: int) -> Path:
    """``run`` copied with its checkpoints after ``step`` removed: the state of a run stopped at ``step``."""
    shutil.copytree(run, copy)
    for folder in (copy / "checkpoints").glob("step_*"):
        if int(folder.name.split("_")[1]) > step:
            shutil.rmtree(folder)
    (copy / "checkpoints" / "latest").unlink()
    return copy


RESUMABLE = dict(steps=4, ckpt_every=2, keep_checkpoints=0)


@pytest.mark.slow
def test_sft_two_processes_match_one_and_resume_a_one_process_run(tmp_path):
    """One micro-batch of 8 vs 2 ranks x 2 micro-batches of 2: a mean of micro-batch means would differ (token
    weighting). Then 1 -> 2: the single run's step-2 checkpoint continued by two processes reaches its model."""
    single = run_scenario("sft", tmp_path / "single", micro_batch_size=8, **RESUMABLE)
    parallel = run_scenario("sft", tmp_path / "ddp", processes=2, micro_batch_size=2, **RESUMABLE)
    gap = max_gap(single, parallel)
    print(f"sft: largest parameter gap {gap:.2e}")
    assert gap < ADAMW_TOLERANCE
    # the held-out loss, split across the ranks, is the single process's at the start (same model: EVAL_RTOL)
    # and at the end (models 1e-4 apart)
    single_val, parallel_val = val_losses(tmp_path / "single"), val_losses(tmp_path / "ddp")
    assert single_val.keys() == parallel_val.keys() == {0, 4}
    assert parallel_val[0] == pytest.approx(single_val[0], rel=EVAL_RTOL) and parallel_val[4] == pytest.approx(
        single_val[4], abs=1e-4)
    resumed_dir = resumable_copy(tmp_path / "single", tmp_path / "resumed", 2)
    resumed = run_scenario("sft", resumed_dir, processes=2, resume=True, micro_batch_size=2, **RESUMABLE)
    single_losses, resumed_losses = losses(tmp_path / "single"), losses(resumed_dir)
    print("1->2 losses, single run:", single_losses, "resumed:", resumed_losses)
    assert [resumed_losses[s] for s in (3, 4)] == pytest.approx([single_losses[3], single_losses[4]], abs=1e-5)
    assert max_gap(single, resumed) < ADAMW_TOLERANCE


@pytest.mark.slow
def test_embed_two_processes_match_one(tmp_path):
    """Negatives must span both ranks' rows and the temperature's gradient must be reduced."""
    parallel = run_scenario("embed", tmp_path / "ddp", processes=2)
    sharded = run_scenario("embed", tmp_path / "fsdp", processes=2, parallel="fsdp")
    gap, fsdp_gap = max_gap(run_scenario("embed", tmp_path / "single"), parallel), max_gap(parallel, sharded)
    print(f"embed: largest parameter gap {gap:.2e} (1 process vs DDP), {fsdp_gap:.2e} (DDP vs FSDP)")
    assert gap < ADAMW_TOLERANCE and fsdp_gap < ADAMW_TOLERANCE


@pytest.mark.slow
def test_ppo_two_processes_match_one_under_ddp_and_fsdp(tmp_path):
    """Each rank samples half of the rollout's prompts (seeded by their place in the whole list) and the answers
    are gathered, so advantages are whitened and the KL controller updated over the whole rollout. Under FSDP the
    sharded actor's full weights are gathered into a plain copy for sampling: the same rollouts, the same steps
    (fp32, no mixed precision: FSDP's reduce-scatter and DDP's all-reduce sum the same two gradients)."""
    options = dict(steps=4)  # two rollouts of 16 prompts, 2 minibatches of 8 each
    single = run_scenario("ppo", tmp_path / "single", **options)
    parallel = run_scenario("ppo", tmp_path / "ddp", processes=2, **options)
    sharded = run_scenario("ppo", tmp_path / "fsdp", processes=2, parallel="fsdp", **options)
    gap, fsdp_gap = max_gap(single, parallel), max_gap(parallel, sharded)
    print(f"ppo: largest parameter gap {gap:.2e}, ddp/fsdp {fsdp_gap:.2e}; losses", losses(tmp_path / "single"),
          losses(tmp_path / "ddp"), losses(tmp_path / "fsdp"))
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), abs=1e-5)
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "ddp"), abs=1e-5)
    # PPO's learning rate is 10x the other scenarios' (3e-2): so are rounding gaps
    assert gap < ADAMW_TOLERANCE * 10 and fsdp_gap < ADAMW_TOLERANCE * 10
    assert (latest_checkpoint(tmp_path / "fsdp") / "optimizer").is_dir()  # it really ran sharded


@pytest.mark.slow
def test_pretrain_muon_one_process_ddp_and_fsdp_agree_and_fsdp_resumes_on_one_process(tmp_path):
    """The modern model with Muon + AdamW: one process, DDP and FSDP2 (Muon orthogonalising whole gathered
    matrices) take the same steps; FSDP's sharded checkpoint at step 2 continued by one process (2 -> 1)
    reaches the same step-4 model."""
    single = run_scenario("pretrain_muon", tmp_path / "single", **RESUMABLE)
    ddp = run_scenario("pretrain_muon", tmp_path / "ddp", processes=2, **RESUMABLE)
    fsdp = run_scenario("pretrain_muon", tmp_path / "fsdp", processes=2, parallel="fsdp", **RESUMABLE)
    print(f"muon: gap single/ddp {max_gap(single, ddp):.2e}, ddp/fsdp {max_gap(ddp, fsdp):.2e}")
    assert max_gap(single, ddp) < MUON_TOLERANCE and max_gap(ddp, fsdp) < MUON_TOLERANCE
    # weights and optimizer state stayed sharded (and the weights were exported: the gaps above read them)
    assert (latest_checkpoint(tmp_path / "fsdp") / "optimizer").is_dir()
    assert (latest_checkpoint(tmp_path / "fsdp") / "model").is_dir()
    ddp_losses, fsdp_losses = losses(tmp_path / "ddp"), losses(tmp_path / "fsdp")
    assert fsdp_losses.keys() == set(range(1, 5))
    assert [fsdp_losses[s] for s in ddp_losses] == pytest.approx(list(ddp_losses.values()), abs=1e-5)
    resumed_dir = resumable_copy(tmp_path / "fsdp", tmp_path / "resumed", 2)
    resumed = run_scenario("pretrain_muon", resumed_dir, parallel="fsdp", resume=True, **RESUMABLE)
    resumed_losses = losses(resumed_dir)
    print("2->1 losses, fsdp run:", fsdp_losses, "resumed:", resumed_losses)
    assert [resumed_losses[s] for s in (3, 4)] == pytest.approx([fsdp_losses[3], fsdp_losses[4]], abs=1e-5)
    assert max_gap(fsdp, resumed) < MUON_TOLERANCE


@pytest.mark.slow
def test_fsdp_checkpoints_are_sharded_export_the_ordinary_file_and_resume_one_process_runs_on_two(tmp_path):
    """train.parallel=fsdp saves weights and optimizer state as torch.distributed.checkpoint shards (nothing
    gathered), and rank 0 streams the weights from the shards into model.safetensors. A one-process run asked for
    fsdp saves the same format, so two FSDP processes continue its step-2 checkpoint (1 -> 2), each reading only
    its shards, and reach the one-process run's step-4 losses and parameters."""
    from chatforge.model.checkpoint import load_model

    single = run_scenario("pretrain_muon", tmp_path / "single", parallel="fsdp", **RESUMABLE)
    checkpoint = latest_checkpoint(tmp_path / "single")
    assert (checkpoint / "model").is_dir() and (checkpoint / "optimizer").is_dir()
    model, _ = load_model(tmp_path / "single")  # the exported file is an ordinary checkpoint's
    assert max_gap(single, {k: v for k, v in model.state_dict().items() if k in single}) == 0.0
    resumed_dir = resumable_copy(tmp_path / "single", tmp_path / "resumed", 2)
    resumed = run_scenario("pretrain_muon", resumed_dir, processes=2, parallel="fsdp", resume=True, **RESUMABLE)
    single_losses, resumed_losses = losses(tmp_path / "single"), losses(resumed_dir)
    print("1->2 fsdp losses, single run:", single_losses, "resumed:", resumed_losses,
          f"gap {max_gap(single, resumed):.2e}")
    assert [resumed_losses[s] for s in (3, 4)] == pytest.approx([single_losses[3], single_losses[4]], abs=1e-5)
    assert max_gap(single, resumed) < MUON_TOLERANCE
    assert (latest_checkpoint(resumed_dir) / "model").is_dir()


def test_a_model_built_on_the_meta_device_is_initialised_by_the_loop(tmp_path):
    """What fsdp does with a model built without storage, in one process: real, initialised weights and the
    derived rotary tables, then training as usual."""
    from train_helpers import CountingTask, fast_config, tiny_gpt

    from chatforge.train.loop import train

    with torch.device("meta"):
        model = tiny_gpt(arch="modern")
    summary = train(model, CountingTask(8), fast_config(steps=3, parallel="fsdp"), tmp_path)
    reference = tiny_gpt(arch="modern")
    assert torch.equal(model.rotary_cos, reference.rotary_cos) and torch.equal(model.rotary_sin, reference.rotary_sin)
    # the GPT's own initialisation (embeddings std 0.8, residual scalars 1), moved a little by 3 steps
    assert model.resid_lambdas.tolist() == pytest.approx([1.0, 1.0], abs=0.05) and float(model.wte.weight.std()) > 0.5
    assert summary["final_train_loss"] < 5 and summary["parallel"] == "single"


@pytest.mark.slow
def test_a_rank_that_cannot_see_the_checkpoint_stops_every_rank_naming_it(tmp_path):
    """Multi-node resume without shared storage: rank 0 picks the checkpoint, rank 1 cannot see it, and both
    ranks raise the same error naming the path instead of resuming at different steps and hanging."""
    from train_helpers import CountingTask, fast_config, tiny_gpt

    from chatforge.train.loop import train

    train(tiny_gpt(), CountingTask(8), fast_config(steps=2), tmp_path / "run")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(Path(__file__).resolve().parent / "dist_unseen_checkpoint.py"), str(tmp_path / "run")]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    errors = sorted(line for line in done.stdout.splitlines() if line.startswith("RANK"))
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert [line.split(" ERROR ")[0] for line in errors] == ["RANK 0", "RANK 1"], done.stdout
    assert all(f"{checkpoint} (chosen by rank 0) is not visible on rank(s) [1]" in line for line in errors)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_evaluation_split_across_two_processes_gives_the_single_process_figures(tmp_path, parallel):
    """Each rank evaluates its share of the held-out items (uneven shares: 5 batches, 7 conversations, 21 rankings,
    19 answers, 11 pairs) and the sums are reduced, to EVAL_RTOL (measured: up to 1.2e-7 relative with two
    threads in the single process, 0 with one)."""
    single_dir, parallel_dir = tmp_path / "single", tmp_path / parallel
    single_dir.mkdir()
    parallel_dir.mkdir()
    run_scenario("evals", single_dir, checkpoint=False, parallel=parallel)
    run_scenario("evals", parallel_dir, processes=2, checkpoint=False, parallel=parallel)
    single, split = (json.loads((folder / "evals.json").read_text()) for folder in (single_dir, parallel_dir))
    print(f"{parallel}: single {single}, split {split}")
    assert single.keys() == split.keys() and len(single) == 8
    assert split == pytest.approx(single, abs=0, rel=EVAL_RTOL)


@pytest.mark.slow
def test_reward_two_processes_match_one(tmp_path):
    """The reward model on rankings and signal rewards mixed: one micro-batch of 8 prompts (and 8 answers) vs 2
    ranks x 2 micro-batches of 2. Each part holds the same number of prompts, so the loop's equal weighting of
    parts is the global mean over prompts (and over answers); held-out figures are reduced over the ranks."""
    single = run_scenario("reward", tmp_path / "single", micro_batch_size=8)
    parallel = run_scenario("reward", tmp_path / "ddp", processes=2)
    gap = max_gap(single, parallel)
    single_val, parallel_val = val_losses(tmp_path / "single"), val_losses(tmp_path / "ddp")
    print(f"reward: largest parameter gap {gap:.2e}; val losses {single_val} vs {parallel_val}")
    assert gap < ADAMW_TOLERANCE
    assert parallel_val[0] == pytest.approx(single_val[0], rel=EVAL_RTOL)
    assert parallel_val[3] == pytest.approx(single_val[3], abs=1e-4)


def run_cli(args: list[str], processes: int = 1) -> None:
    """``chatforge ARGS`` in this process, or under torchrun with ``processes`` ranks."""
    from chatforge.cli import main

    if processes == 1:
        main(args)
        return
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "chatforge.cli", *args]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def final_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(out_dir) / "model.safetensors"))


LOOP = ["--train.steps=4", "--train.batch_size=8", "--train.lr=3e-3", "--train.warmup_steps=1", "--train.max_minutes=0",
        "--train.eval_every=0", "--train.ckpt_every=0", "--train.dtype=fp32", "--train.compile=false",
        "--train.device=cpu", "--train.progress=false", "--train.micro_batch_size=2", "--eval_batches=3"]


@pytest.mark.slow
def test_code_and_fim_two_processes_match_one(tmp_path):
    """The code and fim stages under torchrun: rank 0 builds the corpus once, both ranks train on it, and one
    process accumulating 4 micro-batches of 2 windows vs 2 ranks x 2 end with the same parameters (AdamW, fp32:
    ADAMW_TOLERANCE, see the module's docstring) and the same held-out losses (reduced over the ranks: the base
    model's to EVAL_RTOL, the trained one's within 1e-4). fim's insertion evaluation, split across the ranks,
    gives the single process's figures."""
    from test_code import _write_tree
    from test_fim import _data_dir
    from train_helpers import make_corpus, tiny_pretrain_args

    from chatforge.cli import main

    base = tmp_path / "base"
    main(["pretrain", *tiny_pretrain_args(make_corpus(tmp_path / "tok"), base, model__block_size=32)])
    tree, data = _write_tree(tmp_path), _data_dir(tmp_path)
    adamw = ["--train.optimizer=adamw", "--train.lr=1e-3"]  # Muon's equality is the pretrain test's (bf16 steps)
    stages = {
        "code": [f"--init_from={base}", "--stdlib=false", f"--folders={tree}", "--val_fraction=0.2", *adamw],
        "fim": [f"--init_from={base}", f"--data_dir={data}", "--fim_rate=0.5", "--eval_examples=4", *adamw],
    }
    for stage, args in stages.items():
        # micro-batches of 2 in both: the validation batches are micro-batch sized, and the same batches give the
        # same float32 figures (4 accumulated micro-batches in one process, 2 per rank in two)
        run_cli([stage, *args, *LOOP, f"--out_dir={tmp_path / stage / 'single'}"])
        run_cli([stage, *args, *LOOP, f"--out_dir={tmp_path / stage / 'ddp'}"], processes=2)
        runs = {name: tmp_path / stage / name for name in ("single", "ddp")}
        gap = max_gap(*(final_weights(run) for run in runs.values()))
        summaries = {name: json.loads((run / "summary.json").read_text()) for name, run in runs.items()}
        single_val, parallel_val = (val_losses(run) for run in runs.values())
        print(f"{stage}: largest parameter gap {gap:.2e}; val losses {single_val} vs {parallel_val}")
        assert gap < ADAMW_TOLERANCE
        assert summaries["ddp"]["world_size"] == 2 and summaries["ddp"]["grad_accum_steps"] == 2
        assert summaries["ddp"]["base_val_loss"] == summaries["single"]["base_val_loss"]
        assert parallel_val[0] == pytest.approx(single_val[0], rel=EVAL_RTOL)
        assert parallel_val[4] == pytest.approx(single_val[4], abs=1e-4)
    # the insertion evaluation, each rank writing and scoring 2 of the 4 spans, gives one process's figures
    # (models 1e-7 apart, greedy decoding in batches of 2 instead of 4: the losses agree to rounding)
    insertion = [json.loads((tmp_path / "fim" / name / "summary.json").read_text())["insertion"]
                 for name in ("single", "ddp")]
    print("insertion, single:", insertion[0], "ddp:", insertion[1])
    assert insertion[1]["examples"] == insertion[0]["examples"] == 4
    for order in ("psm", "spm"):
        assert insertion[1][order]["exact_match"] == insertion[0][order]["exact_match"]
        assert insertion[1][order]["middle_loss"] == pytest.approx(insertion[0][order]["middle_loss"], abs=1e-3)
        assert [s["written"] for s in insertion[1][order]["samples"]] == [
            s["written"] for s in insertion[0][order]["samples"]]
    assert insertion[1]["left_to_right_middle_loss"] == pytest.approx(
        insertion[0]["left_to_right_middle_loss"], abs=1e-3)


def test_fsdp_names_a_scalar_parameter_it_cannot_shard():
    """FSDP2 shards along the first dimension and refuses a 0-d parameter: the run says which and what to use
    instead (checked before any process group is needed)."""
    from torch import nn

    from chatforge.errors import ChatforgeError
    from chatforge.train import distributed

    model = nn.Module()
    model.gain = nn.Parameter(torch.tensor(1.0))
    with pytest.raises(ChatforgeError, match="scalar parameter.*gain.*train.parallel=ddp"):
        distributed.shard_model(model, None, False)


def test_an_embedding_checkpoint_with_a_0d_temperature_still_loads():
    """The temperature became 1-element so FSDP can shard it; checkpoints saved before load unchanged."""
    from train_helpers import tiny_gpt

    from chatforge.embed.model import EmbeddingModel

    model = EmbeddingModel(tiny_gpt(), temperature=0.1)
    old = {k: v.reshape(()) if k == "log_inv_temperature" else v for k, v in model.state_dict().items()}
    other = EmbeddingModel(tiny_gpt(), temperature=0.5)
    other.load_state_dict(old)
    assert other.scale().item() == pytest.approx(10.0)
