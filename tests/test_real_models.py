"""Formats in models as people build them: bf16, meta-device construction, FSDP2 with bf16 mixed precision, a cold
torch.compile, task heads, widths checked up front, and the recipe saved with the model."""
import math
import os

import pytest
import torch
import torch.nn as nn

import capscale
from capscale.capacity import InputError

transformers = pytest.importorskip("transformers", reason="transformers is a test extra: pip install -e '.[dev]'")

from test_compress import _free_port, tiny_llama  # noqa: E402  (pytest puts tests/ on the path)


@pytest.mark.parametrize("spec", ["int4/int4", "nvfp4/nvfp4"])
def test_a_bf16_hugging_face_llama_trains_over_a_format(spec):
    model = capscale.compress_(tiny_llama(), spec).to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_meta_device_construction_then_loading_gives_the_normal_builds_logits():
    normal = capscale.compress_(tiny_llama(seed=3), "int4/int4")
    with torch.device("meta"):
        empty = transformers.LlamaForCausalLM(normal.config)
    capscale.compress_(empty, "int4/int4")
    empty.to_empty(device="cpu")
    empty.load_state_dict(normal.state_dict())
    # the model's own non-persistent buffers (the rotary frequencies) are its init's to fill, as after any to_empty;
    # capscale's rotations are not copied: they rebuild themselves on the move
    for name, buffer in normal.named_buffers():
        if not name.endswith("hadamard"):
            empty.get_buffer(name).copy_(buffer)
    assert all(name.endswith("hadamard") or not name.startswith("model.layers") for name, _ in normal.named_buffers())
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(empty(input_ids=x).logits, normal(input_ids=x).logits)


def test_task_heads_stay_dense_and_widths_are_checked_before_any_forward():
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=4, num_labels=3)
    llama = capscale.compress_(transformers.LlamaForSequenceClassification(config), "int4/int4")
    assert "score" in llama.capscale_summary.skipped and type(llama.score) is nn.Linear
    bert_config = transformers.BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                          intermediate_size=128, num_labels=2)
    bert = capscale.compress_(transformers.BertForSequenceClassification(bert_config), "int4")
    assert {"classifier", "bert.pooler.dense"} <= set(bert.capscale_summary.skipped)
    with pytest.raises(InputError, match=r"layer 0 \(64 x 72\): its weights format .* group 16"):
        capscale.compress_(nn.Sequential(nn.Linear(72, 64), nn.Linear(64, 64)), "nvfp4/nvfp4")


def test_the_recipe_travels_with_save_pretrained(tmp_path):
    model = capscale.compress_(tiny_llama(seed=5), "int4/int4")
    model.save_pretrained(tmp_path / "saved")
    again = capscale.compress_(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "saved"))
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    assert torch.equal(again(input_ids=x).logits, model(input_ids=x).logits)


def test_a_diverged_runs_record_is_strict_json(tmp_path):
    from capscale.trainers.runlog import append_record
    path = tmp_path / "runs.jsonl"
    append_record(path, {"format": "int2", "params": 1000, "tokens": 10, "loss": float("nan"), "status": "diverged"})
    line = path.read_text().strip()
    assert '"loss": null' in line and "NaN" not in line


def _fsdp_bf16_steps(rank: int, world: int, port: int, spec: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = capscale.compress_(tiny_llama(), spec)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=policy)
        net = fully_shard(model, mp_policy=policy)
        optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
        x = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))[rank::world]
        for _ in range(2):
            loss = net(input_ids=x, labels=x).loss
            assert torch.isfinite(loss)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        with pytest.raises(InputError, match="get_model_state_dict"):  # decompress_ says how, rather than breaking
            capscale.decompress_(model)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["int4/int4", "nvfp4/nvfp4"])
def test_fsdp2_with_bf16_mixed_precision_trains_over_a_format(spec):
    from torch.distributed import fsdp
    if not hasattr(fsdp, "MixedPrecisionPolicy"):
        pytest.skip("this torch has no FSDP2 MixedPrecisionPolicy")
    torch.multiprocessing.spawn(_fsdp_bf16_steps, args=(2, _free_port(), spec), nprocs=2, join=True)


REGISTRY_EXAMPLES = [e.example for e in capscale.capacity.registry() if not capscale.capacity.is_uncompressed(e.example)]


@pytest.mark.slow
@pytest.mark.parametrize("spec", REGISTRY_EXAMPLES + ["int4/int4", "nvfp4/nvfp4", "2:4+int4/int4"])
def test_a_cold_torch_compile_of_every_registered_format_equals_eager(spec):
    torch._dynamo.reset()
    model = capscale.compress_(nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128)), spec)
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    eager = model(x)
    torch.manual_seed(1)
    compiled = torch.compile(model)(x)
    if "rht" in spec:  # random signs drawn by the compiled graph's own generator: equal in law, not in value
        assert compiled.shape == eager.shape and torch.isfinite(compiled).all()
    else:
        assert torch.allclose(compiled, eager, atol=1e-5)
