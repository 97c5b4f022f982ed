"""Embedded Kafka broker: librdkafka's mock cluster, driven through ctypes.

No Kafka broker is installable here (docs/kafka.md), but the confluent-kafka
wheel ships librdkafka, whose mock cluster speaks the real Kafka wire protocol
in memory. We start it directly so that *other* clients (aiokafka, faust) can
connect to its bootstrap address like to any broker.

The mock cluster does not implement CreateTopics, so topics must be created
here, in the process that owns the cluster (see ``create_topic``).
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading
from pathlib import Path

# Kafka error codes we interpret (librdkafka rd_kafka_resp_err_t).
_ERR_NO_ERROR = 0
_ERR_TOPIC_ALREADY_EXISTS = 36


class EmbeddedKafkaError(RuntimeError):
    """The mock cluster refused an operation."""


def _find_librdkafka() -> str:
    """Locate the librdkafka shared object bundled with confluent-kafka.

    Wheels vendor it (auditwheel) into ``site-packages/confluent_kafka.libs``
    with a hashed name; some builds keep it next to the package instead.
    """
    override = os.environ.get("BACKFLOW_LIBRDKAFKA")
    if override:
        return override
    import confluent_kafka

    pkg = Path(confluent_kafka.__file__).resolve().parent
    patterns = [
        str(pkg.parent / "confluent_kafka.libs" / "librdkafka*.so*"),
        str(pkg / ".libs" / "librdkafka*.so*"),
        str(pkg / "librdkafka*.so*"),
        str(pkg.parent / "confluent_kafka.libs" / "librdkafka*.dylib"),
        str(pkg / ".dylibs" / "librdkafka*.dylib"),
    ]
    for pattern in patterns:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    raise EmbeddedKafkaError(
        f"librdkafka not found next to confluent_kafka ({pkg}); "
        "install confluent-kafka from a binary wheel or set BACKFLOW_LIBRDKAFKA"
    )


_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()


def _librdkafka() -> ctypes.CDLL:
    global _lib
    with _lib_lock:
        if _lib is not None:
            return _lib
        # Import confluent_kafka first so the very same library instance is
        # shared (the extension module already has it loaded).
        import confluent_kafka  # noqa: F401

        lib = ctypes.CDLL(_find_librdkafka())
        vp, cp, i32, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32, ctypes.c_size_t
        sigs: dict[str, tuple[object, list[object]]] = {
            "rd_kafka_conf_new": (vp, []),
            "rd_kafka_conf_set": (ctypes.c_int, [vp, cp, cp, cp, sz]),
            "rd_kafka_conf_destroy": (None, [vp]),
            "rd_kafka_new": (vp, [ctypes.c_int, vp, cp, sz]),
            "rd_kafka_destroy": (None, [vp]),
            "rd_kafka_err2str": (cp, [ctypes.c_int]),
            "rd_kafka_mock_cluster_new": (vp, [vp, ctypes.c_int]),
            "rd_kafka_mock_cluster_destroy": (None, [vp]),
            "rd_kafka_mock_cluster_bootstraps": (cp, [vp]),
            "rd_kafka_mock_topic_create": (ctypes.c_int, [vp, cp, ctypes.c_int, ctypes.c_int]),
            "rd_kafka_mock_set_controller_id": (ctypes.c_int, [vp, i32]),
            "rd_kafka_mock_group_initial_rebalance_delay_ms": (ctypes.c_int, [vp, i32]),
        }
        for name, (restype, argtypes) in sigs.items():
            fn = getattr(lib, name)
            fn.restype = restype
            fn.argtypes = argtypes
        _lib = lib
        return lib


class EmbeddedKafka:
    """An in-memory Kafka cluster (librdkafka mock) reachable over TCP on 127.0.0.1.

    It lives in this process (background threads of librdkafka): it disappears
    when ``close()`` is called or the process exits.
    """

    def __init__(self, brokers: int = 1, rebalance_delay_ms: int = 0) -> None:
        if brokers < 1:
            raise ValueError("brokers must be >= 1")
        lib = _librdkafka()
        self._lib = lib
        self.brokers = brokers
        self._lock = threading.Lock()
        errstr = ctypes.create_string_buffer(512)
        conf = lib.rd_kafka_conf_new()
        # The handle only hosts the mock cluster; keep its own logging quiet.
        for key, value in (("client.id", "backflow-embedded-kafka"), ("log_level", "3")):
            if lib.rd_kafka_conf_set(conf, key.encode(), value.encode(), errstr, 512) != 0:
                lib.rd_kafka_conf_destroy(conf)
                raise EmbeddedKafkaError(f"conf {key}: {errstr.value.decode()}")
        # RD_KAFKA_PRODUCER = 0; rd_kafka_new takes ownership of conf on success.
        rk = lib.rd_kafka_new(0, conf, errstr, 512)
        if not rk:
            lib.rd_kafka_conf_destroy(conf)
            raise EmbeddedKafkaError(f"rd_kafka_new failed: {errstr.value.decode()}")
        self._rk: int | None = rk
        mcluster = lib.rd_kafka_mock_cluster_new(rk, brokers)
        if not mcluster:
            lib.rd_kafka_destroy(rk)
            self._rk = None
            raise EmbeddedKafkaError("rd_kafka_mock_cluster_new failed")
        self._mcluster: int | None = mcluster
        # A fixed controller makes admin/metadata answers deterministic.
        self._check(lib.rd_kafka_mock_set_controller_id(mcluster, 1), "set controller id")
        # The default initial rebalance delay (3 s) slows every consumer group join.
        self._check(
            lib.rd_kafka_mock_group_initial_rebalance_delay_ms(mcluster, rebalance_delay_ms),
            "set initial rebalance delay",
        )
        self.bootstrap: str = lib.rd_kafka_mock_cluster_bootstraps(mcluster).decode()

    def _check(self, err: int, what: str) -> None:
        if err != _ERR_NO_ERROR:
            msg = self._lib.rd_kafka_err2str(err).decode()
            raise EmbeddedKafkaError(f"mock cluster: {what}: {msg} (error {err})")

    def create_topic(self, name: str, partitions: int, replication: int = 1) -> None:
        """Create ``name``; a no-op if it already exists with the same partition count."""
        if not name or len(name) > 249:
            raise ValueError(f"invalid topic name {name!r}")
        if partitions < 1:
            raise ValueError("partitions must be >= 1")
        if not 1 <= replication <= self.brokers:
            raise ValueError(f"replication must be in 1..{self.brokers}, got {replication}")
        with self._lock:
            if self._mcluster is None:
                raise EmbeddedKafkaError("mock cluster is closed")
            err = self._lib.rd_kafka_mock_topic_create(
                self._mcluster, name.encode(), partitions, replication
            )
        if err == _ERR_TOPIC_ALREADY_EXISTS:
            existing = self.partition_count(name)
            if existing != partitions:
                raise EmbeddedKafkaError(
                    f"topic {name!r} already exists with {existing} partitions, "
                    f"wanted {partitions}"
                )
            return
        self._check(err, f"create topic {name!r}")

    def partition_count(self, name: str, timeout: float = 10.0) -> int | None:
        """Partition count of ``name`` via a Metadata request (None if absent)."""
        return self.partition_counts(timeout).get(name)

    def partition_counts(self, timeout: float = 10.0) -> dict[str, int]:
        """Every topic's partition count, from one Metadata request."""
        from confluent_kafka.admin import AdminClient

        # Ask for *all* topics: the mock cluster auto-creates any topic named
        # in a Metadata request, even from an admin client.
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": "3"})
        md = admin.list_topics(timeout=timeout)
        return {
            name: len(topic.partitions)
            for name, topic in md.topics.items()
            if topic.error is None
        }

    def close(self) -> None:
        with self._lock:
            if self._mcluster is not None:
                self._lib.rd_kafka_mock_cluster_destroy(self._mcluster)
                self._mcluster = None
            if self._rk is not None:
                self._lib.rd_kafka_destroy(self._rk)
                self._rk = None

    def __enter__(self) -> EmbeddedKafka:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
