"""The one place a Redis client is built: a single Redis or a Redis Cluster, from settings.

`serving.redis_mode: single` gives `redis.Redis` on `serving.redis_url` (lazy: nothing is
contacted until the first command). `cluster` gives `redis.cluster.RedisCluster`, which
reads the slot table from the first startup node that answers (`redis_url`'s host, then
`serving.redis_cluster_nodes`) when it is built, so a cluster that is down at startup
fails the start with a message naming the nodes.

What every key layout relies on, and why it holds on a cluster:

- A Lua script or MULTI touches keys of one slot only (else CROSSSLOT): the keys of one
  session share the hash tag `{s:<session>}`, the catalogue's `{catalogue}`, the price
  stream's `{price}` (state/session_store.py, state/price_store.py).
- Pipelines without MULTI may span slots: redis-py groups their commands by node, one
  round trip per node, so a session's snapshot (one slot) is one round trip.
- SCAN visits every master (`RedisCluster.scan_iter`) and DEL of keys in several slots is
  split per slot (`RedisCluster.delete`), so deletion and the console's session list work
  unchanged.
- Scripts run as direct calls, never inside a cluster pipeline (redis-py refuses EVALSHA
  there): a replica promoted by a failover has no cached script, and only a direct call
  answers NOSCRIPT by loading it again.

Failures: a node that is down raises `redis.ConnectionError` / `TimeoutError` (both
`redis.RedisError`), which the request path already turns into a degraded rail. The
cluster client retries once after refreshing its slot table (a failed-over slot then
reaches its new master); more retries would only stretch a request past its budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from railtower.settings import ServingSettings

RedisClient: TypeAlias = redis.Redis | RedisCluster


def connect(serving: ServingSettings, timeout_s: float) -> RedisClient:
    """The client `serving.redis_mode` asks for, every socket call bounded by `timeout_s`.

    Raises:
        redis.ConnectionError: cluster mode and no startup node answers.
    """
    return connect_url(
        serving.redis_url, timeout_s, serving.redis_mode, serving.redis_cluster_nodes
    )


def connect_url(
    url: str, timeout_s: float, mode: str = "single", cluster_nodes: Sequence[str] = ()
) -> RedisClient:
    """As `connect`, from the URL and mode directly (tests, benchmarks, tools)."""
    if mode == "single":
        return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    if mode != "cluster":
        raise ValueError(f"redis mode must be 'single' or 'cluster', got {mode!r}")
    nodes = [_node(text) for text in cluster_nodes]
    try:
        return RedisCluster.from_url(
            url,
            startup_nodes=nodes,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
            # match the servers' cluster-require-full-coverage no: with one master down,
            # the slots of the others still answer
            require_full_coverage=False,
        )
    except (redis.RedisError, RedisClusterException) as exc:
        names = ", ".join([url, *cluster_nodes])
        raise redis.ConnectionError(
            f"Redis Cluster not reachable at {names}: {exc}. Start it, add an answering "
            "node to serving.redis_cluster_nodes, or set serving.redis_mode: single"
        ) from exc


def is_cluster(client: RedisClient) -> bool:
    return isinstance(client, RedisCluster)


def _node(text: str) -> ClusterNode:
    host, _, port = text.rpartition(":")
    return ClusterNode(host, int(port))
