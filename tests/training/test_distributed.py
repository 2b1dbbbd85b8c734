"""dorakit.training.distributed: `dorakit finetune` under torchrun / accelerate launch with DDP and FSDP2 (gloo, CPU).

The invariant: N processes with the same global batch train the same model as one process (losses
and the final adapter equal to float tolerance), the epoch's short last step included (a process
with no items runs at weight 0). Checkpoints written by N processes resume on M. DoRA under FSDP2
computes its norm on the all-gathered W0 without gathering anything a second time.

Every run trains a tiny Llama on 5 synthetic instruction records of different lengths (so the
token weighting matters), built here: nothing from a hub.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fixtures_text import prompt_words, word_tokenizer

import dorakit as dk
from dorakit.commands.cli import main
from dorakit.training.data import Record

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:the tokenizer has no pad token")]
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    import transformers

    root = tmp_path_factory.mktemp("dist")
    rng = random.Random(0)
    records = [Record(instruction=" ".join(rng.choices(WORDS, k=rng.randint(2, 9))), input="",
                      output=" ".join(rng.choices(WORDS, k=rng.randint(1, 6))), answer="x") for _ in range(5)]
    (root / "train.json").write_text(json.dumps([vars(r) for r in records]))
    tok = word_tokenizer(root / "model", prompt_words(records))
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "model")
    return SimpleNamespace(root=root, model=root / "model", data=root / "train.json")


def _argv(lm: SimpleNamespace, out: Path, *extra: str) -> list[str]:
    """4 steps of 4 examples over 5 records: steps 2 and 4 hold one example (the epoch's tail)."""
    return ["finetune", "--model", str(lm.model), "--data", str(lm.data), "--output-dir", str(out), "--method",
            "dora", "--rank", "4", "--max-steps", "4", "--lr", "1e-2", "--save-every", "2", "--device", "cpu",
            *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _torchrun(argv: list[str], n: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "dorakit",
           *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _losses(out: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return dk.read_adapter(out / "final").tensors


def _assert_same_training(a: Path, b: Path) -> None:
    assert _losses(a) == pytest.approx(_losses(b), rel=1e-6, abs=0)
    ta, tb = _adapter(a), _adapter(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def runs(lm: SimpleNamespace) -> dict[str, Path]:
    """One process (4 per micro-batch) and 2 processes (2 each) under DDP and FSDP2: global batch 4."""
    out = {"one": lm.root / "one"}
    assert main(_argv(lm, out["one"], "--batch-size", "4")) == 0
    for strategy in ("ddp", "fsdp"):
        out[strategy] = lm.root / strategy
        proc = _torchrun(_argv(lm, out[strategy], "--batch-size", "2", "--strategy", strategy))
        assert proc.stdout.count("saved to") == 1  # rank 0 reports for both
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_what_one_process_trains(runs: dict[str, Path], strategy: str) -> None:
    _assert_same_training(runs[strategy], runs["one"])
    assert len(_losses(runs["one"])) == 4 and len(set(_losses(runs["one"]))) == 4  # it trained
    ckpt = runs[strategy] / "checkpoints" / "step-0000004"
    assert {"rng-0.pt", "rng-1.pt", "state.json", ".metadata"} <= {p.name for p in ckpt.iterdir()}
    assert json.loads((ckpt / "state.json").read_text())["world_size"] == 2


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gpus_with_nccl_train_what_one_gpu_trains(lm: SimpleNamespace, tmp_path: Path, strategy: str) -> None:
    """The equality above on GPUs: one process on one GPU against 2 processes on 2 GPUs (NCCL), fp32."""

    def argv(out: Path, *extra: str) -> list[str]:
        args = _argv(lm, out, *extra)
        args[args.index("--device") + 1] = "auto"  # cuda; cuda:<LOCAL_RANK> under torchrun
        return args

    one, two = tmp_path / "one", tmp_path / strategy
    assert main(argv(one, "--batch-size", "4")) == 0
    _torchrun(argv(two, "--batch-size", "2", "--strategy", strategy))
    for run in (one, two):  # they ran on the GPUs
        assert json.loads((run / "summary.json").read_text())["peak_cuda_bytes"] > 0
    _assert_same_training(two, one)


def test_a_different_split_changes_the_losses(runs: dict[str, Path], lm: SimpleNamespace) -> None:
    """Negative control for the equality above: a global batch of 2 trains something else."""
    other = lm.root / "other"
    assert main(_argv(lm, other, "--batch-size", "2")) == 0
    assert _losses(other) != pytest.approx(_losses(runs["one"]), rel=1e-6, abs=0)


def _cut_at_step_2(run: Path, to: Path) -> Path:
    """A copy of a finished run as a run killed after its step-2 checkpoint."""
    shutil.copytree(run, to)
    shutil.rmtree(to / "final")
    shutil.rmtree(to / "checkpoints" / "step-0000004")
    (to / "checkpoints" / "latest").write_text("step-0000002")
    return to


def test_fsdp_checkpoint_resumes_on_one_process(runs: dict[str, Path], lm: SimpleNamespace) -> None:
    cut = _cut_at_step_2(runs["fsdp"], lm.root / "fsdp-cut")
    with pytest.warns(UserWarning, match="written by 2"):
        assert main(_argv(lm, cut, "--batch-size", "4", "--resume")) == 0
    _assert_same_training(cut, runs["fsdp"])


def test_one_process_checkpoint_resumes_on_two_with_fsdp(runs: dict[str, Path], lm: SimpleNamespace) -> None:
    cut = _cut_at_step_2(runs["one"], lm.root / "one-cut")
    _torchrun(_argv(lm, cut, "--batch-size", "2", "--strategy", "fsdp", "--resume"))
    _assert_same_training(cut, runs["one"])


def test_resume_with_another_global_batch_names_it(runs: dict[str, Path], lm: SimpleNamespace,
                                                   capsys: pytest.CaptureFixture) -> None:
    cut = _cut_at_step_2(runs["ddp"], lm.root / "ddp-cut")
    before = {p: p.read_bytes() for p in cut.rglob("*") if p.is_file()}
    assert main(_argv(lm, cut, "--batch-size", "2", "--resume")) == 2  # 2 × 1 process != 2 × 2 processes
    err = capsys.readouterr().err
    assert "global_batch: 4 -> 2" in err and "--grad-accum" in err
    assert {p: p.read_bytes() for p in cut.rglob("*") if p.is_file()} == before


def _worker(method: str, precision: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(HERE / "dist_worker.py"), method, precision]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fsdp_norm_uses_the_gathered_weight_and_gathers_nothing_twice() -> None:
    """One step of DoRA and of LoRA on a sharded tiny Llama: loss and all gradients equal the unsharded
    model's; DoRA issues as many all-gathers as LoRA and gathers only its magnitudes on top."""
    res = {method: _worker(method, "fp32") for method in ("dora", "lora")}
    for r in res.values():
        assert r["world"] == 2 and r["same_names"] and r["gathers"] > 0
        assert r["loss_diff"] <= 1e-6 and r["grad_diff"] <= 1e-6 * r["grad_scale"]
    assert res["dora"]["sharded_magnitude"] == "DTensor"
    assert res["dora"]["gathers"] == res["lora"]["gathers"]
    extra = res["dora"]["gathered"] - res["lora"]["gathered"]
    assert 0 < extra <= 2 * res["dora"]["magnitude"]  # each layer's magnitudes, forward + backward; no W0


def test_fsdp_bf16_keeps_adapters_and_magnitude_in_fp32() -> None:
    """bf16 under FSDP: W0 is gathered in bf16, A, B and m stay fp32 in the forward (never a bf16-rounded
    magnitude in m / ||W0 + sBA||), under autocast as in one process; loss and every gradient equal the
    unsharded model's with the same bf16 W0 under autocast."""
    r = _worker("dora", "bf16")
    assert r["dtypes_in_forward"] == {"weight": "torch.bfloat16", "lora_A": "torch.float32",
                                      "magnitude": "torch.float32", "autocast": True}
    assert r["loss_diff"] <= 1e-5 and r["grad_diff"] <= 1e-5 * r["grad_scale"]


def test_fsdp_full_fine_tuning_of_tied_embeddings_saves_what_one_process_saves(lm: SimpleNamespace,
                                                                            tmp_path: Path) -> None:
    """A tied LM head (one Parameter under two names) is gathered once and saved under both."""
    import transformers
    from safetensors.torch import load_file

    tied = tmp_path / "tied"
    config = transformers.AutoConfig.from_pretrained(lm.model)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tied)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(lm.model / name, tied / name)
    runs = {}
    for key, extra in (("one", ["--batch-size", "4"]), ("fsdp", ["--batch-size", "2", "--strategy", "fsdp"])):
        runs[key] = tmp_path / key
        argv = [*_argv(lm, runs[key], "--method", "full", *extra)]
        argv[argv.index("--model") + 1] = str(tied)
        if key == "one":
            assert main(argv) == 0
        else:
            _torchrun(argv)
    assert _losses(runs["fsdp"]) == pytest.approx(_losses(runs["one"]), rel=1e-6, abs=0)
    a, b = (load_file(runs[k] / "final" / "model.safetensors") for k in ("one", "fsdp"))
    assert a.keys() == b.keys()
    # AdamW divides each element's step by its own gradient scale, so where a weight's gradient is near
    # zero the reduction-order difference of 2 processes moves it by a fraction of lr (measured: 3.4e-4·lr
    # at lr 1e-2 and 1e-3 alike), not by a fraction of its value: the bound scales with lr (1e-2 here).
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-3 * 1e-2, msg=key)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_trains_what_one_process_trains(runs: dict[str, Path], lm: SimpleNamespace) -> None:
    pytest.importorskip("accelerate")
    out = lm.root / "accelerate"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(_free_port()), "-m", "dorakit", *_argv(lm, out, "--batch-size", "2", "--strategy", "ddp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_training(out, runs["one"])


# ------------------------------------------------------------------------------------------ bad inputs

def _launched(monkeypatch: pytest.MonkeyPatch, world: int) -> None:
    """This test process as rank 0 of a launch of ``world`` processes (world 1 forms a real gloo group)."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize(("world", "extra", "message"), [
    (None, ("--strategy", "fsdp"), "--strategy fsdp needs a distributed launch"),
    (None, ("--strategy", "ddp"), "--strategy ddp needs a distributed launch"),
    (2, (), "--strategy is none"),
    (1, ("--strategy", "fsdp", "--precision", "fp16"), "--precision fp16 with --strategy fsdp"),
    (1, ("--strategy", "ddp", "--load-in-4bit"), "--load-in-4bit with --strategy ddp"),
    (1, ("--strategy", "fsdp", "--record-deltas", "1"), "--record-deltas with --strategy fsdp"),
    (1, ("--strategy", "ddp", "--device", "cuda:1"), "each process takes cuda:<LOCAL_RANK>"),
])
def test_bad_distributed_settings_exit_2_and_write_nothing(lm: SimpleNamespace, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture, world: int | None,
                                                           extra: tuple[str, ...], message: str) -> None:
    if world is not None:
        _launched(monkeypatch, world)
    assert main(_argv(lm, tmp_path / "out", "--batch-size", "2", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert not torch.distributed.is_initialized()  # the group a check formed is left again


def test_ctrl_c_to_torchrun_checkpoints_every_process_then_resumes(lm: SimpleNamespace, tmp_path: Path) -> None:
    """SIGINT to torchrun reaches every worker: they finish the step together, write one checkpoint and
    exit 130; resuming it on one process gives the losses of an uninterrupted run."""
    import signal
    import time

    steps = 200
    argv = [*_argv(lm, tmp_path / "cut", "--batch-size", "2", "--strategy", "fsdp"), "--max-steps", str(steps),
            "--save-every", "0", "--lr", "1e-3"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "dorakit", *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    metrics, deadline = tmp_path / "cut" / "metrics.jsonl", time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and \
            (not metrics.exists() or metrics.read_text().count("\n") < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=300)
    if (tmp_path / "cut" / "final").exists():
        pytest.skip("the run finished before SIGINT arrived (a very fast machine)")
    k = int((tmp_path / "cut" / "checkpoints" / "latest").read_text().removeprefix("step-"))
    assert 3 <= k < steps and f"interrupted: checkpoint at step {k}" in stdout
    assert len(_losses(tmp_path / "cut")) == k
    with pytest.warns(UserWarning, match="written by 2"):
        assert main([*argv[:argv.index("--batch-size")], "--batch-size", "4", *argv[argv.index("--strategy") + 2:],
                     "--resume"]) == 0
    full = tmp_path / "full"
    assert main([*_argv(lm, full, "--batch-size", "4"), "--max-steps", str(steps), "--save-every", "0",
                 "--lr", "1e-3"]) == 0
    _assert_same_training(tmp_path / "cut", full)


def test_sigterm_to_every_process_checkpoints_once(lm: SimpleNamespace, tmp_path: Path) -> None:
    """A scheduler's SIGTERM to the whole process group reaches each worker twice (directly and forwarded
    by torchrun): the run still finishes its step, checkpoints and stops; a repeated SIGTERM never aborts."""
    import signal
    import time

    argv = [*_argv(lm, tmp_path / "cut", "--batch-size", "2", "--strategy", "ddp"), "--max-steps", "400",
            "--save-every", "0", "--lr", "1e-3"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "dorakit", *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            start_new_session=True)
    metrics, deadline = tmp_path / "cut" / "metrics.jsonl", time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and \
            (not metrics.exists() or metrics.read_text().count("\n") < 3):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    if (tmp_path / "cut" / "final").exists():
        pytest.skip("the run finished before SIGTERM arrived (a very fast machine)")
    assert "KeyboardInterrupt" not in stderr
    k = int((tmp_path / "cut" / "checkpoints" / "latest").read_text().removeprefix("step-"))
    assert f"interrupted: checkpoint at step {k}" in stdout and len(_losses(tmp_path / "cut")) == k


def test_a_process_group_the_caller_made_is_left_to_the_caller(lm: SimpleNamespace, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _launched(monkeypatch, 1)
    torch.distributed.init_process_group("gloo")
    try:
        assert main(_argv(lm, tmp_path / "out", "--batch-size", "4", "--strategy", "ddp")) == 0
        assert torch.distributed.is_initialized()
    finally:
        torch.distributed.destroy_process_group()
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key)
    assert main(_argv(lm, tmp_path / "ref", "--batch-size", "4")) == 0
    _assert_same_training(tmp_path / "out", tmp_path / "ref")  # DDP on the caller's group of 1 trained as usual


def test_a_finished_run_meets_at_a_barrier_before_leaving_the_group(lm: SimpleNamespace, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank that left right after its last collective could abort in gloo's worker thread (see
    distributed.teardown): a finished run meets at a barrier first; a failed one does not wait for ranks
    that may never come."""
    calls: list[str] = []
    for name in ("barrier", "destroy_process_group"):
        real = getattr(torch.distributed, name)
        monkeypatch.setattr(torch.distributed, name,
                            lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    _launched(monkeypatch, 1)
    assert main(_argv(lm, tmp_path / "ok", "--batch-size", "4", "--strategy", "ddp")) == 0
    assert calls == ["barrier", "destroy_process_group"]
    calls.clear()
    _launched(monkeypatch, 1)
    assert main(_argv(lm, tmp_path / "bad", "--batch-size", "4", "--strategy", "fsdp", "--record-deltas", "1")) == 2
    assert calls == ["destroy_process_group"] and not torch.distributed.is_initialized()


def test_compile_trains_what_eager_trains(runs: dict[str, Path], lm: SimpleNamespace, tmp_path: Path) -> None:
    """--compile (torch.compile in place): the same losses and adapter as the eager one-process run, to
    float32 reordering; its checkpoints keep the model's own names (a compiled run resumes an eager one's)."""
    from torch._dynamo.utils import counters

    out = tmp_path / "compiled"
    counters.clear()
    assert main(_argv(lm, out, "--batch-size", "4", "--compile")) == 0
    assert counters["stats"]["unique_graphs"] >= 1  # the steps did run compiled
    assert _losses(out) == pytest.approx(_losses(runs["one"]), rel=1e-4, abs=0)
    ta, tb = _adapter(out), _adapter(runs["one"])
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], rtol=1e-4, atol=1e-5, msg=key)
    from dorakit.training.checkpoint import read_checkpoint

    compiled_ckpt = read_checkpoint(out / "checkpoints" / "step-0000002")
    assert compiled_ckpt.keys() == read_checkpoint(runs["one"] / "checkpoints" / "step-0000002").keys()


def test_compile_with_4bit_is_refused_before_loading(lm: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "refused"
    assert main(_argv(lm, out, "--compile", "--load-in-4bit")) == 2
    assert not out.exists()
