"""Starting Ray the same way for every stage: a cluster when ``RAY_ADDRESS`` is set, else local on loopback."""

from __future__ import annotations

import os


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
        ray.init(num_cpus=os.cpu_count(), _node_ip_address="127.0.0.1", include_dashboard=True,
                 dashboard_host="127.0.0.1", log_to_driver=log_to_driver, configure_logging=False)
    return True
