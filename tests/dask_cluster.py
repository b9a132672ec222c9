"""A reusable dask.distributed cluster for DaskRunner tests: `from tests.dask_cluster import dask_address`.

Two separate worker processes (one thread each) on 127.0.0.1, one per test module, so every
Beam DoFn is pickled to and run in another process, as on a real cluster.
"""

from __future__ import annotations

import pytest
from distributed import LocalCluster


@pytest.fixture(scope="module")
def dask_address():
    """The scheduler's address (tcp://127.0.0.1:PORT) of a two-process LocalCluster."""
    with LocalCluster(
        n_workers=2,
        processes=True,
        threads_per_worker=1,
        host="127.0.0.1",
        dashboard_address=None,
    ) as cluster:
        yield cluster.scheduler_address


def dask_flags(address: str) -> list[str]:
    """Beam's own DaskOptions flags that send a pipeline to the cluster at `address`."""
    return ["--runner", "DaskRunner", "--dask_client_address", address]
