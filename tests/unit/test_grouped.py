"""K runs trained as one grouped network (esper.tolaria.grouped) follow the K runs trained alone."""

from __future__ import annotations

import pytest
import torch

from support import plain, train_alone
from esper.kasmina import build_host
from esper.tolaria.grouped import GroupedCNN, train_grouped


def test_grouped_runs_follow_the_runs_trained_alone(synthetic_data):
    """Three synthetic hosts with their own inits and data orders, 6 steps: each group of the grouped
    network ends where its run trained alone ends (weights, BatchNorm statistics, outputs)."""
    k, steps = 3, 6
    hosts = []
    for seed in range(k):
        torch.manual_seed(seed)
        hosts.append(build_host("synthetic"))
    grouped = GroupedCNN.from_hosts(hosts)
    for i, host in enumerate(hosts):  # the groups start as the hosts
        torch.testing.assert_close(grouped.host(i).state_dict(), host.state_dict(), rtol=0, atol=0)

    train_grouped(grouped, synthetic_data, [torch.Generator().manual_seed(100 + i) for i in range(k)], steps)
    for i, host in enumerate(hosts):
        train_alone(host, synthetic_data, torch.Generator().manual_seed(100 + i), steps)

    x = (synthetic_data.val_x[:64].float() / 255 - torch.tensor(synthetic_data.mean).view(1, -1, 1, 1)) \
        / torch.tensor(synthetic_data.std).view(1, -1, 1, 1)
    grouped.eval()
    together = grouped(torch.cat([x] * k, dim=1))  # [64, K, classes]
    moved = 0.0
    for i, host in enumerate(hosts):
        run = grouped.host(i)
        for name, tensor in host.state_dict().items():
            torch.testing.assert_close(run.state_dict()[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(together[:, i], plain(host).eval()(x), rtol=1e-4, atol=1e-4)
        other = hosts[(i + 1) % k].blocks[0][0].weight
        moved = max(moved, float((host.blocks[0][0].weight - other).detach().abs().max()))
    assert moved > 0  # the runs differ from each other: a mix-up of groups would fail above


def test_only_cnn_hosts_group():
    with pytest.raises(ValueError, match="only CNN hosts"):
        GroupedCNN(build_host("tinystories").spec, 2)
