"""Helpers shared by the end-to-end tests: the tiny-run flags and a read-only store query."""
import duckdb

TINY = ["--preset", "tiny", "--no-eval", "--quiet"]


def q(store, sql, params=()):
    """Rows of a read-only query on a DuckDB results file (connection closed at once)."""
    con = duckdb.connect(str(store), read_only=True)
    try:
        return con.execute(sql, list(params)).fetchall()
    finally:
        con.close()
