"""A process group of one process, in the test process, for what needs a group but not peers."""

import pytest
import torch.distributed as dist


@pytest.fixture
def group_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
