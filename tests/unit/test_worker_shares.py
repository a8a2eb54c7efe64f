"""What one of N workers runs: its shard, the shared port, its share of every limit."""

from __future__ import annotations

from pathlib import Path

from smtpbalancer.config import from_mapping
from smtpbalancer.workers import WorkerRole, shard_directory, stranded_shards, worker_config


def config(spool: Path, workers: int = 4):  # type: ignore[no-untyped-def]
    return from_mapping(
        {
            "server": {"listen": "0.0.0.0:25", "max_connections": 1000, "workers": workers},
            "spool": {"directory": str(spool), "max_size": "8GB"},
            "metrics": {"listen": "127.0.0.2:9465"},
            "upstream": [
                {
                    "name": "ses",
                    "address": "ses.example:587",
                    "rate": "14/s",
                    "daily_quota": 50_000,
                    "max_connections": 10,
                },
                {"name": "postfix", "address": "10.0.0.9:25", "max_connections": 2},
            ],
        }
    )


def test_each_worker_gets_a_quarter_of_every_limit(tmp_path: Path) -> None:
    cfg = worker_config(config(tmp_path), WorkerRole(3, 4, 2525, 0, 9))
    ses, postfix = cfg.upstreams
    assert ses.rate_per_s == 3.5 and ses.daily_quota == 12_500 and ses.max_connections == 3
    assert postfix.rate_per_s is None and postfix.daily_quota is None
    assert postfix.max_connections == 1  # never 0: every worker can reach every relay
    assert cfg.server.max_connections == 250 and cfg.server.port == 2525
    assert cfg.spool.max_size_bytes == 2_000_000_000
    assert cfg.spool.directory == tmp_path / "worker-3"
    assert (cfg.metrics.host, cfg.metrics.port) == ("127.0.0.1", 0)  # the supervisor's is public


def test_worker_zero_keeps_the_spool_so_going_from_one_to_n_strands_nothing(
    tmp_path: Path,
) -> None:
    assert shard_directory(tmp_path, 0) == tmp_path
    assert worker_config(config(tmp_path), WorkerRole(0, 4, 25, 0, 9)).spool.directory == tmp_path


def test_shards_beyond_the_worker_count_with_mail_are_stranded(tmp_path: Path) -> None:
    for index, files in ((1, ["queue/A"]), (2, ["lock"]), (3, ["segments/1.log"])):
        for name in files:
            path = tmp_path / f"worker-{index}" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
    assert stranded_shards(tmp_path, 4) == []
    assert stranded_shards(tmp_path, 2) == [tmp_path / "worker-3"]  # worker-2 holds only a lock
    assert stranded_shards(tmp_path, 1) == [tmp_path / "worker-1", tmp_path / "worker-3"]


def test_the_role_travels_in_one_environment_variable() -> None:
    role = WorkerRole(1, 2, 2525, 4650, 7)
    assert WorkerRole.from_env({"SMTPBALANCER_WORKER": role.encode()}) == role
    assert WorkerRole.from_env({}) is None
