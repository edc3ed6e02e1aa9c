"""Starting Ray the same way for every stage: a cluster when ``RAY_ADDRESS`` is set, else local on loopback.

A local Ray is local: every server it starts (GCS, raylet, object manager, each worker's gRPC server, the dashboard
and its agents) listens on 127.0.0.1 only. Ray on Linux replaces a loopback node address with the machine's
network address, so that other nodes could join; with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (Ray's switch for
single-machine use, its default on Windows and macOS) it keeps 127.0.0.1 and binds there. Ray reads the switch
when it is imported, so this module sets it at import, before any stage imports Ray, and only when no cluster is
named. Token authentication stays on as Ray sets it. The training runs' process groups keep to loopback too: gloo
and NCCL on the ``lo`` interface, and their rendezvous store on 127.0.0.1 (``pipeline.rendezvous``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os

SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Ray gives a new local node's raylet a fixed 30 s to register; on a machine busy with other work it can miss that, and
# a second start, once the load has eased, is what a user would do by hand.
NODE_START_TIMEOUT = "timed out during startup"
LOCAL_STARTS = 2

if not os.environ.get("RAY_ADDRESS"):
    os.environ.setdefault(SINGLE_MACHINE, "0")


def start_ray(log_to_driver: bool = False) -> bool:
    """Connect to ``RAY_ADDRESS`` or start a local Ray bound to 127.0.0.1; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=log_to_driver)
    else:
        # The dashboard (on loopback) serves the state API that Ray Train polls to watch its controller. Ray Train's
        # preemption watcher (an actor per run, polling for cloud nodes being reclaimed) has nothing to watch on one
        # machine; the processes Ray starts inherit this environment.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Ray Train's controller polls its workers every 2 s: it takes a run's end (and each reported checkpoint,
        # which a worker's next report waits for) that late. A poll is one small call per worker; a missed one is
        # not a failure (that takes 10 minutes), so polling a local run every 0.5 s only hears of it sooner.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):  # the collectives' sockets: loopback
            os.environ.setdefault(variable, "lo")
        start_local(lambda: ray.init(num_cpus=os.cpu_count(), _node_ip_address="127.0.0.1", include_dashboard=True,
                                     dashboard_host="127.0.0.1", log_to_driver=log_to_driver,
                                     configure_logging=False))
    return True


def start_local(init) -> None:
    """``init()`` (``ray.init`` of a local node), started again if the node was too slow to start
    (``NODE_START_TIMEOUT``): the processes the failed start left behind are ended first."""
    import psutil

    me = psutil.Process()
    for attempt in range(1, LOCAL_STARTS + 1):
        before = {child.pid for child in me.children(recursive=True)}
        try:
            init()
            return
        except Exception as err:  # noqa: BLE001 - Ray raises a bare Exception for a node too slow to start
            if NODE_START_TIMEOUT not in str(err) or attempt == LOCAL_STARTS:
                raise
            for child in me.children(recursive=True):  # its GCS, raylet, dashboard and reaper
                if child.pid not in before:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        child.kill()
            logging.getLogger(__name__).warning("Ray's node did not start within the 30 s Ray gives it (a busy "
                                                "machine?); starting it again (%d of %d)", attempt + 1, LOCAL_STARTS)


def on_loopback() -> bool:
    """Whether the Ray this process is connected to runs on loopback (a local Ray started by ``start_ray``)."""
    import ray

    return ipaddress.ip_address(ray.util.get_node_ip_address()).is_loopback
