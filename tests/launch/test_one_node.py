"""The single-node rendezvous: the agent's store on a free port, a fresh one every round."""

from __future__ import annotations

from datetime import timedelta

from torch.distributed import TCPStore
from torch.distributed.elastic.rendezvous import RendezvousParameters, rendezvous_handler_registry

from distrain.launch_config import LaunchConfig
from distrain.launchers import one_node
from distrain.launchers.local import rendezvous


def test_single_node_launches_use_it_and_multi_node_ones_do_not() -> None:
    for config in (LaunchConfig(entrypoint="train.py", nproc_per_node=2),
                   LaunchConfig(entrypoint="train.py", nproc_per_node=2, standalone=True)):
        backend, _, run_id, _ = rendezvous(config)
        assert backend == one_node.BACKEND and run_id
    two_nodes = LaunchConfig(entrypoint="train.py", nproc_per_node=2, min_nodes=2, max_nodes=2,
                             master_addr="127.0.0.1", master_port=29999)
    assert rendezvous(two_nodes)[0] == "static"
    assert one_node.register() == one_node.register() == one_node.BACKEND  # registering twice is fine


def test_every_round_is_rank_0_of_one_on_a_fresh_store_that_clients_reach() -> None:
    one_node.register()
    handler = rendezvous_handler_registry.create_handler(
        RendezvousParameters(backend=one_node.BACKEND, endpoint="", run_id="job", min_nodes=1, max_nodes=1,
                             local_addr="127.0.0.1"))
    assert handler.use_agent_store and handler.get_run_id() == "job" and handler.num_nodes_waiting() == 0
    first, restarted = handler.next_rendezvous(), handler.next_rendezvous()
    assert (first.rank, first.world_size, restarted.rank, restarted.world_size) == (0, 1, 0, 1)
    port = restarted.bootstrap_store_info.master_port
    assert port > 0 and first.bootstrap_store_info.master_port != port
    assert restarted.bootstrap_store_info.master_addr == "127.0.0.1"
    first.store.set("dead", "group")  # what the first attempt's workers left behind
    restarted.store.set("key", "value")
    # a worker connects as a client, as TORCHELASTIC_USE_AGENT_STORE says; the restarted round's
    # store holds nothing of the first round's
    worker = TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10))
    assert worker.get("job/key") == b"value"
    assert not worker.check(["job/dead"])
    assert handler.shutdown()
