"""`trackhouse serve`: every flag also reads an environment variable, and the flag wins."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from traceback import format_exception
from typing import Any, NoReturn

from aiokafka.errors import KafkaError
from clickhouse_connect.driver.exceptions import ClickHouseError

from trackhouse.admin import add_admin_commands, run_admin_command
from trackhouse.compat import limits
from trackhouse.compat.compression import MODES as COMPRESSION_MODES
from trackhouse.compat.compression import CompressionConfig
from trackhouse.compat.limits import HttpLimits
from trackhouse.compat.registry_store import RegistryConfig
from trackhouse.ingest import config as defaults
from trackhouse.ingest.config import BatcherConfig, ConfigError, KafkaConfig, ReceiverConfig
from trackhouse.ingest.errors import PermanentError
from trackhouse.ingest.receiver_grpc import GrpcConfig
from trackhouse.query.connection import StoreConfig
from trackhouse.query.integrity import DamagedStoreError
from trackhouse.query.redaction import Redactor, url_secrets
from trackhouse.server import ServerConfig, serve


@dataclass(frozen=True, slots=True)
class Option:
    flag: str
    env: str
    cast: Callable[[str], object]
    default: object
    help: str


def _csv(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _flag(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("", "0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {value!r}")


def port(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 65535:
        raise ValueError("must be a port number from 0 to 65535")
    return number


def log_level(value: str) -> str:
    level = value.upper()
    if level not in _LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(_LOG_LEVELS)}")
    return level


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def compression_mode(value: str) -> str:
    mode = value.lower()
    if mode not in COMPRESSION_MODES:
        raise ValueError(f"must be one of {', '.join(COMPRESSION_MODES)}")
    return mode


SERVE_OPTIONS = (
    Option("--data-dir", "TRACKHOUSE_DATA_DIR", Path, Path("data"), "embedded ClickHouse (chDB) directory"),
    Option(
        "--clickhouse-url",
        "TRACKHOUSE_CLICKHOUSE_URL",
        str,
        None,
        "chdb:///dir or http(s)://user:pass@host:8123/db; overrides --data-dir",
    ),
    Option(
        "--cluster",
        "TRACKHOUSE_CLUSTER",
        str,
        "",
        "ClickHouse cluster (remote_servers) to create the schema ON CLUSTER: Replicated tables, Distributed by run",
    ),
    Option("--host", "TRACKHOUSE_HOST", str, "127.0.0.1", "interface for gRPC and HTTP"),
    Option("--grpc-port", "TRACKHOUSE_GRPC_PORT", port, 50051, "gRPC ingest port (0: any free port)"),
    Option(
        "--http-port", "TRACKHOUSE_HTTP_PORT", port, 5000, "HTTP port: MLflow API and UI, /metrics (0: any free port)"
    ),
    Option(
        "--artifacts-destination",
        "TRACKHOUSE_ARTIFACTS_DESTINATION",
        str,
        "",
        "where proxied MLflow artifacts go: a directory or URI such as s3://bucket/prefix"
        " (default <data-dir>/artifacts)",
    ),
    Option(
        "--flush-points",
        "TRACKHOUSE_FLUSH_POINTS",
        int,
        defaults.DEFAULT_FLUSH_POINTS,
        "insert once this many points are queued",
    ),
    Option(
        "--flush-interval-ms",
        "TRACKHOUSE_FLUSH_INTERVAL_MS",
        int,
        defaults.DEFAULT_FLUSH_INTERVAL_MS,
        "...or once the oldest is this old",
    ),
    Option(
        "--max-queue-points",
        "TRACKHOUSE_MAX_QUEUE_POINTS",
        int,
        defaults.DEFAULT_MAX_QUEUE_POINTS,
        "points held before RESOURCE_EXHAUSTED",
    ),
    Option(
        "--max-message-bytes",
        "TRACKHOUSE_MAX_MESSAGE_BYTES",
        int,
        defaults.DEFAULT_MAX_MESSAGE_BYTES,
        "largest write request accepted",
    ),
    Option("--log-level", "TRACKHOUSE_LOG_LEVEL", log_level, "INFO", "logging level"),
    Option(
        "--role",
        "TRACKHOUSE_ROLE",
        str,
        "all",
        "all | gateway (gRPC in, Kafka out) | worker (Kafka in, storage out) | reader (MLflow API and UI only)",
    ),
    Option("--kafka-bootstrap", "TRACKHOUSE_KAFKA_BOOTSTRAP", str, "", "Kafka host:port list; enables the Kafka path"),
    Option("--kafka-topic", "TRACKHOUSE_KAFKA_TOPIC", str, defaults.DEFAULT_KAFKA_TOPIC, "topic of write requests"),
    Option(
        "--kafka-dead-letter-topic",
        "TRACKHOUSE_KAFKA_DEAD_LETTER_TOPIC",
        str,
        "",
        "poison messages (default <topic>.dlq)",
    ),
    Option(
        "--kafka-group-id", "TRACKHOUSE_KAFKA_GROUP_ID", str, defaults.DEFAULT_KAFKA_GROUP_ID, "workers' consumer group"
    ),
    Option("--kafka-client-id", "TRACKHOUSE_KAFKA_CLIENT_ID", str, "trackhouse", "Kafka client id"),
    Option(
        "--kafka-partitions",
        "TRACKHOUSE_KAFKA_PARTITIONS",
        int,
        defaults.DEFAULT_KAFKA_PARTITIONS,
        "partitions if the topic is created",
    ),
    Option(
        "--kafka-replication-factor", "TRACKHOUSE_KAFKA_REPLICATION_FACTOR", int, 1, "replicas if topics are created"
    ),
    Option("--kafka-security-protocol", "TRACKHOUSE_KAFKA_SECURITY_PROTOCOL", str, "PLAINTEXT", "PLAINTEXT|SSL|SASL_*"),
    Option("--kafka-sasl-mechanism", "TRACKHOUSE_KAFKA_SASL_MECHANISM", str, "", "e.g. PLAIN, SCRAM-SHA-512"),
    Option("--kafka-sasl-username", "TRACKHOUSE_KAFKA_SASL_USERNAME", str, "", "SASL user"),
    Option("--kafka-sasl-password", "TRACKHOUSE_KAFKA_SASL_PASSWORD", str, "", "SASL password"),
    Option("--kafka-ssl-cafile", "TRACKHOUSE_KAFKA_SSL_CAFILE", str, "", "CA bundle for SSL"),
    Option("--kafka-ssl-certfile", "TRACKHOUSE_KAFKA_SSL_CERTFILE", str, "", "client certificate for SSL"),
    Option("--kafka-ssl-keyfile", "TRACKHOUSE_KAFKA_SSL_KEYFILE", str, "", "client key for SSL"),
    # topology: several nodes over one store.
    Option(
        "--catalog-cache-seconds",
        "TRACKHOUSE_CATALOG_CACHE_SECONDS",
        int,
        defaults.DEFAULT_CATALOG_CACHE_SECONDS,
        "whole seconds a storing node trusts what it learnt of runs' and experiments' existence and names"
        " (another node's delete, restore or rename takes effect on this node's writes within this)",
    ),
    # net-auth: authentication, TLS and the browser-facing checks.
    Option(
        "--auth-file",
        "TRACKHOUSE_AUTH_FILE",
        Path,
        None,
        "users and tokens (hashed) for HTTP and gRPC; manage it with `trackhouse auth`; unset: no authentication",
    ),
    Option("--tls-cert", "TRACKHOUSE_TLS_CERT", Path, None, "PEM certificate chain: serve HTTPS and gRPC over TLS"),
    Option("--tls-key", "TRACKHOUSE_TLS_KEY", Path, None, "PEM private key of --tls-cert"),
    Option(
        "--allowed-hosts",
        "TRACKHOUSE_ALLOWED_HOSTS",
        _csv,
        (),
        "comma-separated Host headers answered (fnmatch patterns; * for any); unset: loopback and private addresses",
    ),
    Option(
        "--cors-allowed-origins",
        "TRACKHOUSE_CORS_ALLOWED_ORIGINS",
        _csv,
        (),
        "comma-separated origins allowed cross-origin writes (localhost origins always are)",
    ),
    Option(
        "--allow-unauthenticated-network",
        "TRACKHOUSE_ALLOW_UNAUTHENTICATED_NETWORK",
        _flag,
        False,
        "listen on a non-loopback --host without --auth-file (anyone who can reach it can read and write)",
    ),
    # registry: the model registry's database.
    Option(
        "--registry-store-uri",
        "TRACKHOUSE_REGISTRY_STORE_URI",
        str,
        "",
        "model registry database, as SQLAlchemy URL: postgresql://..., mysql://... shared by every node"
        " (default sqlite:///<data-dir>/registry.db)",
    ),
    # Network safety (issue 11): where artifacts may live, and the HTTP edge's bounds.
    Option(
        "--artifacts-allowed-roots",
        "TRACKHOUSE_ARTIFACTS_ALLOWED_ROOTS",
        str,
        "",
        "comma-separated roots besides --artifacts-destination that experiments may keep artifacts under"
        " (e.g. s3://bucket/prefix); any other artifact_location is refused",
    ),
    Option(
        "--max-body-bytes",
        "TRACKHOUSE_MAX_BODY_BYTES",
        int,
        limits.DEFAULT_MAX_BODY_BYTES,
        "largest HTTP request body (artifact uploads excepted); larger gets 413",
    ),
    Option(
        "--max-upload-bytes",
        "TRACKHOUSE_MAX_UPLOAD_BYTES",
        int,
        limits.DEFAULT_MAX_UPLOAD_BYTES,
        "largest artifact upload; uploads stream, larger gets 413",
    ),
    Option(
        "--http-header-timeout",
        "TRACKHOUSE_HTTP_HEADER_TIMEOUT",
        int,
        limits.DEFAULT_HEADER_TIMEOUT_S,
        "whole seconds a request's head (request line and headers) may take to arrive",
    ),
    Option(
        "--http-keep-alive-timeout",
        "TRACKHOUSE_HTTP_KEEP_ALIVE_TIMEOUT",
        int,
        limits.DEFAULT_KEEP_ALIVE_TIMEOUT_S,
        "whole seconds an idle kept-alive HTTP connection stays open",
    ),
    Option(
        "--http-max-connections",
        "TRACKHOUSE_HTTP_MAX_CONNECTIONS",
        int,
        limits.DEFAULT_MAX_CONNECTIONS,
        "open HTTP connections beyond this are refused with 503",
    ),
    Option(
        "--http-compression",
        "TRACKHOUSE_HTTP_COMPRESSION",
        compression_mode,
        "auto",
        "auto: compress large answers (zstd or gzip, as the client accepts) for clients on other hosts;"
        " on: for every client (e.g. behind a same-host proxy that does not compress); off: never",
    ),
)


class _Parser(argparse.ArgumentParser):
    """Bad settings end in one line on stderr and exit status 2, never a usage dump or a traceback."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"trackhouse: {message} (see {self.prog} --help)\n")


class _FromEnvironment(str):
    """A default read from an environment variable: argparse converts string defaults only when the flag is
    absent, so a given flag wins without the variable ever being parsed, and a bad variable is named in the error."""

    env: str

    def __new__(cls, value: str, env: str) -> _FromEnvironment:
        self = super().__new__(cls, value)
        self.env = env
        return self


class _SetTrue(argparse.Action):
    """store_true that keeps a `type`, so a boolean read from the environment is converted (and checked) too."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, *_: object) -> None:
        setattr(namespace, self.dest, True)


def _converter(option: Option) -> Callable[[str], object]:
    def convert(raw: str) -> object:
        try:
            return option.cast(raw)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            reason = "not an integer" if option.cast is int or "invalid literal" in str(exc) else str(exc)
            source = f"{raw.env}={raw!r}" if isinstance(raw, _FromEnvironment) else repr(raw)
            raise argparse.ArgumentTypeError(f"{source}: {reason}") from None

    return convert


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="trackhouse", description="High-throughput metric store with the MLflow API")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the server (gRPC ingest and HTTP) in one process")
    for option in SERVE_OPTIONS:
        env_value = os.environ.get(option.env)
        default = _FromEnvironment(env_value, option.env) if env_value else option.default
        help_text = f"{option.help} [env {option.env}]"
        # A string default is converted by `type` only when the flag is absent, so a given flag always wins.
        action: Any = _SetTrue if option.cast is _flag else "store"
        serve_parser.add_argument(option.flag, action=action, type=_converter(option), default=default, help=help_text)
    add_admin_commands(commands)
    return parser


def _bad_setting(message: object) -> NoReturn:
    print(f"trackhouse: {message}", file=sys.stderr)
    sys.exit(2)


#: Artifact URI schemes whose MLflow repository needs a package trackhouse does not install by default:
#: scheme -> (module MLflow imports, the extra that installs it).
_ARTIFACT_EXTRAS = {
    "s3": ("boto3", "s3"),
    "gs": ("google.cloud.storage", "gcs"),
    "wasbs": ("azure.storage.blob", "azure"),
    "abfss": ("azure.storage.blob", "azure"),
}


def _check_artifact_scheme(destination: str) -> None:
    """Refuse at start-up, not at the first upload, a destination whose repository cannot be imported."""
    scheme = destination.partition("://")[0] if "://" in destination else ""
    if scheme not in _ARTIFACT_EXTRAS:
        return
    module, extra = _ARTIFACT_EXTRAS[scheme]
    if _missing(module):
        raise ConfigError(f"{scheme}:// artifacts need {module}: pip install 'trackhouse[{extra}]'")


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:  # a parent package is missing
        return True


def build_config(args: argparse.Namespace) -> ServerConfig:
    store = StoreConfig.from_flags(args.clickhouse_url, args.data_dir, args.cluster)
    batcher = BatcherConfig(
        flush_points=args.flush_points, flush_interval_ms=args.flush_interval_ms, max_queue_points=args.max_queue_points
    )
    receiver = ReceiverConfig(
        max_message_bytes=args.max_message_bytes, catalog_cache_seconds=args.catalog_cache_seconds
    )
    grpc = GrpcConfig(host=args.host, port=args.grpc_port, max_message_bytes=args.max_message_bytes)
    kafka = None
    if args.kafka_bootstrap:
        kafka = KafkaConfig(
            bootstrap=args.kafka_bootstrap,
            topic=args.kafka_topic,
            dead_letter_topic=args.kafka_dead_letter_topic,
            group_id=args.kafka_group_id,
            client_id=args.kafka_client_id,
            partitions=args.kafka_partitions,
            replication_factor=args.kafka_replication_factor,
            security_protocol=args.kafka_security_protocol,
            sasl_mechanism=args.kafka_sasl_mechanism,
            sasl_username=args.kafka_sasl_username,
            sasl_password=args.kafka_sasl_password,
            ssl_cafile=args.kafka_ssl_cafile,
            ssl_certfile=args.kafka_ssl_certfile,
            ssl_keyfile=args.kafka_ssl_keyfile,
        )
    registry = (
        RegistryConfig(args.registry_store_uri)
        if args.registry_store_uri
        else RegistryConfig.for_data_dir(args.data_dir)
    )
    artifacts = args.artifacts_destination or str((args.data_dir / "artifacts").resolve())
    _check_artifact_scheme(artifacts)
    http_limits = HttpLimits(
        max_body_bytes=args.max_body_bytes,
        max_upload_bytes=args.max_upload_bytes,
        header_timeout_s=args.http_header_timeout,
        keep_alive_timeout_s=args.http_keep_alive_timeout,
        max_connections=args.http_max_connections,
    )
    return ServerConfig(
        store=store,
        artifacts_destination=artifacts,
        artifacts_allowed_roots=tuple(r.strip() for r in args.artifacts_allowed_roots.split(",") if r.strip()),
        http_limits=http_limits,
        http_compression=CompressionConfig(mode=args.http_compression),
        grpc=grpc,
        http_host=args.host,
        http_port=args.http_port,
        batcher=batcher,
        receiver=receiver,
        role=args.role,
        kafka=kafka,
        auth_file=args.auth_file,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        allowed_hosts=args.allowed_hosts,
        cors_allowed_origins=args.cors_allowed_origins,
        allow_unauthenticated_network=args.allow_unauthenticated_network,
        registry=registry,
    )


def redactor_for(args: argparse.Namespace) -> Redactor:
    """Every secret the configuration holds, so that no output line can carry one."""
    found = url_secrets(args.clickhouse_url or "") + url_secrets(args.registry_store_uri or "")
    if args.kafka_sasl_password:
        found.append(args.kafka_sasl_password)
    return Redactor(found)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command != "serve":
        sys.exit(run_admin_command(args))
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    redact = redactor_for(args)
    redact.install()
    sys.excepthook = lambda kind, value, tb: sys.stderr.write(redact("".join(format_exception(kind, value, tb))))
    try:
        config = build_config(args)
    except (ConfigError, ValueError) as exc:  # fail fast on bad configuration
        _bad_setting(redact(str(exc)))
    try:
        asyncio.run(serve(config))
    except ConfigError as exc:  # a setting only found wrong while starting (before PermanentError, its base)
        _bad_setting(redact(str(exc)))
    except (
        KafkaError,
        ClickHouseError,
        OSError,
        PermanentError,
        DamagedStoreError,
    ) as exc:  # unreachable or unusable at start-up
        sys.exit(redact(f"trackhouse: cannot start: {exc}"))


if __name__ == "__main__":
    main()
