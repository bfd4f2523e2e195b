"""The read side and every SQL statement: schema, lookups and queries over ClickHouse."""
