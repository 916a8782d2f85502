"""Unit tests of the round's pure parts: schedule, batch plan, metrics, flat state, topology, backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scaling_fl.config import ConfigError
from scaling_fl.flat_state import flat_sha256, flatten_model_
from scaling_fl.launch import node_topology
from scaling_fl.sites import choose_backend
from scaling_fl.train import local
from scaling_fl.train.evaluate import classification_metrics


def test_lr_schedules_follow_hugging_face_shapes():
    assert local.lr_factor(0, 100, 10, "linear") == 0.0
    assert local.lr_factor(5, 100, 10, "linear") == 0.5
    assert local.lr_factor(10, 100, 10, "linear") == 1.0
    assert local.lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)
    assert local.lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert local.lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0)
    assert local.lr_factor(99, 100, 0, "constant") == 1.0


def test_batch_plan_epochs_cover_every_row_once_per_epoch_and_reshuffle():
    plan = local.batch_plan(num_rows=10, batch_size=3, grad_accum_steps=2, num_local_epochs=2, local_steps=0, seed=1)
    assert len(plan) == local.steps_per_round(10, 3, 2, 2, 0) == 4
    epochs = [
        np.concatenate([b for step in plan[:2] for b in step]),
        np.concatenate([b for step in plan[2:] for b in step]),
    ]
    for rows in epochs:
        assert sorted(rows.tolist()) == list(range(10))
    assert not np.array_equal(epochs[0], epochs[1])
    assert [len(b) for b in plan[1]] == [3, 1]  # the epoch's last step is short, never padded with repeats
    again = local.batch_plan(10, 3, 2, 2, 0, seed=1)
    assert all(np.array_equal(a, b) for sa, sb in zip(plan, again) for a, b in zip(sa, sb))


def test_batch_plan_local_steps_mode_gives_exactly_that_many_steps():
    plan = local.batch_plan(num_rows=5, batch_size=2, grad_accum_steps=1, num_local_epochs=1, local_steps=7, seed=0)
    assert len(plan) == 7 and all(len(step) == 1 for step in plan)


def test_metrics_from_confusion_match_a_hand_computation():
    confusion = np.array([[5, 1, 0], [2, 3, 0], [0, 0, 0]])  # class 2 never seen nor predicted
    metrics = classification_metrics(loss_sum=11.0, confusion=confusion)
    assert metrics["accuracy"] == pytest.approx(8 / 11)
    assert metrics["loss"] == pytest.approx(1.0)
    f1_class0 = 2 * 5 / (6 + 7)
    f1_class1 = 2 * 3 / (5 + 4)
    assert metrics["f1_macro"] == pytest.approx((f1_class0 + f1_class1) / 2)


def test_flat_state_views_cover_float_tensors_and_leave_integer_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    model.register_buffer("step_ids", torch.arange(5))
    model.register_buffer("running", torch.ones(2))
    before = {name: t.clone() for name, t in model.state_dict().items()}
    flat = flatten_model_(model)
    float_numel = sum(t.numel() for t in before.values() if t.is_floating_point())
    assert flat.numel() == float_numel
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name])
    flat.zero_()
    assert all(float(p.detach().abs().sum()) == 0 for p in model.parameters())
    assert float(model.running.sum()) == 0
    assert torch.equal(model.step_ids, torch.arange(5))  # integer buffers are never averaged
    out = model(torch.ones(1, 3))  # still a working module
    out.sum().backward()
    assert model[0].weight.grad is not None
    assert flat_sha256(flat) == flat_sha256(torch.zeros_like(flat))


def test_topology_single_node_and_kubeflow_and_slurm_and_torchrun():
    single = node_topology(4, env={})
    assert (single.num_nodes, single.node_rank, single.num_sites) == (1, 0, 4)
    kubeflow = node_topology(2, env={"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "23456", "WORLD_SIZE": "3", "RANK": "2"})
    assert (kubeflow.num_nodes, kubeflow.node_rank, kubeflow.num_sites, kubeflow.master_addr) == (3, 2, 6, "10.0.0.1")
    slurm = node_topology(2, env={"MASTER_ADDR": "n1", "MASTER_PORT": "1", "SLURM_NNODES": "2", "SLURM_NODEID": "1"})
    assert (slurm.num_nodes, slurm.node_rank) == (2, 1)
    torchrun = node_topology(
        2,
        env={
            "TORCHELASTIC_RUN_ID": "x",
            "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "h",
            "MASTER_PORT": "29500",
            "WORLD_SIZE": "2",
            "RANK": "1",
        },
    )
    assert (torchrun.num_nodes, torchrun.node_rank, torchrun.master_port) == (2, 1, 29501)
    with pytest.raises(ConfigError, match="nproc-per-node=1"):
        node_topology(2, env={"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "2", "MASTER_PORT": "1"})
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        node_topology(2, env={"WORLD_SIZE": "2", "RANK": "0"})
    with pytest.raises(ConfigError, match="outside"):
        node_topology(2, env={"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})


def test_backend_choice_respects_nccls_one_rank_per_gpu_rule():
    assert choose_backend("auto", (0, 1), cuda=True) == "nccl"
    assert choose_backend("auto", (0, 0, 1, 1), cuda=True) == "gloo"
    assert choose_backend("auto", (0, 1), cuda=False) == "gloo"
    assert choose_backend("gloo", (0, 1), cuda=True) == "gloo"


def test_adamw_runs_fused_on_flat_views_with_hf_decay_groups_and_steps_like_the_loop():
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    flat = [flatten_model_(model) for model in models]  # parameters are views of one flat buffer
    fused = local.make_optimizer(models[0], "adamw", 0.01, weight_decay=0.1, momentum=0.0)
    loop = torch.optim.AdamW(
        [
            {"params": [p for p in models[1].parameters() if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for p in models[1].parameters() if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=0.01,
        foreach=False,
    )
    assert fused.defaults["fused"] is True and not loop.defaults["fused"]
    assert [len(group["params"]) for group in fused.param_groups] == [1, 3]  # the weight; biases and norm
    before = flat[0].clone()
    x = torch.randn(8, 6)
    for _ in range(5):
        for model, optimizer in ((models[0], fused), (models[1], loop)):
            model(x).pow(2).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    assert (flat[0] - before).abs().min() > 0  # every value stepped, through the views
    torch.testing.assert_close(flat[0], flat[1], rtol=1e-5, atol=1e-6)
