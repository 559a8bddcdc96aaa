"""DAILTrainer: exact alignment of the three contexts, masking, normalisation, LoRA-only updates."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model

from dail.config import GenerateConfig, ModelConfig, SamplingConfig, TrainConfig
from dail.training import DAILCollator, DAILConfig, DAILTrainer  # the package's public names
from dail.training.trainer import _decoder, has_accelerator, response_hidden, response_logits

EXAMPLES = [
    {"prompt_ids": {"student": [5, 6, 7], "privileged": [5, 6, 7, 8, 9, 10], "negative": [5, 8]},
     "response_ids": [11, 12, 13, 2]},
    {"prompt_ids": {"student": [5, 6, 7, 9, 9], "privileged": [5, 9], "negative": [5, 8, 8, 8]},
     "response_ids": [14, 2]},
]
ROLES = ("student", "privileged", "negative")


def test_collator_puts_the_response_at_one_column(tiny):
    batch = DAILCollator(pad_id=0, roles=ROLES)(EXAMPLES)
    assert batch["labels"].tolist() == [[11, 12, 13, 2], [14, 2, -100, -100]]
    assert batch["response_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    for role in ROLES:
        ids, mask = batch[f"{role}_input_ids"], batch[f"{role}_attention_mask"]
        start = ids.shape[1] - 4
        assert ids[0, start:].tolist() == [11, 12, 13, 2]
        for i, e in enumerate(EXAMPLES):
            kept = ids[i][mask[i].bool()].tolist()
            assert kept == e["prompt_ids"][role] + e["response_ids"]


def test_eos_is_trained_even_when_pad_equals_eos():
    batch = DAILCollator(pad_id=2, roles=("student",))(EXAMPLES)
    assert batch["response_mask"][0, 3] == 1 and batch["labels"][0, 3] == 2
    assert batch["response_mask"][1].tolist() == [1, 1, 0, 0]


def test_response_logits_align_with_an_unpadded_forward(tiny):
    """No off-by-one: column P-1+j of every role predicts response token j."""
    model, _ = tiny
    batch = DAILCollator(pad_id=0, roles=ROLES)(EXAMPLES)
    with torch.no_grad():
        for role in ROLES:
            got = response_logits(model, batch, role)  # (B, T, V)
            for i, e in enumerate(EXAMPLES):
                prompt, response = e["prompt_ids"][role], e["response_ids"]
                full = model(input_ids=torch.tensor([prompt + response])).logits[0]
                expected = full[len(prompt) - 1: len(prompt) - 1 + len(response)]
                assert torch.allclose(got[i, :len(response)], expected, atol=1e-4), role


class _Wrapper(torch.nn.Module):
    """Stands in for DDP/FSDP/DeepSpeed: the model under `.module`, forward passed through."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, **kw):
        return self.module(**kw)


def test_response_hidden_takes_the_bodys_output_through_wrappers(tiny):
    """The final-normed hidden states, found by a hook on the body through PEFT and `.module`."""
    model, _ = tiny
    batch = DAILCollator(pad_id=0, roles=ROLES)(EXAMPLES)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    width = batch["response_mask"].shape[1]
    with torch.no_grad():
        for wrapped in (model, peft, _Wrapper(peft)):
            assert _decoder(wrapped) is model.model
            for role in ROLES:
                ids, mask = batch[f"{role}_input_ids"], batch[f"{role}_attention_mask"]
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                full = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             output_hidden_states=True).hidden_states[-1]
                got = response_hidden(wrapped, batch, role)
                assert got.shape == (len(EXAMPLES), width, full.shape[-1])
                torch.testing.assert_close(got, full[:, -(width + 1):-1], atol=1e-5, rtol=1e-5)
    peft.unload()


def make_trainer(tiny_model_dir, tmp_path, **kw):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    args = DAILConfig(**{"output_dir": str(tmp_path / "ckpt"), "save_strategy": "no", "num_train_epochs": 1,
                         "learning_rate": 1e-2, "warmup_steps": 0, **kw})
    roles = ROLES if args.uses_negative else ROLES[:2] if args.uses_teacher else ROLES[:1]
    return DAILTrainer(model=model, args=args, train_dataset=EXAMPLES * 2,
                       data_collator=DAILCollator(pad_id=0, roles=roles))


@pytest.mark.parametrize("loss", ["dail", "nll"])
def test_training_moves_only_lora_weights(tiny_model_dir, tmp_path, loss):
    trainer = make_trainer(tiny_model_dir, tmp_path, loss=loss, gradient_accumulation_steps=1)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "nothing was trained"
    assert all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)


def test_gradient_accumulation_counts_tokens_of_the_whole_batch(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, loss="dail", gradient_accumulation_steps=2,
                           per_device_train_batch_size=1)
    seen = []
    original = trainer.compute_loss

    def spy(model, inputs, return_outputs=False, num_items_in_batch=None):
        seen.append(int(num_items_in_batch))
        return original(model, inputs, return_outputs, num_items_in_batch)

    trainer.compute_loss = spy
    trainer.train()
    # Each optimizer step accumulates both examples: 4 + 2 response tokens, EOS included.
    assert seen and all(n == 6 for n in seen)


def test_loss_terms_are_logged(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, loss="dail", gradient_accumulation_steps=2,
                           logging_steps=1)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "kl_privileged" in h]
    assert logged and all("kl_negative" in h for h in logged)
    h = logged[0]
    assert h["loss"] == pytest.approx(h["kl_privileged"] - 0.1 * h["kl_negative"], abs=1e-3)


def test_config_validation():
    with pytest.raises(ValueError, match="loss"):
        DAILConfig(output_dir="x", loss="ppo")
    assert DAILConfig(output_dir="x", loss="kl").gamma == 0.0
    defaults = DAILConfig(output_dir="x")
    assert (defaults.lora_r, defaults.lora_alpha, defaults.learning_rate, defaults.gradient_accumulation_steps,
            defaults.gamma, defaults.divergence) == (32, 32, 2e-4, 4, 0.1, "reverse")


def test_divergence_setting_and_its_older_name():
    from dail.config import ConfigError

    assert DAILConfig(output_dir="x", divergence="jsd:0.50").divergence == "jsd:0.5"
    # Configs written before --divergence existed keep working.
    older = DAILConfig(output_dir="x", kl_direction="forward")
    assert (older.divergence, older.kl_direction) == ("forward", None)
    assert DAILConfig(output_dir="x", divergence="jsd:1", kl_direction="reverse").divergence == "jsd:1"
    with pytest.raises(ConfigError, match="contradicts"):
        DAILConfig(output_dir="x", divergence="reverse", kl_direction="forward")
    with pytest.raises(ConfigError, match="kl_direction 'jsd:0.5': not one of reverse, forward"):
        DAILConfig(output_dir="x", kl_direction="jsd:0.5")
    with pytest.raises(ConfigError, match="--divergence 'sideways': not a divergence"):
        DAILConfig(output_dir="x", divergence="sideways")


# --------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def traces_file(tiny_model_dir, tmp_path_factory):
    from dail.stages import generate
    from tests.conftest import PROBLEMS

    root = tmp_path_factory.mktemp("gen")
    data = root / "problems.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    generate.run(GenerateConfig(data=str(data), out=str(root / "out"), samples=2, tau=0.5,
                                model=ModelConfig(model=str(tiny_model_dir)),
                                sampling=SamplingConfig(max_new_tokens=8, batch_size=4)))
    return root / "out" / "traces.jsonl", data


def test_train_stage_resumes_from_its_last_checkpoint(tiny_model_dir, traces_file, tmp_path, caplog):
    from dail.stages import train

    traces, _ = traces_file
    base = dict(traces=str(traces), out=str(tmp_path / "run"), model=ModelConfig(model=str(tiny_model_dir)))
    steps = {"max_steps": 3, "save_steps": 1, "gradient_accumulation_steps": 1, "lora_r": 4,
             "save_total_limit": None}
    train.run(TrainConfig(**base, training=steps))
    run = tmp_path / "run"
    assert (run / "adapter" / "adapter_config.json").exists()
    # As if stopped after its second checkpoint: the summary, the adapter and step 3 are gone.
    for name in ("train_summary.json", "adapter", "checkpoints/checkpoint-3"):
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    with caplog.at_level("INFO"):
        train.run(TrainConfig(**base, training=steps))
    assert any("resuming from" in r.message and "checkpoint-2" in r.message for r in caplog.records)
    summary = json.loads((run / "train_summary.json").read_text())
    assert max(h.get("step", 0) for h in summary["log_history"]) == 3
    assert summary["resumed_from"] == "checkpoint-2"
    # The whole run's figures, not those of its last step alone.
    losses = [h["loss"] for h in summary["log_history"] if "loss" in h]
    assert summary["steps"] == 3 and len(losses) == 3
    assert summary["metrics"]["train_loss"] == pytest.approx(sum(losses) / 3)
    assert "train_runtime" in summary["metrics"]["since_resume"]


def test_training_stopped_before_its_first_checkpoint_says_it_will_start_over(tiny_model_dir, traces_file,
                                                                              tmp_path, monkeypatch, capsys):
    from dail.cli import main
    from dail.training.trainer import DAILTrainer

    def stopped(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(DAILTrainer, "training_step", stopped)
    traces, _ = traces_file
    assert main([str(a) for a in ("train", "--model", tiny_model_dir, "--traces", traces,
                                  "--out", tmp_path / "run")]) == 130
    assert ("interrupted; no checkpoint was saved yet (one is saved every 50 steps): rerunning the same command "
            "starts over") in capsys.readouterr().err


def test_train_summary_and_log_give_the_trainable_share(tiny_model_dir, traces_file, tmp_path, caplog):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from dail.stages import train

    traces, _ = traces_file
    with caplog.at_level("INFO"):
        train.run(TrainConfig(traces=str(traces), out=str(tmp_path / "run"), model=ModelConfig(model=str(tiny_model_dir)),
                              training={"max_steps": 1, "lora_r": 4}))
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    adapter = sum(t.numel() for t in load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors").values())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).num_parameters()
    assert (summary["trainable_parameters"], summary["all_parameters"]) == (adapter, base + adapter)
    assert summary["trainable_share"] == pytest.approx(adapter / (base + adapter))
    assert 0 < summary["trainable_share"] < 1
    assert any(f"{adapter} of {base + adapter} parameters" in r.message and "trainable share" in r.message
               for r in caplog.records)


def test_sft_trains_on_expert_solutions(tiny_model_dir, traces_file, tmp_path):
    from transformers import AutoTokenizer

    from dail.stages.train import load_examples

    _, data = traces_file
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = TrainConfig(data=str(data), out=str(tmp_path), loss="sft", model=ModelConfig(model=str(tiny_model_dir)))
    examples = load_examples(cfg, tokenizer, max_length=4096)
    assert len(examples) == 3
    first = examples[0]
    assert first["response_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(first["response_ids"][:-1]) == "We add 2 and 3 to get 5. \\boxed{5}"
    assert set(first["prompt_ids"]) == {"student"}
    # Responses are cut so the longest role fits max_length.
    short = load_examples(cfg, tokenizer, max_length=len(first["prompt_ids"]["student"]) + 3)
    assert len(short[0]["response_ids"]) == 3


@pytest.mark.parametrize("loss, divergence", [("dail", "reverse"), ("dail", "jsd:0.3"), ("dail", "forward"),
                                              ("nll", "reverse")])
def test_chunked_loss_equals_full_logit_loss_with_lora_on_lm_head(tiny_model_dir, tmp_path, loss, divergence):
    """compute_loss from hidden states (chunked head) == from full logits, value and gradients,
    and both are the divergence asked for."""
    from transformers import AutoModelForCausalLM

    from dail.training import contrastive_kl
    from dail.training.trainer import response_logits

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    batch = DAILCollator(pad_id=0, roles=ROLES)(EXAMPLES)
    results = []
    for chunk in (0, 2):
        args = DAILConfig(output_dir=str(tmp_path / f"c{chunk}"), loss=loss, gamma=0.3, loss_chunk_size=chunk,
                          divergence=divergence, use_cpu=True)
        trainer = DAILTrainer(model=model, args=args)
        model.zero_grad()
        value = trainer.compute_loss(model, batch)
        value.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert any("lm_head" in n for n in grads)
        results.append((float(value.detach()), grads))
    (v0, g0), (v1, g1) = results
    assert v1 == pytest.approx(v0, abs=1e-5)
    if loss == "dail":
        with torch.no_grad():
            student = response_logits(model, batch, "student")
            with model.disable_adapter():
                privileged, negative = (response_logits(model, batch, role) for role in ("privileged", "negative"))
        expected = contrastive_kl(student, privileged, negative, batch["response_mask"], gamma=0.3,
                                  divergence=divergence)
        assert v0 == pytest.approx(float(expected), abs=1e-5)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- teacher cache


def _lora_model_with_live_adapter(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():  # a non-zero adapter: the cache must hold the base model's states
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def test_teacher_cache_gives_the_same_loss_and_gradients_without_teacher_forwards(tiny_model_dir, tmp_path):
    model = _lora_model_with_live_adapter(tiny_model_dir)
    longer = {"prompt_ids": {"student": [5] * 9, "privileged": [6] * 12, "negative": [7] * 3},
              "response_ids": [11, 12, 13, 14, 15, 16, 2]}
    collate = DAILCollator(pad_id=0, roles=ROLES)
    first, later = collate(EXAMPLES + [longer]), collate(EXAMPLES[::-1])  # other order and padding
    trainers = {gb: DAILTrainer(model=model, args=DAILConfig(output_dir=str(tmp_path / str(gb)), gamma=0.3,
                                                             loss_chunk_size=2, teacher_cache_gb=gb, use_cpu=True))
                for gb in (0.0, 0.01)}
    trainers[0.01].compute_loss(model, first)  # fills the cache
    with torch.no_grad():  # the adapter trains on; the teachers must not follow it
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.02)
    forwards = []
    hook = _decoder(model).register_forward_hook(lambda *_: forwards.append(1))
    results = []
    for trainer in trainers.values():
        forwards.clear()
        model.zero_grad()
        value = trainer.compute_loss(model, later)
        value.backward()
        results.append((float(value.detach()), {n: p.grad.clone() for n, p in model.named_parameters()
                                                 if p.requires_grad}, len(forwards)))
    hook.remove()
    (plain, plain_grads, plain_forwards), (cached, cached_grads, cached_forwards) = results
    assert (plain_forwards, cached_forwards) == (3, 1)  # student, privileged, negative / student only
    assert cached == pytest.approx(plain, abs=1e-5)
    for name in plain_grads:
        torch.testing.assert_close(cached_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4)


def test_teacher_cache_serves_the_second_epoch_and_logs_its_hit_rate(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, loss="dail", gradient_accumulation_steps=1,
                           num_train_epochs=2, logging_steps=1, loss_chunk_size=2, teacher_cache_gb=0.01)
    trainer.train_dataset = EXAMPLES  # two distinct rows, one per step
    trainer.train()
    rates = [h["teacher_cache_hit_rate"] for h in trainer.state.log_history if "teacher_cache_hit_rate" in h]
    assert rates == [0.0, 0.0, 1.0, 1.0]
    assert 0 < trainer.state.log_history[-2]["teacher_cache_mib"] < 0.01 * 1024


def test_teacher_cache_keeps_rows_only_up_to_its_capacity():
    from dail.training.teacher_cache import TeacherCache

    batch = DAILCollator(pad_id=0, roles=ROLES)(EXAMPLES)
    keys = TeacherCache.row_keys(batch, "privileged")
    assert len(set(keys)) == 2 and keys != TeacherCache.row_keys(batch, "negative")
    rows = [torch.zeros(4, 8), torch.zeros(2, 8)]  # 128 and 64 bytes
    cache = TeacherCache(capacity_bytes=150)
    cache.add(zip(keys, rows, strict=True))
    assert cache.used_bytes == 128 and len(cache) == 1
    assert cache.lookup(keys) is None and cache.lookup(keys[:1])[0].shape == (4, 8)


def test_teacher_cache_needs_the_chunked_loss():
    with pytest.raises(ValueError, match="loss_chunk_size"):
        DAILConfig(output_dir="x", teacher_cache_gb=1.0, loss_chunk_size=0)
    with pytest.raises(ValueError, match="--teacher-cache-gb -1.0: out of range"):
        DAILConfig(output_dir="x", teacher_cache_gb=-1.0)


@pytest.mark.skipif(has_accelerator(), reason="the defaults without an accelerator")
def test_training_without_an_accelerator_does_not_pin_memory(tmp_path):
    from dail.training.arguments import training_arguments

    args = training_arguments(TrainConfig(data="unused", out=str(tmp_path), loss="dail"), tmp_path)
    assert args.dataloader_pin_memory is False and not args.gradient_checkpointing and not args.bf16
    assert DAILConfig(output_dir=str(tmp_path), dataloader_pin_memory=True).dataloader_pin_memory is False


@pytest.mark.parametrize("architecture, adapted", [
    ("qwen2", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),  # the paper's
    ("gpt-neox", {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}),
    ("phi3", {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
])
def test_default_lora_targets_are_every_linear_layer_but_the_head(tmp_path, architecture, adapted):
    from dail.models import load_model
    from dail.testing import build_tiny_model
    from dail.training.arguments import check_lora_targets

    path = build_tiny_model(tmp_path / "m", architecture=architecture)
    model = load_model(ModelConfig(model=str(path)), for_training=True)
    targets = DAILConfig(output_dir=str(tmp_path)).lora_target_modules
    check_lora_targets(model, targets)
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=2, target_modules=targets))
    assert {name.rsplit(".", 1)[-1] for name, module in peft.named_modules() if hasattr(module, "lora_A")} == adapted


@pytest.mark.parametrize("given, kept", [("all-linear", "all-linear"), (["all-linear"], "all-linear"),
                                         ("q_proj", ["q_proj"]), (["q_proj", "v_proj"], ["q_proj", "v_proj"])])
def test_lora_targets_are_all_linear_or_a_list_of_names(tmp_path, given, kept):
    assert DAILConfig(output_dir=str(tmp_path), lora_target_modules=given).lora_target_modules == kept


@pytest.mark.parametrize("given", [[], ["q_proj", "all-linear"], [""]])
def test_lora_targets_refuse_empty_or_mixed_lists(tmp_path, given):
    with pytest.raises(ValueError, match="lora_target_modules .*: must be all-linear or a list of linear layer names"):
        DAILConfig(output_dir=str(tmp_path), lora_target_modules=given)


def test_named_lora_targets_the_model_lacks_are_refused_before_it_loads(tiny_model_dir, tmp_path, capsys,
                                                                        monkeypatch):
    from dail import models
    from dail.cli import main

    traces = tmp_path / "traces.jsonl"
    traces.write_text(json.dumps({"prompt_ids": {"student": [5], "privileged": [5], "negative": [5]},
                                  "token_ids": [6]}) + "\n")

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", never)
    code = main(["train", "--model", str(tiny_model_dir), "--traces", str(traces), "--out", str(tmp_path / "o"),
                 "--lora-target-modules", "q_proj", "wq", "query_key_value"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "lora_target_modules: wq, query_key_value are no linear layer of this model; its linear layers " \
           "are named down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in err
    assert not (tmp_path / "o").exists()


def test_a_short_run_scales_the_default_warm_up_and_refuses_a_longer_one(tiny_model_dir, traces_file, tmp_path,
                                                                        capsys):
    """8 traces, 1 epoch, batch 1 x 4: 2 optimizer steps, which the release's 5 warm-up steps
    would spend at learning rates below the one asked for, the first at 0."""
    from safetensors.torch import load_file

    from dail.cli import main

    traces, _ = traces_file
    examples = len(traces.read_text().splitlines())
    steps = -(-examples // 4)
    args = ["train", "--model", tiny_model_dir, "--traces", traces, "--epochs", 1, "--learning-rate", 0.01]
    assert main([str(a) for a in (*args, "--out", tmp_path / "set", "--warmup-steps", steps)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert f"warmup_steps {steps} is {steps} steps, not shorter than the run's {steps} optimizer steps" in err
    assert not (tmp_path / "set").exists()

    assert main([str(a) for a in (*args, "--out", tmp_path / "default")]) == 0
    summary = json.loads((tmp_path / "default" / "train_summary.json").read_text())
    assert (summary["optimizer_steps"], summary["warmup_steps"]) == (steps, 0)
    assert summary["peak_learning_rate"] == pytest.approx(0.01)
    weights = load_file(tmp_path / "default" / "adapter" / "adapter_model.safetensors")
    assert any(bool(w.abs().sum() > 0) for name, w in weights.items() if "lora_B" in name)  # it learned


def test_weights_checkpoints_and_merged_models_get_the_users_umask(tiny_model_dir, traces_file, tmp_path):
    import os

    from dail.stages import train

    traces, _ = traces_file
    previous = os.umask(0o027)
    try:
        train.run(TrainConfig(traces=str(traces), out=str(tmp_path / "run"),
                              model=ModelConfig(model=str(tiny_model_dir)),
                              training={"max_steps": 2, "save_steps": 1, "lora_r": 4, "merge": True,
                                        "save_total_limit": None}))
    finally:
        os.umask(previous)
    run = tmp_path / "run"
    written = [p for p in run.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"adapter_model.safetensors", "model.safetensors", "optimizer.pt"}
    assert {(p.relative_to(run), p.stat().st_mode & 0o777) for p in written if p.stat().st_mode & 0o777 != 0o640} \
        == set()
    assert all(p.stat().st_mode & 0o777 == 0o750 for p in run.rglob("*") if p.is_dir())
