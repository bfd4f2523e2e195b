"""The one owner of trackhouse's DDL. Both the write and the read side use these names.

Migrations are append-only and idempotent (IF NOT EXISTS). Every node may start on a store that needs them; the
first to claim query.migration_lock's lease applies them while the others wait, against embedded chDB or a server.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from trackhouse.query.cluster_ddl import ClusterRenderer
from trackhouse.query.connection import Client
from trackhouse.query.migration_lock import (
    DEFAULT_LEASE,
    LOCKS_CLAUSES,
    LOCKS_COLUMNS,
    LOCKS_TABLE,
    LeaseConfig,
    MigrationLease,
)

METRICS = "metrics"
#: Each (run, key)'s latest point, packed (see latest_point_sql). Replaced `latest_metrics` in migration 5.
LATEST_METRICS = "metric_latest"
#: The same rows ordered by key (migration 15): a runs search filtered or sorted by a metric reads one key's rows
#: as one range instead of a slice of every granule.
LATEST_BY_KEY = "metric_latest_by_key"
EXPERIMENTS = "experiments"
RUNS = "runs"
#: The runs table's columns: the sink writes them in this order and catalog.run_rows reads them so.
RUN_COLUMNS = (
    "run_id",
    "experiment_id",
    "name",
    "status",
    "start_time",
    "end_time",
    "user",
    "lifecycle_stage",
    "version",
)
PARAMS = "params"
#: A (run, key)'s param value: the earliest claim's (migration 13). Params are immutable; when nodes log different
#: values at once, every claim is stored and this picks the same winner on every node (ties: the smaller value).
PARAM_VALUE = "argMin(value, (claimed_at, value))"
#: Every param and tag row again, ordered by key (migration 16): a search sorted or filtered by one param or tag
#: reads that key's rows as one range. Materialized views fill them on the server, so every insert into params
#: and tags, of a node of any version, reaches them: unlike the sink's copies (COPIES), they never need a repair.
PARAMS_BY_KEY = "params_by_key"
TAGS_BY_KEY = "tags_by_key"
#: Who holds an attempt number when two nodes claimed it (migration 14): the earliest claim, as for params.
ATTEMPT_WINNER = "argMin(claimed_by, (claimed_at, claimed_by))"
TAGS = "tags"
EXPERIMENT_TAGS = "experiment_tags"
#: Datasets logged as run inputs, one per (experiment, name, digest), and each run's dataset inputs (migration 7).
DATASETS = "datasets"
DATASET_INPUTS = "dataset_inputs"
#: The input tag MLflow keeps a dataset's role in ("training", "eval", ...); dataset_inputs.context copies it.
DATASET_CONTEXT_TAG = "mlflow.data.context"
#: Each chart bucket's first, last, lowest and highest finite point and its first NaN, +Inf and -Inf point
#: (ingest.summaries computes them; see bucket_aggregates_sql), at two widths. Replaced `metric_extremes`
#: in migration 8.
METRIC_BUCKETS = "metric_buckets"
#: steps per fine bucket (charts over more than ~160 of them read extremes, not points),
FINE_WIDTH = 256
#: and per coarse bucket, for charts of many long runs at once.
COARSE_WIDTH = 4096
#: Value orders (see value_order_sql) stored for NaN: after every number (MLflow's order), or before.
#: Both decode back to a NaN. metric_buckets' lows and highs give every non-finite value these orders, so
#: a low with order NAN_LOW (a high with NAN_HIGH) means the bucket holds no finite point.
NAN_LOW = 2**63 - 1
NAN_HIGH = -(2**63)
#: The non-finite values whose first point each bucket keeps, by column of metric_buckets.
SPECIALS = {"nan_at": "isNaN(value)", "pinf_at": "value = inf", "ninf_at": "value = -inf"}
#: The unpacked (flag, step, timestamp) of a bucket holding no point of a SPECIALS kind: flag 1 loses to every 0.
NO_SPECIAL = (1, 0, 0)
MIGRATIONS_TABLE = "schema_migrations"
#: MLflow 3 logged models (migration 6), their tags and params, and which runs used or produced them.
LOGGED_MODELS = "logged_models"
LOGGED_MODEL_TAGS = "logged_model_tags"
LOGGED_MODEL_PARAMS = "logged_model_params"
RUN_MODELS = "run_models"
#: Resumed and forked runs (migration 11): each run's attempts after its first, forks' parents, and the first
#: step and latest point of each (run, key, attempt > 0), which query.attempts turns into superseded ranges.
RUN_ATTEMPTS = "run_attempts"
RUN_FORKS = "run_forks"
METRIC_ATTEMPTS = "metric_attempts"

#: Distributed runs (migration 10): each (run, key, rank, node)'s first and latest point and its step-rate
#: anchors (see rank_series_select), and per RANK_WIDTH steps its last point and which steps hold a point, a
#: NaN or an infinity (see rank_buckets_select). ingest.rank_summaries computes both; query.ranks reads them.
RANK_SERIES = "metric_ranks"
RANK_BUCKETS = "metric_rank_buckets"
#: Steps per metric_rank_buckets row (the band's finest resolution).
RANK_WIDTH = 32
#: Per RANK_SPAN steps, which steps hold a point, a NaN, an infinity: one bit per step in UInt256 step maps
#: (see rank_spans_select), so counting a rank's points reads steps / 256 rows.
RANK_SPANS = "metric_rank_spans"
RANK_SPAN = 256
#: A rank's step rate is measured from a point RATE_WINDOW/2 to RATE_WINDOW steps back (two staggered windows).
RATE_WINDOW = 256
#: Every table the sink inserts into; migration 12 makes each drop a repeated insert (see DEDUPLICATION_WINDOW).
DEDUPLICATED_TABLES = (
    EXPERIMENTS,
    RUNS,
    PARAMS,
    TAGS,
    EXPERIMENT_TAGS,
    DATASETS,
    DATASET_INPUTS,
    LOGGED_MODELS,
    LOGGED_MODEL_TAGS,
    LOGGED_MODEL_PARAMS,
    RUN_MODELS,
    METRICS,
    LATEST_METRICS,
    LATEST_BY_KEY,
    METRIC_BUCKETS,
    RANK_SERIES,
    RANK_BUCKETS,
    RANK_SPANS,
    METRIC_ATTEMPTS,
)
#: Sink tables created after migration 12, with the setting in their own CREATE (migration 12 must not change).
_CREATED_AFTER_MIGRATION_12 = frozenset({LATEST_BY_KEY})
#: Inserts per table whose tokens a table that is not replicated remembers: minutes of flushes at the busiest
#: (metrics), far longer for the small tables; a retry comes within the batcher's backoff, seconds.
DEDUPLICATION_WINDOW = 1000

#: Migration 11's tables declare what migration 12 sets on the tables before them (a store may have applied 12
#: first, since the two were written side by side).
_DEDUPLICATED = f" SETTINGS non_replicated_deduplication_window = {DEDUPLICATION_WINDOW}"

DEFAULT_EXPERIMENT_ID = "0"
DEFAULT_EXPERIMENT_NAME = "Default"

# Each entry is (version, statements); {db} is the database name. Never edit a
# shipped entry: add a new one.
#
# Every statement also has a cluster form (`--cluster`), rendered by query.cluster_ddl without per-migration
# code: T becomes a Replicated T_local per shard plus a Distributed T over it, sharded by run, so queries keep
# their names. To stay renderable, a statement is one of: CREATE TABLE IF NOT EXISTS {db}.T (...) ENGINE =
# <...>MergeTree ... (or AS {db}.other); ALTER TABLE {db}.T ... (column actions reach the Distributed table too);
# DROP TABLE/VIEW IF EXISTS; CREATE [MATERIALIZED] VIEW IF NOT EXISTS; INSERT INTO {db}.T ... SELECT/VALUES
# (a backfill: it runs once, through the Distributed tables, so target only tables where a repeat is harmless:
# ReplacingMergeTree, min/max aggregates). tests/test_cluster_ddl.py parses every rendered statement.
#: Tables the sink writes as copies of another, each with the statement that copies its source into it. A node of
#: an older version, still writing during a rolling upgrade, writes the source only; `trackhouse repair` (`repair`)
#: runs these once every node runs this version. Each copy is an AggregatingMergeTree of maxima, so a row copied
#: again merges with itself: the statements are idempotent.
COPIES = {
    LATEST_BY_KEY: "INSERT INTO {db}.metric_latest_by_key (key, run_id, latest)"
    " SELECT key, run_id, latest FROM {db}.metric_latest",
}

MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            # Duplicates (client retries, Kafka redelivery) are identical in every
            # column, so the sort key spans all of them and merges drop them; reads
            # deduplicate until then. Codecs: steps and timestamps grow steadily, so
            # Delta/DoubleDelta shrink them before ZSTD; Gorilla suits slowly-varying
            # floats and cost no measurable insert speed against plain ZSTD.
            """CREATE TABLE IF NOT EXISTS {db}.metrics (
                run_id LowCardinality(String),
                key LowCardinality(String),
                step Int64 CODEC(Delta, ZSTD(1)),
                timestamp Int64 CODEC(DoubleDelta, ZSTD(1)),
                value Float64 CODEC(Gorilla, ZSTD(1))
            ) ENGINE = ReplacingMergeTree
            ORDER BY (run_id, key, step, timestamp, value)""",
            # MLflow's "latest" is the maximum by (step, timestamp, value): exactly
            # tuple ordering, so max() of the tuple is the rule, duplicate-insensitive,
            # and cheaper on insert than an argMax state (measured).
            """CREATE TABLE IF NOT EXISTS {db}.latest_metrics (
                run_id LowCardinality(String),
                key LowCardinality(String),
                latest SimpleAggregateFunction(max, Tuple(step Int64, timestamp Int64, value Float64))
            ) ENGINE = AggregatingMergeTree
            ORDER BY (run_id, key)""",
            """CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.latest_metrics_mv TO {db}.latest_metrics AS
            SELECT run_id, key, max((step, timestamp, value)) AS latest
            FROM {db}.metrics GROUP BY run_id, key""",
            # Small mutable tables: whole-row upserts, last version wins; read with FINAL.
            """CREATE TABLE IF NOT EXISTS {db}.experiments (
                experiment_id String,
                name String,
                artifact_location String,
                lifecycle_stage LowCardinality(String),
                creation_time Int64,
                last_update_time Int64,
                version UInt64
            ) ENGINE = ReplacingMergeTree(version)
            ORDER BY experiment_id""",
            """CREATE TABLE IF NOT EXISTS {db}.runs (
                run_id String,
                experiment_id String,
                name String,
                status LowCardinality(String),
                start_time Int64,
                end_time Nullable(Int64),
                user String,
                lifecycle_stage LowCardinality(String),
                version UInt64
            ) ENGINE = ReplacingMergeTree(version)
            ORDER BY run_id""",
            # Params are immutable, so any surviving copy is the value.
            """CREATE TABLE IF NOT EXISTS {db}.params (
                run_id String,
                key String,
                value String
            ) ENGINE = ReplacingMergeTree
            ORDER BY (run_id, key)""",
            """CREATE TABLE IF NOT EXISTS {db}.tags (
                run_id String,
                key String,
                value String,
                deleted UInt8,
                version UInt64
            ) ENGINE = ReplacingMergeTree(version)
            ORDER BY (run_id, key)""",
            # MLflow's experiment "0", "Default", always exists. Version 0 lets any
            # later rename or tombstone win.
            """INSERT INTO {db}.experiments
            SELECT '{default_id}', '{default_name}', '', 'active', {now}, {now}, 0
            WHERE NOT EXISTS (SELECT 1 FROM {db}.experiments WHERE experiment_id = '{default_id}')""",
        ),
    ),
    (
        2,
        (
            # Experiment tags overwrite and can be deleted, like run tags: last version wins.
            """CREATE TABLE IF NOT EXISTS {db}.experiment_tags (
                experiment_id String,
                key String,
                value String,
                deleted UInt8,
                version UInt64
            ) ENGINE = ReplacingMergeTree(version)
            ORDER BY (experiment_id, key)""",
        ),
    ),
    (
        3,
        (
            # Chart rollups: each bucket's lowest and highest point, so a long series is
            # charted from 1/256 of its rows with spikes intact. min, max, argMin and argMax
            # ignore duplicates, so retries and the backfill below are harmless. Measured on
            # insert: +4-6% with plain columns and argMin/argMax states, against +78% with
            # tuple-valued min/max, so no tuples here.
            """CREATE TABLE IF NOT EXISTS {db}.metric_rollups (
                run_id LowCardinality(String),
                key LowCardinality(String),
                bucket Int64,
                low SimpleAggregateFunction(min, Float64),
                high SimpleAggregateFunction(max, Float64),
                low_step AggregateFunction(argMin, Int64, Float64),
                high_step AggregateFunction(argMax, Int64, Float64),
                low_timestamp AggregateFunction(argMin, Int64, Float64),
                high_timestamp AggregateFunction(argMax, Int64, Float64)
            ) ENGINE = AggregatingMergeTree
            ORDER BY (run_id, key, bucket)""",
            """CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.metric_rollups_mv TO {db}.metric_rollups AS
            SELECT {rollup_select} FROM {db}.metrics GROUP BY run_id, key, bucket""",
            # Points stored before this migration.
            """INSERT INTO {db}.metric_rollups SELECT {rollup_select} FROM {db}.metrics GROUP BY run_id, key, bucket""",
        ),
    ),
    (
        4,
        (
            # A coarser level, fed from the fine rollups (a cascading view), so it costs inserts
            # almost nothing: its input is 1/256 of the points. 100 runs of 10^6 points chart
            # from 24k coarse rows instead of 390k fine ones.
            """CREATE TABLE IF NOT EXISTS {db}.metric_rollups_coarse AS {db}.metric_rollups""",
            """CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.metric_rollups_coarse_mv TO {db}.metric_rollups_coarse AS
            SELECT {coarse_select} FROM {db}.metric_rollups GROUP BY run_id, key, bucket""",
            """INSERT INTO {db}.metric_rollups_coarse SELECT {coarse_select} FROM {db}.metric_rollups
            GROUP BY run_id, key, bucket""",
        ),
    ),
    (
        5,
        (
            # The sink now computes every summary with numpy (ingest.summaries) and inserts it in the
            # same flush: the views cost wide flushes 4-7x their insert time (measured). Each summary
            # point is one Int256 that sorts as the point should (see pack_sql): merging Int256 minima
            # cost 0.63 us per row against 2.6 us for the same triple as a Tuple (measured), and
            # merges rewrite every row several times.
            """CREATE TABLE IF NOT EXISTS {db}.metric_latest (
                run_id LowCardinality(String),
                key LowCardinality(String),
                latest SimpleAggregateFunction(max, Int256)
            ) ENGINE = AggregatingMergeTree
            ORDER BY (run_id, key)""",
            # Width first: a chart reads one width, and with the widths interleaved it decompressed the
            # other's rows too (100 runs' coarse extremes: 51 ms, against 15 ms width first; measured).
            """CREATE TABLE IF NOT EXISTS {db}.metric_extremes (
                run_id LowCardinality(String),
                key LowCardinality(String),
                width UInt16,
                bucket Int64,
                low SimpleAggregateFunction(min, Int256),
                high SimpleAggregateFunction(max, Int256)
            ) ENGINE = AggregatingMergeTree
            ORDER BY (width, run_id, key, bucket)""",
            "DROP VIEW IF EXISTS {db}.latest_metrics_mv",
            "DROP VIEW IF EXISTS {db}.metric_rollups_mv",
            "DROP VIEW IF EXISTS {db}.metric_rollups_coarse_mv",
            # Points stored before this migration, summarised as ingest.summaries does (a test holds
            # the two to the same answers).
            """INSERT INTO {db}.metric_latest SELECT {latest_select} FROM {db}.metrics GROUP BY run_id, key""",
            """INSERT INTO {db}.metric_extremes SELECT {extremes_select_fine} FROM {db}.metrics
            GROUP BY run_id, key, bucket""",
            """INSERT INTO {db}.metric_extremes SELECT {extremes_select_coarse} FROM {db}.metrics
            GROUP BY run_id, key, bucket""",
            "DROP TABLE IF EXISTS {db}.metric_rollups_coarse",
            "DROP TABLE IF EXISTS {db}.metric_rollups",
            "DROP TABLE IF EXISTS {db}.latest_metrics",
        ),
    ),
    (
        6,
        (
            # MLflow 3 links a point to a logged model and the dataset it was measured on. Mostly
            # unused, so LowCardinality columns that hold '' cost next to nothing. They join the end
            # of the sort key (ClickHouse allows that only in the ALTER that adds them) so that a
            # point logged for two models is not merged into one; every read stays DISTINCT on
            # (step, timestamp, value). Rerunning the statement is a no-op.
            """ALTER TABLE {db}.metrics
            ADD COLUMN IF NOT EXISTS model_id LowCardinality(String),
            ADD COLUMN IF NOT EXISTS dataset_name LowCardinality(String),
            ADD COLUMN IF NOT EXISTS dataset_digest LowCardinality(String),
            MODIFY ORDER BY (run_id, key, step, timestamp, value, model_id, dataset_name, dataset_digest)""",
            # A model's points are found by model_id across runs: the set index skips every granule
            # holding only unlinked points (parts written before this migration gain it as they merge).
            "ALTER TABLE {db}.metrics ADD INDEX IF NOT EXISTS model_ids model_id TYPE set(256) GRANULARITY 1",
            """CREATE TABLE IF NOT EXISTS {db}.logged_models (
                model_id String,
                experiment_id String,
                name String,
                artifact_location String,
                creation_timestamp Int64,
                last_updated_timestamp Int64,
                status Int32,
                lifecycle_stage LowCardinality(String),
                model_type String,
                source_run_id String,
                status_message String,
                version UInt64
            ) ENGINE = ReplacingMergeTree(version)
            ORDER BY model_id""",
            """CREATE TABLE IF NOT EXISTS {db}.logged_model_tags (
                model_id String,
                key String,
                value String,
                deleted UInt8,
                version UInt64
            ) ENGINE = ReplacingMergeTree(version)
            ORDER BY (model_id, key)""",
            """CREATE TABLE IF NOT EXISTS {db}.logged_model_params (
                model_id String,
                key String,
                value String,
                version UInt64
            ) ENGINE = ReplacingMergeTree(version)
            ORDER BY (model_id, key)""",
            # runs/log-inputs models ('input') and runs/outputs ('output'); a retry writes the same row.
            """CREATE TABLE IF NOT EXISTS {db}.run_models (
                run_id String,
                direction LowCardinality(String),
                model_id String,
                step Int64
            ) ENGINE = ReplacingMergeTree
            ORDER BY (run_id, direction, model_id, step)""",
        ),
    ),
    (
        7,
        (
            # MLflow deduplicates datasets by (experiment, name, digest): the digest names the content,
            # so rows of one key describe the same data. The writer skips datasets already stored
            # (stock keeps the first); concurrent writers of one dataset leave rows that merges fold.
            """CREATE TABLE IF NOT EXISTS {db}.datasets (
                experiment_id String,
                name String,
                digest String,
                source_type String,
                source String,
                schema String,
                profile String,
                version UInt64
            ) ENGINE = ReplacingMergeTree(version)
            ORDER BY (experiment_id, name, digest)""",
            # A run's inputs point at datasets by key; one row per (run, dataset), as MLflow keeps one
            # input per pair. `context` copies the mlflow.data.context tag
            # so that search filters and search-datasets read a column. `logged_at` orders a run's inputs.
            """CREATE TABLE IF NOT EXISTS {db}.dataset_inputs (
                run_id String,
                experiment_id String,
                name String,
                digest String,
                tags Array(Tuple(key String, value String)),
                context Nullable(String),
                logged_at Int64,
                version UInt64
            ) ENGINE = ReplacingMergeTree(version)
            ORDER BY (run_id, name, digest)""",
        ),
    ),
    (
        8,
        (
            # Faithful charts: each bucket also keeps its first and last point (a chart starts and ends where the
            # series does), its lowest and highest *finite* point, and its first NaN, +Inf and -Inf point, so a
            # chart shows each special value once where it occurs. metric_extremes' lows and highs counted
            # infinities as extremes, so it cannot be extended; its rows are rebuilt from the points.
            """CREATE TABLE IF NOT EXISTS {db}.metric_buckets (
                run_id LowCardinality(String),
                key LowCardinality(String),
                width UInt16,
                bucket Int64,
                first SimpleAggregateFunction(min, Int256),
                last SimpleAggregateFunction(max, Int256),
                low SimpleAggregateFunction(min, Int256),
                high SimpleAggregateFunction(max, Int256),
                nan_at SimpleAggregateFunction(min, Int256),
                pinf_at SimpleAggregateFunction(min, Int256),
                ninf_at SimpleAggregateFunction(min, Int256)
            ) ENGINE = AggregatingMergeTree
            ORDER BY (width, run_id, key, bucket)""",
            """INSERT INTO {db}.metric_buckets SELECT {buckets_select_fine} FROM {db}.metrics
            GROUP BY run_id, key, bucket""",
            """INSERT INTO {db}.metric_buckets SELECT {buckets_select_coarse} FROM {db}.metrics
            GROUP BY run_id, key, bucket""",
            "DROP TABLE IF EXISTS {db}.metric_extremes",
            # History pages are read in step order and checked against a window of timestamps: with timestamps
            # growing along steps, this index lets that check read only the page's granules.
            "ALTER TABLE {db}.metrics ADD INDEX IF NOT EXISTS timestamp_range timestamp TYPE minmax GRANULARITY 1",
            "ALTER TABLE {db}.metrics MATERIALIZE INDEX timestamp_range",
        ),
    ),
    (
        9,
        (
            # Distributed runs: the rank and node that logged a point, and the run attempt it was logged under
            # (a resumed run starts a new one). Unused they are constant, and cost 0.005 B per point (points
            # stored before read as rank 0 of attempt 0). They join the end of the sort key, as migration 6's
            # links did, so that two ranks' equal points are not merged into one; ranks therefore interleave
            # within a step, and T64 keeps only the rank's used low bits: 8 ranks cost 0.30 B per point with it
            # and 0.69 B with ZSTD alone (benchmarks/storage.py). Rerunning the statement is a no-op.
            """ALTER TABLE {db}.metrics
            ADD COLUMN IF NOT EXISTS rank UInt32 CODEC(T64, ZSTD(1)),
            ADD COLUMN IF NOT EXISTS node LowCardinality(String),
            ADD COLUMN IF NOT EXISTS attempt UInt32 CODEC(T64, ZSTD(1)),
            MODIFY ORDER BY (run_id, key, step, timestamp, value, model_id, dataset_name, dataset_digest,
                rank, node, attempt)""",
        ),
    ),
    (
        10,
        (
            # Distributed runs: per-rank summaries, so the rank API reads ranks x keys rows (metric_ranks) or
            # ranks x steps/32 rows (metric_rank_buckets) instead of every point. Every column is a min, max or
            # bitwise OR of whole points, so duplicates and redeliveries fold into the same answer.
            """CREATE TABLE IF NOT EXISTS {db}.metric_ranks (
                run_id LowCardinality(String),
                key LowCardinality(String),
                rank UInt32,
                node LowCardinality(String),
                first SimpleAggregateFunction(min, Int256),
                last SimpleAggregateFunction(max, Int256),
                window_a SimpleAggregateFunction(max, Int256),
                window_b SimpleAggregateFunction(max, Int256)
            ) ENGINE = AggregatingMergeTree
            ORDER BY (run_id, key, rank, node)""",
            """CREATE TABLE IF NOT EXISTS {db}.metric_rank_buckets (
                run_id LowCardinality(String),
                key LowCardinality(String),
                bucket Int64,
                rank UInt32,
                node LowCardinality(String),
                last SimpleAggregateFunction(max, Int128)
            ) ENGINE = AggregatingMergeTree
            ORDER BY (run_id, key, bucket, rank, node)""",
            """CREATE TABLE IF NOT EXISTS {db}.metric_rank_spans (
                run_id LowCardinality(String),
                key LowCardinality(String),
                rank UInt32,
                node LowCardinality(String),
                span Int64,
                steps SimpleAggregateFunction(groupBitOr, UInt256),
                nan_steps SimpleAggregateFunction(groupBitOr, UInt256),
                inf_steps SimpleAggregateFunction(groupBitOr, UInt256)
            ) ENGINE = AggregatingMergeTree
            ORDER BY (run_id, key, rank, node, span)""",
            """INSERT INTO {db}.metric_ranks SELECT {rank_series_select} FROM {db}.metrics
            GROUP BY run_id, key, rank, node""",
            """INSERT INTO {db}.metric_rank_buckets SELECT {rank_buckets_select} FROM {db}.metrics
            GROUP BY run_id, key, bucket, rank, node""",
            """INSERT INTO {db}.metric_rank_spans SELECT {rank_spans_select} FROM {db}.metrics
            GROUP BY run_id, key, rank, node, span""",
            # Stores that applied migration 12 first: these tables drop repeated inserts too.
            *(
                f"ALTER TABLE {{db}}.{table} MODIFY SETTING"
                f" non_replicated_deduplication_window = {DEDUPLICATION_WINDOW}"
                for table in (RANK_SERIES, RANK_BUCKETS, RANK_SPANS)
            ),
        ),
    ),
    (
        11,
        (
            # A run's attempts after its first (attempt 0 is every run's start and has no row): the server
            # numbers them, one per resume. A run with no row here reads as it always did, at no extra cost.
            """CREATE TABLE IF NOT EXISTS {db}.run_attempts (
                run_id String,
                attempt UInt32,
                started_at Int64
            ) ENGINE = ReplacingMergeTree
            ORDER BY (run_id, attempt)"""
            + _DEDUPLICATED,
            # A fork reads its parent's points up to fork_step (inclusive) without copying them. Written once
            # when the fork is made; its tags only show it (a tag can be changed, the lineage cannot).
            """CREATE TABLE IF NOT EXISTS {db}.run_forks (
                run_id String,
                parent_run_id String,
                fork_step Int64,
                created_at Int64
            ) ENGINE = ReplacingMergeTree
            ORDER BY run_id"""
            + _DEDUPLICATED,
            # For points of attempts after the first only (the sink writes nothing for attempt 0): the first
            # step each attempt logged of each key, from which on it supersedes the attempts before it, and its
            # latest point (packed as in metric_latest), which is the key's latest once an attempt resumed.
            """CREATE TABLE IF NOT EXISTS {db}.metric_attempts (
                run_id LowCardinality(String),
                key LowCardinality(String),
                attempt UInt32,
                first_step SimpleAggregateFunction(min, Int64),
                latest SimpleAggregateFunction(max, Int256)
            ) ENGINE = AggregatingMergeTree
            ORDER BY (run_id, key, attempt)"""
            + _DEDUPLICATED,
            # Charts of a resumed run ask where its earlier attempts' points end (query.metrics._dirty): with the
            # range of attempts per granule, that read skips the later attempt's granules.
            "ALTER TABLE {db}.metrics ADD INDEX IF NOT EXISTS attempts attempt TYPE minmax GRANULARITY 1",
        ),
    ),
    (
        12,
        # Inserts carry deduplication tokens (ingest.sink.flush_token); a table that is not replicated keeps the
        # last DEDUPLICATION_WINDOW of them, so a retried insert already stored is dropped by ClickHouse itself
        # (replicated tables keep theirs in Keeper, by replicated_deduplication_window). A table created after
        # this migration declares `SETTINGS non_replicated_deduplication_window = ...` itself.
        tuple(
            f"ALTER TABLE {{db}}.{table} MODIFY SETTING non_replicated_deduplication_window = {DEDUPLICATION_WINDOW}"
            for table in DEDUPLICATED_TABLES
            if table not in _CREATED_AFTER_MIGRATION_12
        ),
    ),
    (
        13,
        (
            # The cross-node arbiter of param immutability: each insert is stamped by ClickHouse's clock, and
            # claimed_at joins the sorting key, so merges keep every claim instead of the last one inserted (which
            # may be the loser). ClickHouse forbids a default on a column added to the sorting key, so the default
            # comes in a second step. Rows stored before this have no conflicting claims; they read as now.
            "ALTER TABLE {db}.params ADD COLUMN IF NOT EXISTS claimed_at DateTime64(9),"
            " MODIFY ORDER BY (run_id, key, claimed_at)",
            "ALTER TABLE {db}.params MODIFY COLUMN claimed_at DateTime64(9) DEFAULT now64(9)",
        ),
    ),
    (
        14,
        (
            # Attempt numbers across nodes, claimed as params are: two nodes resuming one run at once both pick
            # the next number, both rows are kept (claimed_at and claimed_by join the sorting key), and the
            # earliest claim wins (ATTEMPT_WINNER); the loser takes the number after. Rows stored before this
            # read as claimed now (as params' do): nothing contests them, as a resume claims past the highest
            # number stored.
            "ALTER TABLE {db}.run_attempts ADD COLUMN IF NOT EXISTS claimed_at DateTime64(9),"
            " ADD COLUMN IF NOT EXISTS claimed_by String, MODIFY ORDER BY (run_id, attempt, claimed_at, claimed_by)",
            "ALTER TABLE {db}.run_attempts MODIFY COLUMN claimed_at DateTime64(9) DEFAULT now64(9)",
        ),
    ),
    (
        15,
        (
            # metric_latest is ordered by run, so one key's rows (a runs search filtered or sorted by a metric)
            # sit in every granule of a many-run experiment, and the search read the whole packed column: about 30
            # of the 85 ms of a metric filter + sort over 10^5 runs. Ordered by key, they are one range: 95 -> 55 ms
            # for the whole statement, alternated on the uimix --full store. The sink writes both tables from one
            # Arrow table; the duplicate costs (run, key) rows per flush, not points.
            """CREATE TABLE IF NOT EXISTS {db}.metric_latest_by_key (
                key LowCardinality(String),
                run_id LowCardinality(String),
                latest SimpleAggregateFunction(max, Int256)
            ) ENGINE = AggregatingMergeTree
            ORDER BY (key, run_id)"""
            + _DEDUPLICATED,
            # Latest points stored before this migration. A node of an older version still writing during a
            # rolling upgrade writes metric_latest only: `trackhouse repair` copies what it wrote (COPIES).
            COPIES[LATEST_BY_KEY],
        ),
    ),
    (
        16,
        (
            # params and tags are ordered by run, so one key's rows sit in every granule of a many-run experiment:
            # a param sort over 10^5 runs read all 3 x 10^5 rows to find the key's top values, then again to join
            # the candidates' values. Ordered by key, they are one range (search statements alone, alternated on
            # the uimix --full store): the UI's param sort + name filter 56 -> 40 ms, a tag sort 61 -> 46 ms.
            # claimed_at comes with each param row (the view sees it as params stored it), so PARAM_VALUE picks
            # the same claim from either table; a tag's versions and tombstones come along as stored too.
            """CREATE TABLE IF NOT EXISTS {db}.params_by_key (
                run_id String,
                key String,
                value String,
                claimed_at DateTime64(9)
            ) ENGINE = ReplacingMergeTree
            ORDER BY (key, run_id, claimed_at)"""
            + _DEDUPLICATED,
            """CREATE TABLE IF NOT EXISTS {db}.tags_by_key (
                run_id String,
                key String,
                value String,
                deleted UInt8,
                version UInt64
            ) ENGINE = ReplacingMergeTree(version)
            ORDER BY (key, run_id)"""
            + _DEDUPLICATED,
            # Each view before its backfill: a row stored in between reaches the copy twice, which is harmless
            # (identical rows merge; PARAM_VALUE and FINAL ignore repeats). The other order would lose it.
            """CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.params_by_key_mv TO {db}.params_by_key AS
            SELECT run_id, key, value, claimed_at FROM {db}.params""",
            "INSERT INTO {db}.params_by_key SELECT run_id, key, value, claimed_at FROM {db}.params",
            """CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.tags_by_key_mv TO {db}.tags_by_key AS
            SELECT run_id, key, value, deleted, version FROM {db}.tags""",
            "INSERT INTO {db}.tags_by_key SELECT run_id, key, value, deleted, version FROM {db}.tags",
        ),
    ),
    (
        17,
        (
            # A metric search joins the key's 10^5 per-run rows to the experiment's runs by run_id; as a
            # LowCardinality column (a dictionary of 10^5 distinct ids per part) it read and joined slower than
            # the runs' plain String: the UI's metric filter + sort 50-54 -> 41-46 ms (search_runs alone,
            # alternated on copies of the uimix --full store). A mutation: ClickHouse rewrites the column in the
            # background and reads parts not yet rewritten as the new type meanwhile; the sink's inserts are
            # unchanged.
            "ALTER TABLE {db}.metric_latest_by_key MODIFY COLUMN run_id String",
        ),
    ),
)

_ROLLUP_SELECT = (
    "run_id, key, intDiv(step, 256) AS bucket, min(value) AS low, max(value) AS high,"
    " argMinState(step, value) AS low_step, argMaxState(step, value) AS high_step,"
    " argMinState(timestamp, value) AS low_timestamp, argMaxState(timestamp, value) AS high_timestamp"
)

_COARSE_SELECT = (
    "run_id, key, intDiv(bucket, 16) AS bucket, min(low) AS low, max(high) AS high,"
    " argMinMergeState(low_step) AS low_step, argMaxMergeState(high_step) AS high_step,"
    " argMinMergeState(low_timestamp) AS low_timestamp, argMaxMergeState(high_timestamp) AS high_timestamp"
)


_MAGNITUDE_BITS = 2**63 - 1
_SIGN_BIT = f"toInt64('{-(2**63)}')"


def value_order_sql(column: str, nan: int) -> str:
    """A float's place in float order, as an int64 (its bits, with a negative float's magnitude bits
    flipped); NaN gets `nan`. ingest.summaries.value_order is the same function in numpy."""
    return f"if(isNaN({column}), toInt64('{nan}'), {_flip_negative_sql(f'reinterpretAsInt64({column})')})"


def _flip_negative_sql(bits: str) -> str:
    """Negative numbers' magnitude bits flipped: its own inverse, so it both encodes and decodes value orders."""
    return f"if({bits} >= 0, {bits}, bitXor({bits}, toInt64('{_MAGNITUDE_BITS}')))"


def pack_sql(first: str, second: str, third: str) -> str:
    """One Int256 that sorts as the int64 triple (first, second, third): little-endian 64-bit words
    (0, third, second, first), the lower two with their sign bit flipped so that, compared unsigned
    as Int256 compares them, they order as signed numbers. ingest.summaries.pack in numpy."""
    words = ("toInt64(0)", f"bitXor({third}, {_SIGN_BIT})", f"bitXor({second}, {_SIGN_BIT})", first)
    return f"reinterpretAsInt256(concat({', '.join(f'reinterpretAsFixedString({w})' for w in words)}))"


def unpack_sql(packed: str) -> tuple[str, str, str]:
    """SQL for the (first, second, third) int64s packed by pack_sql."""
    raw = f"reinterpretAsFixedString({packed})"

    def word(index: int) -> str:
        return f"reinterpretAsInt64(substring({raw}, {index * 8 + 1}, 8))"

    return word(3), f"bitXor({word(2)}, {_SIGN_BIT})", f"bitXor({word(1)}, {_SIGN_BIT})"


def order_value_sql(order: str) -> str:
    """The float whose value_order_sql is `order` (NaN for either NaN order)."""
    return f"reinterpretAsFloat64({_flip_negative_sql(order)})"


def extreme_point_sql(packed: str) -> tuple[str, str, str]:
    """SQL for the step, timestamp and value of a metric_extremes low or high: packed (value order, step, timestamp)."""
    order, step, timestamp = unpack_sql(packed)
    return step, timestamp, order_value_sql(order)


def latest_point_sql(packed: str) -> tuple[str, str, str]:
    """SQL for the step, timestamp and value of a metric_latest point: packed (step, timestamp, value order),
    so the maximum is MLflow's latest, with NaN above every number on a tie of step and timestamp."""
    step, timestamp, order = unpack_sql(packed)
    return step, timestamp, order_value_sql(order)


def latest_select() -> str:
    """The SELECT list summarising points into metric_latest rows (for backfills)."""
    return f"run_id, key, max({pack_sql('step', 'timestamp', value_order_sql('value', NAN_LOW))}) AS latest"


def bucket_aggregates_sql() -> list[tuple[str, str]]:
    """(column, aggregate over points) for each summary column of metric_buckets; ingest.summaries computes
    the same with numpy. Every column is one packed Int256 (see pack_sql) whose min or max is the point:
    - first, last: the bucket's first and last point by (step, timestamp, value order), MLflow's order;
    - low, high: its lowest and highest finite point, (value order, step, timestamp); every non-finite value
      has order NAN_LOW in a low and NAN_HIGH in a high, so they lose to any finite point;
    - nan_at, pinf_at, ninf_at: (0, step, timestamp) of its first point of that kind, or NO_SPECIAL."""
    order = value_order_sql("value", NAN_LOW)
    low = f"if(isFinite(value), {order}, toInt64('{NAN_LOW}'))"
    high = f"if(isFinite(value), {order}, toInt64('{NAN_HIGH}'))"
    columns = [
        ("first", f"min({pack_sql('step', 'timestamp', order)})"),
        ("last", f"max({pack_sql('step', 'timestamp', order)})"),
        ("low", f"min({pack_sql(low, 'step', 'timestamp')})"),
        ("high", f"max({pack_sql(high, 'step', 'timestamp')})"),
    ]
    for column, test in SPECIALS.items():
        flag, step, timestamp = f"if({test}, 0, 1)", f"if({test}, step, 0)", f"if({test}, timestamp, 0)"
        columns.append((column, f"min({pack_sql(flag, step, timestamp)})"))
    return columns


#: How stored metric_buckets rows of one bucket combine (what the AggregatingMergeTree does on merge).
BUCKET_MERGES = {
    "first": "min",
    "last": "max",
    "low": "min",
    "high": "max",
    "nan_at": "min",
    "pinf_at": "min",
    "ninf_at": "min",
}


def buckets_select(width: int) -> str:
    """The SELECT list summarising points into metric_buckets rows `width` steps wide (for backfills)."""
    shift = width.bit_length() - 1  # floor(step / width), also for negative steps
    aggregates = ", ".join(f"{sql} AS {column}" for column, sql in bucket_aggregates_sql())
    return f"run_id, key, {width} AS width, bitShiftRight(step, {shift}) AS bucket, {aggregates}"


def extremes_select(width: int) -> str:
    """The SELECT list summarising points into metric_extremes rows `width` steps wide (migration 5's backfill;
    migration 8 replaced the table)."""
    shift = width.bit_length() - 1  # floor(step / width), also for negative steps
    low = pack_sql(value_order_sql("value", NAN_LOW), "step", "timestamp")
    high = pack_sql(value_order_sql("value", NAN_HIGH), "step", "timestamp")
    return (
        f"run_id, key, {width} AS width, bitShiftRight(step, {shift}) AS bucket, min({low}) AS low, max({high}) AS high"
    )


def pack128_sql(first: str, second: str) -> str:
    """One Int128 that sorts as the int64 pair (first, second), as pack_sql does for triples."""
    words = (f"bitXor({second}, {_SIGN_BIT})", first)
    return f"reinterpretAsInt128(concat({', '.join(f'reinterpretAsFixedString({w})' for w in words)}))"


def unpack128_sql(packed: str) -> tuple[str, str]:
    """SQL for the (first, second) int64s packed by pack128_sql."""
    raw = f"reinterpretAsFixedString({packed})"
    low = f"reinterpretAsInt64(substring({raw}, 1, 8))"
    return f"reinterpretAsInt64(substring({raw}, 9, 8))", f"bitXor({low}, {_SIGN_BIT})"


def rank_series_select() -> str:
    """The SELECT list summarising points into metric_ranks rows (for backfills); ingest.rank_summaries in numpy.
    - first, last: the series' first and latest point, packed (step, timestamp, value order), MLflow's order;
    - window_a, window_b: the first point of the latest RATE_WINDOW-step window the series reached, packed
      (window, -step, -timestamp), with windows starting at multiples of RATE_WINDOW (a) or offset by half (b)."""
    point = pack_sql("step", "timestamp", value_order_sql("value", NAN_LOW))
    shift = RATE_WINDOW.bit_length() - 1
    window_a = pack_sql(f"bitShiftRight(step, {shift})", "-step", "-timestamp")
    window_b = pack_sql(f"bitShiftRight(step + {RATE_WINDOW // 2}, {shift})", "-step", "-timestamp")
    return (
        f"run_id, key, rank, node, min({point}) AS first, max({point}) AS last,"
        f" max({window_a}) AS window_a, max({window_b}) AS window_b"
    )


def rank_buckets_select() -> str:
    """The SELECT list summarising points into metric_rank_buckets rows (for backfills): `last`, the bucket's point
    at its highest step, packed (step, value order); the largest value on a tie."""
    shift = RANK_WIDTH.bit_length() - 1
    return (
        f"run_id, key, bitShiftRight(step, {shift}) AS bucket, rank, node,"
        f" max({pack128_sql('step', value_order_sql('value', NAN_LOW))}) AS last"
    )


def rank_spans_select() -> str:
    """The SELECT list summarising points into metric_rank_spans rows (for backfills): steps, nan_steps, inf_steps
    have bit (step mod RANK_SPAN) set when that step holds a point, a NaN, a ±Inf."""
    shift = RANK_SPAN.bit_length() - 1
    bit = f"bitShiftLeft(toUInt256(1), toUInt8(bitAnd(step, {RANK_SPAN - 1})))"
    return (
        f"run_id, key, rank, node, bitShiftRight(step, {shift}) AS span, groupBitOr({bit}) AS steps,"
        f" groupBitOr(if(isNaN(value), {bit}, toUInt256(0))) AS nan_steps,"
        f" groupBitOr(if(isInfinite(value), {bit}, toUInt256(0))) AS inf_steps"
    )


def _format_arguments(database: str, now: int) -> dict[str, object]:
    return {
        "db": database,
        "now": now,
        "default_id": DEFAULT_EXPERIMENT_ID,
        "default_name": DEFAULT_EXPERIMENT_NAME,
        "rollup_select": _ROLLUP_SELECT,
        "coarse_select": _COARSE_SELECT,
        "latest_select": latest_select(),
        "extremes_select_fine": extremes_select(FINE_WIDTH),
        "extremes_select_coarse": extremes_select(COARSE_WIDTH),
        "buckets_select_fine": buckets_select(FINE_WIDTH),
        "buckets_select_coarse": buckets_select(COARSE_WIDTH),
        "rank_series_select": rank_series_select(),
        "rank_buckets_select": rank_buckets_select(),
        "rank_spans_select": rank_spans_select(),
    }


def schema_statements(database: str, cluster: str = "", now: int | None = None) -> list[tuple[int, list[str]]]:
    """Every statement that builds the schema, as (version, statements) in order; version 0 creates the database
    and the table of applied migrations. With `cluster`, their cluster form (see query.cluster_ddl)."""
    arguments = _format_arguments(database, int(time.time() * 1000) if now is None else now)
    preamble = [
        "CREATE DATABASE IF NOT EXISTS {db}",
        f"CREATE TABLE IF NOT EXISTS {{db}}.{MIGRATIONS_TABLE} (version UInt32, applied_at DateTime64(3))"
        " ENGINE = ReplacingMergeTree ORDER BY version",
        f"CREATE TABLE IF NOT EXISTS {{db}}.{LOCKS_TABLE} {LOCKS_COLUMNS} ENGINE = MergeTree {LOCKS_CLAUSES}",
    ]
    renderer = ClusterRenderer(cluster) if cluster else None
    if renderer is not None:
        preamble = renderer.preamble(MIGRATIONS_TABLE, (LOCKS_TABLE, LOCKS_COLUMNS, LOCKS_CLAUSES))
    rendered = [(0, preamble)]
    for version, statements in MIGRATIONS:
        templates = list(statements)
        if renderer is not None:
            templates = [out for i, s in enumerate(statements) for out in renderer.render(s, version, i)]
        rendered.append((version, templates))
    return [(version, [t.format(**arguments) for t in templates]) for version, templates in rendered]


def record_sql(database: str, version: int) -> str:
    """The statement that marks migration `version` applied."""
    return f"INSERT INTO {database}.{MIGRATIONS_TABLE} VALUES ({version}, now64(3))"


def applied_versions(client: Client, database: str) -> set[int]:
    """The migrations recorded as applied to `database` (its table of migrations must exist)."""
    return {int(row[0]) for row in client.query(f"SELECT version FROM {database}.{MIGRATIONS_TABLE}").result_rows}


class OutdatedSchemaError(RuntimeError):
    """The store's schema is older than this version's: a node of this version must start (and migrate) first."""


def repair(client: Client, database: str, cluster: str = "", now: int | None = None) -> list[str]:
    """Copy into every table of COPIES what its source holds, and return those tables. For after a rolling
    upgrade, once every node runs this version (a node still on an older one goes on writing the source only).

    Refuses a store whose schema is behind this version's (OutdatedSchemaError): the copies may not exist yet.
    On a cluster each copy is one distributed INSERT ... SELECT, with a deduplication token of its own (`now`),
    so that it is not mistaken for the migration's backfill, or for an earlier repair, and skipped."""
    missing = sorted({version for version, _ in MIGRATIONS} - applied_versions(client, database))
    if missing:
        raise OutdatedSchemaError(
            f"schema migrations {', '.join(map(str, missing))} are not applied to {database}:"
            " start a node of this version first (it applies them), then repair"
        )
    stamp = int(time.time() * 1000) if now is None else now
    arguments = _format_arguments(database, stamp)
    renderer = ClusterRenderer(cluster) if cluster else None
    for table, statement in COPIES.items():
        if renderer is not None:
            statement = renderer.insert(statement, f"trackhouse-repair-{table}-{stamp}")
        client.command(statement.format(**arguments))
    return list(COPIES)


def migrate(
    client: Client,
    database: str,
    cluster: str = "",
    renewer: Callable[[], Client] | None = None,
    lease: LeaseConfig = DEFAULT_LEASE,
) -> int:
    """Create or upgrade the schema. Safe to run concurrently and repeatedly. Returns the schema version.

    A node with migrations to apply holds query.migration_lock's lease while it applies them, renewed from a second
    client that `renewer` opens (when given, and only then), so nodes starting together never interleave
    migrations; the others wait and find them applied. On a cluster the table of applied migrations is replicated
    to every server; a migration whose row has not reached this server yet is applied again, in order and
    harmlessly, as every statement is idempotent (see query.cluster_ddl for backfills)."""
    (_, preamble), *migrations = schema_statements(database, cluster)
    for statement in preamble:
        client.command(statement)

    def pending() -> list[tuple[int, list[str]]]:
        applied = applied_versions(client, database)
        return [(version, statements) for version, statements in migrations if version not in applied]

    if not pending():  # every start after the first: no lease, no second client
        return MIGRATIONS[-1][0]
    second = renewer() if renewer is not None else None
    try:
        with MigrationLease(client, database, lease, second, cluster=bool(cluster)) as held:
            if held.acquire(lambda: bool(pending())):
                for version, statements in pending():  # read again: the last holder may have applied some
                    for statement in statements:
                        client.command(statement)
                        held.renew_if_due()
                    client.command(record_sql(database, version))
    finally:
        if second is not None:
            second.close()
    return MIGRATIONS[-1][0]
